"""The bench session: :class:`Settings` and :func:`bench_run` (``vlsparse bench``), one level at a time.

What is measured and the report's columns: see :mod:`vlsparse.bench`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vlsparse.atomic import locked
from vlsparse.bench import BenchError
from vlsparse.bench.formats import format_sizes, load_format
from vlsparse.bench.levels import ONNX_MIN_SPARSITY, Level, export_formats, find_levels, format_key, masked_model
from vlsparse.bench.memory import measure_memory
from vlsparse.bench.report import machine_info, read_report, read_rows, row_key, write_report, write_rows
from vlsparse.bench.timing import cuda_graph_call, percentile, time_interleaved
from vlsparse.data import collate, load_task
from vlsparse.models.registry import load_tokenizer
from vlsparse.pruning.mask import sparsity as mask_sparsity
from vlsparse.runtime.runners import DEVICES, DTYPES, FORMATS, INPUTS, UNAVAILABLE, Runner

__all__ = ["FORMATS", "MEMORY_MODES", "Settings", "bench_run", "parse_list", "check_device", "check_dtypes"]

MEMORY_MODES = ("subprocess", "delta", "off")
EVAL_BATCH = 64  # questions per model call for the metric and agreement columns


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
        if any(f.startswith("onnx") for f in formats) and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BenchError("--device cuda with ONNX formats needs onnxruntime-gpu (CUDAExecutionProvider); "
                             "this onnxruntime has " + ", ".join(ort.get_available_providers())
                             + "; use --formats dense,csr")


def check_dtypes(dtypes: Sequence[str], device: str) -> None:
    """Raise BenchError (naming --dtypes) on an unknown dtype or one ``device`` has not: int8 is CPU only (our
    int8 kernel and the dynamic quantisation of PyTorch and onnxruntime are CPU kernels), fp16 CUDA only."""
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise BenchError(f"--dtypes: unknown dtype {bad[0]!r}; choose from {', '.join(DTYPES)}")
    if device == "cuda" and "int8" in dtypes:
        raise BenchError("--dtypes int8 runs on the CPU only (our int8 kernel and the dynamic quantisation of "
                         "PyTorch and onnxruntime are CPU kernels); use --device cpu, or --dtypes fp32,fp16")
    if device == "cpu" and "fp16" in dtypes:
        raise BenchError("--dtypes fp16 needs --device cuda; on the CPU choose fp32 and/or int8")


@dataclass(frozen=True)
class Settings:
    """What one bench session measures. Checked on construction (BenchError, naming the CLI option); the
    list fields take a sequence or a comma-separated string and are stored as tuples.
    """

    #: formats measured: a subset of :data:`FORMATS`
    formats: Sequence[str] | str = FORMATS
    #: CPU threads (a count) for PyTorch, onnxruntime (intra-op) and our kernels; None: torch.get_num_threads()
    threads: int | None = None
    #: batch sizes timed, in questions (the first test questions, repeated if too few)
    batch_sizes: Sequence[int] | str = (1, 32)
    #: the metric is measured on the first this many test questions (None: all)
    max_questions: int | None = None
    #: timed calls (a count) per format and batch size
    repeats: int = 20
    #: untimed calls (a count) before the timed ones
    warmup: int = 3
    #: "cpu" or "cuda"
    device: str = "cpu"
    #: on the CPU "fp32" and/or "int8" (dense: quantize_dynamic; csr: the int8 export; onnx: onnxruntime's
    #: quantize_dynamic; onnx-sparse: vlsparse.SparseLinearInt8), on CUDA "fp32" and/or "fp16" (PyTorch formats only);
    #: None: fp32 on the CPU, fp32 and fp16 on CUDA
    dtypes: Sequence[str] | str | None = None
    #: "subprocess" (a fresh process per format: peak RSS in bytes), "delta" (RSS increase in this process) or "off"
    memory: str = "subprocess"
    #: on CUDA, time the PyTorch formats by replaying a CUDA graph where one can be captured
    cuda_graphs: bool = True
    #: False turns off onnxruntime's spin-waiting threads. On a machine shared with other work, spinning
    #: thread pools (onnxruntime's, and OpenMP's unless OMP_WAIT_POLICY=PASSIVE is set before Python
    #: starts) make multi-threaded latencies mostly a measure of the scheduler
    spin: bool = True

    def __post_init__(self):
        formats = parse_list(self.formats, "--formats")
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise BenchError(f"--formats: unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}")
        default = ("fp32", "fp16") if self.device == "cuda" else ("fp32",)
        dtypes = list(dict.fromkeys(parse_list(self.dtypes or default, "--dtypes")))
        check_dtypes(dtypes, self.device)
        check_device(self.device, formats)
        batch_sizes = parse_list(self.batch_sizes, "--batch-sizes", int)
        if (min(batch_sizes) < 1 or self.repeats < 1 or self.warmup < 0
                or (self.max_questions is not None and self.max_questions < 1)):
            raise BenchError("--batch-sizes, --repeats and --max-questions must be >= 1 and --warmup >= 0")
        if self.memory not in MEMORY_MODES:
            raise BenchError(f"--memory must be one of {', '.join(MEMORY_MODES)}, got {self.memory!r}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"--threads must be >= 1, got {self.threads}")
        for name, value in (("formats", formats), ("dtypes", dtypes), ("batch_sizes", batch_sizes)):
            object.__setattr__(self, name, tuple(value))

    def combos(self) -> list[tuple[str, str]]:
        """(format, dtype) pairs measured: every requested pair but those of :meth:`skipped`."""
        return [(f, d) for f in self.formats for d in self.dtypes if (f, d) not in UNAVAILABLE]

    def skipped(self) -> list[tuple[str, str, str]]:
        """(format, dtype, why) of the requested pairs that do not exist
        (:data:`vlsparse.runtime.runners.UNAVAILABLE`: fp16 ONNX)."""
        return [(f, d, UNAVAILABLE[f, d]) for f in self.formats for d in self.dtypes if (f, d) in UNAVAILABLE]


@locked("out")
def bench_run(run_dir: str | Path, out: str | Path, settings: Settings, *, levels: Sequence[int] | None = None,
              task=None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Benchmark every level of a run in every format; write the report into ``out``; return all its rows.

    Args:
        run_dir: a find-ticket run, a main-job OUT or OUT/imp (see :func:`vlsparse.bench.levels.find_levels`).
        out: the report directory (bench.csv, bench.json, summary.md, PNG plots); a re-run resumes.
        settings: what to measure (:class:`Settings`, already checked); its ``threads`` are set for the
            whole process (torch.set_num_threads).
        levels: level numbers to keep (None: all). task: a loaded TaskData (None: load the run's task).
        progress: called with one line of text per step.

    Returns:
        the rows of OUT/bench.csv (dicts of :data:`vlsparse.bench.report.COLUMNS`), old and new.

    Raises:
        BenchError: a run without levels or without a recorded task, a task that does not fit the weights,
            a bench.csv of another version.
        FileNotFoundError: ``run_dir`` does not exist.
    """
    cfg, found = find_levels(run_dir, levels)
    say = progress or (lambda _msg: None)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    s = replace(settings, threads=torch.get_num_threads())
    if not s.spin and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        say("note: OpenMP threads (torch, our kernels) still spin; set OMP_WAIT_POLICY=PASSIVE before starting")
    skipped = [f"{f} {d}: {why}" for f, d, why in s.skipped()]
    for line in skipped:
        say(f"skipped {line}")

    out = Path(out)
    rows = read_rows(out / "bench.csv")
    done = {row_key(r) for r in rows}
    todo = [(lv, want) for lv in found if (want := _missing(lv, s, done))]
    report = read_report(out / "bench.json")
    session = None
    if todo:
        session = datetime.now().strftime("%Y%m%dT%H%M%S.%f") + f"-{os.getpid()}"
        report["sessions"][session] = {"machine": machine_info(s.device, s.threads), "settings": {
            **asdict(s), "run": str(run_dir), "model": cfg["model"], "task": cfg.get("task"),
            "onnx_min_sparsity": ONNX_MIN_SPARSITY, "skipped": skipped}}
        if task is None and not cfg.get("task"):
            raise BenchError(f"--run {run_dir}: the run does not record its task (config.json or ticket metadata)")
        if task is None:
            say(f"loading task {cfg['task']}")
            task = load_task(cfg["task"], load_tokenizer(cfg["model"]))
    else:
        say("every row is already measured")
    for lv, want in todo:
        for r in _bench_level(cfg, lv, want, s, task, session, say, out):
            if row_key(r) not in done:
                rows.append(r)
                done.add(row_key(r))
                write_rows(out / "bench.csv", rows)
        write_report(out, report, session, rows)
    write_report(out, report, session, rows, plots=True)
    return rows


