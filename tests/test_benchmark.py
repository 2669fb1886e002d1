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


def test_memory_in_a_fresh_process(tiny_run, tiny_task, tmp_path, monkeypatch):
    from vlsparse.bench.levels import Level, export_formats, masked_model
    from vlsparse.bench.memory import measure_memory

    level = Level("imp", 1, tiny_run / "imp" / "level_01" / "ticket.safetensors",
                  tiny_run / "imp" / "level_01" / "weights.safetensors", True)
    net, mask = masked_model("uniter-tiny", level)
    paths = export_formats(net, mask, ["csr"], tmp_path)
    batch = collate([tiny_task.test[i] for i in range(4)])
    shadow = tmp_path / "other-checkout" / "vlsparse"  # another vlsparse in the cwd must not be the one probed
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the shadowing checkout was imported')\n")
    monkeypatch.chdir(shadow.parent)
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


def test_main_job_bench_is_vlsparse_bench_without_spinning_in_a_fresh_process(tmp_path, monkeypatch):
    """main-job's closing bench runs `python -m vlsparse bench ...` as a child; its arguments, given to the real
    `vlsparse bench` command, mean: levels 0 and K of the job's first seed, the questions asked for, 10 rounds,
    RSS delta, this process's threads, and no spinning thread pools."""
    from typer.testing import CliRunner

    import vlsparse.bench.report as report_module
    import vlsparse.bench.run as bench_module
    from vlsparse import cli

    calls, seen = [], {}
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, env: calls.append((cmd, env)) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 0 under torchrun: the child must not join the group
    cli._bench_main_job(tmp_path / "job", tmp_path / "out", 2, 1000, t0=0.0)
    ((cmd, env),) = calls
    assert cmd[:3] == [sys.executable, "-m", "vlsparse"]
    assert env["WORLD_SIZE"] == "1" and env["PATH"] == os.environ["PATH"]

    def fake_bench_run(run, out, settings, levels=None, progress=None):
        seen.update(run=run, out=out, settings=settings, levels=levels)
        return []

    monkeypatch.setattr(bench_module, "bench_run", fake_bench_run)
    monkeypatch.setattr(report_module, "format_summary", lambda rows: "")
    res = CliRunner().invoke(cli.app, cmd[3:])
    assert res.exit_code == 0, res.output
    s = seen["settings"]
    assert (seen["run"], seen["out"], seen["levels"]) == (tmp_path / "job", tmp_path / "out" / "bench", [0, 2])
    assert (s.spin, s.repeats, s.memory, s.max_questions, s.threads) == (False, 10, "delta", 1000, torch.get_num_threads())


def test_main_job_bench_failure_names_the_command_to_rerun(tmp_path):
    from vlsparse import cli

    with pytest.raises(ValueError, match=r"the table stands; rerun it: vlsparse bench --run \S*nope .* --no-spin$"):
        cli._bench_main_job(tmp_path / "nope", tmp_path, 2, 10, t0=0.0)  # the child exits 2: no such run
    assert not (tmp_path / "bench").exists()


# ---------------------------------------------------------------- --dtypes fp32,int8 (issue "Sparse and int8 together")

@pytest.fixture(scope="module")
def int8_report(tiny_run, tiny_task, tmp_path_factory):
    """Level 1 (IMP, trained, 50%; and the random ticket) benched with --dtypes fp32,int8 in every format: the
    report directory, its rows, the runners the bench loaded for IMP level 1 ((format, dtype) -> Runner) and its
    progress lines."""
    import onnx

    import vlsparse.bench.run as bench_module

    out, loaded, msgs = tmp_path_factory.mktemp("report-int8"), {}, []
    real = bench_module.load_format

    def spy(fmt, path, device, dtype, *args, **kwargs):  # keeps the first level's (IMP level 1) runners
        runner = real(fmt, path, device, dtype, *args, **kwargs)
        if fmt in ("onnx", "onnx-sparse"):  # the graph's operators, read while the bench's export still exists
            runner.op_types = {n.op_type for n in onnx.load(str(runner.file)).graph.node}
        loaded.setdefault((fmt, dtype), runner)
        return runner

    settings = Settings(dtypes="fp32,int8", threads=1, batch_sizes=(1, 4), repeats=2, warmup=1, memory="delta")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_module, "load_format", spy)
        rows = bench_run(tiny_run, out, settings, levels=[1], task=tiny_task, progress=msgs.append)
    return out, rows, loaded, msgs


