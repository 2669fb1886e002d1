"""RefCOCO+ (Yu et al., ECCV 2016, UNC splits): pick the image region a referring expression names.

On-disk layout (``--data-dir DIR``; the files of the refer API, lichengunc/refer, plus the common
``features/`` / ``images/`` of :mod:`vlsparse.data.formats`):

* ``DIR/refcoco+/refs(unc).p``: the refer API's pickle, a list of refs ``{"ref_id", "ann_id",
  "image_id", "split": "train"|"val"|"testA"|"testB", "sentences": [{"sent", "raw", ...}], ...}``
  (fields used: ``ann_id``, ``image_id``, ``split``, ``sentences[*].sent``). The file holds only
  dicts, lists, strings and numbers, so it is read with an unpickler that refuses every global
  (class, function): a pickle that names one is rejected before anything in it runs. If the pickle
  is absent, ``DIR/refcoco+/refs(unc).json`` with the same list is read instead.
* ``DIR/refcoco+/instances.json``: COCO format, ``"images": [{"id", "width", "height", ...}]`` and
  ``"annotations": [{"id", "image_id", "bbox": [x, y, w, h] (pixels), ...}]``.
* ``DIR/features/`` (``visual="regions"``) or ``DIR/images/`` (``visual="pixels"``), keyed
  ``f"COCO_train2014_{image_id:012d}"`` (RefCOCO+ images are all from COCO train2014).

Examples: one per sentence, ``VLExample(sent, key, {}, gt_box=(x1/W, y1/H, x2/W, y2/H))`` with the
box of the ref's annotation. Candidate regions: with ``visual="regions"`` the regions of the
feature file; with ``visual="pixels"`` (ViLT) the COCO annotation boxes of that image (the
"ground-truth detections" setting of MAttNet / UNITER's ``gt`` features), as (N, 7) float32
``[x1, y1, x2, y2, w, h, w*h]`` normalised (:func:`vlsparse.data.visual.features.box7`). Targets: (N,)
float32, the IoU of every candidate box with ``gt_box`` (computed by
:class:`~vlsparse.data.dataset.VLDataset`). Objective: ``region`` head (one logit per region), loss
cross-entropy toward the region of largest IoU, metric ``accuracy``: the arg-max region has
IoU >= 0.5 with the referred box (UNITER ``train_re.py``, MAttNet evaluation). No answer
vocabulary (``answers == []``).

Splits: the UNC split of each ref: train, val, and ``test_split`` ("testA": people, "testB": other
objects).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from vlsparse.data import formats
from vlsparse.data.dataset import TaskData, VLExample
from vlsparse.data.objective import Objective
from vlsparse.data.options import LoadOptions
from vlsparse.data.visual.features import box7

__all__ = ["load_refcoco_plus", "read_refs", "refcoco_image_key", "REFCOCO_OBJECTIVE", "TEST_SPLITS"]

REFCOCO_OBJECTIVE = Objective(head="region", loss="ce", metric="accuracy")
TEST_SPLITS = ("testA", "testB")
_REFS_WHAT = "the refer API's refs: a list of {ref_id, ann_id, image_id, split, sentences: [{sent}]}"


def refcoco_image_key(image_id: int) -> str:
    """The image key of COCO train2014 image ``image_id``: ``COCO_train2014_000000123456``."""
    return f"COCO_train2014_{int(image_id):012d}"


class _Refused(pickle.UnpicklingError):
    pass


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler for plain data: every global (class, function) is refused, so no code can run."""

    def find_class(self, module: str, name: str):
        raise _Refused(f"{module}.{name}")


def _load_plain_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, encoding="utf-8").load()
    except _Refused as e:
        raise ValueError(f"{path}: refused to unpickle the global {e} (this file must hold only dicts, lists, "
                         f"strings and numbers: {_REFS_WHAT})") from None
    except (pickle.PickleError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, MemoryError, OverflowError, RecursionError) as e:  # what bytes make the unpickler raise
        raise ValueError(f"{path}: not a valid pickle ({type(e).__name__}: {e}); expected {_REFS_WHAT}") from None


def read_refs(directory: str | os.PathLike) -> list[dict]:
    """The refs of ``directory/refs(unc).p`` (read with globals refused), or else of ``refs(unc).json``.

    Returns the list of ref dicts, each checked to have int ``ann_id`` and ``image_id``, ``split`` and
    ``sentences`` (a list of dicts with a string ``sent``).

    Raises:
        FileNotFoundError: neither file exists (naming both).
        ValueError: a pickle naming any class or function, an invalid file, or a malformed ref (the
            message names the file and the ref).
    """
    directory = Path(directory)
    path = directory / "refs(unc).p"
    if path.is_file():
        refs = _load_plain_pickle(path)
    elif (directory / "refs(unc).json").is_file():
        path = directory / "refs(unc).json"
        refs = formats.read_json(path, _REFS_WHAT)
    else:
        raise FileNotFoundError(f"{path}: not found, nor {directory / 'refs(unc).json'} (expected {_REFS_WHAT})")
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    for n, ref in enumerate(refs):
        ok = (isinstance(ref, dict) and {"ann_id", "image_id", "split", "sentences"} <= ref.keys()
              and isinstance(ref["ann_id"], int) and isinstance(ref["image_id"], int)
              and isinstance(ref["sentences"], list)
              and all(isinstance(s, dict) and isinstance(s.get("sent"), str) for s in ref["sentences"]))
        if not ok:
            raise ValueError(f"{path}: ref #{n} ({str(ref)[:80]}): expected {_REFS_WHAT}")
    return refs