def _missing(lv: Level, s: Settings, done: set[tuple]) -> list[tuple[str, str]]:
    """The (format, dtype) pairs of ``lv`` with a batch size not yet in ``done`` (row keys)."""
    return [(f, d) for f, d in s.combos()
            if any((lv.method, lv.level, f, s.device, d, s.threads, b) not in done for b in s.batch_sizes)]


def _batch(dataset, size: int) -> dict[str, np.ndarray]:
    """Model inputs of the first ``size`` questions of ``dataset`` (repeated if too few), as numpy arrays."""
    b = collate([dataset[i % len(dataset)] for i in range(size)])
    return {k: b[k].numpy() for k in INPUTS}


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


def _quality(runners: dict[tuple[str, str], Runner], dense_dir: Path, want: list[tuple[str, str]], lv: Level,
             task, s: Settings, say: Callable[[str], None]) -> dict[tuple[str, str], dict]:
    """(format, dtype) -> {questions, metric, same_pred, max_abs_diff} on the first test questions, against
    the masked dense PyTorch model in fp32 on the same device."""
    test, objective = task.test, task.objective
    n_eval = len(test) if s.max_questions is None else min(s.max_questions, len(test))
    say(f"{lv.method} level {lv.level}: metric and agreement on {n_eval} test questions")
    ref = runners.get(("dense", "fp32")) or load_format("dense", dense_dir, s.device, "fp32", s.threads)
    batches = [collate([test[i] for i in range(j, min(j + EVAL_BATCH, n_eval))]) for j in range(0, n_eval, EVAL_BATCH)]
    quality = {fd: {"questions": 0} for fd in want}
    if not batches:
        return quality

    def logits(runner: Runner) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([runner.logits(b) for b in batches]))

    targets = torch.cat([b["targets"] for b in batches])
    ref_logits = logits(ref)
    for fd in want:
        out = ref_logits if runners[fd] is ref else logits(runners[fd])
        quality[fd] = {"questions": n_eval,
                       "metric": objective.metrics(out, targets)[objective.metric] if lv.trained else None,
                       "same_pred": float((out.argmax(1) == ref_logits.argmax(1)).float().mean()),
                       "max_abs_diff": float((out - ref_logits).abs().max())}
    return quality


