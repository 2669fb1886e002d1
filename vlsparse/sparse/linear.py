"""SparseLinear: an nn.Linear whose pruned weight is stored and multiplied in CSR.

    layer = SparseLinear.from_dense(linear, mask)          # mask: bool (out, in), True = kept
    y = layer(x)                                           # == F.linear(x, weight * mask, bias)

Backends (`backend=`):
    "auto"          "cpu" for CPU inputs, "triton" for CUDA inputs (chosen per call; falls back to
                    "dense" without a C++ compiler, to "torch-sparse" on CUDA without triton)
    "cpu"           our C++ kernel (vlsparse.sparse.kernels.cpu), compiled on first use
    "triton"        vlsparse.sparse.kernels.triton_spmm.spmm_triton (CUDA; on CPU only under TRITON_INTERPRET=1)
    "dense"         masked F.linear (the reference; densifies the weight once and caches it)
    "torch-sparse"  torch.sparse_csr_tensor @ x (MKL sparse on CPU)
    "torch_sparse"  torch_sparse.SparseTensor (the PyG package; only when installed)

Chaining (CPU kernel): ``activation="gelu"`` applies GELU (erf form) in the kernel's epilogue;
``out_layout="feature"`` returns the (T, out) output as a transposed view of a feature-major (out, T)
buffer, which the next SparseLinear reads in place (no transposes between the two); ``input_share``
(an :class:`InputShare` given to the Q, K and V Linears of an attention) transposes their common
input once. Results are the same tensors in value whatever the layout (any consumer works).

The CSR arrays are buffers (crow_indices, col_indices, values, bias), so .to(), state_dict and
load_state_dict work; loading a state dict with another nonzero count resizes the buffers.
The custom kernels ("cpu", "triton", "torch_sparse") have no backward: with autograd on and an
input that requires grad, forward falls back to the differentiable "dense" path.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from vlsparse.sparse.csr import CSRMatrix
from vlsparse.sparse.kernels import cpu as cpu_kernel
from vlsparse.sparse.kernels import triton_spmm  # imports without triton (the gpu extra); see its docstring

__all__ = ["SparseLinear", "BACKENDS", "InputShare", "sparsify_linears"]

BACKENDS = ("auto", "cpu", "triton", "dense", "torch-sparse", "torch_sparse")
_NO_BACKWARD = ("cpu", "triton", "torch_sparse")
_cpu_ext = None  # the compiled CPU kernel module, loaded on first use
_CUDA_BACKENDS = ("triton",)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _load_cpu_ext():
    global _cpu_ext
    _cpu_ext = cpu_kernel.load_extension()
    return _cpu_ext


_auto_cache: dict = {}


def _auto_backend(x: torch.Tensor) -> str:
    """'auto': our C++ kernel on the CPU, Triton on CUDA; when one cannot be had (no C++ compiler,
    triton not installed) the masked dense path / torch's CUDA sparse path, with one warning."""
    if x.is_cuda:
        if "cuda" not in _auto_cache:
            ok = importlib.util.find_spec("triton") is not None
            if not ok:
                warnings.warn("SparseLinear(backend='auto'): triton is not installed, using 'torch-sparse' on CUDA",
                              RuntimeWarning, stacklevel=3)
            _auto_cache["cuda"] = "triton" if ok else "torch-sparse"
        return _auto_cache["cuda"]
    if _cpu_ext is not None:
        return "cpu"
    if "cpu" not in _auto_cache:
        try:
            _load_cpu_ext()
            _auto_cache["cpu"] = "cpu"
        except RuntimeError as e:  # CompilerNotFoundError or a failed build
            warnings.warn(f"SparseLinear(backend='auto'): the CPU kernel is unavailable ({e}); using the "
                          "masked dense path", RuntimeWarning, stacklevel=3)
            _auto_cache["cpu"] = "dense"
    return _auto_cache["cpu"]


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown SparseLinear backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in _CUDA_BACKENDS and not torch.cuda.is_available() and not _triton_interpret():
        raise ValueError(f"backend {backend!r} needs a CUDA GPU and none is available "
                         "(use backend='cpu', or set TRITON_INTERPRET=1 to run the Triton kernel "
                         "in the interpreter for testing)")
    if backend == "torch_sparse":
        try:
            import torch_sparse  # noqa: F401  # PyG, optional (in no extra): only this backend needs it
        except ImportError as e:
            raise ImportError("backend 'torch_sparse' needs the torch_sparse package (PyG), which is not "
                              f"installed ({e}); use backend='cpu' or 'torch-sparse' (MKL) instead") from e
    return backend


