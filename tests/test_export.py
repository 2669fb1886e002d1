"""Whole-model export: CSR directory and ONNX (dense and sparse custom op) against the masked model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlsparse.export.exporters import export_csr, export_onnx, masked_copy
from vlsparse.runtime.load import ExportError, load_sparse
from vlsparse.sparse.linear import SparseLinear
from vlsparse.pruning.magnitude import global_magnitude_prune
from vlsparse.pruning.mask import ones_mask


@pytest.fixture
def ticket_mask(tiny_model):
    w = dict(tiny_model.named_parameters())
    scope = tiny_model.prune_scope()
    return global_magnitude_prune({n: w[n] for n in scope}, ones_mask(tiny_model, scope), 0.7)


def _inputs(model):
    inp = model.example_inputs(batch=3, text_len=9, regions=5, seed=1)
    inp["attention_mask"][1, 6:] = 0
    inp["img_mask"][2, 3:] = 0
    return inp


@pytest.mark.parametrize("backend", ["cpu", "dense", "torch-sparse"])
@pytest.mark.parametrize("layout,dtype,tol", [("csr", "fp32", 1e-4), ("bitmask", "fp32", 1e-4), ("auto", "fp16", 3e-2)])
def test_csr_export_matches_masked_model(tmp_path, tiny_model, ticket_mask, backend, layout, dtype, tol):
    out = export_csr(tiny_model, ticket_mask, tmp_path / "csr", dtype=dtype, layout=layout)
    sparse = load_sparse(out, backend=backend)
    ref = masked_copy(tiny_model, ticket_mask)
    converted = [n for n, m in sparse.named_modules() if isinstance(m, SparseLinear)]
    assert sorted(n + ".weight" for n in converted) == sorted(ticket_mask)
    inp = _inputs(tiny_model)
    with torch.no_grad():
        diff = (sparse(**inp) - ref(**inp)).abs().max().item()
    assert diff <= tol


def test_csr_arrays_equal_scipy_of_the_mask(tmp_path, tiny_model, ticket_mask):
    import scipy.sparse as sp

    out = export_csr(tiny_model, ticket_mask, tmp_path / "csr", layout="csr")
    t = load_file(str(out / "model.safetensors"))
    name = "uniter.encoder.layer.1.intermediate.dense.weight"
    dense = (tiny_model.get_parameter(name).detach() * ticket_mask[name]).numpy()
    ref = sp.csr_matrix(dense)
    assert np.array_equal(t[name + ".crow_indices"].numpy(), ref.indptr)
    assert np.array_equal(t[name + ".col_indices"].numpy(), ref.indices)
    assert t[name + ".col_indices"].dtype == torch.int16
    np.testing.assert_array_equal(t[name + ".values"].numpy(), ref.data)
    assert name not in t  # no dense copy of a pruned weight


def test_csr_storage_at_70_percent(tmp_path, tiny_model, ticket_mask):
    out = export_csr(tiny_model, ticket_mask, tmp_path / "csr", layout="auto")
    t = load_file(str(out / "model.safetensors"))
    sparse_bytes = sum(v.numel() * v.element_size() for k, v in t.items() if k.rsplit(".", 1)[0] in ticket_mask)
    dense_bytes = sum(m.numel() * 4 for m in ticket_mask.values())
    assert sparse_bytes <= 0.35 * dense_bytes  # bitmask + fp32 values: 1/32 + 0.3 = 0.33


@pytest.mark.parametrize("sparse", [False, True])
def test_onnx_export_matches_masked_model(tmp_path, tiny_model, ticket_mask, sparse):
    import onnx
    import onnxruntime as ort

    from vlsparse.runtime.ort import ort_session

    out = export_onnx(tiny_model, ticket_mask, tmp_path / "onnx", sparse=sparse)
    path = str(out / "model.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("SparseLinear") == (len(ticket_mask) if sparse else 0)
    session = ort_session(path) if sparse else ort.InferenceSession(path)
    ref = masked_copy(tiny_model, ticket_mask)
    for batch, text, regions in ((3, 9, 5), (1, 4, 2)):  # dynamic batch, text and region sizes
        inp = tiny_model.example_inputs(batch=batch, text_len=text, regions=regions, seed=2)
        got = session.run(None, {k: v.numpy() for k, v in inp.items()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, ref(**inp).numpy(), atol=1e-4, rtol=0)


def test_export_refuses_mismatched_ticket_and_existing_dir(tmp_path, tiny_model, ticket_mask):
    bad = dict(ticket_mask)
    name = next(iter(bad))
    bad[name] = bad[name][:, :-1]
    with pytest.raises(ExportError, match="shape"):
        export_csr(tiny_model, bad, tmp_path / "x")
    with pytest.raises(ExportError, match="prune scope"):
        export_onnx(tiny_model, {name: ticket_mask[name]}, tmp_path / "y")
    assert list(tmp_path.iterdir()) == []  # no partial output
    (tmp_path / "z").mkdir()
    with pytest.raises(ExportError, match="exists"):
        export_csr(tiny_model, ticket_mask, tmp_path / "z")


def test_corrupt_csr_directory(tmp_path, tiny_model, ticket_mask):
    out = export_csr(tiny_model, ticket_mask, tmp_path / "csr", layout="csr")
    t = load_file(str(out / "model.safetensors"))
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    name = "uniter.encoder.layer.0.output.dense.weight"
    cases = {"col_indices": lambda v: torch.where(v == v.max(), torch.tensor(999, dtype=v.dtype), v),
             "crow_indices": lambda v: v.flip(0),
             "values": lambda v: v[:-3]}
    for part, corrupt in cases.items():
        bad = dict(t)
        bad[f"{name}.{part}"] = corrupt(bad[f"{name}.{part}"]).contiguous()
        save_file(bad, str(out / "model.safetensors"), metadata=meta)
        with pytest.raises(ExportError, match=name):
            load_sparse(out)
    (out / "config.json").unlink()
    with pytest.raises(ExportError, match="config.json"):
        load_sparse(out)


def test_cli_export_roundtrip(tmp_path, tiny_model, ticket_mask, tiny_task):
    import subprocess
    import sys

    from vlsparse.data import save_task_info
    from vlsparse.pruning.ticket import Ticket

    save_task_info(tiny_task, tmp_path / "task.json")
    Ticket(ticket_mask, {"model": "uniter-tiny"}).save(tmp_path / "t.safetensors")
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    args = [sys.executable, "-m", "vlsparse.cli", "export", "--ticket", str(tmp_path / "t.safetensors"),
            "--weights", str(tmp_path / "w.safetensors"), "--model", "uniter-tiny", "--out", str(tmp_path / "e")]
    p = subprocess.run(args + ["--format", "csr"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    inp = _inputs(tiny_model)
    with torch.no_grad():
        diff = (load_sparse(tmp_path / "e")(**inp) - masked_copy(tiny_model, ticket_mask)(**inp)).abs().max()
    assert diff <= 1e-4
    p = subprocess.run(args[:-1] + [str(tmp_path / "f"), "--format", "parquet"], capture_output=True, text=True)
    assert p.returncode == 2 and "--format" in p.stderr and not (tmp_path / "f").exists()


def test_export_is_readable_by_other_users(tmp_path, tiny_model, ticket_mask):
    import os

    old = os.umask(0o022)
    try:
        out = export_csr(tiny_model, ticket_mask, tmp_path / "csr")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir())  # not mkstemp's 0600


def test_load_sparse_builds_no_dense_weights(tmp_path, tiny_model, ticket_mask):
    """The model is built with parameters on meta (no storage; non-persistent buffers on the CPU as the
    model makes them); every loaded parameter is the file's tensor; a file lacking one is refused."""
    import json

    from vlsparse.models.registry import model_from_config
    from vlsparse.runtime.load import parameters_on_meta

    out = export_csr(tiny_model, ticket_mask, tmp_path / "csr")
    with parameters_on_meta():
        empty = model_from_config(json.loads((out / "config.json").read_text()))
    assert all(p.is_meta for p in empty.parameters())
    ref_buffers = dict(tiny_model.named_buffers())
    for name, buf in empty.named_buffers():
        assert not buf.is_meta and torch.equal(buf, ref_buffers[name])
    model = load_sparse(out)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    state = load_file(str(out / "model.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name])
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    del state["uniter.embeddings.LayerNorm.weight"]
    save_file(state, str(out / "model.safetensors"), metadata=meta)
    with pytest.raises(ExportError, match="lacks uniter.embeddings.LayerNorm.weight"):
        load_sparse(out)
