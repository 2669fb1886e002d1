"""What a task asks of a model: its head, its training loss and its metric.

Every vlsparse task is a choice among outputs, scored by one of four heads (see
:mod:`vlsparse.models.heads`):

=========  =========================================================  ===========================
head       logits                                                     tasks
=========  =========================================================  ===========================
answer     (B, A): one pooled vector per (text, image) -> A answers    easy-vqa, vqa, gqa, snli-ve
pair       (B, A): K images, their K pooled vectors concatenated      nlvr2 (K = 2, A = 2)
rank       (B, C): one score per (text, image) pair, C candidates      vcr (C texts), flickr30k (C images)
region     (B, N): one score per region of the image                  refcoco+
=========  =========================================================  ===========================

Losses: ``"bce"`` is UNITER's VQA loss (binary cross-entropy on soft scores, times A); ``"ce"`` is
the cross-entropy toward the arg-max target of each group of outputs (one-hot labels: GQA, SNLI-VE,
NLVR2, the right VCR choice, the positive image of an ITM group, the region with the largest IoU).

Metrics over a data set (fractions): ``"vqa_score"`` (mean target score of the arg-max output),
``"accuracy"`` (fraction whose arg-max output has target >= 0.5: the right label for one-hot targets,
IoU >= 0.5 for RefCOCO+ whose targets are IoUs), ``"q_ar_accuracy"`` (VCR: all groups right; with
``q_a_accuracy`` and ``qa_r_accuracy``), ``"ir_r1"`` (Flickr30k, computed by the retrieval set itself,
:class:`vlsparse.data.dataset.RetrievalSet`, with IR/TR R@1/5/10).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from vlsparse.data.metrics import choice_accuracy, vqa_score

__all__ = ["Objective", "HEADS", "LOSSES", "METRICS", "VQA_OBJECTIVE"]

HEADS = ("answer", "pair", "rank", "region")
LOSSES = ("bce", "ce")
METRICS = ("vqa_score", "accuracy", "q_ar_accuracy", "ir_r1")


@dataclass(frozen=True)
class Objective:
    """Head, loss and metric of a task.

    Args:
        head: one of :data:`HEADS`.
        loss: one of :data:`LOSSES`.
        metric: the headline metric, one of :data:`METRICS` (the column IMP and the tables report).
        groups: the outputs form this many equal groups, each with its own arg-max (VCR: 2).
        images: images per example for the ``pair`` head (NLVR2: 2), else 1.

    Raises:
        ValueError: an unknown name or a count < 1.
    """

    head: str = "answer"
    loss: str = "bce"
    metric: str = "vqa_score"
    groups: int = 1
    images: int = 1

    def __post_init__(self):
        for name, allowed in (("head", HEADS), ("loss", LOSSES), ("metric", METRICS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"objective {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.groups < 1 or self.images < 1:
            raise ValueError(f"groups and images must be >= 1, got {self.groups}, {self.images}")

    def to_dict(self) -> dict:
        return asdict(self)

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of (B, O) float32 ``logits`` against (B, O) float32 ``targets``."""
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        b = logits.shape[0]
        return F.cross_entropy(logits.reshape(b * self.groups, -1), targets.reshape(b * self.groups, -1).argmax(1))

    def scores(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example metric values (B,) float32 for (B, O) ``logits`` and ``targets``, by metric name
        (the headline metric first). ``ir_r1`` has none: retrieval is scored over a whole set."""
        if self.metric == "ir_r1":
            raise ValueError("retrieval metrics need the whole caption x image score matrix (RetrievalSet.evaluate)")
        if self.metric == "q_ar_accuracy":
            right = choice_accuracy(logits, targets, self.groups).float()
            return {"q_ar_accuracy": right.all(1).float(), "q_a_accuracy": right[:, 0], "qa_r_accuracy": right[:, -1]}
        got = vqa_score(logits, targets)
        return {"vqa_score": got} if self.metric == "vqa_score" else {"accuracy": (got >= 0.5).float()}

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Data-set metrics: the mean of :meth:`scores` (fractions; 0 for no examples) and ``n`` (examples)."""
        if logits.shape[0] == 0:
            return {self.metric: 0.0, "n": 0}
        out = {k: float(v.mean()) for k, v in self.scores(logits, targets).items()}
        out["n"] = int(logits.shape[0])
        return out


#: UNITER's VQA recipe: the default of data sets that carry no objective
VQA_OBJECTIVE = Objective()
