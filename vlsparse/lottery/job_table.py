"""The main job's table: one row per subnetwork, in the order of Gan et al. (2022) Table 1, mean ± std over seeds.

Scores are fractions in files and percentages in the table. "open" is the metric over every question type but
yes/no, "yes/no" over yes/no questions (:func:`vlsparse.training.loop.by_question_type`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

__all__ = ["RELAXED", "Row", "format_table", "table_rows"]

RELAXED = 0.99  # a relaxed winning ticket keeps >= 99% of the dense metric (Gan et al. 2022, sec. 3)


@dataclass
class Row:
    """One subnetwork trained on the task: what it is (``label``, ``init``, ``paper`` row of Table 1 or "")
    and its test metrics of every seed (``tests``: one metrics dict per seed, fractions)."""

    label: str
    init: str
    paper: str
    sparsity: float
    tests: list[dict]


#: (key, label, init, Table 1 row) of the rows, in order; "imp_<k>" rows are expanded per IMP level
_ORDER = (("dense", "full model (dense)", "θ0", "2"), ("dense_text", "full model (dense)", "θ'0", ""),
          ("imp", "IMP ticket", "θ0", "4"), ("random", "random pruning", "θ0", "5"),
          ("text_only", "IMP mask of θ0", "θ'0", "6"), ("shuffled", "IMP mask of θ0", "θ''0", "7"),
          ("agnostic", "task-agnostic ticket (IMP on pre-training)", "θ0", "Table 2"),
          ("floor", "floor: every prunable weight pruned", "θ0", ""))


def table_rows(results: list[dict]) -> list[Row]:
    """Rows from the per-seed results of :func:`vlsparse.lottery.main_job.one_seed` (key -> metrics.json dict,
    ``imp`` -> list of IMP level metrics), in :data:`_ORDER`."""
    rows = []
    for key, label, init, paper in _ORDER:
        if key == "imp":
            for k in range(1, len(results[0]["imp"])):
                rows.append(Row(label, init, paper, results[0]["imp"][k]["sparsity"],
                                [r["imp"][k]["test"] for r in results]))
        elif key in results[0]:
            rows.append(Row(label, init, paper, results[0][key]["sparsity"], [r[key]["test"] for r in results]))
    return rows


def _cell(values: list[float], fmt: str = "{:.2%}") -> str:
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def format_table(rows: list[Row], metric: str = "vqa_score") -> str:
    """Markdown: subnetwork, init, sparsity, test metric, % of the dense θ0 model (per seed, then mean ± std),
    whether that is >= 99% (a relaxed winning ticket, on the mean), open and yes/no questions."""
    dense = rows[0].tests
    head = (f"| Table 1 row | subnetwork | init | sparsity | test {metric} | % of dense θ0 | >= 99% | open | yes/no |\n"
            "|:--|:--|:--|--:|--:|--:|:--|--:|--:|\n")
    lines = []
    for r in rows:
        score = [t[metric] for t in r.tests]
        share = [t[metric] / d[metric] if d[metric] else 0.0 for t, d in zip(r.tests, dense)]
        parts = [r.paper, r.label, r.init, f"{r.sparsity:.0%}", _cell(score), _cell(share, "{:.1%}"),
                 "yes" if statistics.mean(share) >= RELAXED else "no",
                 _cell([t[f"{metric}:open"] for t in r.tests if f"{metric}:open" in t]),
                 _cell([t[f"{metric}:yes/no"] for t in r.tests if f"{metric}:yes/no" in t])]
        lines.append("| " + " | ".join(parts) + " |")
    return head + "\n".join(lines) + "\n"
