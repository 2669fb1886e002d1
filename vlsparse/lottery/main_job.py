"""The main job: IMP tickets against random pruning on one task (Gan et al. 2022, Table 1 rows 2-5).

Layout of ``OUT``::

    OUT/imp/                 the IMP run directory (vlsparse.lottery.runs); level 0 = dense
    OUT/random/level_XX/     random ticket at the same sparsity as IMP level XX, re-trained from θ0
    OUT/table.md             the comparison table

Every step skips work already on disk, so re-running the same command resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vlsparse.atomic import write_text
from vlsparse.data import save_task_info
from vlsparse.lottery.config import IMPConfig, parse_levels
from vlsparse.lottery.imp import run_imp
from vlsparse.lottery.retrain import retrain_ticket
from vlsparse.lottery.runs import Run, check_config
from vlsparse.lottery.setup import setup
from vlsparse.pruning.magnitude import random_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.pruning.ticket import Ticket

RELAXED = 0.99  # a relaxed winning ticket keeps >= 99% of the dense metric (Gan et al. 2022, sec. 3)


@dataclass
class Row:
    """One line of the comparison table; scores are fractions in [0, 1]."""

    sparsity: float
    dense: float
    imp: float
    random: float | None

    @property
    def imp_of_dense(self) -> float:
        """IMP's test score as a fraction of the dense model's (0.0 when the dense score is 0)."""
        return self.imp / self.dense if self.dense else 0.0

    @property
    def relaxed_winning(self) -> bool:
        """True when IMP keeps at least :data:`RELAXED` of the dense score."""
        return self.imp_of_dense >= RELAXED


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


def random_baselines(out: Path, model: nn.Module, task, collate: Callable, cfg: IMPConfig, levels: list[int],
                     progress: Callable[[str, int, int], None] | None = None) -> dict[int, dict]:
    """Random pruning at the sparsity of each IMP level in ``levels``, re-trained from θ0 with the
    same step budget. Returns level -> metrics. Skips levels already on disk."""
    imp, rand = Run(Path(out) / "imp"), Run(Path(out) / "random")
    results = {}
    for k in levels:
        imp_ticket = Ticket.load(imp.ticket(k))
        if rand.finished(k):
            results[k] = rand.metrics(k)
            continue
        tpath = rand.ticket(k)
        if not tpath.exists():
            random_ticket(model, imp_ticket.sparsity, cfg.train.seed, list(imp_ticket.mask),
                          model=cfg.model, task=cfg.task).save(tpath)
        results[k] = retrain_ticket(Ticket.load(tpath), model, task, collate, cfg.train, rand.level(k),
                                    theta0=imp.theta0, ticket_path=str(tpath),
                                    progress=(lambda s, k=k: progress(f"random {k}", s, cfg.train.steps))
                                    if progress else None)
    return results


def main_job(out: str | Path, model: nn.Module, task, collate: Callable, cfg: IMPConfig, compare_levels: list[int],
             progress: Callable[[str, int, int], None] | None = None) -> list[Row]:
    """Find IMP tickets, train random tickets at ``compare_levels`` (indices into 1..len(levels)),
    write OUT/table.md and return the rows (one per compared level)."""
    out = Path(out)
    check_config(out / "imp", cfg)
    save_task_info(task, Run(out / "imp").task_info)
    imp = run_imp(out / "imp", model, task, collate, cfg, progress)
    rand = random_baselines(out, model, task, collate, cfg, compare_levels, progress)
    metric = task.metric_name
    dense = imp[0]["test"][metric]
    rows = [Row(imp[k]["sparsity"], dense, imp[k]["test"][metric],
                rand[k]["test"][metric] if k in rand else None) for k in range(1, len(imp))]
    write_text(out / "table.md", format_table(rows, metric))
    return rows


def run_main_job(out: str | Path, cfg: IMPConfig, compare_levels: list[int],
                 progress: Callable[[str, int, int], None] | None = None) -> tuple[list[Row], object]:
    """``vlsparse main-job``: load ``cfg``'s task and model by name (:func:`vlsparse.lottery.setup.setup`), then
    :func:`main_job`. Returns (the rows, the TaskData).

    Raises:
        RunError: OUT/imp holds a run with another configuration, or corrupt files.
        ValueError / FileNotFoundError / KeyError: see :func:`vlsparse.lottery.setup.setup`.
    """
    model, data, collate = setup(cfg.model, cfg.task, cfg.train.seed)
    return main_job(out, model, data, collate, cfg, compare_levels, progress), data


def format_table(rows: list[Row], metric: str = "vqa_score") -> str:
    """Markdown table: sparsity, dense / IMP / random test scores (percent), IMP as % of dense,
    and whether IMP's ticket is a relaxed winning ticket (>= 99% of dense)."""
    head = (f"| sparsity | dense test {metric} | IMP ticket | random pruning | IMP % of dense | "
            "relaxed winning ticket |\n|---:|---:|---:|---:|---:|:---|\n")
    lines = [f"| {r.sparsity:.0%} | {r.dense:.2%} | {r.imp:.2%} | "
             f"{'' if r.random is None else f'{r.random:.2%}'} | {r.imp_of_dense:.1%} | "
             f"{'yes' if r.relaxed_winning else 'no'} |" for r in rows]
    return head + "\n".join(lines) + "\n"


__all__ = ["RELAXED", "Row", "format_table", "job_levels", "main_job", "random_baselines", "random_ticket",
           "run_main_job"]
