"""Whole-model latency ratios, side by side in one process: dense PyTorch, csr, onnx, onnx-sparse; fp32, int8.

    python benchmarks/model_ratios.py --model uniter-minilm-l2 --img-dim 294 --answers 13 \
        --sparsity 0.7 --batch 1 32 --text 20 --regions 6 --threads 2 --repeats 20

Builds the model (random weights for random presets; MiniLM text weights for the minilm presets),
masks it by global magnitude to ``--sparsity`` (``--block 1x4``: whole 1x4 blocks ranked by L2 norm, as
``find-ticket --block 1x4``), writes every format with
:func:`vlsparse.bench.levels.export_formats`, loads them with :func:`vlsparse.bench.formats.load_format`,
checks each format's logits against the masked dense model (max abs difference printed, <= 1e-4 is
the target) and times all formats interleaved call by call (:func:`vlsparse.bench.timing.time_interleaved`):
median ms of ``--repeats`` calls per batch size, and each format's speed-up over dense PyTorch and
over dense onnxruntime. ``--openmp`` also times the onnx-sparse session with the op on its own
OpenMP pool (the threading before onnxruntime's pool was used). ``--unchained`` also times the
same model sparsified without chaining (``sparsify_onnx(chain=False)``: no GELU epilogue, every node
token-major, as before the chained layouts). ``--rss`` adds the steady RSS (MB) of each format loaded alone in a fresh
process after a few calls (:func:`vlsparse.bench.memory.steady_rss`). ``--profile`` adds onnxruntime's own
profile of each ONNX format per batch size: ms per call and share of the node time per kind of node (our sparse
ops, the dense Linears' MatMuls, attention's activation MatMuls, then op types), where the time goes that the
ratios do not show. The load average is printed
before and after. Nothing here is a test: the figures depend on the machine and its load.

``--dtype fp32 int8`` adds the int8 models to the same process and the same round robin (issue "Sparse and
int8 together"): dense PyTorch through ``torch.ao.quantization.quantize_dynamic``, dense onnxruntime through
``onnxruntime.quantization.quantize_dynamic`` (both in :mod:`vlsparse.runtime.quantize`) and our csr export
with ``--dtype int8`` (Int8SparseLinear), and onnx-sparse int8 (``sparsify_onnx(dtype="int8")``: our int8 kernel
as the ORT op vlsparse.SparseLinearInt8). Every model is printed with its speed-up over dense fp32 PyTorch and over
dense onnxruntime of its own dtype, so the ``csr int8`` and ``onnx-sparse int8`` lines hold both goal ratios. Each int8 model's logits must be within
``INT8_LOGIT_TOLERANCE`` (10%) of the largest |logit| of the masked fp32 model, or the script stops before
timing: that is quantisation error (per-tensor or per-channel weights, per-tensor or per-token activations),
not the fp32 formats' 1e-4. The UNITER-base shape at 70%:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/model_ratios.py --model uniter-base --img-dim 2048 \
        --answers 3129 --regions 36 --batch 1 32 --dtype fp32 int8 --no-spin
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
from vlsparse.bench.levels import export_formats, format_key
from vlsparse.bench.timing import time_interleaved
from vlsparse.models import load_model
from vlsparse.pruning.blocks import parse_block
from vlsparse.pruning.magnitude import global_magnitude_prune
from vlsparse.pruning.mask import apply_mask, ones_mask
from vlsparse.runtime.quantize import INT8_LOGIT_TOLERANCE, int8_logit_error
from vlsparse.runtime.runners import FORMATS, UNAVAILABLE
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
    mask = global_magnitude_prune({n: params[n] for n in scope}, ones_mask(model, scope), args.sparsity,
                                  block=parse_block(args.block))
    with torch.no_grad():
        apply_mask(model, mask)
    return model.eval(), export_formats(model, mask, args.formats, work, args.dtype)


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


def label(fmt: str, dtype: str) -> str:
    """How a (format, dtype) pair is keyed and printed: the format for fp32, else "format dtype"."""
    return fmt if dtype == "fp32" else f"{fmt} {dtype}"


def pairs(args) -> list[tuple[str, str]]:
    """The (format, dtype) pairs of --formats x --dtype that exist (not in vlsparse.runtime.runners.UNAVAILABLE)."""
    return [(f, d) for d in args.dtype for f in args.formats if (f, d) not in UNAVAILABLE]


def load_runners(args, paths: dict[str, Path]) -> dict[str, tuple]:
    """label -> (runner, dtype) for every pair of :func:`pairs` (and --unchained's extra onnx-sparse session)."""
    runners = {label(f, d): (load_format(f, paths[format_key(f, d)], dtype=d, threads=args.threads,
                                         spin=not args.no_spin), d) for f, d in pairs(args)}
    if args.unchained and "onnx-sparse" in runners and "onnx" in paths:
        runners["onnx-sparse/unchained"] = (_unchained(runners["onnx-sparse"][0], paths["onnx"] / "model.onnx",
                                                       args.threads, not args.no_spin), "fp32")
    return runners


def parity(name: str, dtype: str, out: np.ndarray, ref: np.ndarray) -> str:
    """The logit check of one format against the masked fp32 model ``ref`` (B, A), as printed: fp32, the max
    abs difference (<= 1e-4 is the target: fp32 rounding); int8, the error relative to max |ref|, which must be
    <= INT8_LOGIT_TOLERANCE (quantisation error, vlsparse.runtime.quantize) or this raises AssertionError."""
    if dtype != "int8":
        return f"max|diff| {float(np.abs(out - ref).max()):.1e}"
    err = int8_logit_error(out, ref)
    if err > INT8_LOGIT_TOLERANCE:
        raise AssertionError(f"{name}: int8 logits off the masked fp32 model by {err:.3f} of max|logit| "
                             f"(tolerance {INT8_LOGIT_TOLERANCE})")
    return f"int8 err {err:.1e} of max|logit|"


def measure(args, model, paths: dict[str, Path]) -> None:
    """Print parity and the interleaved medians / ratios per batch size: each model against dense fp32 PyTorch
    and against dense onnxruntime of its own dtype (int8: onnxruntime's quantize_dynamic)."""
    runners = load_runners(args, paths)
    for batch in args.batch:
        inputs = model.example_inputs(batch=batch, text_len=args.text, regions=args.regions)
        ref = runners["dense"][0].logits(inputs)
        feeds = {k: r.feed(inputs) for k, (r, _) in runners.items()}
        checks = {k: parity(k, d, r.logits(inputs), ref) for k, (r, d) in runners.items()}
        fns = {k: (lambda r=r, fd=feeds[k]: r.fetch(r.call(fd))) for k, (r, _) in runners.items()}
        if args.openmp and "onnx-sparse" in runners:  # the same session, the op on its own OpenMP pool
            sparse, fed = runners["onnx-sparse"][0], feeds["onnx-sparse"]
            fns["onnx-sparse/omp"] = lambda r=sparse, fd=fed: _on_openmp(r, fd)
            checks["onnx-sparse/omp"] = parity("onnx-sparse/omp", "fp32", _on_openmp(sparse, fed), ref)
        times = time_interleaved(fns, args.repeats, warmup=3)
        med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        print(f"batch {batch} ({batch * (args.text + args.regions)} tokens), median of {args.repeats}, load {_loadavg()}")
        for k in fns:
            onnx = label("onnx", runners.get(k, (None, "fp32"))[1])
            vs_onnx = f"{med[onnx] / med[k]:.2f}x" if onnx in med else "-"
            print(f"  {k:21s} {med[k]:9.2f} ms  vs dense fp32 {med['dense'] / med[k]:.2f}x  vs {onnx:9s} {vs_onnx}"
                  f"  {checks[k]}")


def _profile_session(file: Path, fmt: str, threads: int, spin: bool, prefix: Path):
    """An onnxruntime session on ``file`` with the profiler on and the optimised graph written beside it."""
    import onnxruntime as ort

    from vlsparse.runtime.ort import ort_session

    so = ort.SessionOptions()
    so.enable_profiling, so.profile_file_prefix = True, str(prefix)
    so.optimized_model_filepath = str(prefix) + ".optimized.onnx"
    so.log_severity_level = 3  # not the warning that an optimised graph is machine-specific (it is only read here)
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if fmt.startswith("onnx-sparse"):
        return ort_session(file, threads=threads, sess_options=so)
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])


