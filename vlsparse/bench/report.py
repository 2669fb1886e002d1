"""The report files of a bench: bench.csv rows, bench.json (sessions, machine, rows), summary.md and the plots.

Columns of bench.csv: :data:`COLUMNS` (described in :mod:`vlsparse.bench`); a row is identified by
:data:`KEY`. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from pathlib import Path

import torch

from vlsparse.atomic import atomic_write, write_json, write_text
from vlsparse.bench import BenchError
from vlsparse.runtime.runners import FORMATS
from vlsparse.sparse.kernels.cpu import simd

__all__ = ["COLUMNS", "KEY", "read_rows", "write_rows", "row_key", "read_report", "write_report", "machine_info",
           "format_summary", "plot_report"]

#: bench.csv columns and their types
COLUMNS: dict[str, type] = {
    "session": str, "method": str, "level": int, "sparsity": float, "trained": bool, "format": str, "device": str,
    "dtype": str, "threads": int, "batch_size": int, "tokens": int, "median_ms": float, "p90_ms": float,
    "repeats": int, "tokens_per_s": float, "speedup_vs_dense": float, "speedup_vs_onnx": float,
    "metric_name": str, "metric": float, "run_metric": float, "questions": int, "same_pred": float,
    "max_abs_diff": float, "disk_bytes": int, "weight_mem_bytes": int, "linear_disk_bytes": int,
    "linear_ratio": float, "peak_mem_bytes": int, "model_mem_bytes": int, "steady_mem_bytes": int,
    "memory": str, "cuda_graph": bool,
}
#: the columns that identify a row (a re-run measures only the keys that are missing)
KEY = ("method", "level", "format", "device", "dtype", "threads", "batch_size")


def _parse(value: str, kind: type):
    if value == "" or value is None:
        return None
    if kind is bool:
        return value.lower() == "true"
    return kind(value)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a bench.csv with typed values (None for empty cells); [] when the file does not exist.

    Raises:
        BenchError: the file has other columns (another vlsparse version wrote it).
    """
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if list(reader.fieldnames or []) != list(COLUMNS):
            raise BenchError(f"{path}: has other columns than this version writes; use another --out")
        return [{k: _parse(r[k], COLUMNS[k]) for k in COLUMNS} for r in reader]


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Atomically (re)write bench.csv with ``rows``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else ("true" if r[k] is True else "false" if r[k] is False else r[k])
                         for k in COLUMNS})
    return write_text(path, buf.getvalue())


def row_key(row: dict) -> tuple:
    """The row's values of the :data:`KEY` columns."""
    return tuple(row[k] for k in KEY)


def read_report(path: str | Path) -> dict:
    """The contents of a bench.json ({"format", "sessions": {session: {"machine", "settings"}}, "rows"}),
    or a new report without sessions when the file is missing or is not one."""
    try:
        report = json.loads(Path(path).read_text())
        if isinstance(report.get("sessions"), dict):
            return report
    except (OSError, ValueError, AttributeError):
        pass
    return {"format": "vlsparse-bench-1", "sessions": {}}


def write_report(out: str | Path, report: dict, session: str | None, rows: list[dict], plots: bool = False) -> None:
    """Write OUT/bench.json (``report`` with ``rows``; the ``session``'s machine gets its load_avg_end) and,
    with rows, OUT/summary.md, and with ``plots`` also the PNG plots."""
    out = Path(out)
    if session is not None:
        report["sessions"][session]["machine"]["load_avg_end"] = (list(os.getloadavg())
                                                                  if hasattr(os, "getloadavg") else None)
    report["rows"] = rows
    write_json(out / "bench.json", report)
    if rows:
        skipped = sorted({line for ses in report["sessions"].values()
                          for line in ses.get("settings", {}).get("skipped", [])})
        write_text(out / "summary.md", format_summary(rows, skipped))
    if rows and plots:
        plot_report(rows, out)


