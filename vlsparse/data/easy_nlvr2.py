"""``easy-nlvr2``: true/false statements about two easy-VQA images, in NLVR2's format (Suhr et al., ACL 2019).

Built deterministically (:mod:`vlsparse.data.easy_derived`) from easy-VQA's images with known shape and colour
(:mod:`vlsparse.data.easy_facts`), split by split (:func:`~vlsparse.data.easy_derived.easy_splits`: both images
of a pair always come from the same split). Pairs: ``PAIR_ROUNDS[split]`` rounds, each pairing the split's images
two by two along a fresh ``numpy.random.default_rng(seed)`` permutation (train: 4 rounds, so each image is in 4
pairs; validation and test: 2). Each pair gets **two statements of one template, one true and one false**
(labels balanced overall and within every template), the template drawn uniformly among those of
:data:`TEMPLATES` that have a true and a false wording for that pair, each wording drawn uniformly.

Written as NLVR2's release: ``train.json``, ``dev.json``, ``test1.json`` (JSON lines ``{"identifier":
"train-2-17-0", "sentence", "label": "True"|"False", "template", "left", "right"}``; ``left`` / ``right`` are
the easy-VQA images "<pool>-<id>", extra fields NLVR2's loader ignores), images ``<split>-<round>-<pair>-img0``
and ``-img1`` as region features (and PNG links for ViLT), then read by
:func:`vlsparse.data.nlvr2.load_nlvr2` (pair head, cross-entropy, accuracy). Chance: 50%; a model that reads
only the statement or only the images cannot beat 50% on average, since every pair has one true and one false
statement of the same template.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlsparse.atomic import write_text
from vlsparse.data import formats
from vlsparse.data.dataset import TaskData
from vlsparse.data.easy_derived import EasyImage, derived_root, easy_splits, read_stats, write_visuals
from vlsparse.data.easy_facts import COLORS, SHAPES, ImageFacts
from vlsparse.data.nlvr2 import NLVR2_SPLITS, load_nlvr2
from vlsparse.data.options import LoadOptions

__all__ = ["load_easy_nlvr2", "TEMPLATES", "PAIR_ROUNDS", "statements", "build_easy_nlvr2", "nlvr2_records"]

#: pairing rounds per split (each image is in this many pairs)
PAIR_ROUNDS = {"train": 4, "val": 2, "test": 2}

Wording = tuple[str, bool]


def _both_color(a: ImageFacts, b: ImageFacts) -> list[Wording]:
    return [(f"both shapes are {c}", a.color == b.color == c) for c in COLORS]


def _both_shape(a: ImageFacts, b: ImageFacts) -> list[Wording]:
    return [(f"both images show a {s}", a.shape == b.shape == s) for s in SHAPES]


def _left_not_right(a: ImageFacts, b: ImageFacts) -> list[Wording]:
    return [(f"the left image has a {s} and the right one does not", a.shape == s != b.shape) for s in SHAPES]


def _exactly_one(a: ImageFacts, b: ImageFacts) -> list[Wording]:
    return [(f"exactly one image shows a {s}", (a.shape == s) != (b.shape == s)) for s in SHAPES]


def _same_color(a: ImageFacts, b: ImageFacts) -> list[Wording]:
    return [("the two shapes have the same color", a.color == b.color),
            ("the two shapes have different colors", a.color != b.color)]


def _same_shape(a: ImageFacts, b: ImageFacts) -> list[Wording]:
    return [("the two images show the same shape", a.shape == b.shape),
            ("the two images show different shapes", a.shape != b.shape)]


def _right_is(a: ImageFacts, b: ImageFacts) -> list[Wording]:
    return [(f"the right image shows a {c} {s}", b == (s, c)) for s in SHAPES for c in COLORS]


#: template name -> wordings(left facts, right facts) -> [(statement, true?)]
TEMPLATES: dict[str, Callable[[ImageFacts, ImageFacts], list[Wording]]] = {
    "both-color": _both_color, "both-shape": _both_shape, "left-not-right": _left_not_right,
    "exactly-one": _exactly_one, "same-color": _same_color, "same-shape": _same_shape, "right-is": _right_is,
}


def statements(left: ImageFacts, right: ImageFacts, rng: np.random.Generator) -> tuple[str, Wording, Wording]:
    """(template, a true wording, a false wording) for one pair: the template drawn uniformly among those of
    :data:`TEMPLATES` with both a true and a false wording for (left, right), each wording uniformly among its
    kind. Every pair has one (same-color has both truth values always)."""
    usable = []
    for name, make in TEMPLATES.items():
        words = make(left, right)
        true, false = [w for w in words if w[1]], [w for w in words if not w[1]]
        if true and false:
            usable.append((name, true, false))
    name, true, false = usable[rng.integers(len(usable))]
    return name, true[rng.integers(len(true))], false[rng.integers(len(false))]


def nlvr2_records(options: LoadOptions) -> tuple[dict[str, list[dict]], dict[str, EasyImage]]:
    """The statements of every split (NLVR2 file stem -> JSON records, module docstring) and the image keys
    (``<stem>-<round>-<pair>-img0|1`` -> easy-VQA image), deterministic in ``options.val_fraction`` and ``seed``."""
    splits = easy_splits(options.val_fraction, options.seed)
    keys, records = {}, {}
    for split, stem in NLVR2_SPLITS.items():
        images = list(splits[split])
        rng = np.random.default_rng([options.seed, len(stem), PAIR_ROUNDS[split]])
        records[stem] = []
        for r in range(PAIR_ROUNDS[split]):
            perm = rng.permutation(len(images))
            for p in range(len(images) // 2):
                left, right = images[perm[2 * p]], images[perm[2 * p + 1]]
                name, true, false = statements(splits[split][left], splits[split][right], rng)
                pair = f"{stem}-{r}-{p}"
                keys.update({f"{pair}-img0": left, f"{pair}-img1": right})
                order = (true, false) if rng.integers(2) else (false, true)
                records[stem] += [{"identifier": f"{pair}-{s}", "sentence": text, "label": str(label), "template": name,
                                   "left": f"{left[0]}-{left[1]}", "right": f"{right[0]}-{right[1]}"}
                                  for s, (text, label) in enumerate(order)]
    return records, keys


def build_easy_nlvr2(root: Path, options: LoadOptions) -> dict:
    """Write easy-nlvr2 into ``root`` (module docstring); returns the statement count per file for build.json."""
    records, keys = nlvr2_records(options)
    for stem, lines in records.items():
        write_text(root / f"{stem}.json", "".join(json.dumps(r) + "\n" for r in lines))
    write_visuals(root, keys, options)
    return {"statements": {stem: len(lines) for stem, lines in records.items()}}


def load_easy_nlvr2(tokenizer: Any, options: LoadOptions = LoadOptions()) -> TaskData:
    """Load ``easy-nlvr2`` as a :class:`~vlsparse.data.dataset.TaskData` named "easy-nlvr2", building it first
    when it is not cached (:func:`~vlsparse.data.easy_derived.derived_root`; ``options.data_dir``: a built copy).

    Read by :func:`vlsparse.data.nlvr2.load_nlvr2` (items, head, loss and metric as NLVR2: ``img_feat``
    (2, N, D) ..., labels ["False", "True"], accuracy); examples carry their template as ``question_type``;
    ``feature_mean`` / ``feature_std`` are the easy-VQA train statistics the stored features were standardised with.

    Raises:
        FileNotFoundError: ``options.data_dir`` given but missing, or missing files in it.
        ValueError: ``val_fraction`` outside [0, 1); malformed files (see load_nlvr2).
    """
    root = derived_root("easy-nlvr2", options, build_easy_nlvr2)
    task = load_nlvr2(tokenizer, dataclasses.replace(options, data_dir=root))
    for split, stem in NLVR2_SPLITS.items():
        records = formats.read_jsonl(root / f"{stem}.json", "easy-nlvr2 statements")
        for example, record in zip(getattr(task, split).examples, records):
            example.question_type = str(record.get("template", ""))
    mean, std = read_stats(root)
    return dataclasses.replace(task, name="easy-nlvr2", feature_mean=mean, feature_std=std)