def node_kinds(optimized: Path) -> dict[str, str]:
    """Node name -> what it computes, from onnxruntime's optimised graph: "sparse Linear" (our ops), "Linear"
    (a MatMul-like node whose second input is a weight initializer), "MatMul (activations)" (attention's
    Q K^T and A V), else the op type."""
    import onnx

    graph = onnx.load(str(optimized), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    kinds = {}
    for n in graph.node:
        if n.domain == "vlsparse":
            kinds[n.name] = "sparse Linear"
        elif "MatMul" in n.op_type or n.op_type == "Gemm":
            kinds[n.name] = "Linear" if len(n.input) > 1 and n.input[1] in weights else "MatMul (activations)"
        else:
            kinds[n.name] = n.op_type
    return kinds


def profile(args, paths: dict[str, Path], inputs: dict, work: Path) -> None:
    """``--profile``: onnxruntime's own profiler on each ONNX format at ``inputs``: ``--repeats`` calls after 3
    warm-up calls; per kind of node (:func:`node_kinds`) its ms per call (the node events' ``dur``, us, summed
    over the timed calls and divided by their number) and its share of the node time."""
    import json

    for f, d in pairs(args):
        if not f.startswith("onnx"):
            continue
        key = format_key(f, d)
        session = _profile_session(paths[key] / "model.onnx", f, args.threads, not args.no_spin, work / f"prof-{key}")
        feed = {i.name: np.asarray(inputs[i.name]) for i in session.get_inputs()}
        for _ in range(3 + args.repeats):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
        cut = runs[2][1]  # the end of the third (last warm-up) call
        kinds = node_kinds(Path(str(work / f"prof-{key}") + ".optimized.onnx"))
        per_kind: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e["ts"] >= cut and e["name"].endswith("_kernel_time"):
                k = kinds.get(e["name"].removesuffix("_kernel_time"), "other")
                per_kind[k] = per_kind.get(k, 0.0) + e["dur"] / 1e3 / (len(runs) - 3)
        total = sum(per_kind.values())
        top = sorted(per_kind.items(), key=lambda kv: -kv[1])
        print(f"  profile {label(f, d):18s} {total:8.2f} ms of nodes per call: "
              + ", ".join(f"{k} {v:.2f} ({v / total:.0%})" for k, v in top[:6]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="uniter-minilm-l2")
    p.add_argument("--img-dim", type=int, default=294)
    p.add_argument("--answers", type=int, default=13)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--block", default="1x1", help="1x4: prune whole 1x4 blocks (what find-ticket --block 1x4 gives)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--text", type=int, default=20)
    p.add_argument("--regions", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "int8"],
                   help="fp32 int8: also the int8 models (dense: quantize_dynamic of PyTorch and onnxruntime; "
                        "csr and onnx-sparse: our int8 exports), each checked against the masked fp32 model")
    p.add_argument("--no-spin", action="store_true", help="onnxruntime threads do not spin-wait")
    p.add_argument("--openmp", action="store_true", help="also time onnx-sparse with the op on an OpenMP pool")
    p.add_argument("--unchained", action="store_true", help="also time onnx-sparse without chained layouts")
    p.add_argument("--rss", action="store_true", help="also the steady RSS of each format in a fresh process")
    p.add_argument("--profile", action="store_true",
                   help="also onnxruntime's profile of each ONNX format: ms and share per kind of node")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.model} {args.sparsity:.0%} block {args.block} threads {args.threads} OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')} load {_loadavg()}")
    for f, d in ((f, d) for d in args.dtype for f in args.formats if (f, d) in UNAVAILABLE):
        print(f"  skipped {f} {d}: {UNAVAILABLE[f, d]}")
    with tempfile.TemporaryDirectory(prefix="vlsparse-ratios-") as tmp:
        model, paths = build(args, Path(tmp))
        measure(args, model, paths)
        if args.profile:
            for batch in args.batch:
                print(f"batch {batch}: onnxruntime profiles, {args.repeats} calls")
                profile(args, paths, model.example_inputs(batch=batch, text_len=args.text, regions=args.regions),
                        Path(tmp))
        if args.rss:
            from vlsparse.bench.memory import steady_rss

            batch = model.example_inputs(batch=args.batch[0], text_len=args.text, regions=args.regions)
            for f, d in pairs(args):
                r = steady_rss(f, paths[format_key(f, d)], batch, dtype=d, threads=args.threads)
                print(f"  steady RSS {label(f, d):12s} {r['steady'] / 2**20:7.1f} MB (base {r['base'] / 2**20:.1f} MB,"
                      f" model {(r['steady'] - r['base']) / 2**20:.1f} MB)")
    print(f"load after {_loadavg()}")


if __name__ == "__main__":
    main()