def _instances(path: Path) -> tuple[dict[int, dict], dict[int, dict], dict[int, list[dict]]]:
    """(image id -> image, annotation id -> annotation, image id -> its annotations) of a COCO file."""
    coco = formats.read_json(path, "COCO instances: images [{id, width, height}], annotations [{id, image_id, bbox}]")
    try:
        images = {int(im["id"]): im for im in coco["images"]}
        anns = {int(a["id"]): a for a in coco["annotations"]}
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            if len(a["bbox"]) != 4:
                raise ValueError(f"annotation {a['id']}: bbox must be [x, y, w, h]")
            _xyxy(a["bbox"])  # numbers
            by_image.setdefault(int(a["image_id"]), []).append(a)
        for im in images.values():
            if not (float(im["width"]) > 0 and float(im["height"]) > 0):
                raise ValueError(f"image {im['id']}: width and height must be positive")
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: float() of a huge integer
        raise ValueError(f"{path}: malformed COCO instances ({type(e).__name__}: {e})") from None
    return images, anns, by_image


def _xyxy(bbox) -> np.ndarray:
    x, y, w, h = (float(v) for v in bbox)
    return np.array([x, y, x + w, y + h])


def load_refcoco_plus(tokenizer: Any, options: LoadOptions = LoadOptions(), *,
                      test_split: str = "testA") -> TaskData:
    """Load RefCOCO+ (UNC) from ``options.data_dir`` as a :class:`~vlsparse.data.dataset.TaskData` named
    "refcoco+".

    Reads ``refcoco+/refs(unc).p`` (or ``refs(unc).json``) and ``refcoco+/instances.json`` (see the
    module docstring). Splits: the refs' own train / val / ``test_split`` ("testA" or "testB");
    ``options.val_fraction`` and ``options.seed`` are unused (RefCOCO+ ships a val split). Items hold
    ``input_ids`` (L,) int64, the candidate regions (``img_pos`` (N, 7) float32, ``img_mask`` (N,) int64,
    with ``img_feat`` (N, D) or ``pixel_values`` (3, H, W) float32) and ``targets`` (N,) float32 IoUs with
    the referred box.

    Raises:
        FileNotFoundError: ``data_dir`` None or missing, the refs file (naming both names) or
            ``instances.json`` missing, no features/images for some image.
        ValueError: ``test_split`` not "testA"/"testB", a refs pickle naming any class or function, a ref
            whose annotation or image is not in ``instances.json``.
    """
    if test_split not in TEST_SPLITS:
        raise ValueError(f"test_split must be one of {', '.join(TEST_SPLITS)}, got {test_split!r}")
    root = formats.data_root(options.data_dir, "refcoco+")
    refs = read_refs(root / "refcoco+")
    inst_path = root / "refcoco+" / "instances.json"
    images, anns, by_image = _instances(inst_path)
    splits: dict[str, list[VLExample]] = {"train": [], "val": [], test_split: []}
    image_of: dict[str, int] = {}  # image key -> COCO image id
    for ref in refs:
        if ref["split"] not in splits:
            continue
        ann, image = anns.get(ref["ann_id"]), images.get(ref["image_id"])
        if ann is None or image is None:
            raise ValueError(f"{inst_path}: no annotation {ref['ann_id']} or no image {ref['image_id']} "
                             f"(ref {ref.get('ref_id', '?')})")
        w, h = float(image["width"]), float(image["height"])
        gt_box = tuple(float(v) for v in _xyxy(ann["bbox"]) / np.array([w, h, w, h]))
        key = refcoco_image_key(ref["image_id"])
        image_of[key] = ref["image_id"]
        splits[ref["split"]].extend(VLExample(s["sent"], key, {}, gt_box=gt_box) for s in ref["sentences"])
    boxes = None
    # ViLT has no detector regions: the image's COCO annotation boxes are the candidates
    if options.visual == "pixels":
        boxes = {key: box7(np.stack([_xyxy(a["bbox"]) for a in by_image[i]]),
                           float(images[i]["width"]), float(images[i]["height"])) for key, i in image_of.items()}
    return formats.task_data("refcoco+", root, [splits[s] for s in ("train", "val", test_split)], [],
                             REFCOCO_OBJECTIVE, tokenizer, options, boxes=boxes)
