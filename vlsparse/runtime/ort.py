"""onnxruntime sessions for vlsparse models: ``ort_session`` registers our custom-op library.

Opening a sparse model (one with ``vlsparse.SparseLinear`` nodes, written by
:func:`vlsparse.export.onnx_sparse.sparsify_onnx`) with plain onnxruntime fails at session creation with
``onnxruntime.capi.onnxruntime_pybind11_state.Fail: [ONNXRuntimeError] : 1 : FAIL : Fatal error:
vlsparse:SparseLinear(-1) is not a registered function/op`` (onnxruntime 1.31). The sparse model says
why in its ``doc_string`` and in the metadata entry ``vlsparse.requires`` (:data:`REQUIRES_MESSAGE`);
:func:`requires_vlsparse` detects such a model, and :func:`ort_session` re-raises that failure with the
fix spelled out.

Imports only onnxruntime and vlsparse.sparse.kernels.ort (no torch); onnx is optional
(needed only to inspect a ModelProto), so this works in the torch-free runtime install.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

try:
    import onnx  # optional: the `train` extra; the runtime install opens paths and bytes without it
except ImportError:
    onnx = None

from vlsparse.sparse.kernels import ort as ort_library

__all__ = ["DOMAIN", "OP_TYPE", "OP_TYPE_INT8", "REQUIRES_MESSAGE", "DTYPE_KEY", "ort_session", "requires_vlsparse",
           "set_metadata"]

DOMAIN = "vlsparse"
OP_TYPE = "SparseLinear"
#: the int8 op (``csrc/ort_sparse_linear.cc``: int8 weights in 1x4 blocks, activations quantised per token)
OP_TYPE_INT8 = "SparseLinearInt8"
#: metadata entry naming the dtype of the weights a vlsparse ONNX model computes with ("fp32" or "int8"), written by
#: sparsify_onnx and quantize_onnx; a model without it is fp32 (what an int8 runner checks before it loads one)
DTYPE_KEY = "vlsparse.dtype"
REQUIRES_MESSAGE = (
    "This model uses the custom op vlsparse.SparseLinear (sparse Linear layers in CSR form). "
    "Plain onnxruntime cannot run it: it fails with 'vlsparse:SparseLinear(-1) is not a registered "
    "function/op'. Open it with vlsparse.ort_session(path), or register the "
    "library yourself: so = onnxruntime.SessionOptions(); "
    "so.register_custom_ops_library(str(vlsparse.sparse.kernels.ort.custom_op_library())); "
    "onnxruntime.InferenceSession(path, so)."
)


def requires_vlsparse(model: "onnx.ModelProto | str | os.PathLike | bytes") -> bool:
    """True when the model has vlsparse nodes (and so needs the custom-op library)."""
    if not isinstance(model, onnx.ModelProto):
        model = _load(model)
    return any(n.domain == DOMAIN for n in model.graph.node)


def set_metadata(model: "onnx.ModelProto", key: str, value: str) -> None:
    """Set the model's metadata entry ``key`` to ``value`` (replacing one already there)."""
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def _load(src) -> "onnx.ModelProto":
    if isinstance(src, (bytes, bytearray)):
        return onnx.load_from_string(bytes(src))
    return onnx.load(os.fspath(src), load_external_data=False)


def ort_session(
    path_or_bytes: "str | os.PathLike | bytes | onnx.ModelProto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    sess_options=None,
):
    """An ``onnxruntime.InferenceSession`` with the vlsparse custom-op library registered.

    ``threads``: onnxruntime's intra-op thread count *and* the OpenMP thread count of SparseLinear
    (the latter is process-wide; see ``vlsparse.sparse.kernels.ort.set_num_threads``). ``None`` keeps the
    defaults. ``sess_options``: an ``onnxruntime.SessionOptions`` to start from (it is modified).
    Without ``sess_options``, onnxruntime's intra-op threads do not spin-wait: while our op runs on
    its own OpenMP threads, spinning ORT threads took the same cores (measured on 2 cores, uniter-base
    at 70%: 167 ms spinning vs 107 ms not). Works for dense models too.
    """
    import onnxruntime as ort

    so = sess_options
    if so is None:
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    lib = ort_library.custom_op_library()
    so.register_custom_ops_library(str(lib))
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        ort_library.set_num_threads(int(threads))
    if onnx is not None and isinstance(path_or_bytes, onnx.ModelProto):
        src = path_or_bytes.SerializeToString()
    elif isinstance(path_or_bytes, (bytes, bytearray)):
        src = bytes(path_or_bytes)
    else:
        src = os.fspath(Path(path_or_bytes))
    try:
        return ort.InferenceSession(src, sess_options=so, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime raises its own pybind exception types
        if f"{DOMAIN}:{OP_TYPE}" in str(e) and "not a registered" in str(e):
            raise RuntimeError(
                f"onnxruntime did not accept the vlsparse custom ops from {lib} "
                f"(onnxruntime >= 1.16 is needed): {e}"
            ) from e
        raise
