"""Word-region alignment by optimal transport (UNITER Sec. 3.2, WRA; ChenRocks/UNITER ``model/ot.py``).

On matching pairs, the transport plan T between the words (text tokens but [CLS] and [SEP]) and the regions
minimises the cost C = 1 - cosine similarity of their last hidden states; the inexact proximal point method
(IPOT, Xie et al. 2020; beta 0.5, 50 iterations, k = 1, as official) approximates T without gradient, and
the loss is the transport distance trace(C^T T), weighted 0.1 (official ``ot_lambda``; UNITER adds it to the
ITM loss, we sample WRA as an objective of its own).
"""

from __future__ import annotations

import torch
from torch import nn

from vlsparse.training.objectives.common import Context, Objective, PretrainHeads, Step, encode

__all__ = ["WEIGHT", "WRA", "ipot", "optimal_transport_distance", "wra_step"]

WEIGHT = 0.1


@torch.no_grad()
def ipot(cost: torch.Tensor, x_pad: torch.Tensor, y_pad: torch.Tensor, beta: float = 0.5, iterations: int = 50,
         k: int = 1) -> torch.Tensor:
    """IPOT transport plan (B, M, N) float32 for cost (B, M, N) between M words and N regions with uniform
    marginals over the unpadded ones; ``x_pad`` (B, M) / ``y_pad`` (B, N) bool mark padding (rows / columns
    of T there are 0). Follows official ``ipot`` (which works on the transpose)."""
    b, m, n = cost.shape
    joint = x_pad[:, :, None] | y_pad[:, None, :]  # (B, M, N)
    x_len = (~x_pad).sum(1).clamp(min=1).to(cost.dtype)[:, None]  # (B, 1)
    y_len = (~y_pad).sum(1).clamp(min=1).to(cost.dtype)[:, None]
    sigma = (torch.ones(b, m, dtype=cost.dtype, device=cost.device) / x_len).masked_fill(x_pad, 0)  # (B, M)
    plan = torch.ones_like(cost).masked_fill(joint, 0)
    a = torch.exp(-cost / beta).masked_fill(joint, 0)
    x_mask, y_mask = x_pad.to(cost.dtype) * 1e4, y_pad.to(cost.dtype) * 1e4
    for _ in range(iterations):
        q = a * plan  # (B, M, N)
        for _ in range(k):
            delta = 1 / (y_len * torch.einsum("bmn,bm->bn", q, sigma) + y_mask)  # (B, N)
            sigma = 1 / (x_len * torch.einsum("bmn,bn->bm", q, delta) + x_mask)  # (B, M)
        plan = sigma[:, :, None] * q * delta[:, None, :]
    return plan.masked_fill(joint, 0)


def optimal_transport_distance(x: torch.Tensor, y: torch.Tensor, x_pad: torch.Tensor,
                               y_pad: torch.Tensor) -> torch.Tensor:
    """(B,) float32 transport distances between (B, M, h) words ``x`` and (B, N, h) regions ``y``
    (cosine cost; ``x_pad``/``y_pad`` bool padding)."""
    xn = torch.nn.functional.normalize(x, dim=-1, eps=1e-5)
    yn = torch.nn.functional.normalize(y, dim=-1, eps=1e-5)
    cost = (1 - xn @ yn.transpose(1, 2)).masked_fill(x_pad[:, :, None] | y_pad[:, None, :], 0)  # (B, M, N)
    plan = ipot(cost.detach(), x_pad, y_pad)
    return (cost * plan).sum((1, 2))


def wra_loss(model: nn.Module, heads: PretrainHeads, batch: dict, drawn: dict, ctx: Context) -> Step:
    """WRA on a batch of matching pairs: ``WEIGHT`` x the mean transport distance (lower: better aligned)."""
    _, regions, text = encode(model, batch)
    dist = optimal_transport_distance(text, regions, batch["word_index"] == 0, batch["img_mask"] == 0)  # (B,)
    return Step(WEIGHT * dist.mean(), count=int(dist.numel()))


#: word-region alignment as an :class:`~vlsparse.training.objectives.common.Objective` (it draws nothing)
WRA = Objective(lambda batch, ctx, gen: {}, wra_loss)
wra_step = WRA  # fn(model, heads, batch, ctx, gen) -> Step
