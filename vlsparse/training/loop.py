"""One training loop with masked updates, and evaluation.

Training follows the UNITER recipe (ChenRocks/UNITER ``train_vqa.py`` and the other ``train_*.py``): the
task's loss (the dataset's ``objective``, :mod:`vlsparse.data.objective`; binary cross-entropy on soft
answer scores for VQA); AdamW with linear warm-up and linear decay. With ``cfg.adversarial``, each step's
gradients are VILLA's adversarial ones instead (:mod:`vlsparse.training.adversarial`).
Parameters that are new for the task (image embeddings, head: the model's ``head_prefixes``) get
``head_lr``, the pre-trained ones ``lr`` (MEASURED.md: 1e-4 / 1e-3 reached 98.9% on easy-VQA).

Masked updates: pruned weights are zeroed before the first step and their gradients are masked by
a hook, so AdamW's moments stay exactly zero for them, the update m / (sqrt(v) + eps) is zero, and
decoupled weight decay keeps zero at zero: pruned weights are exactly zero after every step
(tests/test_training.py checks this after each step). Unlike the LXMERT ticket code of seed 001,
pruned weights cannot grow back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from vlsparse.data.objective import VQA_OBJECTIVE
from vlsparse.atomic import cpu_state
from vlsparse.pruning.mask import Mask, apply_mask
from vlsparse.training import distributed
from vlsparse.training.adversarial import backward_step
from vlsparse.training.config import TrainConfig


def _batches(dataset: Dataset, collate: Callable, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches: this rank's slice (:class:`~vlsparse.training.distributed.RankBatches`) of global
    batches of ``batch_size``, drawn as ``DataLoader(shuffle=True, generator=seed)`` draws them."""
    gen = torch.Generator().manual_seed(seed)
    distributed.local_batch_size(batch_size)  # refuse a global batch that the world size does not divide
    while True:
        sampler = BatchSampler(RandomSampler(dataset, generator=gen), batch_size, drop_last=len(dataset) > batch_size)
        yield from DataLoader(dataset, batch_sampler=distributed.RankBatches(sampler), collate_fn=collate,
                              generator=gen)


