"""The initializer arrays of the sparse ONNX nodes (numpy): CSR for ``vlsparse.SparseLinear``, int8 1x4 blocks for
``vlsparse.SparseLinearInt8`` (``csrc/ort_sparse_linear.cc`` documents both ops' inputs). Used by
:func:`vlsparse.export.onnx_sparse.sparsify_onnx`."""

from __future__ import annotations

import numpy as np

__all__ = ["INT16_MAX_IN_FEATURES", "csr_from_dense", "int8_blocks", "column_dtype"]

INT16_MAX_IN_FEATURES = 32768  # col index <= 32767


def column_dtype(index_dtype, in_features: int) -> np.dtype:
    """The column index dtype for ``in_features`` columns: "auto" (int16 when they fit, else int32), "int16" or
    "int32". Raises ValueError for another name, or int16 that cannot index ``in_features``."""
    if isinstance(index_dtype, str) and index_dtype == "auto":
        return np.dtype(np.int16) if in_features <= INT16_MAX_IN_FEATURES else np.dtype(np.int32)
    dt = np.dtype(index_dtype)
    if dt == np.int16:
        if in_features > INT16_MAX_IN_FEATURES:
            raise ValueError(
                f"index_dtype=int16 cannot index {in_features} input features (at most {INT16_MAX_IN_FEATURES}); "
                "use 'int32' or 'auto'"
            )
        return dt
    if dt == np.int32:
        return dt
    raise ValueError(f"index_dtype must be 'auto', 'int16' or 'int32', got {index_dtype!r}")


def csr_from_dense(w: np.ndarray, index_dtype="auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays (crow_indices int32, col_indices int16/int32, values float32) of a 2-D W (out, in).

    Columns are sorted within each row; exact zeros are dropped (NaN counts as nonzero).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"W must be 2-D, got shape {w.shape}")
    idx = column_dtype(index_dtype, w.shape[1])
    nz = w != 0
    nnz = int(nz.sum())
    if nnz >= 2**31:
        raise ValueError(f"{nnz} nonzeros do not fit int32 crow_indices")
    crow = np.zeros(w.shape[0] + 1, dtype=np.int32)
    np.cumsum(nz.sum(axis=1), out=crow[1:])
    _, cols = np.nonzero(nz)  # row-major order: rows ascending, columns ascending within a row
    return crow, cols.astype(idx), np.ascontiguousarray(w[nz], dtype=np.float32)


def int8_blocks(w: np.ndarray, index_dtype="auto") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``vlsparse.SparseLinearInt8`` arrays of a 2-D W (out, in), exact zeros pruned: crow_indices int32
    (out + 1,) over 1x4 blocks, block_cols int16/int32 (nblocks,) = input // 4, values int8 (nblocks * 4,) and
    scales float32 (out,), as :meth:`vlsparse.sparse.int8.Int8BlockMatrix.from_dense` (the csr int8 export's
    quantisation: symmetric per output channel, ``scales[o] = max |w[o]| / 127``)."""
    import torch  # the export (train) install; running the model needs only onnxruntime

    from vlsparse.sparse.int8 import Int8BlockMatrix

    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"W must be 2-D, got shape {w.shape}")
    m = Int8BlockMatrix.from_dense(torch.from_numpy(np.ascontiguousarray(w)))
    idx = column_dtype(index_dtype, (w.shape[1] + 3) // 4)
    return (m.crow_indices.numpy().astype(np.int32), m.block_cols.numpy().astype(idx),
            np.ascontiguousarray(m.values.numpy().reshape(-1), dtype=np.int8), m.scales.numpy().astype(np.float32))
