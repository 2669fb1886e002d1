"""Sparse weight storage: CSR (the compute format) and bitmask + values (a storage format).

CSRMatrix: the pruned weight W (out_features x in_features) compressed by output row:
    crow_indices  int32 (out+1,)   row r's nonzeros are [crow[r], crow[r+1])
    col_indices   int16 (nnz,) when in_features <= 32767, else int32; strictly increasing per row
    values        float32 (default), float16 or bfloat16 (nnz,)
The kernels (vlsparse.sparse.kernels.cpu, the Triton kernel, the ORT custom op) compute with fp32 values.

BitmaskMatrix: the same weight as a packed bit mask of the kept positions (row-major over the
flattened (out, in) matrix, little-endian within each byte: bit j of byte b is element 8*b + j)
plus the kept values in row-major order. At 70% sparsity it is ~0.33x the dense fp32 size
(1/32 for the bits + 0.30 for the values), CSR with int16 columns ~0.45x (+4 bytes per row).
It exists only on disk: `to_csr()` turns it into a CSRMatrix at load time.

`encode_sparse` picks whichever layout is smaller; `decode_sparse` reads either back as CSR.
Tensor names in a state dict / safetensors file (prefix "layer.q" -> "layer.q.crow_indices"):
    CSR:      <prefix>.crow_indices, <prefix>.col_indices, <prefix>.values, <prefix>.shape
    bitmask:  <prefix>.bitmask, <prefix>.values, <prefix>.shape
(<prefix>.shape is int64 (2,) = (out_features, in_features).)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "CSRMatrix",
    "BitmaskMatrix",
    "encode_sparse",
    "decode_sparse",
    "index_dtype_for",
    "INT16_MAX_COLUMNS",
]

INT16_MAX_COLUMNS = 32767
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int16, torch.int32)


def index_dtype_for(in_features: int) -> torch.dtype:
    """int16 column indices when every column index fits (in_features <= 32767), else int32."""
    return torch.int16 if in_features <= INT16_MAX_COLUMNS else torch.int32


def _key(prefix: str, name: str) -> str:
    if not prefix:
        return name
    return f"{prefix}{name}" if prefix.endswith(".") else f"{prefix}.{name}"


def _kept_mask(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if mask is None:
        return weight != 0
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    return mask.to(device=weight.device, dtype=torch.bool)


def _check_value_dtype(dtype: torch.dtype) -> None:
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"values dtype must be one of float32, float16, bfloat16, got {dtype}")


def _shape_from(tensors: dict, prefix: str, shape) -> tuple[int, int]:
    if shape is None:
        key = _key(prefix, "shape")
        if key not in tensors:
            raise ValueError(f"no shape given and no {key!r} tensor to read it from")
        shape = tensors[key].tolist()
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError, OverflowError):  # a stored shape of another rank, or not numbers
        raise ValueError(f"shape must be (out_features, in_features), got {shape!r:.60}") from None
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"shape must be (out_features, in_features), got {shape}")
    return shape


class _StoredArrays:
    """What both layouts share: their arrays (``_ARRAYS``, in field order, then ``shape``) as a flat
    tensor dict, read back validated, and the counts derived from them."""

    _ARRAYS: tuple[str, ...] = ()
    _LAYOUT = ""  # names the layout in error messages

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str = "", shape=None):
        """Read back what to_tensors wrote (shape from the argument or <prefix>.shape); validated."""
        shape = _shape_from(tensors, prefix, shape)
        try:
            arrays = [tensors[_key(prefix, name)] for name in cls._ARRAYS]
        except KeyError as e:
            raise ValueError(f"missing {cls._LAYOUT} tensor {e.args[0]!r}") from None
        return cls(*arrays, shape).validate()

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat dict for safetensors: <prefix>.<array> for each array, and <prefix>.shape."""
        out = {_key(prefix, name): getattr(self, name).contiguous() for name in self._ARRAYS}
        out[_key(prefix, "shape")] = torch.tensor(self.shape, dtype=torch.int64)
        return out

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (what a file stores, without headers)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self._ARRAYS)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same matrix dense in fp32."""
        return self.shape[0] * self.shape[1] * 4


@dataclass
class CSRMatrix(_StoredArrays):
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    _ARRAYS = ("crow_indices", "col_indices", "values")
    _LAYOUT = "CSR"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32, index_dtype: torch.dtype | None = None) -> "CSRMatrix":
        """CSR of `weight` (out, in). With `mask` (bool, True = kept) every kept position is
        stored, even where the weight is exactly zero; without it, the nonzeros.
        index_dtype: None picks int16 when in_features <= 32767, else int32."""
        _check_value_dtype(dtype)
        weight = weight.detach()
        kept = _kept_mask(weight, mask)
        out_f, in_f = weight.shape
        if index_dtype is None:
            index_dtype = index_dtype_for(in_f)
        if index_dtype not in INDEX_DTYPES:
            raise ValueError(f"index_dtype must be int16 or int32, got {index_dtype}")
        if index_dtype == torch.int16 and in_f > INT16_MAX_COLUMNS:
            raise ValueError(f"int16 column indices cannot address in_features={in_f} > {INT16_MAX_COLUMNS}")
        rows, cols = kept.nonzero(as_tuple=True)  # row-major order: rows sorted, columns increasing
        if rows.numel() >= 2**31:
            raise ValueError(f"{rows.numel()} nonzeros do not fit int32 crow_indices")
        counts = torch.bincount(rows, minlength=out_f)
        crow = torch.zeros(out_f + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.cumsum(counts, 0)
        return cls(
            crow_indices=crow.to(torch.int32).cpu().contiguous(),
            col_indices=cols.to(index_dtype).cpu().contiguous(),
            values=weight[rows, cols].to(dtype).cpu().contiguous(),
            shape=(int(out_f), int(in_f)),
        )

    # ------------------------------------------------------------------ properties
    @property
    def density(self) -> float:
        n = self.shape[0] * self.shape[1]
        return self.nnz / n if n else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    # ------------------------------------------------------------------ conversion
    def row_indices(self) -> torch.Tensor:
        """int64 (nnz,) output row of every nonzero."""
        counts = (self.crow_indices[1:].long() - self.crow_indices[:-1].long())
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.float32
        dense = torch.zeros(self.shape, dtype=dtype, device=self.values.device)
        dense[self.row_indices().to(self.values.device), self.col_indices.long()] = self.values.to(dtype)
        return dense

    def mask(self) -> torch.Tensor:
        """bool (out, in): True where a value is stored."""
        m = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        m[self.row_indices().to(m.device), self.col_indices.long()] = True
        return m

    def to(self, *, values_dtype: torch.dtype | None = None, index_dtype: torch.dtype | None = None,
           device=None) -> "CSRMatrix":
        vals = self.values if values_dtype is None else self.values.to(values_dtype)
        cols = self.col_indices if index_dtype is None else self.col_indices.to(index_dtype)
        m = CSRMatrix(self.crow_indices, cols, vals, self.shape)
        if device is not None:
            m = CSRMatrix(m.crow_indices.to(device), m.col_indices.to(device), m.values.to(device), m.shape)
        return m

    def to_torch_sparse(self) -> torch.Tensor:
        """torch.sparse_csr_tensor view (int32 indices, values as stored)."""
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices.to(torch.int32), self.values,
                                       size=self.shape)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "CSRMatrix":
        """Raise ValueError naming the first thing that is wrong; return self when valid."""
        crow, col, val = self.crow_indices, self.col_indices, self.values
        if not (isinstance(self.shape, tuple) and len(self.shape) == 2 and all(
                isinstance(s, int) and s >= 0 for s in self.shape)):
            raise ValueError(f"shape must be a tuple (out_features, in_features) of ints >= 0, got {self.shape!r}")
        out_f, in_f = self.shape
        for name, t in (("crow_indices", crow), ("col_indices", col), ("values", val)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 1:
                raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if crow.dtype != torch.int32:
            raise ValueError(f"crow_indices must be int32, got {crow.dtype}")
        if col.dtype not in INDEX_DTYPES:
            raise ValueError(f"col_indices must be int16 or int32, got {col.dtype}")
        if val.dtype not in VALUE_DTYPES:
            raise ValueError(f"values must be float32, float16 or bfloat16, got {val.dtype}")
        if col.dtype == torch.int16 and in_f > INT16_MAX_COLUMNS:
            raise ValueError(f"int16 col_indices cannot address in_features={in_f} > {INT16_MAX_COLUMNS}")
        if crow.numel() != out_f + 1:
            raise ValueError(f"crow_indices has {crow.numel()} entries, expected out_features + 1 = {out_f + 1}")
        if col.numel() != val.numel():
            raise ValueError(f"col_indices ({col.numel()}) and values ({val.numel()}) differ in length")
        c = crow.long()
        if int(c[0]) != 0:
            raise ValueError(f"crow_indices[0] must be 0, got {int(c[0])}")
        if int(c[-1]) != col.numel():
            raise ValueError(f"crow_indices[-1] = {int(c[-1])} but there are {col.numel()} nonzeros")
        d = c[1:] - c[:-1]
        if bool((d < 0).any()):
            r = int((d < 0).nonzero()[0])
            raise ValueError(f"crow_indices is not monotonic (non-decreasing): crow[{r + 1}] < crow[{r}]")
        if col.numel():
            ci = col.long()
            if bool((ci < 0).any()) or bool((ci >= in_f).any()):
                bad = int(ci[(ci < 0) | (ci >= in_f)][0])
                raise ValueError(f"col_indices out of range [0, {in_f}): found {bad}")
            # strictly increasing within each row
            step = ci[1:] - ci[:-1]
            row_start = torch.zeros(col.numel(), dtype=torch.bool, device=ci.device)
            starts = c[:-1][d > 0]
            row_start[starts] = True
            bad = (step <= 0) & ~row_start[1:]
            if bool(bad.any()):
                k = int(bad.nonzero()[0]) + 1
                r = int(torch.searchsorted(c, torch.tensor([k], device=c.device), right=True)[0]) - 1
                raise ValueError(f"col_indices are not strictly increasing within row {r} (position {k})")
        return self

    def __repr__(self) -> str:
        return (f"CSRMatrix(shape={self.shape}, nnz={self.nnz}, sparsity={self.sparsity:.3f}, "
                f"index={self.col_indices.dtype}, values={self.values.dtype}, nbytes={self.nbytes})")


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def _unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = ((bits.view(-1, 1) >> shifts) & 1).reshape(-1)[:n]
    return flat.to(torch.bool)


@dataclass
class BitmaskMatrix(_StoredArrays):
    bitmask: torch.Tensor  # uint8 (ceil(out*in/8),)
    values: torch.Tensor   # (nnz,) kept values, row-major order
    shape: tuple[int, int]

    _ARRAYS = ("bitmask", "values")
    _LAYOUT = "bitmask"

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> "BitmaskMatrix":
        _check_value_dtype(dtype)
        weight = weight.detach()
        kept = _kept_mask(weight, mask)
        return cls(_pack_bits(kept), weight[kept].to(dtype).cpu().contiguous(),
                   (int(weight.shape[0]), int(weight.shape[1])))

    @classmethod
    def from_csr(cls, csr: CSRMatrix) -> "BitmaskMatrix":
        return cls(_pack_bits(csr.mask()), csr.values.contiguous(), csr.shape)

    def validate(self) -> "BitmaskMatrix":
        out_f, in_f = self.shape
        n = out_f * in_f
        if self.bitmask.dtype != torch.uint8 or self.bitmask.dim() != 1:
            raise ValueError(f"bitmask must be 1-D uint8, got {self.bitmask.dtype} {tuple(self.bitmask.shape)}")
        if self.bitmask.numel() != (n + 7) // 8:
            raise ValueError(f"bitmask has {self.bitmask.numel()} bytes, expected ceil({out_f}*{in_f}/8) = {(n + 7) // 8}")
        if self.values.dim() != 1 or self.values.dtype not in VALUE_DTYPES:
            raise ValueError(f"values must be 1-D float32/float16/bfloat16, got {self.values.dtype} "
                             f"{tuple(self.values.shape)}")
        kept = self.mask_tensor()
        if int(kept.sum()) != self.values.numel():
            raise ValueError(f"bitmask marks {int(kept.sum())} kept weights but there are {self.values.numel()} values")
        if n % 8 and int(self.bitmask[-1]) >> (n % 8):
            raise ValueError("bitmask has bits set beyond the end of the matrix")
        return self

    def mask_tensor(self) -> torch.Tensor:
        return _unpack_bits(self.bitmask, self.shape[0] * self.shape[1]).view(self.shape)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.float32
        dense = torch.zeros(self.shape, dtype=dtype)
        dense[self.mask_tensor()] = self.values.to(dtype)
        return dense

    def to_csr(self, index_dtype: torch.dtype | None = None) -> CSRMatrix:
        kept = self.mask_tensor()
        out_f, in_f = self.shape
        index_dtype = index_dtype or index_dtype_for(in_f)
        rows, cols = kept.nonzero(as_tuple=True)
        crow = torch.zeros(out_f + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_f), 0)
        return CSRMatrix(crow.to(torch.int32), cols.to(index_dtype).contiguous(), self.values.contiguous(),
                         self.shape)

    def __repr__(self) -> str:
        return f"BitmaskMatrix(shape={self.shape}, nnz={self.nnz}, values={self.values.dtype}, nbytes={self.nbytes})"


def encode_sparse(weight: torch.Tensor | CSRMatrix, mask: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> CSRMatrix | BitmaskMatrix:
    """The smaller of CSR and bitmask + values for this weight (ties go to CSR)."""
    csr = weight if isinstance(weight, CSRMatrix) else CSRMatrix.from_dense(weight, mask, dtype)
    if isinstance(weight, CSRMatrix) and csr.values.dtype != dtype:
        csr = csr.to(values_dtype=dtype)
    n = csr.shape[0] * csr.shape[1]
    bitmask_bytes = (n + 7) // 8 + csr.nnz * csr.values.element_size()
    if bitmask_bytes < csr.nbytes:
        return BitmaskMatrix.from_csr(csr)
    return csr


def decode_sparse(tensors: dict, prefix: str = "", shape=None,
                  index_dtype: torch.dtype | None = None) -> CSRMatrix:
    """Load either layout written by encode_sparse(...).to_tensors(prefix) as a validated CSRMatrix."""
    if _key(prefix, "bitmask") in tensors:
        csr = BitmaskMatrix.from_tensors(tensors, prefix, shape).to_csr(index_dtype)
    else:
        csr = CSRMatrix.from_tensors(tensors, prefix, shape)
        if index_dtype is not None:
            csr = csr.to(index_dtype=index_dtype)
    return csr.validate()
