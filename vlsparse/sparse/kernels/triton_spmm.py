"""CSR sparse x dense matmul on the GPU, written in Triton.

``spmm_triton(x, crow_indices, col_indices, values, bias)`` computes ``Y = X W^T + bias`` where
``W`` (out_features x in_features) is stored in CSR by output row. It is the GPU counterpart of
the CPU kernel: same CSR arrays, same result.

Kernel ("row-split gather", one kernel, two layouts of X):

* One program owns a tile of ``BLOCK_N`` output rows x ``BLOCK_T`` tokens and keeps it in fp32.
* It walks the rows' nonzeros in chunks of ``BLOCK_J``: it loads a ``[BLOCK_N, BLOCK_J]`` block of
  column indices and values (contiguous per row, so coalesced), gathers the matching X entries as a
  ``[BLOCK_N, BLOCK_J, BLOCK_T]`` block and does one elementwise FMA into a 3-D fp32 accumulator.
  The reduction over ``BLOCK_J`` happens once, after the loop, so the loop body has no shuffles.
* ``variant="gather_xt"`` first makes X feature-major (``X^T``, K x T, one transpose unless the
  caller's X already is), so each gathered strip ``X^T[col, t0:t0+BLOCK_T]`` is one contiguous
  load. ``variant="gather_x"`` gathers from X as it is (tokens strided by in_features): no extra
  pass over X, which wins when T is small (T = 1 is a plain CSR SpMV). ``"auto"`` picks by T.
  The 3-D tiles are ``[BLOCK_N, BLOCK_J, BLOCK_T]`` in gather_xt and ``[BLOCK_N, BLOCK_T, BLOCK_J]``
  in gather_x (neighbouring nonzeros of a row read neighbouring columns of X): the fastest-varying
  axis is the one that coalesces (``TOK_FAST``; ``T_AX`` / ``J_AX`` name the token / chunk axes).
* X loads are masked by ``n_tok_x >= n_tok``: in gather_xt the rows of X^T are padded to a multiple
  of 16 tokens, so the mask is constant over 16 tokens and the loads vectorise; padding tokens only
  reach accumulator entries that are never stored.
* Rows of a tile loop to the longest row of the tile; shorter rows are masked.
* ``pipeline=True`` (default) prefetches in registers: while chunk i is multiplied, chunk i+1's X
  gather and chunk i+2's index/value loads are in flight. Triton's ``num_stages`` does not
  pipeline gathers (checked on the sm_90 PTX: no cp.async, same registers for 1 and 3 stages).
* Launch sizes come from ``select_config`` (a heuristic written without a GPU at hand); every knob
  can be overridden per call, and ``benchmarks/gpu_spmm.py --sweep`` searches them on the GPU.

Why not "load-sparse, compute-dense" (decompress a W tile, ``tl.dot``)? Triton has no scatter into
shared memory, so decompressing an unstructured CSR tile costs a compare per (nonzero, column) on
the CUDA cores, which is more work than the dense tensor-core product it feeds; at T >= a few hundred
in fp16, dense cuBLAS is the right call (the benchmark in ``benchmarks/gpu_spmm.py`` shows where the
crossover sits). Unstructured sparsity pays on the GPU when T is small (the product is bound by
reading W) and in fp32, where cuBLAS cannot use tensor cores unless TF32 is enabled.

Triton is imported lazily: importing this module never needs triton, and the kernel is decorated
on first use. CPU tensors run through Triton's interpreter (slow; for tests) when the process runs
triton in interpreter mode, which needs ``TRITON_INTERPRET=1`` in the environment *before triton
is first imported*: ``triton.language`` decorates its own library functions (``tl.sum``,
``tl.max``) at import, and an interpreted kernel cannot call compiled ones (it fails with "Cannot
call @triton.jit'd outside of the scope of a kernel"). Setting the variable later, even before
the kernel is decorated, does not work. Tests therefore run the interpreter in a subprocess.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

__all__ = ["spmm_triton", "triton_available", "select_config", "VARIANTS"]

VARIANTS = ("auto", "gather_xt", "gather_x")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CROW_DTYPES = (torch.int32, torch.int64)
_COL_DTYPES = (torch.int16, torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1

# Kernels, decorated lazily: {"compiled" | "interpreted": kernel}.
_KERNELS: dict[str, Any] = {}
triton = None  # set by _import_triton()
tl = None


# ---- triton import and availability ----------------------------------------------------------
def _import_triton():
    """Import triton into this module's globals; return the exception on failure, else None."""
    global triton, tl
    if triton is not None:
        return None
    try:  # the gpu extra: triton stays optional, imported on first use
        import triton as _triton
        import triton.language as _tl
    except Exception as exc:  # ImportError, or a broken install raising something else
        return exc
    triton, tl = _triton, _tl
    return None


