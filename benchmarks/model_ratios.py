"""Whole-model latency ratios, side by side in one process: dense PyTorch, csr, onnx, onnx-sparse.

    python benchmarks/model_ratios.py --model uniter-minilm-l2 --img-dim 294 --answers 13 \
        --sparsity 0.7 --batch 1 32 --text 20 --regions 6 --threads 2 --repeats 20

Builds the model (random weights for random presets; MiniLM text weights for the minilm presets),
masks it by global magnitude to ``--sparsity``, writes every format with
:func:`vlsparse.bench.levels.export_formats`, loads them with :func:`vlsparse.bench.formats.load_format`,
checks each format's logits against the masked dense model (max abs difference printed, <= 1e-4 is
the target) and times all formats interleaved call by call (:func:`vlsparse.bench.timing.time_interleaved`):
median ms of ``--repeats`` calls per batch size, and each format's speed-up over dense PyTorch and
over dense onnxruntime. ``--openmp`` also times the onnx-sparse session with the op on its own
OpenMP pool (the threading before onnxruntime's pool was used). ``--unchained`` also times the
same model sparsified without chaining (``sparsify_onnx(chain=False)``: no GELU epilogue, every node
token-major, as before the chained layouts). ``--rss`` adds the steady RSS (MB) of each format loaded alone in a fresh
process after a few calls (:func:`vlsparse.bench.memory.steady_rss`). The load average is printed
before and after. Nothing here is a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from vlsparse.bench.formats import load_format
from vlsparse.bench.levels import export_formats
from vlsparse.bench.timing import time_interleaved
from vlsparse.models import load_model
from vlsparse.pruning.magnitude import global_magnitude_prune
from vlsparse.pruning.mask import apply_mask, ones_mask
from vlsparse.runtime.runners import FORMATS
from vlsparse.sparse.kernels import ort as ort_library


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
    except OSError:
        return "n/a"


def build(args, work: Path) -> tuple[torch.nn.Module, dict[str, Path]]:
    """The masked model and format -> export directory (under ``work``)."""
    model, _ = load_model(args.model, img_dim=args.img_dim, num_answers=args.answers, seed=0)
    scope = model.prune_scope()
    params = dict(model.named_parameters())
    mask = global_magnitude_prune({n: params[n] for n in scope}, ones_mask(model, scope), args.sparsity)
    with torch.no_grad():
        apply_mask(model, mask)
    return model.eval(), export_formats(model, mask, args.formats, work)


def _on_openmp(runner, fed) -> np.ndarray:
    """One call of an onnx-sparse runner with the op on its own OpenMP pool (the pre-0.3 threading)."""
    ort_library.set_openmp(True)
    try:
        return runner.fetch(runner.call(fed))
    finally:
        ort_library.set_openmp(False)


def _unchained(runner, dense_onnx: Path, threads: int, spin: bool):
    """A copy of the onnx-sparse runner whose session runs the dense export sparsified without chaining."""
    import onnx
    import onnxruntime as ort

    from vlsparse.export.onnx_sparse import sparsify_onnx
    from vlsparse.runtime.ort import ort_session

    proto = sparsify_onnx(onnx.load(str(dense_onnx)), min_sparsity=0.5, chain=False)
    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    out = copy.copy(runner)
    out.session = ort_session(proto.SerializeToString(), threads=threads, sess_options=so)
    return out


def measure(args, model, paths: dict[str, Path]) -> None:
    """Print parity and the interleaved medians / ratios per batch size."""
    runners = {f: load_format(f, paths[f], threads=args.threads, spin=not args.no_spin) for f in args.formats}
    if args.unchained and "onnx-sparse" in runners and "onnx" in paths:
        runners["onnx-sparse/unchained"] = _unchained(runners["onnx-sparse"], paths["onnx"] / "model.onnx",
                                                      args.threads, not args.no_spin)
    for batch in args.batch:
        inputs = model.example_inputs(batch=batch, text_len=args.text, regions=args.regions)
        ref = runners["dense"].logits(inputs)
        feeds = {f: r.feed(inputs) for f, r in runners.items()}
        diffs = {f: float(np.abs(r.logits(inputs) - ref).max()) for f, r in runners.items()}
        fns = {f: (lambda r=r, fd=feeds[f]: r.fetch(r.call(fd))) for f, r in runners.items()}
        if args.openmp and "onnx-sparse" in runners:  # the same session, the op on its own OpenMP pool
            fns["onnx-sparse/omp"] = lambda r=runners["onnx-sparse"], fd=feeds["onnx-sparse"]: _on_openmp(r, fd)
            diffs["onnx-sparse/omp"] = float(np.abs(_on_openmp(runners["onnx-sparse"], feeds["onnx-sparse"]) - ref).max())
        times = time_interleaved(fns, args.repeats, warmup=3)
        med = {f: statistics.median(t) * 1e3 for f, t in times.items()}
        print(f"batch {batch} ({batch * (args.text + args.regions)} tokens), median of {args.repeats}, load {_loadavg()}")
        for f in fns:
            vs_onnx = f"{med['onnx'] / med[f]:.2f}x" if "onnx" in med else "-"
            print(f"  {f:21s} {med[f]:9.2f} ms  vs dense {med['dense'] / med[f]:.2f}x  vs onnx {vs_onnx}"
                  f"  max|diff| {diffs[f]:.1e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="uniter-minilm-l2")
    p.add_argument("--img-dim", type=int, default=294)
    p.add_argument("--answers", type=int, default=13)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--text", type=int, default=20)
    p.add_argument("--regions", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--no-spin", action="store_true", help="onnxruntime threads do not spin-wait")
    p.add_argument("--openmp", action="store_true", help="also time onnx-sparse with the op on an OpenMP pool")
    p.add_argument("--unchained", action="store_true", help="also time onnx-sparse without chained layouts")
    p.add_argument("--rss", action="store_true", help="also the steady RSS of each format in a fresh process")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.model} {args.sparsity:.0%} threads {args.threads} OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')} load {_loadavg()}")
    with tempfile.TemporaryDirectory(prefix="vlsparse-ratios-") as tmp:
        model, paths = build(args, Path(tmp))
        measure(args, model, paths)
        if args.rss:
            from vlsparse.bench.memory import steady_rss

            batch = model.example_inputs(batch=args.batch[0], text_len=args.text, regions=args.regions)
            for f in args.formats:
                r = steady_rss(f, paths[f], batch, threads=args.threads)
                print(f"  steady RSS {f:12s} {r['steady'] / 2**20:7.1f} MB (base {r['base'] / 2**20:.1f} MB,"
                      f" model {(r['steady'] - r['base']) / 2**20:.1f} MB)")
    print(f"load after {_loadavg()}")


if __name__ == "__main__":
    main()
