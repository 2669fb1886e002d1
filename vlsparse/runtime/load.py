"""Load a CSR export directory as a PyTorch model with :class:`~vlsparse.sparse.linear.SparseLinear` layers.

The directory is the one :func:`vlsparse.export.exporters.export_csr` writes::

    DIR/config.json          the model configuration (model_type selects the class)
    DIR/model.safetensors    per pruned Linear weight ``<name>``: its sparse arrays under
                             ``<name>.crow_indices/.col_indices/.values`` (CSR) or
                             ``<name>.bitmask/.values`` (bitmask layout); every other tensor dense.
                             Header: format=vlsparse-csr-1, sparse (JSON list of names).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from vlsparse.models.registry import model_from_config
from vlsparse.sparse.csr import decode_sparse
from vlsparse.sparse.linear import SparseLinear

FORMAT = "vlsparse-csr-1"


class ExportError(ValueError):
    """An export that cannot be made or an exported directory that cannot be loaded."""


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
