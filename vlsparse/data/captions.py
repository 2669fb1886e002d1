"""Caption corpora for VL pre-training in the COCO captions format, and the embedded ``easy-vqa-captions``.

Format (``captions_train2014.json`` of COCO, Chen et al. 2015; what UNITER pre-trains on besides VG, CC
and SBU)::

    {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", ...}, ...],
     "annotations": [{"id": 1, "image_id": 9, "caption": "a red circle"}, ...]}

Each image may carry ``"facts"``, a dict such as ``{"color": "red", "shape": "circle"}`` (a vlsparse
extension, ignored by other readers): image-text matching then draws negatives whose facts contradict
the caption (:func:`contradicting_images`), since a random easy-VQA image often still matches "there is a
circle".

``easy-vqa-captions`` (:func:`easy_vqa_captions`) is built deterministically from the images of vlsparse's
easy-VQA **train split only** (the validation images of that seed and all test images are left out): the
shape and colour that each image's own questions and answers establish (:func:`image_facts`, which is
:func:`vlsparse.data.easy_facts.facts_from_questions`: the facts easy-nlvr2 and easy-retrieval are built from),
stated in four templates.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Sequence
from pathlib import Path

from vlsparse.atomic import write_json
from vlsparse.data import formats
from vlsparse.data.easy_facts import COLORS, facts_from_questions

__all__ = ["COLORS", "CAPTION_TEMPLATES", "image_facts", "easy_vqa_captions", "read_coco_captions",
           "contradicting_images", "caption_facts"]

#: caption templates: (needed facts, text)
CAPTION_TEMPLATES = ((("color", "shape"), "a {color} {shape}"), (("color",), "the shape is {color}"),
                     (("shape",), "there is a {shape}"), (("color", "shape"), "the {shape} is {color}"))
_FORMAT = ('COCO captions: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}')


#: image id -> ``{"color": c, "shape": s}`` (either may be missing) established by easy-VQA questions: the one
#: implementation, :func:`vlsparse.data.easy_facts.facts_from_questions` (the derived tasks use it too)
image_facts = facts_from_questions


def easy_vqa_captions(path: str | os.PathLike, train_examples: Sequence) -> Path:
    """Write the ``easy-vqa-captions`` corpus for the images of ``train_examples`` (easy-VQA train-split
    :class:`~vlsparse.data.dataset.VLExample` objects, validation images already removed) to ``path``
    (COCO captions JSON, atomically); returns ``path``. Images ordered by id; one caption per template
    whose facts are known; images with no known fact are left out.
    """
    questions = [e.question for e in train_examples]
    answers = [next(iter(e.answers)) for e in train_examples]
    facts = image_facts(questions, answers, [e.image_id for e in train_examples])
    images, annotations = [], []
    for i in sorted(facts):
        known = facts[i]
        texts = [t.format(**known) for need, t in CAPTION_TEMPLATES if all(k in known for k in need)]
        if not texts:
            continue
        images.append({"id": i, "file_name": f"{i}.png", "facts": known})
        annotations += [{"id": len(annotations) + 1, "image_id": i, "caption": t} for t in texts]
    info = {"description": "easy-vqa-captions: facts of vlsparse's easy-VQA train split (validation images "
                           "left out), see vlsparse.data.captions"}
    return write_json(path, {"info": info, "images": images, "annotations": annotations})


def read_coco_captions(path: str | os.PathLike) -> tuple[dict[Hashable, dict], list[tuple[str, Hashable]]]:
    """Read a COCO captions file: ``(image id -> {"file_name", "facts"}, [(caption, image id), ...])``,
    captions in file order.

    Raises:
        FileNotFoundError: ``path`` is missing.
        ValueError: not JSON or not the COCO captions format, a caption whose image is not listed, or no
            captions (the message names the file).
    """
    data = formats.read_json(path, _FORMAT)
    try:
        images = {im["id"]: {"file_name": str(im["file_name"]), "facts": dict(im.get("facts") or {})}
                  for im in data["images"]}
        captions = [(str(a["caption"]), a["image_id"]) for a in data["annotations"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"{path}: not the COCO captions format; expected {_FORMAT}") from None
    unknown = [i for _, i in captions if i not in images]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} captions name an image id missing from 'images', e.g. {unknown[0]!r}")
    if not captions:
        raise ValueError(f"{path}: no captions")
    return images, captions


def caption_facts(caption: str, values: dict[str, set[str]]) -> dict[str, str]:
    """The facts a caption states: key -> the value of ``values[key]`` that occurs as a word in it."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return {k: next(iter(sorted(vs & words))) for k, vs in values.items() if vs & words}


def contradicting_images(stated: dict[str, str], facts: dict[Hashable, dict[str, str]]) -> list[Hashable]:
    """Images whose known facts contradict ``stated`` (some key known with another value), in ``facts`` order;
    every image when nothing is stated."""
    if not stated:
        return list(facts)
    return [i for i, f in facts.items() if any(k in f and f[k] != v for k, v in stated.items())]
