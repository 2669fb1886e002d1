"""What an easy-VQA image shows, read off its own questions and answers, and captions stating it.

Every easy-VQA image (64x64 pixels, one shape) comes with questions of 39 templates (the ``easy_vqa`` package):
open ones ("what color is the shape?", "what shape is in the image?", "what is the color of the circle?")
and yes/no ones, some negated ("is there not a red shape?", "is no circle present?",
"does the image not contain a triangle?"). :func:`facts_from_questions` turns them into facts:

* an open answer is a fact of its own kind (a colour or a shape), and a shape or colour named in an open
  question ("what color is the *circle*?") is one too;
* a yes/no question about value v is true when (answer == "yes") differs from (question negated: it has the
  word "not" or "no"); true makes v a fact, false rules v out;
* a shape is also known once the other two shapes are ruled out (a colour only once the other seven are).

Only images whose shape *and* colour are known get an :class:`ImageFacts` (:func:`easy_vqa_facts`); the
derived tasks (``easy-nlvr2``, ``easy-retrieval``) use only those. :func:`caption` states both facts in one
of :data:`CAPTION_TEMPLATES`.

The pre-training corpus ``easy-vqa-captions`` (:mod:`vlsparse.data.captions`) reads its facts from
:func:`facts_from_questions` too (``captions.image_facts`` is it): the corpus and the derived tasks agree on
every image.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["ImageFacts", "COLORS", "SHAPES", "CAPTION_TEMPLATES", "facts_from_questions", "easy_vqa_facts",
           "caption"]

#: the eight colours of easy-VQA (its answers minus yes/no and the shapes), in a fixed order
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
#: the three shapes of easy-VQA
SHAPES = ("circle", "rectangle", "triangle")
#: caption templates, each naming both facts
CAPTION_TEMPLATES = ("a {color} {shape}", "the {shape} is {color}", "there is a {color} {shape}",
                     "a {shape} that is {color}")
_KIND = {**{c: "color" for c in COLORS}, **{s: "shape" for s in SHAPES}}


class ImageFacts(NamedTuple):
    """The shape and colour of one easy-VQA image (words of :data:`SHAPES` and :data:`COLORS`)."""

    shape: str
    color: str


def facts_from_questions(questions: Iterable[str], answers: Iterable[str],
                         image_ids: Iterable[int]) -> dict[int, dict[str, str]]:
    """image id -> ``{"shape": ..., "color": ...}`` (either key may be missing) from easy-VQA questions.

    Args:
        questions, answers, image_ids: parallel sequences, as ``easy_vqa.get_train_questions()`` returns
            them (str, str, int).

    Returns:
        the facts each image's questions establish (rules in the module docstring), ids as int.

    Raises:
        ValueError: two questions of one image establish different values of the same kind (the message
            names the image): the rules above would be wrong for that template.
    """
    known: dict[int, dict[str, str]] = {}
    excluded: dict[int, set[str]] = {}

    def establish(image: int, value: str) -> None:
        kind = _KIND[value]
        old = known.setdefault(image, {}).setdefault(kind, value)
        if old != value:
            raise ValueError(f"easy-VQA image {image}: questions say both {old!r} and {value!r} ({kind})")

    for question, answer, image in zip(questions, answers, image_ids):
        image = int(image)
        words = re.findall(r"[a-z]+", question.lower())
        named = [w for w in words if w in _KIND]
        if answer not in ("yes", "no"):
            for value in [answer, *named]:
                establish(image, value)
            continue
        if not named:
            continue
        negated = "not" in words or "no" in words
        if (answer == "yes") != negated:
            establish(image, named[0])
        else:
            excluded.setdefault(image, set()).add(named[0])
    for image, out in excluded.items():
        for kind, values in (("shape", SHAPES), ("color", COLORS)):
            left = [v for v in values if v not in out]
            if len(left) == 1:
                establish(image, left[0])
    return known


@functools.cache
def easy_vqa_facts(split: str) -> dict[int, ImageFacts]:
    """image id -> :class:`ImageFacts` of the easy-VQA ``split`` ("train" or "test") images whose shape and
    colour are both known (:func:`facts_from_questions`), ids ascending. Cached per process.

    Raises:
        ValueError: ``split`` is neither "train" nor "test".
    """
    import easy_vqa  # the `train` extra

    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    questions = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    facts = facts_from_questions(*questions)
    return {i: ImageFacts(f["shape"], f["color"]) for i, f in sorted(facts.items()) if len(f) == 2}


def caption(facts: ImageFacts, template: int) -> str:
    """``CAPTION_TEMPLATES[template]`` filled with ``facts``: ``caption(ImageFacts("circle", "red"), 1)`` is
    "the circle is red".

    Raises:
        IndexError: ``template`` outside ``range(len(CAPTION_TEMPLATES))``.
    """
    return CAPTION_TEMPLATES[template].format(shape=facts.shape, color=facts.color)
