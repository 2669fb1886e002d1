"""NLVR2 loader (vlsparse.data.nlvr2) on the tiny fixture in the real file layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.common import (LAYOUTS, assert_missing_file_named, cached_loader, easy_facts, easy_images,
                                   layout_root)
from tests.fixtures.nlvr2 import image_pairs, write_nlvr2
from vlsparse.data.nlvr2 import load_nlvr2, nlvr2_image_keys
from vlsparse.data.options import LoadOptions
from vlsparse.data.visual.regions import extract_regions, load_image
from vlsparse.data.dataset import collate


@pytest.fixture(scope="module", params=LAYOUTS)
def root(request, tmp_path_factory):
    return layout_root(tmp_path_factory, write_nlvr2, "nlvr2", request.param)


@pytest.fixture(scope="module")
def load(tokenizer, tmp_path_factory):
    """load_nlvr2 with the session tokenizer and a private feature-index cache."""
    return cached_loader(load_nlvr2, tokenizer, tmp_path_factory)


@pytest.fixture(scope="module")
def task(root, load):
    return load(root)


def truth(sentence: str, left: dict, right: dict) -> bool:
    """Reference: the statement evaluated on the two images' facts."""
    words = sentence.rstrip(".").split()
    if sentence.startswith("both images contain a"):
        return left["shape"] == right["shape"] == words[-1]
    color = words[3]  # "there is a <color> shape in one of the images"
    return color in (left["color"], right["color"])


def test_image_keys():
    assert nlvr2_image_keys("dev-850-0-0") == ("dev-850-0-img0", "dev-850-0-img1")
    assert nlvr2_image_keys("train-10171-0-12") == ("train-10171-0-img0", "train-10171-0-img1")
    with pytest.raises(ValueError, match="identifier"):
        nlvr2_image_keys("nodash")


def test_splits_labels_objective(task):
    assert (len(task.train), len(task.val), len(task.test)) == (12, 6, 6)
    assert task.name == "nlvr2" and task.answers == ["False", "True"]
    assert task.objective.head == "pair" and task.objective.images == 2 and task.objective.loss == "ce"
    assert task.metric_name == "accuracy" and task.region_feature_dim == 294 and task.visual == "regions"
    assert task.feature_mean is None and task.image_processor is None
    # the dev split is val, test1 is test: identifiers say which
    assert all(e.image_id[0].startswith("dev-") for e in task.val.examples)
    assert all(e.image_id[0].startswith("test1-") for e in task.test.examples)
    labels = task.train.targets.argmax(1).tolist()
    assert 0 < sum(labels) < len(labels)  # both labels occur


def test_targets_match_the_images(task, root):
    """Every target is the truth of its statement about the two easy-VQA images it names."""
    pairs = iter(image_pairs(8))
    facts = {}
    for split, n in (("train", 4), ("dev", 2), ("test1", 2)):
        for p in range(n):
            left, right = next(pairs)
            facts[f"{split}-{p + 10}-{p % 2}"] = (easy_facts(left), easy_facts(right))
    for ds in (task.train, task.val, task.test):
        for e, t in zip(ds.examples, ds.targets):
            stem = e.image_id[0].rsplit("-", 1)[0]
            assert e.image_id == (f"{stem}-img0", f"{stem}-img1")
            want = truth(e.question, *facts[stem])
            assert t.tolist() == ([0.0, 1.0] if want else [1.0, 0.0]), e
    # hand check of the first dev line
    first = json.loads((root / "dev.json").read_text().splitlines()[0])
    assert first["identifier"] == "dev-10-0-0" and task.val.examples[0].question == first["sentence"]
    assert task.val.targets[0].tolist() == ([0.0, 1.0] if first["label"] == "True" else [1.0, 0.0])


def test_items_and_batch(task, root, tokenizer):
    item = task.val[0]
    assert item["img_feat"].shape == (2, 6, 294) and item["img_pos"].shape == (2, 6, 7)
    assert item["img_mask"].tolist() == [[1] * 6] * 2
    # the two images' features, in order, against the regions of the image files
    for k in range(2):
        want, boxes = extract_regions(load_image(root / "images" / f"{task.val.examples[0].image_id[k]}.png"))
        np.testing.assert_allclose(item["img_feat"][k].numpy(), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(item["img_pos"][k].numpy(), boxes, atol=1e-6)
    assert not torch.equal(item["img_feat"][0], item["img_feat"][1])
    ids = tokenizer(task.val.examples[0].question)["input_ids"]
    assert item["input_ids"].tolist() == ids
    b = collate([task.train[i] for i in range(4)])
    assert list(b) == ["input_ids", "attention_mask", "img_feat", "img_pos", "img_mask", "targets"]
    assert b["img_feat"].shape == (4, 2, 6, 294) and b["img_mask"].shape == (4, 2, 6)
    assert b["targets"].shape == (4, 2) and b["input_ids"].shape[0] == 4


def test_pixels(tmp_path, tokenizer):
    root = write_nlvr2(tmp_path / "d")
    task = load_nlvr2(tokenizer, LoadOptions(root, visual="pixels", image_size=96))
    assert task.visual == "pixels" and task.region_feature_dim is None and task.image_processor is not None
    b = collate([task.test[i] for i in range(3)])
    assert b["pixel_values"].shape == (3, 2, 3, 96, 96) and b["pixel_mask"].shape == (3, 2, 96, 96)
    assert b["targets"].shape == (3, 2)
    # each image's pixels: the easy-VQA image resized (PIL bicubic) to 96 x 96, x / 255 * 2 - 1
    for k, image in enumerate(image_pairs(8)[6]):
        with Image.open(easy_images()[image]) as im:
            want = np.asarray(im.convert("RGB").resize((96, 96), Image.BICUBIC), dtype=np.float64) / 255 * 2 - 1
        np.testing.assert_allclose(b["pixel_values"][0, k].numpy(), want.transpose(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize("name", ["train.json", "dev.json", "test1.json"])
def test_missing_split_file(tmp_path, load, name):
    assert_missing_file_named(write_nlvr2(tmp_path / "src"), tmp_path, name, load)


def test_missing_visuals_and_bad_input(tmp_path, tokenizer):
    root = write_nlvr2(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="data-dir"):
        load_nlvr2(tokenizer, LoadOptions())
    (root / "images" / "dev-11-1-img1.png").unlink()
    with pytest.raises(FileNotFoundError, match="dev-11-1-img1"):
        load_nlvr2(tokenizer, LoadOptions(root, visual="pixels", image_size=96))
    shutil.rmtree(root / "features")
    with pytest.raises(FileNotFoundError, match="features"):
        load_nlvr2(tokenizer, LoadOptions(root, cache_dir=tmp_path / "c"))
    with pytest.raises(ValueError, match="visual"):
        load_nlvr2(tokenizer, LoadOptions(root, visual="boxes"))
    lines = (root / "dev.json").read_text().splitlines()
    (root / "dev.json").write_text("\n".join([lines[0], lines[1].replace('"False"', '"maybe"')]) + "\n")
    with pytest.raises(ValueError, match=r"dev\.json:2: label"):
        load_nlvr2(tokenizer, LoadOptions(root, visual="pixels", image_size=96))
