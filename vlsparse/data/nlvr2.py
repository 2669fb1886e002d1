"""NLVR2 (Suhr et al., ACL 2019, "A Corpus for Reasoning About Natural Language Grounded in Photographs").

Each example is a statement about a pair of photographs, labelled "True" or "False". The model
encodes the statement with each image and classifies the two pooled vectors concatenated: the
``pair`` head (UNITER's "paired" NLVR2 model, LXMERT's NLVR2 model, transformers'
``ViltForImagesAndTextClassification``).
"""

from __future__ import annotations

import os
from typing import Any

from vlsparse.data import formats
from vlsparse.data.dataset import TaskData, VLExample
from vlsparse.data.objective import Objective
from vlsparse.data.options import LoadOptions

__all__ = ["load_nlvr2", "NLVR2_OBJECTIVE", "NLVR2_ANSWERS", "NLVR2_SPLITS", "nlvr2_image_keys"]

#: the two labels, index = logit position
NLVR2_ANSWERS = ["False", "True"]
#: two images per example, cross-entropy over the two labels, accuracy
NLVR2_OBJECTIVE = Objective(head="pair", loss="ce", metric="accuracy", images=2)
#: TaskData split -> NLVR2 file stem
NLVR2_SPLITS = {"train": "train", "val": "dev", "test": "test1"}


def nlvr2_image_keys(identifier: str) -> tuple[str, str]:
    """The (left, right) image keys of an NLVR2 statement: ``"dev-850-0-0"`` -> ``("dev-850-0-img0",
    "dev-850-0-img1")`` (the image files are ``dev-850-0-img0.png`` ...; UNITER's and LXMERT's
    preprocessing name them the same way).

    Raises:
        ValueError: an identifier without a ``-`` (not ``<split>-<set>-<pair>-<sentence>``).
    """
    if "-" not in identifier:
        raise ValueError(f"NLVR2 identifier {identifier!r}: expected <split>-<set>-<pair>-<sentence>")
    stem = identifier.rsplit("-", 1)[0]
    return f"{stem}-img0", f"{stem}-img1"


def _examples(path: os.PathLike) -> list[VLExample]:
    out = []
    for n, rec in enumerate(formats.read_jsonl(path, "NLVR2 statements, one JSON object a line"), 1):
        try:
            identifier, sentence, label = str(rec["identifier"]), str(rec["sentence"]), str(rec["label"])
        except (KeyError, TypeError):
            raise ValueError(f"{path}:{n}: expected an object with identifier, sentence and label") from None
        if label not in NLVR2_ANSWERS:
            raise ValueError(f"{path}:{n}: label must be one of {', '.join(NLVR2_ANSWERS)}, got {label!r}")
        try:
            keys = nlvr2_image_keys(identifier)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        out.append(VLExample(sentence, keys, {label: 1.0}))
    return out


def load_nlvr2(tokenizer: Any, options: LoadOptions = LoadOptions()) -> TaskData:
    """Load NLVR2 from ``options.data_dir`` as a :class:`~vlsparse.data.dataset.TaskData` named "nlvr2".

    Files read (NLVR2's release, ``nlvr2/data/``): ``train.json``, ``dev.json`` and ``test1.json``,
    JSON lines ``{"identifier": "dev-850-0-0", "sentence": ..., "label": "True"|"False", ...}`` (other
    fields ignored). Splits: train = train.json, val = dev.json, test = test1.json (the public test
    set; test2 is not read). ``options.val_fraction`` and ``options.seed`` are unused: NLVR2 has its own
    dev split.

    Each statement's images are :func:`nlvr2_image_keys` of its identifier, read through
    :func:`~vlsparse.data.formats.visual_inputs`: region features in ``data_dir/features`` keyed by
    ``dev-850-0-img0`` etc. (``visual="regions"``), or ``data_dir/images/dev-850-0-img0.png``
    (``"pixels"``, shortest edge ``options.image_size``). Real features are used as they are (not standardised).

    Labels: :data:`NLVR2_ANSWERS` ``["False", "True"]``, target 1 at the label. Objective:
    :data:`NLVR2_OBJECTIVE` (``pair`` head over 2 images, cross-entropy, accuracy). Items carry a
    leading image axis of 2: ``img_feat`` (2, N, D), ``img_pos`` (2, N, 7), ``img_mask`` (2, N), or
    ``pixel_values`` (2, 3, H, W) and ``pixel_mask`` (2, H, W); ``input_ids`` (L,) is the statement once.

    Raises:
        FileNotFoundError: ``data_dir`` None or missing, a split file, the features / images, or the
            images of a statement (the message names the file or the keys).
        ValueError: a line that is not JSON or lacks identifier/sentence/label, a label other than
            "True"/"False" (the message names the file and line), a bad ``image_size``.
    """
    root = formats.data_root(options.data_dir, "nlvr2")
    splits = [_examples(root / f"{stem}.json") for stem in NLVR2_SPLITS.values()]
    return formats.task_data("nlvr2", root, splits, NLVR2_ANSWERS, NLVR2_OBJECTIVE, tokenizer, options)
