"""GQA (Hudson & Manning, CVPR 2019) balanced questions, as LXMERT fine-tunes and evaluates on it.

Every question has one answer: the model picks it among a fixed answer vocabulary (answer head,
cross-entropy, accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlsparse.data import formats
from vlsparse.data.dataset import TaskData, VLExample
from vlsparse.data.objective import Objective
from vlsparse.data.options import LoadOptions
from vlsparse.data.vqav2 import LABEL2ANS_FILE, read_label2ans

__all__ = ["load_gqa", "GQA_OBJECTIVE", "GQA_SPLITS"]

#: one answer per question: cross-entropy, accuracy
GQA_OBJECTIVE = Objective(head="answer", loss="ce", metric="accuracy")
#: TaskData split -> GQA question file
GQA_SPLITS = {"train": "train_balanced_questions.json", "val": "val_balanced_questions.json",
              "test": "testdev_balanced_questions.json"}


def _examples(path: Path) -> list[VLExample]:
    questions = formats.read_json(path, 'GQA questions {question_id: {"imageId", "question", "answer", ...}}')
    if not isinstance(questions, dict):
        raise ValueError(f"{path}: expected a JSON object question_id -> {{imageId, question, answer}}")
    out = []
    for qid, q in questions.items():
        try:
            structural = q.get("types", {}).get("structural", "")
            out.append(VLExample(str(q["question"]), str(q["imageId"]), {str(q["answer"]): 1.0},
                                  question_type=str(structural)))
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}: question {qid}: expected an object with imageId, question and answer") from None
    return out


def load_gqa(tokenizer: Any, options: LoadOptions = LoadOptions()) -> TaskData:
    """Load GQA from ``options.data_dir`` as a :class:`~vlsparse.data.dataset.TaskData` named "gqa".

    Files read (the GQA 1.2 release, ``questions1.2/``): ``train_balanced_questions.json``,
    ``val_balanced_questions.json`` and ``testdev_balanced_questions.json``, each a JSON object
    ``question_id -> {"imageId", "question", "answer", "types": {"structural", ...}, ...}`` (other fields
    ignored). Splits: train, val, test = testdev (the split LXMERT reports); ``options.val_fraction`` and
    ``options.seed`` are unused. ``question_type`` = ``types.structural`` ("query", "verify", "logical", "choose",
    "compare"; "" when absent).

    Vocabulary: ``data_dir/trainval_label2ans.json`` (LXMERT's GQA answer list, index = label) when present,
    else the sorted set of train answers. Target: 1 at the answer. An answer outside the vocabulary gives
    an all-zero target: in val/test the example stays and counts as wrong (as LXMERT's GQA evaluation); in
    train it is dropped, since cross-entropy toward the arg-max of a zero target would teach label 0.
    Objective: :data:`GQA_OBJECTIVE` (answer head, cross-entropy, accuracy).

    Images: ``imageId`` (e.g. "2354786", "n161313"), region features in ``data_dir/features``
    (``visual="regions"``, used as they are; LXMERT's ``vg_gqa_obj36.tsv`` / ``gqa_testdev_obj36.tsv``)
    or ``data_dir/images/<imageId>.jpg`` (``"pixels"``, shortest edge ``options.image_size``).

    Raises:
        FileNotFoundError: ``data_dir`` None or missing, a question file, features / images of an example
            (the message names the file or the keys).
        ValueError: a file that is not valid JSON or lacks the fields above (names the file and question), an
            invalid label2ans file, bad ``image_size``.
    """
    root = formats.data_root(options.data_dir, "gqa")
    splits = {name: _examples(root / f) for name, f in GQA_SPLITS.items()}
    if (root / LABEL2ANS_FILE).is_file():
        answers = read_label2ans(root / LABEL2ANS_FILE)
    else:
        answers = sorted({a for e in splits["train"] for a in e.answers})
    known = set(answers)
    train = [e for e in splits["train"] if set(e.answers) <= known]
    return formats.task_data("gqa", root, (train, splits["val"], splits["test"]), answers, GQA_OBJECTIVE,
                             tokenizer, options)
