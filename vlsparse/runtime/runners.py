"""One :class:`Runner` per exported format: the model behind ``vlsparse.Pipeline`` and ``vlsparse bench``.

    dense        DIR/config.json + DIR/model.safetensors (the masked state), an nn.Module in PyTorch
    csr          a CSR export (vlsparse.runtime.load.load_sparse): SparseLinear on our SpMM kernels
    onnx         DIR/model.onnx in stock onnxruntime (dense MatMuls with the pruned zeros)
    onnx-sparse  DIR/model.onnx with vlsparse.SparseLinear nodes, in onnxruntime with our custom-op
                 library (vlsparse.runtime.ort.ort_session)

A runner takes the model inputs as numpy arrays (``input_ids`` (B, L) int64, ``attention_mask``
(B, L) int64, ``img_feat`` (B, N, D) float32, ``img_pos`` (B, N, 7) float32, ``img_mask`` (B, N) int64;
anything ``np.asarray`` reads, e.g. CPU torch tensors, works too) and returns the answer logits as a
(B, A) float32 numpy array. The ONNX formats import no torch: PyTorch is imported only when a dense or
csr runner is loaded.

A format runs in a dtype (:data:`DTYPES`): fp32; fp16 (the PyTorch formats, cast at load, for CUDA); int8
(CPU): dense = the masked model through ``torch.ao.quantization.quantize_dynamic`` at load, csr = an
``export --dtype int8`` directory (Int8SparseLinear), onnx = a directory written by
:func:`vlsparse.runtime.quantize.quantize_onnx` (onnxruntime's ``quantize_dynamic``). The pairs that do not
exist are in :data:`UNAVAILABLE`, with the reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from vlsparse.runtime.bundle import CSR_FILE, ONNX_FILE
from vlsparse.runtime.checks import BundleError, check_session_io, read_autotune
from vlsparse.runtime.ort import DTYPE_KEY, ort_session

__all__ = ["FORMATS", "TORCH_FORMATS", "ONNX_FORMATS", "DEVICES", "DTYPES", "UNAVAILABLE", "INPUTS", "Runner",
           "TorchRunner", "OrtRunner", "load_runner", "onnx_initializer_bytes"]

TORCH_FORMATS = ("dense", "csr")
ONNX_FORMATS = ("onnx", "onnx-sparse")
FORMATS = TORCH_FORMATS + ONNX_FORMATS
DEVICES = ("cpu", "cuda")
#: dtype name -> the torch dtype's attribute name the PyTorch formats compute their float tensors in (int8: fp32
#: activations around int8 Linear weights); the ONNX formats run their file's graph (fp32, or int8 once quantised)
DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float32"}
#: (format, dtype) pairs that do not exist -> why (load_runner refuses them; the bench skips them and says so)
UNAVAILABLE = {
    ("onnx", "fp16"): "the ONNX exports run in fp32 (no fp16 export)",
    ("onnx-sparse", "fp16"): "the ONNX exports run in fp32 (no fp16 export)",
}
#: the model inputs a runner feeds, in the order of vlsparse.data.collate
INPUTS = ("input_ids", "attention_mask", "img_feat", "img_pos", "img_mask")
#: what onnxruntime raises for a model file it cannot load (its exception types derive from Exception only)
_ORT_ERRORS = tuple(v for v in vars(_ort_state).values() if isinstance(v, type) and issubclass(v, Exception))


class Runner:
    """A loaded model of one format. :meth:`logits` runs one batch end to end (host arrays in, host logits
    out) in three steps that the bench also times one by one: :meth:`feed` (host arrays -> the runtime's
    inputs: tensors on the device, or the session's numpy feed), :meth:`call` (inputs -> raw output) and
    :meth:`fetch` (raw output -> (B, A) float32 numpy array).

    Attributes: ``fmt`` (one of :data:`FORMATS`), ``device`` ("cpu" | "cuda"), ``dtype`` ("fp32" | "fp16" |
    "int8"), ``module`` (the nn.Module of the PyTorch formats, None for onnxruntime).
    """

    fmt: str
    device: str = "cpu"
    dtype: str = "fp32"
    module: Any = None

    def feed(self, inputs: Mapping[str, Any]) -> Any:
        """Model inputs (name -> (B, ...) host array) -> what :meth:`call` takes."""
        raise NotImplementedError

    def call(self, fed: Any) -> Any:
        """Run the model on fed inputs; the raw output (a device tensor or a numpy array)."""
        raise NotImplementedError

    def fetch(self, out: Any) -> np.ndarray:
        """Raw output -> (B, A) float32 numpy logits on the host."""
        raise NotImplementedError

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight tensors the runtime holds (PyTorch parameters and buffers, ONNX initializers)."""
        raise NotImplementedError

    def logits(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Answer logits (B, A) float32 of one batch of model inputs (name -> (B, ...) array; see the module)."""
        return self.fetch(self.call(self.feed(inputs)))


class TorchRunner(Runner):
    """dense / csr: ``module`` under ``torch.inference_mode`` on ``device``, floating inputs cast to ``dtype``."""

    def __init__(self, fmt: str, module, device: str = "cpu", dtype: str = "fp32"):
        import torch  # the `train` extra; load_runner checked that it is there

        self.fmt, self.device, self.dtype = fmt, device, dtype
        self._torch = torch
        self._float = getattr(torch, DTYPES[dtype])
        self.module = module.to(device=device, dtype=self._float).eval()

    def feed(self, inputs: Mapping[str, Any]) -> dict:
        """name -> tensor on the device (floating ones in ``dtype``), for the :data:`INPUTS`."""
        out = {}
        for k in INPUTS:
            t = self._torch.from_numpy(np.asarray(inputs[k]))
            out[k] = t.to(self.device, self._float if t.is_floating_point() else None)
        return out

    def call(self, fed: dict):
        with self._torch.inference_mode():
            return self.module(**fed)

    def fetch(self, out) -> np.ndarray:
        return out.float().cpu().numpy()

    @property
    def weight_bytes(self) -> int:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        tensors = [*self.module.parameters(), *self.module.buffers()]
        for m in self.module.modules():  # quantize_dynamic's Linears keep weight and bias packed, outside both
            if isinstance(m, DynamicLinear):
                tensors += [t for t in m._weight_bias() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class OrtRunner(Runner):
    """onnx / onnx-sparse: an onnxruntime session on ``file`` (the feed holds the session's inputs only)."""

    def __init__(self, fmt: str, file: Path, session, device: str = "cpu"):
        self.fmt, self.file, self.session, self.device = fmt, Path(file), session, device
        self.names = [i.name for i in session.get_inputs()]

    def feed(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: np.asarray(inputs[k]) for k in self.names}

    def call(self, fed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, fed)[0]

    def fetch(self, out: np.ndarray) -> np.ndarray:
        return out

    @property
    def weight_bytes(self) -> int:
        return onnx_initializer_bytes(self.file)


def load_runner(fmt: str, path: str | Path, *, device: str = "cpu", dtype: str = "fp32", threads: int | None = None,
                spin: bool = True, backend: str = "auto", answers: int | None = None) -> Runner:
    """Load a format's directory (a bundle, or one written by vlsparse.bench.levels.export_formats) as a Runner.

    Args:
        fmt: one of :data:`FORMATS`.
        path: the directory (config.json and model.safetensors, or model.onnx[.data]).
        device: "cpu" or "cuda" (onnxruntime: CUDAExecutionProvider first).
        dtype: one of :data:`DTYPES`. "fp32" | "fp16": what the PyTorch formats compute in (the csr format's
            values are fp32 in memory); the ONNX formats run fp32. "int8" (CPU only): dense is quantised at load
            (:func:`vlsparse.runtime.quantize.quantize_torch`), csr must be an int8 export, onnx a quantised
            one (:func:`vlsparse.runtime.quantize.quantize_onnx`; its graph is run as it is).
        threads: CPU threads: torch.set_num_threads for the PyTorch formats; onnxruntime intra-op threads
            (and the OpenMP threads of our custom op for onnx-sparse). None keeps the defaults.
        spin: False turns off the spin-waiting of onnxruntime's intra-op threads
            (session.intra_op.allow_spinning = 0), which helps on a machine shared with other work.
        backend: csr: the SparseLinear backend ("auto", "cpu", "triton", "dense", ...).
        answers: the answer count the model's output must have (ONNX formats: checked on the session's
            output with its inputs, :func:`vlsparse.runtime.checks.check_session_io`); None: not checked.

    Raises:
        ValueError: an unknown format or dtype, a pair of :data:`UNAVAILABLE` (naming why), int8 off the CPU.
        BundleError (a ValueError): a model file that cannot be loaded (not ONNX, truncated, corrupt CSR
            arrays, a config.json the model classes refuse) or ONNX inputs / outputs that are not a vlsparse
            model's, naming the file; dtype "int8" with a csr export that is not int8, or with an ONNX file
            whose metadata does not say int8 (``vlsparse.dtype``, written by quantize_onnx and sparsify_onnx).
        ImportError: a PyTorch format where torch is not installed.
    """
    path = Path(path)
    _check_dtype(fmt, dtype, device)
    if fmt in TORCH_FORMATS:
        try:
            return _load_torch(fmt, path, device, dtype, threads, backend)
        except (ValueError, KeyError, TypeError, AttributeError, OSError, RuntimeError) as exc:  # on a bad config
            if isinstance(exc, BundleError) or isinstance(exc, RuntimeError) and "state_dict" not in str(exc):
                raise  # RuntimeError: only load_state_dict's size mismatches are the file's fault
            raise BundleError(f"{path / CSR_FILE}: cannot be loaded as a {fmt} model "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    if fmt not in ONNX_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    runner = _load_onnx(fmt, path, device, threads, spin)
    stored = runner.session.get_modelmeta().custom_metadata_map.get(DTYPE_KEY, "fp32")
    if dtype == "int8" and stored != "int8":
        raise BundleError(f"{runner.file}: holds a {stored} model, so it cannot run as dtype int8 (onnx: "
                          "vlsparse.runtime.quantize.quantize_onnx; onnx-sparse: export --sparse --dtype int8)")
    runner.dtype = dtype
    if answers is not None:
        check_session_io(runner.session, answers, runner.file)
    return runner


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _load_onnx(fmt: str, path: Path, device: str, threads: int | None, spin: bool) -> OrtRunner:
    file = path / ONNX_FILE
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not file.is_file():
        raise BundleError(f"{file}: missing (the {fmt} model)")
    read_autotune(path)  # export --autotune's record, when there is one
    try:
        if fmt == "onnx":  # stock onnxruntime: no custom-op library
            if threads:
                so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
            session = ort.InferenceSession(str(file), so, providers=providers)
        else:
            session = ort_session(file, providers=providers, threads=threads, sess_options=so)
    except _ORT_ERRORS as exc:
        raise BundleError(f"{file}: onnxruntime cannot load it ({_first_line(exc)})") from None
    return OrtRunner(fmt, file, session, device)


def _load_torch(fmt: str, path: Path, device: str, dtype: str, threads: int | None, backend: str) -> TorchRunner:
    try:
        import torch  # the `train` extra: the dense and csr formats run on PyTorch
    except ImportError as exc:
        raise ImportError(f"{path} is a {fmt} bundle, which runs on PyTorch ({exc}); install torch, or "
                          "export with --format onnx for an app without PyTorch") from exc
    if threads:
        torch.set_num_threads(int(threads))
    if fmt == "csr":
        from vlsparse.runtime.load import load_sparse  # torch (the `train` extra)
        from vlsparse.sparse.int8 import Int8SparseLinear

        model = load_sparse(path, backend=backend)
        if dtype == "int8" and not any(isinstance(m, Int8SparseLinear) for m in model.modules()):
            raise BundleError(f"{path / CSR_FILE}: not an int8 export, so it cannot run as dtype int8 "
                              "(export it with --dtype int8)")
        return TorchRunner(fmt, model, device, dtype)
    from safetensors.torch import load_file  # the `train` extra

    from vlsparse.models.registry import model_from_config  # torch, transformers (the `train` extra)

    model = model_from_config(json.loads((path / "config.json").read_text()))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    if dtype == "int8":
        from vlsparse.runtime.quantize import quantize_torch  # torch

        model = quantize_torch(model)
    return TorchRunner(fmt, model, device, dtype)


def _check_dtype(fmt: str, dtype: str, device: str) -> None:
    """Raise ValueError when ``fmt`` cannot run in ``dtype`` on ``device`` (an unknown dtype, a pair of
    :data:`UNAVAILABLE`, int8 off the CPU)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if (fmt, dtype) in UNAVAILABLE:
        raise ValueError(f"{fmt} has no {dtype} model: {UNAVAILABLE[fmt, dtype]}")
    if dtype == "int8" and device != "cpu":
        raise ValueError(f"int8 runs on the CPU only (quantised CPU kernels), not on {device!r}")


def onnx_initializer_bytes(file: str | Path) -> int:
    """Bytes of all initializers of an ONNX model (those in external data files included)."""
    import onnx  # the `train` extra (the runtime install runs ONNX models without it)
    from onnx import helper

    proto = onnx.load(str(file), load_external_data=False)
    return sum(math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in proto.graph.initializer)
