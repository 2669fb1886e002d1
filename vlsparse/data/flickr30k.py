"""Flickr30k image-text retrieval (Young et al., TACL 2014), Karpathy & Fei-Fei's split (CVPR 2015).

Training is image-text matching with sampled negatives: each caption is scored with its own image
and ``negatives`` other train images by the ``rank`` head, and the loss is the cross-entropy toward
the own image, which comes first (UNITER's ``ItmRankDataset``: ground truth first, then
``neg_sample_size`` random negatives; ViLT's retrieval fine-tuning likewise trains one positive
among 1 + k candidates with cross-entropy). Validation and test score every caption against every
image (:class:`~vlsparse.data.dataset.RetrievalSet`: IR and TR recall@1/5/10, UNITER's ``itm_eval``).
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from vlsparse.data import formats
from vlsparse.data.dataset import RetrievalSet, TaskData, VLDataset, VLExample
from vlsparse.data.objective import Objective
from vlsparse.data.options import LoadOptions

__all__ = ["load_flickr30k", "retrieval_task", "FLICKR30K_OBJECTIVE", "FLICKR30K_FILE", "karpathy_captions", "sample_negatives"]

#: the Karpathy-split annotation file
FLICKR30K_FILE = "dataset_flickr30k.json"
#: one score per (caption, image) pair, cross-entropy toward the positive, IR recall@1
FLICKR30K_OBJECTIVE = Objective(head="rank", loss="ce", metric="ir_r1")


def karpathy_captions(path: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """Split -> ``(caption, image key)`` pairs of a Karpathy-split file, in file order.

    The file is ``{"images": [{"filename": "1000092795.jpg", "split": "train"|"val"|"test"|"restval",
    "sentences": [{"raw": caption, ...}, ...], ...}, ...]}``; the image key is the filename's stem,
    "restval" (COCO's extra training images) counts as train.

    Raises:
        FileNotFoundError: ``path`` is missing.
        ValueError: not JSON, or an entry without filename / split / sentences[].raw (names the file).
    """
    data = formats.read_json(path, "the Karpathy split of Flickr30k: {\"images\": [{\"filename\", \"split\", "
                                   "\"sentences\": [{\"raw\"}]}]}")
    out: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    try:
        for n, image in enumerate(data["images"]):
            split = "train" if image["split"] == "restval" else image["split"]
            if split not in out:
                raise ValueError(f"{path}: images[{n}]: split must be train, val, test or restval, got {split!r}")
            key = Path(image["filename"]).stem
            out[split] += [(str(s["raw"]), key) for s in image["sentences"]]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: expected {{\"images\": [{{\"filename\", \"split\", \"sentences\": "
                         f"[{{\"raw\"}}]}}]}}") from None
    return out


def sample_negatives(captions: list[tuple[str, str]], negatives: int, seed: int = 0,
                     groups: Mapping[str, Hashable] | None = None) -> list[VLExample]:
    """One training example per ``(caption, image key)``: ``VLExample(caption, (own key, neg_1, ...,
    neg_k), {"0": 1.0})``, the k = ``negatives`` distinct negatives drawn uniformly from the other
    images of ``captions`` with ``numpy.random.default_rng(seed)``, one draw per caption in order
    (fixed at load time; UNITER draws new ones every epoch).

    ``groups``: image key -> group (easy-retrieval: the image's facts); negatives are then drawn only among
    the images of other groups, which the caption does not describe.

    Raises:
        ValueError: ``negatives`` < 1, or fewer than ``negatives`` distinct images to draw from.
    """
    images = sorted({key for _, key in captions})
    index = {key: i for i, key in enumerate(images)}
    if groups is None:
        others = {key: None for key in images}
    else:
        others = {key: np.array([i for i, k in enumerate(images) if groups[k] != groups[key]]) for key in images}
    fewest = min(len(images) - 1 if o is None else len(o) for o in others.values()) if images else 0
    if negatives < 1 or fewest < negatives:
        raise ValueError(f"--negatives {negatives}: expected 1 <= negatives <= the train images a caption can "
                         f"be contrasted with ({fewest})")
    rng = np.random.default_rng(seed)
    out = []
    for caption, key in captions:
        if others[key] is None:
            own = index[key]
            picks = rng.choice(len(images) - 1, size=negatives, replace=False)  # among the others
            picks = picks + (picks >= own)
        else:
            picks = rng.choice(others[key], size=negatives, replace=False)
        out.append(VLExample(caption, (key, *(images[p] for p in picks)), {"0": 1.0}))
    return out


def _first_images(captions: list[tuple[str, str]], n: int | None) -> list[tuple[str, str]]:
    if n is None:
        return captions
    keep = set(sorted({key for _, key in captions})[:n])
    return [(c, key) for c, key in captions if key in keep]


def load_flickr30k(tokenizer: Any, options: LoadOptions = LoadOptions(), *, negatives: int = 3,
                   eval_images: int | None = None) -> TaskData:
    """Load Flickr30k retrieval from ``options.data_dir`` as a :class:`~vlsparse.data.dataset.TaskData`
    named "flickr30k".

    File read: ``data_dir/dataset_flickr30k.json`` (Karpathy's split, see :func:`karpathy_captions`;
    29,000 / 1,014 / 1,000 train / val / test images with 5 captions each). ``options.val_fraction`` is
    unused (the split has its own val).

    * train: a :class:`~vlsparse.data.dataset.VLDataset` of one example per (caption, image) with
      ``negatives`` other train images (:func:`sample_negatives`, drawn with ``options.seed``); labels ``"0"``
      .. ``str(negatives)``, the own image "0" with target 1. Items carry ``img_feat``
      (1 + k, N, D) etc. (or ``pixel_values`` (1 + k, 3, H, W)) and ``targets`` (1 + k,) ``[1, 0, ...]``.
    * val, test: :class:`~vlsparse.data.dataset.RetrievalSet` of the split's captions and images;
      ``eval_images`` keeps only the first N images (sorted by key) of each and their captions (the full
      test set is 5,000 x 1,000 caption-image pairs, one forward each).

    Images through :func:`~vlsparse.data.formats.visual_inputs`, keyed by the filename stem: region
    features in ``data_dir/features`` (not standardised), or ``data_dir/images/<stem>.jpg`` for ViLT.
    Objective: :data:`FLICKR30K_OBJECTIVE` (``rank`` head, cross-entropy, IR recall@1). ``answers``
    is the train label list ``["0", ..., str(negatives)]``.

    Raises:
        FileNotFoundError: ``data_dir`` None or missing, the annotation file, the features / images, or
            some images (the message names them).
        ValueError: a malformed annotation file, ``negatives`` < 1 or not below the
            number of train images (names --negatives), ``eval_images`` < 1 (names --eval-images),
            a bad ``image_size``.
    """
    root = formats.data_root(options.data_dir, "flickr30k")
    return retrieval_task("flickr30k", root, tokenizer, options, negatives, eval_images)


def retrieval_task(name: str, root: Path, tokenizer: Any, options: LoadOptions, negatives: int, eval_images: int | None,
                   groups: Mapping[str, Hashable] | None = None) -> TaskData:
    """The retrieval :class:`~vlsparse.data.dataset.TaskData` named ``name`` of the Karpathy-split data in
    ``root`` for ``tokenizer`` (what :func:`load_flickr30k` returns, see there). ``groups``: image key -> group; negatives are
    drawn from other groups (:func:`sample_negatives`) and the val / test sets count any image or caption of
    the query's group as correct (:class:`~vlsparse.data.dataset.RetrievalSet`).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_flickr30k`.
    """
    if eval_images is not None and eval_images < 1:
        raise ValueError(f"--eval-images must be a positive number of images, got {eval_images}")
    options = options.with_defaults()
    captions = karpathy_captions(root / FLICKR30K_FILE)
    try:
        train = sample_negatives(captions["train"], negatives, options.seed, groups)
    except ValueError as e:
        raise ValueError(f"{e} in {root / FLICKR30K_FILE}") from None
    val, test = (_first_images(captions[s], eval_images) for s in ("val", "test"))
    keys = {key for _, key in captions["train"] + val + test}
    visuals, dim = formats.visual_inputs(root, keys, options)
    answers = [str(i) for i in range(1 + negatives)]
    text_len = options.max_text_len
    return TaskData(
        name=name,
        train=VLDataset(train, visuals, tokenizer, answers, text_len, FLICKR30K_OBJECTIVE),
        val=RetrievalSet(val, visuals, tokenizer, text_len, groups),
        test=RetrievalSet(test, visuals, tokenizer, text_len, groups),
        answers=answers, region_feature_dim=dim, metric_name=FLICKR30K_OBJECTIVE.metric, visual=options.visual,
        image_processor=visuals.processor_config() if options.visual == "pixels" else None,
        objective=FLICKR30K_OBJECTIVE,
    )
