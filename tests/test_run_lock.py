"""Issue 17, items 4 and 6: an exclusive lock on a run directory (a second process gets one line naming the
holder's PID; the lock of a dead process is taken over) and the temporary files of a killed writer removed by
the next run in that directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vlsparse.atomic import RunLockedError, remove_temporaries, run_lock

HOLDER = "import sys, time\nfrom vlsparse.atomic import run_lock\nwith run_lock(sys.argv[1]):\n" \
         "    print('held', flush=True)\n    time.sleep(120)\n"


@pytest.fixture
def holder(tmp_path):
    """A process that holds the lock on tmp_path/run (killed at the end)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                         env=env)
    assert p.stdout.readline().strip() == "held"
    yield p
    p.kill()
    p.wait()


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path, holder):
    with pytest.raises(RunLockedError) as info:
        with run_lock(tmp_path / "run"):
            pass
    msg = str(info.value)
    assert f"PID {holder.pid}" in msg and str(tmp_path / "run") in msg and "\n" not in msg, msg


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, holder):
    holder.kill()
    holder.wait()
    assert (tmp_path / "run" / ".vlsparse.lock").read_text().strip() == str(holder.pid)  # left behind
    with run_lock(tmp_path / "run"):
        assert (tmp_path / "run" / ".vlsparse.lock").read_text().strip() == str(os.getpid())


def test_the_cli_refuses_a_locked_run_directory_in_one_line(tmp_path, holder):
    p = subprocess.run([sys.executable, "-m", "vlsparse.cli", "find-ticket", "--model", "uniter-tiny", "--sparsity",
                        "0.5", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: ") and f"PID {holder.pid}" in p.stderr, p.stderr


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_run(tmp_path):
    run = tmp_path / "run"
    (run / "level_01").mkdir(parents=True)
    left = [run / ".weights.safetensors.k2j4_x9a.tmp", run / "level_01" / ".ticket.safetensors.abcd1234.tmp",
            run / ".csr70.tmp-q1w2e3r4"]
    for p in left[:2]:
        p.write_bytes(b"partial")
    left[2].mkdir()
    (left[2] / "model.safetensors").write_bytes(b"partial export")
    kept = [run / "level_01" / "ticket.safetensors", run / ".hidden", run / "notes.tmp"]
    for p in kept:
        p.write_bytes(b"mine")
    with run_lock(run):
        assert not any(p.exists() for p in left)
    assert all(p.read_bytes() == b"mine" for p in kept)
    assert remove_temporaries(run) == []


def test_transfer_and_pretrain_hold_their_output_locks(tmp_path, holder):
    """Two `vlsparse transfer` processes into one --out both trained every cell (seen on 2026-12-01): transfer
    now holds OUT's lock, pretrain PARENT/.NAME.lock (its output is a new directory, as export's)."""
    from vlsparse.lottery.pretraining import run_pretrain
    from vlsparse.lottery.transfer import run_transfer
    from vlsparse.training.config import TrainConfig

    with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
        run_transfer(tmp_path / "run", [tmp_path / "no-source"], ["easy-vqa"], [0.5], TrainConfig())
    left = tmp_path / ".pt.tmp-a1b2c3d4"  # a killed pre-training's directory
    left.mkdir()
    with run_lock(tmp_path, name=".pt.lock", clean=None):
        p = subprocess.run([sys.executable, "-m", "vlsparse.cli", "pretrain", "--model", "uniter-tiny", "--out",
                            str(tmp_path / "pt")], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert p.returncode == 2 and "in use by another vlsparse process" in p.stderr, p.stderr
        assert left.exists()
    with pytest.raises(FileNotFoundError):  # the lock is free: the run starts, removes the leftover, then fails
        run_pretrain("uniter-tiny", str(tmp_path / "no-corpus.json"), tmp_path / "pt", TrainConfig())
    assert not left.exists() and not (tmp_path / "pt").exists()