def _level_model(cfg: dict, lv: Level, task):
    """The level's masked model and mask (see :func:`masked_model`), checked against ``task``."""
    if task.objective.head != "answer":
        raise BenchError(f"task {cfg['task']}: the bench times answer-head tasks (easy-vqa, vqa, gqa, snli-ve); "
                         f"its {task.objective.head!r} head is not supported")
    net, mask = masked_model(cfg["model"], lv)
    if net.config.num_answers != len(task.answers):
        raise BenchError(f"{lv.weights}: the model has {net.config.num_answers} answers, the task "
                         f"{cfg['task']} has {len(task.answers)}")
    return net, mask


def _measure(cfg: dict, lv: Level, want: list[tuple[str, str]], s: Settings, task,
             say: Callable[[str], None], scratch: Path) -> dict:
    """Export the level's formats into a temporary directory in ``scratch`` (the report directory: a killed
    bench's ``.bench.tmp-*`` is removed by the next run there) and measure them: {"sparsity": fraction,
    "sizes": format_key -> size fields, "quality": (format, dtype) -> quality fields, "latency": batch size ->
    (format, dtype) -> (median s, p90 s, graphed, tokens), "weight_bytes": (format, dtype) -> bytes,
    "memory": (format, dtype) -> memory fields}. The model is freed once exported (only its files are run)."""
    name = f"{lv.method} level {lv.level}"
    net, mask = _level_model(cfg, lv, task)
    m = {"sparsity": mask_sparsity(mask), "latency": {}, "memory": {}}
    # timed: the wanted (format, dtype) pairs plus the references of the speedup columns
    refs = [(r, d) for _, d in want for r in ("dense", "onnx") if r in s.formats and (r, d) not in UNAVAILABLE]
    timed = list(dict.fromkeys(want + refs))
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".bench.tmp-") as work:
        say(f"{name} ({m['sparsity']:.1%}): exporting {', '.join(sorted({format_key(f, d) for f, d in timed}))}")
        paths = export_formats(net, mask, {f for f, _ in timed}, work, {d for _, d in timed})
        del net
        m["sizes"] = format_sizes(paths, mask)
        runners = {(f, d): load_format(f, paths[format_key(f, d)], s.device, d, s.threads, s.spin) for f, d in timed}
        m["quality"] = _quality(runners, paths["dense"], want, lv, task, s, say)
        for b in s.batch_sizes:
            say(f"{name}: timing batch {b}, {s.repeats} rounds over {len(timed)} models")
            m["latency"][b] = _latency(runners, _batch(task.test, b), s)
        m["weight_bytes"] = {fd: r.weight_bytes for fd, r in runners.items()}
        del runners
        big = _batch(task.test, max(s.batch_sizes))
        for fd in want:
            say(f"{name}: memory of {fd[0]} {fd[1]} ({s.memory})")
            m["memory"][fd] = measure_memory(fd[0], paths[format_key(*fd)], big, s.device, fd[1], s.threads, s.memory,
                                             s.spin)
    return m


