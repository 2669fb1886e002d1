"""The exported formats as the bench loads and sizes them (imports only the runtime: the memory probe uses it).

The formats, their :class:`~vlsparse.runtime.runners.Runner` and their inputs are those of
:mod:`vlsparse.runtime.runners`; the bench runs the csr format on our own kernel of the device
(:data:`KERNELS`), never on a silent fallback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vlsparse.runtime.bundle import ONNX_FILE
from vlsparse.runtime.runners import Runner, load_runner, onnx_initializer_bytes

__all__ = ["KERNELS", "load_format", "format_sizes", "safetensors_sizes", "model_file_bytes", "quantized_linear_bytes"]

#: device -> the SparseLinear backend of the csr format: our C++ kernel on the CPU, Triton on CUDA
KERNELS = {"cpu": "cpu", "cuda": "triton"}


def load_format(fmt: str, path: str | Path, device: str = "cpu", dtype: str = "fp32", threads: int | None = None,
                spin: bool = True) -> Runner:
    """Load a directory written by :func:`vlsparse.bench.levels.export_formats` as a Runner (see
    :func:`vlsparse.runtime.runners.load_runner`), the csr format on :data:`KERNELS` ``[device]``.

    PyTorch formats run under ``torch.inference_mode`` on ``device`` in ``dtype`` ("fp32" | "fp16" | "int8": ``path``
    is then the int8 export for csr, the dense fp32 files for dense, quantised at load; see load_runner).
    ONNX formats run in onnxruntime with ``threads`` intra-op threads (CUDAExecutionProvider on "cuda");
    ``spin=False`` turns off the spin-waiting of onnxruntime's intra-op threads.
    """
    return load_runner(fmt, path, device=device, dtype=dtype, threads=threads, spin=spin, backend=KERNELS[device])


def safetensors_sizes(file: str | Path) -> dict[str, int]:
    """Tensor name -> bytes, read from a safetensors file's header (no data is loaded)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def model_file_bytes(path: str | Path) -> int:
    """Size in bytes of a format directory's model files: config.json and model.* (safetensors, onnx,
    onnx.data); bundle extras (manifest, tokenizer) are not counted."""
    return sum(p.stat().st_size for p in Path(path).iterdir()
               if p.is_file() and (p.name == "config.json" or p.name.startswith("model.")))


def format_sizes(paths: dict[str, Path], mask: dict) -> dict[str, dict[str, int | float]]:
    """key -> {disk_bytes, linear_disk_bytes, linear_ratio} for the directories of
    :func:`vlsparse.bench.levels.export_formats` (its keys; sizes in bytes, the ratio a fraction of dense fp32).

    linear_disk_bytes: the pruned Linears' tensors in model.safetensors (dense, csr, csr-int8); for the ONNX
    exports the initializer bytes minus those of everything else, i.e. minus (the dense ONNX
    model's initializer bytes - the dense fp32 Linears). onnx-int8 (onnxruntime quantised every Linear): the
    pruned Linears' int8 weights, zero points and scales, found by :func:`quantized_linear_bytes`.
    Dense int8 has no files of its own (quantised at load): its rows carry the dense files' sizes.
    """
    dense_linear = sum(m.numel() * 4 for m in mask.values())
    out = {}
    for key, d in paths.items():
        if (d / "model.safetensors").is_file():
            sizes = safetensors_sizes(d / "model.safetensors")
            linear = sum(b for k, b in sizes.items() if any(k == n or k.startswith(n + ".") for n in mask))
        elif key == "onnx-int8":
            linear = quantized_linear_bytes(d / ONNX_FILE, mask)
        else:
            other = onnx_initializer_bytes(paths["onnx"] / ONNX_FILE) - dense_linear
            linear = onnx_initializer_bytes(d / ONNX_FILE) - other
        out[key] = {"disk_bytes": model_file_bytes(d), "linear_disk_bytes": int(linear),
                    "linear_ratio": linear / dense_linear if dense_linear else float("nan")}
    return out


def quantized_linear_bytes(file: str | Path, mask: dict) -> int:
    """Bytes of the pruned Linears (``mask``'s weight names) in an ONNX model quantised by
    :func:`vlsparse.runtime.quantize.quantize_onnx`: per MatMulInteger node whose module path (torch's exporter
    names nodes ``/a/b/query/MatMul``, onnxruntime's quantiser appends ``_quant``) is a pruned Linear, its int8
    weight initializer ``<w>_quantized`` with ``<w>_zero_point`` and ``<w>_scale``.

    Raises:
        ValueError: a pruned Linear without such a node (another exporter's or quantiser's naming).
    """
    import onnx  # the `train` extra, as for the ONNX exports themselves
    from onnx import helper

    proto = onnx.load(str(file), load_external_data=False)
    size = {t.name: math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            for t in proto.graph.initializer}
    found, total = set(), 0
    for node in proto.graph.node:
        path = node.name.strip("/").rpartition("/")[0].replace("/", ".")
        if node.op_type == "MatMulInteger" and path + ".weight" in mask and node.input[1].endswith("_quantized"):
            w = node.input[1].removesuffix("_quantized")
            found.add(path + ".weight")
            total += sum(size.get(w + suffix, 0) for suffix in ("_quantized", "_zero_point", "_scale"))
    missing = sorted(set(mask) - found)
    if missing:
        raise ValueError(f"{file}: no quantised MatMul found for the pruned Linear {missing[0]} ({len(missing)} of "
                         f"{len(mask)} missing)")
    return total
