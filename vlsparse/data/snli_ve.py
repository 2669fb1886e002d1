"""SNLI-VE (Xie et al., 2019, "Visual Entailment: A Novel Task for Fine-Grained Image Understanding").

The premise is a Flickr30k image, the hypothesis a sentence; the model labels the pair
contradiction, entailment or neutral (answer head over 3 labels, cross-entropy, accuracy), with the
hypothesis alone as its text, as UNITER's ``train_ve.py`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlsparse.data import formats
from vlsparse.data.dataset import TaskData, VLExample
from vlsparse.data.objective import Objective
from vlsparse.data.options import LoadOptions

__all__ = ["load_snli_ve", "SNLI_VE_ANSWERS", "SNLI_VE_OBJECTIVE", "SNLI_VE_SPLITS"]

#: the three labels, index = logit position (UNITER's order)
SNLI_VE_ANSWERS = ["contradiction", "entailment", "neutral"]
#: one label per pair: cross-entropy, accuracy
SNLI_VE_OBJECTIVE = Objective(head="answer", loss="ce", metric="accuracy")
#: TaskData split -> SNLI-VE file
SNLI_VE_SPLITS = {"train": "snli_ve_train.jsonl", "val": "snli_ve_dev.jsonl", "test": "snli_ve_test.jsonl"}


def _examples(path: Path) -> list[VLExample]:
    out = []
    for n, rec in enumerate(formats.read_jsonl(path, 'SNLI-VE pairs, one JSON object a line '
                                                     '{"Flickr30K_ID", "sentence2", "gold_label", ...}'), 1):
        try:
            image, hypothesis, label = str(rec["Flickr30K_ID"]), str(rec["sentence2"]), str(rec["gold_label"])
        except (KeyError, TypeError):
            raise ValueError(f"{path}: record {n}: expected an object with Flickr30K_ID, sentence2 and "
                             "gold_label") from None
        if label not in SNLI_VE_ANSWERS:
            raise ValueError(f"{path}: record {n}: gold_label must be one of {', '.join(SNLI_VE_ANSWERS)}, "
                             f"got {label!r}")
        out.append(VLExample(hypothesis, image, {label: 1.0}, question_type=label))
    return out


def load_snli_ve(tokenizer: Any, options: LoadOptions = LoadOptions()) -> TaskData:
    """Load SNLI-VE from ``options.data_dir`` as a :class:`~vlsparse.data.dataset.TaskData` named "snli-ve".

    Files read (the SNLI-VE release, ``data/``): ``snli_ve_train.jsonl``, ``snli_ve_dev.jsonl`` and
    ``snli_ve_test.jsonl``, JSON lines ``{"Flickr30K_ID", "sentence2" (the hypothesis), "gold_label", ...}``
    (other fields, e.g. the premise caption ``sentence1``, ignored). Splits: train, val = dev, test;
    ``options.val_fraction`` and ``options.seed`` are unused. ``question_type`` = the gold label (per-label reports).

    Labels: :data:`SNLI_VE_ANSWERS`, target 1 at the gold label. Objective: :data:`SNLI_VE_OBJECTIVE`
    (answer head, cross-entropy, accuracy).

    Images: ``str(Flickr30K_ID)`` (the Flickr30k file stem, e.g. "3416050480"), region features in
    ``data_dir/features`` (``visual="regions"``, used as they are) or ``data_dir/images/<id>.jpg``
    (``"pixels"``, shortest edge ``options.image_size``).

    Raises:
        FileNotFoundError: ``data_dir`` None or missing, a split file, features / images of an example
            (the message names the file or the keys).
        ValueError: a line that is not JSON, a record without the fields above or with another gold_label
            (names the file and record), bad ``image_size``.
    """
    root = formats.data_root(options.data_dir, "snli-ve")
    splits = [_examples(root / f) for f in SNLI_VE_SPLITS.values()]
    return formats.task_data("snli-ve", root, splits, SNLI_VE_ANSWERS, SNLI_VE_OBJECTIVE, tokenizer, options)