def _bench_level(cfg: dict, lv: Level, want: list[tuple[str, str]], s: Settings, task, session: str,
                 say: Callable[[str], None], scratch: Path) -> list[dict]:
    """Measure one level: export (into ``scratch``), metric and agreement, interleaved latency, memory; return its
    rows."""
    m = _measure(cfg, lv, want, s, task, say, scratch)
    rows = []
    for fd in want:
        for b in s.batch_sizes:
            med, p90, graphed, tokens = m["latency"][b][fd]
            dense, onnx_dense = m["latency"][b].get(("dense", fd[1])), m["latency"][b].get(("onnx", fd[1]))
            rows.append({
                "session": session, "method": lv.method, "level": lv.level, "sparsity": round(m["sparsity"], 6),
                "trained": lv.trained, "format": fd[0], "device": s.device, "dtype": fd[1], "threads": s.threads,
                "batch_size": b, "tokens": tokens, "median_ms": round(med * 1e3, 4), "p90_ms": round(p90 * 1e3, 4),
                "repeats": s.repeats, "tokens_per_s": round(tokens / med, 2),
                "speedup_vs_dense": round(dense[0] / med, 4) if dense else None,
                "speedup_vs_onnx": round(onnx_dense[0] / med, 4) if onnx_dense else None,
                "metric_name": task.metric_name, "metric": None,
                "run_metric": lv.metrics.get("test", {}).get(task.metric_name),
                "same_pred": None, "max_abs_diff": None, **m["quality"][fd], **m["sizes"][format_key(*fd)],
                "weight_mem_bytes": m["weight_bytes"][fd], **m["memory"][fd], "cuda_graph": graphed})
    return rows
