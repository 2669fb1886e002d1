"""Issue 17, item 6 (fault test): each command that writes files, killed with SIGKILL during a file write and run
again, ends in the same files as an uninterrupted run, with no temporary file left.

- find-ticket (uniter-tiny, the tiny task, 3 steps per level) is forked; the child kills itself with SIGKILL right
  after the k-th atomic write has written its temporary file and before it is renamed into place (three kill
  points, to keep the test short: theta0, a level's weights, the next level's ticket).
- train-ticket: killed in each of its three writes (weights, metrics.json, task.json), re-run: the same files.
- bench: killed in each of its atomic writes of the first level and in the last one (the plots); re-run: the rows
  written before the kill are kept as measured (not re-measured), the rest are measured, every row of an
  uninterrupted bench is there with the same quality columns (latencies differ from run to run), and the report
  files are all present.
- export: killed while writing its bundle (after the weights file is written into its temporary directory, and
  just before the directory is renamed into place), re-run: the bundle's files hash as an uninterrupted export's,
  and no ``.NAME.tmp-*`` directory or lock file is left."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import pytest
import torch

from vlsparse.atomic import save_weights
from vlsparse.bench.report import KEY, read_rows
from vlsparse.bench.run import Settings, bench_run
from vlsparse.data import collate, task_info
from vlsparse.export.bundle_export import export_bundle
from vlsparse.lottery.imp import IMPConfig, run_imp
from vlsparse.lottery import retrain
from vlsparse.lottery.runs import TASK_INFO
from vlsparse.models import load_model
from vlsparse.pruning.magnitude import global_magnitude_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.loop import TrainConfig

from .conftest import ANSWERS, IMG_DIM

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


@pytest.fixture(autouse=True)
def _threads():
    """One thread in this process, as in the forked children: the same float sums, so the same bits (overrides
    conftest's two threads)."""
    torch.set_num_threads(1)


def _cfg():
    return IMPConfig(model="uniter-tiny", task="tiny", levels=[0.5], train=TrainConfig(steps=3, batch_size=8, warmup=1))


def _run(path, task):
    model = load_model("uniter-tiny", img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=0)[0]
    return run_imp(path, model, task, collate, _cfg())


def _patch_atomic_writes(after_write) -> None:
    """Make every module's ``atomic_write`` call ``after_write()`` once a temporary file is written, before the
    rename into place."""
    import vlsparse.atomic as atomic

    original = atomic.atomic_write

    def patched(target, write):
        def write_then(tmp):
            write(tmp)
            after_write()

        return original(target, write_then)

    for module in list(sys.modules.values()):
        if getattr(module, "atomic_write", None) is original:
            module.atomic_write = patched


def _count_writes(command) -> int:
    """How many atomic writes ``command()`` makes, counted in a forked child (this process stays unpatched)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            _patch_atomic_writes(lambda: os.write(w, b"."))
            torch.set_num_threads(1)
            command()
        finally:
            os._exit(0)
    os.close(w)
    count = 0
    while chunk := os.read(r, 4096):
        count += len(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return count


def _killed_at(k: int, command) -> None:
    """Fork; the child runs ``command()`` and SIGKILLs itself inside the k-th atomic write."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            count = [0]

            def die_at_k():
                count[0] += 1
                if count[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)

            _patch_atomic_writes(die_at_k)
            torch.set_num_threads(1)
            command()
        finally:
            os._exit(3)  # not killed: k was beyond the last write
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _contents(p):
    """What a file holds: safetensors as (header metadata, tensors' bytes) -- the header's key order varies from
    process to process --, JSON without wall-clock timings, anything else as bytes."""
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
    if p.suffix == ".json":
        return {k: v for k, v in json.loads(p.read_text()).items() if not k.endswith("_seconds")}
    return p.read_bytes()


def _files(path):
    return {p.relative_to(path).as_posix(): _contents(p) for p in sorted(path.rglob("*")) if p.is_file()
            and p.name != ".vlsparse.lock"}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_task):
    """An uninterrupted find-ticket run (levels 0 and 1), with one thread as the forked children."""
    torch.set_num_threads(1)  # set up before the function-scoped _threads
    path = tmp_path_factory.mktemp("clean")
    _run(path, tiny_task)
    return path


def _no_temporaries(path):
    return not [p for p in path.rglob("*") if ".tmp" in p.name]


def test_sigkill_during_each_write_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_task, clean_run):
    expected = _files(clean_run)
    for k in (2, 4, 7):  # theta0.safetensors, level 0's weights, level 1's ticket
        run = tmp_path / f"killed-{k}"
        _killed_at(k, lambda: _run(run, tiny_task))
        assert any(".tmp" in p.name for p in run.rglob("*")), "the kill left no temporary file behind"
        _run(run, tiny_task)
        assert _files(run) == expected, k
        assert _no_temporaries(run)


