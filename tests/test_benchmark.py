"""vlsparse.bench / `vlsparse bench`: a uniter-tiny run benchmarked in every format.

The references are independent of the benchmark code: the run's own metrics.json (written by IMP's
evaluate on the trained model), the dense fp32 size of the pruned weights, hand-computed CSR/bitmask
sizes, and the ticket's sparsity. No timing is asserted (only that times are positive).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vlsparse.bench import BenchError
from vlsparse.bench.report import COLUMNS, read_rows
from vlsparse.bench.run import Settings, bench_run
from vlsparse.data import collate
from vlsparse.models import load_model
from vlsparse.lottery.imp import IMPConfig, run_imp
from vlsparse.pruning.magnitude import random_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.loop import TrainConfig

from .conftest import ANSWERS, IMG_DIM

pytest.importorskip("onnxruntime")

PNGS = ("metric_vs_sparsity.png", "metric_vs_latency.png", "size_vs_sparsity.png")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_task):
    """A main-job-shaped OUT: OUT/imp (levels 0 and 1 at 50%, trained) and OUT/random/level_01
    (a random ticket at the same sparsity, not trained: θ0 under the mask)."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("run")
    model = load_model("uniter-tiny", img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=0)[0]
    cfg = IMPConfig(model="uniter-tiny", task="tiny", levels=[0.5], train=TrainConfig(steps=3, batch_size=8, warmup=1))
    run_imp(out / "imp", model, tiny_task, collate, cfg)
    mask = random_prune(ones_mask(model, model.prune_scope()), 0.5, seed=1)
    Ticket(mask, {"model": "uniter-tiny", "method": "random"}).save(out / "random" / "level_01" / "ticket.safetensors")
    return out


