"""Re-training a ticket from θ0 (Gan et al. 2022, sec. 3 "Evaluation of Subnetworks").

Reset to θ0 (or a re-initialisation of it, Table 1 rows 6-7), apply the ticket's mask, train the
subnetwork fully and measure it on validation and test. Writes ``OUT/metrics.json`` and the trained
subnetwork ``OUT/weights.safetensors`` (a state_dict with the pruned weights exactly zero), the
input of ``vlsparse export``; :func:`train_ticket` (``vlsparse train-ticket``) adds ``OUT/task.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from vlsparse.atomic import locked, save_weights, write_json
from vlsparse.data import save_task_info
from vlsparse.lottery.runs import TASK_INFO, Run, load_weights
from vlsparse.lottery.setup import setup
from vlsparse.pruning.mask import check_mask_fits
from vlsparse.pruning.reinit import INITS, reinitialize
from vlsparse.pruning.ticket import Ticket, TicketError
from vlsparse.training.adversarial_config import training_meta
from vlsparse.training.distributed import check_same_tensors, main_only
from vlsparse.training.loop import TrainConfig, evaluate, train


def retrain_ticket(ticket: Ticket, model: nn.Module, task, collate: Callable, cfg: TrainConfig, out: str | Path,
                   theta0: str | Path | None = None, init: str = "pretrained", ticket_path: str = "ticket",
                   progress: Callable[[int], None] | None = None, overwrite: bool = False,
                   loaded_as: str = "the model as loaded", save: bool = True) -> dict:
    """Train ``ticket``'s subnetwork of ``model`` and write metrics + weights into ``out``.

    Args:
        ticket: the mask to train.
        model: the model holding θ0 (pre-trained weights + head φ0), or see ``theta0``.
        task: a TaskData (train / val / test datasets).
        cfg: training settings (the same step budget as the IMP rounds for a fair comparison).
        out: output directory (created).
        theta0: a safetensors state_dict loaded into ``model`` first (e.g. RUN/theta0.safetensors).
        init: "pretrained" | "text-only" | "shuffled" | "random" (see :mod:`vlsparse.pruning.reinit`).
        ticket_path: name of the ticket's source, used in error messages and metrics.
        overwrite: replace an existing ``out/metrics.json``.
        loaded_as: what θ0 is when ``theta0`` is None (``metrics["theta0"]``).
        save: write ``out/weights.safetensors`` (False: metrics only, e.g. the many cells of ``vlsparse transfer``).

    Returns:
        the metrics dict: sparsity (fraction), init, val/test metrics (fractions), seconds.

    Raises:
        TicketError: the mask does not fit the model, or ``out`` already holds results.
        RunError: ``theta0`` is missing or does not fit.
    """
    out = Path(out)
    if not overwrite:
        _refuse_finished(out)
    if theta0 is not None:
        load_weights(theta0, model)
    _check_fits(ticket, model, ticket_path)
    check_same_tensors(ticket.mask, f"the mask of {ticket_path}")  # under torchrun: every rank trains one mask
    fresh_flag = getattr(model.config, "img_embeddings_pretrained", None)
    try:
        reinitialize(model, init, seed=cfg.seed)
        t0 = time.time()
        train(model, ticket.mask, task.train, collate, cfg, progress=progress)
        t1 = time.time()
    finally:  # text-only / random marked the image embeddings fresh for this training only
        if fresh_flag is not None:
            model.config.img_embeddings_pretrained = fresh_flag
    metrics = {"ticket": str(ticket_path), "sparsity": ticket.sparsity, "init": init, "steps": cfg.steps,
               "theta0": str(theta0) if theta0 is not None else loaded_as,
               "seed": cfg.seed, "method": ticket.meta.get("method", ""), **training_meta(cfg.adversarial),
               "val": evaluate(model, task.val, collate, device=cfg.device),
               "test": evaluate(model, task.test, collate, device=cfg.device),
               "train_seconds": round(t1 - t0, 1), "eval_seconds": round(time.time() - t1, 1)}
    main_only(lambda: _write(out, model, metrics, save, {"ticket": str(ticket_path), "sparsity": f"{ticket.sparsity:.6f}",
                                                         "init": init, **training_meta(cfg.adversarial)}))
    return metrics


def _refuse_finished(out: Path) -> None:
    """Raise TicketError when ``out`` holds a finished run (its metrics.json)."""
    if main_only((out / "metrics.json").exists):
        raise TicketError(f"{out}: already holds a trained ticket (metrics.json); choose another --out")


def _write(out: Path, model: nn.Module, metrics: dict, save: bool, meta: dict[str, str]) -> None:
    """Write ``out/weights.safetensors`` (if ``save``; ``meta`` in its header), then ``out/metrics.json`` (rank 0
    only under torchrun)."""
    if save:
        save_weights(out / "weights.safetensors", model, metadata=meta)
    write_json(out / "metrics.json", metrics)


def _check_fits(ticket: Ticket, model: nn.Module, ticket_path: str | None) -> None:
    """Raise TicketError (one line naming ``ticket_path``) unless the ticket's mask fits ``model``'s prune scope."""
    try:
        check_mask_fits(ticket.mask, model, ticket_path)
    except ValueError as exc:
        raise TicketError(str(exc)) from exc


@locked("out")
def train_ticket(ticket: str | Path, out: str | Path, model: str, task: str, cfg: TrainConfig,
                 init: str = "pretrained", theta0: str | Path | None = None, data_dir: str | Path | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[dict, object]:
    """``vlsparse train-ticket``: load the ticket file, the task and the model by name, write ``out/task.json``, then
    :func:`retrain_ticket` into ``out`` (its metrics.json, written last, marks the run finished).

    ``theta0`` defaults to the θ0 of the ticket's run directory (:meth:`Run.of_ticket`) when there is one and
    the ticket was found on the same kind of task; otherwise (and for task-agnostic tickets, ``task=pretrain``,
    whose run holds the pre-training model) the freshly loaded ``model`` with a new head φ0 is θ0.
    ``metrics["theta0"]`` says which.

    Returns:
        (the metrics dict of :func:`retrain_ticket`, the TaskData).

    Raises:
        ValueError: unknown ``init``; see also :func:`vlsparse.lottery.setup.setup`.
        TicketError / RunError: as :func:`retrain_ticket`, or a missing or corrupt ticket file.
    """
    if init not in INITS:
        raise ValueError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    t = Ticket.load(ticket)
    if theta0 is None and t.meta.get("task") != "pretrain" and (run := Run.of_ticket(ticket)) is not None:
        theta0 = run.theta0
    net, data, collate = setup(model, task, cfg.seed, data_dir)
    _check_fits(t, net, str(ticket))  # before anything is written into out
    # task.json first: metrics.json, written last, marks a finished run, so a run killed in any write re-runs
    _refuse_finished(Path(out))
    main_only(lambda: save_task_info(data, Path(out) / TASK_INFO))
    metrics = retrain_ticket(t, net, data, collate, cfg, out, theta0=theta0, init=init, ticket_path=str(ticket),
                             progress=progress, loaded_as=f"--model {model} with a new head (seed {cfg.seed})")
    return metrics, data


__all__ = ["retrain_ticket", "train_ticket"]
