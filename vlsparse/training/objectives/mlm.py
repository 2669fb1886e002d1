"""Masked language modelling conditioned on the image (UNITER Sec. 3.2, MLM; ChenRocks/UNITER ``data/mlm.py``
``random_word``, ``model/pretrain.py`` ``forward_mlm``).

15% of the words are chosen (whole words: all word pieces of a chosen word, as BERT's whole-word masking;
official UNITER masks word pieces), at least one per caption; each chosen token becomes [MASK] with
probability 0.8, a random token with 0.1, or stays with 0.1; only the text is masked (conditional masking).
The tied LM head predicts the original tokens from their last hidden states, over the vocabulary of the
corpus (the rows of the compact word-embedding table: our restriction, to train on a CPU; official: the
whole vocabulary); the loss is the cross-entropy, the accuracy that of the arg-max token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlsparse.training.objectives.common import (Context, Objective, PretrainHeads, Step, choose_at_least_one,
                                                 encode)

__all__ = ["MASK_PROB", "MLM", "mask_words", "mlm_step"]

MASK_PROB = 0.15


def mask_words(input_ids: torch.Tensor, word_index: torch.Tensor, ctx: Context,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-word 80/10/10 masking of (B, L) int64 ``input_ids`` whose tokens belong to the words ``word_index``
    (B, L) int64 (1-based, 0 for special tokens and padding). Returns (masked ids (B, L) int64, chosen (B, L)
    bool: the tokens to predict)."""
    words = int(word_index.max()) + 1
    present = torch.zeros(input_ids.shape[0], words, dtype=torch.bool, device=input_ids.device)
    present.scatter_(1, word_index, True)
    present[:, 0] = False
    chosen = choose_at_least_one(present, MASK_PROB, gen).gather(1, word_index) & (word_index > 0)  # (B, L)
    r = torch.rand(input_ids.shape, generator=gen).to(input_ids.device)
    allowed = torch.ones(len(ctx.vocab_ids), dtype=torch.bool)
    allowed[ctx.special] = False
    pool = allowed.nonzero().squeeze(1)
    rand_ids = pool[torch.randint(len(pool), input_ids.shape, generator=gen)].to(input_ids.device)
    masked = torch.where(chosen & (r < 0.8), torch.full_like(input_ids, ctx.mask_id), input_ids)
    masked = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_ids, masked)
    return masked, chosen


def draw_masks(batch: dict, ctx: Context, gen: torch.Generator) -> dict:
    """``{"masked": (B, L) int64 masked ids, "chosen": (B, L) bool tokens to predict}`` (:func:`mask_words`)."""
    masked, chosen = mask_words(batch["input_ids"], batch["word_index"], ctx, gen)
    return {"masked": masked, "chosen": chosen}


def mlm_loss(model: nn.Module, heads: PretrainHeads, batch: dict, drawn: dict, ctx: Context) -> Step:
    """MLM on a batch: cross-entropy of the masked tokens, and how many of them the arg-max gets right;
    ``logits`` (M, V) over the corpus vocabulary."""
    chosen = drawn["chosen"]  # (B, L)
    text = encode(model, batch, input_ids=drawn["masked"])[2]  # (B, L, h)
    logits = heads.mlm(text[chosen], model.get_input_embeddings().weight, ctx)  # (M, V)
    target = batch["input_ids"][chosen]  # (M,)
    return Step(F.cross_entropy(logits, target), int((logits.argmax(1) == target).sum()), int(target.numel()),
                count=int(target.numel()), logits=logits)


#: masked language modelling as an :class:`~vlsparse.training.objectives.common.Objective`
MLM = Objective(draw_masks, mlm_loss)
mlm_step = MLM  # fn(model, heads, batch, ctx, gen) -> Step
