"""export --autotune: per-layer dense / sparse choice from (injected) timings, recorded, checked and loaded."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vlsparse.data import save_task_info
from vlsparse.export.autotune import autotune, parse_tokens
from vlsparse.export.exporters import export_csr, export_onnx, masked_copy
from vlsparse.pruning.magnitude import global_magnitude_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.pruning.ticket import Ticket
from vlsparse.runtime.bundle import read_bundle
from vlsparse.runtime.checks import BundleError
from vlsparse.runtime.load import ExportError, load_sparse
from vlsparse.runtime.ort import OP_TYPE, ort_session
from vlsparse.sparse.linear import SparseLinear

# fake medians (dense, csr) in seconds per token count; "key" layers: csr faster at T = 1 only, mean ratio > 1
FAKE = {"query": {1: (1.0, 2.0), 4: (1.0, 2.0)}, "key": {1: (2.0, 1.0), 4: (1.0, 1.6)},
        "intermediate": {1: (1.0, 1.5), 4: (1.0, 1.5)}}
DENSE_PARTS = ("query", "key", "intermediate")  # what FAKE makes dense; every other layer: csr 2x faster


@pytest.fixture
def mask(tiny_model):
    scope = tiny_model.prune_scope()
    return global_magnitude_prune(dict(tiny_model.named_parameters()), ones_mask(tiny_model, scope), 0.7)


def _fake_timer(calls: list):
    """Calls each format once (their outputs must agree) and returns fixed times: no clock involved."""
    def timer(name, tokens, fns):
        outs = {fmt: fn() for fmt, fn in fns.items()}
        assert outs["csr"].shape == (tokens, outs["dense"].shape[1])
        torch.testing.assert_close(outs["csr"], outs["dense"], atol=1e-4, rtol=0)
        calls.append((name, tokens))
        part = next((p for p in FAKE if f".{p}." in name), None)
        dense, csr = FAKE[part][tokens] if part else (2.0, 1.0)
        return {"dense": [dense, dense * 3, dense], "csr": [csr, csr, csr * 5]}  # medians: dense, csr
    return timer


def _inputs(model):
    return model.example_inputs(batch=3, text_len=9, regions=5, seed=1)


def _dense_chosen(record) -> set[str]:
    return {n for n, e in record["layers"].items() if e["choice"] == "dense"}


def test_choice_record_and_mixed_csr_bundle(tmp_path, tiny_model, mask, tiny_task, tokenizer):
    calls = []
    record = autotune(tiny_model, mask, tokens=(1, 4), timer=_fake_timer(calls))
    assert sorted(calls) == sorted((n, t) for n in mask for t in (1, 4))
    assert _dense_chosen(record) == {n for n in mask if any(f".{p}." in n for p in DENSE_PARTS)}
    entry = record["layers"]["uniter.encoder.layer.0.attention.self.key.weight"]
    assert entry["median_ms"] == {"dense": {"1": 2000.0, "4": 1000.0}, "csr": {"1": 1000.0, "4": 1600.0}}
    assert entry["shape"] == [64, 64] and abs(entry["sparsity"] - float(1 - mask[
        "uniter.encoder.layer.0.attention.self.key.weight"].float().mean())) < 1e-6
    assert record["tokens"] == [1, 4] and record["threads"] == torch.get_num_threads()

    out = export_csr(tiny_model, mask, tmp_path / "b", layout="bitmask", tuned=json.loads(json.dumps(record)))
    stored = json.loads((out / "autotune.json").read_text())
    assert read_bundle(out).has("autotune.json")
    assert {e["choice"] for e in stored["layers"].values()} == {"dense", "bitmask"}
    assert _dense_chosen(stored) == _dense_chosen(record)
    model = load_sparse(out)
    sparse = {n + ".weight" for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert sparse == set(mask) - _dense_chosen(record)
    assert isinstance(model.get_submodule("uniter.encoder.layer.1.attention.self.query"), torch.nn.Linear)
    with torch.no_grad():
        inp = _inputs(tiny_model)
        diff = (model(**inp) - masked_copy(tiny_model, mask)(**inp)).abs().max().item()
    assert diff <= 1e-4


def test_onnx_sparse_bundle_keeps_dense_choices_dense(tmp_path, tiny_model, mask):
    record = autotune(tiny_model, mask, tokens=(1, 4), timer=_fake_timer([]))
    out = export_onnx(tiny_model, mask, tmp_path / "o", sparse=True, tuned=record)
    import onnx

    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count(OP_TYPE) == len(mask) - len(_dense_chosen(record))
    inp = _inputs(tiny_model)
    with torch.no_grad():
        ref = masked_copy(tiny_model, mask)(**inp).numpy()
    got = ort_session(out / "model.onnx").run(None, {k: v.numpy() for k, v in inp.items()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    from vlsparse.runtime.runners import load_runner

    (out / "autotune.json").write_text('{"format": "vlsparse-autotune-1", "layers": {"x": {"choice": "fast"}}}')
    with pytest.raises(BundleError, match=r"autotune.json: layer 'x': choice must be one of dense, csr, bitmask"):
        load_runner("onnx-sparse", out)


def test_record_that_does_not_match_the_model_file_is_refused(tmp_path, tiny_model, mask):
    record = autotune(tiny_model, mask, tokens=(1, 4), timer=_fake_timer([]))
    out = export_csr(tiny_model, mask, tmp_path / "c", tuned=record)
    f = out / "autotune.json"
    good = json.loads(f.read_text())
    name = sorted(_dense_chosen(good))[0]
    for change, message in [(dict(choice="csr"), "recorded as 'csr' but stored as dense"),
                            (dict(shape=[3, 4]), "not a Linear weight of that shape")]:
        bad = json.loads(json.dumps(good))
        bad["layers"][name].update(change)
        f.write_text(json.dumps(bad))
        with pytest.raises(ExportError, match=f"autotune.json: layer '{name}' .*{message}"):
            load_sparse(out)
    f.write_text("{not json")
    with pytest.raises(BundleError, match="autotune.json: unreadable JSON"):
        load_sparse(out)
    with pytest.raises(BundleError, match="checksum"):
        read_bundle(out)


def test_real_timing_and_the_cli(tmp_path, tiny_model, mask, tiny_task):
    """The default timer and `vlsparse export --autotune` end to end (no assertion on which format wins)."""
    from typer.testing import CliRunner

    from vlsparse.cli import app

    assert parse_tokens("1,40,200") == (1, 40, 200)
    for bad in ("", "1,x", "0", "1," * 17):
        with pytest.raises(ValueError, match="--tokens"):
            parse_tokens(bad)
    save_task_info(tiny_task, tmp_path / "task.json")
    Ticket(mask, {"model": "uniter-tiny"}).save(tmp_path / "t.safetensors")
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    args = ["export", "--ticket", str(tmp_path / "t.safetensors"), "--weights", str(tmp_path / "w.safetensors"),
            "--model", "uniter-tiny", "--autotune"]
    r = CliRunner().invoke(app, [*args, "--tokens", "1,x", "--out", str(tmp_path / "bad")])
    assert isinstance(r.exception, ValueError) and "--tokens" in str(r.exception) and not (tmp_path / "bad").exists()
    r = CliRunner().invoke(app, [*args, "--tokens", "1,3", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "e" / "autotune.json").read_text())
    assert set(record["layers"]) == set(mask) and record["tokens"] == [1, 3] and record["repeats"] == 20
    for entry in record["layers"].values():
        ms = entry["median_ms"]
        assert set(ms) == {"dense", "csr"} and all(v > 0 for f in ms.values() for v in f.values())
        ratio = statistics.mean(ms["csr"][k] / ms["dense"][k] for k in ms["dense"])
        assert entry["choice"] == ("dense" if ratio >= 1 else "csr") or entry["choice"] == "bitmask" and ratio < 1
    inp = _inputs(tiny_model)
    with torch.no_grad():
        diff = (load_sparse(tmp_path / "e")(**inp) - masked_copy(tiny_model, mask)(**inp)).abs().max().item()
    assert diff <= 1e-4
