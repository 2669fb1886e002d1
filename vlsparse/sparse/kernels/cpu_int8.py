"""Our int8 sparse CPU kernel (csrc/spmm_int8.h), compiled on first use like the fp32 kernel.

Built, cached and verified by :func:`vlsparse.sparse.kernels.cpu.build_module` (same cache, same sha256 check)
as a separate extension, so the fp32 kernel's build does not change with it. The vector path is chosen at run
time from the CPU's features (``isas()``, best first: "avx512vnni", "avx2", "scalar"); ``isa=`` forces one
(the tests run every path the CPU has).

Public API:
    spmm_int8(x, crow_indices, block_cols, values, scales, row_sums, bias=None, *, out_features,
              activation="none", isa=None, raw=False) -> (T, out) float32 (raw: the int32 accumulations)
    quantize(x) -> (xq uint8 (T, in), scale float32 (T,), zero_point int32 (T,))
    isas() -> list[str]
"""

from __future__ import annotations

import threading
from types import ModuleType

import torch

from vlsparse.sparse.kernels import cpu

__all__ = ["ISAS", "spmm_int8", "quantize", "isas", "load_extension"]

SOURCES = ("spmm_int8_torch.cpp",)
HEADERS = ("spmm_int8.h", "spmm.h", "spmm_gather.h", "spmm_xreg.h")
#: vector path name -> the kernel's code
ISAS = {"scalar": 0, "avx2": 1, "avx512vnni": 2}
_lock = threading.Lock()
_module: ModuleType | None = None


def load_extension(verbose: bool = False) -> ModuleType:
    """Build (first call) or load the cached int8 extension (sha256-verified, as :func:`cpu.load_extension`).

    Raises:
        CompilerNotFoundError: no C++ compiler; RuntimeError: the build failed; KernelCacheError: unsafe cache.
    """
    global _module
    if _module is None:
        with _lock:
            if _module is None:
                _module = cpu.build_module("spmm_int8", SOURCES, HEADERS, verbose)
    return _module


def isas() -> list[str]:
    """The vector paths this CPU can run, best first (the kernel uses the first unless told otherwise)."""
    return list(load_extension().isas())


def quantize(x: torch.Tensor, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's per-token activation quantisation of x (T, in) float32: xq uint8 (T, in), scale float32 (T,),
    zero point int32 (T,), with x ~ scale[t] * (xq - zp[t]) (ONNX DynamicQuantizeLinear's formula per row).
    isa: as :func:`spmm_int8` (the AVX-512 quantiser runs with "avx512vnni", plain C++ otherwise)."""
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"quantize: x must be 2-D float32, got {x.dtype} {tuple(x.shape)}")
    xq, sx, zp = load_extension().quantize(x.contiguous(), _isa(isa))
    return xq, sx, zp


def spmm_int8(x: torch.Tensor, crow_indices: torch.Tensor, block_cols: torch.Tensor, values: torch.Tensor,
              scales: torch.Tensor, row_sums: torch.Tensor, bias: torch.Tensor | None = None, *,
              out_features: int, activation: str = "none", isa: str | None = None, raw: bool = False) -> torch.Tensor:
    """Y (T, out) float32 = act(dequant(quant(x) @ Wq^T) + bias), W in 1x4-block CSR with int8 values.

    x: (T, in) float32; crow_indices int32 (out + 1,) over blocks; block_cols int16/int32 (nblocks,) = input // 4;
    values int8 (nblocks * 4,); scales float32 (out,); row_sums int32 (out,) = sum of each row's values.
    raw: return the exact int32 accumulations sum_k (xq - zp) * wq (T, out) instead (for tests).
    isa: None = the best this CPU has, else a name of :data:`ISAS` this CPU supports.
    Raises ValueError for another rank or dtype, an unknown activation or isa.
    """
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"spmm_int8: x must be 2-D float32 (tokens, in_features), got {x.dtype} {tuple(x.shape)}")
    act = cpu._act(activation)
    return load_extension().spmm_int8(x.contiguous(), crow_indices, block_cols, values, scales, row_sums, bias,
                                      int(out_features), act, _isa(isa), bool(raw))


def _isa(isa: str | None) -> int:
    if isa is not None and isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    return -1 if isa is None else ISAS[isa]
