"""Tables and plots of ``vlsparse transfer`` (:mod:`vlsparse.lottery.transfer`): the transfer matrix and mask overlap.

* ``DIR/transfer.csv``: one row per cell: source, target, level (requested sparsity, fraction), sparsity (actual),
  metric (the target's headline metric name), test (its test value, fraction), val, dense (the target's dense test
  value), pct_of_dense (test / dense x 100), from_run (the IMP level a cell was copied from, else empty), training
  (standard | adversarial: how the cells were trained);
  ``DIR/transfer.md`` the same as a markdown matrix (% of dense, test metric in brackets).
* ``DIR/transfer_heatmap.png``: % of dense, sources x targets, one panel per level; ``DIR/transfer_<target>.png``:
  % of dense against sparsity, one line per source (the layout of Gan et al. 2022, Fig. 3).
* ``DIR/overlap.csv``: level, source_a, source_b, sparsity_a, sparsity_b, iou (|A ∩ B| / |A ∪ B| of the *pruned*
  weights, :func:`vlsparse.pruning.mask.overlap`), random_iou (what two random masks at those sparsities share,
  :func:`vlsparse.pruning.mask.random_overlap`); ``DIR/overlap_heatmap.png``: IoU, one panel per level.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from vlsparse.atomic import atomic_write, write_text
from vlsparse.data.objective import METRICS
from vlsparse.lottery.transfer import DENSE, Source, ticket_at
from vlsparse.pruning.mask import overlap, random_overlap
from vlsparse.pruning.ticket import Ticket

__all__ = ["transfer_rows", "overlap_rows", "write_reports", "format_matrix"]


def _metric(record: dict) -> str:
    """The headline metric of a cell's test metrics (the first of the objectives' METRICS among its keys)."""
    return next((m for m in METRICS if m in record["test"]), next(k for k in record["test"] if k != "n"))


def transfer_rows(records: Sequence[dict], metrics: dict[str, str] | None = None) -> list[dict]:
    """The rows of transfer.csv (module docstring) from :func:`~vlsparse.lottery.transfer.run_transfer`'s records;
    ``metrics``: target -> headline metric name (default: the first metric of each record)."""
    dense = {r["target"]: r for r in records if r["source"] == DENSE}
    rows = []
    for r in records:
        metric = (metrics or {}).get(r["target"]) or _metric(r)
        ref = dense[r["target"]]["test"][metric] if r["target"] in dense else float("nan")
        test = r["test"][metric]
        rows.append({"source": r["source"], "target": r["target"], "level": round(r["level"], 6),
                     "sparsity": round(r["sparsity"], 6), "metric": metric, "test": round(test, 6),
                     "val": round(r["val"][metric], 6), "dense": round(ref, 6),
                     "pct_of_dense": round(100 * test / ref, 2) if ref else float("nan"), "from_run": r["from_run"],
                     "training": r.get("training", "standard")})
    return rows


def overlap_rows(sources: Sequence[Source], levels: Sequence[float]) -> list[dict]:
    """The rows of overlap.csv (module docstring): every pair of sources (in order, a before b) at every level."""
    rows = []
    for level in levels:
        tickets = [Ticket.load(ticket_at(s, level)) for s in sources]
        for i in range(len(sources)):
            for j in range(i + 1, len(sources)):
                a, b = tickets[i], tickets[j]
                rows.append({"level": level, "source_a": sources[i].label, "source_b": sources[j].label,
                             "sparsity_a": round(a.sparsity, 6), "sparsity_b": round(b.sparsity, 6),
                             "iou": round(overlap(a.mask, b.mask), 6),
                             "random_iou": round(random_overlap(a.sparsity, b.sparsity), 6)})
    return rows


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def format_matrix(rows: Sequence[dict]) -> str:
    """Markdown: one line per (source, level), one column per target: "% of dense (test metric %)"."""
    targets = list(dict.fromkeys(r["target"] for r in rows))
    cell = {(r["source"], r["level"], r["target"]): r for r in rows}
    keys = list(dict.fromkeys((r["source"], r["level"]) for r in rows))
    metric = {t: next(r["metric"] for r in rows if r["target"] == t) for t in targets}
    head = "| source | sparsity | " + " | ".join(f"{t} ({metric[t]})" for t in targets) + " |\n"
    head += "|---|---:|" + "---:|" * len(targets) + "\n"
    lines = []
    for source, level in keys:
        vals = []
        for t in targets:
            r = cell.get((source, level, t))
            vals.append("" if r is None else f"{r['pct_of_dense']:.1f}% ({100 * r['test']:.2f})")
        lines.append(f"| {source} | {level:.0%} | " + " | ".join(vals) + " |")
    return head + "\n".join(lines) + "\n"


def _savefig(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _heatmaps(path: Path, panels: list[tuple[str, list[str], list[str], list[list[float]]]], fmt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, rows, cols, values) in zip(axes[0], panels):
        ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(title)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, fmt.format(v), ha="center", va="center", color="white", fontsize=8)
    _savefig(fig, path)
    plt.close(fig)


def _plots(out: Path, rows: list[dict], overlaps: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [s for s in dict.fromkeys(r["source"] for r in rows) if s != DENSE]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    levels = sorted({r["level"] for r in rows if r["source"] != DENSE})
    val = {(r["source"], r["target"], r["level"]): r["pct_of_dense"] for r in rows}
    _heatmaps(out / "transfer_heatmap.png", [
        (f"% of dense at {lv:.0%}", sources, targets,
         [[val.get((s, t, lv), float("nan")) for t in targets] for s in sources]) for lv in levels], "{:.1f}")
    for t in targets:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        for s in sources:
            ax.plot([100 * lv for lv in levels], [val.get((s, t, lv), float("nan")) for lv in levels], marker="o",
                    label=s)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(f"% of dense on {t}")
        ax.set_title(f"target {t}")
        ax.legend(fontsize=8)
        _savefig(fig, out / f"transfer_{t.replace('/', '_')}.png")
        plt.close(fig)
    if overlaps:
        iou = {(o["level"], o["source_a"], o["source_b"]): o["iou"] for o in overlaps}
        iou.update({(lv, b, a): v for (lv, a, b), v in list(iou.items())})
        _heatmaps(out / "overlap_heatmap.png", [
            (f"mask IoU at {lv:.0%} (random {random_overlap(lv, lv):.2f})", sources, sources,
             [[1.0 if a == b else iou.get((lv, a, b), float("nan")) for b in sources] for a in sources])
            for lv in levels], "{:.2f}")


def write_reports(out: str | Path, records: Sequence[dict], sources: Sequence[Source], levels: Sequence[float],
                  plots: bool = True) -> tuple[list[dict], list[dict]]:
    """Write transfer.csv / .md, overlap.csv and (``plots``) the PNGs into ``out``; returns (transfer rows,
    overlap rows)."""
    out = Path(out)
    rows = transfer_rows(records)
    overlaps = overlap_rows(sources, levels)
    write_text(out / "transfer.csv", _csv(rows))
    write_text(out / "transfer.md", format_matrix(rows))
    write_text(out / "overlap.csv", _csv(overlaps))
    if plots:
        _plots(out, rows, overlaps)
    return rows, overlaps
