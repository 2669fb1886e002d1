"""Whole-model export: a masked model -> CSR directory or ONNX file, and loading them back.

CSR directory (``--format csr``)::

    DIR/config.json          the model configuration (model_type selects the class)
    DIR/model.safetensors    per pruned Linear weight ``<name>``: its sparse arrays under
                             ``<name>.crow_indices/.col_indices/.values`` (CSR) or
                             ``<name>.bitmask/.values`` (bitmask layout, when smaller);
                             every other tensor dense under its state_dict name.
                             Header: format=vlsparse-csr-1, sparse (JSON list of names).

ONNX (``--format onnx``)::

    DIR/config.json, DIR/model.onnx   dense MatMuls with the pruned zeros (stock onnxruntime), or
                                      with ``sparse=True`` the pruned Linears as the custom op
                                      vlsparse.SparseLinear (open with vlsparse.export.ort_session)

Both also hold the bundle files (task.json, ticket.json, tokenizer, manifest.json with checksums;
see vlsparse.export.bundle) that ``vlsparse.Pipeline`` needs.
Directories are built under a temporary name and renamed at the end: a failed export leaves nothing.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..io import cpu_state, default_mode
from ..models import model_from_config
from ..pruning.mask import Mask, apply_mask, check_mask_fits
from .bundle import BundleExtras, write_bundle
from .csr import BitmaskMatrix, CSRMatrix, decode_sparse, encode_sparse
from .sparse_linear import SparseLinear

FORMAT = "vlsparse-csr-1"
LAYOUTS = ("auto", "csr", "bitmask")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_FILE = "model.onnx"
EXTERNAL_DATA_BYTES = 512 * 2**20  # larger ONNX models keep their weights in model.onnx.data


class ExportError(ValueError):
    """An export that cannot be made or an exported directory that cannot be loaded."""


def masked_copy(model: nn.Module, mask: Mask, source: str = "ticket") -> nn.Module:
    """A deep copy of ``model`` (eval mode) with the pruned weights set to zero.

    Raises:
        ExportError: the mask does not fit the model (names or shapes), naming ``source``.
    """
    try:
        check_mask_fits(mask, model, source)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    out = copy.deepcopy(model).eval()
    apply_mask(out, mask)
    return out


def _new_dir(out: Path) -> Path:
    if out.exists():
        raise ExportError(f"{out}: exists; refusing to overwrite an export (choose another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


def _finish(tmp: Path, out: Path) -> Path:
    for f in tmp.rglob("*"):
        f.chmod(default_mode(f.is_dir()))
    tmp.chmod(default_mode(directory=True))  # mkdtemp makes it private (0700)
    tmp.rename(out)
    return out


def _write_config(model: nn.Module, directory: Path) -> None:
    (directory / "config.json").write_text(model.config.to_json_string(use_diff=False))


def export_csr(model: nn.Module, mask: Mask, out: str | Path, dtype: str = "fp32", layout: str = "auto",
               bundle_extras: BundleExtras | None = None) -> Path:
    """Write ``model`` with ``mask`` applied as a CSR directory (see module docstring); returns ``out``.

    Args:
        model: a vlsparse model (``config``, ``prune_scope()``), weights as trained.
        mask: name -> bool (out, in) tensor for the pruned Linear weights.
        dtype: "fp32" | "fp16" | "bf16", the dtype of the stored nonzero values (dense tensors stay fp32).
        layout: "csr", "bitmask" (packed bits + values) or "auto" (the smaller one per weight).
        bundle_extras: task info, tokenizer and ticket metadata written beside the model (bundle kind "csr").

    Raises:
        ExportError: mask does not fit, ``out`` exists, or unknown dtype/layout.
        BundleError: ``bundle_extras`` that do not fit the model (see vlsparse.export.bundle.write_bundle).
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    net = masked_copy(model, mask)
    out = Path(out)
    tmp = _new_dir(out)
    try:
        state = cpu_state(net)
        tensors = {k: v for k, v in state.items() if k not in mask}
        for name, m in mask.items():
            enc = encode_sparse(state[name], m, DTYPES[dtype])
            if layout == "csr" and isinstance(enc, BitmaskMatrix):
                enc = enc.to_csr()
            elif layout == "bitmask" and isinstance(enc, CSRMatrix):
                enc = BitmaskMatrix.from_csr(enc)
            tensors.update({k: v.contiguous() for k, v in enc.to_tensors(name).items()})
        meta = {"format": FORMAT, "sparse": json.dumps(sorted(mask)), "dtype": dtype}
        save_file(tensors, str(tmp / "model.safetensors"), metadata=meta)
        _write_config(net, tmp)
        write_bundle(tmp, "csr", bundle_extras)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(tmp, out)


