"""Tasks derived from easy-VQA's images, written in a paper task's on-disk format and cached.

``easy-nlvr2`` (:mod:`vlsparse.data.easy_nlvr2`) and ``easy-retrieval`` (:mod:`vlsparse.data.easy_retrieval`)
are built here deterministically from the easy-VQA package: its images, the facts their own questions
establish (:mod:`vlsparse.data.easy_facts`) and **easy-VQA's own split** (:func:`easy_splits`): the train
images minus the validation images that :func:`vlsparse.data.easy_vqa.load_easy_vqa` holds out with the same
``val_fraction`` and ``seed``, those validation images, and the test images. An example only ever combines
images of one split, so no test (or validation) image is trained on.

A built task is a directory laid out as the mirrored data set ships (read by the NLVR2 / Flickr30k loaders
unchanged), plus what they read about images::

    ROOT/regions/<pool>-<id>.npz   region features of each easy-VQA image (pool "train" or "test"), standardised
                                   with the easy-VQA train-split statistics (those of load_easy_vqa)
    ROOT/features/<key>.npz        a symbolic link to the regions file of the image that key names
    ROOT/images/<key>.png          a symbolic link to the easy-VQA image file (for ViLT)
    ROOT/stats.npz                 feature_mean, feature_std (D,) float32: the standardisation
    ROOT/build.json                how it was built (written last: a directory without it is rebuilt)

It is written into a temporary directory and renamed into place, so a crash or a concurrent build never
leaves a partial one. Default place: ``<cache_dir>/<task>-v<version>-val<fraction>-seed<seed>`` (easy-nlvr2: v2)
(``cache_dir``: ``$VLSPARSE_CACHE`` or ``~/.cache/vlsparse``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from vlsparse.atomic import write_json
from vlsparse.data.dataset import VLExample, region_feature_stats, split_by_image
from vlsparse.data.easy_facts import ImageFacts, easy_vqa_facts
from vlsparse.data.options import LoadOptions
from vlsparse.data.visual.regions import EXTRACTOR_VERSION, RegionFeatureCache, default_cache_dir

__all__ = ["EasyImage", "easy_splits", "derived_root", "write_visuals", "feature_stats", "BUILD_FILE"]

#: an easy-VQA image: (pool "train" | "test", image id in that pool)
EasyImage = tuple[str, int]
#: written last into a built directory
BUILD_FILE = "build.json"


def easy_splits(val_fraction: float = 0.1, seed: int = 0) -> dict[str, dict[EasyImage, ImageFacts]]:
    """"train" / "val" / "test" -> {easy-VQA image: its facts}, only images whose shape and colour are known.

    val holds the train-pool images that :func:`~vlsparse.data.dataset.split_by_image` gives
    :func:`~vlsparse.data.easy_vqa.load_easy_vqa` as validation images for ``val_fraction`` and ``seed`` (the split
    is over every train image, as there); train the other train-pool images; test the test pool.
    Ordered by image id.

    Raises:
        ValueError: ``val_fraction`` outside [0, 1).
    """
    import easy_vqa  # the `train` extra

    ids = sorted({int(i) for i in easy_vqa.get_train_questions()[2]})
    _, val = split_by_image([VLExample("", i, {}) for i in ids], val_fraction, seed)
    val_ids = {e.image_id for e in val}
    train_facts, test_facts = easy_vqa_facts("train"), easy_vqa_facts("test")
    return {"train": {("train", i): f for i, f in train_facts.items() if i not in val_ids},
            "val": {("train", i): f for i, f in train_facts.items() if i in val_ids},
            "test": {("test", i): f for i, f in test_facts.items()}}


def _image_paths() -> dict[str, dict[int, str]]:
    import easy_vqa

    return {"train": easy_vqa.get_train_image_paths(), "test": easy_vqa.get_test_image_paths()}


def feature_stats(cache_dir: str | os.PathLike | None, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) (D,) float32 of the region features of the easy-VQA train split (all train-pool images but
    the validation ones), exactly as :func:`~vlsparse.data.easy_vqa.load_easy_vqa` standardises them."""
    import easy_vqa

    ids = sorted({int(i) for i in easy_vqa.get_train_questions()[2]})
    train, _ = split_by_image([VLExample("", i, {}) for i in ids], val_fraction, seed)
    keep = {e.image_id for e in train}
    paths = _image_paths()["train"]
    order = sorted(paths)
    feats, _ = RegionFeatureCache(cache_dir).load([paths[i] for i in order], name="easy-vqa-train")
    return region_feature_stats(feats[[k for k, i in enumerate(order) if i in keep]])


