"""Export bundles: every file listed in the manifest with its sha256, corruption refused with one line
naming the file, and the `vlsparse export` command writing task info, tokenizer and ticket metadata."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from vlsparse import __version__
from vlsparse.data import task_info
from vlsparse.runtime.bundle import BundleError, BundleExtras, read_bundle, ticket_metadata
from vlsparse.export.exporters import export_csr, export_onnx
from vlsparse.pruning.magnitude import global_magnitude_prune
from vlsparse.pruning.mask import ones_mask, sparsity
from vlsparse.pruning.ticket import Ticket


@pytest.fixture
def mask(tiny_model):
    return global_magnitude_prune(dict(tiny_model.named_parameters()), ones_mask(tiny_model, tiny_model.prune_scope()),
                                  0.6)


@pytest.fixture
def extras(tiny_task, tokenizer):
    return BundleExtras(task_info(tiny_task), tokenizer, ticket_metadata({"model": "uniter-tiny", "method": "imp",
                                                                         "val_metric": '{"vqa_score": 0.5}'}, 0.6))


@pytest.fixture
def csr_bundle(tmp_path, tiny_model, mask, extras):
    return export_csr(tiny_model, mask, tmp_path / "csr", bundle_extras=extras)


def one_line_error(fn, *fragments):
    with pytest.raises(BundleError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.mark.parametrize("kind", ["csr", "onnx", "onnx-sparse"])
def test_manifest_lists_every_file_with_its_sha256(tmp_path, tiny_model, mask, extras, tiny_task, kind):
    out = tmp_path / kind
    if kind == "csr":
        export_csr(tiny_model, mask, out, bundle_extras=extras)
    else:
        export_onnx(tiny_model, mask, out, sparse=kind == "onnx-sparse", bundle_extras=extras)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "vlsparse-bundle-1" and manifest["kind"] == kind
    assert manifest["vlsparse_version"] == __version__
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"config.json", "task.json", "ticket.json", "tokenizer.json",
            *(["model.safetensors"] if kind == "csr" else ["model.onnx", "model.onnx.data"])} <= on_disk
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    b = read_bundle(out)
    assert b.kind == kind and b.task == json.loads(json.dumps(task_info(tiny_task)))
    assert b.ticket["sparsity"] == 0.6 and b.ticket["val_metric"] == {"vqa_score": 0.5} and b.ticket["method"] == "imp"
    assert b.config["num_answers"] == len(tiny_task.answers)


def test_missing_file(csr_bundle):
    (csr_bundle / "tokenizer.json").unlink()
    one_line_error(lambda: read_bundle(csr_bundle), "tokenizer.json", "missing")


@pytest.mark.parametrize("name", ["model.safetensors", "task.json", "config.json"])
def test_altered_file(csr_bundle, name):
    f = csr_bundle / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, same size
    f.write_bytes(bytes(data))
    one_line_error(lambda: read_bundle(csr_bundle), name, "checksum mismatch")


def test_onnx_weights_are_external_data_and_checked(tmp_path, tiny_model, mask, extras):
    out = export_onnx(tiny_model, mask, tmp_path / "onnx", sparse=True, bundle_extras=extras)
    graph, data = out / "model.onnx", out / "model.onnx.data"
    # the weights live in the data file (onnxruntime maps it), the graph file holds none of them
    assert data.stat().st_size > 20 * graph.stat().st_size
    read_bundle(out)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    one_line_error(lambda: read_bundle(out), "model.onnx.data", "checksum mismatch")


def test_manifest_from_a_newer_version_or_another_format(csr_bundle):
    mpath = csr_bundle / "manifest.json"
    good = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**good, "vlsparse_version": "0.10.0"}))
    one_line_error(lambda: read_bundle(csr_bundle), "manifest.json", "0.10.0", "newer", __version__)
    mpath.write_text(json.dumps({**good, "format": "something-else"}))
    one_line_error(lambda: read_bundle(csr_bundle), "manifest.json", "something-else")
    mpath.write_text("{not json")
    one_line_error(lambda: read_bundle(csr_bundle), "manifest.json", "unreadable")
    mpath.unlink()
    one_line_error(lambda: read_bundle(csr_bundle), "manifest.json", "not a vlsparse bundle")
    with pytest.raises(FileNotFoundError, match="nope"):
        read_bundle(csr_bundle / "nope")


def test_task_info_that_does_not_fit_leaves_nothing(tmp_path, tiny_model, mask, tiny_task, tokenizer):
    info = task_info(tiny_task)
    bad = BundleExtras({**info, "answers": info["answers"][:-1]}, tokenizer)
    one_line_error(lambda: export_csr(tiny_model, mask, tmp_path / "x", bundle_extras=bad), "answers", "head")
    bad = BundleExtras({**info, "region_feature_dim": 99}, tokenizer)
    one_line_error(lambda: export_onnx(tiny_model, mask, tmp_path / "x", bundle_extras=bad), "99")
    assert list(tmp_path.iterdir()) == []  # no partial export, not even the temporary directory


def test_export_without_extras_still_has_a_manifest(tmp_path, tiny_model, mask):
    out = export_csr(tiny_model, mask, tmp_path / "plain")
    b = read_bundle(out)
    assert set(b.manifest["files"]) == {"config.json", "model.safetensors"} and b.task == {} and b.ticket == {}


def cli(*args):
    """The CLI in-process (typer's runner): exit code, output and the exception raised."""
    from typer.testing import CliRunner

    from vlsparse.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_export_finds_task_json_beside_the_weights(tmp_path, tiny_model, mask, tiny_task):
    run = tmp_path / "run"
    level = run / "level_01"
    level.mkdir(parents=True)
    Ticket(mask, {"model": "uniter-tiny", "task": "tiny", "method": "imp"}).save(level / "ticket.safetensors")
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(level / "weights.safetensors"))
    (level / "metrics.json").write_text(json.dumps({"test": {"vqa_score": 0.75}}))
    args = ["export", "--ticket", str(level / "ticket.safetensors"), "--weights", str(level / "weights.safetensors"),
            "--model", "uniter-tiny", "--format", "csr"]

    # RUN/task.json is missing: one line on stderr, exit 2 (a real process, as users see it)
    p = subprocess.run([sys.executable, "-m", "vlsparse.cli", *args, "--out", str(tmp_path / "e1")],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=600)
    assert p.returncode == 2 and p.stderr.startswith("error: no task.json") and "--task-info" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "e1").exists()

    info = task_info(tiny_task)
    (run / "task.json").write_text(json.dumps(info))  # RUN/task.json, as find-ticket writes it
    r = cli(*args, "--out", str(tmp_path / "e1"))
    assert r.exit_code == 0, r.output
    b = read_bundle(tmp_path / "e1")
    assert b.task == info and b.has("tokenizer.json")
    assert b.ticket["task"] == "tiny" and b.ticket["metrics"] == {"test": {"vqa_score": 0.75}}
    assert b.ticket["sparsity"] == sparsity(mask)

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**info, "answers": info["answers"][::-1]}))
    r = cli(*args, "--format", "onnx", "--sparse", "--task-info", str(other), "--out", str(tmp_path / "e2"))
    assert r.exit_code == 0, r.output
    assert read_bundle(tmp_path / "e2").kind == "onnx-sparse"
    assert read_bundle(tmp_path / "e2").task["answers"] == info["answers"][::-1]
    r = cli(*args, "--task-info", str(tmp_path / "missing.json"), "--out", str(tmp_path / "e3"))
    assert isinstance(r.exception, FileNotFoundError) and "missing.json" in str(r.exception)