def test_int8_rows_side_by_side(tiny_run, int8_report, tiny_task):
    out, rows, _, _ = int8_report
    pairs = {(r["format"], r["dtype"]) for r in rows}
    assert pairs == {("dense", "fp32"), ("csr", "fp32"), ("onnx", "fp32"), ("onnx-sparse", "fp32"),
                     ("dense", "int8"), ("csr", "int8"), ("onnx", "int8"), ("onnx-sparse", "int8")}
    assert len(rows) == 2 * 8 * 2  # (imp 1, random 1) x 8 models x 2 batch sizes
    by = {(r["method"], r["format"], r["dtype"], r["batch_size"]): r for r in rows}
    for fmt in ("dense", "csr", "onnx", "onnx-sparse"):
        for b in (1, 4):
            r = by["imp", fmt, "int8", b]
            assert r["trained"] and r["questions"] == len(tiny_task.test) and 0 <= r["metric"] <= 1, r
            assert r["median_ms"] > 0 and r["speedup_vs_dense"] > 0 and r["speedup_vs_onnx"] > 0, r
            assert r["memory"] == "rss-delta" and r["model_mem_bytes"] is not None, r
    assert all(by["imp", "dense", "int8", b]["speedup_vs_dense"] == 1.0 for b in (1, 4))  # against its own dtype
    assert all(by["imp", "onnx", "int8", b]["speedup_vs_onnx"] == 1.0 for b in (1, 4))
    summary = (out / "summary.md").read_text()
    for cell in ("| dense int8 |", "| csr int8 |", "| onnx int8 |", "| onnx-sparse int8 |"):
        assert cell in summary


def test_int8_sizes_against_hand_computed(tiny_run, int8_report):
    from safetensors.torch import load_file

    _, rows, loaded, _ = int8_report
    by = {(r["format"], r["dtype"]): r for r in rows if r["method"] == "imp" and r["batch_size"] == 1}
    mask = Ticket.load(tiny_run / "imp" / "level_01" / "ticket.safetensors").mask
    weights = load_file(str(tiny_run / "imp" / "level_01" / "weights.safetensors"))
    # csr int8 on disk: per weight the packed bitmask of its nonzero int8 weights, one byte per nonzero, one
    # fp32 scale per row (max |kept w| / 127, 1 for an empty row) and the int64 (2,) shape
    expect = 0
    for name, m in mask.items():
        w = weights[name] * m
        amax = w.abs().amax(1)
        q = torch.round(w / torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))[:, None])
        expect += (m.numel() + 7) // 8 + int((q != 0).sum()) + 4 * m.shape[0] + 16
    assert by["csr", "int8"]["linear_disk_bytes"] == expect
    assert by["csr", "int8"]["linear_ratio"] < by["csr", "fp32"]["linear_ratio"] / 2
    # onnx int8 (quantize_dynamic, per tensor): per pruned Linear one byte per weight, pruned or not, one int8 zero
    # point and one fp32 scale
    assert by["onnx", "int8"]["linear_disk_bytes"] == sum(m.numel() + 1 + 4 for m in mask.values())
    assert by["onnx", "int8"]["disk_bytes"] < by["onnx", "fp32"]["disk_bytes"]
    # onnx-sparse int8: the same Linears as onnx-sparse fp32, as 1x4 blocks of int8 (1 byte a weight instead of 4,
    # 2 index bytes a block instead of one a nonzero) plus one fp32 scale a row
    assert by["onnx-sparse", "int8"]["linear_disk_bytes"] < by["onnx-sparse", "fp32"]["linear_disk_bytes"]
    # dense int8 is quantised at load: the dense fp32 files on disk; in memory every nn.Linear weight is one byte
    # per weight instead of four (biases stay fp32)
    assert by["dense", "int8"]["disk_bytes"] == by["dense", "fp32"]["disk_bytes"]
    fp32 = loaded["dense", "fp32"].module
    linear_weights = sum(m.weight.numel() for m in fp32.modules() if isinstance(m, torch.nn.Linear))
    assert by["dense", "int8"]["weight_mem_bytes"] == by["dense", "fp32"]["weight_mem_bytes"] - 3 * linear_weights


