"""Task metrics, per example or over a data set, as fractions in [0, 1].

* :func:`vqa_score`: VQA v2 (UNITER/LXMERT ``compute_score_with_logits``): the soft target score of
  the arg-max answer. With one-hot targets it is the accuracy (GQA, SNLI-VE, NLVR2).
* :func:`box_iou`: intersection over union of x1, y1, x2, y2 boxes (RefCOCO+: a prediction is
  correct when the selected region's box has IoU >= 0.5 with the referred object's box; Yu et al.
  2016, UNITER ``train_re.py``).
* :func:`choice_accuracy`: multiple choice in groups (VCR Q->A, QA->R and Q->AR; Zellers et al.
  2019: Q->AR counts a question as correct only when both the answer and the rationale are).
* :func:`recall_at_k`: image retrieval (IR) and text retrieval (TR) recall@K from a caption x image
  score matrix (Flickr30k, Karpathy split; UNITER ``itm_eval``), optionally counting any image of the query's
  class as correct (easy-retrieval: equal facts); :func:`chance_recall_at_k` its value for random scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["vqa_score", "box_iou", "choice_accuracy", "recall_at_k", "chance_recall_at_k"]


def vqa_score(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-question VQA score (B,) float32: the target score of the arg-max answer of ``logits``.

    ``logits`` and ``targets`` are (B, A); the mean over a data set is the VQA accuracy.

    Raises:
        ValueError: shapes differ or are not 2-D.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"expected (B, A) logits and targets, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    pred = logits.argmax(dim=1, keepdim=True)
    return targets.gather(1, pred).squeeze(1).to(torch.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` (N, >=4) against ``b`` (M, >=4) -> (N, M) float64; the first four values of a
    row are x1, y1, x2, y2 (any unit, the same for both; the 7-value region boxes qualify).
    Empty boxes have IoU 0 with everything."""
    a = np.asarray(a, dtype=np.float64)[:, :4]
    b = np.asarray(b, dtype=np.float64)[:, :4]
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def choice_accuracy(logits: torch.Tensor, targets: torch.Tensor, groups: int) -> torch.Tensor:
    """Multiple-choice correctness per example and group: (B, groups) bool.

    ``logits`` and ``targets`` are (B, C) with C = groups x choices; group g is columns
    [g * C/groups, (g + 1) * C/groups). A group is correct when its arg-max logit is at its arg-max
    target. VCR: groups 2 (Q->A, QA->R); ``.all(1)`` is Q->AR.

    Raises:
        ValueError: shapes differ, or C is not a multiple of ``groups``.
    """
    if logits.shape != targets.shape or logits.dim() != 2 or logits.shape[1] % groups:
        raise ValueError(f"expected (B, C) logits and targets with C a multiple of {groups}, "
                         f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    b = logits.shape[0]
    return logits.reshape(b, groups, -1).argmax(2) == targets.reshape(b, groups, -1).argmax(2)


def recall_at_k(scores: np.ndarray, caption_image: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                image_class: Sequence[int] | None = None) -> dict[str, float]:
    """Image and text retrieval recall@K (fractions) from a similarity matrix.

    Args:
        scores: (T, I) float, the score of caption t with image i (higher = more similar).
        caption_image: (T,) the index of each caption's own image.
        ks: the K values.
        image_class: (I,) int, optional: an equivalence class per image. A retrieved image (or caption) then
            counts as correct when its class (a caption's: its own image's) equals the query's: easy-retrieval
            passes the image's facts (shape, colour), since many images share a caption. None: every image is
            its own class (Flickr30k, UNITER ``itm_eval``).

    Returns:
        ``{"ir_r1": ..., "tr_r1": ..., ...}``: IR recall@K = fraction of captions with a correct image among
        the K highest-scoring images for that caption; TR recall@K = fraction of images (those with a correct
        caption at all) with a correct caption among the K highest-scoring captions for that image. Ties rank
        in index order.

    Raises:
        ValueError: ``scores`` is not (T, I) with T = len(caption_image), an index is out of range, or
            ``image_class`` is not (I,).
    """
    scores = np.asarray(scores, dtype=np.float64)
    own = np.asarray(caption_image, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != len(own) or (len(own) and (own.min() < 0 or own.max() >= scores.shape[1])):
        raise ValueError(f"scores must be (captions, images) = ({len(own)}, I) with valid image indices, "
                         f"got {scores.shape}")
    cls = np.arange(scores.shape[1]) if image_class is None else np.asarray(image_class, dtype=np.int64)
    if cls.shape != (scores.shape[1],):
        raise ValueError(f"image_class must have one entry per image ({scores.shape[1]}), got shape {cls.shape}")
    caption_class = cls[own]
    # rank of the first correct image for each caption (0 = best); stable: ties go to the lower index
    ir_hit = cls[np.argsort(-scores, axis=1, kind="stable")] == caption_class[:, None]  # (T, I)
    ir_rank = np.argmax(ir_hit, axis=1)
    tr_hit = caption_class[np.argsort(-scores.T, axis=1, kind="stable")] == cls[:, None]  # (I, T)
    tr_rank = np.argmax(tr_hit, axis=1)
    has_caption = tr_hit.any(axis=1)
    out = {}
    for k in ks:
        out[f"ir_r{k}"] = float((ir_rank < k).mean()) if len(own) else 0.0
        out[f"tr_r{k}"] = float((tr_rank[has_caption] < k).mean()) if has_caption.any() else 0.0
    return out


def chance_recall_at_k(caption_image: Sequence[int], image_class: Sequence[int] | None = None,
                       n_images: int | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The expected :func:`recall_at_k` of random scores (every ranking equally likely), exactly.

    A caption whose class holds m of the I images finds one of them among K random images with probability
    1 - C(I - m, K) / C(I, K) (hypergeometric); an image whose class holds c of the T captions likewise with
    1 - C(T - c, K) / C(T, K). Averaged as recall_at_k averages (IR over captions, TR over images with a
    correct caption). ``n_images``: I when ``image_class`` is None (default: max(caption_image) + 1).

    Returns:
        ``{"ir_r1": ..., "tr_r1": ..., ...}`` fractions in [0, 1].
    """
    own = np.asarray(caption_image, dtype=np.int64)
    if image_class is None:
        image_class = np.arange(n_images if n_images is not None else int(own.max()) + 1)
    cls = np.asarray(image_class, dtype=np.int64)
    images_of = {c: int((cls == c).sum()) for c in np.unique(cls)}
    caption_class = cls[own]
    captions_of = {c: int((caption_class == c).sum()) for c in np.unique(cls)}

    def hit(n: int, m: int, k: int) -> float:  # 1 - C(n - m, k) / C(n, k), as a product
        k = min(k, n)
        miss = 1.0
        for j in range(k):
            miss *= max(n - m - j, 0) / (n - j)
        return 1.0 - miss

    out = {}
    for k in ks:
        out[f"ir_r{k}"] = float(np.mean([hit(len(cls), images_of[c], k) for c in caption_class])) if len(own) else 0.0
        tr = [hit(len(own), captions_of[c], k) for c in cls if captions_of[c]]
        out[f"tr_r{k}"] = float(np.mean(tr)) if tr else 0.0
    return out
