"""Flickr30k loader (vlsparse.data.flickr30k) on the tiny fixture, and RetrievalSet.evaluate on stub models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.fixtures.common import LAYOUTS, cached_loader, layout_root
from tests.fixtures.flickr30k import write_flickr30k
from vlsparse.data.flickr30k import load_flickr30k, sample_negatives
from vlsparse.data.options import LoadOptions
from vlsparse.data.visual.regions import extract_regions, load_image
from vlsparse.data.dataset import RetrievalSet, collate
from vlsparse.training.distributed import shard_range


@pytest.fixture(scope="module", params=LAYOUTS)
def root(request, tmp_path_factory):
    return layout_root(tmp_path_factory, write_flickr30k, "flickr", request.param)


@pytest.fixture(scope="module")
def load(tokenizer, tmp_path_factory):
    """load_flickr30k with the session tokenizer and a private feature-index cache."""
    return cached_loader(load_flickr30k, tokenizer, tmp_path_factory)


@pytest.fixture(scope="module")
def task(root, load):
    return load(root)


def annotations(root) -> dict[str, list[tuple[str, str]]]:
    """Reference: split -> (caption, key) read straight from the JSON."""
    out = {"train": [], "val": [], "test": []}
    for im in json.loads((root / "dataset_flickr30k.json").read_text())["images"]:
        out[im["split"]] += [(s["raw"], im["filename"][:-4]) for s in im["sentences"]]
    return out


def test_splits_and_objective(task, root):
    ref = annotations(root)
    assert (len(task.train), len(task.val), len(task.test)) == (20, 15, 15)
    assert task.name == "flickr30k" and task.answers == ["0", "1", "2", "3"]
    assert task.objective.head == "rank" and task.objective.loss == "ce" and task.metric_name == "ir_r1"
    assert task.region_feature_dim == 294 and task.image_processor is None
    assert isinstance(task.val, RetrievalSet) and isinstance(task.test, RetrievalSet)
    for rs, split in ((task.val, "val"), (task.test, "test")):
        assert rs.image_ids == sorted({k for _, k in ref[split]})
        assert [c for c, _ in ref[split]] == [e.question for e in rs.texts.examples]
        assert [rs.image_ids[i] for i in rs.caption_image] == [k for _, k in ref[split]]


def test_train_examples(task, root):
    ref = annotations(root)["train"]
    train_keys = {k for _, k in ref}
    assert len(train_keys) == 4
    for e, (caption, key), t in zip(task.train.examples, ref, task.train.targets):
        assert e.question == caption and e.image_id[0] == key
        # 3 negatives: distinct train images other than the caption's own
        assert len(set(e.image_id)) == 4 and set(e.image_id) <= train_keys
        assert t.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_negatives_reproducible():
    caps = [(f"c{i}", f"k{i // 5}") for i in range(60)]  # 12 images
    a, b, c = sample_negatives(caps, 2, seed=0), sample_negatives(caps, 2, seed=0), sample_negatives(caps, 2, seed=1)
    assert [e.image_id for e in a] == [e.image_id for e in b]
    assert [e.image_id for e in a] != [e.image_id for e in c]
    # each negative drawn uniformly from the 11 others: every other image shows up for k0's captions
    many = sample_negatives([("c", "k0")] * 500 + caps[5:], 2, seed=0)[:500]
    counts = {k: sum(k in e.image_id[1:] for e in many) for k in {k for _, k in caps}}
    assert counts["k0"] == 0 and min(v for k, v in counts.items() if k != "k0") > 50  # 500 * 2 / 11 = 91 expected
    with pytest.raises(ValueError, match="--negatives"):
        sample_negatives(caps, 12)
    with pytest.raises(ValueError, match="--negatives"):
        sample_negatives(caps, 0)


def test_items_and_batch(task, root):
    item = task.train[0]
    assert item["img_feat"].shape == (4, 6, 294) and item["img_pos"].shape == (4, 6, 7)
    for k, key in enumerate(task.train.examples[0].image_id):
        want, boxes = extract_regions(load_image(root / "images" / f"{key}.png"))
        np.testing.assert_allclose(item["img_feat"][k].numpy(), want, atol=1e-6)
    b = collate([task.train[i] for i in range(5)])
    assert b["img_feat"].shape == (5, 4, 6, 294) and b["img_mask"].shape == (5, 4, 6)
    assert b["targets"].shape == (5, 4) and b["input_ids"].shape[0] == 5


def test_eval_images_and_errors(root, load):
    task = load(root, eval_images=2, negatives=1, seed=3)
    ref = annotations(root)
    for rs, split in ((task.val, "val"), (task.test, "test")):
        keep = sorted({k for _, k in ref[split]})[:2]
        assert rs.image_ids == keep and len(rs) == 10
    assert task.answers == ["0", "1"] and task.train.targets.shape == (20, 2)
    with pytest.raises(ValueError, match="--negatives"):
        load(root, negatives=4)  # only 4 train images
    with pytest.raises(ValueError, match="--eval-images"):
        load(root, eval_images=0)


def test_missing_files(tmp_path, tokenizer):
    root = write_flickr30k(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="data-dir"):
        load_flickr30k(tokenizer, LoadOptions())
    (root / "images" / sorted((root / "images").iterdir())[0].name).unlink()
    with pytest.raises(FileNotFoundError, match="images"):
        load_flickr30k(tokenizer, LoadOptions(root, visual="pixels", image_size=96))
    (root / "dataset_flickr30k.json").write_text('{"images": [{"filename": "1.jpg"}]}')
    with pytest.raises(ValueError, match="dataset_flickr30k.json"):
        load_flickr30k(tokenizer, LoadOptions(root, cache_dir=tmp_path / "c"))
    (root / "dataset_flickr30k.json").unlink()
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
        load_flickr30k(tokenizer, LoadOptions(root, cache_dir=tmp_path / "c"))


def test_pixels(tmp_path, tokenizer):
    task = load_flickr30k(tokenizer, LoadOptions(write_flickr30k(tmp_path / "d"), visual="pixels", image_size=96))
    assert task.visual == "pixels" and task.region_feature_dim is None and task.image_processor is not None
    b = collate([task.train[i] for i in range(2)])
    assert b["pixel_values"].shape == (2, 4, 3, 96, 96) and b["pixel_mask"].shape == (2, 4, 96, 96)
    image = task.val.images[0]
    assert image["pixel_values"].shape == (3, 96, 96)


class WordMatch(torch.nn.Module):
    """Stub rank head: score = sign x (how many of the image's colour and shape words the caption has).

    The image is recognised by its region features (a table built from the image files), the caption by
    decoding its token ids; each fixture image has its own (colour, shape), so a caption scores 2 with
    its own image and at most 1 with any other.
    """

    def __init__(self, root, keys, words, tokenizer, sign=1.0):
        super().__init__()
        self.table = {extract_regions(load_image(root / "images" / f"{k}.png"))[0].round(4).tobytes(): words[k]
                      for k in keys}
        self.tokenizer, self.sign = tokenizer, sign

    def forward(self, input_ids, attention_mask, img_feat, img_pos, img_mask):
        out = []
        for ids, feat in zip(input_ids, img_feat):
            text = self.tokenizer.decode(ids, skip_special_tokens=True).split()
            out.append(self.sign * sum(w in text for w in self.table[feat.numpy().round(4).tobytes()]))
        return torch.tensor(out)[:, None]


def test_retrieval_evaluate_on_stub(task, root, tokenizer):
    rs = task.test
    ref = annotations(root)["test"]
    words = {k: c.split()[1:3] for c, k in ref[::5]}  # first template: "a <color> <shape> on ..."
    model = WordMatch(root, rs.image_ids, words, tokenizer)
    # score matrix against the same rule applied to the raw captions
    want = np.array([[sum(w in c.split() for w in words[k]) for k in rs.image_ids] for c, _ in ref], dtype=float)
    np.testing.assert_array_equal(rs.score_matrix(model, batch_size=2), want)
    # under torchrun each rank scores its share of the captions (vlsparse.training.loop.evaluate gathers them)
    shares = [rs.score_matrix(model, batch_size=2, rows=shard_range(len(rs), r, 2)) for r in (0, 1)]
    assert [len(x) for x in shares] == [8, 7]
    np.testing.assert_array_equal(np.concatenate(shares), want)
    assert (want.max(1) == 2).all() and ((want == 2).sum(1) == 1).all()
    got = rs.evaluate(model, batch_size=2)
    assert got == {"ir_r1": 1.0, "tr_r1": 1.0, "ir_r5": 1.0, "tr_r5": 1.0, "ir_r10": 1.0, "tr_r10": 1.0, "n": 15}
    # inverted scores: the own image comes last of 3 (IR R@5 still 1), own captions last of 15 (TR R@10 = 0)
    got = rs.evaluate(WordMatch(root, rs.image_ids, words, tokenizer, sign=-1.0), batch_size=2)
    assert got == {"ir_r1": 0.0, "tr_r1": 0.0, "ir_r5": 1.0, "tr_r5": 0.0, "ir_r10": 1.0, "tr_r10": 0.0, "n": 15}
