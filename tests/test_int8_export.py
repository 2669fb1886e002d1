"""`export --dtype int8` (CSR bundles): the loaded int8 model against the masked fp32 model, storage, checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.test_int8 import np_bound, np_quantize_tokens, np_quantize_weight
from vlsparse.export.exporters import export_csr, masked_copy
from vlsparse.pruning.magnitude import global_magnitude_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.runtime.bundle import BundleError, read_bundle
from vlsparse.runtime.load import ExportError, load_sparse
from vlsparse.sparse.int8 import GELU_LIPSCHITZ, Int8SparseLinear


@pytest.fixture
def int8_export(tmp_path, tiny_model):
    w = dict(tiny_model.named_parameters())
    scope = tiny_model.prune_scope()
    mask = global_magnitude_prune({n: w[n] for n in scope}, ones_mask(tiny_model, scope), 0.7)
    return export_csr(tiny_model, mask, tmp_path / "int8", dtype="int8"), mask


def test_every_int8_layer_is_within_its_bound_of_the_masked_fp32_layer(tiny_model, int8_export):
    out, mask = int8_export
    model = load_sparse(out)
    ref = masked_copy(tiny_model, mask)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8SparseLinear)}
    assert sorted(n + ".weight" for n in layers) == sorted(mask)
    assert any(m.activation == "gelu" for m in layers.values())  # the fused epilogue is covered
    seen = {}

    def keep(name):
        def hook(_m, args, y):
            seen.setdefault(name, (args[0].detach(), y.detach()))  # returns None: the output is unchanged
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    inp = tiny_model.example_inputs(batch=3, text_len=9, regions=5, seed=1)
    with torch.no_grad():
        y8, y32 = model(**inp), ref(**inp)
    for h in hooks:
        h.remove()
    assert len(seen) == len(layers)
    for name, (x, y) in seen.items():
        lin = ref.get_submodule(name)
        x2 = x.reshape(-1, x.shape[-1]).double()
        r = F.linear(x2, lin.weight.detach().double(), lin.bias.detach().double())  # the masked fp32 layer
        gelu = layers[name].activation == "gelu"
        r = (F.gelu(r) if gelu else r).numpy()
        w, m = lin.weight.detach().numpy(), mask[name + ".weight"].numpy()
        wq, sw = np_quantize_weight(w, m)
        bound = np_bound(x2.numpy(), w, m, wq, sw, np_quantize_tokens(x2.float().numpy())[1])
        bound = bound * (GELU_LIPSCHITZ if gelu else 1.0) + 1e-5
        err = np.abs(y.reshape(r.shape).double().numpy() - r)
        assert (err <= bound).all(), (name, float((err - bound).max()))
    diff = (y8 - y32).abs().max().item()
    assert 0 < diff <= 0.05 * y32.abs().max().item()


def test_int8_bundle_storage_and_manifest(tiny_model, int8_export):
    out, mask = int8_export
    assert read_bundle(out).manifest["dtype"] == "int8"
    t = load_file(str(out / "model.safetensors"))
    sparse_bytes = sum(v.numel() * v.element_size() for k, v in t.items() if k.rsplit(".", 1)[0] in mask)
    dense_bytes = sum(m.numel() * 4 for m in mask.values())
    assert sparse_bytes <= 0.15 * dense_bytes  # 1/32 bits + 0.3 / 4 int8 values + scales: ~0.11
    assert all(t[n + ".qvalues"].dtype == torch.int8 for n in mask)


def test_int8_dtype_is_checked_on_load(tmp_path, int8_export):
    out, _ = int8_export
    man = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**man, "dtype": "fp32"}))
    with pytest.raises(ExportError, match="manifest.json: says dtype 'fp32'"):
        load_sparse(out)
    (out / "manifest.json").write_text(json.dumps({**man, "dtype": "int4"}))
    with pytest.raises(BundleError, match="dtype 'int4' is not one of"):
        read_bundle(out)
    (out / "manifest.json").unlink()
    tensors = load_file(str(out / "model.safetensors"))
    meta = {"format": "vlsparse-csr-1", "sparse": json.dumps(sorted(n.rsplit(".", 1)[0] for n in tensors
                                                                   if n.endswith(".qvalues"))), "dtype": "fp32"}
    save_file(tensors, str(out / "model.safetensors"), metadata=meta)
    with pytest.raises(ExportError, match="is int8 but the header says dtype 'fp32'"):
        load_sparse(out)


def test_onnx_sparse_int8_export_runs_our_int8_op_close_to_the_masked_model(tmp_path, tiny_model, int8_export):
    """``export --format onnx --sparse --dtype int8``: every pruned Linear a SparseLinearInt8 node, the manifest says
    int8, and the logits stay within the int8 tolerance of the masked fp32 model (and are not exactly them)."""
    import onnx

    from vlsparse.export.exporters import export_onnx
    from vlsparse.runtime.quantize import INT8_LOGIT_TOLERANCE, int8_logit_error
    from vlsparse.runtime.runners import load_runner

    _, mask = int8_export
    out = export_onnx(tiny_model, mask, tmp_path / "onnx-int8", sparse=True, min_sparsity=0.3, dtype="int8")
    assert read_bundle(out).manifest["dtype"] == "int8"
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node if n.domain == "vlsparse"]
    assert ops and set(ops) == {"SparseLinearInt8"}
    inp = tiny_model.example_inputs(batch=3, text_len=9, regions=5, seed=2)
    y8 = load_runner("onnx-sparse", out, dtype="int8").logits({k: v.numpy() for k, v in inp.items()})
    with torch.no_grad():
        ref = masked_copy(tiny_model, mask)(**inp).numpy()
    assert 0 < int8_logit_error(y8, ref) <= INT8_LOGIT_TOLERANCE
    # an fp32 sparse export asked to run as int8 is refused by its file, not run as fp32 under an int8 label
    fp32 = export_onnx(tiny_model, mask, tmp_path / "onnx-fp32", sparse=True, min_sparsity=0.3)
    with pytest.raises(BundleError, match=r"onnx-fp32/model.onnx: holds a fp32 model, so it cannot run as dtype int8"):
        load_runner("onnx-sparse", fp32, dtype="int8")
