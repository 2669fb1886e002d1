"""vlsparse transfer (vlsparse.lottery.transfer): cells resume, the target's own head φ0, IoU, bad input."""

from __future__ import annotations

import csv
import dataclasses
import sys

import numpy as np
import pytest
import torch

from vlsparse import cli
from vlsparse.data import TASKS
from vlsparse.data.dataset import TaskData, VLDataset
from vlsparse.lottery import transfer
from vlsparse.lottery.config import IMPConfig
from vlsparse.lottery.imp import run_imp
from vlsparse.lottery.main_job import random_ticket
from vlsparse.lottery.setup import setup
from vlsparse.lottery.transfer import cell_dir, run_transfer
from vlsparse.lottery.transfer_report import write_reports
from vlsparse.models import load_model
from vlsparse.pruning.mask import overlap, random_overlap
from vlsparse.training.config import TrainConfig

SHORT = TrainConfig(steps=2, batch_size=4, warmup=1)


@pytest.fixture
def tiny_tasks(monkeypatch, tiny_task, tokenizer):
    """Two registered targets on the tiny fixture data: "tiny-a" (4 answers) and "tiny-b" (3 answers: another head)."""
    answers = tiny_task.answers[:3]
    b = TaskData("tiny-b", *(VLDataset(d.examples, d.regions, tokenizer, answers, max_text_len=12)
                             for d in (tiny_task.train, tiny_task.val, tiny_task.test)), answers, 12)
    monkeypatch.setitem(TASKS, "tiny-a", lambda tokenizer, options: dataclasses.replace(tiny_task, name="tiny-a"))
    monkeypatch.setitem(TASKS, "tiny-b", lambda tokenizer, options: b)


@pytest.fixture
def sources(tiny_tasks, tmp_path):
    """An IMP run on tiny-a (levels 0, 50%) and a random 50% ticket file."""
    net, data, collate = setup("uniter-tiny", "tiny-a", SHORT.seed)
    run = tmp_path / "run-a"
    run_imp(run, net, data, collate, IMPConfig("uniter-tiny", "tiny-a", [0.5], SHORT))
    ticket = tmp_path / "random50.safetensors"
    random_ticket(net, 0.5, 1, model="uniter-tiny", task="random").save(ticket)
    return [run, ticket]


def _head(net) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters() if n.startswith(tuple(net.head_prefixes))}


def test_cells_resume_and_train_from_the_targets_own_head(sources, tmp_path, monkeypatch):
    calls = []
    real = transfer.retrain_ticket

    def spy(ticket, model, task, collate, cfg, out, **kw):
        calls.append((out, task.name, _head(model)))
        return real(ticket, model, task, collate, cfg, out, **kw)

    monkeypatch.setattr(transfer, "retrain_ticket", spy)
    out = tmp_path / "t"
    records, srcs = run_transfer(out, sources, ["tiny-a", "tiny-b"], [0.5], SHORT)
    # tiny-a: the IMP run's own level and dense level are copied; the random ticket is trained; tiny-b: all three
    assert sorted((c[1], c[0].relative_to(out).parts[1]) for c in calls) == [
        ("tiny-a", "random"), ("tiny-b", "dense"), ("tiny-b", "random"), ("tiny-b", "tiny-a")]
    own = next(r for r in records if r["source"] == "tiny-a" and r["target"] == "tiny-a")
    assert own["from_run"].endswith("level_01") and own["test"] == transfer.Run(sources[0]).metrics(1)["test"]
    for target in ("tiny-a", "tiny-b"):  # every cell starts from the target's own φ0 (fresh head, seed of --seed)
        fresh = _head(setup("uniter-tiny", target, SHORT.seed)[0])
        for _, name, head in (c for c in calls if c[1] == target):
            assert head.keys() == fresh.keys() and all(torch.equal(head[k], fresh[k]) for k in fresh)
    source_head = {k: v for k, v in _head(load_model("uniter-tiny", img_dim=12, num_answers=4)[0]).items()}
    assert any(source_head[k].shape != fresh[k].shape for k in fresh)  # tiny-b's head is not tiny-a's
    stamp = {c[0]: (c[0] / "metrics.json").stat().st_mtime_ns for c in calls}

    calls.clear()  # a second run resumes: nothing is recomputed
    again, _ = run_transfer(out, sources, ["tiny-a", "tiny-b"], [0.5], SHORT)
    assert calls == [] and again == records
    assert all((d / "metrics.json").stat().st_mtime_ns == t for d, t in stamp.items())
    assert not list(out.glob("cells/**/weights.safetensors"))

    rows, overlaps = write_reports(out, records, srcs, [0.5])
    table = list(csv.DictReader(open(out / "transfer.csv")))
    assert len(table) == 6 and {r["source"] for r in table} == {"dense", "tiny-a", "random"}
    dense_b = next(r for r in table if r["source"] == "dense" and r["target"] == "tiny-b")
    assert float(dense_b["pct_of_dense"]) == 100.0 or float(dense_b["dense"]) == 0.0
    assert len(overlaps) == 1 and overlaps[0]["random_iou"] == pytest.approx(1 / 3, abs=1e-3)
    assert all((out / f).is_file() for f in ("overlap.csv", "transfer.md", "transfer_heatmap.png",
                                             "transfer_tiny-b.png", "overlap_heatmap.png"))


