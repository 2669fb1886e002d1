"""Load a CSR export directory as a PyTorch model with :class:`~vlsparse.sparse.linear.SparseLinear` layers.

The directory is the one :func:`vlsparse.export.exporters.export_csr` writes::

    DIR/config.json          the model configuration (model_type selects the class)
    DIR/model.safetensors    per pruned Linear weight ``<name>``: its sparse arrays under
                             ``<name>.crow_indices/.col_indices/.values`` (CSR) or
                             ``<name>.bitmask/.values`` (bitmask layout) or, int8,
                             ``<name>.bitmask/.qvalues/.scales``; every other tensor dense.
                             Header: format=vlsparse-csr-1, sparse (JSON list of names), dtype.
    DIR/autotune.json        optional (``export --autotune``): per pruned Linear the format chosen by
                             timing on the exporting machine ("dense" ones are stored dense) and the times.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn
from torch.nn import functional as F

from vlsparse.models.registry import model_from_config
from vlsparse.runtime.checks import AUTOTUNE_FILE, read_autotune
from vlsparse.sparse.csr import decode_sparse
from vlsparse.sparse.int8 import Int8BlockMatrix, Int8SparseLinear, is_int8
from vlsparse.sparse.linear import InputShare, SparseLinear

FORMAT = "vlsparse-csr-1"


class ExportError(ValueError):
    """An export that cannot be made or an exported directory that cannot be loaded."""


def load_sparse(path: str | Path, backend: str = "auto", chain: bool = True) -> nn.Module:
    """Rebuild a model from a CSR directory with :class:`SparseLinear` in place of the pruned Linears.

    Outputs equal the masked dense model's (fp32 values: <= 1e-4 max abs difference, tested). An int8 export
    (header dtype=int8) loads as :class:`~vlsparse.sparse.int8.Int8SparseLinear` layers, each within its
    docstring's quantisation error bound of the masked fp32 layer (tested); ``backend`` then is "cpu" (the int8
    kernel, an error where it cannot be built), "dense" or, for any other value, "auto" (the int8 kernel where it
    builds).
    The dense model is never materialised: the model is built with its parameters on the meta device
    (no storage), each pruned Linear becomes a SparseLinear over the file's arrays, and every other
    parameter takes the file's tensor itself (``load_state_dict(assign=True)``, no copy), so the loaded
    model holds one copy of what the file holds (bitmask weights decoded to CSR). Buffers the file does
    not hold (non-persistent ones such as position ids) are built on the CPU as the model makes them.
    ``chain``: link consecutive sparse layers (:func:`chain_sparse_layers`): same outputs, fewer transposes.

    Raises:
        ExportError: missing files, a file that is not a vlsparse CSR export, or corrupt sparse arrays
            (indices out of range, non-monotonic crow_indices, wrong lengths), naming the tensor; a
            tensor the model lacks or a parameter the file lacks; a weight whose arrays are not of the
            dtype the header (and manifest.json, when present) says.
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
    with parameters_on_meta():
        model = model_from_config(config)
    sparse = json.loads(meta["sparse"])
    _check_dtype(path, meta.get("dtype", "fp32"), sparse, tensors)
    dense_state = {k: v for k, v in tensors.items() if not any(k.startswith(s + ".") for s in sparse)}
    own = set(model.state_dict())
    unexpected = sorted(set(dense_state) - own)
    if unexpected:
        raise ExportError(f"{weights}: tensors the model does not have: {unexpected[:3]}")
    absent = sorted(own - set(dense_state) - set(sparse))
    if absent:
        raise ExportError(f"{weights}: lacks {absent[0]}")
    check_autotune(path, model, sparse, tensors)
    for name in sparse:
        _swap_in_sparse(model, name, tensors, dense_state, weights, backend)
    del tensors  # what is still needed is referenced by the model
    model.load_state_dict(dense_state, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ExportError(f"{weights}: lacks {left[0]}")
    if chain:
        chain_sparse_layers(model)
    return model.eval()


def check_autotune(path: Path, model: nn.Module, sparse: list[str], tensors: dict) -> dict | None:
    """The ``autotune.json`` record of CSR export directory ``path`` (None when it has none): its structure
    (:func:`vlsparse.runtime.checks.read_autotune`), then every layer it names is a Linear weight of ``model``
    with the recorded (out, in) shape, stored as recorded ("dense": a dense tensor; "csr" / "bitmask": listed
    as sparse, with that layout's arrays).

    Raises:
        ExportError: a record that does not match the model file, naming the file and the layer.
        BundleError: an unreadable or malformed record.
    """
    record = read_autotune(path)
    modules = dict(model.named_modules())
    for name, entry in (record or {"layers": {}})["layers"].items():
        module = modules.get(str(name).removesuffix(".weight"))
        stored = "bitmask" if f"{name}.bitmask" in tensors else "csr" if name in sparse else \
            "dense" if name in tensors else "nothing"
        if not isinstance(module, nn.Linear) or entry["shape"] != list(module.weight.shape):
            raise ExportError(f"{path / AUTOTUNE_FILE}: layer {name!r} is not a Linear weight of that shape in this model")
        if entry["choice"] != stored:
            raise ExportError(f"{path / AUTOTUNE_FILE}: layer {name!r} is recorded as {entry['choice']!r} but stored "
                              f"as {stored} in {FORMAT} file")
    return record


def _check_dtype(path: Path, dtype: str, sparse: list, tensors: dict) -> None:
    """The header's dtype agrees with manifest.json's (when there is one) and with every sparse weight's arrays."""
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text()).get("dtype", "fp32")
        except (OSError, ValueError, AttributeError) as exc:
            raise ExportError(f"{manifest}: unreadable ({exc})") from exc
        if recorded != dtype:
            raise ExportError(f"{manifest}: says dtype {recorded!r:.20} but model.safetensors holds {dtype!r:.20}")
    for name in sparse:
        if is_int8(tensors, name) != (dtype == "int8"):
            raise ExportError(f"{path / 'model.safetensors'}: sparse weight {name} is "
                              f"{'' if is_int8(tensors, name) else 'not '}int8 but the header says dtype {dtype!r:.20}")


