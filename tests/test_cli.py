"""The command line: real subprocesses, exit codes, one-line errors, files written or refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vlsparse.pruning.ticket import Ticket


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "vlsparse.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_scope_prints_counts():
    p = run("scope", "--model", "uniter-tiny")
    assert p.returncode == 0, p.stderr
    assert "uniter.encoder.layer.1.output.dense.weight\t(64, 128)\t8,192" in p.stdout
    assert "prunable weights: 65,536 in 12 tensors" in p.stdout


def test_unknown_model_and_missing_file(tmp_path):
    assert_user_error(run("scope", "--model", "uniter-huge"), "uniter-huge", "not a preset")
    assert_user_error(run("scope", "--model", str(tmp_path / "nope.pt")), "nope.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"xx")
    assert_user_error(run("scope", "--model", str(bad)), "corrupt.pt", "not a readable torch checkpoint")


def test_unknown_task_and_bad_sparsity_leave_nothing(tmp_path):
    out = tmp_path / "run"
    assert_user_error(run("find-ticket", "--model", "uniter-tiny", "--task", "vqa-nope", "--sparsity", "0.5",
                          "--out", str(out)), "vqa-nope", "easy-vqa")
    assert_user_error(run("find-ticket", "--model", "uniter-tiny", "--sparsity", "1.5", "--out", str(out)),
                      "--sparsity", "[0, 1)")
    assert_user_error(run("random-ticket", "--model", "uniter-tiny", "--sparsity", "-0.2",
                          "--out", str(tmp_path / "r.safetensors")), "sparsity")
    assert not out.exists() and not (tmp_path / "r.safetensors").exists()


def test_random_ticket_info_compare_and_no_overwrite(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run("random-ticket", "--model", "uniter-tiny", "--sparsity", "0.7", "--out", str(a)).returncode == 0
    assert run("random-ticket", "--model", "uniter-tiny", "--sparsity", "0.7", "--out", str(b),
               "--seed", "1").returncode == 0
    assert Ticket.load(a).sparsity == pytest.approx(0.7, abs=1e-4)
    before = a.read_bytes()
    assert_user_error(run("random-ticket", "--model", "uniter-tiny", "--sparsity", "0.5", "--out", str(a)),
                      "refusing to overwrite")
    assert a.read_bytes() == before
    info = run("ticket", "info", str(a))
    assert info.returncode == 0 and "global sparsity: 70.00%" in info.stdout and "method: random" in info.stdout
    cmp = run("ticket", "compare", str(a), str(b))
    # two independent random masks at 70%: |A∩B|/|A∪B| ≈ 0.49 / 0.91 ≈ 0.54
    frac = float(cmp.stdout.split("overlap of pruned weights ")[1].strip().rstrip("%")) / 100
    assert abs(frac - 0.49 / 0.91) < 0.02
    out = tmp_path / "prune.safetensors"
    assert run("ticket", "to-prune", str(a), "--out", str(out)).returncode == 0
    from safetensors.torch import load_file
    assert "uniter.encoder.layer.0.attention.self.query.weight_mask" in load_file(str(out))


def test_corrupt_ticket(tmp_path):
    t = tmp_path / "t.safetensors"
    t.write_bytes(b"\x01\x02not safetensors")
    assert_user_error(run("ticket", "info", str(t)), "t.safetensors")


def test_ticket_that_does_not_fit_the_model(tmp_path):
    t = tmp_path / "tiny.safetensors"
    assert run("random-ticket", "--model", "uniter-tiny", "--sparsity", "0.5", "--out", str(t)).returncode == 0
    p = run("train-ticket", "--ticket", str(t), "--model", "uniter-minilm-l2", "--out", str(tmp_path / "o"),
            "--steps", "1")
    assert_user_error(p, "tiny.safetensors", "shape")
    assert not (tmp_path / "o").exists()
