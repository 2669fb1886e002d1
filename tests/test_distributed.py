"""Issue 15: ``find-ticket`` under torchrun, 2 CPU processes (gloo), against one process with the same global batch
and seed, on the tiny VQA v2 fixture (16 train / 3 val / 7 test questions: uneven evaluation shards) and a
uniter-tiny saved without dropout (dropout draws differ per rank, see vlsparse.training.distributed).

Two torchrun launches (~20 s each on 2 loaded cores): (1) ``tests/dist_entry.py`` (the CLI's ``main``) where rank 1
raises in the level-2 round: the run stops promptly with that message, levels 0-1 are finished, and every
file was written by rank 0; (2) ``-m vlsparse`` resuming that run under world size 2. The same killed run also
resumes under world size 1 (in process). Tolerance: masks identical; weights within 1e-4 (AdamW makes
float-rounding differences of the summed gradients up to ~lr per step; observed 3e-5); metrics equal, each
example counted once (``n``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from vlsparse.data import load_task
from vlsparse.models import load_model, load_tokenizer, visual_input
from vlsparse.training import distributed

from .fixtures.vqav2 import write_vqa
from .test_task_matrix import _invoke as _cli

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["find-ticket", "--task", "vqa", "--sparsity", "0.7", "--levels", "0.5,0.7", "--steps", "4",
        "--batch-size", "4", "--warmup", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, the find-ticket arguments, the single-process run directory)."""
    root = tmp_path_factory.mktemp("dist")
    data = write_vqa(root / "vqa", layout="tsv")
    td = load_task("vqa", load_tokenizer("uniter-tiny"), data_dir=data, visual=visual_input("uniter-tiny"))
    model, _ = load_model("uniter-tiny", img_dim=td.region_feature_dim, num_answers=len(td.answers))
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(root / "model")
    args = [*ARGS, "--model", str(root / "model"), "--data-dir", str(data)]
    _cli(*args, "--out", root / "single")
    return root, args, root / "single"


def _torchrun(*args, env=None, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        *[str(a) for a in args]], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    return p, time.time() - t0


def _same_level(a: Path, b: Path, k: int) -> None:
    level = f"level_{k:02d}"
    ta, tb = load_file(str(a / level / "ticket.safetensors")), load_file(str(b / level / "ticket.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta), f"{level}: masks differ"
    if not (b / level / "metrics.json").exists():  # a: the finished single-process run
        return
    wa, wb = load_file(str(a / level / "weights.safetensors")), load_file(str(b / level / "weights.safetensors"))
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], atol=1e-4, rtol=0, msg=f"{level} {n}")
    ma, mb = (json.loads((r / level / "metrics.json").read_text()) for r in (a, b))
    for split, n in (("val", 3), ("test", 7)):  # every example once: no padding duplicates, none lost
        assert ma[split]["n"] == mb[split]["n"] == n
        for key, value in ma[split].items():
            assert mb[split][key] == pytest.approx(value, abs=1e-6), (level, split, key)


def test_two_processes_fail_resume_and_match_one(setup, tmp_path):
    root, args, single = setup
    run, writes = tmp_path / "run", tmp_path / "writes"
    p, seconds = _torchrun("tests/dist_entry.py", *args, "--out", run,
                           env={"VLSPARSE_TEST_WRITES": str(writes), "VLSPARSE_TEST_FAIL": "1:3"})
    # one rank raising brings the group down promptly, with its message
    assert p.returncode != 0 and "injected failure on rank 1" in p.stderr, p.stderr[-3000:]
    assert seconds < 120, seconds
    # killed after level 1: levels 0 and 1 finished, level 2's ticket written, identical to one process
    assert [(run / f"level_{k:02d}" / "metrics.json").exists() for k in range(3)] == [True, True, False]
    for k in range(3):
        _same_level(single, run, k)
    # only rank 0 wrote files, each file of the run once (the summary once per level)
    assert not Path(f"{writes}.1").exists()
    written = [Path(x).relative_to(run).as_posix() for x in Path(f"{writes}.0").read_text().split()]
    assert sorted(set(written)) == sorted(f.relative_to(run).as_posix() for f in run.rglob("*") if f.is_file() and f.name != ".vlsparse.lock")  # the lock is not an output
    assert {f: written.count(f) for f in set(written) if written.count(f) > 1} == {"summary.csv": 2}

    # resume under world size 1 (in process) and 2 (torchrun -m vlsparse): level 2 as in one process
    one = tmp_path / "one"
    shutil.copytree(run, one)
    _cli(*args, "--out", one)
    _same_level(single, one, 2)
    p, _ = _torchrun("-m", "vlsparse", *args, "--out", run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("level  2  sparsity 70.0%") == 1  # printed by rank 0 only
    _same_level(single, run, 2)


def test_shards_and_batches_cover_every_example_once():
    for n in range(0, 9):
        for w in (1, 2, 3):
            assert [i for r in range(w) for i in distributed.shard_range(n, r, w)] == list(range(n))
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [list(distributed.RankBatches(batches, r, 2)) for r in (0, 1)] == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    with pytest.raises(distributed.SameOnEveryRank, match="divisible"):
        list(distributed.RankBatches([[0, 1, 2]], 0, 2))
    assert distributed.main_only(lambda: 7) == 7 and distributed.gather("x") == ["x"]  # one process: no group
