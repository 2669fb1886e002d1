"""VCR loader: object-tag rendering, the 8 candidate texts, targets, splits, shapes, errors."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.common import LAYOUTS, assert_missing_file_named, layout_root
from tests.fixtures.vcr import IMAGES, write_vcr
from vlsparse.data import load_task
from vlsparse.data.options import LoadOptions
from vlsparse.data.vcr import VCR_ANSWERS, load_vcr, render_tokens, vcr_example
from vlsparse.data.dataset import collate


@pytest.fixture(scope="module", params=LAYOUTS)
def data(request, tmp_path_factory):
    return layout_root(tmp_path_factory, write_vcr, "vcr", request.param)


def test_render_tokens_hand_checked():
    objects = ["person", "person", "car"]
    assert render_tokens(["Is", [0, 2], "next", "to", [1], "?"], objects) == "Is person and car next to person?"
    assert render_tokens([[1], "'s", "hat", "is", "n't", "red", ",", "right", "?"], objects) == \
        "person's hat isn't red, right?"
    assert render_tokens([[0, 1, 2], "are", "here", "."], objects) == "person and person and car are here."
    with pytest.raises(ValueError, match="object reference"):
        render_tokens(["Is", [3], "here"], objects)
    with pytest.raises(ValueError, match="token"):
        render_tokens(["Is", 3], objects)


def test_example_texts_and_targets(data, tokenizer):
    rec = json.loads((data / "train.jsonl").read_text().splitlines()[1])
    colours_a = [a[2] for a in rec["answer_choices"]]
    colours_r = [r[2] for r in rec["rationale_choices"]]
    right = colours_a[rec["answer_label"]]
    q = "Which color does shape have?"
    ex = vcr_example(rec)
    assert ex.question == tuple(f"{q} [SEP] shape is {c}." for c in colours_a) + \
        tuple(f"{q} shape is {right}. [SEP] shape looks {c}." for c in colours_r)
    assert ex.image_id == rec["img_id"]
    assert ex.answers == {f"a{rec['answer_label']}": 1.0, f"r{rec['rationale_label']}": 1.0}
    # the right answer and rationale name the same colour, the wrong ones do not
    assert colours_r[rec["rationale_label"]] == right
    assert sorted(c == right for c in colours_a + colours_r) == [False] * 6 + [True] * 2

    task = load_vcr(tokenizer, LoadOptions(data, val_fraction=0.25))
    item = next(task.train[k] for k in range(len(task.train)) if task.train.examples[k].question == ex.question)
    want = torch.zeros(8)
    want[rec["answer_label"]] = want[4 + rec["rationale_label"]] = 1
    assert torch.equal(item["targets"], want)
    assert item["input_ids"].shape[0] == 8
    sep = tokenizer.sep_token_id
    for row, mask in zip(item["input_ids"], item["attention_mask"]):
        ids = row[mask.bool()].tolist()
        assert ids.count(sep) == 2 and ids[0] == tokenizer.cls_token_id and ids[-1] == sep
    # QA->R text 0: "[CLS] which color does shape have ? shape is <right> . [SEP] shape looks <c0> . [SEP]"
    toks = tokenizer.convert_ids_to_tokens(item["input_ids"][4][item["attention_mask"][4].bool()])
    assert toks == ["[CLS]", *tokenizer.tokenize(f"which color does shape have ? shape is {right} ."), "[SEP]",
                    *tokenizer.tokenize(f"shape looks {colours_r[0]} ."), "[SEP]"]


def test_splits_vocabulary_and_batches(data, tokenizer):
    task = load_vcr(tokenizer, LoadOptions(data, val_fraction=0.25, seed=1))
    n_train_q = 2 * len(IMAGES["train"])
    assert (len(task.train), len(task.val), len(task.test)) == (n_train_q - 4, 4, 2 * len(IMAGES["val"]))
    assert not {e.image_id for e in task.train.examples} & {e.image_id for e in task.val.examples}
    assert {e.image_id for e in task.test.examples} == {f"val-{i}" for i in IMAGES["val"]}
    assert task.answers == VCR_ANSWERS == ["a0", "a1", "a2", "a3", "r0", "r1", "r2", "r3"]
    assert (task.name, task.metric_name, task.region_feature_dim) == ("vcr", "q_ar_accuracy", 294)
    assert (task.objective.head, task.objective.loss, task.objective.groups) == ("rank", "ce", 2)
    b = collate([task.test[k] for k in range(3)])
    assert b["input_ids"].shape[:2] == (3, 8) and b["input_ids"].shape[2] <= 80
    assert b["img_feat"].shape == (3, 6, 294) and b["img_pos"].shape == (3, 6, 7)
    assert b["targets"].shape == (3, 8) and torch.equal(b["targets"].sum(1), torch.full((3,), 2.0))
    # the objective reads the two groups: right answer + wrong rationale is not Q->AR right
    logits = b["targets"].clone()
    logits[0, 4:] = 1 - logits[0, 4:]
    m = task.objective.metrics(logits, b["targets"])
    assert m["q_a_accuracy"] == 1.0 and m["qa_r_accuracy"] == pytest.approx(2 / 3) == m["q_ar_accuracy"]


def test_pixels(tokenizer, tmp_path):
    task = load_vcr(tokenizer, LoadOptions(write_vcr(tmp_path), visual="pixels", image_size=96))
    item = task.test[0]
    assert item["pixel_values"].shape == (3, 96, 96) and item["input_ids"].shape[0] == 8
    assert task.region_feature_dim is None and task.image_processor["size"] == {"shortest_edge": 96}


def test_text_length_default_and_override(data, tokenizer):
    # VCR's own default (question + answer + rationale), unless the options say otherwise
    assert load_vcr(tokenizer, LoadOptions(data)).train.max_text_len == 80
    assert load_task("vcr", tokenizer, data_dir=data).train.max_text_len == 80
    assert load_task("vcr", tokenizer, data_dir=data, max_text_len=50).test.max_text_len == 50


def test_image_key_falls_back_to_img_fn_stem(data):
    rec = json.loads((data / "val.jsonl").read_text().splitlines()[0])
    del rec["img_id"]
    rec["img_fn"] = "lsmdc_1054_Harry_Potter/1054_Harry_Potter_00.01.27.403-00.01.31.238@3.jpg"
    assert vcr_example(rec).image_id == "1054_Harry_Potter_00.01.27.403-00.01.31.238@3"


def test_bad_annotation_names_line(tokenizer, tmp_path):
    root = write_vcr(tmp_path)
    lines = (root / "val.jsonl").read_text().splitlines()
    rec = json.loads(lines[2])
    rec["answer_label"] = 4
    (root / "val.jsonl").write_text("\n".join(lines[:2] + [json.dumps(rec)]) + "\n")
    with pytest.raises(ValueError, match=r"val\.jsonl:3: annotation 'val-2': answer_label"):
        load_vcr(tokenizer, LoadOptions(root))


@pytest.mark.parametrize("missing", ["train.jsonl", "val.jsonl", "features"])
def test_missing_files(tokenizer, tmp_path, missing):
    assert_missing_file_named(write_vcr(tmp_path / "src"), tmp_path, missing,
                              lambda d: load_vcr(tokenizer, LoadOptions(d)))
    with pytest.raises(FileNotFoundError, match="vcr"):
        load_vcr(tokenizer, LoadOptions())
