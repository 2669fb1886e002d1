"""Benchmark a run's tickets as deployable models: accuracy, latency, memory and size (``vlsparse bench``).

For every level of a run (the IMP levels, level 0 being the dense model, and the random-pruning
levels of a main job, ``OUT/random/level_XX``) and every format, :func:`bench_run` builds the model
in a temporary directory and measures it on one device:

    dense        the masked model in PyTorch (nn.Linear holding the pruned zeros): the reference
    csr          export_csr + load_sparse: SparseLinear with our C++ kernel on the CPU, Triton on CUDA
    onnx         export_onnx, stock onnxruntime (dense MatMuls with the zeros)
    onnx-sparse  the same graph with every Linear of >= 50% zeros as vlsparse.SparseLinear (our custom op)

Weights: the level's trained subnetwork (``level_XX/weights.safetensors``) where there is one, else
θ0 (``RUN/theta0.safetensors``) under the level's mask, which is enough for latency, memory and size
(no metric is reported for it).

Columns of ``REPORT/bench.csv`` (one row per level x format x dtype x batch size; fractions in
[0, 1], times in ms, sizes in bytes):

    session, method (imp | random), level, sparsity, trained, format, device, dtype, threads,
    batch_size, tokens (text tokens + regions in the batch, padding excluded),
    median_ms, p90_ms, repeats: end-to-end time of one batch (host tensors in, host logits out)
        over ``repeats`` calls after ``warmup`` calls. All formats of a level are timed in one
        process, interleaved call by call (round robin, rotating order), on the same inputs;
    tokens_per_s: tokens / median time;
    speedup_vs_dense, speedup_vs_onnx: median of the dense PyTorch (resp. onnxruntime dense) model of
        the same level and dtype / this median, both measured in that same process and round robin;
    metric_name, metric: the task metric on the first ``max_questions`` test questions (trained
        weights only); run_metric: the test metric the run recorded (its metrics.json, whole split);
    questions, same_pred, max_abs_diff: on those questions, the fraction of arg-max answers equal to
        the masked dense PyTorch model's (fp32, same device) and the largest absolute logit difference;
    disk_bytes: the format's model files (config.json, model.safetensors or model.onnx[.data]);
        weight_mem_bytes: weight tensors the runtime holds (PyTorch parameters and buffers, ONNX
        initializers); linear_disk_bytes: the pruned Linear weights as
        stored (dense fp32, CSR or bitmask + values, CSR initializers); linear_ratio: that over their
        dense fp32 size;
    peak_mem_bytes, model_mem_bytes, memory: "rss-subprocess": peak RSS of a fresh Python process
        that imports torch and onnxruntime, loads the format and runs the largest batch, and that
        peak minus the process's RSS before loading; "rss-delta": the same delta measured in this
        process (peak reset through /proc/self/clear_refs; no peak column); "cuda-allocated":
        torch.cuda.max_memory_allocated() and its increase over loading and the largest batch;
    cuda_graph: whether the CUDA timing replayed a CUDA graph.

``REPORT/bench.json`` holds the same rows and, per session, the machine (CPU model, logical CPUs,
threads, load average before and after, torch / onnxruntime / onnx versions, GPU name) and the
settings. Plots (PNG): ``metric_vs_sparsity.png`` (IMP vs random pruning vs dense),
``metric_vs_latency.png`` (one panel per batch size), ``size_vs_sparsity.png`` (whole model on disk
and pruned-Linear ratio). ``REPORT/summary.md`` is a Markdown table of the same numbers.

Interrupting keeps every row already written (the CSV is rewritten atomically after each row,
bench.json and summary.md after each level, the plots at the end); a re-run with the same ``--out``
measures only the rows that are missing, and a run with nothing missing rewrites the report files.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlsparse.atomic import atomic_write, save_weights, write_json, write_text

FORMATS = ("dense", "csr", "onnx", "onnx-sparse")
DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MEMORY_MODES = ("subprocess", "delta", "off")
ONNX_MIN_SPARSITY = 0.5  # onnx-sparse converts Linears with at least this fraction of zeros (export default)
EVAL_BATCH = 64
INPUTS = ("input_ids", "attention_mask", "img_feat", "img_pos", "img_mask")

#: bench.csv columns and their types
COLUMNS: dict[str, type] = {
    "session": str, "method": str, "level": int, "sparsity": float, "trained": bool, "format": str, "device": str,
    "dtype": str, "threads": int, "batch_size": int, "tokens": int, "median_ms": float, "p90_ms": float,
    "repeats": int, "tokens_per_s": float, "speedup_vs_dense": float, "speedup_vs_onnx": float,
    "metric_name": str, "metric": float, "run_metric": float, "questions": int, "same_pred": float,
    "max_abs_diff": float, "disk_bytes": int, "weight_mem_bytes": int, "linear_disk_bytes": int,
    "linear_ratio": float, "peak_mem_bytes": int, "model_mem_bytes": int, "memory": str, "cuda_graph": bool,
}
KEY = ("method", "level", "format", "device", "dtype", "threads", "batch_size")


class BenchError(ValueError):
    """Bad benchmark input: a run without levels, an unknown format, a device that is not there."""


# ------------------------------------------------------------------------------------------------
# The run's levels
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """One model to benchmark: a level of the IMP run or of the random-pruning baseline.

    ``weights``: the trained subnetwork when ``trained``, else θ0 (the mask is applied on load).
    ``metrics``: the level's metrics.json (empty when there is none).
    """

    method: str
    level: int
    ticket: Path
    weights: Path
    trained: bool
    metrics: dict = field(default_factory=dict, compare=False, hash=False)


def find_levels(run: str | Path, levels: Sequence[int] | None = None) -> tuple[dict, list[Level]]:
    """The run's configuration ({"model", "task", ...}) and its levels, IMP first, then random pruning.

    ``run``: a ``find-ticket`` run directory (RUN/level_XX), its main-job parent OUT (OUT/imp and
    OUT/random) or OUT/imp. ``levels``: keep only these level numbers.

    Raises:
        FileNotFoundError: ``run`` is not a directory.
        BenchError: no level with a ticket, a level without weights nor θ0, or no model/task recorded.
    """
    from vlsparse.pruning.ticket import Ticket

    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: directory not found")
    imp = run / "imp" if (run / "imp").is_dir() else run
    rand = imp.parent / "random" if imp.name == "imp" else imp / "random"
    theta0 = imp / "theta0.safetensors"
    found: list[Level] = []
    for method, root in (("imp", imp), ("random", rand)):
        for d in sorted(root.glob("level_*")) if root.is_dir() else []:
            if not (d / "ticket.safetensors").is_file() or not d.name[6:].isdigit():
                continue
            k = int(d.name[6:])
            if levels is not None and k not in levels:
                continue
            trained = (d / "weights.safetensors").is_file()
            if not trained and not theta0.is_file():
                raise BenchError(f"{d}: has neither weights.safetensors nor {theta0} to build the model from")
            metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
            found.append(Level(method, k, d / "ticket.safetensors", d / "weights.safetensors" if trained else theta0,
                               trained, metrics))
    if not found:
        which = "" if levels is None else f" among --levels {','.join(map(str, levels))}"
        raise BenchError(f"--run {run}: no levels to benchmark{which} (expected RUN/level_XX/ticket.safetensors "
                         "from find-ticket, or OUT/imp/level_XX from main-job)")
    cfg = json.loads((imp / "config.json").read_text()) if (imp / "config.json").is_file() else {}
    if not cfg.get("model") or not cfg.get("task"):
        meta = Ticket.load(found[0].ticket).meta
        cfg = {**cfg, "model": cfg.get("model") or meta.get("model"), "task": cfg.get("task") or meta.get("task")}
    if not cfg.get("model"):
        raise BenchError(f"{imp}: no config.json and the tickets do not name their model")
    return cfg, found


def masked_model(model_name: str, level: Level) -> tuple[nn.Module, dict]:
    """The level's model (eval mode, fp32, CPU) with its weights loaded and the mask applied; and the mask.

    Raises:
        ValueError (RunError, CheckpointError, TicketError, ExportError): weights or ticket that do not fit.
    """
    from vlsparse.export.exporters import masked_copy, model_from_weights
    from vlsparse.pruning.ticket import Ticket

    mask = Ticket.load(level.ticket).mask
    return masked_copy(model_from_weights(model_name, level.weights), mask, str(level.ticket)), mask


# ------------------------------------------------------------------------------------------------
# Formats: write, load, size
# ------------------------------------------------------------------------------------------------
def export_formats(model: nn.Module, mask: dict, formats: Sequence[str], workdir: str | Path) -> dict[str, Path]:
    """Write ``formats`` of the masked ``model`` under ``workdir`` (one directory each); return format -> dir.

    "dense" (config.json + model.safetensors of the masked state) is always written: it is the
    reference. "onnx-sparse" is made from the "onnx" export by vlsparse.export.onnx_sparse.sparsify_onnx
    (min_sparsity = :data:`ONNX_MIN_SPARSITY`), so "onnx" is written with it.
    """
    import onnx

    from vlsparse.export.exporters import export_csr, export_onnx, save_onnx
    from vlsparse.runtime.bundle import ONNX_FILE
    from vlsparse.export.onnx_sparse import sparsify_onnx

    work = Path(workdir)
    paths = {"dense": work / "dense"}
    paths["dense"].mkdir(parents=True)
    (paths["dense"] / "config.json").write_text(model.config.to_json_string(use_diff=False))
    save_weights(paths["dense"] / "model.safetensors", model)
    if "csr" in formats:
        paths["csr"] = export_csr(model, mask, work / "csr")
    if "onnx" in formats or "onnx-sparse" in formats:
        paths["onnx"] = export_onnx(model, mask, work / "onnx")
    if "onnx-sparse" in formats:
        proto = sparsify_onnx(onnx.load(str(paths["onnx"] / ONNX_FILE)), min_sparsity=ONNX_MIN_SPARSITY)
        d = paths["onnx-sparse"] = work / "onnx-sparse"
        d.mkdir()
        save_onnx(proto, d)
        (d / "config.json").write_text((paths["onnx"] / "config.json").read_text())
    return paths


@dataclass
class Runner:
    """A loaded format. ``logits(batch)`` runs one batch end to end: a dict of host tensors as
    :func:`vlsparse.data.collate` makes them -> (B, A) float32 CPU logits.

    ``feed`` (host tensors -> the runtime's inputs), ``call`` (inputs -> raw output) and ``fetch``
    (raw output -> CPU float32 tensor) are its three steps; ``module`` is the nn.Module of the
    PyTorch formats (None for onnxruntime); ``weight_bytes`` the bytes of its weight tensors.
    """

    fmt: str
    feed: Callable[[dict], Any]
    call: Callable[[Any], Any]
    fetch: Callable[[Any], torch.Tensor]
    weight_bytes: int
    module: nn.Module | None = None

    def logits(self, batch: dict) -> torch.Tensor:
        return self.fetch(self.call(self.feed(batch)))


def load_format(fmt: str, path: str | Path, device: str = "cpu", dtype: str = "fp32",
                threads: int | None = None, spin: bool = True) -> Runner:
    """Load a directory written by :func:`export_formats` as a :class:`Runner`.

    PyTorch formats run under ``torch.inference_mode`` on ``device`` in ``dtype`` ("fp32" | "fp16";
    the csr format stores fp16 values and computes in fp32); "csr" uses the C++ kernel on the CPU
    and the Triton kernel on CUDA. ONNX formats run in onnxruntime with ``threads`` intra-op threads
    (CUDAExecutionProvider on "cuda"), "onnx-sparse" with the vlsparse custom-op library;
    ``spin=False`` turns off the spin-waiting of onnxruntime's intra-op threads
    (session.intra_op.allow_spinning = 0), which helps on a machine shared with other work.
    """
    path = Path(path)
    if fmt in ("dense", "csr"):
        if fmt == "dense":
            from safetensors.torch import load_file

            from vlsparse.models.registry import model_from_config

            model = model_from_config(json.loads((path / "config.json").read_text()))
            model.load_state_dict(load_file(str(path / "model.safetensors")))
        else:
            from vlsparse.runtime.load import load_sparse

            model = load_sparse(path, backend="cpu" if device == "cpu" else "triton")
        model = model.to(device=device, dtype=DTYPES[dtype]).eval()
        tensors = [*model.parameters(), *model.buffers()]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)

        def feed(batch):
            return {k: batch[k].to(device, DTYPES[dtype] if batch[k].is_floating_point() else None)
                    for k in INPUTS}

        def call(inputs):
            with torch.inference_mode():
                return model(**inputs)

        return Runner(fmt, feed, call, lambda y: y.float().cpu(), nbytes, model)
    if fmt not in ("onnx", "onnx-sparse"):
        raise BenchError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    import onnxruntime as ort

    from vlsparse.runtime.bundle import ONNX_FILE
    from vlsparse.runtime.ort import ort_session

    file = path / ONNX_FILE
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if fmt == "onnx":
        if threads:
            so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
        sess = ort.InferenceSession(str(file), so, providers=providers)
    else:
        sess = ort_session(file, providers=providers, threads=threads, sess_options=so)
    names = [i.name for i in sess.get_inputs()]
    return Runner(fmt, lambda b: {k: b[k].numpy() for k in names}, lambda f: sess.run(None, f)[0],
                  torch.from_numpy, onnx_initializer_bytes(file))


def onnx_initializer_bytes(file: str | Path) -> int:
    """Bytes of all initializers of an ONNX model (those in external data files included)."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(file), load_external_data=False)
    return sum(math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in proto.graph.initializer)


def safetensors_sizes(file: str | Path) -> dict[str, int]:
    """Tensor name -> bytes, read from a safetensors file's header (no data is loaded)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def model_file_bytes(path: str | Path) -> int:
    """Size of a format directory's model files: config.json and model.* (safetensors, onnx, onnx.data);
    bundle extras (manifest, tokenizer) are not counted."""
    return sum(p.stat().st_size for p in Path(path).iterdir()
               if p.is_file() and (p.name == "config.json" or p.name.startswith("model.")))


def format_sizes(paths: dict[str, Path], mask: dict) -> dict[str, dict[str, int | float]]:
    """format -> {disk_bytes, linear_disk_bytes, linear_ratio} for the directories of :func:`export_formats`.

    linear_disk_bytes: the pruned Linears' tensors in model.safetensors (dense, csr); for the ONNX
    formats the initializer bytes minus those of everything else, i.e. minus (the dense ONNX
    model's initializer bytes - the dense fp32 Linears).
    """
    from vlsparse.runtime.bundle import ONNX_FILE

    dense_linear = sum(m.numel() * 4 for m in mask.values())
    out = {}
    for fmt, d in paths.items():
        if fmt in ("dense", "csr"):
            sizes = safetensors_sizes(d / "model.safetensors")
            linear = sum(b for k, b in sizes.items() if any(k == n or k.startswith(n + ".") for n in mask))
        else:
            other = onnx_initializer_bytes(paths["onnx"] / ONNX_FILE) - dense_linear
            linear = onnx_initializer_bytes(d / ONNX_FILE) - other
        out[fmt] = {"disk_bytes": model_file_bytes(d), "linear_disk_bytes": int(linear),
                    "linear_ratio": linear / dense_linear if dense_linear else float("nan")}
    return out


# ------------------------------------------------------------------------------------------------
# Latency and memory
# ------------------------------------------------------------------------------------------------
def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``repeats`` rounds that
    call every function once (the order rotates by one each round), so slow phases of a shared
    machine hit every function alike."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def cuda_graph_call(runner: Runner, batch: dict) -> Callable[[], torch.Tensor] | None:
    """A function that copies ``batch`` into static inputs, replays a captured CUDA graph of the
    runner's module and returns the CPU logits; None when the module cannot be captured."""
    if runner.module is None:
        return None
    static = runner.feed(batch)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                runner.call(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = runner.call(static)
    except Exception:  # kernels that sync with the host or allocate cannot be captured
        torch.cuda.synchronize()
        return None

    def run():
        for k, v in runner.feed(batch).items():
            static[k].copy_(v)
        graph.replay()
        return out.float().cpu()

    return run


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back to the OS (glibc)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


def probe_memory(fmt: str, path: str | Path, batch: dict, device: str = "cpu", dtype: str = "fp32",
                 threads: int | None = None, spin: bool = True) -> dict[str, int | None]:
    """Load a format in *this* process and run ``batch`` twice; return {"base", "peak"} in bytes.

    CPU: RSS before loading and the peak RSS (VmHWM, reset first) after; None when /proc does not
    tell. CUDA (PyTorch formats): torch.cuda.memory_allocated before and max_memory_allocated after.
    """
    _release_memory()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        base = _status_kb("VmRSS") if reset else None
    runner = load_format(fmt, path, device, dtype, threads, spin)
    for _ in range(2):
        runner.logits(batch)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kb("VmHWM") if base is not None else None
        base, peak = (None, None) if base is None else (base * 1024, peak * 1024)
    del runner
    _release_memory()
    return {"base": base, "peak": peak}


def _probe_subprocess(fmt: str, path: Path, batch: dict, dtype: str, threads: int,
                      spin: bool) -> dict[str, int | None]:
    inputs = path.parent / f".probe-inputs-{os.getpid()}.pt"
    torch.save({k: batch[k] for k in INPUTS}, inputs)
    try:
        proc = subprocess.run([sys.executable, "-m", "vlsparse.bench.run", "--probe", fmt, str(path), str(inputs),
                               "--dtype", dtype, "--threads", str(threads), *([] if spin else ["--no-spin"])],
                              capture_output=True, text=True, timeout=1800)
    finally:
        inputs.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe of {fmt} in a fresh process failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(fmt: str, path: Path, batch: dict, device: str, dtype: str, threads: int,
                   mode: str, spin: bool = True) -> dict[str, Any]:
    """Row fields peak_mem_bytes, model_mem_bytes and memory for one format (see module docstring)."""
    empty = {"peak_mem_bytes": None, "model_mem_bytes": None, "memory": None}
    if mode == "off" or (device == "cuda" and fmt not in ("dense", "csr")):
        return empty
    if device == "cuda":
        r, kind = probe_memory(fmt, path, batch, device, dtype, threads, spin), "cuda-allocated"
    elif mode == "subprocess":
        r, kind = _probe_subprocess(fmt, path, batch, dtype, threads, spin), "rss-subprocess"
    else:
        r, kind = probe_memory(fmt, path, batch, device, dtype, threads, spin), "rss-delta"
        r = {"base": r["base"], "peak": r["peak"], "hide_peak": True}
    if r["base"] is None or r["peak"] is None:
        return empty
    return {"peak_mem_bytes": None if r.get("hide_peak") else r["peak"], "model_mem_bytes": r["peak"] - r["base"],
            "memory": kind}


# ------------------------------------------------------------------------------------------------
# Report files
# ------------------------------------------------------------------------------------------------
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
    return tuple(row[k] for k in KEY)


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
        from vlsparse.sparse.kernels.cpu import simd

        info["kernel_simd"] = simd()
    except Exception:  # no compiler: the csr format cannot run either, and says so itself
        info["kernel_simd"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _fmt_mb(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def format_summary(rows: list[dict]) -> str:
    """A Markdown table: one line per (method, level, format, dtype) with metric, median ms per
    batch size with the speedup over dense PyTorch, whole-model and pruned-Linear size, memory."""
    sizes = sorted({r["batch_size"] for r in rows})
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["level"], r["format"], r["dtype"], r["device"]), {})[r["batch_size"]] = r
    head = ["method", "level", "sparsity", "format", "metric"] + [f"b={b} ms (x dense)" for b in sizes] + [
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
    return "\n".join(lines) + "\n"


def plot_report(rows: list[dict], out: str | Path) -> list[Path]:
    """Write metric_vs_sparsity.png, metric_vs_latency.png and size_vs_sparsity.png into ``out``."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state (renders with Agg)

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


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------
def parse_list(text: str | Sequence, name: str, kind: type = str) -> list:
    """``"a,b"`` or a sequence -> list of ``kind``; raises BenchError naming ``name`` on bad items."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else list(text)
    try:
        out = [kind(x) for x in items if x != ""]
    except (TypeError, ValueError):
        raise BenchError(f"{name} must be a comma-separated list of {kind.__name__}, got {text!r}") from None
    if not out:
        raise BenchError(f"{name} is empty")
    return out


def check_device(device: str, formats: Sequence[str]) -> None:
    """Raise BenchError when ``device`` is unknown or absent, or onnxruntime cannot use it."""
    if device not in DEVICES:
        raise BenchError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        if any(f.startswith("onnx") for f in formats):
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BenchError("--device cuda with ONNX formats needs onnxruntime-gpu (CUDAExecutionProvider); "
                                 "this onnxruntime has " + ", ".join(ort.get_available_providers())
                                 + "; use --formats dense,csr")


def _batch(dataset, size: int) -> dict:
    from vlsparse.data import collate

    b = collate([dataset[i % len(dataset)] for i in range(size)])
    b.pop("targets")
    return b


def _load_task(cfg: dict):
    from vlsparse.data import load_task
    from vlsparse.models.registry import load_tokenizer

    return load_task(cfg["task"], load_tokenizer(cfg["model"]))


@dataclass(frozen=True)
class Settings:
    """What one bench session measures (validated by :func:`bench_run`)."""

    formats: list[str]
    dtypes: list[str]
    batch_sizes: list[int]
    repeats: int
    warmup: int
    device: str
    threads: int
    memory: str
    cuda_graphs: bool
    max_questions: int | None
    spin: bool

    def combos(self) -> list[tuple[str, str]]:
        """(format, dtype) pairs measured: fp16 only for the PyTorch formats."""
        return [(f, d) for f in self.formats for d in self.dtypes if d == "fp32" or f in ("dense", "csr")]


def bench_run(run_dir: str | Path, out: str | Path, formats: Sequence[str] | str = FORMATS,
              threads: int | None = None, batch_sizes: Sequence[int] | str = (1, 32),
              max_questions: int | None = None, repeats: int = 20, *, warmup: int = 3, device: str = "cpu",
              dtypes: Sequence[str] | str | None = None, memory: str = "subprocess",
              levels: Sequence[int] | None = None, task=None, cuda_graphs: bool = True, spin: bool = True,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Benchmark every level of a run in every format; write the report into ``out``; return all its rows.

    Args:
        run_dir: a find-ticket run, a main-job OUT or OUT/imp (see :func:`find_levels`).
        out: the report directory (bench.csv, bench.json, summary.md, PNG plots); a re-run resumes.
        formats: subset of :data:`FORMATS` (list or "a,b").
        threads: CPU threads for PyTorch, onnxruntime (intra-op) and our kernels; None keeps
            torch.get_num_threads().
        batch_sizes: batch sizes timed (the first questions of the test split, repeated if too few).
        max_questions: measure the metric on the first this many test questions (None: all).
        repeats, warmup: timed calls per format and batch size, after ``warmup`` untimed ones.
        device: "cpu" or "cuda". dtypes: "fp32", and on CUDA also "fp16" (PyTorch formats only);
            None: fp32 on the CPU, fp32 and fp16 on CUDA.
        memory: "subprocess" (a fresh process per format), "delta" (in this process) or "off".
        levels: level numbers to keep (None: all). task: a loaded TaskData (None: load the run's task).
        cuda_graphs: on CUDA, time the PyTorch formats by replaying a CUDA graph where one can be captured.
        spin: False turns off onnxruntime's spin-waiting threads. On a machine shared with other work,
            spinning thread pools (onnxruntime's, and OpenMP's unless OMP_WAIT_POLICY=PASSIVE is set
            before Python starts) make multi-threaded latencies mostly a measure of the scheduler.
        progress: called with one line of text per step.

    Raises:
        BenchError: unknown format / device / dtype / memory mode, --device cuda without a GPU, bad
            batch sizes or repeats, a run without levels, a task that does not fit the weights.
        FileNotFoundError: ``run_dir`` does not exist.
    """
    formats = parse_list(formats, "--formats")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise BenchError(f"--formats: unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    check_device(device, formats)
    dtypes = parse_list(dtypes or (("fp32", "fp16") if device == "cuda" else ("fp32",)), "--dtypes")
    if any(d not in DTYPES for d in dtypes) or (device == "cpu" and dtypes != ["fp32"]):
        raise BenchError(f"--dtypes must be fp32 on the CPU, fp32 and/or fp16 on CUDA; got {','.join(dtypes)}")
    batch_sizes = parse_list(batch_sizes, "--batch-sizes", int)
    if min(batch_sizes) < 1 or repeats < 1 or warmup < 0 or (max_questions is not None and max_questions < 1):
        raise BenchError("--batch-sizes, --repeats and --max-questions must be >= 1 and --warmup >= 0")
    if memory not in MEMORY_MODES:
        raise BenchError(f"--memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
    if threads is not None and threads < 1:
        raise BenchError(f"--threads must be >= 1, got {threads}")
    cfg, found = find_levels(run_dir, levels)
    say = progress or (lambda _msg: None)
    if threads is not None:
        torch.set_num_threads(threads)
    s = Settings(formats, dtypes, batch_sizes, repeats, warmup, device, torch.get_num_threads(), memory,
                 cuda_graphs, max_questions, spin)
    if not spin and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        say("note: OpenMP threads (torch, our kernels) still spin; set OMP_WAIT_POLICY=PASSIVE before starting")

    out = Path(out)
    rows = read_rows(out / "bench.csv")
    done = {row_key(r) for r in rows}

    def missing(lv: Level) -> list[tuple[str, str]]:
        return [(f, d) for f, d in s.combos()
                if any((lv.method, lv.level, f, device, d, s.threads, b) not in done for b in batch_sizes)]

    todo = [(lv, missing(lv)) for lv in found if missing(lv)]
    report = _read_json(out / "bench.json")
    session = None
    if todo:
        session = datetime.now().strftime("%Y%m%dT%H%M%S.%f") + f"-{os.getpid()}"
        report["sessions"][session] = {"machine": machine_info(device, s.threads), "settings": {
            **vars(s), "run": str(run_dir), "model": cfg["model"], "task": cfg.get("task"),
            "onnx_min_sparsity": ONNX_MIN_SPARSITY}}
        if task is None and not cfg.get("task"):
            raise BenchError(f"--run {run_dir}: the run does not record its task (config.json or ticket metadata)")
        if task is None:
            say(f"loading task {cfg['task']}")
            task = _load_task(cfg)
    else:
        say("every row is already measured")
    for lv, want in todo:
        for r in _bench_level(cfg, lv, want, s, task, session, say):
            if row_key(r) not in done:
                rows.append(r)
                done.add(row_key(r))
                write_rows(out / "bench.csv", rows)
        _finish(out, report, session, rows)
    _finish(out, report, session, rows, plots=True)
    return rows


def _read_json(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
        if isinstance(report.get("sessions"), dict):
            return report
    except (OSError, ValueError, AttributeError):
        pass
    return {"format": "vlsparse-bench-1", "sessions": {}}


def _finish(out: Path, report: dict, session: str | None, rows: list[dict], plots: bool = False) -> None:
    if session is not None:
        report["sessions"][session]["machine"]["load_avg_end"] = (list(os.getloadavg())
                                                                  if hasattr(os, "getloadavg") else None)
    report["rows"] = rows
    write_json(out / "bench.json", report)
    if rows:
        write_text(out / "summary.md", format_summary(rows))
    if rows and plots:
        plot_report(rows, out)


def _latency(runners: dict[tuple[str, str], Runner], batch: dict, s: Settings) -> dict[tuple[str, str], tuple]:
    """(format, dtype) -> (median s, p90 s, CUDA graph used, tokens) of one batch, timed interleaved."""
    fns, graphed = {}, set()
    for fd, runner in runners.items():
        g = cuda_graph_call(runner, batch) if s.device == "cuda" and s.cuda_graphs else None
        if g is not None:
            graphed.add(fd)
        fns[fd] = g or (lambda r=runner: r.logits(batch))
    times = time_interleaved(fns, s.repeats, s.warmup)
    tokens = int(batch["attention_mask"].sum() + batch["img_mask"].sum())
    return {fd: (statistics.median(t), percentile(t, 0.9), fd in graphed, tokens) for fd, t in times.items()}


def _bench_level(cfg: dict, lv: Level, want: list[tuple[str, str]], s: Settings, task, session: str,
                 say: Callable[[str], None]) -> list[dict]:
    """Measure one level: export, metric and agreement, interleaved latency, memory; return its rows."""
    from vlsparse.data import collate
    from vlsparse.pruning.mask import sparsity as mask_sparsity

    name = f"{lv.method} level {lv.level}"
    test = task.test
    objective = task.objective
    if objective.head != "answer":
        raise BenchError(f"task {cfg['task']}: the bench times answer-head tasks (easy-vqa, vqa, gqa, snli-ve); "
                         f"its {objective.head!r} head is not supported")
    net, mask = masked_model(cfg["model"], lv)
    if net.config.num_answers != len(task.answers):
        raise BenchError(f"{lv.weights}: the model has {net.config.num_answers} answers, the task "
                         f"{cfg['task']} has {len(task.answers)}")
    level_sparsity = mask_sparsity(mask)
    # timed: the wanted (format, dtype) pairs plus the references of the speedup columns
    refs = [("dense", d) for _, d in want if "dense" in s.formats]
    refs += [("onnx", "fp32") for f, _ in want if f == "onnx-sparse" and "onnx" in s.formats]
    timed = list(dict.fromkeys(want + refs))
    n_eval = len(test) if s.max_questions is None else min(s.max_questions, len(test))
    with tempfile.TemporaryDirectory(prefix="vlsparse-bench-") as work:
        say(f"{name} ({level_sparsity:.1%}): exporting {', '.join(sorted({f for f, _ in timed}))}")
        paths = export_formats(net, mask, {f for f, _ in timed}, work)
        del net
        sizes = format_sizes(paths, mask)
        runners = {fd: load_format(fd[0], paths[fd[0]], s.device, fd[1], s.threads, s.spin) for fd in timed}

        say(f"{name}: metric and agreement on {n_eval} test questions")
        ref = runners.get(("dense", "fp32")) or load_format("dense", paths["dense"], s.device, "fp32", s.threads)
        batches = [collate([test[i] for i in range(j, min(j + EVAL_BATCH, n_eval))])
                   for j in range(0, n_eval, EVAL_BATCH)]
        quality = {fd: {"questions": 0} for fd in want}
        if batches:
            targets = torch.cat([b["targets"] for b in batches])
            ref_logits = torch.cat([ref.logits(b) for b in batches])
            for fd in want:
                logits = ref_logits if runners[fd] is ref else torch.cat([runners[fd].logits(b) for b in batches])
                quality[fd] = {"questions": n_eval,
                               "metric": objective.metrics(logits, targets)[objective.metric] if lv.trained else None,
                               "same_pred": float((logits.argmax(1) == ref_logits.argmax(1)).float().mean()),
                               "max_abs_diff": float((logits - ref_logits).abs().max())}
        del ref

        latency = {}
        for b in s.batch_sizes:
            say(f"{name}: timing batch {b}, {s.repeats} rounds over {len(timed)} models")
            latency[b] = _latency(runners, _batch(test, b), s)
        weight_bytes = {fd: r.weight_bytes for fd, r in runners.items()}
        del runners

        mem = {}
        big = _batch(test, max(s.batch_sizes))
        for fd in want:
            say(f"{name}: memory of {fd[0]} {fd[1]} ({s.memory})")
            mem[fd] = measure_memory(fd[0], paths[fd[0]], big, s.device, fd[1], s.threads, s.memory, s.spin)

    rows = []
    for fd in want:
        for b in s.batch_sizes:
            med, p90, graphed, tokens = latency[b][fd]
            dense, onnx_dense = latency[b].get(("dense", fd[1])), latency[b].get(("onnx", fd[1]))
            rows.append({
                "session": session, "method": lv.method, "level": lv.level, "sparsity": round(level_sparsity, 6),
                "trained": lv.trained, "format": fd[0], "device": s.device, "dtype": fd[1], "threads": s.threads,
                "batch_size": b, "tokens": tokens, "median_ms": round(med * 1e3, 4), "p90_ms": round(p90 * 1e3, 4),
                "repeats": s.repeats, "tokens_per_s": round(tokens / med, 2),
                "speedup_vs_dense": round(dense[0] / med, 4) if dense else None,
                "speedup_vs_onnx": round(onnx_dense[0] / med, 4) if onnx_dense else None,
                "metric_name": task.metric_name, "metric": None,
                "run_metric": lv.metrics.get("test", {}).get(task.metric_name),
                "same_pred": None, "max_abs_diff": None, **quality[fd], **sizes[fd[0]],
                "weight_mem_bytes": weight_bytes[fd], **mem[fd], "cuda_graph": graphed})
    return rows


# ------------------------------------------------------------------------------------------------
# Memory probe in a fresh process:  python -m vlsparse.bench.run --probe FORMAT DIR INPUTS.pt
# ------------------------------------------------------------------------------------------------
def _probe_main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="peak RSS of loading one exported format and running one batch")
    p.add_argument("--probe", nargs=3, metavar=("FORMAT", "DIR", "INPUTS"), required=True)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-spin", action="store_true")
    args = p.parse_args(argv)
    fmt, path, inputs = args.probe
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime  # noqa: F401  (every probe imports the same runtimes before its baseline)

    from vlsparse.runtime import load as _load  # noqa: F401
    from vlsparse.runtime import ort as _ort  # noqa: F401

    batch = torch.load(inputs, weights_only=True)
    base = _status_kb("VmRSS")
    runner = load_format(fmt, path, "cpu", args.dtype, args.threads, spin=not args.no_spin)
    for _ in range(2):
        runner.logits(batch)
    peak = _status_kb("VmHWM")
    if base is None or peak is None:  # no /proc: ru_maxrss (kB on Linux, bytes on macOS)
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        print(json.dumps({"base": None, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}))
    else:
        print(json.dumps({"base": base * 1024, "peak": peak * 1024}))


if __name__ == "__main__":
    _probe_main()


__all__ = ["FORMATS", "DEVICES", "DTYPES", "MEMORY_MODES", "COLUMNS", "BenchError", "Level", "Runner",
           "bench_run", "find_levels", "masked_model", "export_formats", "load_format", "format_sizes",
           "time_interleaved", "percentile", "probe_memory", "measure_memory", "read_rows", "write_rows",
           "format_summary", "plot_report", "machine_info", "check_device", "parse_list", "cuda_graph_call"]
