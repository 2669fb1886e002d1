"""VQA v2 loader (vlsparse.data.vqav2) on the tiny fixture of tests/fixtures/vqav2.py; targets and the
answer normalisation are checked against hand-computed values."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.fixtures.common import assert_missing_file_named, cached_loader, layout_roots
from tests.fixtures.vqav2 import write_vqa
from vlsparse.data.objective import Objective
from vlsparse.data.dataset import collate
from vlsparse.data.vqav2 import answer_vocabulary, load_vqa, normalize_answer

EASY_ANSWERS = ["circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle",
                "brown", "blue", "no", "1"]
FILES = ["v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json",
         "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return layout_roots(tmp_path_factory, write_vqa, "vqa")


@pytest.fixture(scope="module")
def load(tokenizer, tmp_path_factory):
    """load_vqa with the session tokenizer and a private feature-index cache."""
    return cached_loader(load_vqa, tokenizer, tmp_path_factory)


def targets_of(task, key: str, question: str) -> dict[str, float]:
    """answer -> target of the one example of ``task`` on image ``key`` asking ``question``."""
    found = [(ds, i) for ds in (task.train, task.val, task.test) for i, e in enumerate(ds.examples)
             if e.image_id == key and e.question == question]
    assert len(found) == 1
    ds, i = found[0]
    t = ds[i]["targets"]
    return {task.answers[j]: float(t[j]) for j in torch.nonzero(t).flatten()}


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"), ("a red car", "red car"), ("yes!", "yes"), ("The Man's hat", "man's hat"),
    ("1,000", "1000"), ("2.5 feet", "2.5 feet"), ("dont know", "don't know"), ("left-side", "left side"),
    ("hi - there", "hi there"), ("none", "0"), ("  an Apple\t", "apple"), ("one-way", "1 way"),
])
def test_normalize_answer_by_hand(raw, expected):
    assert normalize_answer(raw) == expected


def test_answer_vocabulary_rule():
    mc = ["b"] * 3 + ["a"] * 3 + ["c"] * 2 + ["d"]
    assert answer_vocabulary(mc, num_answers=10, min_answer_count=2) == ["a", "b", "c"]
    assert answer_vocabulary(mc, num_answers=2, min_answer_count=1) == ["a", "b"]
    with pytest.raises(ValueError, match="num_answers"):
        answer_vocabulary(mc, num_answers=0)


@pytest.mark.parametrize("layout", ["npz", "tsv"])
def test_load_regions(roots, load, layout):
    task = load(roots[layout])
    assert task.name == "vqa" and task.answers == EASY_ANSWERS
    assert task.objective == Objective(head="answer", loss="bce", metric="vqa_score")
    assert task.metric_name == "vqa_score" and task.region_feature_dim == 294 and task.visual == "regions"
    # train2014: 6 images x 3 questions + 1; val_fraction 0.1 of 6 images -> 1 image (3 or 4 questions)
    assert len(task.train) + len(task.val) == 19 and len(task.test) == 7
    val_images = {e.image_id for e in task.val.examples}
    assert len(val_images) == 1 and not val_images & {e.image_id for e in task.train.examples}
    assert {e.image_id for e in task.test.examples} == {"COCO_val2014_000000000009", "COCO_val2014_000000000010"}
    # hand-computed official soft scores (1, 2, 3 annotators: 0.3, 0.6, 0.9): 8 "blue" + 2 "brown"; 9 "yes" + "NO"; "Rectangle." / "rectangle!"; "one" = "1"
    key = "COCO_train2014_000000000000"
    assert targets_of(task, key, "what color is the shape?") == pytest.approx({"blue": 1.0, "brown": 0.6})
    assert targets_of(task, key, "does the image contain a rectangle?") == pytest.approx({"yes": 1.0, "no": 0.3})
    assert targets_of(task, key, "what is the blue shape?") == {"rectangle": 1.0}
    assert targets_of(task, key, "how many shapes are in the image?") == {"1": 1.0}
    # val2014 image 9: yellow by 8, "black" (the colour after yellow) by 2
    assert targets_of(task, "COCO_val2014_000000000009", "what is the color of the rectangle?") == \
        pytest.approx({"yellow": 1.0, "black": 0.6})
    assert [e.question_type for e in task.test.examples][:4] == ["other", "other", "yes/no", "number"]
    b = collate([task.train[i] for i in range(4)])
    assert b["img_feat"].shape == (4, 6, 294) and b["img_feat"].dtype == torch.float32
    assert b["img_pos"].shape == (4, 6, 7) and b["img_mask"].shape == (4, 6)
    assert b["targets"].shape == (4, 14) and b["input_ids"].shape[0] == 4 and b["input_ids"].dtype == torch.int64


def test_load_pixels(roots, load):
    task = load(roots["npz"], visual="pixels", image_size=96)
    assert task.visual == "pixels" and task.region_feature_dim is None and task.image_processor is not None
    b = collate([task.test[i] for i in range(3)])
    assert b["pixel_values"].shape == (3, 3, 96, 96) and b["pixel_mask"].shape == (3, 96, 96)
    assert b["targets"].shape == (3, 14)


def test_vocabulary_from_train_answers(roots, load, tmp_path):
    root = shutil.copytree(roots["npz"], tmp_path / "d")
    (root / "trainval_label2ans.json").unlink()
    # multiple_choice_answer counts over train2014: yes 4, red 3, circle/no/rectangle/triangle 2, others 1
    task = load(root, min_answer_count=2)
    assert task.answers == ["yes", "red", "circle", "no", "rectangle", "triangle"]
    assert load(root, num_answers=4, min_answer_count=1).answers == ["yes", "red", "circle", "no"]
    with pytest.raises(ValueError, match="min_answer_count"):
        load(root)  # nothing is given 9 times


@pytest.mark.parametrize("name", FILES)
def test_missing_file(roots, load, tmp_path, name):
    assert_missing_file_named(roots["npz"], tmp_path, name, load)


def test_questions_and_annotations_must_agree(roots, load, tmp_path):
    root = shutil.copytree(roots["npz"], tmp_path / "d")
    path = root / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    data["annotations"].pop(2)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="v2_mscoco_val2014_annotations.json: no annotation for question 92"):
        load(root)


def test_bad_arguments(roots, load):
    with pytest.raises(ValueError, match="visual"):
        load(roots["npz"], visual="voxels")
    with pytest.raises(FileNotFoundError, match="data-dir"):
        load(None)