class SparseLinear(nn.Module):
    """y = x W^T + b with W (out_features, in_features) in CSR. Inference-oriented."""

    def __init__(self, in_features: int, out_features: int, crow_indices: torch.Tensor,
                 col_indices: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str = "auto", activation: str = "none"):
        super().__init__()
        if activation not in cpu_kernel.ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(cpu_kernel.ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.out_layout = "row"  # "feature": (T, out) results are views of feature-major buffers (CPU kernel)
        self.input_share: InputShare | None = None
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        CSRMatrix(crow_indices, col_indices, values, (self.out_features, self.in_features)).validate()
        self.register_buffer("crow_indices", crow_indices.contiguous())
        self.register_buffer("col_indices", col_indices.contiguous())
        self.register_buffer("values", values.contiguous())
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.register_buffer("bias", bias.detach().clone().contiguous())
        else:
            self.bias = None
        self.backend = _check_backend(backend)
        self._cache: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None, backend: str = "auto",
                   index_dtype: torch.dtype | None = None) -> "SparseLinear":
        """From an nn.Linear and its mask (bool (out, in), True = kept; None keeps the nonzeros).
        index_dtype: None = int16 when in_features <= 32767, else int32."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        csr = CSRMatrix.from_dense(linear.weight.detach().float(), mask, torch.float32, index_dtype)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        layer = cls.from_csr(csr, bias, backend)
        return layer.to(linear.weight.device)

    @classmethod
    def from_csr(cls, csr: CSRMatrix, bias: torch.Tensor | None = None, backend: str = "auto") -> "SparseLinear":
        csr.validate()
        return cls(csr.shape[1], csr.shape[0], csr.crow_indices, csr.col_indices,
                   csr.values.float(), None if bias is None else bias.float(), backend)

    def to_csr(self) -> CSRMatrix:
        return CSRMatrix(self.crow_indices, self.col_indices, self.values, (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        """The masked dense weight (out, in)."""
        return self.to_csr().to_dense(self.values.dtype if self.values.is_floating_point() else torch.float32)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        n = self.in_features * self.out_features
        return 1.0 - self.nnz / n if n else 0.0

    def set_backend(self, backend: str) -> "SparseLinear":
        self.backend = _check_backend(backend)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.3f}, bias={self.bias is not None}, backend={self.backend!r}"
                + (f", activation={self.activation!r}" if self.activation != "none" else "")
                + (f", out_layout={self.out_layout!r}" if self.out_layout != "row" else ""))

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint of another sparsity has another nnz: resize the buffers before the copy.
        for name in ("crow_indices", "col_indices", "values", "bias"):
            key = prefix + name
            cur = self._buffers.get(name)
            if key in state_dict and cur is not None:
                inc = state_dict[key]
                if inc.shape != cur.shape or inc.dtype != cur.dtype:
                    self._buffers[name] = torch.empty(inc.shape, dtype=inc.dtype, device=cur.device)
        self._cache.clear()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _cached(self, name: str, build):
        """Derived tensors (dense weight, int32 columns, ...) rebuilt when the buffers change."""
        key = (self.crow_indices.data_ptr(), self.col_indices.data_ptr(), self.values.data_ptr(),
               _version(self.values), _version(self.col_indices), _version(self.crow_indices),
               self.values.device, self.values.dtype)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        val = build()
        self._cache[name] = (key, val)
        return val

    # ------------------------------------------------------------------ forward
    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend forward uses for this input (before the autograd fallback to 'dense')."""
        if self.backend != "auto":
            return self.backend
        return _auto_backend(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_f = self.in_features
        if x.shape[-1] != in_f:
            raise ValueError(f"SparseLinear expects (..., {in_f}) inputs, got {tuple(x.shape)}")
        backend = self.backend
        if backend == "auto":
            backend = _auto_backend(x)
        if backend in _NO_BACKWARD and x.requires_grad and torch.is_grad_enabled():
            backend = "dense"  # custom kernels have no backward
        x2 = x.reshape(-1, in_f)  # (T, in): the leading axes are tokens
        if backend == "cpu":
            y2 = self._forward_cpu(x2, x)
        elif backend == "dense":
            y2 = self._forward_dense(x2)
        elif backend == "triton":
            y2 = self._forward_triton(x2)
        elif backend == "torch-sparse":
            y2 = self._forward_torch_sparse(x2)
        elif backend == "torch_sparse":
            y2 = self._forward_pyg(x2)
        else:  # pragma: no cover - _check_backend guards
            raise ValueError(f"unknown backend {backend!r}")
        if self.activation == "gelu" and backend != "cpu":  # the CPU kernel applies it in its epilogue
            y2 = F.gelu(y2)
        if x.dim() == 2:
            return y2  # (T, out)
        return y2.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def _bias_f32(self):
        if self.bias is None:
            return None
        return self.bias if self.bias.dtype == torch.float32 else self.bias.float()

    def _values_f32(self) -> torch.Tensor:
        if self.values.dtype == torch.float32:
            return self.values
        return self._cached("values_f32", lambda: self.values.float().contiguous())

    def _forward_dense(self, x2: torch.Tensor) -> torch.Tensor:
        w = self._cached("dense", lambda: self.to_csr().to_dense(self.values.dtype))  # (out, in)
        bias = self.bias
        if w.dtype != x2.dtype:
            w = w.to(x2.dtype)
        if bias is not None and bias.dtype != x2.dtype:
            bias = bias.to(x2.dtype)
        return F.linear(x2, w, bias)  # (T, out)

    def _forward_cpu(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(T, in) -> (T, out) on our kernel: row-major in and out, or feature-major where x2 is the
        transposed view of an (in, T) buffer (the output of an ``out_layout="feature"`` layer), where
        ``input_share`` has (or makes) x's transpose, or where this layer's output is feature-major."""
        if x2.is_cuda or self.values.is_cuda:
            raise ValueError("SparseLinear backend 'cpu' needs CPU tensors (input on "
                             f"{x2.device}, weights on {self.values.device}); use backend='triton' on CUDA")
        ext = _cpu_ext or _load_cpu_ext()
        xf = x2 if x2.dtype == torch.float32 else x2.float()
        bias = self.bias
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        act = cpu_kernel.ACTIVATIONS[self.activation]
        args = (self.crow_indices, self.col_indices, self._values_f32(), bias, self.out_features, act)
        xt = xf.t() if xf.shape[0] > 1 and xf.stride(0) == 1 else None  # (in, T), unit stride along T
        if xt is None and self.input_share is not None and x.dtype == torch.float32:
            xt = self.input_share.transposed(x, xf)
        if xt is None and self.out_layout == "feature" and xf.shape[0] > 2:
            xt = padded_transpose(xf)
        if xt is None:
            y = ext.spmm(xf.contiguous(), *args)  # (T, out)
        elif self.out_layout == "feature":
            y = ext.spmm_fm(xt, *args, 0, _round_up(xf.shape[0])).t()  # (T, out) view of (out, T)
        else:
            y = ext.spmm_fm(xt, *args, 1, 0)  # (T, out)
        return y if y.dtype == x2.dtype else y.to(x2.dtype)

    def _forward_triton(self, x2: torch.Tensor) -> torch.Tensor:
        if not x2.is_cuda and not _triton_interpret():
            raise ValueError(f"SparseLinear backend 'triton' needs CUDA tensors, got input on {x2.device}")
        vals = self._values_f32()  # (nnz,) fp32
        y = triton_spmm.spmm_triton(x2.float().contiguous(), self.crow_indices, self.col_indices, vals,
                                    self._bias_f32(), self.out_features)  # (T, out)
        return y if y.dtype == x2.dtype else y.to(x2.dtype)

    def _forward_torch_sparse(self, x2: torch.Tensor) -> torch.Tensor:
        def build():
            return torch.sparse_csr_tensor(self.crow_indices, self.col_indices.to(torch.int32),
                                           self.values.to(x2.dtype), size=(self.out_features, self.in_features))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
            w = self._cached(f"torch_csr_{x2.dtype}", build)  # (out, in) sparse
            y = (w @ x2.t()).t()  # (out, in) @ (in, T) -> (T, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _forward_pyg(self, x2: torch.Tensor) -> torch.Tensor:
        from torch_sparse import SparseTensor  # PyG, optional (in no extra)

        def build():
            return SparseTensor(rowptr=self.crow_indices.long(), col=self.col_indices.long(),
                                value=self.values.to(x2.dtype), sparse_sizes=(self.out_features, self.in_features))

        w = self._cached(f"pyg_{x2.dtype}", build)  # (out, in) sparse
        y = (w @ x2.t()).t()  # (T, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


def _round_up(tokens: int, multiple: int = 16) -> int:
    return (tokens + multiple - 1) // multiple * multiple


def padded_transpose(x2: torch.Tensor) -> torch.Tensor:
    """(in, T) float32 view of x2 (T, in) transposed, in a buffer whose rows are T rounded up to 16 floats
    (zero beyond T) so that the kernel reads it in place."""
    tokens, in_f = x2.shape
    buf = torch.empty(in_f, _round_up(tokens), dtype=x2.dtype)
    buf[:, :tokens].copy_(x2.t())
    buf[:, tokens:].zero_()
    return buf[:, :tokens]


class InputShare:
    """The transpose of one input, shared by the SparseLinears it is given to (Q, K, V of an attention).

    :meth:`transposed` returns the (in, T) padded transpose of ``x`` (:func:`padded_transpose`), made
    the first time it sees that very tensor object and reused while it is the same object (the share
    holds x, so another tensor cannot take its place; x must not be modified in place in between).
    :meth:`clear` drops both (call it after each forward of the model).
    """

    def __init__(self):
        self._x: torch.Tensor | None = None
        self._xt: torch.Tensor | None = None

    def transposed(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        """(in, T) transpose of x (..., in), whose (T, in) view is x2; None for 1-2 tokens (no gain)."""
        if x2.shape[0] <= 2:
            return None
        if self._x is not x or self._xt is None or self._xt.shape[1] != x2.shape[0]:
            self._x, self._xt = x, padded_transpose(x2)
        return self._xt

    def clear(self, *_args) -> None:
        self._x = self._xt = None


def sparsify_linears(module: nn.Module, masks: dict[str, torch.Tensor] | None = None, backend: str = "auto",
                     names=None) -> nn.Module:
    """Replace nn.Linear submodules in place by SparseLinear.

    masks: {"<module path>.weight" or "<module path>": bool mask}; a Linear with no mask entry is
    kept dense unless `names` lists it (then its nonzeros are kept). names: iterable of module paths
    to convert (default: the ones with a mask)."""
    masks = dict(masks or {})
    wanted = set(names) if names is not None else None
    for path, sub in list(module.named_modules()):
        if not isinstance(sub, nn.Linear):
            continue
        mask = masks.get(f"{path}.weight", masks.get(path))
        if wanted is not None and path not in wanted:
            continue
        if wanted is None and mask is None:
            continue
        new = SparseLinear.from_dense(sub, mask, backend=backend)
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, child, new)
    return module
