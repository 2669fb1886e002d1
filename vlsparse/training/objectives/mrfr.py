"""Masked region feature regression (UNITER Sec. 3.2, MRM with MRFR; ChenRocks/UNITER ``data/mrm.py``
``_get_img_mask`` / ``_mask_img_feat``, ``model/pretrain.py`` ``forward_mrfr``).

15% of the valid regions, at least one per image, get their input features zeroed and the mask embedding
added; only regions are masked (conditional masking: the text stays whole). The regression head maps their
last hidden states back to the input feature space (tied to the transpose of ``img_linear``) and the loss is
the mean squared error against the original features. MRC-kl (KL to the detector's class distribution)
needs such distributions; our region features carry none, so it is not offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlsparse.training.objectives.common import (Context, Objective, PretrainHeads, Step, choose_at_least_one,
                                                 encode)

__all__ = ["MASK_PROB", "MRFR", "mrfr_step"]

MASK_PROB = 0.15


def draw_regions(batch: dict, ctx: Context, gen: torch.Generator) -> dict:
    """``{"masked": (B, N) bool}``: the regions to mask and regress."""
    return {"masked": choose_at_least_one(batch["img_mask"].bool(), MASK_PROB, gen)}


def mrfr_loss(model: nn.Module, heads: PretrainHeads, batch: dict, drawn: dict, ctx: Context) -> Step:
    """MRFR on a batch: mean squared error (per feature dimension) of the masked regions' regressed features."""
    feat, masked = batch["img_feat"], drawn["masked"]  # (B, N, D), (B, N)
    regions = encode(model, batch, img_feat=feat.masked_fill(masked[..., None], 0.0), img_masks=masked)[1]
    pred = heads.mrfr(regions[masked], model.uniter.img_embeddings.img_linear.weight)  # (M, D)
    return Step(F.mse_loss(pred, feat[masked]), count=int(pred.numel()))


#: masked region feature regression as an :class:`~vlsparse.training.objectives.common.Objective`
MRFR = Objective(draw_regions, mrfr_loss)
mrfr_step = MRFR  # fn(model, heads, batch, ctx, gen) -> Step