def write_visuals(root: Path, keys: Mapping[str, EasyImage], options: LoadOptions) -> None:
    """Write ``root/regions``, ``root/features``, ``root/images`` and ``root/stats.npz`` (module docstring) for
    every ``key -> easy-VQA image``: each image's standardised regions once, one link per key."""
    mean, std = feature_stats(options.cache_dir, options.val_fraction, options.seed)
    np.savez(root / "stats.npz", feature_mean=mean, feature_std=std)
    paths = _image_paths()
    cache = RegionFeatureCache(options.cache_dir)
    for sub in ("regions", "features", "images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for pool in ("train", "test"):
        used = sorted({i for p, i in keys.values() if p == pool})
        if not used:
            continue
        order = sorted(paths[pool])
        feats, boxes = cache.load([paths[pool][i] for i in order], name=f"easy-vqa-{pool}")
        row = {i: k for k, i in enumerate(order)}
        for i in used:
            f = ((feats[row[i]] - mean) / std).astype(np.float32)
            np.savez(root / "regions" / f"{pool}-{i}.npz", features=f, norm_bb=boxes[row[i]].astype(np.float32))
    for key, (pool, i) in keys.items():
        os.symlink(Path("..") / "regions" / f"{pool}-{i}.npz", root / "features" / f"{key}.npz")
        os.symlink(os.path.abspath(paths[pool][i]), root / "images" / f"{key}.png")


def derived_root(task: str, options: LoadOptions, build: Callable[[Path, LoadOptions], dict], *,
                 version: int = 1) -> Path:
    """The directory of derived task ``task``: ``options.data_dir`` when given (a built copy, used as it is),
    else ``<cache>/<task>-v<version>-val<fraction>-seed<seed>`` (a task that changes what it generates bumps its
    ``version``, so an older build is never read as the new one), built with ``build(tmp_dir, options)`` first if it has
    no ``build.json`` (``build`` writes the files and returns the description stored in build.json).

    Raises:
        FileNotFoundError: ``options.data_dir`` given but not a directory.
        ValueError: ``options.val_fraction`` outside [0, 1).
    """
    if options.data_dir is not None:
        root = Path(options.data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--data-dir {root}: not a directory (task {task!r})")
        return root
    cache = Path(options.cache_dir).expanduser() if options.cache_dir is not None else default_cache_dir()
    root = cache / f"{task}-v{version}-val{options.val_fraction:g}-seed{options.seed}"
    if (root / BUILD_FILE).is_file():
        return root
    if not 0.0 <= options.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {options.val_fraction}")
    tmp = cache / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = build(tmp, options)
        write_json(tmp / BUILD_FILE, {"task": task, "extractor": EXTRACTOR_VERSION,
                                      "val_fraction": options.val_fraction, "seed": options.seed, **info})
        if root.exists():  # an unfinished build (no build.json) of an earlier process
            shutil.rmtree(root)
        os.rename(tmp, root)
    except OSError:
        if not (root / BUILD_FILE).is_file():  # not another process's finished build
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_stats(root: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(feature_mean, feature_std) of ``root/stats.npz``, or (None, None) without one."""
    if not (root / "stats.npz").is_file():
        return None, None
    with np.load(root / "stats.npz") as z:
        return z["feature_mean"], z["feature_std"]


def read_build(root: Path) -> dict:
    """``root/build.json`` as a dict ({} without one)."""
    path = root / BUILD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