def _interpreter_active() -> bool:
    """Whether triton in this process runs kernels through its interpreter (fixed when triton is
    first imported, see the module docstring: setting ``TRITON_INTERPRET`` later does not switch it)."""
    if _import_triton() is not None:
        return False
    try:  # gpu extra (triton), optional
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.sum, InterpretedFunction)


def triton_available() -> tuple[bool, str]:
    """Whether ``spmm_triton`` can run in this process, and why not.

    True when triton imports and either it runs in interpreter mode (``TRITON_INTERPRET=1`` set
    before triton was first imported; CPU tensors work) or torch sees a CUDA device.
    """
    err = _import_triton()
    if err is not None:
        return False, f"triton is not importable ({type(err).__name__}: {err}); pip install triton"
    if _interpreter_active():
        return True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, (
            f"triton {triton.__version__} is installed but torch sees no CUDA device (for the CPU "
            "interpreter, set TRITON_INTERPRET=1 before triton is first imported in the process)"
        )
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


# ---- the kernel ------------------------------------------------------------------------------
def _kernel_sources():
    """Define the kernel functions (plain Python; decorated by the caller). Needs ``tl`` set."""

    def _spmm_csr_kernel(
        x_ptr, crow_ptr, col_ptr, val_ptr, bias_ptr, y_ptr,
        n_rows, n_tok, n_tok_x,
        stride_xk, stride_xt, stride_yt, stride_yn,
        HAS_BIAS: tl.constexpr, TOK_FAST: tl.constexpr, PIPELINE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        if TOK_FAST:
            T_AX: tl.constexpr = 2
            J_AX: tl.constexpr = 1
        else:
            T_AX: tl.constexpr = 1
            J_AX: tl.constexpr = 2

        pid_n = tl.program_id(0)
        pid_t = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        row_ok = rows < n_rows
        start = tl.load(crow_ptr + rows, mask=row_ok, other=0)
        length = tl.load(crow_ptr + rows + 1, mask=row_ok, other=0) - start  # [BLOCK_N] nonzeros per row
        max_len = tl.max(length, axis=0)  # the tile's rows walk to its longest row, masked
        toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        tok_ok = toks < n_tok
        x_tok = x_ptr + tl.expand_dims(tl.expand_dims(toks, 0), J_AX) * stride_xt  # [1, BLOCK_T] on the T axis
        tmask = tl.expand_dims(tl.expand_dims(toks < n_tok_x, 0), J_AX)
        jj = tl.arange(0, BLOCK_J)
        acc = tl.zeros((BLOCK_N, BLOCK_J, BLOCK_T) if TOK_FAST else (BLOCK_N, BLOCK_T, BLOCK_J), dtype=tl.float32)

        if PIPELINE:
            # software pipeline: chunk i multiplied, i+1's X gather and i+2's loads in flight
            nz = jj[None, :] < length[:, None]  # [BLOCK_N, BLOCK_J]
            idx = start[:, None] + jj[None, :]  # [BLOCK_N, BLOCK_J]
            cols = tl.load(col_ptr + idx, mask=nz, other=0).to(tl.int32)
            vals_c = tl.load(val_ptr + idx, mask=nz, other=0.0)
            xv_c = tl.load(x_tok + tl.expand_dims(cols, T_AX) * stride_xk,  # 3-D tile, as acc
                           mask=tl.expand_dims(nz, T_AX) & tmask, other=0.0)
            nz_n = (BLOCK_J + jj)[None, :] < length[:, None]
            idx = start[:, None] + (BLOCK_J + jj)[None, :]
            cols_n = tl.load(col_ptr + idx, mask=nz_n, other=0).to(tl.int32)
            vals_n = tl.load(val_ptr + idx, mask=nz_n, other=0.0)
            for j0 in range(0, max_len, BLOCK_J):
                xv_n = tl.load(x_tok + tl.expand_dims(cols_n, T_AX) * stride_xk,
                               mask=tl.expand_dims(nz_n, T_AX) & tmask, other=0.0)
                j2 = j0 + 2 * BLOCK_J + jj
                nz_nn = j2[None, :] < length[:, None]
                idx = start[:, None] + j2[None, :]
                cols_nn = tl.load(col_ptr + idx, mask=nz_nn, other=0).to(tl.int32)
                vals_nn = tl.load(val_ptr + idx, mask=nz_nn, other=0.0)
                acc += tl.expand_dims(vals_c.to(tl.float32), T_AX) * xv_c.to(tl.float32)
                xv_c = xv_n
                vals_c = vals_n
                cols_n = cols_nn
                vals_n = vals_nn
                nz_n = nz_nn
        else:
            for j0 in range(0, max_len, BLOCK_J):
                j = j0 + jj
                nz = j[None, :] < length[:, None]
                idx = start[:, None] + j[None, :]
                cols = tl.load(col_ptr + idx, mask=nz, other=0).to(tl.int32)
                vals = tl.load(val_ptr + idx, mask=nz, other=0.0).to(tl.float32)
                xv = tl.load(x_tok + tl.expand_dims(cols, T_AX) * stride_xk,
                             mask=tl.expand_dims(nz, T_AX) & tmask, other=0.0)
                acc += tl.expand_dims(vals, T_AX) * xv.to(tl.float32)
        out = tl.sum(acc, axis=J_AX)  # [BLOCK_N, BLOCK_T]: the one reduction, after the loop

        if HAS_BIAS:
            b = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            out += b[:, None]
        y_ptrs = y_ptr + rows[:, None] * stride_yn + toks[None, :] * stride_yt
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & tok_ok[None, :])

    return {"spmm_csr": _spmm_csr_kernel}


