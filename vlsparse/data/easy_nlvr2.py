"""``easy-nlvr2``: true/false statements about two easy-VQA images, in NLVR2's format (Suhr et al., ACL 2019).

Built deterministically (:mod:`vlsparse.data.easy_derived`) from easy-VQA's images with known shape and colour
(:mod:`vlsparse.data.easy_facts`), split by split (:func:`~vlsparse.data.easy_derived.easy_splits`: both images
of a pair always come from the same split), ``PAIR_ROUNDS[split] * (images // 2)`` pairs per split (train: 4,
validation and test: 2, as many pairs as pairing every image that many times).

**Balanced so that the statement alone predicts nothing.** Every pair gets two statements of one template, one
true and one false (so the images alone predict nothing either), and pairs come in *mirrored couples*: a
template is drawn uniformly among :data:`TEMPLATES`, then two of its statements ``t`` and ``u`` uniformly among
those that can be told apart both ways in the split (:func:`statement_couples`); the couple's first pair is
drawn so that ``t`` is true and ``u`` false, its second so that ``u`` is true and ``t`` false. Each distinct
statement text is therefore exactly as often true as false in every split, and any statement-only rule scores
50%. (Pairing images at random and then choosing statements, as the first build did, made "the two shapes
have the same color" 92% false: a statement-only baseline of 62.6%.) A pair of images that makes ``t`` true and
``u`` false is drawn among the split's image pairs that do, uniformly over their shape-colour classes weighted
by their image pairs, and the images of a class are taken in turn from one shuffled list (so they are used
about equally often).

Written as NLVR2's release: ``train.json``, ``dev.json``, ``test1.json`` (JSON lines ``{"identifier":
"train-17-1-0", "sentence", "label": "True"|"False", "template", "left", "right"}``: couple 17, its pair 1,
statement 0; ``left`` / ``right`` are the easy-VQA images "<pool>-<id>", extra fields NLVR2's loader ignores),
images ``<split>-<couple>-<pair>-img0`` and ``-img1`` as region features (and PNG links for ViLT), then read by
:func:`vlsparse.data.nlvr2.load_nlvr2` (pair head, cross-entropy, accuracy). Chance, statement-only and
image-only baselines: 50% exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
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

__all__ = ["load_easy_nlvr2", "TEMPLATES", "PAIR_ROUNDS", "VERSION", "template_texts", "statement_couples",
           "build_easy_nlvr2", "nlvr2_records"]

#: pairs per split, in images of the split: pairs = PAIR_ROUNDS[split] * (images // 2)
PAIR_ROUNDS = {"train": 4, "val": 2, "test": 2}
#: the build's version (a new one is a new cache directory): 2 balances every statement text
VERSION = 2

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


def template_texts(name: str) -> tuple[str, ...]:
    """Every statement text of template ``name`` of :data:`TEMPLATES`, in its order (the same for any facts)."""
    probe = ImageFacts(SHAPES[0], COLORS[0])
    return tuple(text for text, _ in TEMPLATES[name](probe, probe))


ClassPairs = dict[tuple[str, str, str], list[tuple[ImageFacts, ImageFacts, int]]]


def _class_pairs(counts: Mapping[ImageFacts, int]) -> ClassPairs:
    """(template, true text, false text) -> [(left class, right class, image pairs)] over the shape-colour classes
    of ``counts`` (class -> images)."""
    out: ClassPairs = {}
    for a in counts:
        for b in counts:
            n = counts[a] * (counts[b] - (a == b))
            if n <= 0:
                continue
            for name, make in TEMPLATES.items():
                words = make(a, b)
                for t, t_true in words:
                    for u, u_true in words:
                        if t_true and not u_true:
                            out.setdefault((name, t, u), []).append((a, b, n))
    return out


def _couples(pairs: ClassPairs) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for name in TEMPLATES:
        texts = template_texts(name)
        couples = [(t, u) for k, t in enumerate(texts) for u in texts[k + 1:]
                   if (name, t, u) in pairs and (name, u, t) in pairs]
        if couples:
            out[name] = couples
    return out


def statement_couples(facts: Iterable[ImageFacts]) -> dict[str, list[tuple[str, str]]]:
    """template -> the (t, u) statement couples of it (texts in template order) for which the images of ``facts``
    (one entry per image) hold both a pair making t true and u false and a pair making u true and t false;
    templates without any are left out."""
    return _couples(_class_pairs(collections.Counter(ImageFacts(*f) for f in facts)))


def _split_pairs(images: dict[EasyImage, ImageFacts], n_pairs: int, rng: np.random.Generator):
    """``n_pairs`` (rounded down to even) pairs as mirrored couples (module docstring):
    [(template, left image, right image, true text, false text)], the two pairs of a couple adjacent."""
    classes: dict[ImageFacts, list[EasyImage]] = {}
    for image, f in images.items():
        classes.setdefault(f, []).append(image)
    order = {f: [members[k] for k in rng.permutation(len(members))] for f, members in classes.items()}
    turn = dict.fromkeys(order, 0)

    def take(f: ImageFacts) -> EasyImage:  # the class's images in turn: two in a row always differ
        turn[f] += 1
        return order[f][(turn[f] - 1) % len(order[f])]

    pairs = _class_pairs({f: len(members) for f, members in classes.items()})
    couples = _couples(pairs)
    if n_pairs >= 2 and not couples:
        raise ValueError(f"easy-nlvr2: the {len(images)} images of a split allow no balanced statement couple")
    names, out = list(couples), []
    for _ in range(n_pairs // 2):
        name = names[rng.integers(len(names))]
        t, u = couples[name][rng.integers(len(couples[name]))]
        for true, false in ((t, u), (u, t)):
            options = pairs[(name, true, false)]
            weights = np.array([n for _, _, n in options], dtype=float)
            a, b, _ = options[rng.choice(len(options), p=weights / weights.sum())]
            out.append((name, take(a), take(b), true, false))
    return out


def nlvr2_records(options: LoadOptions) -> tuple[dict[str, list[dict]], dict[str, EasyImage]]:
    """The statements of every split (NLVR2 file stem -> JSON records, module docstring) and the image keys
    (``<stem>-<couple>-<pair>-img0|1`` -> easy-VQA image), deterministic in ``options.val_fraction`` and ``seed``.

    Raises:
        ValueError: a split whose images allow no balanced couple (:func:`statement_couples`).
    """
    splits = easy_splits(options.val_fraction, options.seed)
    keys, records = {}, {}
    for split, stem in NLVR2_SPLITS.items():
        images = splits[split]
        rng = np.random.default_rng([options.seed, len(stem), PAIR_ROUNDS[split]])
        records[stem] = []
        pairs = _split_pairs(images, PAIR_ROUNDS[split] * (len(images) // 2), rng)
        for k, (name, left, right, true, false) in enumerate(pairs):
            pair = f"{stem}-{k // 2}-{k % 2}"
            keys.update({f"{pair}-img0": left, f"{pair}-img1": right})
            order = ((true, True), (false, False)) if rng.integers(2) else ((false, False), (true, True))
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
    root = derived_root("easy-nlvr2", options, build_easy_nlvr2, version=VERSION)
    task = load_nlvr2(tokenizer, dataclasses.replace(options, data_dir=root))
    for split, stem in NLVR2_SPLITS.items():
        records = formats.read_jsonl(root / f"{stem}.json", "easy-nlvr2 statements")
        for example, record in zip(getattr(task, split).examples, records):
            example.question_type = str(record.get("template", ""))
    mean, std = read_stats(root)
    return dataclasses.replace(task, name="easy-nlvr2", feature_mean=mean, feature_std=std)