def test_int8_models_are_quantised(tiny_run, int8_report):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from vlsparse.sparse.int8 import Int8SparseLinear

    _, _, loaded, _ = int8_report
    mask = Ticket.load(tiny_run / "imp" / "level_01" / "ticket.safetensors").mask
    csr = loaded["csr", "int8"].module
    int8_layers = {n for n, m in csr.named_modules() if isinstance(m, Int8SparseLinear)}
    assert int8_layers == {n.removesuffix(".weight") for n in mask}
    assert all(csr.get_submodule(n).backend == "cpu" for n in int8_layers)  # our int8 kernel, no silent fallback
    dense = loaded["dense", "int8"].module
    assert any(isinstance(m, DynamicLinear) for m in dense.modules())
    assert not any(type(m) is torch.nn.Linear for m in dense.modules())
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= loaded["onnx", "int8"].op_types
    assert "MatMulInteger" not in loaded["onnx", "fp32"].op_types
    assert "SparseLinearInt8" in loaded["onnx-sparse", "int8"].op_types  # our int8 op, for the same Linears
    assert "SparseLinear" not in loaded["onnx-sparse", "int8"].op_types
    assert "SparseLinear" in loaded["onnx-sparse", "fp32"].op_types


def test_int8_logits_close_to_fp32(int8_report, tiny_task):
    """Bound: max |int8 logit - fp32 logit| <= INT8_LOGIT_TOLERANCE (10%) of max |fp32 logit| on the test
    questions (quantisation error: vlsparse.runtime.quantize), and > 0 (the model really is quantised)."""
    from vlsparse.runtime.quantize import INT8_LOGIT_TOLERANCE, int8_logit_error

    _, rows, loaded, _ = int8_report
    test = collate([tiny_task.test[i] for i in range(len(tiny_task.test))])
    ref = loaded["dense", "fp32"].logits(test)
    by = {r["format"]: r for r in rows if r["method"] == "imp" and r["dtype"] == "int8" and r["batch_size"] == 1}
    for fmt in ("dense", "onnx", "csr", "onnx-sparse"):
        out = loaded[fmt, "int8"].logits(test)
        assert 0 < int8_logit_error(out, ref) <= INT8_LOGIT_TOLERANCE, fmt
        assert by[fmt]["max_abs_diff"] == pytest.approx(float(abs(out - ref).max()), rel=1e-5)


def test_int8_nothing_is_skipped(int8_report):
    """Every format has an int8 model on the CPU (onnx-sparse int8: vlsparse.SparseLinearInt8), so the bench
    measures all of them and says nothing was left out."""
    out, _, _, msgs = int8_report
    assert not any(m.startswith("skipped") for m in msgs)
    (session,) = json.loads((out / "bench.json").read_text())["sessions"].values()
    assert session["settings"]["skipped"] == []
    assert "Not measured" not in (out / "summary.md").read_text()


def test_cli_int8_on_cuda_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    p = subprocess.run([sys.executable, "-m", "vlsparse.cli", "bench", "--run", str(tmp_path / "empty"), "--dtypes",
                        "int8", "--device", "cuda", "--out", str(tmp_path / "r")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and lines == [
        "error: --dtypes int8 runs on the CPU only (our int8 kernel and the dynamic quantisation of PyTorch and "
        "onnxruntime are CPU kernels); use --device cpu, or --dtypes fp32,fp16"], p.stderr
    assert not (tmp_path / "r").exists()


def test_bad_dtypes_name_the_option(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the dtype is refused before the device
    with pytest.raises(BenchError, match="^--dtypes int8 runs on the CPU only"):
        Settings(dtypes="fp32,int8", device="cuda")
    with pytest.raises(BenchError, match="^--dtypes fp16 needs --device cuda"):
        Settings(dtypes="fp32,fp16")
    with pytest.raises(BenchError, match=r"^--dtypes: unknown dtype 'int4'; choose from fp32, fp16, int8$"):
        Settings(dtypes="fp32,int4")
    assert Settings(dtypes="int8,fp32,int8").dtypes == ("int8", "fp32")
