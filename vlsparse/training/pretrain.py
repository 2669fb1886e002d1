"""The VL pre-training loop (UNITER, Chen et al. 2020, Sec. 3.2-3.3) and its held-out evaluation.

Each step samples one objective by its proportion (:func:`vlsparse.training.objectives.parse_objectives`; the
official ``MetaLoader`` samples tasks by ``mix_ratio``), draws a batch of captions, computes that objective
(:mod:`vlsparse.training.objectives`) and takes an AdamW step (the recipe and masked updates of
:func:`vlsparse.training.loop.train`: pruned weights stay exactly zero, so IMP can run on pre-training).
The word-embedding table is compacted to the corpus's tokens (plus [PAD], [CLS], [SEP], [MASK]) while
training (:class:`~vlsparse.training.loop.CompactVocab`), which is also the vocabulary MLM predicts over.

**Adversarial pre-training** (``cfg.adversarial``; VILLA, Gan et al. 2020, Sect. 3: adversarial training in both
pre-training and finetuning). The perturbations are those of finetuning (:mod:`vlsparse.training.adversarial`:
δ added at the backbone's ``adversarial_points``, the word embeddings and the region features entering the region
embedding, one modality at a time, K passes with projected normalised ascent steps between them, parameter
gradients accumulated over the K passes, FreeLB). The adversarial term of each objective, computed on the
perturbed input with the random choices of the clean pass (the same masked words, masked regions and negative
images: the label-preserving perturbation VILLA assumes), is

* ITM: its cross-entropy + ``adv_kl_weight`` x the symmetric KL divergence between the clean and the perturbed
  (B, 2) match distributions;
* MLM: its cross-entropy + ``adv_kl_weight`` x the symmetric KL divergence between the clean and the perturbed
  (M, V) token distributions of the masked tokens (mean over tokens);
* MRFR and WRA (a regression and a transport distance: no predicted distribution): their loss alone.

VILLA's paper defines the two terms (Eq. 1-2: the task loss on the perturbed input, R_at, and the KL divergence
between clean and perturbed predictions, R_kl) for every pre-training task, but its adversarial pre-training code
is not released (github.com/zhegan27/VILLA README: "Adversarial pre-training with in-domain data will be available
soon"); which objective gets the KL term here is our reading: those that predict a distribution. With a zero
perturbation the loss and the gradients are those of standard pre-training (tests/test_adversarial_commands.py).

**Under torchrun** (:mod:`vlsparse.training.distributed`) every process draws the same global batch of
``cfg.batch_size`` captions and the objective's random choices for the whole batch (so they are those of one
process), then computes the objective on its equal share of the rows; each share's loss is weighted by its
share of the objective's terms (``Step.count``: MLM's masked tokens differ between shares) and the gradients are
averaged by one all-reduce after the backward pass (:func:`~vlsparse.training.distributed.average_gradients`;
the objectives call parts of the model, which DistributedDataParallel's forward cannot wrap). The held-out
evaluation shares the rows of each batch the same way and sums what every process measured.
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
from vlsparse.training import distributed
from vlsparse.training.adversarial import perturbation, perturbation_point, symmetric_kl
from vlsparse.training.config import TrainConfig
from vlsparse.training.loop import CompactVocab, make_optimizer, mask_gradients
from vlsparse.training.objectives import OBJECTIVES, Context, Objective, PretrainHeads, Step

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
        cfg: steps, batch size (the global batch under torchrun), learning rates, warm-up, seed, device, and
            ``adversarial`` (None: standard pre-training; see the module docstring).
        progress: ``progress(done_steps, running)`` after each step; ``running`` is objective -> {"loss", "acc"}
            (exponential moving averages of the clean passes, over the global batch; acc absent for regression
            objectives).

    Returns:
        the final running statistics (as given to ``progress``).

    Raises:
        ValueError: the backbone lacks a perturbed modality (before the first step).
        SameOnEveryRank: under torchrun, a global batch that the number of processes does not divide.
    """
    device = torch.device(cfg.device)
    adversarial = cfg.adversarial
    for m in adversarial.modalities if adversarial is not None else ():
        perturbation_point(model, m)
    distributed.local_batch_size(cfg.batch_size)  # refuse a global batch that the world size does not divide
    model.to(device).train()
    heads.to(device).train()
    distributed.broadcast_parameters(model, heads)  # one starting point on every rank (DDP does this when wrapping)
    hooks = mask_gradients(model, mask, device)
    names, probs = list(objectives), np.array(list(objectives.values()))
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + distributed.rank())  # dropout: each rank draws for its own rows
    running: dict[str, dict] = {}
    try:
        with _compact(model, data, _special_ids(model)) as ctx:
            opt, sched = make_optimizer(model, cfg, extra=heads)
            loader = _forever(data, cfg.batch_size, cfg.seed)
            for step in range(cfg.steps):
                name = names[int(rng.choice(len(names), p=probs))]
                batch = _on_device(next(loader), ctx, device)
                opt.zero_grad(set_to_none=True)
                out = _backward(model, heads, OBJECTIVES[name], batch, ctx, gen, adversarial)
                distributed.average_gradients(model, heads)
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


