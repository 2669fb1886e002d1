"""The dense int8 baselines, in one place: PyTorch's and onnxruntime's dynamic quantisation.

What a user who wants int8 without pruning reaches for, and what ``vlsparse bench --dtypes fp32,int8`` and
``benchmarks/model_ratios.py --dtype fp32 int8`` compare our sparse int8 export against:

* :func:`quantize_torch` = ``torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)``
  with its default qconfig (``default_dynamic_qconfig``). Every nn.Linear's weight becomes int8, symmetric,
  with **one scale per tensor** (``MinMaxObserver``, ``per_tensor_symmetric``), packed once for the
  fbgemm / x86 engine. At every call the activations are quantised to uint8 with **one scale and zero point
  per tensor** (the min and max of the whole (..., in) input; ``reduce_range=True`` in the module's forward:
  a 7-bit range, so that fbgemm's pairwise 16-bit sums cannot saturate), multiplied with int32 accumulation
  and dequantised to fp32 with the bias. Embeddings, LayerNorm and attention's activation x activation products
  stay fp32. Sources: the PyTorch docs of ``torch.ao.quantization.quantize_dynamic``;
  ``torch/ao/quantization/quantize.py`` and ``qconfig.py`` (``default_dynamic_qconfig``,
  ``default_weight_observer``, ``default_dynamic_quant_observer``), ``torch/ao/nn/quantized/dynamic/modules/
  linear.py`` (``torch.ops.quantized.linear_dynamic``).
* :func:`quantize_onnx` = ``onnxruntime.quantization.quantize_dynamic(src, dst, weight_type=QuantType.QInt8,
  op_types_to_quantize=["MatMul"])``. Every MatMul with a constant weight (every Linear of the export: the
  TorchScript exporter writes them as MatMul + Add; the dynamic quantiser leaves attention's activation x
  activation MatMuls alone, its ``MatMulConstBOnly`` default) becomes
  DynamicQuantizeLinear + MatMulInteger + a float rescale: weights int8 symmetric with **one scale per tensor**
  (``per_channel=False``, the default; ``per_channel=True`` would give one per output channel), activations
  uint8 asymmetric with **one scale and zero point per tensor**, computed at every call (ONNX
  DynamicQuantizeLinear). Only MatMul: the default op list also quantises Gather (the word embeddings),
  which neither PyTorch's baseline above nor our export does, so the disk and memory columns compare the
  same tensors. Sources: the
  onnxruntime docs "Quantize ONNX models"; ``onnxruntime/python/tools/quantization/quantize.py``
  (``MatMulConstBOnly`` set for dynamic mode, activations QUInt8) and ``onnx_quantizer.py`` (``WeightSymmetric``
  defaults to True for QInt8).

Ours (``vlsparse export --format csr --dtype int8``, :mod:`vlsparse.sparse.int8`) quantises the pruned
Linears only, with finer scales: per output channel for the weights, per token for the activations.

Imports torch or onnx / onnxruntime.quantization only inside the function that needs it (the runtime
install runs ONNX models without torch).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from vlsparse.runtime.bundle import ONNX_FILE

__all__ = ["INT8_LOGIT_TOLERANCE", "quantize_torch", "quantize_onnx", "int8_logit_error"]

#: int8 logits vs the masked fp32 model's: max |difference| <= this fraction of max |fp32 logit| (see
#: :func:`int8_logit_error`). Quantisation error, not fp32 rounding (1e-4 is the fp32 formats' bound): each
#: quantised Linear is off by up to about half a quantisation step of its activations times the weights plus
#: half a step of its weights times the activations (per tensor, 1/255 and 1/127 of the range: about 0.6% of
#: the output scale; see :class:`vlsparse.sparse.int8.Int8SparseLinear` for ours), and the errors of the
#: encoder's Linears add up through the layers before the answer head. Seen (benchmarks/model_ratios.py,
#: UNITER-base shape, random weights, 70% unstructured and 1x4-block, batches 1 and 32): the per-tensor baselines
#: 2.8-5.0% (PyTorch's, with 7-bit activations, 3.9-5.0%), ours 1.0-1.3%. The bound is twice the largest seen.
INT8_LOGIT_TOLERANCE = 0.1


def quantize_torch(module):
    """The module with every nn.Linear replaced by ``torch.ao.nn.quantized.dynamic.Linear`` (module docstring),
    in place, in eval mode; returns it. Input and output activations stay float32 (CPU only: the quantised
    kernels are fbgemm / x86 CPU kernels).

    torch 2.13 marks ``torch.ao.quantization`` as deprecated (its successor is the torchao package); it is still
    the dynamic quantisation PyTorch ships, so its deprecation warnings are silenced here.

    Raises:
        RuntimeError: this PyTorch has no quantised engine (``torch.backends.quantized.supported_engines``).
    """
    import torch
    from torch import nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(module.eval(), {nn.Linear}, dtype=torch.qint8, inplace=True)


def quantize_onnx(src: str | Path, out: str | Path) -> Path:
    """Write the dynamically quantised copy (module docstring) of the ONNX export in directory ``src``
    (model.onnx, config.json) to the new directory ``out``; return ``out``. External weight data
    (model.onnx.data) stays external.

    Raises:
        FileNotFoundError: ``src`` has no model.onnx. ImportError: onnx is not installed (the `train` extra).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic  # needs onnx, the `train` extra

    src, out = Path(src), Path(out)
    if not (src / ONNX_FILE).is_file():
        raise FileNotFoundError(f"{src / ONNX_FILE}: missing (the fp32 ONNX export to quantise)")
    out.mkdir(parents=True)
    logging.disable(logging.WARNING)  # its advice to pre-process first (shape inference), logged on every call
    try:
        quantize_dynamic(str(src / ONNX_FILE), str(out / ONNX_FILE), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"],
                         use_external_data_format=(src / (ONNX_FILE + ".data")).is_file())
    finally:
        logging.disable(logging.NOTSET)
    import onnx

    from vlsparse.runtime.ort import DTYPE_KEY, set_metadata

    graph = onnx.load(str(out / ONNX_FILE), load_external_data=False)  # the weights stay where they are
    set_metadata(graph, DTYPE_KEY, "int8")  # what an int8 runner checks (vlsparse.runtime.runners)
    onnx.save(graph, str(out / ONNX_FILE))
    if (src / "config.json").is_file():
        shutil.copyfile(src / "config.json", out / "config.json")
    return out


def int8_logit_error(logits, ref) -> float:
    """max |logits - ref| / max |ref| (a fraction; inf when ``ref`` is all zeros and ``logits`` is not): how far
    int8 logits (B, A) are from the masked fp32 model's ``ref`` (B, A), against :data:`INT8_LOGIT_TOLERANCE`."""
    logits, ref = np.asarray(logits, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    diff, scale = float(np.abs(logits - ref).max()), float(np.abs(ref).max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
