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
from vlsparse.lottery.imp import IMPConfig, run_imp
from vlsparse.lottery.retrain import retrain_ticket
from vlsparse.lottery.runs import Run, check_config
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
        return self.imp / self.dense if self.dense else 0.0

    @property
    def relaxed_winning(self) -> bool:
        return self.imp_of_dense >= RELAXED


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
            mask = random_prune(ones_mask(model, list(imp_ticket.mask)), imp_ticket.sparsity, seed=cfg.train.seed)
            Ticket(mask, {"model": cfg.model, "task": cfg.task, "method": "random", "seed": str(cfg.train.seed),
                          "target_sparsity": f"{imp_ticket.sparsity:.6f}"}).save(tpath)
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


def format_table(rows: list[Row], metric: str = "vqa_score") -> str:
    """Markdown table: sparsity, dense / IMP / random test scores (percent), IMP as % of dense,
    and whether IMP's ticket is a relaxed winning ticket (>= 99% of dense)."""
    head = (f"| sparsity | dense test {metric} | IMP ticket | random pruning | IMP % of dense | "
            "relaxed winning ticket |\n|---:|---:|---:|---:|---:|:---|\n")
    lines = [f"| {r.sparsity:.0%} | {r.dense:.2%} | {r.imp:.2%} | "
             f"{'' if r.random is None else f'{r.random:.2%}'} | {r.imp_of_dense:.1%} | "
             f"{'yes' if r.relaxed_winning else 'no'} |" for r in rows]
    return head + "\n".join(lines) + "\n"
