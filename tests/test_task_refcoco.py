"""RefCOCO+ loader: IoU targets hand-checked, splits, the refs pickle restricted to plain data, errors."""

from __future__ import annotations

import collections
import json
import pickle

import pytest
import torch

from tests.fixtures.common import LAYOUTS, assert_missing_file_named, layout_root
from tests.fixtures.refcoco import DISTRACTOR, IMAGE_ID_OFFSET, IMAGES, object_bbox, sentences, write_refcoco_plus
from vlsparse.data.options import LoadOptions
from vlsparse.data.refcoco import load_refcoco_plus, read_refs, refcoco_image_key
from vlsparse.data.dataset import collate


@pytest.fixture(scope="module", params=LAYOUTS)
def data(request, tmp_path_factory):
    return layout_root(tmp_path_factory, write_refcoco_plus, "refcoco", request.param)


def iou(a, b):
    """IoU of two COCO [x, y, w, h] boxes, by hand."""
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def test_regions_targets_hand_checked(data, tokenizer):
    task = load_refcoco_plus(tokenizer, LoadOptions(data))
    assert (len(task.train), len(task.val), len(task.test)) == (12, 6, 6)
    assert (task.name, task.answers, task.metric_name, task.region_feature_dim) == ("refcoco+", [], "accuracy", 294)
    assert (task.objective.head, task.objective.loss) == ("region", "ce")
    ex = task.train.examples[0]
    easy = IMAGES["train"][0]
    x, y, w, h = object_bbox(easy)
    assert ex.question == sentences(easy)[0] and ex.image_id == refcoco_image_key(IMAGE_ID_OFFSET + easy)
    assert ex.gt_box == pytest.approx((x / 64, y / 64, (x + w) / 64, (y + h) / 64))
    t = task.train[0]["targets"]
    # regions: object box, 2x2 grid cells (tl, tr, bl, br), whole image (vlsparse.data.visual.regions)
    cells = [[0, 0, 32, 32], [32, 0, 32, 32], [0, 32, 32, 32], [32, 32, 32, 32], [0, 0, 64, 64]]
    assert t[0] == 1.0
    assert t[1:].tolist() == pytest.approx([iou([x, y, w, h], c) for c in cells], abs=1e-6)
    b = collate([task.test[k] for k in range(4)])
    assert b["img_feat"].shape == (4, 6, 294) and b["targets"].shape == (4, 6) and b["input_ids"].shape[0] == 4
    # accuracy: IoU >= 0.5 of the arg-max region; picking the object region is always right
    logits = torch.zeros(4, 6)
    logits[:, 0] = 1
    assert task.objective.metrics(logits, b["targets"])["accuracy"] == 1.0
    logits = torch.zeros(4, 6)
    logits[:, 5] = 1  # the whole image: IoU = object area / 4096 < 0.5 here
    assert task.objective.metrics(logits, b["targets"])["accuracy"] == 0.0


def test_test_split(data, tokenizer):
    for split in ("testA", "testB"):
        task = load_refcoco_plus(tokenizer, LoadOptions(data), test_split=split)
        want = [s for i in IMAGES[split] for s in sentences(i)]
        assert [e.question for e in task.test.examples] == want
    with pytest.raises(ValueError, match="test_split"):
        load_refcoco_plus(tokenizer, LoadOptions(data), test_split="test")


def test_pixels_candidates_are_coco_boxes(tokenizer, tmp_path):
    root = write_refcoco_plus(tmp_path)
    task = load_refcoco_plus(tokenizer, LoadOptions(root, visual="pixels", image_size=96), test_split="testB")
    item = task.test[0]
    x, y, w, h = box = object_bbox(IMAGES["testB"][0])
    assert item["pixel_values"].shape == (3, 96, 96)
    want_pos = [[x / 64, y / 64, (x + w) / 64, (y + h) / 64, w / 64, h / 64, w * h / 4096],
                [0, 0, 0.5, 0.5, 0.5, 0.5, 0.25]]
    assert torch.allclose(item["img_pos"], torch.tensor(want_pos), atol=1e-6)
    assert item["targets"].tolist() == pytest.approx([1.0, iou(box, DISTRACTOR)], abs=1e-6)
    b = collate([task.train[k] for k in range(3)])
    assert b["img_pos"].shape == (3, 2, 7) and b["targets"].shape == (3, 2)
    assert b["pixel_values"].shape == (3, 3, 96, 96)
    assert task.region_feature_dim is None and task.image_processor is not None


def test_refs_json_instead_of_pickle(tokenizer, tmp_path):
    root = write_refcoco_plus(tmp_path)
    pkl = root / "refcoco+" / "refs(unc).p"
    refs = read_refs(root / "refcoco+")
    (root / "refcoco+" / "refs(unc).json").write_text(json.dumps(refs))
    pkl.unlink()
    assert read_refs(root / "refcoco+") == refs
    assert [e.question for e in load_refcoco_plus(tokenizer, LoadOptions(root)).val.examples] == \
        [s for i in IMAGES["val"] for s in sentences(i)]


class _Ref(dict):
    pass


class _Runs:
    """Unpickling this would create the file ``path`` (a stand-in for running any code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("kind", ["ordered_dict", "class", "reduce"])
def test_pickle_with_globals_is_refused(tmp_path, kind):
    d = tmp_path / "refcoco+"
    d.mkdir()
    marker = tmp_path / "ran"
    ref = {"ref_id": 0, "ann_id": 1, "image_id": 1, "split": "train", "sentences": [{"sent": "a"}]}
    obj = {"ordered_dict": [collections.OrderedDict(ref)], "class": [_Ref(ref)], "reduce": [ref, _Runs(marker)]}[kind]
    glob = {"ordered_dict": "collections.OrderedDict", "class": "_Ref", "reduce": "open"}[kind]
    (d / "refs(unc).p").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(ValueError, match=rf"refs\(unc\)\.p: refused to unpickle the global .*{glob}.*only dicts"):
        read_refs(d)
    assert not marker.exists()
    (d / "refs(unc).p").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a valid pickle"):
        read_refs(d)


def test_bad_refs_and_annotations(tokenizer, tmp_path):
    root = write_refcoco_plus(tmp_path)
    refs = read_refs(root / "refcoco+")
    with open(root / "refcoco+" / "refs(unc).p", "wb") as f:
        pickle.dump([{k: v for k, v in refs[0].items() if k != "sentences"}], f, protocol=2)
    with pytest.raises(ValueError, match="ref #0"):
        load_refcoco_plus(tokenizer, LoadOptions(root))
    with open(root / "refcoco+" / "refs(unc).p", "wb") as f:
        pickle.dump([{**refs[0], "ann_id": 7}], f, protocol=2)
    with pytest.raises(ValueError, match="no annotation 7"):
        load_refcoco_plus(tokenizer, LoadOptions(root))


@pytest.mark.parametrize("missing", ["refcoco+/refs(unc).p", "refcoco+/instances.json", "features"])
def test_missing_files(tokenizer, tmp_path, missing):
    err = assert_missing_file_named(write_refcoco_plus(tmp_path / "src"), tmp_path, missing,
                                    lambda d: load_refcoco_plus(tokenizer, LoadOptions(d)))
    if missing.endswith(".p"):
        assert "refs(unc).json" in str(err.value)
    with pytest.raises(FileNotFoundError, match="refcoco"):
        load_refcoco_plus(tokenizer, LoadOptions())