def machine_info(device: str, threads: int) -> dict:
    """The machine a session ran on: CPU model, logical CPUs, threads, load average, library versions, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": platform.node(), "platform": platform.platform(), "cpu_model": cpu,
            "logical_cpus": os.cpu_count(), "threads": threads, "device": device,
            "python": platform.python_version(), "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    for mod in ("onnxruntime", "onnx", "numpy", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        info["kernel_simd"] = simd()
    except Exception:  # no compiler: the csr format cannot run either, and says so itself
        info["kernel_simd"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _fmt_mb(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def format_summary(rows: list[dict], skipped: list[str] = ()) -> str:
    """A Markdown table: one line per (method, level, format, dtype) with metric, median ms per
    batch size with the speedup over dense PyTorch in the same dtype, whole-model and pruned-Linear size,
    memory; then one line per ``skipped`` (format, dtype) pair ("FORMAT DTYPE: why"), the pairs not measured."""
    sizes = sorted({r["batch_size"] for r in rows})
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["level"], r["format"], r["dtype"], r["device"]), {})[r["batch_size"]] = r
    head = ["method", "level", "sparsity", "format", "metric"] + [f"b={b} ms (x dense of its dtype)" for b in sizes] + [
        "disk MB", "pruned Linears vs fp32", "model RAM MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {f: i for i, f in enumerate(FORMATS)}
    for key in sorted(groups, key=lambda k: (k[0] != "imp", k[1], order.get(k[2], 9), k[3])):
        by_b = groups[key]
        r = next(iter(by_b.values()))
        cells = [r["method"], str(r["level"]), f"{r['sparsity']:.1%}",
                 r["format"] + ("" if r["dtype"] == "fp32" else f" {r['dtype']}"),
                 "" if r["metric"] is None else f"{r['metric']:.2%}"]
        for b in sizes:
            x = by_b.get(b)
            sp = "" if x is None or x["speedup_vs_dense"] is None else f" ({x['speedup_vs_dense']:.2f}x)"
            cells.append("" if x is None or x["median_ms"] is None else f"{x['median_ms']:.1f}{sp}")
        cells += [_fmt_mb(r["disk_bytes"]), "" if r["linear_ratio"] is None else f"{r['linear_ratio']:.3f}",
                  _fmt_mb(r["model_mem_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] * bool(skipped) + [f"Not measured: {line}" for line in skipped]
    return "\n".join(lines) + "\n"


def plot_report(rows: list[dict], out: str | Path) -> list[Path]:
    """Write metric_vs_sparsity.png, metric_vs_latency.png and size_vs_sparsity.png into ``out``."""
    # matplotlib: the `train` extra; no pyplot: no global backend state (renders with Agg)
    from matplotlib.figure import Figure

    out = Path(out)
    fp32 = [r for r in rows if r["dtype"] == "fp32"]
    first_b = min((r["batch_size"] for r in fp32), default=1)
    formats = [f for f in FORMATS if any(r["format"] == f for r in fp32)]
    ref_fmt = "dense" if "dense" in formats else (formats[0] if formats else "dense")

    def points(method, fmt=ref_fmt, value="metric", scale=100.0):
        """(sparsity in %, value * scale) of one method and format, sorted by sparsity."""
        pts = sorted({(r["sparsity"], r[value]) for r in fp32 if r["method"] == method and r["format"] == fmt
                      and r["batch_size"] == first_b and r[value] is not None})
        return [p[0] * 100 for p in pts], [p[1] * scale for p in pts]

    files = []
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    for method, style, label in (("imp", "o-", "IMP tickets"), ("random", "s--", "random pruning")):
        xs, ys = points(method)
        if xs:
            ax.plot(xs, ys, style, label=label)
    dense = [r["metric"] for r in fp32 if r["method"] == "imp" and r["level"] == 0 and r["metric"] is not None]
    if dense:
        ax.axhline(dense[0] * 100, color="grey", ls=":", label="dense model")
    if not ax.lines:
        ax.text(0.5, 0.5, "no trained weights: no metric", ha="center", transform=ax.transAxes)
    ax.set(xlabel="sparsity (%)", ylabel=f"test {_metric_name(rows)} (%)", title="Metric vs sparsity")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    files.append(_save(fig, out / "metric_vs_sparsity.png"))

    sizes = sorted({r["batch_size"] for r in fp32}) or [1]
    fig = Figure(figsize=(5 * len(sizes), 4.2))
    for i, b in enumerate(sizes):
        ax = fig.add_subplot(1, len(sizes), i + 1)
        for fmt in formats:
            pts = [r for r in fp32 if r["format"] == fmt and r["batch_size"] == b and r["metric"] is not None
                   and r["median_ms"] is not None]
            if pts:
                ax.scatter([r["median_ms"] for r in pts], [r["metric"] * 100 for r in pts], label=fmt)
                for r in pts:
                    ax.annotate(f"{r['sparsity']:.0%}{' rand' if r['method'] == 'random' else ''}",
                                (r["median_ms"], r["metric"] * 100), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set(xlabel=f"median latency per batch of {b} (ms)", ylabel=f"test {_metric_name(rows)} (%)",
               title=f"Metric vs latency, batch {b}")
        ax.grid(alpha=0.3)
        if ax.collections:
            ax.legend(fontsize=8)
    files.append(_save(fig, out / "metric_vs_latency.png"))

    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for fmt in formats:
        ax1.plot(*points("imp", fmt, "disk_bytes", 2.0**-20), "o-", label=fmt)
        ax2.plot(*points("imp", fmt, "linear_ratio", 1.0), "o-", label=fmt)
    ax1.set(xlabel="sparsity (%)", ylabel="MB", title="Whole model on disk")
    ax2.set(xlabel="sparsity (%)", ylabel="x dense fp32", title="Pruned Linear weights as stored")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    files.append(_save(fig, out / "size_vs_sparsity.png"))
    return files


def _metric_name(rows: list[dict]) -> str:
    return next((r["metric_name"] for r in rows if r["metric_name"]), "metric")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


