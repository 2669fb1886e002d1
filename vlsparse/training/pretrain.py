"""The VL pre-training loop (UNITER, Chen et al. 2020, Sec. 3.2-3.3) and its held-out evaluation.

Each step samples one objective by its proportion (:func:`vlsparse.training.objectives.parse_objectives`; the
official ``MetaLoader`` samples tasks by ``mix_ratio``), draws a batch of captions, computes that objective
(:mod:`vlsparse.training.objectives`) and takes an AdamW step (the recipe and masked updates of
:func:`vlsparse.training.loop.train`: pruned weights stay exactly zero, so IMP can run on pre-training).
The word-embedding table is compacted to the corpus's tokens (plus [PAD], [CLS], [SEP], [MASK]) while
training (:class:`~vlsparse.training.loop.CompactVocab`), which is also the vocabulary MLM predicts over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vlsparse.data.corpus import CaptionSet, collate_captions
from vlsparse.pruning.mask import Mask
from vlsparse.training.config import TrainConfig
from vlsparse.training.loop import CompactVocab, make_optimizer, mask_gradients
from vlsparse.training.objectives import OBJECTIVES, Context, PretrainHeads, Step

__all__ = ["new_heads", "pretrain", "evaluate_pretraining", "running_summary", "HELDOUT_SEED"]

#: seed of the held-out masks and negatives, the same before and after pre-training
HELDOUT_SEED = 0


def new_heads(model: nn.Module, seed: int = 0) -> PretrainHeads:
    """Freshly initialised pre-training heads for ``model`` (N(0, initializer_range) weights, zero biases,
    LayerNorm 1/0, as ``UniterForTask._init_weights``), reproducible from ``seed``."""
    cfg = model.config
    torch.manual_seed(seed)
    heads = PretrainHeads(cfg.hidden_size, cfg.vocab_size, cfg.img_dim, cfg.layer_norm_eps)
    heads.apply(model._init_weights)
    return heads


@contextmanager
def _compact(model: nn.Module, data: CaptionSet, tokenizer_ids: tuple[int, int, int, int]) -> Iterator[Context]:
    """Within: ``model`` holds the compact word-embedding table of ``data``'s tokens; yields the MLM
    :class:`Context` and ``remap`` (vocab,) int64 in ``ctx.remap``. ``tokenizer_ids``: [PAD], [CLS], [SEP], [MASK]."""
    used = torch.tensor(sorted(data.used_token_ids() | set(tokenizer_ids)))
    vocab = CompactVocab(model, used)
    try:
        rows = vocab.remap[torch.tensor(tokenizer_ids, device=vocab.remap.device)].cpu()
        ctx = Context(vocab_ids=used, mask_id=int(rows[3]), special=rows)
        ctx.remap = vocab.remap
        yield ctx
    finally:
        vocab.restore()


def _special_ids(model: nn.Module) -> tuple[int, int, int, int]:
    """[PAD], [CLS], [SEP], [MASK] ids of the BERT uncased vocabulary every UNITER here uses."""
    return 0, 101, 102, 103


def pretrain(model: nn.Module, heads: PretrainHeads, mask: Mask | None, data: CaptionSet, objectives: dict[str, float],
             cfg: TrainConfig, progress: Callable[[int, dict], None] | None = None) -> dict[str, dict]:
    """Pre-train ``model`` and ``heads`` in place for ``cfg.steps`` steps on ``data``.

    Args:
        model: a UNITER (``model.uniter``; its task head is not used).
        heads: the pre-training heads (new parameters: ``cfg.head_lr``).
        mask: name -> bool tensor (True = kept) for masked training, or None.
        data: the training captions.
        objectives: name -> probability per batch (:func:`~vlsparse.training.objectives.parse_objectives`).
        cfg: steps, batch size, learning rates, warm-up, seed, device.
        progress: ``progress(done_steps, running)`` after each step; ``running`` is objective -> {"loss", "acc"}
            (exponential moving averages; acc absent for regression objectives).

    Returns:
        the final running statistics (as given to ``progress``).
    """
    device = torch.device(cfg.device)
    model.to(device).train()
    heads.to(device).train()
    hooks = mask_gradients(model, mask, device)
    names, probs = list(objectives), np.array(list(objectives.values()))
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    running: dict[str, dict] = {}
    try:
        with _compact(model, data, _special_ids(model)) as ctx:
            opt, sched = make_optimizer(model, cfg, extra=heads)
            loader = _forever(data, cfg.batch_size, cfg.seed)
            for step in range(cfg.steps):
                name = names[int(rng.choice(len(names), p=probs))]
                out = _step(model, heads, next(loader), ctx, gen, name, device)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                sched.step()
                _update(running, name, out)
                if progress:
                    progress(step + 1, running)
    finally:
        for h in hooks:
            h.remove()
        model.eval()
        heads.eval()
    return running


def running_summary(running: dict[str, dict]) -> str:
    """One line of running statistics, e.g. ``itm 0.412/81%  mlm 1.203/64%  mrfr 0.513`` (loss / accuracy)."""
    return "  ".join(f"{n} {r['loss']:.3f}" + (f"/{r['acc']:.0%}" if "acc" in r else "")
                     for n, r in sorted(running.items()))


def _forever(data: CaptionSet, batch_size: int, seed: int) -> Iterator[dict]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=len(data) > batch_size,
                              collate_fn=collate_captions, generator=gen)


def _step(model, heads, batch: dict, ctx: Context, gen: torch.Generator, name: str, device) -> Step:
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["input_ids"] = ctx.remap[batch["input_ids"]]
    return OBJECTIVES[name](model, heads, batch, ctx, gen)


def _update(running: dict, name: str, out: Step, decay: float = 0.98) -> None:
    r = running.setdefault(name, {})
    values = {"loss": out.value, **({"acc": out.correct / out.total} if out.total else {})}
    for k, v in values.items():
        r[k] = v if k not in r else decay * r[k] + (1 - decay) * v


@torch.no_grad()
def evaluate_pretraining(model: nn.Module, heads: PretrainHeads, data: CaptionSet, batch_size: int = 256,
                         device: str = "cpu") -> dict[str, float]:
    """Held-out pre-training metrics with fixed masks and negatives (:data:`HELDOUT_SEED`), comparable before and
    after pre-training: ``mlm_accuracy`` and ``itm_accuracy`` (fractions), ``mrfr_loss`` (mean squared error
    per feature dimension of standardised features), ``wra_distance`` (mean transport distance, x 0.1), ``n``
    (captions). Every objective is measured, whichever were trained."""
    model.to(device).eval()
    heads.to(device).eval()
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    data.rng = np.random.default_rng(HELDOUT_SEED)
    sums = {n: [0.0, 0, 0, 0] for n in OBJECTIVES}  # loss x batches, correct, total, batches
    with _compact(model, data, _special_ids(model)) as ctx:
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_captions):
            for name in OBJECTIVES:
                out = _step(model, heads, batch, ctx, gen, name, device)
                s = sums[name]
                s[0], s[1], s[2], s[3] = s[0] + out.value, s[1] + out.correct, s[2] + out.total, s[3] + 1
    acc = lambda n: sums[n][1] / max(sums[n][2], 1)  # noqa: E731
    loss = lambda n: sums[n][0] / max(sums[n][3], 1)  # noqa: E731
    return {"mlm_accuracy": acc("mlm"), "itm_accuracy": acc("itm"), "mrfr_loss": loss("mrfr"),
            "wra_distance": loss("wra"), "n": len(data)}