def load_sparse(path: str | Path, backend: str = "auto") -> nn.Module:
    """Rebuild a model from a CSR directory with :class:`SparseLinear` in place of the pruned Linears.

    Outputs equal the masked dense model's (fp32 values: <= 1e-4 max abs difference, tested).

    Raises:
        ExportError: missing files, a file that is not a vlsparse CSR export, or corrupt sparse arrays
            (indices out of range, non-monotonic crow_indices, wrong lengths), naming the tensor.
    """
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ExportError(f"{f}: missing from the CSR export directory")
    try:
        with safe_open(str(weights), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(weights))
        config = json.loads(cfg_file.read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable export ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ExportError(f"{weights}: not a vlsparse CSR export (header lacks format={FORMAT})")
    model = model_from_config(config)
    sparse = json.loads(meta["sparse"])
    dense_state = {k: v for k, v in tensors.items() if not any(k.startswith(s + ".") for s in sparse)}
    missing, unexpected = model.load_state_dict({**model.state_dict(), **dense_state}, strict=False)
    if unexpected:
        raise ExportError(f"{weights}: tensors the model does not have: {unexpected[:3]}")
    own = set(model.state_dict())
    absent = sorted(own - set(dense_state) - set(sparse))
    if absent:
        raise ExportError(f"{weights}: lacks {absent[0]}")
    for name in sparse:
        module_path = name.removesuffix(".weight")
        linear = model.get_submodule(module_path)
        try:
            csr = decode_sparse(tensors, name, shape=tuple(linear.weight.shape))
        except (ValueError, KeyError) as exc:
            raise ExportError(f"{weights}: sparse weight {name}: {exc}") from exc
        parent, _, child = module_path.rpartition(".")
        setattr(model.get_submodule(parent), child, SparseLinear.from_csr(csr, bias=linear.bias, backend=backend))
    return model.eval()


def model_from_weights(model: str, weights: str | Path, objective: dict | None = None) -> nn.Module:
    """Build ``model`` (preset, directory or checkpoint; see vlsparse.models.load_model) sized for a
    trained state_dict (safetensors) and load that state_dict into it. ``objective``: the task's
    (task.json ``objective``: ``head``, ``images``); None is the answer head.

    Raises:
        ExportError: ``weights`` is unreadable or not a vlsparse model's state_dict.
        RunError: the weights do not fit the model.
    """
    from ..models import dims_from_state, load_model
    from ..pruning.imp import load_weights

    try:
        img_dim, num_answers = dims_from_state(load_file(str(weights)))
    except Exception as exc:
        raise ExportError(f"{weights}: not a readable state_dict of a vlsparse model ({str(exc)[:120]})") from None
    objective = objective or {}
    net, _ = load_model(model, img_dim=img_dim, num_answers=num_answers, head=objective.get("head", "answer"),
                        num_images=objective.get("images", 1))
    load_weights(weights, net)
    return net


def save_onnx(proto, directory: Path) -> Path:
    """Write ``proto`` as DIRECTORY/model.onnx, with the weights in model.onnx.data when the model
    is larger than EXTERNAL_DATA_BYTES (protobuf cannot hold 2 GB); returns the file's path."""
    import onnx

    big = proto.ByteSize() > EXTERNAL_DATA_BYTES
    path = Path(directory) / ONNX_FILE
    onnx.save_model(proto, str(path), save_as_external_data=big, location=ONNX_FILE + ".data" if big else None)
    return path


def export_onnx(model: nn.Module, mask: Mask, out: str | Path, sparse: bool = False, min_sparsity: float = 0.5,
                opset: int = 17, bundle_extras: BundleExtras | None = None) -> Path:
    """Write ``model`` with ``mask`` applied as ONNX (see module docstring); returns ``out``.

    The graph has dynamic batch, text and region dimensions (``model.input_axes``). With
    ``sparse``, every MatMul whose weight has at least ``min_sparsity`` zeros (a fraction) becomes
    vlsparse.SparseLinear with its CSR arrays as plain 1-D initializers (nothing densified at load).
    Exported with torch.onnx.export (TorchScript-based exporter, which handles these models).
    ``bundle_extras``: as for :func:`export_csr` (bundle kind "onnx" or "onnx-sparse").

    Raises:
        ExportError: mask does not fit, ``out`` exists, or the model has another head than the answer
            head (``config.task_head``; export those with :func:`export_csr`).
        BundleError: ``bundle_extras`` that do not fit the model.
    """
    import onnx

    head = getattr(model.config, "task_head", "answer")
    if head != "answer":
        raise ExportError(f"ONNX export covers the answer head (VQA, GQA, SNLI-VE, easy-VQA); this model has the "
                          f"{head!r} head: use --format csr")
    net = masked_copy(model, mask)
    out = Path(out)
    tmp = _new_dir(out)
    try:
        inputs = net.example_inputs()
        axes = {k: dict(enumerate(v)) for k, v in net.input_axes.items()}
        axes["logits"] = {0: "batch"}
        raw = tmp / "dense.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter handles these models
            torch.onnx.export(net, (), str(raw), kwargs=inputs, input_names=list(net.input_axes),
                              output_names=["logits"], dynamic_axes=axes, opset_version=opset, dynamo=False)
        proto = onnx.load(str(raw))
        raw.unlink()
        if sparse:
            from .onnx_sparse import sparsify_onnx
            proto = sparsify_onnx(proto, min_sparsity=min_sparsity)
        save_onnx(proto, tmp)
        _write_config(net, tmp)
        write_bundle(tmp, "onnx-sparse" if sparse else "onnx", bundle_extras)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(tmp, out)