def _rows(tensors: dict, rows: range) -> dict:
    """The rows ``rows`` (a contiguous range) of every (B, ...) tensor of ``tensors``."""
    return {k: v[rows.start:rows.stop] for k, v in tensors.items()}


def _backward(model, heads, objective: Objective, batch: dict, ctx: Context, gen: torch.Generator,
              adversarial) -> Step:
    """One step's gradients of ``objective`` on this rank's share of the global ``batch`` (accumulated into the
    parameters' ``.grad``, weighted so that averaging them over the ranks gives the gradient of the whole batch);
    returns the clean pass's Step with the loss, correct and total of the whole batch."""
    drawn = objective.draw(batch, ctx, gen)  # the random choices of the whole global batch, as one process
    share = distributed.even_share(len(batch["input_ids"]), "captions")
    batch, drawn = _rows(batch, share), _rows(drawn, share)
    clean = objective.loss(model, heads, batch, drawn, ctx)
    whole, weight = clean, 1.0
    if distributed.world_size() > 1:
        n, loss_sum, correct, total = distributed.all_sum([clean.count, clean.value * clean.count, clean.correct,
                                                           clean.total])
        whole = Step(torch.tensor(loss_sum / n), int(correct), int(total), int(n))
        weight = clean.count * distributed.world_size() / n
    if adversarial is None:
        (clean.loss * weight).backward()
    else:
        scale = weight / (adversarial.adv_steps * len(adversarial.modalities))
        for m in adversarial.modalities:  # one modality at a time, as in finetuning
            with perturbation(model, m) as delta:
                for k in range(adversarial.adv_steps):
                    out = objective.loss(model, heads, batch, drawn, ctx)
                    loss = out.loss
                    if out.logits is not None:
                        loss = loss + adversarial.adv_kl_weight * symmetric_kl(out.logits, clean.logits)
                    (loss * scale).backward(retain_graph=True)  # the clean graph serves every pass
                    if k + 1 < adversarial.adv_steps:
                        delta.step(adversarial.adv_lr, adversarial.adv_eps, adversarial.adv_norm)
    return whole


def running_summary(running: dict[str, dict]) -> str:
    """One line of running statistics, e.g. ``itm 0.412/81%  mlm 1.203/64%  mrfr 0.513`` (loss / accuracy)."""
    return "  ".join(f"{n} {r['loss']:.3f}" + (f"/{r['acc']:.0%}" if "acc" in r else "")
                     for n, r in sorted(running.items()))


def _forever(data: CaptionSet, batch_size: int, seed: int) -> Iterator[dict]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=len(data) > batch_size,
                              collate_fn=collate_captions, generator=gen)


def _on_device(batch: dict, ctx: Context, device) -> dict:
    """A collated caption batch on ``device``, its token ids those of the compact table."""
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["input_ids"] = ctx.remap[batch["input_ids"]]
    return batch


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
    (captions). Every objective is measured, whichever were trained. Losses are means over batches of each
    batch's loss. Under torchrun each rank computes a contiguous share of every batch's rows (the random choices
    are made for the whole batch, as in one process) and the shares are summed, so every caption counts once."""
    model.to(device).eval()
    heads.to(device).eval()
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    data.rng = np.random.default_rng(HELDOUT_SEED)
    parts = []  # per (batch, objective): loss x count, count, correct, total of this rank's rows
    with _compact(model, data, _special_ids(model)) as ctx:
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_captions):
            batch = _on_device(batch, ctx, device)
            share = distributed.shard_range(len(batch["input_ids"]))
            for name, objective in OBJECTIVES.items():
                drawn = objective.draw(batch, ctx, gen)  # for the whole batch: the same choices on every rank
                if not share:  # more ranks than rows: nothing to compute here
                    parts.append((name, 0.0, 0, 0, 0))
                    continue
                out = objective.loss(model, heads, _rows(batch, share), _rows(drawn, share), ctx)
                parts.append((name, out.value, out.count, out.correct, out.total))
    sums = {n: [0.0, 0, 0, 0] for n in OBJECTIVES}  # loss x batches, correct, total, batches
    for together in zip(*distributed.gather(parts)):  # one (batch, objective) at a time: every rank's share of it
        name, value, count, correct, total = together[0]
        if len(together) > 1:  # the batch's loss: the shares' losses weighted by their terms
            count = sum(p[2] for p in together)
            value = sum(p[1] * p[2] for p in together) / max(count, 1)
            correct, total = sum(p[3] for p in together), sum(p[4] for p in together)
        s = sums[name]
        s[0], s[1], s[2], s[3] = s[0] + value, s[1] + correct, s[2] + total, s[3] + 1
    acc = lambda n: sums[n][1] / max(sums[n][2], 1)  # noqa: E731
    loss = lambda n: sums[n][0] / max(sums[n][3], 1)  # noqa: E731
    return {"mlm_accuracy": acc("mlm"), "itm_accuracy": acc("itm"), "mrfr_loss": loss("mrfr"),
            "wra_distance": loss("wra"), "n": len(data)}
