"""Deterministic region features: a stand-in for UNITER's bottom-up detector g_bu.

UNITER (Chen et al., 2020; used by Gan et al., AAAI 2022, section "Backbones") feeds the
transformer a set of image regions from a Faster R-CNN ("bottom-up") detector: one feature
vector per region plus a 7-d box ``[x1, y1, x2, y2, w, h, w*h]`` normalised by the image
size.  No detector or detector features are available offline, so this module builds
regions from the pixels with a fixed, documented procedure that works on synthetic scenes
of one coloured object on a flat background (easy-VQA):

1. background colour = the most common RGB colour of the image (ties: smallest packed
   ``R<<16 | G<<8 | B`` value);
2. foreground = pixels whose largest per-channel absolute difference from the background
   is greater than :data:`FOREGROUND_THRESHOLD` (60);
3. object proposal = the largest 8-connected component of the foreground
   (``scipy.ndimage.label``; ties: lowest label, i.e. first in raster order).  An image
   without foreground has an empty object.

Regions (always :data:`NUM_REGIONS` = 6, in this order): the object box, the 2x2 grid
cells (top-left, top-right, bottom-left, bottom-right) and the whole image.  The object
region of an image with an empty object gets an all-zero box.

Per region, the feature vector (:data:`REGION_FEATURE_DIM` = 294 float32 values) is the
concatenation of

* ``silhouette`` (256): the object mask inside the region box, area-averaged onto a 16x16
  grid (so each value is the fraction of object pixels in that cell);
* ``mean_rgb`` (3): mean RGB of the object pixels inside the region, in [0, 1] (zeros
  when the region holds no object pixel);
* ``fill`` (1): fraction of the region box covered by object pixels;
* ``box`` (7): the region box (the same values as the returned ``boxes`` row);
* ``hist`` (27): colour histogram of all pixels in the region, 3 levels per channel
  (level = ``value * 3 // 256``, bin = ``9 * r + 3 * g + b``), normalised to sum 1.

Boxes use pixel edges: an object covering pixel columns ``c0..c1`` (inclusive) has
``x1 = c0 / W`` and ``x2 = (c1 + 1) / W``.

:class:`RegionFeatureCache` extracts the features for a list of image files and keeps them
on disk as one ``.npz`` file per image set, keyed by :data:`EXTRACTOR_VERSION` and the file
list (path and size of every file), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "EXTRACTOR_VERSION",
    "FOREGROUND_THRESHOLD",
    "NUM_REGIONS",
    "SILHOUETTE_SIZE",
    "REGION_FEATURE_DIM",
    "FEATURE_SLICES",
    "REGION_NAMES",
    "background_colour",
    "foreground_object",
    "extract_regions",
    "load_image",
    "default_cache_dir",
    "RegionFeatureCache",
]

#: Bump whenever the features change: it is part of the cache key.
EXTRACTOR_VERSION = "easy-regions-v1"
#: A pixel is foreground when max_c |pixel_c - background_c| > this.
FOREGROUND_THRESHOLD = 60
#: Regions per image: object box, 2x2 grid cells, whole image.
NUM_REGIONS = 6
REGION_NAMES = ("object", "grid_tl", "grid_tr", "grid_bl", "grid_br", "image")
SILHOUETTE_SIZE = 16
_HIST_LEVELS = 3

_sizes = {
    "silhouette": SILHOUETTE_SIZE * SILHOUETTE_SIZE,
    "mean_rgb": 3,
    "fill": 1,
    "box": 7,
    "hist": _HIST_LEVELS**3,
}
#: Where each part sits inside a region feature vector.
FEATURE_SLICES: dict[str, slice] = {}
_off = 0
for _name, _n in _sizes.items():
    FEATURE_SLICES[_name] = slice(_off, _off + _n)
    _off += _n
#: Length of one region feature vector (294).
REGION_FEATURE_DIM = _off
del _name, _n, _off, _sizes

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    return image


def background_colour(image: np.ndarray) -> np.ndarray:
    """The most common RGB colour of an (H, W, 3) uint8 image, as a (3,) uint8 array."""
    image = _check_image(image)
    packed = (
        (image[..., 0].astype(np.int32) << 16)
        | (image[..., 1].astype(np.int32) << 8)
        | image[..., 2].astype(np.int32)
    ).ravel()
    values, counts = np.unique(packed, return_counts=True)
    v = int(values[np.argmax(counts)])  # argmax: first maximum -> smallest packed value
    return np.array([(v >> 16) & 255, (v >> 8) & 255, v & 255], dtype=np.uint8)


def foreground_object(image: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of the object proposal: the largest 8-connected foreground
    component (all False when the image has no foreground)."""
    image = _check_image(image)
    bg = background_colour(image).astype(np.int16)
    diff = np.abs(image.astype(np.int16) - bg).max(axis=2)
    fg = diff > FOREGROUND_THRESHOLD
    if not fg.any():
        return fg
    labels, n = ndimage.label(fg, structure=_EIGHT_CONNECTED)
    if n == 1:
        return fg
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _box7(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    w, h = x2 - x1, y2 - y1
    return np.array([x1, y1, x2, y2, w, h, w * h], dtype=np.float32)


def _cell_edges(lo: int, hi: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Start/stop pixel indices of n cells tiling [lo, hi); every cell gets >= 1 pixel."""
    t = lo + (hi - lo) * np.arange(n + 1) / n
    starts = np.minimum(np.floor(t[:-1]).astype(np.int64), hi - 1)
    stops = np.maximum(np.ceil(t[1:]).astype(np.int64), starts + 1)
    return starts, stops


def _region_feature(
    image: np.ndarray,
    obj: np.ndarray,
    sat: np.ndarray,
    bins: np.ndarray,
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    box: np.ndarray,
) -> np.ndarray:
    """Feature of the pixel rectangle rows [r0, r1) x cols [c0, c1) (non-empty)."""
    out = np.zeros(REGION_FEATURE_DIM, dtype=np.float32)
    # silhouette: area average of the object mask on a 16x16 grid, via the summed-area table
    rs, re = _cell_edges(r0, r1, SILHOUETTE_SIZE)
    cs, ce = _cell_edges(c0, c1, SILHOUETTE_SIZE)
    sums = sat[re][:, ce] - sat[rs][:, ce] - sat[re][:, cs] + sat[rs][:, cs]
    area = (re - rs)[:, None] * (ce - cs)[None, :]
    out[FEATURE_SLICES["silhouette"]] = (sums / area).ravel()
    # object pixels in the region
    m = obj[r0:r1, c0:c1]
    n_obj = int(m.sum())
    if n_obj:
        out[FEATURE_SLICES["mean_rgb"]] = image[r0:r1, c0:c1][m].mean(axis=0) / 255.0
    out[FEATURE_SLICES["fill"]] = n_obj / float((r1 - r0) * (c1 - c0))
    out[FEATURE_SLICES["box"]] = box
    hist = np.bincount(bins[r0:r1, c0:c1].ravel(), minlength=_HIST_LEVELS**3)
    out[FEATURE_SLICES["hist"]] = hist / hist.sum()
    return out


def extract_regions(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region features of one image.

    Args:
        image: (H, W, 3) uint8 RGB array.

    Returns:
        ``(features, boxes)``: ``features`` is (NUM_REGIONS, REGION_FEATURE_DIM) float32,
        ``boxes`` is (NUM_REGIONS, 7) float32 in UNITER's format
        ``[x1, y1, x2, y2, w, h, w*h]`` normalised to [0, 1].  Region order:
        :data:`REGION_NAMES` (object, 2x2 grid in raster order, whole image).
    """
    image = _check_image(image)
    H, W = image.shape[:2]
    obj = foreground_object(image)
    sat = np.zeros((H + 1, W + 1), dtype=np.int64)
    sat[1:, 1:] = obj.cumsum(axis=0).cumsum(axis=1)
    q = (image.astype(np.int32) * _HIST_LEVELS) // 256
    bins = q[..., 0] * _HIST_LEVELS**2 + q[..., 1] * _HIST_LEVELS + q[..., 2]

    features = np.zeros((NUM_REGIONS, REGION_FEATURE_DIM), dtype=np.float32)
    boxes = np.zeros((NUM_REGIONS, 7), dtype=np.float32)

    # 0: object box (all zeros when there is no object)
    if obj.any():
        rows = np.flatnonzero(obj.any(axis=1))
        cols = np.flatnonzero(obj.any(axis=0))
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        boxes[0] = _box7(c0 / W, r0 / H, c1 / W, r1 / H)
        features[0] = _region_feature(image, obj, sat, bins, r0, r1, c0, c1, boxes[0])

    # 1-4: 2x2 grid, 5: whole image
    hr, hc = max(H // 2, 1), max(W // 2, 1)
    rects = [(0, hr, 0, hc), (0, hr, hc, W), (hr, H, 0, hc), (hr, H, hc, W), (0, H, 0, W)]
    for i, (r0, r1, c0, c1) in enumerate(rects, start=1):
        if r1 <= r0 or c1 <= c0:  # 1-pixel-wide image: the second half is empty
            continue
        boxes[i] = _box7(c0 / W, r0 / H, c1 / W, r1 / H)
        features[i] = _region_feature(image, obj, sat, bins, r0, r1, c0, c1, boxes[i])
    return features, boxes


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; any failure -> ValueError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"cannot read image {os.fspath(path)!s}: {e}") from e
    return arr


def default_cache_dir() -> Path:
    """``$VLSPARSE_CACHE`` if set, else ``~/.cache/vlsparse``."""
    env = os.environ.get("VLSPARSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlsparse"


class RegionFeatureCache:
    """Region features for sets of image files, cached on disk (one ``.npz`` per set).

    The cache file lives in ``<cache_dir>/regions/<name>-<key>.npz`` where ``key`` hashes
    :data:`EXTRACTOR_VERSION`, :data:`REGION_FEATURE_DIM` and, for every file in order, its
    absolute path and size.  It holds ``features`` (M, N, D) float32, ``boxes`` (M, N, 7)
    float32 and ``paths`` (M,) str.  Files are written to a temporary file in the same
    directory and moved into place with ``os.replace`` (atomic), so a crash never leaves a
    partial cache; an unreadable cache file is recomputed.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.region_dir = self.cache_dir / "regions"

    @staticmethod
    def key(paths: Sequence[str | os.PathLike]) -> str:
        """Cache key: hash of the extractor version and every file's absolute path and size."""
        h = hashlib.sha256()
        h.update(json.dumps([EXTRACTOR_VERSION, REGION_FEATURE_DIM, NUM_REGIONS]).encode())
        for p in paths:
            p = os.path.abspath(p)
            try:
                size = os.stat(p).st_size
            except OSError as e:
                raise ValueError(f"cannot read image {p}: {e}") from e
            h.update(f"\0{p}\0{size}".encode())
        return h.hexdigest()[:20]

    def path_for(self, paths: Sequence[str | os.PathLike], name: str = "images") -> Path:
        """Where the cache file for this file list lives."""
        return self.region_dir / f"{name}-{self.key(paths)}.npz"

    @staticmethod
    def extract(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
        """Extract without caching: (M, N, D) features and (M, N, 7) boxes."""
        feats = np.zeros((len(paths), NUM_REGIONS, REGION_FEATURE_DIM), dtype=np.float32)
        boxes = np.zeros((len(paths), NUM_REGIONS, 7), dtype=np.float32)
        for i, p in enumerate(paths):
            feats[i], boxes[i] = extract_regions(load_image(p))
        return feats, boxes

    def load(
        self, paths: Sequence[str | os.PathLike], name: str = "images"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features and boxes for ``paths`` (in that order), from the cache when possible."""
        if not name or any(c in name for c in "/\\\0"):
            raise ValueError(f"bad cache name {name!r}")
        resolved = [os.path.abspath(p) for p in paths]
        target = self.path_for(resolved, name)
        if target.exists():
            try:
                with np.load(target, allow_pickle=False) as z:
                    feats, boxes, stored = z["features"], z["boxes"], z["paths"]
                if (
                    feats.shape == (len(paths), NUM_REGIONS, REGION_FEATURE_DIM)
                    and boxes.shape == (len(paths), NUM_REGIONS, 7)
                    and stored.tolist() == resolved
                ):
                    return feats, boxes
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                pass  # corrupt or foreign file: recompute and overwrite
        feats, boxes = self.extract(resolved)
        self._write(target, feats, boxes, resolved)
        return feats, boxes

    @staticmethod
    def _write(target: Path, feats: np.ndarray, boxes: np.ndarray, resolved: list[str]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, features=feats, boxes=boxes, paths=np.array(resolved, dtype=str))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
