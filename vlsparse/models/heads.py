"""Task heads on any backbone: one forward for the four heads of :mod:`vlsparse.data.objective`.

A backbone implements ``encode(input_ids, attention_mask, **visual) -> (pooled (M, h), visual_hidden
(M, N, h), visual_mask (M, N))`` for M (text, image) pairs; :meth:`TaskForwardMixin.task_forward`
flattens candidate texts and images into such pairs, encodes them once, and reads the logits off
the backbone's head module (its own ``Linear -> act -> LayerNorm -> Linear`` answer head, whose input
is widened to K x h for the ``pair`` head and whose output is 1 for ``rank`` and ``region``):

* ``answer`` (B, A) from the pooled vector (VQA, GQA, SNLI-VE; UNITER ``vqa.py``);
* ``pair`` (B, A) from the K pooled vectors of one text with K images, concatenated (NLVR2; UNITER's
  "paired" ``nlvr2.py``, LXMERT's ``nlvr2_model.py``, ViLT's ``ViltForImagesAndTextClassification``);
* ``rank`` (B, C) one score per (text, image) pair for C candidate texts or images (VCR in UNITER
  ``vcr.py``; image-text matching in UNITER ``itm.py`` / ViLT's ``rank_output``);
* ``region`` (B, N) one score per region (RefCOCO+, UNITER ``re.py``), -inf-like on padded regions.

Input layout: ``input_ids``/``attention_mask`` are (B, L) or (B, C, L); each visual tensor has its
usual rank (``img_feat`` (B, N, D), ``pixel_values`` (B, 3, H, W), ...) or one more axis K after B.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TaskForwardMixin", "VISUAL_RANKS", "widen_head", "head_outputs"]

#: rank of each visual input with one image per example (a K-image input has one axis more)
VISUAL_RANKS = {"img_feat": 3, "img_pos": 3, "img_mask": 2, "pixel_values": 4, "pixel_mask": 3}


def head_outputs(head: str, num_answers: int) -> int:
    """Outputs of the head module: the answers for ``answer`` and ``pair``, 1 for ``rank`` and ``region``."""
    return num_answers if head in ("answer", "pair") else 1


def widen_head(first: nn.Linear, images: int, std: float) -> nn.Linear:
    """A new first Linear of a head for ``images`` concatenated pooled vectors: in_features x images,
    weights N(0, std), zero bias (the pair head; a head built for 1 image is returned as is)."""
    if images == 1:
        return first
    wide = nn.Linear(first.in_features * images, first.out_features)
    nn.init.normal_(wide.weight, std=std)
    nn.init.zeros_(wide.bias)
    return wide


class TaskForwardMixin:
    """``task_forward``: logits of the model's ``config.task_head`` (default "answer") for any input layout."""

    def task_forward(self, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     **visual: torch.Tensor) -> torch.Tensor:
        """Logits of the task head; see the module docstring for shapes.

        Raises:
            ValueError: both several texts and several images per example, or an unknown head.
        """
        kind = getattr(self.config, "task_head", "answer")
        batch = input_ids.shape[0]
        texts = input_ids.shape[1] if input_ids.dim() == 3 else 1
        image_axis = next((v.shape[1] for k, v in visual.items() if v.dim() == VISUAL_RANKS[k] + 1), None)
        images = image_axis or 1
        if texts > 1 and images > 1:
            raise ValueError("an example has either several candidate texts or several images, not both")
        if input_ids.dim() == 3:
            input_ids, attention_mask = input_ids.flatten(0, 1), attention_mask.flatten(0, 1)  # (B*C, L)
        extra = {}
        if image_axis is not None:
            input_ids = input_ids.repeat_interleave(images, 0)  # (B*K, L)
            attention_mask = attention_mask.repeat_interleave(images, 0)  # (B*K, L)
            visual = {k: v.flatten(0, 1) for k, v in visual.items()}  # (B*K, ...)
            if kind == "pair" and getattr(self, "numbered_images", False):  # ViLT NLVR2: image k has token type k + 1
                extra["image_index"] = torch.arange(images, device=input_ids.device).repeat(batch)
        elif texts > 1:
            visual = {k: v.repeat_interleave(texts, 0) for k, v in visual.items()}  # (B*C, ...)
        # M = B*C or B*K pairs: pooled (M, h), visual_hidden (M, N, h), visual_mask (M, N)
        pooled, visual_hidden, visual_mask = self.encode(input_ids, attention_mask, **visual, **extra)
        if kind == "answer":
            return head(pooled)  # (B, A)
        if kind == "pair":
            return head(pooled.reshape(batch, -1))  # (B, K*h) -> (B, A)
        if kind == "rank":
            return head(pooled).reshape(batch, texts * images)  # (M, 1) -> (B, C) or (B, K)
        if kind == "region":
            scores = head(visual_hidden).squeeze(-1)  # (B, N)
            return scores.masked_fill(visual_mask == 0, torch.finfo(scores.dtype).min)  # (B, N)
        raise ValueError(f"unknown task head {kind!r}")
