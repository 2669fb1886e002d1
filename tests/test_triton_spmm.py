"""Tests for vlsparse.sparse.kernels.triton_spmm (CSR SpMM in Triton).

Correctness is checked everywhere through Triton's interpreter on CPU tensors. Interpreter mode is
fixed when triton is first imported: ``triton.language`` decorates its library functions
(``tl.sum``, ``tl.max``) at import, so ``TRITON_INTERPRET=1`` set later, even before our kernel is
decorated, gives "Cannot call @triton.jit'd outside of the scope of a kernel". Other tests in the
same pytest process may import triton first, so the interpreted cases run in one subprocess that
starts with ``TRITON_INTERPRET=1`` (this file, run as ``python tests/test_triton_spmm.py --worker
OUT.json``). On a machine with a CUDA GPU the same cases also run compiled, in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import vlsparse.sparse.kernels.triton_spmm as ts

HAS_TRITON = importlib.util.find_spec("triton") is not None
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# cases (shared by the interpreter worker and the GPU tests)
# --------------------------------------------------------------------------------------------
_BASE = dict(T=5, out=37, inp=53, sparsity=0.7, x_dtype="float32", v_dtype="float32", col_dtype="int32",
             crow_dtype="int32", bias=True, variant="auto", special=None, blocks=None, x_layout="rowmajor")


def _case(id, **kw):
    c = dict(_BASE, **kw)
    c["id"] = id
    return c


CASES = [
    _case("T1_fp32_i32_bias", T=1),
    _case("T1_i16_nobias", T=1, col_dtype="int16", bias=False),
    _case("T3_odd_gather_x_i16", T=3, variant="gather_x", col_dtype="int16"),
    _case("T17_odd_gather_xt_nobias", T=17, variant="gather_xt", bias=False),
    _case("T40_90pct_auto_i16", T=40, out=64, inp=96, sparsity=0.9, col_dtype="int16"),
    _case("T5_gather_xt", T=5, variant="gather_xt"),
    _case("T33_gather_x", T=33, variant="gather_x", out=19, inp=29),
    _case("empty_rows", T=7, special="empty_rows"),
    _case("all_zero_bias", T=6, special="all_zero"),
    _case("all_zero_nobias", T=6, special="all_zero", bias=False, variant="gather_xt"),
    _case("dense_0pct", T=4, out=9, inp=11, sparsity=0.0),
    _case("fp16_x_fp16_vals_i16", T=9, x_dtype="float16", v_dtype="float16", col_dtype="int16"),
    _case("fp16_x_fp32_vals", T=2, x_dtype="float16"),
    _case("fp32_x_fp16_vals_xt", T=18, v_dtype="float16", variant="gather_xt"),
    _case("bf16_x_bf16_vals", T=3, x_dtype="bfloat16", v_dtype="bfloat16", col_dtype="int16"),
    _case("x_3d", T=(2, 5)),
    _case("multi_chunk_blocks", T=19, blocks=dict(block_n=2, block_j=4, block_t=8), variant="gather_xt"),
    _case("multi_chunk_blocks_x", T=19, blocks=dict(block_n=4, block_j=2, block_t=4), variant="gather_x"),
    _case("no_pipeline_xt", T=21, blocks=dict(pipeline=False, block_n=4, block_j=8), variant="gather_xt"),
    _case("no_pipeline_x", T=3, blocks=dict(pipeline=False, block_j=8), variant="gather_x", special="empty_rows"),
    _case("unsorted_cols", T=4, special="unsorted"),
    _case("int64_indices", T=3, crow_dtype="int64", col_dtype="int64"),
    _case("one_by_one", T=1, out=1, inp=1, sparsity=0.0),
    _case("x_feature_major_view", T=12, x_layout="feature_major", variant="gather_xt"),
    _case("x_strided_view", T=6, x_layout="strided"),
]
CASE_IDS = [c["id"] for c in CASES]

# |y - ref| <= ATOL + RTOL * |ref|, by output dtype (fp32 accumulation, output rounded to x's dtype)
TOL = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3), "bfloat16": (2e-2, 1e-2)}


def _build(case: dict, device: str = "cpu"):
    """x, CSR arrays, bias and the float64 masked dense W (values rounded as the kernel sees them)."""
    g = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
    out, inp = case["out"], case["inp"]
    lead = case["T"] if isinstance(case["T"], tuple) else (case["T"],)
    w = torch.randn(out, inp, generator=g)
    mask = torch.rand(out, inp, generator=g) >= case["sparsity"]
    if case["special"] == "empty_rows":
        mask[0] = False
        mask[out // 2 : out // 2 + 3] = False
        mask[-1] = False
    if case["special"] == "all_zero":
        mask[:] = False
    w = w * mask
    v_dtype = getattr(torch, case["v_dtype"])
    x_dtype = getattr(torch, case["x_dtype"])
    counts = mask.sum(1)
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = counts.cumsum(0)
    rows, cols = mask.nonzero(as_tuple=True)
    vals = w[rows, cols]
    if case["special"] == "unsorted":  # reverse the column order inside every row
        perm = torch.cat([torch.arange(int(crow[r + 1]) - 1, int(crow[r]) - 1, -1) for r in range(out)]).long()
        cols, vals = cols[perm], vals[perm]
    vals = vals.to(v_dtype)
    w64 = w.to(v_dtype).double() * mask  # the masked dense W, rounded as the kernel sees it
    x = torch.randn(*lead, inp, generator=g).to(x_dtype)
    if case["x_layout"] == "feature_major":
        x = x.reshape(-1, inp).t().contiguous().t()  # (T, K) view of a (K, T) tensor
    elif case["x_layout"] == "strided":
        x = torch.randn(*lead, 2 * inp, generator=g).to(x_dtype)[..., ::2]
    bias = torch.randn(out, generator=g).to(x_dtype) if case["bias"] else None
    crow = crow.to(getattr(torch, case["crow_dtype"]))
    cols = cols.to(getattr(torch, case["col_dtype"]))
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(crow), to(cols), to(vals), to(bias), w64


def _references(x, crow, cols, vals, bias, w64):
    """(dense reference, scipy.sparse reference), float64, shape of y."""
    import scipy.sparse as sp

    x64 = x.detach().cpu().double().reshape(-1, x.shape[-1])
    dense = x64 @ w64.T
    a = sp.csr_matrix(
        (vals.detach().cpu().double().numpy(), cols.cpu().long().numpy(), crow.cpu().long().numpy()),
        shape=w64.shape,
    )
    sparse = torch.from_numpy(np.asarray((a @ x64.numpy().T).T))
    if bias is not None:
        dense = dense + bias.cpu().double()
        sparse = sparse + bias.cpu().double()
    lead = x.shape[:-1]
    return dense.reshape(*lead, -1), sparse.reshape(*lead, -1)


def _check_case(case: dict, device: str = "cpu") -> dict:
    x, crow, cols, vals, bias, w64 = _build(case, device)
    y = ts.spmm_triton(x, crow, cols, vals, bias, out_features=case["out"], variant=case["variant"],
                       **(case["blocks"] or {}))
    ref_dense, ref_sparse = _references(x, crow, cols, vals, bias, w64)
    atol, rtol = TOL[case["x_dtype"]]
    res = dict(
        shape=list(y.shape), want_shape=list(ref_dense.shape), dtype=str(y.dtype).replace("torch.", ""),
        err_dense=float((y.cpu().double() - ref_dense).abs().max()) if y.numel() else 0.0,
        err_sparse=float((y.cpu().double() - ref_sparse).abs().max()) if y.numel() else 0.0,
        refs_agree=float((ref_dense - ref_sparse).abs().max()) if y.numel() else 0.0,
        ok_dense=bool(torch.all((y.cpu().double() - ref_dense).abs() <= atol + rtol * ref_dense.abs())),
        ok_sparse=bool(torch.all((y.cpu().double() - ref_sparse).abs() <= atol + rtol * ref_sparse.abs())),
    )
    return res


def _assert_result(case: dict, res: dict) -> None:
    assert res["shape"] == res["want_shape"], res
    assert res["dtype"] == case["x_dtype"], res
    assert res["refs_agree"] < 1e-9, res  # the two references agree with each other
    assert res["ok_dense"], f"vs X @ W_masked.T: max err {res['err_dense']:.3g} ({case['x_dtype']})"
    assert res["ok_sparse"], f"vs scipy.sparse: max err {res['err_sparse']:.3g} ({case['x_dtype']})"


# Structural errors that spmm_triton finds only when it validates (always under the interpreter).
def _bad_csr_inputs():
    x = torch.randn(3, 8)
    crow = torch.tensor([0, 2, 3], dtype=torch.int32)
    cols = torch.tensor([1, 5, 7], dtype=torch.int32)
    vals = torch.randn(3)
    return {
        "col_out_of_range": (x, crow, torch.tensor([1, 5, 8], dtype=torch.int32), vals),
        "negative_col": (x, crow, torch.tensor([1, -1, 7], dtype=torch.int32), vals),
        "crow_not_starting_at_0": (x, torch.tensor([1, 2, 3], dtype=torch.int32), cols, vals),
        "crow_end_not_nnz": (x, torch.tensor([0, 2, 2], dtype=torch.int32), cols, vals),
        "crow_decreasing": (x, torch.tensor([0, 3, 2, 3], dtype=torch.int32), cols, vals),
    }


def _worker(out_path: str) -> None:
    """Run every case under the interpreter (this process must start with TRITON_INTERPRET=1)."""
    results = {"triton_available": list(ts.triton_available()), "interpreter": ts._interpreter_active(), "cases": {}}
    for case in CASES:
        try:
            results["cases"][case["id"]] = _check_case(case, "cpu")
        except Exception as exc:  # reported per case by the parent
            results["cases"][case["id"]] = {"error": f"{type(exc).__name__}: {exc}"}
    errs = {}
    for name, args in _bad_csr_inputs().items():
        try:
            ts.spmm_triton(*args)
            errs[name] = "no error"
        except ValueError as exc:
            errs[name] = f"ValueError: {exc}"
        except Exception as exc:
            errs[name] = f"{type(exc).__name__}: {exc}"
    results["validation"] = errs
    Path(out_path).write_text(json.dumps(results, indent=1))


# --------------------------------------------------------------------------------------------
# interpreter (CPU) tests, through one subprocess
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton)")
    out = tmp_path_factory.mktemp("triton_interp") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


@NEEDS_TRITON
def test_interpreter_mode_active_in_worker(interpreted):
    ok, reason = interpreted["triton_available"]
    assert ok and interpreted["interpreter"], reason
    assert "interpreter" in reason


@NEEDS_TRITON
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_interpreted_matches_references(interpreted, case):
    res = interpreted["cases"][case["id"]]
    assert "error" not in res, res.get("error")
    _assert_result(case, res)


@NEEDS_TRITON
@pytest.mark.parametrize("name", list(_bad_csr_inputs()))
def test_interpreted_rejects_bad_csr(interpreted, name):
    msg = interpreted["validation"][name]
    assert msg.startswith("ValueError"), msg


# --------------------------------------------------------------------------------------------
# in-process tests: argument checking (no triton needed), missing triton, mode errors
# --------------------------------------------------------------------------------------------
def _good():
    x = torch.randn(4, 8)
    crow = torch.tensor([0, 2, 3, 3], dtype=torch.int32)
    cols = torch.tensor([1, 5, 7], dtype=torch.int16)
    vals = torch.randn(3)
    return x, crow, cols, vals


_BAD_ARGS = {
    "x_int": (dict(x=torch.ones(4, 8, dtype=torch.int32)), "x must be float32"),
    "x_fp64": (dict(x=torch.ones(4, 8, dtype=torch.float64)), "x must be float32"),
    "x_1d": (dict(x=torch.ones(8)), r"x must have shape \(T, in_features\)"),
    "vals_fp64": (dict(values=torch.ones(3, dtype=torch.float64)), "values must be float32"),
    "crow_int16": (dict(crow_indices=torch.tensor([0, 2, 3, 3], dtype=torch.int16)), "crow_indices must be int32"),
    "cols_uint8": (dict(col_indices=torch.tensor([1, 5, 7], dtype=torch.uint8)), "col_indices must be int16 or int32"),
    "cols_float": (dict(col_indices=torch.tensor([1.0, 5.0, 7.0])), "col_indices must be int16 or int32"),
    "crow_2d": (dict(crow_indices=torch.zeros(2, 2, dtype=torch.int32)), "crow_indices must be 1-D"),
    "nnz_mismatch": (dict(values=torch.ones(4)), "equal length"),
    "out_features_mismatch": (dict(out_features=5), "out_features=5"),
    "bias_shape": (dict(bias=torch.ones(4)), r"bias must have shape \(3,\)"),
    "bias_dtype": (dict(bias=torch.ones(3, dtype=torch.float64)), "bias must be a float32"),
    "variant": (dict(variant="dense_tile"), "variant must be one of"),
    "not_a_tensor": (dict(values=[1.0, 2.0, 3.0]), "values must be a torch.Tensor"),
    "int16_cols_too_wide": (dict(x=torch.ones(2, 40000)), "int16 col_indices address at most"),
    "meta_device": (dict(x=torch.ones(4, 8, device="meta")), "meta"),
}


@pytest.mark.parametrize("name", list(_BAD_ARGS))
def test_rejects_bad_arguments(name):
    over, match = _BAD_ARGS[name]
    args = dict(zip(("x", "crow_indices", "col_indices", "values"), _good()))
    args.update(over)
    with pytest.raises(ValueError, match=match):
        ts.spmm_triton(**args)


def test_rejects_mixed_devices():
    x, crow, cols, vals = _good()
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        ts.spmm_triton(x, crow, cols, vals.to("meta"))


def test_select_config_is_sane():
    for T in (1, 2, 7, 40, 200, 1024):
        for n in (1, 37, 768, 3072):
            cfg = ts.select_config(T, n, n * 100)
            for k in ("block_n", "block_j", "block_t", "num_warps"):
                assert cfg[k] >= 1 and cfg[k] & (cfg[k] - 1) == 0, (T, n, cfg)
            assert cfg["block_n"] * cfg["block_j"] * cfg["block_t"] <= 8192
            assert cfg["variant"] == ("gather_x" if T <= 8 else "gather_xt")
    with pytest.raises(ValueError):
        ts.select_config(4, 4, 4, variant="nope")


def test_import_and_call_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.setattr(ts, "triton", None)
    monkeypatch.setattr(ts, "tl", None)
    monkeypatch.setattr(ts, "_KERNELS", {})
    ok, reason = ts.triton_available()
    assert not ok and "triton is not importable" in reason
    with pytest.raises(ImportError, match="pip install triton"):
        ts.spmm_triton(*_good())
    # the module itself imports without triton
    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['triton'] = None; import vlsparse.sparse.kernels.triton_spmm as m; "
         "print(m.triton_available()[0])"],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@NEEDS_TRITON
def test_cpu_tensors_need_interpreter_mode():
    if ts._interpreter_active():
        pytest.skip("this process runs triton in interpreter mode")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ts.spmm_triton(*_good())


# --------------------------------------------------------------------------------------------
# ahead-of-time compile for Hopper (sm_90): no GPU needed, catches what the interpreter lets pass
# --------------------------------------------------------------------------------------------
_AOT = {
    "T1_gather_x_fp16_i16": dict(T=1, dt="fp16", col="i16", variant="gather_x"),
    "T5_gather_x_fp32_i32": dict(T=5, dt="fp32", col="i32", variant="gather_x"),
    "T200_gather_xt_fp16_i16": dict(T=200, dt="fp16", col="i16", variant="gather_xt"),
    "T40_gather_xt_bf16_nopipe": dict(T=40, dt="bf16", col="i32", variant="gather_xt", pipeline=False),
}


@NEEDS_TRITON
@pytest.mark.parametrize("name", list(_AOT))
def test_compiles_for_sm90(name):
    if ts._interpreter_active():
        pytest.skip("triton runs in interpreter mode in this process")
    spec = dict(_AOT[name])
    try:  # internal API: skip, not fail, where this triton version spells it differently
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction

        fn = JITFunction(ts._kernel_sources()["spmm_csr"])
        T, out_f, in_f = spec["T"], 768, 768
        cfg = ts.select_config(T, out_f, out_f * in_f // 4, variant=spec["variant"])
        if "pipeline" in spec:
            cfg["pipeline"] = spec["pipeline"]
        xt = cfg["variant"] == "gather_xt"
        ptrs = dict(x_ptr=spec["dt"], crow_ptr="i32", col_ptr=spec["col"], val_ptr=spec["dt"], bias_ptr=spec["dt"],
                    y_ptr=spec["dt"])
        t_pad = -(-T // 16) * 16
        ints = dict(n_rows=out_f, n_tok=T, n_tok_x=t_pad if xt else T, stride_xk=t_pad if xt else 1,
                    stride_xt=1 if xt else in_f, stride_yt=out_f, stride_yn=1)
        sig, const, attrs = {}, {}, {}
        for i, n in enumerate(fn.arg_names):  # mimic the launcher's specialisation
            if n in ptrs:
                sig[n], attrs[(i,)] = "*" + ptrs[n], [["tt.divisibility", 16]]
            elif n in ints and ints[n] == 1:
                sig[n], const[n] = "constexpr", 1
            elif n in ints:
                sig[n] = "i32"
                if ints[n] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[n] = "constexpr"
        const.update(HAS_BIAS=True, TOK_FAST=xt, PIPELINE=cfg["pipeline"], BLOCK_N=cfg["block_n"],
                     BLOCK_J=cfg["block_j"], BLOCK_T=cfg["block_t"])
        src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
        target = GPUTarget("cuda", 90, 32)
    except (ImportError, TypeError, AttributeError) as exc:
        pytest.skip(f"triton's AOT API differs here: {exc!r}")
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "enable_fp_fusion": True}
    compiled = triton.compile(src, target=target, options=options)
    assert "ld.global" in compiled.asm["ptx"] and compiled.asm["cubin"]


# --------------------------------------------------------------------------------------------
# compiled (GPU) tests: same cases on CUDA, plus BERT-sized shapes against F.linear
# --------------------------------------------------------------------------------------------
def _gpu_skip_reason():
    if not HAS_TRITON:
        return "triton is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if ts._interpreter_active():
        return "triton runs in interpreter mode in this process"
    return None


NEEDS_GPU = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))


@NEEDS_GPU
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gpu_matches_references(case):
    _assert_result(case, _check_case(case, "cuda"))


@NEEDS_GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 40, 200])
@pytest.mark.parametrize("variant", ["auto", "gather_x", "gather_xt"])
def test_gpu_bert_shapes_vs_linear(dtype, T, variant):
    g = torch.Generator(device="cuda").manual_seed(0)
    out, inp = 3072, 768
    w = torch.randn(out, inp, device="cuda", generator=g) * 0.05
    w = w * (torch.rand(out, inp, device="cuda", generator=g) >= 0.7)
    x = torch.randn(T, inp, device="cuda", generator=g).to(dtype)
    b = torch.randn(out, device="cuda", generator=g).to(dtype)
    crow = torch.zeros(out + 1, dtype=torch.int32, device="cuda")
    crow[1:] = (w != 0).sum(1).cumsum(0)
    cols = (w != 0).nonzero()[:, 1].to(torch.int16)
    vals = w[w != 0].to(dtype)
    y = ts.spmm_triton(x, crow, cols, vals, b, variant=variant)
    ref = torch.nn.functional.linear(x.double(), w.to(dtype).double() * (w != 0), b.double())
    atol, rtol = TOL[str(dtype).replace("torch.", "")]
    torch.testing.assert_close(y.double(), ref, atol=atol * 4, rtol=rtol)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__, "-q"]))
