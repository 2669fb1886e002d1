"""SNLI-VE loader (vlsparse.data.snli_ve) on the tiny fixture of tests/fixtures/snli_ve.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.fixtures.common import assert_missing_file_named, cached_loader, layout_roots
from tests.fixtures.snli_ve import write_snli_ve
from vlsparse.data.objective import Objective
from vlsparse.data.snli_ve import load_snli_ve
from vlsparse.data.dataset import collate

FILES = ["snli_ve_train.jsonl", "snli_ve_dev.jsonl", "snli_ve_test.jsonl"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return layout_roots(tmp_path_factory, write_snli_ve, "ve")


@pytest.fixture(scope="module")
def load(tokenizer, tmp_path_factory):
    """load_snli_ve with the session tokenizer and a private feature-index cache."""
    return cached_loader(load_snli_ve, tokenizer, tmp_path_factory)


@pytest.mark.parametrize("layout", ["npz", "tsv"])
def test_load_regions(roots, load, layout):
    task = load(roots[layout])
    assert task.name == "snli-ve" and task.answers == ["contradiction", "entailment", "neutral"]
    assert task.objective == Objective(head="answer", loss="ce", metric="accuracy") and task.metric_name == "accuracy"
    assert (len(task.train), len(task.val), len(task.test)) == (12, 6, 6)
    assert task.region_feature_dim == 294
    # image 0 is a blue rectangle; image 2 a red triangle (its hypotheses rotated by one)
    first = task.train.examples[:6]
    assert [(e.image_id, e.question) for e in first] == [
        ("1000000", "there is a blue rectangle."), ("1000000", "there is a brown rectangle."),
        ("1000000", "the rectangle was drawn by a child."), ("1000002", "there is a red circle."),
        ("1000002", "the triangle was drawn by a child."), ("1000002", "there is a red triangle.")]
    assert task.train.targets[:6].argmax(1).tolist() == [1, 0, 2, 0, 2, 1]
    assert task.train.targets.sum(1).tolist() == [1.0] * 12
    assert [e.question_type for e in first[:3]] == ["entailment", "contradiction", "neutral"]
    assert {e.image_id for e in task.test.examples} == {"1000009", "1000010"}
    b = collate([task.train[i] for i in range(4)])
    assert b["img_feat"].shape == (4, 6, 294) and b["img_pos"].shape == (4, 6, 7) and b["img_mask"].shape == (4, 6)
    assert b["targets"].shape == (4, 3) and b["input_ids"].dtype == torch.int64


def test_load_pixels(roots, load):
    task = load(roots["npz"], visual="pixels", image_size=96)
    assert task.visual == "pixels" and task.region_feature_dim is None and task.image_processor is not None
    b = collate([task.test[i] for i in range(3)])
    assert b["pixel_values"].shape == (3, 3, 96, 96) and b["pixel_mask"].shape == (3, 96, 96)


@pytest.mark.parametrize("name", FILES)
def test_missing_file(roots, load, tmp_path, name):
    assert_missing_file_named(roots["npz"], tmp_path, name, load)


def test_bad_label(roots, load, tmp_path):
    root = shutil.copytree(roots["npz"], tmp_path / "d")
    rec = {"Flickr30K_ID": "1000005", "sentence2": "there is a shape.", "gold_label": "-"}
    (root / "snli_ve_dev.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="snli_ve_dev.jsonl: record 1: gold_label"):
        load(root)
