"""Sparse Linear backends vs dense F.linear on the CPU: a table of speedups.

    python benchmarks/spmm_table.py                       # 768x768, 3072x768, 768x3072; T 1/40/200;
                                                     # sparsity 50/70/90%; 1 and 2 threads
    python benchmarks/spmm_table.py --threads 2 --sparsity 0.7 --backends cpu cpu-fm
    python benchmarks/spmm_table.py --threads 1 --sparsity 0.7 --backends cpu@legacy cpu@auto \
        cpu-fm@legacy cpu-fm@auto          # the kernel before / after the gather-dot path, side by side

Each cell is dense time / backend time (> 1: the backend is faster), from median timings.
Timings are interleaved: every round times the dense baseline and each backend back to back
(a batch of calls of about --batch-ms each), so load from other processes hits all of them
alike; the medians over --rounds rounds are compared. The dense baseline is F.linear with the
masked weight as a dense fp32 tensor (MKL). Backends:
    cpu           SparseLinear(backend="cpu"): our C++ kernel, row-major in and out (the default)
    cpu-fm        our kernel's feature-major entry (spmm_cpu_fm) on a pre-transposed input:
                  what a chain of sparse layers keeping activations feature-major would pay
    torch-sparse  SparseLinear(backend="torch-sparse"): torch.sparse_csr_tensor @ x (MKL sparse)
    torch_sparse  SparseLinear(backend="torch_sparse") when the torch_sparse package is installed
    cpu@K, cpu-fm@K   our kernel's row-major (spmm_cpu) / feature-major (spmm_cpu_fm) entry called directly
                  with kernel=K: auto | legacy | gather | strips (vlsparse.sparse.kernels.cpu.KERNELS);
                  cpu@legacy is the kernel as it was before the gather-dot path, so @legacy vs @auto
                  is old vs new in one process
--tuning NAME=VALUE sets the non-legacy kernels' tunables (cpu.set_tuning) before timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlsparse.sparse.linear import SparseLinear  # noqa: E402
from vlsparse.sparse.kernels import cpu as cpu_kernel  # noqa: E402

SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # (out, in)
TOKENS = [1, 40, 200]
SPARSITIES = [0.5, 0.7, 0.9]
THREADS = [1, 2]
BACKENDS = ["cpu", "cpu-fm", "torch-sparse", "torch_sparse"]


def have_torch_sparse() -> bool:
    try:
        import torch_sparse  # noqa: F401
    except ImportError:
        return False
    return True


def make_case(out_f: int, in_f: int, tokens: int, sparsity: float, seed: int = 0):
    """(linear, mask, x): a BERT-like Linear with random unstructured sparsity at `sparsity`."""
    g = torch.Generator().manual_seed(seed + out_f * 7 + in_f + int(sparsity * 100))
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
        lin.bias.copy_(torch.randn(out_f, generator=g) * 0.02)
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    x = torch.randn(tokens, in_f, generator=g)
    return lin, mask, x


def make_fns(backend: str, lin, mask, x):
    """A zero-argument callable computing the layer for `backend` (None when unavailable)."""
    w = (lin.weight * mask).detach().contiguous()
    b = lin.bias.detach()
    if backend == "dense":
        return lambda: F.linear(x, w, b)
    if backend == "torch_sparse" and not have_torch_sparse():
        return None
    if backend == "triton" and not torch.cuda.is_available():
        return None
    if "@" in backend:  # cpu@K / cpu-fm@K: one entry of our kernel with kernel=K, no SparseLinear around it
        entry, kernel = backend.split("@", 1)
        layer = SparseLinear.from_dense(lin, mask, backend="cpu")
        args = (layer.crow_indices, layer.col_indices, layer.values, layer.bias)
        if entry == "cpu-fm":
            xt = x.t().contiguous()
            return lambda: cpu_kernel.spmm_cpu_fm(xt, *args, out_features=layer.out_features, kernel=kernel)
        return lambda: cpu_kernel.spmm_cpu(x, *args, out_features=layer.out_features, kernel=kernel)
    if backend == "cpu-fm":
        layer = SparseLinear.from_dense(lin, mask, backend="cpu")
        xt = x.t().contiguous()
        args = (layer.crow_indices, layer.col_indices, layer.values, layer.bias)
        return lambda: cpu_kernel.spmm_cpu_fm(xt, *args, out_features=layer.out_features)
    layer = SparseLinear.from_dense(lin, mask, backend=backend)
    return lambda: layer(x)


def _batch(fn, n: int, clock=time.perf_counter) -> float:
    t = clock()
    for _ in range(n):
        fn()
    return (clock() - t) / n


def measure(fns: dict, rounds: int = 15, batch_ms: float = 4.0, stat: str = "median", clock=time.perf_counter) -> dict:
    """Median (or min) seconds per call for each callable, interleaved round by round. ``clock``: wall time
    (time.perf_counter), or time.thread_time for 1-thread runs on a loaded machine (CPU time of this thread)."""
    reps = {}
    for name, fn in fns.items():
        fn()
        one = max(_batch(fn, 3, clock), 1e-7)
        reps[name] = max(1, int(batch_ms * 1e-3 / one))
    if stat == "min":  # single calls, many of them: the fastest is the least disturbed
        rounds = rounds * max(reps.values())
        reps = {name: 1 for name in fns}
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_batch(fn, reps[name], clock))
    reduce = statistics.median if stat == "median" else min
    return {name: reduce(v) for name, v in samples.items()}


def check(fns: dict, atol: float = 1e-4) -> None:
    ref = fns["dense"]()
    for name, fn in fns.items():
        y = fn()
        if name.startswith("cpu-fm"):
            y = y.t()
        err = (y - ref).abs().max().item() if y.numel() else 0.0
        if err > atol:
            raise AssertionError(f"{name}: max abs error {err:.2e} vs dense")


def run(shapes, tokens, sparsities, threads, backends, rounds, batch_ms, stat="median", out=print,
        clock=time.perf_counter):
    backends = [b for b in backends if make_fns(b, *make_case(8, 8, 2, 0.5)) is not None]
    cpu_kernel.load_extension()
    what = (f"median of {rounds} interleaved rounds" if stat == "median"
            else f"min over single calls, {rounds} x batch interleaved")
    what += ", CPU time of this thread" if clock is time.thread_time else ", wall time"
    out(f"# SpMM speedup over dense F.linear (dense time / backend time, {what})")
    out(f"# torch {torch.__version__}, kernel simd={cpu_kernel.simd()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, load avg {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    out(f"# tunables (auto/gather/strips): {cpu_kernel.tuning()}; auto runs "
        + ", ".join(f"T={t}: {cpu_kernel.kernel_path('auto', t)}" for t in tokens))
    head = ["threads", "out x in", "T", "sparsity", "dense us"] + backends + ["load 1 min"]
    out("| " + " | ".join(head) + " |")
    out("|" + "|".join("---" for _ in head) + "|")
    old = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for nt in threads:
                torch.set_num_threads(nt)
                for out_f, in_f in shapes:
                    for t in tokens:
                        for sp in sparsities:
                            lin, mask, x = make_case(out_f, in_f, t, sp)
                            fns = {"dense": make_fns("dense", lin, mask, x)}
                            fns.update({b: make_fns(b, lin, mask, x) for b in backends})
                            check(fns)
                            med = measure(fns, rounds, batch_ms, stat, clock)
                            cells = [str(nt), f"{out_f}x{in_f}", str(t), f"{int(round(sp * 100))}%",
                                     f"{med['dense'] * 1e6:.0f}"]
                            cells += [f"{med['dense'] / med[b]:.2f}" for b in backends]
                            cells.append(f"{os.getloadavg()[0]:.1f}")
                            out("| " + " | ".join(cells) + " |")
    finally:
        torch.set_num_threads(old)
    out(f"# load avg after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES], help="OUTxIN")
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    p.add_argument("--sparsity", nargs="+", type=float, default=SPARSITIES)
    p.add_argument("--threads", nargs="+", type=int, default=THREADS)
    p.add_argument("--backends", nargs="+", default=BACKENDS)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch-ms", type=float, default=4.0)
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="wall time (default), or the CPU time of this thread (time.thread_time; only with "
                        "--threads 1, where kernel and MKL run on this thread: robust to other processes' load)")
    p.add_argument("--tuning", nargs="*", default=[], metavar="NAME=VALUE",
                   help="tunables of the non-legacy kernels (vlsparse.sparse.kernels.cpu.set_tuning)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="per-call time of a backend: median over the rounds (default), or min over "
                        "single calls (rounds x calls-per-batch of them; robust to other load)")
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes]
    if a.tuning:
        cpu_kernel.set_tuning(**{k: int(v) for k, v in (t.split("=", 1) for t in a.tuning)})
    if a.clock == "thread" and a.threads != [1]:
        p.error("--clock thread needs --threads 1")
    run(shapes, a.tokens, a.sparsity, a.threads, a.backends, a.rounds, a.batch_ms, a.stat,
        clock=time.thread_time if a.clock == "thread" else time.perf_counter)


if __name__ == "__main__":
    main()
