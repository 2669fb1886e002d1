"""easy-VQA (the ``easy_vqa`` package): 64x64 images of one coloured shape, 13 answers.

4,000 train / 1,000 test images, 38,575 / 9,673 questions.  Each question has one answer,
so its soft target is 1 for that answer.  A validation split is carved from train by image
(:func:`~vlsparse.data.dataset.split_by_image`); region features (see
:mod:`vlsparse.data.visual.regions`) are standardised with statistics of the train-split images
only.  Train and test image ids overlap (both start at 0), so each split has its own
region table.

With ``visual="pixels"`` (ViLT) the datasets give the images themselves, through
ViltImageProcessor (:mod:`vlsparse.data.visual.pixels`) at :data:`PIXEL_IMAGE_SIZE` = 96 pixels: the
64x64 images are upsampled (bicubic) to 96x96, a 3x3 grid of ViLT's 32-pixel patches (9 image
tokens, about as many as the 6 regions; ``vilt-tiny`` is configured for 96-pixel images, so its
position embeddings are used as they are).  Pass ``image_size`` (a multiple of 32) for another
resolution, e.g. 384 as ViLT was trained (144 patches, slow on a CPU).
"""

from __future__ import annotations

from typing import Any

import easy_vqa
import numpy as np

from vlsparse.data.dataset import (
    TaskData,
    VLDataset,
    VLExample,
    region_feature_stats,
    split_by_image,
    standardize_regions,
)
from vlsparse.data.options import LoadOptions
from vlsparse.data.visual.pixels import PixelImages
from vlsparse.data.visual.regions import REGION_FEATURE_DIM, RegionFeatureCache

__all__ = ["load_easy_vqa", "easy_vqa_question_type", "easy_vqa_train_split", "easy_vqa_regions", "SHAPES",
           "PIXEL_IMAGE_SIZE"]

#: shortest image edge (pixels) of the ``visual="pixels"`` datasets: 3x3 patches of 32 pixels
PIXEL_IMAGE_SIZE = 96

SHAPES = frozenset({"circle", "rectangle", "triangle"})


def easy_vqa_question_type(answer: str) -> str:
    """"yes/no", "shape" or "color", read off the answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def _examples(texts, answers, image_ids) -> list[VLExample]:
    return [
        VLExample(question=q, image_id=int(i), answers={a: 1.0}, question_type=easy_vqa_question_type(a))
        for q, a, i in zip(texts, answers, image_ids)
    ]


def _regions(cache: RegionFeatureCache, paths: dict[int, str], name: str):
    ids = sorted(paths)
    feats, boxes = cache.load([paths[i] for i in ids], name=name)
    return {i: (feats[k], boxes[k]) for k, i in enumerate(ids)}


def easy_vqa_train_split(options: LoadOptions) -> tuple[list[VLExample], list[VLExample]]:
    """(train, val) examples of vlsparse's easy-VQA train split: ``options.val_fraction`` of the train images
    (with all their questions) form val, chosen with ``options.seed`` (:func:`split_by_image`).

    Raises:
        ValueError: ``val_fraction`` outside [0, 1).
    """
    return split_by_image(_examples(*easy_vqa.get_train_questions()), options.val_fraction, options.seed)


def easy_vqa_regions(options: LoadOptions, train: list[VLExample]) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Region features of every easy-VQA image, standardised with the statistics of the images of ``train``
    only: ``(train-image regions, test-image regions, mean (D,), std (D,))``, regions as image id ->
    ``(features (6, D) float32, boxes (6, 7) float32)`` (cached under ``options.cache_dir``)."""
    cache = RegionFeatureCache(options.cache_dir)
    train_regions = _regions(cache, easy_vqa.get_train_image_paths(), "easy-vqa-train")
    test_regions = _regions(cache, easy_vqa.get_test_image_paths(), "easy-vqa-test")
    train_ids = sorted({e.image_id for e in train})
    mean, std = region_feature_stats(np.stack([train_regions[i][0] for i in train_ids]))
    return standardize_regions(train_regions, mean, std), standardize_regions(test_regions, mean, std), mean, std


def load_easy_vqa(tokenizer: Any, options: LoadOptions = LoadOptions()) -> TaskData:
    """Load easy-VQA as a :class:`~vlsparse.data.dataset.TaskData` named "easy-vqa".

    ``options.data_dir`` is unused: the data ships in the ``easy_vqa`` package.
    ``options.val_fraction`` of the train images (with all their questions) form the validation
    split, chosen with ``options.seed``.  Region features are cached under ``options.cache_dir``
    (default ``$VLSPARSE_CACHE`` or ``~/.cache/vlsparse``).  ``visual="pixels"``: the datasets give
    ViltImageProcessor pixels with shortest edge ``options.image_size`` (default
    :data:`PIXEL_IMAGE_SIZE`) instead of region features (nothing cached: resizing the 5,000 images
    takes a few seconds).

    Raises:
        ValueError: bad ``image_size`` or ``val_fraction``.
    """
    options = options.with_defaults(image_size=PIXEL_IMAGE_SIZE)
    answers = list(easy_vqa.get_answers())
    test = _examples(*easy_vqa.get_test_questions())
    train, val = easy_vqa_train_split(options)

    def ds(examples, images):
        return VLDataset(examples, images, tokenizer, answers, max_text_len=options.max_text_len)

    if options.visual == "pixels":
        train_images = PixelImages(easy_vqa.get_train_image_paths(), options.image_size)
        test_images = PixelImages(easy_vqa.get_test_image_paths(), options.image_size)
        return TaskData(name="easy-vqa", train=ds(train, train_images), val=ds(val, train_images),
                        test=ds(test, test_images), answers=answers, region_feature_dim=None, visual="pixels",
                        image_processor=train_images.processor_config())

    train_regions, test_regions, mean, std = easy_vqa_regions(options, train)

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
