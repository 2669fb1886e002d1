"""Region features from the on-disk formats UNITER and LXMERT users have, read lazily.

Each reader is a read-only ``Mapping`` from image id (str) to ``(features, boxes)``:
``features`` (N, D) float32 region features and ``boxes`` (N, 7) float32 in UNITER's
``norm_bb`` layout ``[x1, y1, x2, y2, w, h, w*h]`` normalised by the image size (see
:func:`box7`).  Only an index is held in memory; a lookup reads one image from disk.

* :class:`TSVFeatures`: bottom-up-attention TSV files, one image per line (LXMERT's
  ``*_obj36.tsv``, read by ``load_obj_tsv`` in airsplay/lxmert ``src/utils.py``; and the
  6-field files of peteanderson80/bottom-up-attention ``tools/generate_tsv.py``).
* :class:`NpzFeatures`: a directory of per-image ``.npz`` files (UNITER's detector output,
  the input of its ``scripts/convert_imgdir.py``; file stem = image id).
* :class:`RegionStore` / :func:`open_region_features`: several stores as one mapping.

LXMERT itself feeds 4-d boxes ``x1/w, y1/h, x2/w, y2/h``: that is ``boxes[:, :4]``.
Not done here: UNITER's confidence-based truncation of the regions (``conf > 0.2``,
clamped to 10..100 boxes, in ``convert_imgdir.py``); the ``.npz`` readers return every
region in the file.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from vlsparse.atomic import atomic_write
from vlsparse.data.visual.regions import default_cache_dir
from vlsparse.data.visual.tsv_index import index_path, tsv_index

__all__ = [
    "box7",
    "TSVFeatures",
    "NpzFeatures",
    "RegionStore",
    "open_region_features",
    "write_tsv",
    "write_npz",
    "LXMERT_FIELDS",
    "BOTTOM_UP_FIELDS",
]

#: LXMERT's TSV columns (airsplay/lxmert src/utils.py FIELDNAMES).
LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features")
#: bottom-up-attention's TSV columns (tools/generate_tsv.py FIELDNAMES): note width before height.
BOTTOM_UP_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
# field count -> (position of height, width, num_boxes, boxes, features)
_LAYOUTS = {len(LXMERT_FIELDS): (1, 2, 7, 8, 9), len(BOTTOM_UP_FIELDS): (2, 1, 3, 4, 5)}
_TSV_NAME = re.compile(r".*\.tsv(\.\d+)?$")  # x.tsv, and split files x.tsv.0, x.tsv.1 (bottom-up releases)


def box7(boxes_xyxy: np.ndarray, img_w: float, img_h: float) -> np.ndarray:
    """Pixel boxes to UNITER's normalised 7-d boxes.

    Args:
        boxes_xyxy: (N, 4) pixel corners ``x1, y1, x2, y2`` (any real dtype).
        img_w, img_h: image width and height in pixels (> 0).

    Returns:
        (N, 7) float32 ``[x1/w, y1/h, x2/w, y2/h, bw, bh, bw*bh]`` where the four corners are
        clipped to [0, 1] first and ``bw = x2 - x1``, ``bh = y2 - y1`` (clipped at 0), so every
        value lies in [0, 1] (UNITER's ``norm_bb`` plus the area it appends in ``_get_img_feat``).

    Raises:
        ValueError: ``boxes_xyxy`` not (N, 4), or a non-positive image size.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes_xyxy: expected an (N, 4) array, got shape {b.shape}")
    if not (img_w > 0 and img_h > 0):
        raise ValueError(f"img_w, img_h: expected positive image size, got {img_w} x {img_h}")
    xyxy = np.clip(b / np.array([img_w, img_h, img_w, img_h]), 0.0, 1.0)
    wh = np.clip(xyxy[:, 2:] - xyxy[:, :2], 0.0, 1.0)
    return np.concatenate([xyxy, wh, wh[:, :1] * wh[:, 1:]], axis=1).astype(np.float32)


def _decode(field: bytes, dtype: str, what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(field)
    except binascii.Error as e:
        raise ValueError(f"{what}: bad base64 ({e})") from None
    if len(raw) % np.dtype(dtype).itemsize:
        raise ValueError(f"{what}: {len(raw)} bytes is not a whole number of {dtype}")
    return np.frombuffer(raw, dtype=dtype)


@np.errstate(over="ignore", invalid="ignore", divide="ignore")  # values that overflow float32 are refused as Inf
def _parse_tsv_line(line: bytes, path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """One TSV line -> (img_id, features (N, D) float32, boxes (N, 7) float32)."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    img_id = fields[0].decode("utf-8", "replace")
    where = f"{path}: image {img_id!r}"
    layout = _LAYOUTS.get(len(fields))
    if layout is None:
        raise ValueError(f"{where}: {len(fields)} tab-separated fields, expected {len(LXMERT_FIELDS)} "
                         f"(LXMERT) or {len(BOTTOM_UP_FIELDS)} (bottom-up-attention)")
    i_h, i_w, i_n, i_box, i_feat = layout
    try:
        img_h, img_w, n = float(fields[i_h]), float(fields[i_w]), int(fields[i_n])
    except ValueError:
        raise ValueError(f"{where}: img_h/img_w/num_boxes not numbers: "
                         f"{fields[i_h][:20]!r} {fields[i_w][:20]!r} {fields[i_n][:20]!r}") from None
    if n < 1:
        raise ValueError(f"{where}: num_boxes must be >= 1, got {n}")
    boxes = _decode(fields[i_box], "<f4", f"{where} boxes")
    feats = _decode(fields[i_feat], "<f4", f"{where} features")
    if boxes.size != 4 * n:
        raise ValueError(f"{where}: boxes hold {boxes.size} floats, expected num_boxes * 4 = {4 * n}")
    if feats.size == 0 or feats.size % n:
        raise ValueError(f"{where}: features hold {feats.size} floats, not a positive multiple of num_boxes = {n}")
    try:
        b7 = box7(boxes.reshape(n, 4), img_w, img_h)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return (img_id, *_finite(feats.reshape(n, -1).astype(np.float32), b7, where))


def _finite(feats: np.ndarray, boxes: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(feats, boxes)``; ValueError naming ``where`` when either holds NaN or Inf (training would diverge)."""
    if not (np.isfinite(feats).all() and np.isfinite(boxes).all()):
        raise ValueError(f"{where}: region features or boxes hold NaN or Inf")
    return feats, boxes


#: the most bytes the arrays of one .npz may take once decompressed (a zip bomb is refused before reading)
MAX_NPZ_BYTES = 2**30


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one .npz file, each of real numbers (bool, int or float).

    Raises:
        ValueError: not an .npz archive (or an .npy), more than :data:`MAX_NPZ_BYTES` decompressed, an array
            of another dtype (complex, str, object), or any read error (naming the file).
    """
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            if sum(i.file_size for i in z.zip.infolist()) > MAX_NPZ_BYTES:
                raise ValueError(f"more than {MAX_NPZ_BYTES} bytes decompressed")
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, MemoryError, NotImplementedError, zlib.error,
            AttributeError, TypeError) as e:  # AttributeError/TypeError: np.load gave an .npy array, no archive
        raise ValueError(f"{path}: cannot read .npz: {type(e).__name__}: {str(e)[:200]}") from None
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{path}: array {k!r} has dtype {a.dtype}, expected real numbers")
    return arrays


class _IndexedFeatures(Mapping):
    """A lazily read feature mapping over an index ``self._index`` (image id -> where its record is)."""

    _index: dict
    _feature_dim: int | None = None

    def _empty(self) -> str:
        raise NotImplementedError

    def __contains__(self, img_id: object) -> bool:
        return img_id in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def feature_dim(self) -> int:
        """D, read from the first record; ValueError when there is none."""
        if self._feature_dim is None:
            if not self._index:
                raise ValueError(self._empty())
            self._feature_dim = int(self[next(iter(self._index))][0].shape[1])
        return self._feature_dim


class TSVFeatures(_IndexedFeatures):
    """Region features in bottom-up-attention TSV files, one image per line, read lazily.

    Format: tab-separated, no header, ``boxes`` = base64 of float32 (num_boxes, 4) pixel
    ``x1, y1, x2, y2``, ``features`` = base64 of float32 (num_boxes, D).  The layout is
    detected per line by its number of fields: 10 = :data:`LXMERT_FIELDS` (airsplay/lxmert
    ``load_obj_tsv``; objects/attrs ids and confidences are ignored) or 6 =
    :data:`BOTTOM_UP_FIELDS` (bottom-up-attention ``generate_tsv.py``, which writes
    ``image_w`` before ``image_h``).

    ``self[img_id]`` -> ``(features (N, D) float32, boxes (N, 7) float32)`` (boxes via
    :func:`box7`), read by seeking to that one line.  The index (img_id -> file number, byte
    offset) comes from one pass over each file, cached per file under ``cache_dir``
    (:mod:`vlsparse.data.visual.tsv_index`).  Keys are str; a duplicated id maps to its last
    line (across files: the later file).

    Args:
        paths: one TSV file or a sequence of them.
        cache_dir: default :func:`vlsparse.data.visual.regions.default_cache_dir`.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: no paths; a line without an id (naming file and line number);
            on lookup, a malformed line (naming file and image id).
        KeyError: lookup of an id in no file (naming the id and the files).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p).expanduser().resolve() for p in paths]
        if not self.paths:
            raise ValueError("paths: expected at least one TSV file")
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such TSV file")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self._index: dict[str, tuple[int, int]] = {}
        for fileno, p in enumerate(self.paths):
            for img_id, offset in tsv_index(p, self.cache_dir).items():
                self._index[img_id] = (fileno, offset)  # a later file's line wins
        self._feature_dim: int | None = None

    def index_path(self, path: str | os.PathLike) -> Path:
        """Where the cached index of one TSV file lives (changes with its size and mtime)."""
        return index_path(path, self.cache_dir)

    def __getitem__(self, img_id: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            fileno, offset = self._index[img_id]
        except KeyError:
            raise KeyError(f"image id {img_id!r} not in {', '.join(map(str, self.paths))}") from None
        path = self.paths[fileno]
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        found, feats, boxes = _parse_tsv_line(line, path)
        if found != img_id:
            raise ValueError(f"{path}: index out of date: byte {offset} holds image {found!r}, not {img_id!r}; "
                             f"delete {self.index_path(path)}")
        return feats, boxes

    def _empty(self) -> str:
        return f"{', '.join(map(str, self.paths))}: no records"

    def __repr__(self) -> str:
        return f"TSVFeatures({[str(p) for p in self.paths]}, {len(self)} images)"


class NpzFeatures(_IndexedFeatures):
    """A directory of per-image ``.npz`` files (file stem = image id), read lazily.

    Each file holds ``features`` (N, D) float16/float32 and either ``norm_bb`` (N, 7)
    normalised boxes (UNITER), ``norm_bb`` (N, 6) ``x1, y1, x2, y2, w, h`` (UNITER's stored
    layout; ``w*h`` is appended as UNITER's ``_get_img_feat`` does), or ``boxes`` (N, 4) pixel
    ``x1, y1, x2, y2`` with scalar ``img_h``, ``img_w`` (normalised with :func:`box7`).  Other
    keys (``conf``, ``soft_labels``) are ignored.

    ``self[img_id]`` loads that file only (``np.load(allow_pickle=False)``) and returns
    ``(features (N, D) float32, boxes (N, 7) float32)``.  The index ``{stem: path}`` comes
    from one ``os.scandir`` (non-recursive).

    Raises:
        FileNotFoundError: ``directory`` missing or not a directory.
        KeyError: lookup of an id with no file (naming the id and the directory).
        ValueError: on lookup, an unreadable file, one with no ``features`` or neither
            ``norm_bb`` nor ``boxes`` + ``img_h`` + ``img_w`` (naming the file and its keys),
            or mismatched shapes.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser().resolve()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no such directory")
        with os.scandir(self.directory) as it:
            self._index = {e.name[:-4]: Path(e.path) for e in it if e.name.endswith(".npz") and e.is_file()}
        self._feature_dim: int | None = None

    @np.errstate(over="ignore", invalid="ignore", divide="ignore")  # values that overflow float32 are refused as Inf
    def __getitem__(self, img_id: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            path = self._index[img_id]
        except KeyError:
            raise KeyError(f"image id {img_id!r}: no {img_id}.npz in {self.directory}") from None
        arrays = _read_npz(path)
        keys = ", ".join(sorted(arrays)) or "none"
        feats = arrays.get("features")
        if feats is None or feats.ndim != 2 or 0 in feats.shape:
            raise ValueError(f"{path}: expected `features` (N, D); keys: {keys}")
        if "norm_bb" in arrays:
            nb = arrays["norm_bb"].astype(np.float32)
            if nb.ndim != 2 or nb.shape[1] not in (6, 7):
                raise ValueError(f"{path}: norm_bb must be (N, 6) or (N, 7), got shape {nb.shape}")
            boxes = nb if nb.shape[1] == 7 else np.concatenate([nb, nb[:, 4:5] * nb[:, 5:6]], axis=1)
        elif {"boxes", "img_h", "img_w"} <= arrays.keys():
            try:
                boxes = box7(arrays["boxes"], float(arrays["img_w"]), float(arrays["img_h"]))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: {e}") from None
        else:
            raise ValueError(f"{path}: expected `norm_bb`, or `boxes` + `img_h` + `img_w`; keys: {keys}")
        if boxes.shape[0] != feats.shape[0]:
            raise ValueError(f"{path}: {feats.shape[0]} feature rows but {boxes.shape[0]} boxes")
        return _finite(feats.astype(np.float32), boxes, str(path))

    def _empty(self) -> str:
        return f"{self.directory}: no .npz files"

    def __repr__(self) -> str:
        return f"NpzFeatures({str(self.directory)!r}, {len(self)} images)"


class RegionStore(Mapping):
    """Several region-feature mappings as one (first store that has the key wins).

    Lookup tries ``key``, then ``str(key)``, then ``str(key).lower()`` (each against every
    store in order before the next form), so int ids and upper-case ids find str keys.
    Missing -> KeyError naming the key and the stores.
    """

    def __init__(self, stores: Sequence[Mapping]):
        self.stores = list(stores)

    def _find(self, key) -> tuple[Mapping, object] | None:
        for k in dict.fromkeys((key, str(key), str(key).lower())):
            for store in self.stores:
                if k in store:
                    return store, k
        return None

    def __getitem__(self, key) -> tuple[np.ndarray, np.ndarray]:
        hit = self._find(key)
        if hit is None:
            raise KeyError(f"image id {key!r} not in {', '.join(map(repr, self.stores)) or 'no stores'}")
        store, k = hit
        return store[k]

    def __contains__(self, key: object) -> bool:
        return self._find(key) is not None

    def __iter__(self) -> Iterator:
        return iter(dict.fromkeys(k for s in self.stores for k in s))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @property
    def feature_dim(self) -> int:
        """D shared by all stores; ValueError when they disagree or there are none."""
        dims = {int(s.feature_dim) if hasattr(s, "feature_dim") else next(iter(s.values()))[0].shape[1]
                for s in self.stores if len(s)}
        if len(dims) != 1:
            raise ValueError(f"region stores: expected one feature size, got {sorted(dims) or 'no records'}")
        return dims.pop()

    def __repr__(self) -> str:
        return f"RegionStore({self.stores!r})"


def open_region_features(directory: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> RegionStore:
    """All region features directly under ``directory`` (non-recursive) as one mapping.

    Every ``*.tsv`` file (also bottom-up-attention's split files ``*.tsv.0``, ``*.tsv.1``, ...),
    in name order, becomes one :class:`TSVFeatures`, and the ``*.npz`` files one
    :class:`NpzFeatures`; TSV records win over .npz files with the same id.

    Raises:
        FileNotFoundError: ``directory`` missing or not a directory, or holding neither kind.
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such directory")
    tsvs = sorted(p for p in d.iterdir() if _TSV_NAME.fullmatch(p.name) and p.is_file())
    stores: list[Mapping] = [TSVFeatures(tsvs, cache_dir=cache_dir)] if tsvs else []
    npz = NpzFeatures(d)
    if len(npz):
        stores.append(npz)
    if not stores:
        raise FileNotFoundError(f"{d}: no region features (*.tsv bottom-up-attention files or per-image *.npz files)")
    return RegionStore(stores)


def _b64(a: np.ndarray, dtype: str) -> bytes:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes())


def write_tsv(path: str | os.PathLike, records: Iterable[tuple[str, int, int, np.ndarray, np.ndarray]],
              layout: str = "lxmert") -> None:
    """Write region features as a bottom-up-attention TSV (atomically); for fixtures and conversion.

    Args:
        records: ``(img_id, img_h, img_w, boxes, features)`` with ``boxes`` (N, 4) pixel
            ``x1, y1, x2, y2`` and ``features`` (N, D), both stored as float32.
        layout: "lxmert" (:data:`LXMERT_FIELDS`; objects/attrs ids zeros int64, confidences
            ones float32) or "bottom-up" (:data:`BOTTOM_UP_FIELDS`, width before height).

    Raises:
        ValueError: unknown layout, an id with a tab/newline or empty, bad shapes.
    """
    if layout not in ("lxmert", "bottom-up"):
        raise ValueError(f"layout: expected 'lxmert' or 'bottom-up', got {layout!r}")
    lines = []
    for img_id, img_h, img_w, boxes, feats in records:
        img_id = str(img_id)
        if not img_id or any(c in img_id for c in "\t\r\n"):
            raise ValueError(f"records: image id {img_id!r} must be non-empty without tabs or newlines")
        boxes, feats = np.asarray(boxes), np.asarray(feats)
        n = boxes.shape[0] if boxes.ndim == 2 else -1
        if boxes.ndim != 2 or boxes.shape[1] != 4 or feats.ndim != 2 or feats.shape[0] != n or n < 1:
            raise ValueError(f"records: image {img_id!r}: expected boxes (N, 4) and features (N, D) with N >= 1, "
                             f"got {boxes.shape} and {feats.shape}")
        h, w, nb = str(int(img_h)).encode(), str(int(img_w)).encode(), str(n).encode()
        if layout == "lxmert":
            ids, conf = _b64(np.zeros(n), "<i8"), _b64(np.ones(n), "<f4")
            fields = [img_id.encode(), h, w, ids, conf, ids, conf, nb, _b64(boxes, "<f4"), _b64(feats, "<f4")]
        else:
            fields = [img_id.encode(), w, h, nb, _b64(boxes, "<f4"), _b64(feats, "<f4")]
        lines.append(b"\t".join(fields) + b"\n")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"".join(lines)))


def write_npz(path: str | os.PathLike, features: np.ndarray, boxes_xyxy: np.ndarray | None = None,
              img_h: float | None = None, img_w: float | None = None, norm_bb: np.ndarray | None = None) -> None:
    """Write one image's regions as an ``.npz`` that :class:`NpzFeatures` reads (atomically).

    ``features`` (N, D) is stored with its dtype (float16 as UNITER does, or float32), plus
    either ``norm_bb`` (N, 6 or 7) or ``boxes`` (N, 4 pixels) with scalar ``img_h``, ``img_w``.

    Raises:
        ValueError: both or neither box forms given.
    """
    has_px = boxes_xyxy is not None
    if has_px == (norm_bb is not None) or has_px != (img_h is not None and img_w is not None):
        raise ValueError("write_npz: give either norm_bb, or boxes_xyxy with img_h and img_w")
    arrays = {"features": np.asarray(features)}
    if has_px:
        arrays.update(boxes=np.asarray(boxes_xyxy, dtype=np.float32), img_h=np.asarray(img_h), img_w=np.asarray(img_w))
    else:
        arrays["norm_bb"] = np.asarray(norm_bb, dtype=np.float32)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, **arrays)

    atomic_write(path, write)