def test_iou_against_numpy():
    rng = np.random.default_rng(0)
    big = rng.random((2, 30, 40)) < 0.7  # True = pruned
    small = big & (rng.random((2, 30, 40)) < 0.5)  # pruned set nested in big's
    mask = lambda pruned: {"a": torch.from_numpy(~pruned[0]), "b": torch.from_numpy(~pruned[1])}  # noqa: E731
    assert overlap(mask(big), mask(big)) == 1.0
    assert overlap(mask(small), mask(big)) == pytest.approx(small.sum() / big.sum())
    other = rng.random((2, 30, 40)) < 0.7
    assert overlap(mask(big), mask(other)) == pytest.approx((big & other).sum() / (big | other).sum())
    assert random_overlap(0.7, 0.7) == pytest.approx(0.7 / 1.3) and random_overlap(0.0, 0.0) == 1.0
    assert overlap(mask(big), mask(other)) == pytest.approx(random_overlap(big.mean(), other.mean()), abs=0.02)


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["vlsparse", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, capsys.readouterr().err


def test_bad_input_is_one_line_and_keeps_cells(sources, tmp_path, monkeypatch, capsys):
    out = tmp_path / "t"
    base = ["transfer", "--source", sources[0], "--steps", 2, "--batch-size", 4, "--warmup", 1, "--out", out]
    code, err = _cli(monkeypatch, capsys, *base, "--target", "tiny-b", "--levels", "0.5")
    assert code == 0
    cell = cell_dir(out, "tiny-a", "tiny-b", 0.5) / "metrics.json"
    before = cell.stat().st_mtime_ns
    for extra, message in ((["--target", "tiny-b", "--levels", "0.5,0.8"], "no ticket at 80% sparsity (its levels: 50%)"),
                           (["--target", "nope"], "unknown --target 'nope'"),
                           (["--target", "tiny-b", "--levels", "0.5", "--model", "lxmert-tiny"], "not of --model")):
        code, err = _cli(monkeypatch, capsys, *base, *extra)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    other = tmp_path / "lxmert.safetensors"  # a mask of another prune scope, with no model in its metadata
    random_ticket(load_model("lxmert-tiny")[0], 0.5, 0).save(other)
    code, err = _cli(monkeypatch, capsys, *base, "--source", other, "--target", "tiny-b", "--levels", "0.5",
                     "--model", "uniter-tiny")
    assert code == 2 and "prune scope" in err and err.count("\n") == 1, err
    assert cell.stat().st_mtime_ns == before
