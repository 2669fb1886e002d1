"""What every pre-training objective shares: the heads, the vocabulary context, one step's result, masking."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Context", "Objective", "PretrainHeads", "Step", "choose_at_least_one", "encode"]


@dataclass
class Step:
    """One objective on one batch: ``loss`` (scalar float32 tensor, differentiable), ``correct`` and ``total``
    (predictions right / made; 0 / 0 for regression objectives), and ``value`` (the loss or distance to report).

    ``count``: how many terms ``loss`` is the mean of (masked tokens for MLM, regressed feature values for MRFR,
    examples for ITM and WRA), which weighs the shares of several processes (:mod:`vlsparse.training.pretrain`);
    ``logits``: the predictions of a classification objective (ITM (B, 2), MLM (M, V)), None for regression
    objectives (adversarial pre-training's KL term, :mod:`vlsparse.training.pretrain`)."""

    loss: torch.Tensor
    correct: int = 0
    total: int = 0
    count: int = 1
    logits: torch.Tensor | None = None

    @property
    def value(self) -> float:
        return float(self.loss.detach())


@dataclass(frozen=True)
class Objective:
    """A pre-training objective in two parts, so that its random choices are made once per batch: ``draw(batch,
    ctx, gen) -> drawn`` makes them (masks, negatives; a dict of tensors with the batch's leading dimension B),
    ``loss(model, heads, batch, drawn, ctx) -> Step`` computes the objective on the batch. Calling the objective
    does both. Rows of ``batch`` and ``drawn`` may be taken alike (``{k: v[rows]}``) between the two parts: the
    choices of a whole batch, the loss of some of its rows (one process's share under torchrun)."""

    draw: Callable[[dict, "Context", torch.Generator], dict]
    loss: Callable[..., Step]

    def __call__(self, model: nn.Module, heads: "PretrainHeads", batch: dict, ctx: "Context",
                 gen: torch.Generator) -> Step:
        return self.loss(model, heads, batch, self.draw(batch, ctx, gen), ctx)


@dataclass
class Context:
    """The vocabulary the MLM head predicts over, in the ids the batch uses.

    ``vocab_ids`` (V,) int64: the full-vocabulary id of each row of the (compact) word-embedding table the
    model holds while pre-training (:class:`vlsparse.training.loop.CompactVocab`); ``mask_id``: the row of
    [MASK]; ``special`` (S,) int64: rows never drawn as random replacements ([PAD], [CLS], [SEP], [MASK]).
    """

    vocab_ids: torch.Tensor
    mask_id: int
    special: torch.Tensor


class PretrainHeads(nn.Module):
    """The pre-training heads of UNITER (ChenRocks/UNITER ``model/pretrain.py``): MLM ``BertOnlyMLMHead``
    (Linear -> GELU -> LayerNorm, then a decoder tied to the word embeddings plus a bias (vocab,)), MRFR
    ``RegionFeatureRegression`` (Linear -> GELU -> LayerNorm, then the transpose of the image embedding's
    ``img_linear`` weight plus a bias (img_dim,)), and the ITM head ``Linear(hidden, 2)`` on the pooled output.

    Args:
        hidden: hidden size h; vocab: full vocabulary size; img_dim: region feature size D; eps: LayerNorm eps.
    """

    def __init__(self, hidden: int, vocab: int, img_dim: int, eps: float = 1e-12):
        super().__init__()
        self.mlm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps))
        self.mlm_bias = nn.Parameter(torch.zeros(vocab))
        self.mrfr_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps))
        self.mrfr_bias = nn.Parameter(torch.zeros(img_dim))
        self.itm = nn.Linear(hidden, 2)

    def mlm(self, hidden: torch.Tensor, words: torch.Tensor, ctx: Context) -> torch.Tensor:
        """(M, h) hidden states of masked tokens, (V, h) word-embedding rows -> (M, V) logits."""
        return F.linear(self.mlm_transform(hidden), words, self.mlm_bias[ctx.vocab_ids.to(hidden.device)])

    def mrfr(self, hidden: torch.Tensor, img_linear_weight: torch.Tensor) -> torch.Tensor:
        """(M, h) hidden states of masked regions, (h, D) ``img_linear`` weight -> (M, D) regressed features."""
        return F.linear(self.mrfr_transform(hidden), img_linear_weight.t(), self.mrfr_bias)


def choose_at_least_one(valid: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """(B, K) bool: each valid position chosen with probability ``prob``, and at least one valid position per
    row that has one (the official ``random_word`` and ``_get_img_mask`` "at least mask 1")."""
    u = torch.rand(valid.shape, generator=gen).to(valid.device)
    u = u.masked_fill(~valid, 2.0)
    chosen = u < prob
    none = ~chosen.any(1) & valid.any(1)
    chosen[none, u[none].argmin(1)] = True
    return chosen


def encode(model: nn.Module, batch: dict, img_feat: torch.Tensor | None = None, img_masks: torch.Tensor | None = None,
           input_ids: torch.Tensor | None = None, neg: torch.Tensor | None = None):
    """``model.uniter`` on a batch, returning (pooled (B, h), regions (B, N, h), text (B, L, h)).

    ``input_ids``/``img_feat`` replace the batch's (masked versions); ``neg`` (B,) bool swaps in the negative
    image of those examples (image-text matching).
    """
    feat, pos, mask = batch["img_feat"], batch["img_pos"], batch["img_mask"]
    if neg is not None:
        pick = lambda a, b: torch.where(neg.view(-1, *([1] * (a.dim() - 1))), b, a)  # noqa: E731
        n = max(feat.shape[1], batch["neg_feat"].shape[1])
        pad = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, n - t.shape[1]))  # noqa: E731
        feat, pos, mask = (pick(pad(a), pad(b)) for a, b in ((feat, batch["neg_feat"]), (pos, batch["neg_pos"]),
                                                             (mask, batch["neg_mask"])))
    return model.uniter(batch["input_ids"] if input_ids is None else input_ids, batch["attention_mask"],
                        feat if img_feat is None else img_feat, pos, mask, img_masks=img_masks, return_text=True)
