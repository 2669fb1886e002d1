"""GQA loader (vlsparse.data.gqa) on the tiny fixture of tests/fixtures/gqa.py, against hand-computed values."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.fixtures.common import assert_missing_file_named, cached_loader, layout_roots
from tests.fixtures.gqa import write_gqa
from vlsparse.data.gqa import load_gqa
from vlsparse.data.objective import Objective
from vlsparse.data.dataset import collate

#: sorted answers of the train questions (images 0, 2, 3, 4: blue/red/brown/red, rectangle/triangle/circle, yes/no)
TRAIN_ANSWERS = ["blue", "brown", "circle", "no", "rectangle", "red", "triangle", "yes"]
FILES = ["train_balanced_questions.json", "val_balanced_questions.json", "testdev_balanced_questions.json"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return layout_roots(tmp_path_factory, write_gqa, "gqa")


@pytest.fixture(scope="module")
def load(tokenizer, tmp_path_factory):
    """load_gqa with the session tokenizer and a private feature-index cache."""
    return cached_loader(load_gqa, tokenizer, tmp_path_factory)


def labels(ds, answers) -> list[str | None]:
    """The target label of every example (None for an all-zero target)."""
    return [answers[int(t.argmax())] if t.any() else None for t in ds.targets]


@pytest.mark.parametrize("layout", ["npz", "tsv"])
def test_load_regions(roots, load, layout):
    task = load(roots[layout])
    assert task.name == "gqa" and task.answers == TRAIN_ANSWERS
    assert task.objective == Objective(head="answer", loss="ce", metric="accuracy") and task.metric_name == "accuracy"
    assert (len(task.train), len(task.val), len(task.test)) == (12, 6, 6)
    assert task.region_feature_dim == 294
    assert labels(task.train, task.answers)[:3] == ["rectangle", "blue", "yes"]
    assert [e.image_id for e in task.train.examples[:3]] == ["n000000"] * 3
    assert [e.question_type for e in task.train.examples[:3]] == ["query", "query", "verify"]
    # val image 5 is a yellow triangle: "yellow" is no train answer -> zero target, the example stays
    assert labels(task.val, task.answers)[:3] == ["triangle", None, "no"]
    # testdev: image 9 is yellow, and the last question is answered "1": zero targets, counted as wrong
    assert labels(task.test, task.answers) == ["rectangle", None, "yes", "circle", "brown", None]
    assert task.test.examples[-1].question == "how many shapes are in the image?"
    perfect = task.test.targets.clone()
    assert task.objective.metrics(perfect, task.test.targets)["accuracy"] == pytest.approx(4 / 6)
    b = collate([task.train[i] for i in range(4)])
    assert b["img_feat"].shape == (4, 6, 294) and b["img_pos"].shape == (4, 6, 7) and b["img_mask"].shape == (4, 6)
    assert b["targets"].shape == (4, 8) and b["targets"].dtype == torch.float32
    assert b["targets"].sum(1).tolist() == [1.0] * 4


def test_load_pixels(roots, load):
    task = load(roots["npz"], visual="pixels", image_size=96)
    assert task.visual == "pixels" and task.region_feature_dim is None and task.image_processor is not None
    b = collate([task.val[i] for i in range(2)])
    assert b["pixel_values"].shape == (2, 3, 96, 96) and b["pixel_mask"].shape == (2, 96, 96)


def test_label2ans_vocabulary(roots, load, tmp_path):
    root = write_gqa(tmp_path, "npz", label2ans=["yes", "no", "red", "1"])
    task = load(root)
    assert task.answers == ["yes", "no", "red", "1"]
    # train questions answered outside the vocabulary are dropped: images 0 yes; 2 red, no; 3 yes; 4 red, yes
    assert labels(task.train, task.answers) == ["yes", "red", "no", "yes", "red", "yes"]
    assert len(task.val) == 6 and labels(task.test, task.answers)[-1] == "1"


@pytest.mark.parametrize("name", FILES)
def test_missing_file(roots, load, tmp_path, name):
    assert_missing_file_named(roots["npz"], tmp_path, name, load)


def test_bad_question(roots, load, tmp_path):
    root = shutil.copytree(roots["npz"], tmp_path / "d")
    (root / "val_balanced_questions.json").write_text('{"7": {"imageId": "n000005", "question": "q?"}}')
    with pytest.raises(ValueError, match="val_balanced_questions.json: question 7"):
        load(root)