class CompactVocab:
    """Train with only the word-embedding rows of ``used_ids`` (1-D int64, sorted, unique).

    Rows of tokens that no training question uses receive no gradient; leaving them out of the
    optimizer makes AdamW steps cheaper without changing the outputs (MEASURED.md). ``remap``
    (vocab,) int64 maps token ids to rows of the compact table; :meth:`restore` writes the trained
    rows back into the full table and puts it back in the model.
    """

    def __init__(self, model: nn.Module, used_ids: torch.Tensor):
        self.model, self.used = model, used_ids
        self.full = model.get_input_embeddings()
        w = self.full.weight
        self.compact = nn.Embedding(len(used_ids), w.shape[1], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.compact.weight.copy_(w[used_ids.to(w.device)])
        self.remap = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
        self.remap[used_ids.to(w.device)] = torch.arange(len(used_ids), device=w.device)
        model.set_input_embeddings(self.compact)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's state_dict with the full-size word-embedding table."""
        self.restore()
        state = cpu_state(self.model)
        self.model.set_input_embeddings(self.compact)
        return state

    @torch.no_grad()
    def restore(self) -> None:
        self.full.weight[self.used.to(self.full.weight.device)] = self.compact.weight
        self.model.set_input_embeddings(self.full)


def mask_gradients(model: nn.Module, mask: Mask | None, device: torch.device) -> list:
    """Zero the pruned weights of ``model`` (``mask``: name -> bool tensor, True = kept; None: nothing) and
    mask their gradients with hooks, so that AdamW keeps them exactly zero; returns the hook handles
    (``.remove()`` them after training)."""
    hooks = []
    if mask:
        apply_mask(model, mask)
        params = dict(model.named_parameters())
        for name, m in mask.items():
            dm = m.to(device, params[name].dtype)
            hooks.append(params[name].register_hook(lambda g, dm=dm: g * dm))
    return hooks


def make_optimizer(model: nn.Module, cfg: TrainConfig, start_step: int = 0, extra: nn.Module | None = None):
    """AdamW and its linear warm-up / linear decay schedule (UNITER's recipe): ``cfg.lr`` for the pre-trained
    parameters, ``cfg.head_lr`` for the model's new ones (``head_prefixes``) and every parameter of ``extra``
    (e.g. pre-training heads). The schedule starts at ``start_step`` of ``cfg.steps``. Returns (optimizer,
    scheduler)."""
    head = tuple(getattr(model, "head_prefixes", ()))
    groups = [[], []]
    for n, p in model.named_parameters():
        groups[n.startswith(head)].append(p)
    if extra is not None:
        groups[1] += [p for p in extra.parameters() if all(p is not q for q in groups[0] + groups[1])]
    opt = torch.optim.AdamW([{"params": groups[0], "lr": cfg.lr}, {"params": groups[1], "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + start_step + 1) / max(cfg.warmup, 1),
                           max(0.0, (cfg.steps - s - start_step) / max(cfg.steps - cfg.warmup, 1))))
    return opt, sched


def train(model: nn.Module, mask: Mask | None, dataset: Dataset, collate: Callable, cfg: TrainConfig,
          progress: Callable[[int], None] | None = None, snapshot_step: int | None = None,
          start_step: int = 0) -> dict | None:
    """Train ``model`` in place on ``dataset`` for ``cfg.steps`` steps with ``mask`` applied.

    Args:
        model: a vlsparse model (``forward(**batch) -> (B, A) logits``, ``head_prefixes``).
        mask: name -> bool tensor (True = kept) or None for dense training.
        dataset: items batched by ``collate`` into dicts with ``targets`` (B, O) float32; its ``objective``
            gives the loss (default: VQA's).
        progress: called with the number of finished steps after each step.
        snapshot_step: if given, a CPU copy of ``model.state_dict()`` taken after that many steps
            (θ_i for IMP rewinding, Frankle et al. 2020) is returned.
        start_step: resume the learning-rate schedule at this step (training from θ_i runs
            ``cfg.steps - start_step`` steps, Algorithm 1 "train θ_i to step t").

    Returns:
        the snapshot state_dict, or None.
    """
    device = torch.device(cfg.device)
    model.to(device).train()
    hooks = mask_gradients(model, mask, device)
    snapshot = None
    objective = getattr(dataset, "objective", VQA_OBJECTIVE)
    used = sorted({0} | (dataset.used_token_ids() if hasattr(dataset, "used_token_ids") else set()))  # 0: [PAD]
    vocab = CompactVocab(model, torch.tensor(used)) if len(used) > 1 and cfg.compact_vocab else None
    torch.manual_seed(cfg.seed + distributed.rank())  # after CompactVocab: dropout draws the same numbers either way
    net = distributed.wrap(model, device) if cfg.adversarial is None else model  # DDP under torchrun
    try:
        opt, sched = make_optimizer(model, cfg, start_step)
        batches = _batches(dataset, collate, cfg.batch_size, cfg.seed + start_step)
        backward = backward_step(net, objective, cfg.adversarial)  # plain or adversarial (VILLA)
        for step in range(cfg.steps - start_step):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            if vocab is not None:
                batch["input_ids"] = vocab.remap[batch["input_ids"]]
            targets = batch.pop("targets")
            opt.zero_grad(set_to_none=True)
            backward(batch, targets)
            if net is model:  # adversarial steps (several forward passes): averaged here, not by DDP
                distributed.average_gradients(model)
            opt.step()
            sched.step()
            if progress:
                progress(step + 1)
            if snapshot_step is not None and step + 1 == snapshot_step:
                snapshot = vocab.full_state_dict() if vocab else cpu_state(model)
    finally:
        del net
        if vocab is not None:
            vocab.restore()
        for h in hooks:
            h.remove()
        model.eval()
    return snapshot


def _pad_cat(parts: list[torch.Tensor], value: float) -> torch.Tensor:
    """Concatenate (b_i, O_i) tensors along dim 0, padding O to the largest with ``value``."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=value) for p in parts])


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, collate: Callable, batch_size: int = 256,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (Q, O) float32 and targets (Q, O) float32 for every example of ``dataset``, in order.

    Outputs that vary in number between batches (regions) are padded: logits with the float32
    minimum, targets with 0. Under torchrun each rank predicts its contiguous shard
    (:func:`~vlsparse.training.distributed.shard`) and every rank gets all of them, in order (each example once)."""
    model.to(device).eval()
    logits, targets = [], []
    shard = distributed.shard(dataset) if distributed.world_size() > 1 else dataset
    for batch in DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate):
        targets.append(batch.pop("targets"))
        logits.append(model(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
    if distributed.world_size() > 1:
        logits, targets = (sum(parts, []) for parts in zip(*distributed.gather((logits, targets))))
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, 0)
    return _pad_cat(logits, torch.finfo(torch.float32).min), _pad_cat(targets, 0.0)


def evaluate(model: nn.Module, dataset: Dataset, collate: Callable, batch_size: int = 256,
             device: str = "cpu") -> dict[str, float]:
    """The task metrics of ``model`` on ``dataset``: ``{<headline metric>: fraction, <others>..., "n": examples}``.

    The metrics are those of the dataset's ``objective`` (default VQA: ``{"vqa_score", "n"}``, the soft
    target score of the arg-max answer, UNITER/LXMERT); a dataset with its own ``evaluate`` (retrieval:
    :class:`vlsparse.data.dataset.RetrievalSet`) computes them itself (under torchrun each rank scores a share of
    its captions against every image and the rows are gathered in order). Datasets whose examples carry question
    types also get the metric per type (:func:`by_question_type`, e.g. ``vqa_score:yes/no``, ``vqa_score:open``).
    """
    if hasattr(dataset, "score_matrix") and distributed.world_size() > 1:  # retrieval: each rank scores its captions
        part = dataset.score_matrix(model, batch_size, device, rows=distributed.shard_range(len(dataset)))
        return dataset.metrics(np.concatenate(distributed.gather(part)))
    if hasattr(dataset, "evaluate"):
        return dataset.evaluate(model, batch_size=batch_size, device=device)
    logits, targets = predict(model, dataset, collate, batch_size, device)
    objective = getattr(dataset, "objective", VQA_OBJECTIVE)
    out = objective.metrics(logits, targets)
    types = list(getattr(dataset, "question_types", None) or [])
    if logits.shape[0] and any(types) and objective.metric != "ir_r1":
        out.update(by_question_type(objective.scores(logits, targets)[objective.metric], types, objective.metric))
    return out


def by_question_type(scores: torch.Tensor, types: list[str], metric: str) -> dict[str, float]:
    """The mean of per-example ``scores`` (Q,) float32 per question type: ``{"<metric>:<type>": fraction}``, plus
    ``"<metric>:open"`` over every type but "yes/no" when there are yes/no questions (the 87% plateau of
    MEASURED.md is yes/no questions failing while open ones are right)."""
    kinds = sorted({t for t in types if t})
    out = {}
    for t in kinds + (["open"] if "yes/no" in kinds and len(kinds) > 1 else []):
        keep = torch.tensor([(x != "yes/no" and bool(x)) if t == "open" else x == t for x in types])
        out[f"{metric}:{t}"] = float(scores[keep].mean())
    return out


__all__ = ["CompactVocab", "TrainConfig", "evaluate", "make_optimizer", "mask_gradients", "predict", "train"]
