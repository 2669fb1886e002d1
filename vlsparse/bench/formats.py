"""The exported formats as the bench loads and sizes them (imports only the runtime: the memory probe uses it).

The formats, their :class:`~vlsparse.runtime.runners.Runner` and their inputs are those of
:mod:`vlsparse.runtime.runners`; the bench runs the csr format on our own kernel of the device
(:data:`KERNELS`), never on a silent fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlsparse.runtime.bundle import ONNX_FILE
from vlsparse.runtime.runners import Runner, load_runner, onnx_initializer_bytes

__all__ = ["KERNELS", "load_format", "format_sizes", "safetensors_sizes", "model_file_bytes"]

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
    model's initializer bytes - the dense fp32 Linears). onnx-int8 quantises every Linear, so that difference
    also holds the saving on the Linears outside the pruned ones (region projections, pooler, answer head:
    8.2M weights, 9.6% of the 84.9M pruned ones, at UNITER-base with 3,129 answers; more on small models).
    Dense int8 has no files of its own (quantised at load): its rows carry the dense files' sizes.
    """
    dense_linear = sum(m.numel() * 4 for m in mask.values())
    out = {}
    for key, d in paths.items():
        if (d / "model.safetensors").is_file():
            sizes = safetensors_sizes(d / "model.safetensors")
            linear = sum(b for k, b in sizes.items() if any(k == n or k.startswith(n + ".") for n in mask))
        else:
            other = onnx_initializer_bytes(paths["onnx"] / ONNX_FILE) - dense_linear
            linear = onnx_initializer_bytes(d / ONNX_FILE) - other
        out[key] = {"disk_bytes": model_file_bytes(d), "linear_disk_bytes": int(linear),
                    "linear_ratio": linear / dense_linear if dense_linear else float("nan")}
    return out
