"""The main job (issue 11) on uniter-tiny with a tiny budget: every row of the table, in Table 1's order."""

from __future__ import annotations

import dataclasses

import torch

from vlsparse.data import collate
from vlsparse.data.dataset import TaskData, VLDataset, VLExample
from vlsparse.lottery import main_job
from vlsparse.lottery.config import IMPConfig
from vlsparse.lottery.job_table import format_table
from vlsparse.models import load_model
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.config import TrainConfig

from .conftest import ANSWERS, IMG_DIM
from .test_pretrain import write_corpus


def _typed(task: TaskData, tokenizer) -> TaskData:
    """``task`` with question types (yes/no for yes/no answers, colour otherwise)."""
    def ds(d):
        ex = [VLExample(e.question, e.image_id, e.answers,
                        "yes/no" if next(iter(e.answers)) in ("yes", "no") else "color") for e in d.examples]
        return VLDataset(ex, d.regions, tokenizer, ANSWERS, max_text_len=12)

    return dataclasses.replace(task, train=ds(task.train), val=ds(task.val), test=ds(task.test))


def test_main_job_rows_in_paper_order_and_resume(tmp_path, tiny_task, tokenizer, monkeypatch):
    torch.set_num_threads(1)
    task = _typed(tiny_task, tokenizer)
    monkeypatch.setattr(main_job, "setup", lambda model, name, seed: (
        load_model(model, img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=seed)[0], task, collate))
    monkeypatch.setattr(main_job, "save_task_info", lambda data, path: None)
    corpus = write_corpus(tmp_path / "corpus", images=8)
    cfg = IMPConfig(model="uniter-tiny", task="tiny", levels=[0.5, 0.7],
                    train=TrainConfig(steps=2, batch_size=8, warmup=1))
    job = main_job.JobSettings(base_model="uniter-tiny", corpus=str(corpus), proportions=None, pretrain_steps=10,
                               pretrain_batch_size=8, agnostic_levels=(0.5, 0.7), compare=2)
    rows, _, first = main_job.run_main_job(tmp_path / "out", cfg, job, [0, 1])
    assert first == tmp_path / "out" / "seed_0"
    assert [(r.paper, r.init, round(r.sparsity, 2)) for r in rows] == [
        ("2", "θ0", 0.0), ("", "θ'0", 0.0), ("4", "θ0", 0.5), ("4", "θ0", 0.7), ("5", "θ0", 0.7), ("6", "θ'0", 0.7),
        ("7", "θ''0", 0.7), ("Table 2", "θ0", 0.7), ("", "θ0", 1.0)]
    assert all(len(r.tests) == 2 for r in rows)  # one result per seed
    table = (tmp_path / "out" / "table.md").read_text()
    assert " ± " in table and table == format_table(rows) and table.count("\n") == 2 + len(rows)
    seed0 = tmp_path / "out" / "seed_0"
    agnostic = Ticket.load(seed0 / "pretrain-imp" / "level_02" / "ticket.safetensors")
    assert agnostic.meta["task"] == "pretrain" and abs(agnostic.sparsity - 0.7) < 1e-3
    floor = Ticket.load(seed0 / "floor" / "ticket.safetensors")
    assert floor.sparsity == 1.0
    assert all("vqa_score:yes/no" in r.tests[0] and "vqa_score:open" in r.tests[0] for r in rows)
    # re-running resumes: nothing is trained again
    monkeypatch.setattr(main_job, "retrain_ticket", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again, _, _ = main_job.run_main_job(tmp_path / "out", cfg, job, [0, 1])
    assert [r.tests for r in again] == [r.tests for r in rows]
