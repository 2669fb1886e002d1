"""Pruned Linears with int8 weights: the 1x4-block int8 format and the layer that runs it on our int8 kernel.

Quantisation (onnxruntime's dynamic quantisation scheme, `onnxruntime.quantization.quantize_dynamic`: int8
symmetric weights, activations quantised at run time by DynamicQuantizeLinear, asymmetric uint8 -- but per
output channel and per token rather than per tensor):

* weights, once at export: ``s_w[o] = max_k |w[o, k]| / 127`` over the kept weights of row o (1 for an empty
  row), ``w_q = round(w / s_w)`` in [-127, 127] (round half to even), pruned weights 0;
* activations, every call, per token t (ONNX DynamicQuantizeLinear applied to each row of x):
  ``lo = min(0, min x[t])``, ``hi = max(0, max x[t])``, ``s_x = (hi - lo) / 255``, ``zp = round(-lo / s_x)``,
  ``x_q = clamp(round(x / s_x) + zp, 0, 255)``;
* ``y[t, o] = act(s_x[t] s_w[o] sum_k (x_q[t, k] - zp[t]) w_q[o, k] + bias[o])``, the sum exact in int32.

Compute format (:class:`Int8BlockMatrix`): CSR over 1x4 blocks (4 consecutive inputs of one row): crow_indices
int32 (out + 1,) counting blocks, block_cols int16/int32 (nblocks,) = input // 4, values int8 (nblocks * 4,),
scales float32 (out,). An unstructured mask is stored as the blocks it touches (pruned weights inside a kept
block are zeros); a 1x4 block ticket (``find-ticket --block 1x4``) fills its blocks, so the kernel's work
falls with the sparsity. On disk (``to_tensors``), the smallest exact form: ``<name>.bitmask`` (uint8, packed
bits of the nonzero int8 weights, as :class:`vlsparse.sparse.csr.BitmaskMatrix`), ``<name>.qvalues`` (int8
nonzeros, row-major), ``<name>.scales`` (float32 (out,)), ``<name>.shape``: ~0.11x the dense fp32 bytes at 70%.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlsparse.sparse.csr import CSRMatrix, _key, _pack_bits, _shape_from, _unpack_bits, index_dtype_for
from vlsparse.sparse.kernels import cpu as cpu_kernel
from vlsparse.sparse.kernels import cpu_int8

__all__ = ["Int8BlockMatrix", "Int8SparseLinear", "quantize_weight", "is_int8", "GELU_LIPSCHITZ"]

BLOCK = 4
#: max |d/dx GELU(x)| (at x ~ 1.5): the quantisation error bound times this holds after the GELU epilogue
GELU_LIPSCHITZ = 1.13


def quantize_weight(weight: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (w_q int8 (out, in), scales float32 (out,)), w ~ scales[:, None] * w_q.

    weight: (out, in) float; mask: bool (out, in), True = kept (None keeps every weight). Pruned weights are 0.
    """
    w = weight.detach().float().cpu()
    if mask is not None:
        w = w * mask.to(device=w.device, dtype=torch.bool)
    amax = w.abs().amax(1) if w.shape[1] else torch.zeros(w.shape[0])
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).float()
    wq = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return wq, scales


def is_int8(tensors: dict, prefix: str) -> bool:
    """Whether the tensor dict holds an int8 weight under ``prefix`` (what :meth:`Int8BlockMatrix.to_tensors` wrote)."""
    return _key(prefix, "qvalues") in tensors


