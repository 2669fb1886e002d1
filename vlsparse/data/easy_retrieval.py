"""``easy-retrieval``: caption-image retrieval over easy-VQA images, in Flickr30k's Karpathy-split format.

Built deterministically (:mod:`vlsparse.data.easy_derived`) from easy-VQA's images with known shape and colour,
in easy-VQA's own split (train / validation / test images, never mixed). Every image gets
:data:`CAPTIONS_PER_IMAGE` captions stating its facts (:func:`vlsparse.data.easy_facts.caption`), templates drawn
without repetition with ``numpy.random.default_rng(seed)``. Written as ``dataset_flickr30k.json``
(``{"images": [{"filename": "train-17.png", "split": "train"|"val"|"test", "sentences": [{"raw": ...}],
"facts": {"shape", "color"}}]}``; ``facts`` is our extension, ignored by Flickr30k's reader) with the images'
region features, then read by :func:`vlsparse.data.flickr30k.retrieval_task` as Flickr30k is: rank head,
cross-entropy over the own image and ``negatives`` others, IR/TR recall@1/5/10.

**Equal facts count as a match.** 24 (shape, colour) combinations share ~5,000 images, so many images fit a
caption equally: ranking counts a retrieved image (IR) or caption (TR) as correct when its facts equal the
query's (:func:`vlsparse.data.metrics.recall_at_k` with ``image_class``), and training negatives are images whose
facts differ. Chance level (random scores, :func:`vlsparse.data.metrics.chance_recall_at_k`) on the default
evaluation sets (the first :data:`EVAL_IMAGES` images of each split, keys sorted as strings, 2 captions each):
5.3% IR R@1 and 24% / 42% at R@5 / R@10 on test (TR about the same; README "Tasks").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from vlsparse.atomic import write_json
from vlsparse.data import formats
from vlsparse.data.dataset import TaskData
from vlsparse.data.easy_derived import EasyImage, derived_root, easy_splits, read_stats, write_visuals
from vlsparse.data.easy_facts import CAPTION_TEMPLATES, caption
from vlsparse.data.flickr30k import FLICKR30K_FILE, retrieval_task
from vlsparse.data.options import LoadOptions

__all__ = ["load_easy_retrieval", "build_easy_retrieval", "CAPTIONS_PER_IMAGE", "EVAL_IMAGES", "image_facts", "retrieval_records"]

#: captions per image (of the 4 templates)
CAPTIONS_PER_IMAGE = 2
#: images of the val and test retrieval sets (every caption is scored against every image: 200 x 100 pairs)
EVAL_IMAGES = 100
#: training negatives per caption (Flickr30k's default is 3: each one is a forward pass)
NEGATIVES = 1


def retrieval_records(options: LoadOptions) -> tuple[list[dict], dict[str, EasyImage]]:
    """The image entries of ``dataset_flickr30k.json`` (module docstring) and the image keys (``<pool>-<id>`` ->
    easy-VQA image), deterministic in ``options.val_fraction`` and ``options.seed``."""
    rng = np.random.default_rng([options.seed, CAPTIONS_PER_IMAGE])
    entries, keys = [], {}
    for split, images in easy_splits(options.val_fraction, options.seed).items():
        for (pool, i), facts in images.items():
            keys[f"{pool}-{i}"] = (pool, i)
            templates = rng.choice(len(CAPTION_TEMPLATES), size=CAPTIONS_PER_IMAGE, replace=False)
            entries.append({"filename": f"{pool}-{i}.png", "split": split, "facts": facts._asdict(),
                            "sentences": [{"raw": caption(facts, int(t))} for t in templates]})
    return entries, keys


def build_easy_retrieval(root: Path, options: LoadOptions) -> dict:
    """Write easy-retrieval into ``root`` (module docstring); returns the image count per split for build.json."""
    entries, keys = retrieval_records(options)
    write_json(root / FLICKR30K_FILE, {"dataset": "easy-retrieval", "images": entries})
    write_visuals(root, keys, options)
    return {"images": {split: sum(e["split"] == split for e in entries) for split in ("train", "val", "test")}}


def image_facts(root: Path) -> dict[str, tuple[str, str]]:
    """image key (filename stem) -> (shape, colour) of a written easy-retrieval ``root``.

    Raises:
        FileNotFoundError: no ``dataset_flickr30k.json``.
        ValueError: an image without ``facts`` {"shape", "color"} (names the file).
    """
    path = root / FLICKR30K_FILE
    data = formats.read_json(path, "easy-retrieval's Karpathy-split file with facts per image")
    try:
        return {Path(im["filename"]).stem: (im["facts"]["shape"], im["facts"]["color"]) for im in data["images"]}
    except (KeyError, TypeError):
        raise ValueError(f"{path}: every image needs \"facts\": {{\"shape\", \"color\"}}") from None


def load_easy_retrieval(tokenizer: Any, options: LoadOptions = LoadOptions(), *, negatives: int = NEGATIVES,
                        eval_images: int | None = EVAL_IMAGES) -> TaskData:
    """Load ``easy-retrieval`` as a :class:`~vlsparse.data.dataset.TaskData` named "easy-retrieval", building it
    first when it is not cached (:func:`~vlsparse.data.easy_derived.derived_root`; ``options.data_dir``: a built
    copy).

    As :func:`vlsparse.data.flickr30k.load_flickr30k` (train: each caption with its image and ``negatives``
    images of other facts, labels "0".."k"; val / test: :class:`~vlsparse.data.dataset.RetrievalSet` of the first
    ``eval_images`` images (None: all) and their captions), with facts as the images' groups: a match is an image
    or caption with the query's facts (metric ``ir_r1``, with ``tr_r1``, ``ir_r5`` ...). ``feature_mean`` /
    ``feature_std``: the easy-VQA train statistics the stored features were standardised with.

    Raises:
        FileNotFoundError: ``options.data_dir`` given but missing, or missing files in it.
        ValueError: ``val_fraction`` outside [0, 1), ``negatives`` < 1, ``eval_images`` < 1, malformed files.
    """
    root = derived_root("easy-retrieval", options, build_easy_retrieval)
    task = retrieval_task("easy-retrieval", root, tokenizer, dataclasses.replace(options, data_dir=root), negatives,
                          eval_images, groups=image_facts(root))
    mean, std = read_stats(root)
    return dataclasses.replace(task, feature_mean=mean, feature_std=std)
