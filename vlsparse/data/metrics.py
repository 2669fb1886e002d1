"""Task metrics, per example or over a data set, as fractions in [0, 1].

* :func:`vqa_score`: VQA v2 (UNITER/LXMERT ``compute_score_with_logits``): the soft target score of
  the arg-max answer. With one-hot targets it is the accuracy (GQA, SNLI-VE, NLVR2).
* :func:`box_iou`: intersection over union of x1, y1, x2, y2 boxes (RefCOCO+: a prediction is
  correct when the selected region's box has IoU >= 0.5 with the referred object's box; Yu et al.
  2016, UNITER ``train_re.py``).
* :func:`choice_accuracy`: multiple choice in groups (VCR Q->A, QA->R and Q->AR; Zellers et al.
  2019: Q->AR counts a question as correct only when both the answer and the rationale are).
* :func:`recall_at_k`: image retrieval (IR) and text retrieval (TR) recall@K from a caption x image
  score matrix (Flickr30k, Karpathy split; UNITER ``itm_eval``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["vqa_score", "box_iou", "choice_accuracy", "recall_at_k"]


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


def recall_at_k(scores: np.ndarray, caption_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image and text retrieval recall@K (fractions) from a similarity matrix.

    Args:
        scores: (T, I) float, the score of caption t with image i (higher = more similar).
        caption_image: (T,) the index of each caption's own image.
        ks: the K values.

    Returns:
        ``{"ir_r1": ..., "tr_r1": ..., ...}``: IR recall@K = fraction of captions whose image is among
        the K highest-scoring images for that caption; TR recall@K = fraction of images with at least one
        of their captions among the K highest-scoring captions for that image. Ties rank in index order.

    Raises:
        ValueError: ``scores`` is not (T, I) with T = len(caption_image), or an index is out of range.
    """
    scores = np.asarray(scores, dtype=np.float64)
    own = np.asarray(caption_image, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != len(own) or (len(own) and (own.min() < 0 or own.max() >= scores.shape[1])):
        raise ValueError(f"scores must be (captions, images) = ({len(own)}, I) with valid image indices, "
                         f"got {scores.shape}")
    # rank of the own image for each caption (0 = best); stable: ties go to the lower index
    ir_order = np.argsort(-scores, axis=1, kind="stable")
    ir_rank = np.argmax(ir_order == own[:, None], axis=1)
    tr_order = np.argsort(-scores.T, axis=1, kind="stable")  # (I, T)
    tr_rank = np.full(scores.shape[1], np.iinfo(np.int64).max)
    for i in range(scores.shape[1]):
        caps = np.flatnonzero(own == i)
        if len(caps):
            tr_rank[i] = np.flatnonzero(np.isin(tr_order[i], caps))[0]
    has_caption = np.isin(np.arange(scores.shape[1]), own)
    out = {}
    for k in ks:
        out[f"ir_r{k}"] = float((ir_rank < k).mean()) if len(own) else 0.0
        out[f"tr_r{k}"] = float((tr_rank[has_caption] < k).mean()) if has_caption.any() else 0.0
    return out
