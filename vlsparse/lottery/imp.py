"""Iterative Magnitude Pruning (Gan et al. 2022, Algorithm 1), level by level, resumable.

The run directory it fills is defined in :mod:`vlsparse.lottery.runs`; what defines a run (:class:`IMPConfig`,
the :func:`schedule` of levels) in :mod:`vlsparse.lottery.config`, re-exported here.

Level k: reset to θ0 (θ_i with rewinding), train ``steps`` steps with mask m_k, evaluate, then
prune the trained weights by global magnitude to the next level's sparsity, which gives m_{k+1}.
So the metrics of level k are those of ticket m_k re-trained from θ0 with the IMP step budget
(Algorithm 1: "Return f(x; m ⊙ θ_i)"), and level 0 is the dense model. A level is finished once
its metrics.json exists (written last, atomically); a re-run skips finished levels, in the manner
of open_lth's ``lottery/runner.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from vlsparse.atomic import atomic_write, locked, save_weights, write_json
from vlsparse.data import save_task_info
from vlsparse.lottery.config import PRETRAIN, IMPConfig, schedule
from vlsparse.lottery.runs import Run, check_config, load_weights, write_summary
from vlsparse.lottery.setup import setup
from vlsparse.pruning.blocks import check_block, parse_block
from vlsparse.pruning.magnitude import global_magnitude_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.pruning.reinit import INITS, reinitialize
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.adversarial_config import training_meta
from vlsparse.training.distributed import check_same_tensors, main_only
from vlsparse.training.loop import evaluate, train


class TaskRounds:
    """What an IMP round trains and measures on a task: :func:`~vlsparse.training.loop.train` on ``task.train``,
    :func:`~vlsparse.training.loop.evaluate` on val and test. (Pre-training rounds:
    :class:`vlsparse.lottery.pretraining.PretrainRounds`.)"""

    def __init__(self, task, collate: Callable):
        self.task, self.collate = task, collate

    def train(self, model: nn.Module, mask, cfg: IMPConfig, progress: Callable[[int], None] | None,
              snapshot_step: int | None, start_step: int) -> dict | None:
        """Train ``model`` with ``mask`` for ``cfg.train.steps``; returns the θ_i snapshot, if asked."""
        return train(model, mask, self.task.train, self.collate, cfg.train, progress=progress,
                     snapshot_step=snapshot_step, start_step=start_step)

    def evaluate(self, model: nn.Module, device: str) -> dict:
        """``{"val": metrics, "test": metrics}`` (fractions)."""
        return {"val": evaluate(model, self.task.val, self.collate, device=device),
                "test": evaluate(model, self.task.test, self.collate, device=device)}


@locked("run")
def run_imp(run: str | Path, model: nn.Module, task, collate: Callable, cfg: IMPConfig,
            progress: Callable[[str, int, int], None] | None = None, rounds=None) -> list[dict]:
    """Run (or resume) IMP into directory ``run``; returns the metrics of every level.

    Args:
        run: the run directory (created if missing).
        model: the freshly built model; its current weights become θ0 unless RUN/theta0 exists.
        task: a TaskData (``train``, ``val``, ``test`` datasets).
        collate: batches dataset items.
        cfg: levels (sparsity after each pruning round), training and rewinding settings.
        progress: ``progress(description, done_steps, total_steps)`` after every training step.
        rounds: what a round trains and measures (default :class:`TaskRounds` of ``task``; IMP on pre-training:
            :class:`vlsparse.lottery.pretraining.PretrainRounds`).

    Raises:
        RunError: ``run`` holds a run with another configuration, or corrupt files.
    """
    run = Run(run)
    rounds = rounds or TaskRounds(task, collate)
    scope = model.prune_scope()
    params = dict(model.named_parameters())
    check_block({n: tuple(params[n].shape) for n in scope}, parse_block(cfg.block))  # before any training
    levels = [0.0] + list(cfg.levels)
    theta0, first = run.theta0, run.ticket(0)

    def start() -> bool:  # rank 0 only (vlsparse.training.distributed): the others wait for its files
        check_config(run.path, cfg)
        existed = theta0.exists()
        if not existed:
            save_weights(theta0, model)
        if not first.exists():
            Ticket(ones_mask(model, scope), _meta(cfg, 0, 0.0, {})).save(first)
        return existed

    if main_only(start):
        load_weights(theta0, model)
    rewound = run.theta_rewind
    results = []
    for k, target in enumerate(levels):
        if main_only(lambda k=k: run.finished(k)):  # every rank resumes where rank 0's files say
            results.append(main_only(lambda k=k: run.metrics(k)))
            continue
        ticket = Ticket.load(run.ticket(k))
        check_same_tensors(ticket.mask, f"the mask of level {k}")
        start = cfg.rewind_step if (cfg.rewind_step and k > 0) else 0
        load_weights(rewound if start else theta0, model)
        t0 = time.time()
        snap = rounds.train(model, ticket.mask if k else None, cfg,
                            (lambda s, k=k: progress(f"level {k} ({levels[k]:.0%})", s, cfg.train.steps))
                            if progress else None,
                            cfg.rewind_step if (cfg.rewind_step and k == 0) else None, start)
        if snap is not None:
            main_only(lambda: atomic_write(rewound, lambda tmp: save_file(snap, tmp)))
        t1 = time.time()
        metrics = {"level": k, "sparsity": ticket.sparsity, "target_sparsity": target,
                   **rounds.evaluate(model, cfg.train.device), "steps": cfg.train.steps, "rewind_step": cfg.rewind_step,
                   "train_seconds": round(t1 - t0, 1), "eval_seconds": round(time.time() - t1, 1)}
        new = None
        if k + 1 < len(levels):
            weights = dict(model.named_parameters())
            new = global_magnitude_prune({n: weights[n] for n in scope}, ticket.mask, levels[k + 1],
                                         parse_block(cfg.block))
            check_same_tensors(new, f"the mask computed for level {k + 1}")
        main_only(lambda k=k, new=new, metrics=metrics: _finish_level(run, model, cfg, levels, k, new, metrics))
        results.append(metrics)
    return results


def _finish_level(run: Run, model: nn.Module, cfg: IMPConfig, levels: list[float], k: int, new, metrics: dict) -> None:
    """Write level k's files (rank 0 only): the next level's ticket ``new`` (if any), weights, metrics (last), the
    summary."""
    if new is not None:
        Ticket(new, _meta(cfg, k + 1, levels[k + 1], metrics["val"])).save(
            run.ticket(k + 1), overwrite=True)  # level k+1 is not finished yet
    save_weights(run.weights(k), model)
    write_json(run.metrics_file(k), metrics)
    write_summary(run.path)


def _meta(cfg: IMPConfig, k: int, target: float, val_metric: dict) -> dict[str, str]:
    extra = {"objectives": cfg.objectives, "corpus": cfg.corpus} if cfg.task == PRETRAIN else {}
    if cfg.block != "1x1":
        extra["block"] = cfg.block  # the ticket's masks are made of whole blocks of this shape
    return {"model": cfg.model, "task": cfg.task, "method": "imp", "target_sparsity": f"{target:.6f}",
            "imp_round": str(k), "rewind_step": str(cfg.rewind_step), "seed": str(cfg.train.seed),
            "val_metric": json.dumps(val_metric), "init": cfg.init, **extra, **training_meta(cfg.train.adversarial)}


@locked("run")
def find_ticket(run: str | Path, cfg: IMPConfig, data_dir: str | Path | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> tuple[list[dict], object]:
    """``vlsparse find-ticket``: load ``cfg``'s task and model, then run (or resume) IMP into ``run``.

    The configuration is checked against RUN/config.json before anything is written; RUN/task.json
    gets the task's answers and feature statistics (for ``vlsparse export``).

    Returns:
        (the metrics of every level, as :func:`run_imp`; the TaskData).

    Raises:
        RunError: ``run`` holds a run with another configuration, or corrupt files.
        ValueError / FileNotFoundError / KeyError: see :func:`vlsparse.lottery.setup.setup`.
    """
    if cfg.task == PRETRAIN:
        from vlsparse.lottery.pretraining import find_pretrain_ticket

        return find_pretrain_ticket(run, cfg, data_dir, progress)
    reinit_check(cfg.init)
    model, data, collate = setup(cfg.model, cfg.task, cfg.train.seed, data_dir)
    main_only(lambda: check_config(run, cfg))  # refuse another configuration before writing anything
    start_from(model, cfg)
    main_only(lambda: save_task_info(data, Run(run).task_info))
    return run_imp(run, model, data, collate, cfg, progress), data


def reinit_check(init: str) -> None:
    """Raise ValueError naming --init unless ``init`` is one of :data:`vlsparse.pruning.reinit.INITS`."""
    if init not in INITS:
        raise ValueError(f"--init must be one of {', '.join(INITS)}, got {init!r}")


def start_from(model: nn.Module, cfg: IMPConfig) -> None:
    """Put IMP's θ0 into ``model``: ``cfg.theta0`` (a safetensors state_dict) if given, then the ``cfg.init``
    re-initialisation (:func:`vlsparse.pruning.reinit.reinitialize`; θ'0, θ''0, random). A run that already has
    its θ0 file ignores this (the file is loaded instead).

    Raises:
        RunError: ``cfg.theta0`` is missing or does not fit the model.
    """
    if cfg.theta0 is not None:
        load_weights(cfg.theta0, model)
    reinitialize(model, cfg.init, seed=cfg.train.seed)


__all__ = ["IMPConfig", "TaskRounds", "find_ticket", "reinit_check", "run_imp", "schedule", "start_from"]