def _get_kernel():
    """The kernel for this process's mode (compiled or interpreted), decorated on first use."""
    err = _import_triton()
    if err is not None:
        raise ImportError(f"spmm_triton needs triton, which did not import ({err!r}); pip install triton") from err
    mode = "interpreted" if _interpreter_active() else "compiled"
    kern = _KERNELS.get(mode)
    if kern is None:
        if mode == "interpreted":
            from triton.runtime.interpreter import InterpretedFunction as decorate  # gpu extra: triton stays optional
        else:
            from triton.runtime.jit import JITFunction as decorate  # gpu extra: triton stays optional
        kern = _KERNELS[mode] = decorate(_kernel_sources()["spmm_csr"])
    return kern, mode == "interpreted"


# ---- configuration ---------------------------------------------------------------------------
def _pow2_ceil(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n).bit_length() - 1)


def select_config(n_tok: int, n_rows: int, nnz: int, *, variant: str = "auto", n_sm: int = 132) -> dict:
    """The launch configuration ``spmm_triton`` uses by default (heuristic; tune with the bench).

    Returns ``dict(variant, block_n, block_j, block_t, num_warps, num_stages, pipeline)``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "auto":
        variant = "gather_x" if n_tok <= 8 else "gather_xt"
    # token block: T=1 -> 1 (SpMV); small T -> next power of two; else the largest of 64/32/16
    # that pads T by at most 25%.
    if n_tok <= 1:
        block_t = 1
    elif n_tok <= 16:
        block_t = _pow2_ceil(n_tok)
    else:
        block_t = 16
        for bt in (64, 32):
            padded = -(-n_tok // bt) * bt
            if padded - n_tok <= 0.25 * padded:
                block_t = bt
                break
    t_blocks = -(-n_tok // block_t)
    # rows per program: as many as 16, but keep >= 4 programs per SM in flight.
    block_n = 16
    while block_n > 1 and -(-n_rows // block_n) * t_blocks < 4 * n_sm:
        block_n //= 2
    # nonzeros per chunk: fill a 4096-element tile, no more than the average row needs.
    avg_row = max(1, nnz // max(1, n_rows))
    block_j = max(1, min(_pow2_floor(4096 // (block_n * block_t)), _pow2_ceil(avg_row), 128))
    return dict(variant=variant, block_n=block_n, block_j=block_j, block_t=block_t, num_warps=4, num_stages=1,
                pipeline=True)


# ---- public entry point: checks, launch configuration, launch --------------------------------
def spmm_triton(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_features: int | None = None,
    *,
    variant: str = "auto",
    block_n: int | None = None,
    block_j: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    pipeline: bool | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """``Y = X W^T + bias`` with W (out_features, in_features) in CSR by output row.

    x: (T, in_features) or (..., in_features), float32/float16/bfloat16, on CUDA (or on CPU with
    the interpreter). crow_indices: (out_features + 1,) int32 (int64 accepted). col_indices:
    (nnz,) int16/int32 (int64 accepted), sorted or not. values: (nnz,) float32/float16/bfloat16.
    bias: (out_features,) float or None. Returns (..., out_features) in x's dtype; products and
    sums in fp32.

    variant: "auto" | "gather_xt" | "gather_x" (see the module docstring). block_n / block_j /
    block_t / num_warps / num_stages / pipeline override ``select_config``'s choice (pipeline:
    prefetch the next chunks in registers; num_stages does not pipeline these gathers).
    validate: check the CSR structure and column range (forces a device sync; always done in
    interpreter mode, where a bad index would read out of bounds). CPU tensors need triton in
    interpreter mode (TRITON_INTERPRET=1 before triton is first imported).

    Raises ValueError for bad inputs and ImportError when triton is missing. Forward only: the
    output carries no autograd history.
    """
    n_rows = _check_inputs(x, crow_indices, col_indices, values, bias, out_features, variant)  # N = out_features
    kernel, interpret = _check_device(x, crow_indices, col_indices, values, bias)
    in_features = x.shape[-1]  # K
    x2 = x.reshape(-1, in_features)  # (T, K): the leading axes are tokens
    n_tok = x2.shape[0]
    if n_tok * max(in_features, n_rows, 1) > _INT32_MAX or values.numel() > _INT32_MAX:
        raise ValueError("inputs too large for 32-bit offsets: split x into smaller token batches")
    if n_tok == 0 or n_rows == 0:
        y = torch.zeros((n_tok, n_rows), dtype=x.dtype, device=x.device)  # (T, N)
        if bias is not None and n_tok:
            y += bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], n_rows)  # (..., N)
    crow = crow_indices.contiguous()  # (N + 1,)
    col, val = col_indices.contiguous(), values.contiguous()  # (nnz,), (nnz,)
    b = bias.contiguous() if bias is not None else None  # (N,)
    if validate or interpret:
        _validate_csr(crow, col, in_features)
    overrides = dict(block_n=block_n, block_j=block_j, block_t=block_t, num_warps=num_warps, num_stages=num_stages,
                     pipeline=pipeline)
    cfg = _launch_config(n_tok, n_rows, val.numel(), variant, x.device, overrides)
    y = _launch(kernel, interpret, cfg, x2, crow, col, val, b, n_rows)  # (T, N)
    return y.reshape(*x.shape[:-1], n_rows)  # (..., N)


def _check_inputs(x, crow_indices, col_indices, values, bias, out_features, variant) -> int:
    """Types, dtypes and shapes of :func:`spmm_triton`'s arguments; returns out_features (N)."""
    for name, t in (("x", x), ("crow_indices", crow_indices), ("col_indices", col_indices), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if values.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"values must be float32, float16 or bfloat16, got {values.dtype}")
    if crow_indices.dtype not in _CROW_DTYPES:
        raise ValueError(f"crow_indices must be int32 (or int64), got {crow_indices.dtype}")
    if col_indices.dtype not in _COL_DTYPES:
        raise ValueError(f"col_indices must be int16 or int32 (or int64), got {col_indices.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (T, in_features), got {tuple(x.shape)}")
    if crow_indices.dim() != 1 or crow_indices.numel() < 1:
        raise ValueError("crow_indices must be 1-D with out_features + 1 entries, got shape "
                         f"{tuple(crow_indices.shape)}")
    if col_indices.dim() != 1 or values.dim() != 1 or col_indices.numel() != values.numel():
        raise ValueError(f"col_indices and values must be 1-D of equal length (nnz), got {tuple(col_indices.shape)} "
                         f"and {tuple(values.shape)}")
    n_rows = crow_indices.numel() - 1
    if out_features is not None and int(out_features) != n_rows:
        raise ValueError(f"out_features={out_features} but crow_indices has {crow_indices.numel()} entries "
                         "(expects out_features + 1)")
    in_features = x.shape[-1]
    if col_indices.dtype == torch.int16 and in_features > 2**15:
        raise ValueError(f"int16 col_indices address at most 32768 input features, x has {in_features}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOAT_DTYPES:
            got = getattr(bias, "dtype", type(bias))
            raise ValueError(f"bias must be a float32/float16/bfloat16 tensor or None, got {got}")
        if bias.shape != (n_rows,):
            raise ValueError(f"bias must have shape ({n_rows},), got {tuple(bias.shape)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return n_rows


def _check_device(x, crow_indices, col_indices, values, bias) -> tuple[Any, bool]:
    """All inputs on x's device, one the kernel can run on; returns (kernel, interpreted)."""
    dev = x.device
    tensors = {"crow_indices": crow_indices, "col_indices": col_indices, "values": values}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but x is on {dev}: put all inputs on one device")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"spmm_triton supports CUDA tensors (or CPU ones under the interpreter), got device {dev}")
    kernel, interpret = _get_kernel()
    if dev.type == "cpu" and not interpret:
        raise ValueError(
            "spmm_triton runs on CUDA tensors and x is on the CPU. Move the inputs to a GPU, or run the "
            "process with TRITON_INTERPRET=1 set before triton is first imported to use Triton's "
            "interpreter on CPU tensors (slow; for tests)."
        )
    return kernel, interpret


def _validate_csr(crow: torch.Tensor, col: torch.Tensor, in_features: int) -> None:
    """Full structural check (synchronises with the device)."""
    nnz = col.numel()
    if int(crow[0]) != 0:
        raise ValueError(f"crow_indices[0] must be 0, got {int(crow[0])}")
    if int(crow[-1]) != nnz:
        raise ValueError(f"crow_indices[-1] must equal nnz = len(col_indices) = {nnz}, got {int(crow[-1])}")
    if crow.numel() > 1 and bool((crow[1:] < crow[:-1]).any()):
        raise ValueError("crow_indices must be non-decreasing")
    if nnz:
        lo, hi = int(col.min()), int(col.max())
        if lo < 0 or hi >= in_features:
            raise ValueError(f"col_indices must lie in [0, {in_features}), found range [{lo}, {hi}]")


def _launch_config(n_tok: int, n_rows: int, nnz: int, variant: str, dev: torch.device, overrides: dict) -> dict:
    """:func:`select_config` for this device, with the caller's non-None ``overrides`` applied and checked."""
    n_sm = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else 8
    cfg = select_config(n_tok, n_rows, nnz, variant=variant, n_sm=n_sm)
    cfg.update({key: v for key, v in overrides.items() if v is not None})
    for key in ("block_n", "block_j", "block_t", "num_warps"):
        _check_power_of_two(key, cfg[key])
    return cfg


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_power_of_two(name: str, v: int) -> None:
    if not isinstance(v, int) or v < 1 or (v & (v - 1)) != 0:
        raise ValueError(f"{name} must be a positive power of two, got {v!r}")


def _launch(kernel, interpret: bool, cfg: dict, x2: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
            val: torch.Tensor, b: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """Run the kernel on x2 (T, K) with configuration ``cfg``; returns Y (T, N) in x2's dtype."""
    n_tok = x2.shape[0]
    xk, n_tok_x, stride_xk, stride_xt = _x_operand(x2, cfg["variant"] == "gather_xt", interpret)
    y = torch.empty((n_tok, n_rows), dtype=x2.dtype, device=x2.device)  # (T, N)
    grid = (triton.cdiv(n_rows, cfg["block_n"]), triton.cdiv(n_tok, cfg["block_t"]))  # (row tiles, token tiles)
    if grid[1] > 65535:
        raise ValueError(f"too many token blocks ({grid[1]}): raise block_t or split x")
    meta = dict(HAS_BIAS=b is not None, TOK_FAST=cfg["variant"] == "gather_xt", PIPELINE=bool(cfg["pipeline"]),
                BLOCK_N=cfg["block_n"], BLOCK_J=cfg["block_j"], BLOCK_T=cfg["block_t"])
    if not interpret:
        # enable_fp_fusion: acc += v * x as one FMA (explicit: triton 3.9 warns when it is left to a default)
        meta.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=True)
    args = (xk, crow, col, val, b if b is not None else val, y,
            n_rows, n_tok, n_tok_x, stride_xk, stride_xt, y.stride(0), y.stride(1))
    with torch.cuda.device(x2.device) if x2.device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **meta)
    return y


def _x_operand(x2: torch.Tensor, feature_major: bool, interpret: bool) -> tuple[torch.Tensor, int, int, int]:
    """X as the kernel gathers from it: (xk, n_tok_x, stride_xk, stride_xt), where X[t, k] is at
    ``k * stride_xk + t * stride_xt``; gather_xt (``feature_major``) reads X^T (K, T_pad)."""
    n_tok, in_features = x2.shape
    if not feature_major:
        return x2, n_tok, x2.stride(1), x2.stride(0)  # X (T, K) as it is
    if n_tok > 1 and x2.stride(0) == 1 and x2.stride(1) >= n_tok:
        xk = x2.t()  # (K, T): the caller's X is already feature-major: no copy
        return xk, n_tok, xk.stride(0), xk.stride(1)
    n_tok_x = -(-n_tok // 16) * 16  # T_pad, a multiple of 16: aligned rows let the gathers vectorise
    alloc = torch.zeros if interpret else torch.empty  # padding never reaches y; zeros keep numpy quiet
    xk = alloc((in_features, n_tok_x), dtype=x2.dtype, device=x2.device)  # (K, T_pad)
    xk[:, :n_tok].copy_(x2.t())
    return xk, n_tok_x, xk.stride(0), xk.stride(1)