@pytest.fixture(scope="module")
def report(tiny_run, tiny_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rows = bench_run(tiny_run, out, Settings(threads=1, batch_sizes=(1, 4), repeats=2, warmup=1, memory="delta"),
                     task=tiny_task)
    return out, rows


def test_report_files_and_rows(tiny_run, report):
    out, rows = report
    # 3 models (imp 0, imp 1, random 1) x 4 formats x 2 batch sizes
    assert len(rows) == 24
    assert read_rows(out / "bench.csv") == rows
    header = (out / "bench.csv").read_text().splitlines()[0]
    assert header == ",".join(COLUMNS)
    js = json.loads((out / "bench.json").read_text())
    (session,) = js["sessions"].values()
    machine = session["machine"]
    for key in ("cpu_model", "logical_cpus", "threads", "torch", "onnxruntime", "load_avg_start", "load_avg_end"):
        assert machine[key] is not None, key
    assert machine["threads"] == 1 and machine["torch"] == torch.__version__
    assert len(js["rows"]) == 24
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "| imp | 1 | 50.0% | onnx-sparse |" in (out / "summary.md").read_text()
    for r in rows:
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["tokens_per_s"] > 0
        assert r["threads"] == 1 and r["device"] == "cpu" and r["dtype"] == "fp32"
        assert r["memory"] == "rss-delta" and r["model_mem_bytes"] is not None and r["peak_mem_bytes"] is None
        if r["format"] == "dense":
            assert r["speedup_vs_dense"] == 1.0


def test_every_format_predicts_like_the_masked_model(tiny_run, report, tiny_task):
    _, rows = report
    for r in rows:
        assert r["questions"] == len(tiny_task.test)
        assert r["same_pred"] == 1.0, r
        assert r["max_abs_diff"] <= 1e-4, r
    # trained levels: the metric equals the one IMP recorded for the trained model (metrics.json)
    for k in (0, 1):
        recorded = json.loads((tiny_run / "imp" / f"level_{k:02d}" / "metrics.json").read_text())["test"]["vqa_score"]
        for r in rows:
            if r["method"] == "imp" and r["level"] == k:
                assert r["trained"] and r["metric"] == pytest.approx(recorded, abs=1e-6)
                assert r["run_metric"] == pytest.approx(recorded)
    untrained = [r for r in rows if r["method"] == "random"]
    assert untrained and all(not r["trained"] and r["metric"] is None for r in untrained)


def test_sizes_against_hand_computed(tiny_run, report):
    _, rows = report
    model = load_model("uniter-tiny", img_dim=IMG_DIM, num_answers=len(ANSWERS))[0]
    scope = dict(model.named_parameters())
    dense_bytes = sum(scope[n].numel() * 4 for n in model.prune_scope())  # 65,536 weights
    assert dense_bytes == 65536 * 4
    mask = Ticket.load(tiny_run / "imp" / "level_01" / "ticket.safetensors").mask
    # per weight the smaller of CSR (int32 rows, int16 cols, fp32 values) and bitmask (bits + fp32 values),
    # plus its int64 (2,) shape tensor
    expect = 0
    for m in mask.values():
        nnz, rows_, n = int(m.sum()), m.shape[0], m.numel()
        expect += min(4 * (rows_ + 1) + 2 * nnz + 4 * nnz, (n + 7) // 8 + 4 * nnz) + 16
    by = {(r["method"], r["level"], r["format"]): r for r in rows if r["batch_size"] == 1}
    for k in (0, 1):
        assert by["imp", k, "dense"]["linear_disk_bytes"] == dense_bytes
        assert by["imp", k, "onnx"]["linear_disk_bytes"] == dense_bytes
    assert by["imp", 1, "csr"]["linear_disk_bytes"] == expect
    assert by["imp", 1, "csr"]["linear_ratio"] == pytest.approx(expect / dense_bytes)
    assert by["imp", 1, "dense"]["sparsity"] == pytest.approx(Ticket.load(
        tiny_run / "imp" / "level_01" / "ticket.safetensors").sparsity, abs=1e-6)
    # onnx-sparse converts the Linears with >= 50% zeros into CSR: smaller than dense, never larger
    assert by["imp", 1, "onnx-sparse"]["linear_disk_bytes"] < dense_bytes
    assert by["imp", 0, "onnx-sparse"]["linear_disk_bytes"] == dense_bytes  # nothing to convert at level 0
    for r in by.values():
        assert r["disk_bytes"] > r["linear_disk_bytes"] > 0 and r["weight_mem_bytes"] > 0


def test_resume_keeps_measured_rows(tiny_run, tiny_task, tmp_path):
    seen = []

    def stop_at_second_level(msg):
        seen.append(msg)
        if msg.startswith("imp level 1"):
            raise KeyboardInterrupt

    settings = Settings(formats="dense,csr", threads=1, batch_sizes=(2,), repeats=1, warmup=0, memory="off")
    kw = dict(task=tiny_task)
    with pytest.raises(KeyboardInterrupt):
        bench_run(tiny_run, tmp_path, settings, progress=stop_at_second_level, **kw)
    first = read_rows(tmp_path / "bench.csv")
    assert [(r["level"], r["format"]) for r in first] == [(0, "dense"), (0, "csr")]
    msgs = []
    rows = bench_run(tiny_run, tmp_path, settings, progress=msgs.append, **kw)
    assert rows[:2] == first  # kept as measured, not re-measured
    assert not any(m.startswith("imp level 0") for m in msgs)
    assert len(rows) == 6 and len({r["session"] for r in rows}) == 2
    assert len(json.loads((tmp_path / "bench.json").read_text())["sessions"]) == 2
    # nothing left to do: the report stays as it is
    assert bench_run(tiny_run, tmp_path, settings, **kw) == rows


def test_memory_in_a_fresh_process(tiny_run, tiny_task, tmp_path):
    from vlsparse.bench.levels import Level, export_formats, masked_model
    from vlsparse.bench.memory import measure_memory

    level = Level("imp", 1, tiny_run / "imp" / "level_01" / "ticket.safetensors",
                  tiny_run / "imp" / "level_01" / "weights.safetensors", True)
    net, mask = masked_model("uniter-tiny", level)
    paths = export_formats(net, mask, ["csr"], tmp_path)
    batch = collate([tiny_task.test[i] for i in range(4)])
    m = measure_memory("csr", paths["csr"], batch, "cpu", "fp32", 1, "subprocess")
    assert m["memory"] == "rss-subprocess"
    # a process with torch and onnxruntime imported holds well over 50 MB; the tiny model adds a little
    assert m["peak_mem_bytes"] > 50 * 2**20 and 0 < m["model_mem_bytes"] < m["peak_mem_bytes"]
    assert 50 * 2**20 < m["steady_mem_bytes"] <= m["peak_mem_bytes"]
    assert measure_memory("csr", paths["csr"], batch, "cpu", "fp32", 1, "off") == {
        "peak_mem_bytes": None, "model_mem_bytes": None, "steady_mem_bytes": None, "memory": None}


def test_bad_input(tmp_path, tiny_run, tiny_task, monkeypatch):
    out = tmp_path / "report"
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="no levels to benchmark"):
        bench_run(tmp_path / "empty", out, Settings(), task=tiny_task)
    with pytest.raises(FileNotFoundError, match="nope"):
        bench_run(tmp_path / "nope", out, Settings(), task=tiny_task)
    with pytest.raises(BenchError, match="unknown format 'tensorrt'; choose from dense, csr, onnx, onnx-sparse"):
        bench_run(tiny_run, out, Settings(formats="dense,tensorrt"), task=tiny_task)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BenchError, match="--device cuda: no CUDA GPU"):
        bench_run(tiny_run, out, Settings(device="cuda"), task=tiny_task)
    with pytest.raises(BenchError, match="--batch-sizes"):
        bench_run(tiny_run, out, Settings(batch_sizes="1,x"), task=tiny_task)
    with pytest.raises(BenchError, match="no levels to benchmark among --levels 7"):
        bench_run(tiny_run, out, Settings(), levels=[7], task=tiny_task)
    assert not out.exists()


def test_cli_error_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    p = subprocess.run([sys.executable, "-m", "vlsparse.cli", "bench", "--run", str(tmp_path / "empty"),
                        "--formats", "csr,tflite", "--out", str(tmp_path / "r")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0] == "error: --formats: unknown format 'tflite'; choose from dense, csr, onnx, onnx-sparse"
    assert not (tmp_path / "r").exists()
