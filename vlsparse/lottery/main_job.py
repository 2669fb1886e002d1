"""The main job: Gan et al. (2022) Table 1 in miniature, from a VL-pre-trained θ0, on one task.

For each seed, ``OUT`` (or ``OUT/seed_<s>`` with several seeds) holds::

    pretrained/              θ0's backbone: ``vlsparse pretrain`` of --model on the corpus (vlsparse.lottery.pretraining)
    imp/                     IMP on the task from θ0 (level 0 = dense θ0), the run directory of vlsparse.lottery.runs
    random/level_XX/         random pruning at the sparsity of IMP level XX (the compared level), from θ0
    text-only/level_00/      the dense model from θ'0 (text weights pre-training started from, fresh image embeddings)
    text-only/level_XX/      IMP level XX's mask (found from θ0) trained from θ'0
    shuffled/level_XX/       that mask trained from θ''0 (θ0 shuffled within each tensor)
    pretrain-imp/            IMP on the pre-training objectives (task-agnostic tickets), rounds of 10% of the
                             pre-training steps (the paper's schedule)
    task-agnostic/level_XX/  its ticket at the compared sparsity trained on the task from θ0
    floor/                   every prunable weight pruned, trained from θ0
    table.md                 this seed's table

and ``OUT/table.md`` the table over all seeds (mean ± std). Every step skips work already on disk, so re-running
the same command resumes. Under torchrun every stage trains on all ranks and rank 0 decides what is on disk and
writes every file (:mod:`vlsparse.training.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlsparse.atomic import locked, write_text
from vlsparse.data import save_task_info
from vlsparse.lottery.config import PRETRAIN, IMPConfig, parse_levels
from vlsparse.lottery.imp import run_imp
from vlsparse.lottery.job_table import Row, format_table, table_rows
from vlsparse.lottery.pretraining import find_pretrain_ticket, run_pretrain
from vlsparse.lottery.retrain import retrain_ticket
from vlsparse.lottery.runs import Run, check_config
from vlsparse.lottery.setup import setup
from vlsparse.pruning.magnitude import random_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.config import TrainConfig
from vlsparse.training.distributed import main_only
from vlsparse.training.pretrain import running_summary


def random_ticket(net: nn.Module, sparsity: float, seed: int = 0, scope: list[str] | None = None,
                  **meta: str) -> Ticket:
    """The random pruning baseline (Gan et al. 2022, Table 1 row 5): a ticket pruning uniformly random weights
    of ``scope`` (default: the prune scope of ``net``) to global ``sparsity`` (a fraction in [0, 1)), reproducible
    from ``seed``. ``meta`` (model, task names) leads the ticket's metadata.

    Raises:
        ValueError: ``sparsity`` outside [0, 1).
    """
    mask = random_prune(ones_mask(net, net.prune_scope() if scope is None else scope), sparsity, seed=seed)
    return Ticket(mask, {**meta, "method": "random", "seed": str(seed), "target_sparsity": f"{sparsity:.6f}"})


def job_levels(levels: str, compare: str, bench_level: float | None) -> tuple[list[float], list[int], int | None]:
    """The main job's levels from its options: IMP sparsities ``levels`` ("0.5,0.7,0.8", fractions after the
    dense level), the level numbers (1 = first pruned level) of the ``compare`` sparsities, and the level
    number of ``bench_level`` (None when there is no bench).

    Raises:
        ValueError: a list that is not comma-separated fractions, or a compare / bench sparsity that is
            not among ``levels``.
    """
    lv = parse_levels(levels, float(levels.split(",")[-1]))
    cmp = parse_levels(compare, float(compare.split(",")[-1]))

    def level_of(s: float, what: str) -> int:
        for i, x in enumerate(lv):
            if abs(x - s) < 1e-9:
                return i + 1
        raise ValueError(f"{what} {s} is not among --levels {lv}")

    compare_idx = [level_of(c, "--compare level") for c in cmp]
    return lv, compare_idx, None if bench_level is None else level_of(bench_level, "--bench-level")


@dataclass
class JobSettings:
    """What the main job adds to the task's IMP configuration.

    base_model: the model pre-training starts from (θ'0's text weights); corpus, objectives, proportions,
    pretrain_steps, pretrain_batch_size: ``vlsparse pretrain``; agnostic_levels: the sparsity levels of IMP on
    pre-training (each round pre-trains ``pretrain_steps // 10`` steps, the paper's 10%), ending at the compared
    level; compare: the level number (1 = first pruned IMP level) at which the baselines are trained.
    """

    base_model: str = "uniter-minilm-l2"
    corpus: str = "easy-vqa-captions"
    objectives: str = "mlm,mrfr,itm,wra"
    proportions: str | None = "2,1,2,1"
    pretrain_steps: int = 1500
    pretrain_batch_size: int = 32
    agnostic_levels: tuple[float, ...] = (0.5, 0.7)
    compare: int = 2


def _retrain(out: Path, name: str, ticket_path: Path, model, task, collate, cfg: TrainConfig, theta0: Path,
             init: str, progress) -> dict:
    """Train ``ticket_path``'s mask from θ0 (``init``) into ``out`` unless finished there; its metrics."""
    done = main_only(lambda: json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file()
                     else None)
    if done is not None:
        return done
    return retrain_ticket(Ticket.load(ticket_path), model, task, collate, cfg, out, theta0=theta0, init=init,
                          ticket_path=str(ticket_path), progress=(lambda s: progress(name, s, cfg.steps))
                          if progress else None)


def baselines(out: Path, model: nn.Module, task, collate: Callable, cfg: IMPConfig, k: int,
              progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict]:
    """The Table 1 baselines at IMP level ``k``, each trained with the IMP rounds' budget: random pruning at the
    same sparsity (row 5), the IMP mask from θ'0 (row 6) and from θ''0 (row 7), the dense θ'0 model, and the
    floor (every prunable weight pruned). Returns name -> metrics; skips what is on disk."""
    imp = Run(out / "imp")
    level = f"level_{k:02d}"
    rand = out / "random" / level / "ticket.safetensors"
    floor = out / "floor" / "ticket.safetensors"

    def tickets() -> None:  # rank 0 writes the random and floor tickets (the others read them after)
        if not rand.exists():
            sparsity = Ticket.load(imp.ticket(k)).sparsity
            random_ticket(model, sparsity, cfg.train.seed, list(Ticket.load(imp.ticket(k)).mask),
                          model=cfg.model, task=cfg.task).save(rand)
        if not floor.exists():
            mask = {n: torch.zeros_like(m) for n, m in Ticket.load(imp.ticket(0)).mask.items()}
            meta = {"model": cfg.model, "task": cfg.task, "method": "floor", "target_sparsity": "1.0"}
            Ticket(mask, meta).save(floor)

    main_only(tickets)
    plan = {"random": (out / "random" / level, rand, "pretrained"),
            "dense_text": (out / "text-only" / "level_00", imp.ticket(0), "text-only"),
            "text_only": (out / "text-only" / level, imp.ticket(k), "text-only"),
            "shuffled": (out / "shuffled" / level, imp.ticket(k), "shuffled"),
            "floor": (out / "floor", floor, "pretrained")}
    return {name: _retrain(d, name, t, model, task, collate, cfg.train, imp.theta0, init, progress)
            for name, (d, t, init) in plan.items()}


def task_agnostic(out: Path, model: nn.Module, task, collate: Callable, cfg: IMPConfig, job: JobSettings,
                  progress: Callable[[str, int, int], None] | None = None) -> dict:
    """IMP on the pre-training objectives from θ0 (``OUT/pretrain-imp``), then its ticket at the last of
    ``job.agnostic_levels`` trained on the task from the task's θ0 (``OUT/task-agnostic``); its metrics."""
    levels = list(job.agnostic_levels)
    pcfg = IMPConfig(model=cfg.model, task=PRETRAIN, levels=levels, corpus=job.corpus, objectives=job.objectives,
                     proportions=job.proportions,
                     train=dataclasses.replace(cfg.train, steps=max(job.pretrain_steps // 10, 1),
                                               warmup=min(cfg.train.warmup, max(job.pretrain_steps // 10, 1)),
                                               batch_size=job.pretrain_batch_size))
    find_pretrain_ticket(out / "pretrain-imp", pcfg, progress=progress)
    k = len(levels)
    return _retrain(out / "task-agnostic" / f"level_{k:02d}", "task-agnostic", Run(out / "pretrain-imp").ticket(k),
                    model, task, collate, cfg.train, Run(out / "imp").theta0, "pretrained", progress)


def one_seed(out: str | Path, cfg: IMPConfig, job: JobSettings,
             progress: Callable[[str, int, int], None] | None = None) -> tuple[dict, object]:
    """Every row of the table for one seed (``cfg.train.seed``) into ``out``: pre-training (θ0), IMP from θ0,
    :func:`baselines` and :func:`task_agnostic`. Returns (key -> metrics, with ``imp`` the IMP levels' list;
    the TaskData). ``cfg.model`` is ignored: the model is ``out/pretrained``."""
    out = Path(out)
    pre = out / "pretrained"
    if not main_only((pre / "config.json").is_file):
        pcfg = dataclasses.replace(cfg.train, steps=job.pretrain_steps, batch_size=job.pretrain_batch_size,
                                   warmup=min(cfg.train.warmup, job.pretrain_steps))
        run_pretrain(job.base_model, job.corpus, pre, pcfg, job.objectives, job.proportions,
                     progress=(lambda s, r: progress("pretrain", s, pcfg.steps, running_summary(r))) if progress else None)
    cfg = dataclasses.replace(cfg, model=str(pre))
    model, task, collate = setup(cfg.model, cfg.task, cfg.train.seed)

    def start() -> None:  # rank 0: refuse another configuration before writing anything
        check_config(out / "imp", cfg)
        save_task_info(task, Run(out / "imp").task_info)

    main_only(start)
    imp = run_imp(out / "imp", model, task, collate, cfg, progress)
    results = {"imp": imp, "dense": imp[0], **baselines(out, model, task, collate, cfg, job.compare, progress)}
    results["agnostic"] = task_agnostic(out, model, task, collate, cfg, job, progress)
    results = {k: results[k] for k in ("imp", "dense", "dense_text", "random", "text_only", "shuffled", "agnostic",
                                       "floor")}
    main_only(lambda: write_text(out / "table.md", format_table(table_rows([results]), task.metric_name)))
    return results, task


@locked("out")
def run_main_job(out: str | Path, cfg: IMPConfig, job: JobSettings, seeds: list[int],
                 progress: Callable[[str, int, int], None] | None = None) -> tuple[list[Row], object, Path]:
    """``vlsparse main-job``: :func:`one_seed` for every seed (into ``out``, or ``out/seed_<s>`` for several), then
    ``out/table.md`` over all seeds. Returns (the rows, the TaskData, the first seed's directory: the one benched).

    Raises:
        RunError: a seed's directory holds a run with another configuration, or corrupt files.
        ValueError / FileNotFoundError: see :func:`vlsparse.lottery.setup.setup` and
            :func:`vlsparse.lottery.pretraining.run_pretrain`.
    """
    out = Path(out)
    dirs = [out] if len(seeds) == 1 else [out / f"seed_{s}" for s in seeds]
    results, task = [], None
    for s, d in zip(seeds, dirs):
        r, task = one_seed(d, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=s)), job, progress)
        results.append(r)
    rows = table_rows(results)
    main_only(lambda: write_text(out / "table.md", format_table(rows, task.metric_name)))
    return rows, task, dirs[0]


__all__ = ["JobSettings", "Row", "baselines", "format_table", "job_levels", "one_seed", "random_ticket",
           "run_main_job", "task_agnostic"]
