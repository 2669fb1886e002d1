"""Issue 17, item 6 (fault test): find-ticket's run killed with SIGKILL during a file write, then run again, ends
in the same files as an uninterrupted run, with no temporary file left. The run (uniter-tiny, the tiny task, 3
steps per level) is forked; the child kills itself with SIGKILL right after the k-th atomic write has written its
temporary file and before it is renamed into place (three kill points, to keep the test short: theta0, a level's
weights, the next level's ticket). Then ``export`` the same way: killed while writing its bundle (after the weights
file is written into its temporary directory, and just before the directory is renamed into place), re-run: the
bundle's files hash as an uninterrupted export's, and no ``.NAME.tmp-*`` directory or lock file is left."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import pytest
import torch

from vlsparse.atomic import save_weights
from vlsparse.data import collate, task_info
from vlsparse.export.bundle_export import export_bundle
from vlsparse.lottery.imp import IMPConfig, run_imp
from vlsparse.models import load_model
from vlsparse.pruning.magnitude import global_magnitude_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.loop import TrainConfig

from .conftest import ANSWERS, IMG_DIM

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _cfg():
    return IMPConfig(model="uniter-tiny", task="tiny", levels=[0.5], train=TrainConfig(steps=3, batch_size=8, warmup=1))


def _run(path, task):
    model = load_model("uniter-tiny", img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=0)[0]
    return run_imp(path, model, task, collate, _cfg())


def _killed_at(k: int, path, task) -> None:
    """Fork; the child runs IMP into ``path`` and SIGKILLs itself inside the k-th atomic write."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            import vlsparse.atomic as atomic

            original, count = atomic.atomic_write, [0]

            def dying_write(target, write):
                def write_then_die(tmp):
                    write(tmp)
                    count[0] += 1
                    if count[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)

                return original(target, write_then_die)

            for module in list(sys.modules.values()):
                if getattr(module, "atomic_write", None) is original:
                    module.atomic_write = dying_write
            torch.set_num_threads(1)
            _run(path, task)
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


def test_sigkill_during_each_write_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_task):
    torch.set_num_threads(1)  # as the forked child: the same float sums, so the same bits
    _run(tmp_path / "clean", tiny_task)
    expected = _files(tmp_path / "clean")
    for k in (2, 4, 7):  # theta0.safetensors, level 0's weights, level 1's ticket
        run = tmp_path / f"killed-{k}"
        _killed_at(k, run, tiny_task)
        assert any(".tmp" in p.name for p in run.rglob("*")), "the kill left no temporary file behind"
        _run(run, tiny_task)
        assert _files(run) == expected, k
        assert not [p for p in run.rglob("*") if ".tmp" in p.name]


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
    torch.set_num_threads(1)
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
