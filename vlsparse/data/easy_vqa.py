"""easy-VQA (the ``easy_vqa`` package): 64x64 images of one coloured shape, 13 answers.

4,000 train / 1,000 test images, 38,575 / 9,673 questions.  Each question has one answer,
so its soft target is 1 for that answer.  A validation split is carved from train by image
(:func:`~vlsparse.data.vqa.split_by_image`); region features (see
:mod:`vlsparse.data.regions`) are standardised with statistics of the train-split images
only.  Train and test image ids overlap (both start at 0), so each split has its own
region table.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .regions import REGION_FEATURE_DIM, RegionFeatureCache
from .vqa import (
    TaskData,
    VQADataset,
    VQAExample,
    region_feature_stats,
    split_by_image,
    standardize_regions,
)

__all__ = ["load_easy_vqa", "easy_vqa_question_type", "SHAPES"]

SHAPES = frozenset({"circle", "rectangle", "triangle"})


def easy_vqa_question_type(answer: str) -> str:
    """"yes/no", "shape" or "color", read off the answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def _examples(texts, answers, image_ids) -> list[VQAExample]:
    return [
        VQAExample(question=q, image_id=int(i), answers={a: 1.0}, question_type=easy_vqa_question_type(a))
        for q, a, i in zip(texts, answers, image_ids)
    ]


def _regions(cache: RegionFeatureCache, paths: dict[int, str], name: str):
    ids = sorted(paths)
    feats, boxes = cache.load([paths[i] for i in ids], name=name)
    return {i: (feats[k], boxes[k]) for k, i in enumerate(ids)}


def load_easy_vqa(
    tokenizer: Any,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    max_text_len: int = 40,
) -> TaskData:
    """Load easy-VQA as a :class:`~vlsparse.data.vqa.TaskData` named "easy-vqa".

    ``val_fraction`` of the train images (with all their questions) form the validation
    split, chosen with ``seed``.  Region features are cached under ``cache_dir`` (default
    ``$VLSPARSE_CACHE`` or ``~/.cache/vlsparse``).
    """
    import easy_vqa

    answers = list(easy_vqa.get_answers())
    train_all = _examples(*easy_vqa.get_train_questions())
    test = _examples(*easy_vqa.get_test_questions())
    train, val = split_by_image(train_all, val_fraction, seed)

    cache = RegionFeatureCache(cache_dir)
    train_regions = _regions(cache, easy_vqa.get_train_image_paths(), "easy-vqa-train")
    test_regions = _regions(cache, easy_vqa.get_test_image_paths(), "easy-vqa-test")

    train_ids = sorted({e.image_id for e in train})
    mean, std = region_feature_stats(np.stack([train_regions[i][0] for i in train_ids]))
    train_regions = standardize_regions(train_regions, mean, std)
    test_regions = standardize_regions(test_regions, mean, std)

    def ds(examples, regions):
        return VQADataset(examples, regions, tokenizer, answers, max_text_len=max_text_len)

    return TaskData(
        name="easy-vqa",
        train=ds(train, train_regions),
        val=ds(val, train_regions),
        test=ds(test, test_regions),
        answers=answers,
        region_feature_dim=REGION_FEATURE_DIM,
        metric_name="vqa_score",
        feature_mean=mean,
        feature_std=std,
    )
