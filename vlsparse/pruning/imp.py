"""Iterative Magnitude Pruning (Gan et al. 2022, Algorithm 1), level by level, resumable.

A run directory holds::

    RUN/config.json                  the configuration (a re-run with another one is refused)
    RUN/theta0.safetensors           θ0: pre-trained weights + freshly initialised head φ0
    RUN/theta_rewind.safetensors     θ_i after ``rewind_step`` dense steps (only with rewinding)
    RUN/level_XX/ticket.safetensors  the mask at level XX (level 00 is the dense mask)
    RUN/level_XX/weights.safetensors the trained subnetwork of that level (pruned weights exactly 0)
    RUN/level_XX/metrics.json        val/test metrics of training that mask from θ0 (or θ_i)
    RUN/summary.csv                  one row per finished level

Level k: reset to θ0 (θ_i with rewinding), train ``steps`` steps with mask m_k, evaluate, then
prune the trained weights by global magnitude to the next level's sparsity, which gives m_{k+1}.
So the metrics of level k are those of ticket m_k re-trained from θ0 with the IMP step budget
(Algorithm 1: "Return f(x; m ⊙ θ_i)"), and level 0 is the dense model. A level is finished once
its metrics.json exists (written last, atomically); a re-run skips finished levels, in the manner
of open_lth's ``lottery/runner.py``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_write, save_weights, write_json, write_text
from ..training.loop import TrainConfig, evaluate, train
from .magnitude import global_magnitude_prune
from .mask import ones_mask
from .ticket import Ticket


class RunError(ValueError):
    """A run directory that cannot be used (other configuration, corrupt files)."""


def schedule(target: float, step: float = 0.1, rate: float | None = None) -> list[float]:
    """Sparsity levels after level 0 (dense), ending exactly at ``target``.

    Default: 0.1, 0.2, ... (each round removes what is needed to reach the next level).
    ``rate``: remove that fraction of the *remaining* weights per round (Frankle & Carbin 2019):
    s_{k+1} = 1 - (1 - s_k)(1 - rate). Fractions in [0, 1). Raises ValueError outside that range.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {target}")
    levels: list[float] = []
    if rate is not None:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"--rate must be in (0, 1), got {rate}")
        s = 0.0
        while (s := 1.0 - (1.0 - s) * (1.0 - rate)) < target - 1e-9:
            levels.append(round(s, 6))
    else:
        k = 1
        while k * step < target - 1e-9:
            levels.append(round(k * step, 6))
            k += 1
    return levels + [target] if target > 0 else levels


@dataclass
class IMPConfig:
    """What defines a run: everything here must match to resume into an existing RUN."""

    model: str
    task: str
    levels: list[float]
    train: TrainConfig = field(default_factory=TrainConfig)
    rewind_step: int = 0

    def __post_init__(self):
        if any(not 0.0 <= s < 1.0 for s in self.levels) or self.levels != sorted(set(self.levels)):
            raise ValueError(f"sparsity levels must be increasing fractions in [0, 1), got {self.levels}")
        if not 0 <= self.rewind_step < self.train.steps:
            raise ValueError(f"--rewind-step must be in [0, steps={self.train.steps}), got {self.rewind_step}")

    def identity(self) -> dict:
        """The JSON-able fields compared on resume (the device is free to change)."""
        d = asdict(self)
        d["train"] = {k: v for k, v in d["train"].items() if k != "device"}
        return d


def _level_dir(run: Path, k: int) -> Path:
    return run / f"level_{k:02d}"


def check_config(run: Path, cfg: IMPConfig) -> None:
    """Write RUN/config.json, or check that the existing one equals ``cfg``.

    Raises:
        RunError: RUN holds a run with another configuration (the message names the fields).
    """
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunError(f"{path}: unreadable run configuration ({exc})") from exc
        new = json.loads(json.dumps(cfg.identity()))
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise RunError(f"{run}: holds a run with another configuration (differs in {', '.join(diff)}); "
                           "use a new --out directory or the original settings")
    else:
        write_json(path, cfg.identity())


def write_summary(run: Path) -> Path:
    """Rewrite RUN/summary.csv from the finished levels' metrics.json; returns its path.

    Columns: level, sparsity (fraction), then ``val_<metric>`` and ``test_<metric>`` (fractions).
    """
    rows = []
    for d in sorted(run.glob("level_*")):
        if (d / "metrics.json").is_file():
            m = json.loads((d / "metrics.json").read_text())
            row = {"level": m["level"], "sparsity": round(m["sparsity"], 6)}
            row.update({f"val_{k}": v for k, v in m["val"].items() if k != "n"})
            row.update({f"test_{k}": v for k, v in m["test"].items() if k != "n"})
            rows.append(row)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return write_text(run / "summary.csv", buf.getvalue())