def _swap_in_sparse(model: nn.Module, name: str, tensors: dict, dense_state: dict, weights: Path,
                    backend: str) -> None:
    """Replace the Linear of weight ``name`` (on meta) by a SparseLinear over its arrays in ``tensors``; its
    bias (fp32 (out,)) moves from ``dense_state`` into the new module."""
    module_path = name.removesuffix(".weight")
    linear = model.get_submodule(module_path)
    int8 = is_int8(tensors, name)
    try:
        shape = tuple(linear.weight.shape)
        matrix = Int8BlockMatrix.from_tensors(tensors, name, shape) if int8 else decode_sparse(tensors, name, shape)
    except (ValueError, KeyError) as exc:
        raise ExportError(f"{weights}: sparse weight {name}: {exc}") from exc
    bias = dense_state.pop(module_path + ".bias", None) if linear.bias is not None else None
    parent, _, child = module_path.rpartition(".")
    if int8:
        layer = Int8SparseLinear(matrix, bias, backend=backend if backend in ("cpu", "dense") else "auto")
    else:
        layer = SparseLinear.from_csr(matrix, bias=bias, backend=backend)
    setattr(model.get_submodule(parent), child, layer)


@contextmanager
def parameters_on_meta():
    """Within the block, every parameter a module registers is moved to the meta device (no storage, no
    init cost: ``reset_parameters`` on meta does nothing); buffers stay on the CPU. Used to build a model
    whose weights are then assigned from a file."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _exact_gelu(fn) -> bool:
    """Whether ``fn`` (an activation module) is GELU in its erf form (what the kernel's epilogue computes)."""
    if isinstance(fn, nn.GELU):
        return fn.approximate == "none"
    return type(fn).__name__ == "GELUActivation" and getattr(fn, "act", None) is F.gelu


def chain_sparse_layers(model: nn.Module) -> int:
    """Link the SparseLinears of every transformer layer of ``model`` (in place); return how many links.

    * the query, key and value Linears of an attention share one :class:`InputShare` (their common input
      is transposed once; the model clears it after each forward);
    * an ``intermediate`` block (``dense`` + exact GELU ``intermediate_act_fn``, as in BERT, LXMERT and
      ViLT) computes GELU in the kernel's epilogue (its activation becomes Identity) and, when the
      ``output.dense`` beside it is sparse too, hands it a feature-major result (no transpose between);
      an int8 ``dense`` (:class:`Int8SparseLinear`) takes the GELU epilogue only.
    Outputs are unchanged (tested against the masked dense model).
    """
    share, links = InputShare(), 0
    for mod in model.modules():
        qkv = [getattr(mod, n, None) for n in ("query", "key", "value")]
        if all(isinstance(m, SparseLinear) for m in qkv):
            for m in qkv:
                m.input_share = share
            links += 1
        inter, out = getattr(mod, "intermediate", None), getattr(mod, "output", None)
        dense = getattr(inter, "dense", None)
        if isinstance(dense, (SparseLinear, Int8SparseLinear)) and _exact_gelu(getattr(inter, "intermediate_act_fn", None)):
            dense.activation, inter.intermediate_act_fn = "gelu", nn.Identity()
            if isinstance(dense, SparseLinear) and isinstance(getattr(out, "dense", None), SparseLinear):
                dense.out_layout = "feature"
            links += 1
    if links:
        model.register_forward_hook(share.clear)
    return links
