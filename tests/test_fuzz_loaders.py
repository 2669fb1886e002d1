"""Issue 17: property-based fuzzing of the annotation readers of every task (VQA v2, GQA, NLVR2, SNLI-VE, VCR,
Flickr30k, RefCOCO+ refs and COCO instances) and of LXMERT's label2ans: one of the task's files is replaced by a
structure-aware mutation of a valid file or by damaged bytes; the loader must give a result or a ValueError /
FileNotFoundError naming the file (see tests/fuzzing.py). The example lists go to a stub instead of
``formats.task_data`` (no features are needed: those readers are fuzzed in test_fuzz_features.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import damaged_bytes, json_file_contents, own_errors_only, write_files
from vlsparse.data import load_task

_QS = [{"image_id": i, "question": f"what is {i}?", "question_id": 10 + i} for i in range(3)]
_ANNS = [{"question_id": 10 + i, "image_id": i, "answers": [{"answer": a} for a in ["yes"] * 6 + ["no"] * 4],
          "multiple_choice_answer": "yes", "answer_type": "yes/no"} for i in range(3)]
_GQA = {f"q{i}": {"imageId": str(i), "question": "is it red?", "answer": ["yes", "no"][i % 2],
                  "types": {"structural": "verify"}} for i in range(3)}
_NLVR2 = [{"identifier": f"dev-{i}-0-0", "sentence": "two dogs", "label": ["True", "False"][i % 2]} for i in range(3)]
_SNLI = [{"Flickr30K_ID": str(i), "sentence2": "a dog", "gold_label": "entailment"} for i in range(3)]
_VCR = [{"img_id": f"i{i}", "annot_id": f"a{i}", "objects": ["person", "car"], "question": ["Is", [0], "here", "?"],
         "answer_choices": [["yes"], ["no"], ["maybe", [1]], ["never"]], "answer_label": 1,
         "rationale_choices": [["r0"], ["r1"], ["r2"], ["r3"]], "rationale_label": 2} for i in range(3)]
_FLICKR = {"images": [{"filename": f"{i}.jpg", "split": ["train", "train", "train", "train", "restval", "val", "test"][i],
                       "sentences": [{"raw": f"caption {i}"}]} for i in range(7)]}
_REFS = [{"ref_id": i, "ann_id": 5 + i, "image_id": 1, "split": ["train", "val", "testA"][i],
          "sentences": [{"sent": "the man"}]} for i in range(3)]
_COCO = {"images": [{"id": 1, "width": 64, "height": 48}],
         "annotations": [{"id": 5 + i, "image_id": 1, "bbox": [1, 2, 10, 10 + i]} for i in range(3)]}

#: task -> {file name: (valid document, JSON lines?)}
TASK_FILES = {
    "vqa": {"v2_OpenEnded_mscoco_train2014_questions.json": ({"questions": _QS}, False),
            "v2_mscoco_train2014_annotations.json": ({"annotations": _ANNS}, False),
            "v2_OpenEnded_mscoco_val2014_questions.json": ({"questions": _QS}, False),
            "v2_mscoco_val2014_annotations.json": ({"annotations": _ANNS}, False),
            "trainval_label2ans.json": (["yes", "no"], False)},
    "gqa": {f"{s}_balanced_questions.json": (_GQA, False) for s in ("train", "val", "testdev")},
    "nlvr2": {f"{s}.json": (_NLVR2, True) for s in ("train", "dev", "test1")},
    "snli-ve": {f"snli_ve_{s}.jsonl": (_SNLI, True) for s in ("train", "dev", "test")},
    "vcr": {"train.jsonl": (_VCR, True), "val.jsonl": (_VCR, True)},
    "flickr30k": {"dataset_flickr30k.json": (_FLICKR, False)},
    "refcoco+": {"refcoco+/refs(unc).json": (_REFS, False), "refcoco+/instances.json": (_COCO, False)},
}


def _valid(files):
    return {name: ("".join(json.dumps(x) + "\n" for x in doc) if lines else json.dumps(doc)).encode()
            for name, (doc, lines) in files.items()}


def _load(task, root):
    """The task's examples as the loader reads them (``task_data`` and the feature lookup stubbed out)."""
    def stub(*args, **kw):
        return args

    with mock.patch("vlsparse.data.formats.task_data", stub), \
            mock.patch("vlsparse.data.formats.visual_inputs", lambda *a, **k: ({}, None)), \
            mock.patch("vlsparse.data.flickr30k.VLDataset"), mock.patch("vlsparse.data.flickr30k.RetrievalSet"), \
            mock.patch("vlsparse.data.flickr30k.TaskData"):
        return load_task(task, None, data_dir=root)


@pytest.mark.parametrize("task", list(TASK_FILES))
def test_valid_files_load(task):
    with tempfile.TemporaryDirectory() as d:
        assert _load(task, write_files(Path(d), _valid(TASK_FILES[task]))) is not None


@st.composite
def _task_with_a_damaged_file(draw):
    task = draw(st.sampled_from(sorted(TASK_FILES)))
    name = draw(st.sampled_from(sorted(TASK_FILES[task])))
    doc, lines = TASK_FILES[task][name]
    return task, name, draw(json_file_contents(doc, lines))


@given(_task_with_a_damaged_file())
def test_annotation_readers_raise_only_their_own_errors(case):
    task, name, data = case
    with tempfile.TemporaryDirectory() as d:
        root = write_files(Path(d), {**_valid(TASK_FILES[task]), name: data})
        own_errors_only(lambda: _load(task, root), [Path(name).name, root])


@given(damaged_bytes(b"\x80\x04\x95" + bytes(8) + b"]\x94(}\x94(\x8c\x06ann_id\x94K\x05\x8c\x08image_id\x94K\x01u"
                     b"a.") | st.binary(max_size=200))
def test_the_refs_pickle_reader_raises_only_its_own_errors(data):
    from vlsparse.data.refcoco import read_refs

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "refs(unc).p").write_bytes(data)
        own_errors_only(lambda: read_refs(d), ["refs(unc).p"])