def run_imp(run: str | Path, model: nn.Module, task, collate: Callable, cfg: IMPConfig,
            progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """Run (or resume) IMP into directory ``run``; returns the metrics of every level.

    Args:
        run: the run directory (created if missing).
        model: the freshly built model; its current weights become θ0 unless RUN/theta0 exists.
        task: a TaskData (``train``, ``val``, ``test`` datasets).
        collate: batches dataset items.
        cfg: levels (sparsity after each pruning round), training and rewinding settings.
        progress: ``progress(description, done_steps, total_steps)`` after every training step.

    Raises:
        RunError: ``run`` holds a run with another configuration, or corrupt files.
    """
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    check_config(run, cfg)
    scope = model.prune_scope()
    levels = [0.0] + list(cfg.levels)
    theta0 = run / "theta0.safetensors"
    if theta0.exists():
        load_weights(theta0, model)
    else:
        save_weights(theta0, model)
    first = _level_dir(run, 0) / "ticket.safetensors"
    if not first.exists():
        Ticket(ones_mask(model, scope), _meta(cfg, 0, 0.0, {})).save(first)
    rewound = run / "theta_rewind.safetensors"
    results = []
    for k, target in enumerate(levels):
        out = _level_dir(run, k)
        if (out / "metrics.json").exists():
            results.append(json.loads((out / "metrics.json").read_text()))
            continue
        ticket = Ticket.load(out / "ticket.safetensors")
        start = cfg.rewind_step if (cfg.rewind_step and k > 0) else 0
        load_weights(rewound if start else theta0, model)
        t0 = time.time()
        snap = train(model, ticket.mask if k else None, task.train, collate, cfg.train,
                     progress=(lambda s, k=k: progress(f"level {k} ({levels[k]:.0%})", s, cfg.train.steps))
                     if progress else None,
                     snapshot_step=cfg.rewind_step if (cfg.rewind_step and k == 0) else None, start_step=start)
        if snap is not None:
            atomic_write(rewound, lambda tmp: save_file(snap, tmp))
        t1 = time.time()
        dev = cfg.train.device
        metrics = {"level": k, "sparsity": ticket.sparsity, "target_sparsity": target,
                   "val": evaluate(model, task.val, collate, device=dev),
                   "test": evaluate(model, task.test, collate, device=dev),
                   "steps": cfg.train.steps, "rewind_step": cfg.rewind_step,
                   "train_seconds": round(t1 - t0, 1), "eval_seconds": round(time.time() - t1, 1)}
        if k + 1 < len(levels):
            weights = dict(model.named_parameters())
            new = global_magnitude_prune({n: weights[n] for n in scope}, ticket.mask, levels[k + 1])
            Ticket(new, _meta(cfg, k + 1, levels[k + 1], metrics["val"])).save(
                _level_dir(run, k + 1) / "ticket.safetensors", overwrite=True)  # level k+1 is not finished yet
        save_weights(out / "weights.safetensors", model)
        write_json(out / "metrics.json", metrics)
        write_summary(run)
        results.append(metrics)
    return results


def _meta(cfg: IMPConfig, k: int, target: float, val_metric: dict) -> dict[str, str]:
    return {"model": cfg.model, "task": cfg.task, "method": "imp", "target_sparsity": f"{target:.6f}",
            "imp_round": str(k), "rewind_step": str(cfg.rewind_step), "seed": str(cfg.train.seed),
            "val_metric": json.dumps(val_metric)}


def theta_path(run: str | Path) -> Path:
    """RUN/theta0.safetensors (the path; existence not checked)."""
    return Path(run) / "theta0.safetensors"


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load a safetensors state_dict (θ0, trained weights) into ``model``.

    Raises:
        RunError: missing or corrupt file, or keys/shapes that do not match the model.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: weights file not found")
    try:
        state = load_file(str(path))
        model.load_state_dict(state)
    except Exception as exc:
        raise RunError(f"{path}: does not fit the model ({type(exc).__name__}: {str(exc)[:200]})") from exc


__all__ = ["IMPConfig", "RunError", "run_imp", "schedule", "write_summary", "load_weights", "theta_path",
           "check_config"]
