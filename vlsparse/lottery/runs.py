"""The run directory: the one place that names a run's files (after open_lth's ``lottery/desc.py`` paths).

A run (``vlsparse find-ticket --out RUN``) holds::

    RUN/config.json                  the configuration (a re-run with another one is refused)
    RUN/theta0.safetensors           θ0: pre-trained weights + freshly initialised head φ0
    RUN/theta_rewind.safetensors     θ_i after ``rewind_step`` dense steps (only with rewinding)
    RUN/task.json                    answers and region-feature statistics (what inference needs)
    RUN/level_XX/ticket.safetensors  the mask at level XX (level 00 is the dense mask)
    RUN/level_XX/weights.safetensors the trained subnetwork of that level (pruned weights exactly 0)
    RUN/level_XX/metrics.json        val/test metrics of training that mask from θ0 (or θ_i); written last
    RUN/summary.csv                  one row per finished level

A level is finished once its metrics.json exists. ``vlsparse train-ticket --out DIR`` writes the same
three level files (``weights.safetensors``, ``metrics.json``, ``task.json``) into DIR.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from vlsparse.atomic import write_json, write_text

CONFIG, THETA0, THETA_REWIND, TASK_INFO = "config.json", "theta0.safetensors", "theta_rewind.safetensors", "task.json"
TICKET, WEIGHTS, METRICS, SUMMARY = "ticket.safetensors", "weights.safetensors", "metrics.json", "summary.csv"
_LEVEL = re.compile(r"level_(\d+)")


@dataclass(frozen=True)
class Run:
    """Paths of one run directory (nothing is checked or created here)."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    config = property(lambda self: self.path / CONFIG)
    theta0 = property(lambda self: self.path / THETA0)
    theta_rewind = property(lambda self: self.path / THETA_REWIND)
    task_info = property(lambda self: self.path / TASK_INFO)
    summary = property(lambda self: self.path / SUMMARY)

    def level(self, k: int) -> Path:
        """RUN/level_XX (k = 0 is the dense level)."""
        return self.path / f"level_{k:02d}"

    def ticket(self, k: int) -> Path:
        """Level k's mask, RUN/level_XX/ticket.safetensors."""
        return self.level(k) / TICKET

    def weights(self, k: int) -> Path:
        """Level k's trained weights, RUN/level_XX/weights.safetensors."""
        return self.level(k) / WEIGHTS

    def metrics_file(self, k: int) -> Path:
        """Level k's metrics, RUN/level_XX/metrics.json (written last)."""
        return self.level(k) / METRICS

    def finished(self, k: int) -> bool:
        """True when level k's metrics.json (written last) exists."""
        return self.metrics_file(k).is_file()

    def metrics(self, k: int) -> dict:
        """Level k's metrics.json as a dict (fractions in [0, 1])."""
        return json.loads(self.metrics_file(k).read_text())

    def levels(self) -> list[int]:
        """The level numbers that have a directory, ascending."""
        found = (_LEVEL.fullmatch(d.name) for d in self.path.glob("level_*") if d.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    @staticmethod
    def of_ticket(ticket: str | Path) -> "Run | None":
        """The run a ticket file belongs to (RUN/level_XX/ticket.safetensors), if its θ0 is there."""
        run = Run(Path(ticket).parent.parent)
        return run if run.theta0.is_file() else None


class RunError(ValueError):
    """A run directory that cannot be used (other configuration, corrupt files)."""


def check_config(run: str | Path, cfg) -> None:
    """Write RUN/config.json, or check that the existing one equals ``cfg.identity()`` (an IMPConfig).

    Raises:
        RunError: RUN holds a run with another configuration (the message names the fields).
    """
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    path = Run(run).config
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


def write_summary(run: str | Path) -> Path:
    """Rewrite RUN/summary.csv from the finished levels' metrics.json; returns its path.

    Columns: level, sparsity (fraction), then ``val_<metric>`` and ``test_<metric>`` (fractions).
    """
    r = Run(run)
    rows = []
    for level in r.levels():
        if r.finished(level):
            m = r.metrics(level)
            row = {"level": m["level"], "sparsity": round(m["sparsity"], 6)}
            row.update({f"val_{k}": v for k, v in m["val"].items() if k != "n"})
            row.update({f"test_{k}": v for k, v in m["test"].items() if k != "n"})
            rows.append(row)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return write_text(r.summary, buf.getvalue())


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
