"""Reading the standard on-disk data sets: files with clear errors, image files, region features.

Every task loader but easy-VQA reads ``--data-dir DIR`` laid out as the data set ships, plus

* ``DIR/features/``: region features for UNITER and LXMERT, bottom-up-attention ``*.tsv`` files
  and/or per-image ``*.npz`` files (:func:`vlsparse.data.visual.features.open_region_features`), keyed by
  the data set's image id;
* ``DIR/images/``: the image files for ViLT, ``<image id>.jpg`` (or ``.jpeg``/``.png``).

A missing file raises FileNotFoundError naming the file and what it should hold.

:func:`task_data` turns a loader's (train, val, test) example lists into a
:class:`~vlsparse.data.dataset.TaskData` with the loader's :class:`~vlsparse.data.options.LoadOptions`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlsparse.data.dataset import TaskData, VLDataset, VLExample
from vlsparse.data.objective import Objective
from vlsparse.data.options import LoadOptions
from vlsparse.data.visual.features import open_region_features
from vlsparse.data.visual.pixels import PixelImages

__all__ = ["data_root", "read_json", "read_jsonl", "find_images", "visual_inputs", "task_data", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def data_root(data_dir: str | os.PathLike | None, task: str) -> Path:
    """``data_dir`` as a Path; None or a missing directory -> FileNotFoundError naming the task."""
    if data_dir is None:
        raise FileNotFoundError(f"task {task!r} reads its data from --data-dir DIR (see README.md, 'Tasks')")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root}: not a directory (task {task!r})")
    return root


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected {what})")
    return path


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file. Missing -> FileNotFoundError; invalid -> ValueError; both name ``path`` and ``what``."""
    path = _require(Path(path), what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ValueError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); expected {what}") from None


def read_jsonl(path: str | os.PathLike, what: str) -> list[dict]:
    """Parse a JSON-lines file (one object per non-empty line); errors as :func:`read_json`, with the line number."""
    path = _require(Path(path), what)
    out = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line.decode("utf-8")))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); "
                                     f"expected {what}") from None
    return out


def find_images(directory: str | os.PathLike, keys: Iterable[Hashable]) -> dict[Hashable, Path]:
    """``key -> directory/<key><ext>`` for each key, ext in :data:`IMAGE_EXTENSIONS` (first that exists).

    Raises:
        FileNotFoundError: the directory or an image is missing (names the first few).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not found (expected the image files <image id>.jpg)")
    names = {p.stem: p for p in sorted(directory.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    found, missing = {}, []
    for k in keys:
        p = names.get(str(k))
        if p is None:
            missing.append(str(k))
        else:
            found[k] = p
    if missing:
        raise FileNotFoundError(f"{directory}: {len(missing)} images not found, e.g. {', '.join(missing[:3])} "
                                f"(expected <image id>{'|'.join(IMAGE_EXTENSIONS)})")
    return found


def visual_inputs(root: Path, keys: Iterable[Hashable], options: LoadOptions) -> tuple[Mapping, int | None]:
    """What the model reads about the images ``keys``: ``(mapping, region feature size D or None)``.

    ``options.visual="regions"``: the lazy region-feature store of ``root/features`` (nothing is read but its
    index, which is cached under ``options.cache_dir``); ``"pixels"``:
    :class:`~vlsparse.data.visual.pixels.PixelImages` of ``root/images`` resized to ``options.image_size``
    (a multiple of 32; None: :data:`~vlsparse.data.options.IMAGE_SIZE`).

    Raises:
        FileNotFoundError: no features / images, or some of ``keys`` missing (the message names them).
    """
    keys = sorted(set(keys), key=str)
    if options.visual == "pixels":
        return PixelImages(find_images(root / "images", keys), options.with_defaults().image_size), None
    store = open_region_features(root / "features", cache_dir=options.cache_dir)
    missing = [str(k) for k in keys if k not in store]
    if missing:
        raise FileNotFoundError(f"{root / 'features'}: no region features for {len(missing)} images, "
                                f"e.g. {', '.join(missing[:3])}")
    dim = store[keys[0]][0].shape[1] if keys else None
    return store, dim


def task_data(name: str, root: Path, splits: Sequence[list[VLExample]], answers: list[str],
              objective: Objective, tokenizer: Any, options: LoadOptions,
              boxes: Mapping[Hashable, np.ndarray] | None = None) -> TaskData:
    """A :class:`~vlsparse.data.dataset.TaskData` named ``name`` from the (train, val, test) example lists of
    a task read from ``root``: their images through :func:`visual_inputs` (region features of
    ``root/features``, not standardised, or ``root/images`` pixels), one
    :class:`~vlsparse.data.dataset.VLDataset` per split over ``answers`` (index = logit position; ``[]``
    for a region task) with ``objective``, texts of at most ``options.max_text_len`` tokens (None:
    :data:`~vlsparse.data.options.TEXT_LEN`).

    ``boxes``: image_id -> (N, 7) float32 candidate boxes ``[x1, y1, x2, y2, w, h, w*h]`` normalised,
    given to every VLDataset (a region task on pixels, e.g. RefCOCO+ with ViLT); None otherwise.

    Raises:
        FileNotFoundError: features / images missing for some example (names them).
        ValueError: an example whose image (or candidate boxes) is missing, ``max_text_len`` < 2, a region
            objective on pixels without ``boxes``, a bad ``image_size``.
    """
    options = options.with_defaults()
    keys = {k for examples in splits for e in examples for k in e.images}
    visuals, dim = visual_inputs(root, keys, options)
    train, val, test = (VLDataset(ex, visuals, tokenizer, answers, options.max_text_len, objective, boxes=boxes)
                        for ex in splits)
    processor = visuals.processor_config() if options.visual == "pixels" else None
    return TaskData(name, train, val, test, list(answers), region_feature_dim=dim, metric_name=objective.metric,
                    visual=options.visual, image_processor=processor, objective=objective)