@dataclass
class Int8BlockMatrix:
    crow_indices: torch.Tensor  # int32 (out + 1,), over blocks
    block_cols: torch.Tensor    # int16/int32 (nblocks,), input // 4, increasing within a row
    values: torch.Tensor        # int8 (nblocks * 4,)
    scales: torch.Tensor        # float32 (out,)
    shape: tuple[int, int]

    @classmethod
    def from_int8(cls, wq: torch.Tensor, scales: torch.Tensor) -> "Int8BlockMatrix":
        """From the dense int8 weight (out, in) and its scales (out,): the 1x4 blocks with a nonzero weight."""
        out_f, in_f = wq.shape
        kb = (in_f + BLOCK - 1) // BLOCK
        padded = torch.zeros(out_f, kb * BLOCK, dtype=torch.int8)
        padded[:, :in_f] = wq
        blocks = padded.view(out_f, kb, BLOCK)
        rows, cols = (blocks != 0).any(-1).nonzero(as_tuple=True)
        crow = torch.zeros(out_f + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_f), 0)
        return cls(crow.to(torch.int32), cols.to(index_dtype_for(kb)).contiguous(),
                   blocks[rows, cols].reshape(-1).contiguous(), scales.float().contiguous(),
                   (int(out_f), int(in_f))).validate()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> "Int8BlockMatrix":
        """Quantise (:func:`quantize_weight`) the masked weight (out, in) and keep its nonzero 1x4 blocks."""
        return cls.from_int8(*quantize_weight(weight, mask))

    @property
    def nblocks(self) -> int:
        return int(self.block_cols.numel())

    def int8_dense(self) -> torch.Tensor:
        """The int8 weight (out, in), zeros outside the stored blocks."""
        out_f, in_f = self.shape
        kb = (in_f + BLOCK - 1) // BLOCK
        dense = torch.zeros(out_f, kb, BLOCK, dtype=torch.int8)
        counts = self.crow_indices[1:].long() - self.crow_indices[:-1].long()
        rows = torch.repeat_interleave(torch.arange(out_f), counts)
        dense[rows, self.block_cols.long()] = self.values.view(-1, BLOCK)
        return dense.view(out_f, kb * BLOCK)[:, :in_f]

    def to_dense(self) -> torch.Tensor:
        """The dequantised weight (out, in) float32: scales[:, None] * w_q."""
        return self.int8_dense().float() * self.scales[:, None]

    def row_sums(self) -> torch.Tensor:
        """int32 (out,): sum of each row's int8 weights (the kernel's zero-point correction)."""
        return self.int8_dense().sum(1, dtype=torch.int32)

    def validate(self) -> "Int8BlockMatrix":
        """Raise ValueError naming the first thing that is wrong; return self when valid."""
        out_f, in_f = self.shape
        kb = (in_f + BLOCK - 1) // BLOCK
        v = self.values
        if not isinstance(v, torch.Tensor) or v.dtype != torch.int8 or v.dim() != 1:
            raise ValueError(f"values must be 1-D int8, got {getattr(v, 'dtype', type(v).__name__)}")
        if v.numel() != BLOCK * self.block_cols.numel():
            raise ValueError(f"values has {v.numel()} entries, expected 4 per block ({self.block_cols.numel()} blocks)")
        # the block structure is a CSR matrix (out, in / 4) with one 4-byte value per block
        CSRMatrix(self.crow_indices, self.block_cols, v.view(torch.float32), (out_f, kb)).validate()
        _check_int8(v, self.scales, out_f)
        return self

    # ------------------------------------------------------------------ storage
    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat dict for safetensors: <prefix>.bitmask, .qvalues, .scales, .shape (module docstring)."""
        wq = self.int8_dense()
        kept = wq != 0
        return {_key(prefix, "bitmask"): _pack_bits(kept), _key(prefix, "qvalues"): wq[kept].contiguous(),
                _key(prefix, "scales"): self.scales.contiguous(),
                _key(prefix, "shape"): torch.tensor(self.shape, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str = "", shape=None) -> "Int8BlockMatrix":
        """Read back what :meth:`to_tensors` wrote (shape from the argument or <prefix>.shape); validated.

        Raises ValueError naming the tensor: missing, wrong dtype or length, -128 weights, bad scales."""
        out_f, in_f = _shape_from(tensors, prefix, shape)
        try:
            bits, q, scales = (tensors[_key(prefix, n)] for n in ("bitmask", "qvalues", "scales"))
        except KeyError as e:
            raise ValueError(f"missing int8 tensor {e.args[0]!r}") from None
        n = out_f * in_f
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (n + 7) // 8:
            raise ValueError(f"bitmask must be uint8 ({(n + 7) // 8},), got {bits.dtype} {tuple(bits.shape)}")
        kept = _unpack_bits(bits, n).view(out_f, in_f)
        if q.dtype != torch.int8 or q.dim() != 1 or q.numel() != int(kept.sum()):
            raise ValueError(f"qvalues must be int8 with one entry per set bit ({int(kept.sum())}), "
                             f"got {q.dtype} {tuple(q.shape)}")
        _check_int8(q, scales, out_f)
        wq = torch.zeros(out_f, in_f, dtype=torch.int8)
        wq[kept] = q
        return cls.from_int8(wq, scales)


def _check_int8(values: torch.Tensor, scales: torch.Tensor, out_f: int) -> None:
    if bool((values == -128).any()):
        raise ValueError("values hold -128: symmetric int8 weights are in [-127, 127]")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (out_f,):
        raise ValueError(f"scales must be float32 ({out_f},), got {getattr(scales, 'dtype', None)} "
                         f"{tuple(getattr(scales, 'shape', ()))}")
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise ValueError("scales must be finite and > 0")


class Int8SparseLinear(nn.Module):
    """y = act(x W^T + b) with W pruned and int8 (:class:`Int8BlockMatrix`), activations int8 per token.

    Input (..., in) float (computed in float32), output (..., out) float32 (the input's dtype). ``backend``:
    "cpu" (our int8 kernel, :mod:`vlsparse.sparse.kernels.cpu_int8`), "dense" (F.linear with the dequantised
    weight, activations not quantised: the fallback without a C++ compiler), "auto" (cpu when it builds).

    Error bound against the masked fp32 layer y = x (W * M)^T + b (the module docstring's quantisation), for
    every token t and output o (tested; fp32 rounding aside):
        |y_int8 - y| <= 1/2 s_x[t] sum_k |s_w[o] w_q[o, k]| + 1/2 s_w[o] sum_{k kept} |x[t, k]|
    (rounding x to s_x/2, at most, times the quantised weights, plus rounding w to s_w/2 times |x|), times
    :data:`GELU_LIPSCHITZ` with ``activation="gelu"``.
    """

    def __init__(self, matrix: Int8BlockMatrix, bias: torch.Tensor | None = None, backend: str = "auto",
                 activation: str = "none"):
        super().__init__()
        if activation not in cpu_kernel.ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(cpu_kernel.ACTIVATIONS)}, got {activation!r}")
        if backend not in ("auto", "cpu", "dense"):
            raise ValueError(f"Int8SparseLinear backend must be auto, cpu or dense, got {backend!r}")
        matrix.validate()
        self.out_features, self.in_features = matrix.shape
        self.activation, self.backend = activation, backend
        self.isa: str | None = None  # None: the best vector path the CPU has (cpu_int8.ISAS names)
        for name in ("crow_indices", "block_cols", "values", "scales"):
            self.register_buffer(name, getattr(matrix, name).contiguous())
        self.register_buffer("row_sums", matrix.row_sums(), persistent=False)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None, backend: str = "auto") -> "Int8SparseLinear":
        """From an nn.Linear and its mask (bool (out, in), True = kept; None keeps every weight)."""
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        return cls(Int8BlockMatrix.from_dense(linear.weight, mask), bias, backend)

    def matrix(self) -> Int8BlockMatrix:
        return Int8BlockMatrix(self.crow_indices, self.block_cols, self.values, self.scales,
                               (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.block_cols.numel()}, "
                f"bias={self.bias is not None}, backend={self.backend!r}, activation={self.activation!r}")

    def _resolve(self) -> str:
        if self.backend != "auto":
            return self.backend
        try:
            cpu_int8.load_extension()
            return "cpu"
        except RuntimeError:  # no compiler or a failed build: the weight-only dense path
            return "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8SparseLinear expects (..., {self.in_features}) inputs, got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features).float()  # (T, in)
        if self._resolve() == "cpu":
            y = cpu_int8.spmm_int8(x2, self.crow_indices, self.block_cols, self.values, self.scales, self.row_sums,
                                   self.bias, out_features=self.out_features, activation=self.activation,
                                   isa=self.isa)  # (T, out)
        else:
            y = F.linear(x2, self.matrix().to_dense(), self.bias)
            y = F.gelu(y) if self.activation == "gelu" else y
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
