"""Image-text matching (UNITER Sec. 3.2, ITM; ChenRocks/UNITER ``data/itm.py``, ``model/pretrain.py``
``forward_itm``).

Each caption is paired with its own image or, with probability 0.5 (official ``itm_neg_prob``), with the
negative image of its item (one whose known facts contradict the caption,
:class:`vlsparse.data.corpus.CaptionSet`); a binary head on the pooled output tells the two apart
(cross-entropy, accuracy of the arg-max).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlsparse.training.objectives.common import Context, Objective, PretrainHeads, Step, encode

__all__ = ["ITM", "NEG_PROB", "itm_step"]

NEG_PROB = 0.5


def draw_negatives(batch: dict, ctx: Context, gen: torch.Generator) -> dict:
    """``{"neg": (B,) bool}``: which examples get their negative image (probability :data:`NEG_PROB`)."""
    return {"neg": (torch.rand(batch["input_ids"].shape[0], generator=gen) < NEG_PROB).to(batch["input_ids"].device)}


def itm_loss(model: nn.Module, heads: PretrainHeads, batch: dict, drawn: dict, ctx: Context) -> Step:
    """ITM on a batch: targets 1 for matching pairs, 0 for negatives; ``logits`` (B, 2)."""
    neg = drawn["neg"]  # (B,)
    logits = heads.itm(encode(model, batch, neg=neg)[0])  # (B, 2)
    target = (~neg).long()
    return Step(F.cross_entropy(logits, target), int((logits.argmax(1) == target).sum()), int(target.numel()),
                count=int(target.numel()), logits=logits)


#: image-text matching as an :class:`~vlsparse.training.objectives.common.Objective`
ITM = Objective(draw_negatives, itm_loss)
itm_step = ITM  # fn(model, heads, batch, ctx, gen) -> Step
