#!/usr/bin/env python
"""GPU benchmark: Triton CSR SpMM (vlsparse.sparse.kernels.triton_spmm) vs cuBLAS dense (F.linear).

Run on a machine with an NVIDIA GPU:

    python benchmarks/gpu_spmm.py                       # BERT-base shapes x T x sparsity, fp16 and fp32
    python benchmarks/gpu_spmm.py --sweep --sparsity 0.7 0.9   # also search launch configs per case
    python benchmarks/gpu_spmm.py --out runs/gpu_spmm.json     # keep the rows

The default grid (72 cases) takes about a minute, mostly compiling. --sweep tries ~30-50 configs
per case and compiles many kernels: split it (e.g. one --dtypes and one --shapes per run) to stay
within a 10-minute job.

For each case it prints the median kernel time (CUDA events around one call, L2 flushed before
each call, so weights come from HBM as they do in a model too large for L2), the same for dense
F.linear, the speedup (dense / sparse), the wall time per call in a tight loop (warm L2, includes
the host launch cost, which dominates at small T), the max error against the dense product and
the bytes of CSR vs dense weights. fp32 dense runs with TF32 off (torch's default) unless --tf32.

The CSR arrays are built here from a dense masked tensor with torch ops; the script needs only
vlsparse.sparse.kernels.triton_spmm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from vlsparse.sparse.kernels.triton_spmm import select_config, spmm_triton, triton_available, VARIANTS
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vlsparse.sparse.kernels.triton_spmm import select_config, spmm_triton, triton_available, VARIANTS

SHAPES = {"768x768": (768, 768), "3072x768": (3072, 768), "768x3072": (768, 3072)}  # (out, in)
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def make_case(out_f, in_f, sparsity, dtype, index_dtype, device, seed=0):
    """Magnitude-pruned random W (exact sparsity), its CSR arrays, x is made per T by the caller."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out_f, in_f, device=device, generator=g) / in_f**0.5
    k = int(round(sparsity * w.numel()))
    mask = torch.ones_like(w, dtype=torch.bool)
    if k > 0:
        thresh = w.abs().flatten().kthvalue(k).values
        mask = w.abs() > thresh
    w = (w * mask).to(dtype)
    crow = torch.zeros(out_f + 1, dtype=torch.int32, device=device)
    crow[1:] = mask.sum(1).cumsum(0)
    cols = mask.nonzero()[:, 1].to(index_dtype).contiguous()  # row-major order: sorted by row, then column
    vals = w[mask].contiguous()
    bias = (torch.randn(out_f, device=device, generator=g) * 0.1).to(dtype)
    return w, bias, crow, cols, vals


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, device, repeats, flush_mb=256):
        self.device, self.repeats = device, repeats
        self.cuda = device.type == "cuda"
        self.flush_buf = torch.empty(flush_mb * 2**20 // 4, dtype=torch.int32, device=device) if self.cuda else None

    def kernel_us(self, fn):
        """Median of `repeats` single calls timed with CUDA events, L2 flushed before each."""
        fn()  # compile / warm
        if not self.cuda:
            return self.wall_us(fn, max(1, self.repeats // 10))
        for _ in range(3):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for s, e in zip(starts, ends):
            self.flush_buf.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3

    def wall_us(self, fn, n=None):
        """Wall time per call over a tight loop (warm caches, host launch cost included)."""
        n = n or self.repeats
        fn()
        self._sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self._sync()
        return (time.perf_counter() - t0) / n * 1e6

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# config search (coordinate descent from the default)
# --------------------------------------------------------------------------------------------
def _pow2s(lo, hi):
    v, out = lo, []
    while v <= hi:
        out.append(v)
        v *= 2
    return out


def sweep(timer, call, T, base):
    """Coordinate descent over variant / block_t / block_n / block_j / num_warps / num_stages / pipeline."""
    space = {
        "variant": ["gather_x"] if T == 1 else ["gather_x", "gather_xt"],
        "block_t": [1] if T == 1 else [bt for bt in _pow2s(2, 128) if bt <= max(2, 2 * T)],
        "block_n": _pow2s(1, 32),
        "block_j": _pow2s(1, 256),
        "num_warps": [1, 2, 4, 8],
        "num_stages": [1, 2],
        "pipeline": [True, False],
    }
    seen = {}

    def cost(cfg):
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            tile = cfg["block_n"] * cfg["block_j"] * cfg["block_t"]
            if tile > 16384 or tile < 32:
                seen[key] = float("inf")
            else:
                try:
                    seen[key] = timer.kernel_us(lambda: call(**cfg))
                except Exception as exc:  # compile failure / out of resources: skip the point
                    print(f"      skip {cfg}: {type(exc).__name__}: {str(exc)[:80]}", file=sys.stderr)
                    seen[key] = float("inf")
        return seen[key]

    best = {k: base[k] for k in space}
    best_t = cost(best)
    for _ in range(2):
        improved = False
        for key, values in space.items():
            for v in values:
                cand = dict(best, **{key: v})
                t = cost(cand)
                if t < best_t * 0.98:
                    best, best_t, improved = cand, t, True
        if not improved:
            break
    return best, best_t, len(seen)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"out x in, from {list(SHAPES)} or OUTxIN")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 40, 200, 1024])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    p.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=list(DTYPES))
    p.add_argument("--index-dtype", default="int16", choices=["int16", "int32"])
    p.add_argument("--variant", default="auto", choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=100, help="timed calls per measurement (median)")
    p.add_argument("--no-bias", action="store_true")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in the fp32 dense baseline")
    p.add_argument("--sweep", action="store_true", help="search launch configs per case (slow: compiles many)")
    p.add_argument("--out", type=Path, help="write all rows as JSON here")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise this script on CPU through Triton's interpreter (TRITON_INTERPRET=1, tiny shapes; "
                        "times are meaningless)")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        ok, why = triton_available()
        if not ok or "interpreter" not in why:
            sys.exit(f"--cpu-smoke needs TRITON_INTERPRET=1 set before triton is imported ({why})")
        device = torch.device("cpu")
        args.repeats = min(args.repeats, 2)
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_spmm.py: no CUDA GPU visible to torch; this benchmark runs on a GPU machine "
                     "(use --cpu-smoke with TRITON_INTERPRET=1 only to check the script itself)")
        ok, why = triton_available()
        if not ok or "interpreter" in why:
            sys.exit(f"gpu_spmm.py: Triton cannot compile for the GPU here: {why}")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)

    import triton

    shapes = []
    for s in args.shapes:
        if s in SHAPES:
            shapes.append((s, SHAPES[s]))
        else:
            o, i = (int(v) for v in s.lower().split("x"))
            shapes.append((s, (o, i)))
    if args.cpu_smoke:
        shapes = [("48x40", (48, 40))]
        args.tokens = [t for t in args.tokens if t <= 40][:2] or [1]

    timer = Timer(device, args.repeats)
    index_dtype = getattr(torch, args.index_dtype)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    print(f"# {dev_name} | torch {torch.__version__} | triton {triton.__version__} | TF32 for fp32 dense: "
          f"{bool(args.tf32)} | index {args.index_dtype} | bias {not args.no_bias} | median of {args.repeats}, "
          f"L2 flushed")
    header = (f"{'shape':>9} {'T':>5} {'sp':>4} {'dt':>4} | {'dense_us':>9} {'spmm_us':>9} {'speedup':>7} | "
              f"{'wall_dense':>10} {'wall_spmm':>9} {'speedup':>7} | {'max_err':>8} {'MB csr/dense':>13} | config")
    print(header)
    print("-" * len(header))
    rows = []
    for sname, (out_f, in_f) in shapes:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for sp in args.sparsity:
                w, bias, crow, cols, vals = make_case(out_f, in_f, sp, dtype, index_dtype, device)
                if args.no_bias:
                    bias = None
                nnz = vals.numel()
                mb_csr = (crow.numel() * 4 + nnz * (cols.element_size() + vals.element_size())) / 2**20
                mb_dense = w.numel() * w.element_size() / 2**20
                for T in args.tokens:
                    x = torch.randn(T, in_f, device=device).to(dtype)

                    def dense():
                        return F.linear(x, w, bias)

                    def call(**cfg):
                        return spmm_triton(x, crow, cols, vals, bias, out_features=out_f, **cfg)

                    base = select_config(T, out_f, nnz, variant=args.variant,
                                         n_sm=torch.cuda.get_device_properties(device).multi_processor_count
                                         if device.type == "cuda" else 8)
                    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
                    err = (call(variant=args.variant).float() - ref).abs().max().item()
                    t_dense = timer.kernel_us(dense)
                    t_sp = timer.kernel_us(lambda: call(variant=args.variant))
                    w_dense = timer.wall_us(dense)
                    w_sp = timer.wall_us(lambda: call(variant=args.variant))
                    row = dict(shape=sname, out=out_f, inp=in_f, T=T, sparsity=sp, dtype=dname, nnz=nnz,
                               dense_us=t_dense, spmm_us=t_sp, speedup=t_dense / t_sp,
                               wall_dense_us=w_dense, wall_spmm_us=w_sp, wall_speedup=w_dense / w_sp,
                               max_err=err, mb_csr=mb_csr, mb_dense=mb_dense, config=base)
                    cfg_s = (f"{base['variant']} n{base['block_n']} j{base['block_j']} t{base['block_t']} "
                             f"w{base['num_warps']} s{base['num_stages']} p{int(base['pipeline'])}")
                    print(f"{sname:>9} {T:>5} {sp:>4.2f} {dname:>4} | "
                          f"{t_dense:>9.1f} {t_sp:>9.1f} {t_dense / t_sp:>6.2f}x | "
                          f"{w_dense:>10.1f} {w_sp:>9.1f} {w_dense / w_sp:>6.2f}x | {err:>8.1e} "
                          f"{mb_csr:>6.2f}/{mb_dense:<6.2f} | {cfg_s}", flush=True)
                    if args.sweep:
                        best, t_best, n_tried = sweep(timer, call, T, base)
                        row.update(best_config=best, best_us=t_best, best_speedup=t_dense / t_best)
                        print(f"{'':>26}   sweep ({n_tried} configs): best {t_best:.1f} us "
                              f"({t_dense / t_best:.2f}x dense) with {best}", flush=True)
                    rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(device=dev_name, torch=torch.__version__, triton=triton.__version__, tf32=bool(args.tf32),
                    index_dtype=args.index_dtype, repeats=args.repeats, bias=not args.no_bias)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        print(f"# wrote {args.out}")
    bad = [r for r in rows if r["max_err"] > (1e-3 if r["dtype"] == "fp32" else 5e-2)]
    if bad:
        print(f"# WARNING: {len(bad)} cases with a large max error (see max_err)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
