"""Memory of one loaded format running one batch: in this process, or in a fresh one.

The fresh process is this module:  ``python -m vlsparse.bench.memory --probe FORMAT DIR INPUTS.npz
[--dtype fp32] [--threads N] [--no-spin]`` prints ``{"base": bytes, "peak": bytes, "steady": bytes}``
(RSS before loading, peak RSS after loading and running the batch three times, and the RSS after that
once Python's garbage and glibc's free heap pages are released: what the loaded model keeps) as its
last line. Every probe imports the
same runtimes (torch, onnxruntime, vlsparse.runtime) before its baseline.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vlsparse.runtime.load  # noqa: F401  (imported before any probe's baseline, as the csr format needs it)
from vlsparse.bench.formats import load_format
from vlsparse.runtime.runners import INPUTS

__all__ = ["probe_memory", "measure_memory", "steady_rss"]


def _status_kb(field_name: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM); None without /proc."""
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


def probe_memory(fmt: str, path: str | Path, batch: Mapping[str, Any], device: str = "cpu", dtype: str = "fp32",
                 threads: int | None = None, spin: bool = True) -> dict[str, int | None]:
    """Load a format in *this* process and run ``batch`` (model inputs, host arrays) twice; return
    {"base", "peak"} in bytes.

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


_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds this vlsparse package


def _probe_subprocess(fmt: str, path: Path, batch: Mapping[str, Any], dtype: str, threads: int,
                      spin: bool) -> dict[str, int | None]:
    """{"base", "peak", "steady"} in bytes of loading ``fmt`` and running ``batch`` in a fresh Python process."""
    inputs = path.parent / f".probe-inputs-{os.getpid()}.npz"
    np.savez(inputs, **{k: np.asarray(batch[k]) for k in INPUTS})
    try:
        # cwd: the directory holding the vlsparse package this process runs, so that ``-m`` (which puts the cwd
        # first on sys.path) loads the same code, not a checkout of another version in the caller's cwd
        proc = subprocess.run([sys.executable, "-m", "vlsparse.bench.memory", "--probe", fmt, str(path.resolve()),
                               str(inputs.resolve()), "--dtype", dtype, "--threads", str(threads),
                               *([] if spin else ["--no-spin"])],
                              capture_output=True, text=True, timeout=1800, cwd=_PACKAGE_ROOT)
    finally:
        inputs.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe of {fmt} in a fresh process failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(fmt: str, path: Path, batch: Mapping[str, Any], device: str, dtype: str, threads: int,
                   mode: str, spin: bool = True) -> dict[str, Any]:
    """Row fields peak_mem_bytes, model_mem_bytes (bytes) and memory (the kind of measure) for one format
    running ``batch``; ``mode``: "subprocess", "delta" or "off" (see vlsparse.bench)."""
    empty = {"peak_mem_bytes": None, "model_mem_bytes": None, "steady_mem_bytes": None, "memory": None}
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
            "steady_mem_bytes": r.get("steady"), "memory": kind}


def steady_rss(fmt: str, path: str | Path, batch: Mapping[str, Any], dtype: str = "fp32", threads: int = 2,
               spin: bool = True) -> dict[str, int]:
    """Memory of ``fmt`` loaded alone in a fresh Python process (CPU): {"base", "peak", "steady"} RSS in bytes
    (before loading; the peak over loading and three calls on ``batch``; after them, once freed memory is
    returned). Raises RuntimeError when the probe fails (and says why)."""
    r = _probe_subprocess(fmt, Path(path), batch, dtype, threads, spin)
    if r.get("steady") is None:
        raise RuntimeError("steady RSS needs Linux's /proc/self/status")
    return r


def _probe_main(argv: Sequence[str] | None = None) -> None:
    """The fresh process of :func:`_probe_subprocess`: prints {"base", "peak"} (bytes) as JSON."""
    p = argparse.ArgumentParser(description="peak RSS of loading one exported format and running one batch")
    p.add_argument("--probe", nargs=3, metavar=("FORMAT", "DIR", "INPUTS"), required=True)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-spin", action="store_true")
    args = p.parse_args(argv)
    fmt, path, inputs = args.probe
    if args.threads:
        torch.set_num_threads(args.threads)
    with np.load(inputs) as saved:
        batch = {k: saved[k] for k in saved.files}
    base = _status_kb("VmRSS")
    runner = load_format(fmt, path, "cpu", args.dtype, args.threads, spin=not args.no_spin)
    for _ in range(3):
        runner.logits(batch)
    peak = _status_kb("VmHWM")
    _release_memory()
    steady = _status_kb("VmRSS")
    if base is None or peak is None or steady is None:  # no /proc: ru_maxrss (kB on Linux, bytes on macOS)
        import resource  # Unix only: this fallback is for Unixes without /proc

        scale = 1 if sys.platform == "darwin" else 1024
        print(json.dumps({"base": None, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
                          "steady": None}))
    else:
        print(json.dumps({"base": base * 1024, "peak": peak * 1024, "steady": steady * 1024}))


if __name__ == "__main__":
    _probe_main()
