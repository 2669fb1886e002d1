"""Whole-model export: a masked model -> CSR directory or ONNX file (:mod:`vlsparse.runtime.load` reads them back).

CSR directory (``--format csr``)::

    DIR/config.json          the model configuration (model_type selects the class)
    DIR/model.safetensors    per pruned Linear weight ``<name>``: its sparse arrays under
                             ``<name>.crow_indices/.col_indices/.values`` (CSR) or
                             ``<name>.bitmask/.values`` (bitmask layout, when smaller);
                             every other tensor dense under its state_dict name.
                             Header: format=vlsparse-csr-1, sparse (JSON list of names).
    DIR/autotune.json        with ``tuned`` (``export --autotune``): the per-layer choice and timings
                             (vlsparse.export.autotune); layers chosen dense are stored dense.

ONNX (``--format onnx``)::

    DIR/config.json, DIR/model.onnx   dense MatMuls with the pruned zeros (stock onnxruntime), or
                                      with ``sparse=True`` the pruned Linears as the custom op
                                      vlsparse.SparseLinear (open with vlsparse.ort_session)
    DIR/model.onnx.data               the initializers of >= 1 KiB (ONNX external data, one file):
                                      onnxruntime maps it into memory instead of copying it, so
                                      untouched pages (embedding rows no input uses) stay on disk
                                      and processes that open one bundle share its pages

Both also hold the bundle files (task.json, ticket.json, tokenizer, manifest.json with checksums;
see vlsparse.runtime.bundle) that ``vlsparse.Pipeline`` needs.
Directories are built under a temporary name and renamed at the end: a failed export leaves nothing.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlsparse.atomic import cpu_state, default_mode, locked, write_json
from vlsparse.export.onnx_sparse import sparsify_onnx
from vlsparse.lottery.runs import load_weights
from vlsparse.models.registry import dims_from_state, load_model
from vlsparse.pruning.mask import Mask, apply_mask, check_mask_fits
from vlsparse.runtime.bundle import ONNX_FILE, BundleExtras, write_bundle
from vlsparse.runtime.checks import AUTOTUNE_FILE
from vlsparse.runtime.load import FORMAT, ExportError
from vlsparse.sparse.csr import BitmaskMatrix, CSRMatrix, encode_sparse
from vlsparse.sparse.int8 import Int8BlockMatrix

LAYOUTS = ("auto", "csr", "bitmask")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
EXTERNAL_DATA_MIN_BYTES = 1024  # initializers of this size and more go to model.onnx.data (onnx's default)


def masked_copy(model: nn.Module, mask: Mask, source: str = "ticket") -> nn.Module:
    """A deep copy of ``model`` (eval mode) with the pruned weights set to zero.

    Raises:
        ExportError: the mask does not fit the model (names or shapes), naming ``source``; a weight that holds
            NaN or Inf after masking (naming the tensor): an export never carries non-finite numbers.
    """
    try:
        check_mask_fits(mask, model, source)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    out = copy.deepcopy(model).eval()
    apply_mask(out, mask)
    for name, t in out.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ExportError(f"{name}: {bad} non-finite value(s) (NaN or Inf) ; refusing to export "
                              "(the model diverged, or the weights file is corrupt)")
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


@locked("out", sibling=True)
def export_csr(model: nn.Module, mask: Mask, out: str | Path, dtype: str = "fp32", layout: str = "auto",
               bundle_extras: BundleExtras | None = None, tuned: dict | None = None) -> Path:
    """Write ``model`` with ``mask`` applied as a CSR directory (see module docstring); returns ``out``.

    Args:
        model: a vlsparse model (``config``, ``prune_scope()``), weights as trained.
        mask: name -> bool (out, in) tensor for the pruned Linear weights.
        dtype: "fp32" | "fp16" | "bf16", the dtype of the stored nonzero values (dense tensors stay fp32), or
            "int8": symmetric int8 weights with one fp32 scale per output channel, stored as bitmask + int8
            values (:class:`vlsparse.sparse.int8.Int8BlockMatrix`; loaded as Int8SparseLinear, activations
            quantised per token at run time). Recorded in the header and in manifest.json.
        layout: "csr", "bitmask" (packed bits + values) or "auto" (the smaller one per weight); int8: bitmask.
        bundle_extras: task info, tokenizer and ticket metadata written beside the model (bundle kind "csr").
        tuned: an :func:`vlsparse.export.autotune.autotune` record: its "dense" layers are stored dense (masked),
            the others sparse; written as autotune.json with each sparse layer's stored layout as its choice.

    Raises:
        ExportError: mask does not fit, ``out`` exists, or unknown dtype/layout.
        BundleError: ``bundle_extras`` that do not fit the model (see vlsparse.runtime.bundle.write_bundle).
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
        dense = {n for n, e in (tuned or {}).get("layers", {}).items() if e["choice"] == "dense"}
        tensors = {k: v for k, v in state.items() if k not in mask or k in dense}
        for name, m in ((n, m) for n, m in mask.items() if n not in dense):
            if dtype == "int8":  # (export_bundle refuses --autotune with int8)
                tensors.update(Int8BlockMatrix.from_dense(state[name], m).to_tensors(name))
                continue
            enc = encode_sparse(state[name], m, DTYPES[dtype])
            if layout == "csr" and isinstance(enc, BitmaskMatrix):
                enc = enc.to_csr()
            elif layout == "bitmask" and isinstance(enc, CSRMatrix):
                enc = BitmaskMatrix.from_csr(enc)
            tensors.update({k: v.contiguous() for k, v in enc.to_tensors(name).items()})
            if tuned is not None:
                tuned["layers"][name]["choice"] = "bitmask" if isinstance(enc, BitmaskMatrix) else "csr"
        meta = {"format": FORMAT, "sparse": json.dumps(sorted(set(mask) - dense)), "dtype": dtype}
        save_file(tensors, str(tmp / "model.safetensors"), metadata=meta)
        _write_config(net, tmp)
        if tuned is not None:
            write_json(tmp / AUTOTUNE_FILE, tuned)
        write_bundle(tmp, "csr", bundle_extras, dtype=dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(tmp, out)


def model_from_weights(model: str, weights: str | Path, objective: dict | None = None) -> nn.Module:
    """Build ``model`` (preset, directory or checkpoint; see vlsparse.models.load_model) sized for a
    trained state_dict (safetensors) and load that state_dict into it. ``objective``: the task's
    (task.json ``objective``: ``head``, ``images``); None is the answer head.

    Raises:
        ExportError: ``weights`` is unreadable or not a vlsparse model's state_dict.
        RunError: the weights do not fit the model.
    """
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
    """Write ``proto`` (an onnx.ModelProto, left unchanged) as DIRECTORY/model.onnx (the graph) and
    DIRECTORY/model.onnx.data (every initializer of at least EXTERNAL_DATA_MIN_BYTES, as ONNX external
    data); returns model.onnx's path.

    Why external data: onnxruntime (1.32, CPU) maps the data file instead of reading it into its own
    buffers, so the loaded model keeps only the pages it touches (measured on the UNITER-base shape at 70%,
    steady RSS in a fresh process after three batch-1 calls: onnx-sparse 287 MB in one file, 200 MB with
    external data; dense onnx 464 vs 377 MB: most of the 94 MB word-embedding table is never read), and
    processes that open the same bundle share those pages. It also lifts protobuf's 2 GB limit.
    """
    path = Path(directory) / ONNX_FILE
    out = onnx.ModelProto()
    out.CopyFrom(proto)  # onnx.save_model moves the tensors of the proto it is given to the data file
    onnx.save_model(out, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_FILE + ".data", size_threshold=EXTERNAL_DATA_MIN_BYTES)
    return path


@locked("out", sibling=True)
def export_onnx(model: nn.Module, mask: Mask, out: str | Path, sparse: bool = False, min_sparsity: float = 0.5,
                opset: int = 17, bundle_extras: BundleExtras | None = None, tuned: dict | None = None,
                dtype: str = "fp32") -> Path:
    """Write ``model`` with ``mask`` applied as ONNX (see module docstring); returns ``out``.

    The graph has dynamic batch, text and region dimensions (``model.input_axes``). With
    ``sparse``, every MatMul whose weight has at least ``min_sparsity`` zeros (a fraction) becomes
    vlsparse.SparseLinear with its CSR arrays as plain 1-D initializers (nothing densified at load).
    Exported with torch.onnx.export (TorchScript-based exporter, which handles these models).
    ``bundle_extras``: as for :func:`export_csr` (bundle kind "onnx" or "onnx-sparse"). ``tuned`` (with
    ``sparse``): an autotune record; its "dense" layers stay dense MatMuls, and it is written as autotune.json.
    ``dtype`` (with ``sparse``): "fp32" or "int8" (the sparse nodes hold int8 weights in 1x4 blocks:
    :func:`vlsparse.export.onnx_sparse.sparsify_onnx`).

    Raises:
        ExportError: mask does not fit, ``out`` exists, or the model has another head than the answer
            head (``config.task_head``; export those with :func:`export_csr`).
        BundleError: ``bundle_extras`` that do not fit the model.
    """
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
            keep = {n.removesuffix(".weight") for n, e in (tuned or {}).get("layers", {}).items() if e["choice"] == "dense"}
            proto = sparsify_onnx(proto, min_sparsity=min_sparsity, dense=keep, dtype=dtype)
        if sparse and tuned is not None:
            write_json(tmp / AUTOTUNE_FILE, tuned)
        save_onnx(proto, tmp)
        _write_config(net, tmp)
        write_bundle(tmp, "onnx-sparse" if sparse else "onnx", bundle_extras, dtype=dtype if sparse else "fp32")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(tmp, out)