def test_sigkill_during_each_train_ticket_write_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_task,
                                                                                      clean_run, monkeypatch):
    # vlsparse train-ticket itself, with the tiny task and model in place of those it would load by name
    monkeypatch.setattr(retrain, "setup", lambda *a: (
        load_model("uniter-tiny", img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=0)[0], tiny_task, collate))

    def train_ticket(out):
        return lambda: retrain.train_ticket(clean_run / "level_01" / "ticket.safetensors", out, "uniter-tiny", "tiny",
                                            _cfg().train)

    train_ticket(tmp_path / "clean")()
    expected = _files(tmp_path / "clean")
    assert set(expected) == {"weights.safetensors", "metrics.json", TASK_INFO}
    assert _count_writes(train_ticket(tmp_path / "counted")) == 3
    for k in (1, 2, 3):  # task.json, weights, metrics.json
        out = tmp_path / f"killed-{k}"
        _killed_at(k, train_ticket(out))
        assert not _no_temporaries(out), "the kill left no temporary file behind"
        train_ticket(out)()
        assert _files(out) == expected, k
        assert _no_temporaries(out)


#: bench.csv columns that do not depend on timing: an interrupted and re-run bench must agree on them
STABLE = KEY + ("sparsity", "metric", "run_metric", "questions", "same_pred", "disk_bytes", "linear_disk_bytes")


def test_sigkill_during_bench_writes_then_rerun_keeps_measured_rows(tmp_path, tiny_task, clean_run):
    settings = Settings(formats="dense,csr", threads=1, batch_sizes=(2,), repeats=1, warmup=0, memory="off")

    def bench(out):
        return lambda: bench_run(clean_run, out, settings, task=tiny_task)

    clean = bench_run(clean_run, tmp_path / "clean", settings, task=tiny_task)
    report_files = sorted(p.name for p in (tmp_path / "clean").iterdir() if p.name != ".vlsparse.lock")
    assert len(clean) == 4 and "bench.csv" in report_files and "bench.json" in report_files
    n = _count_writes(bench(tmp_path / "counted"))
    assert n >= 8, n  # 4 rows, a report per level, the plots
    for k in (1, 3, n):  # the first row, level 0's report, the last plot
        out = tmp_path / f"killed-{k}"
        _killed_at(k, bench(out))
        assert not _no_temporaries(out), "the kill left no temporary file behind"
        before = read_rows(out / "bench.csv")
        rows = bench_run(clean_run, out, settings, task=tiny_task)
        assert rows[:len(before)] == before, k  # kept as measured
        assert [{c: r[c] for c in STABLE} for r in rows] == [{c: r[c] for c in STABLE} for r in clean], k
        assert sorted(p.name for p in out.iterdir() if p.name != ".vlsparse.lock") == report_files, k
        assert _no_temporaries(out), k


def _export(level, out):
    return export_bundle(level / "ticket.safetensors", level / "weights.safetensors", "uniter-tiny", out)


def _export_killed_in(point: str, level, out) -> None:
    """Fork; the child exports into ``out`` and SIGKILLs itself right after ``point`` of the export module
    (``save_file``: the weights written into the temporary directory; ``_finish``'s chmods: everything written,
    not yet renamed into place)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            import vlsparse.export.exporters as exporters

            def die(*args, **kwargs):
                if point == "save_file":
                    original(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)

            original = getattr(exporters, point)
            setattr(exporters, point, die)
            torch.set_num_threads(1)
            _export(level, out)
        finally:
            os._exit(3)  # not killed
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _bundle(path):
    """A bundle's files by sha256, but for the two that legitimately differ between identical exports: safetensors
    writes its ``__metadata__`` map in varying key order, so model.safetensors is compared by contents
    (:func:`_contents`) and manifest.json less that file's sha256."""
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}
    out["model.safetensors"] = _contents(path / "model.safetensors")
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["model.safetensors"]["sha256"]
    out["manifest.json"] = manifest
    return out


def test_sigkill_during_export_then_rerun_equals_an_uninterrupted_export(tmp_path, tiny_task):
    model = load_model("uniter-tiny", img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=0)[0]
    level = tmp_path / "run" / "level_01"
    level.mkdir(parents=True)
    (tmp_path / "run" / "task.json").write_text(json.dumps(task_info(tiny_task)))
    mask = global_magnitude_prune(dict(model.named_parameters()), ones_mask(model, model.prune_scope()), 0.6)
    Ticket(mask, {"model": "uniter-tiny", "task": "tiny", "method": "imp"}).save(level / "ticket.safetensors")
    save_weights(level / "weights.safetensors", model)
    _export(level, tmp_path / "clean")
    expected = _bundle(tmp_path / "clean")
    assert len(expected) == 7 and "tokenizer.json" in expected
    for point in ("save_file", "_finish"):
        out = tmp_path / f"killed-{point}"
        _export_killed_in(point, level, out)
        assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
        _export(level, out)
        assert _bundle(out) == expected, point
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")], point  # no tmp-, no lock
