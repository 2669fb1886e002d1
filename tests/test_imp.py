"""IMP run directories: levels, exact sparsities, resume after interruption, refusal of other configs."""

from __future__ import annotations

import json

import pytest
import torch

from vlsparse.data import collate
from vlsparse.models import load_model
from vlsparse.lottery.imp import IMPConfig, run_imp
from vlsparse.lottery.runs import RunError
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.loop import TrainConfig
from vlsparse.lottery.retrain import retrain_ticket

from .conftest import ANSWERS, IMG_DIM

LEVELS = [0.2, 0.5]


def _cfg(**kw):
    return IMPConfig(model="uniter-tiny", task="tiny", levels=kw.pop("levels", LEVELS),
                     train=TrainConfig(steps=3, batch_size=8, warmup=1, **kw))


def _model():
    return load_model("uniter-tiny", img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=0)[0]


def test_run_writes_every_level_with_exact_sparsity(tmp_path, tiny_task):
    res = run_imp(tmp_path, _model(), tiny_task, collate, _cfg())
    assert [r["level"] for r in res] == [0, 1, 2]
    assert (tmp_path / "theta0.safetensors").is_file()
    total = sum(p.numel() for n, p in _model().named_parameters() if n in _model().prune_scope())
    for k, target in enumerate([0.0] + LEVELS):
        t = Ticket.load(tmp_path / f"level_{k:02d}" / "ticket.safetensors")
        assert t.sparsity == pytest.approx(round(target * total) / total)
        assert int(t.meta["imp_round"]) == k
        m = json.loads((tmp_path / f"level_{k:02d}" / "metrics.json").read_text())
        assert 0.0 <= m["test"]["vqa_score"] <= 1.0
    prev = Ticket.load(tmp_path / "level_01" / "ticket.safetensors").mask
    last = Ticket.load(tmp_path / "level_02" / "ticket.safetensors").mask
    assert all(not (last[k] & ~prev[k]).any() for k in prev)  # IMP masks are nested
    lines = (tmp_path / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("level,sparsity,val_vqa_score,test_vqa_score") and len(lines) == 4


def test_resume_after_interruption_skips_finished_levels(tmp_path, tiny_task):
    calls = []

    def interrupt(desc, done, total):
        calls.append(desc)
        if desc.startswith("level 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_imp(tmp_path, _model(), tiny_task, collate, _cfg(), interrupt)
    assert (tmp_path / "level_01" / "metrics.json").is_file()
    assert not (tmp_path / "level_02" / "metrics.json").exists()
    finished = {p: p.read_bytes() for p in tmp_path.glob("level_0[01]/*")}
    theta0 = (tmp_path / "theta0.safetensors").read_bytes()

    calls.clear()
    res = run_imp(tmp_path, _model(), tiny_task, collate, _cfg(), lambda d, s, t: calls.append(d))
    assert {c.split(" (")[0] for c in calls} == {"level 2"}  # only the unfinished level trains
    assert all(p.read_bytes() == b for p, b in finished.items())  # finished levels untouched
    assert (tmp_path / "theta0.safetensors").read_bytes() == theta0
    assert len(res) == 3

    # an uninterrupted run gives the same final ticket (the run is deterministic)
    fresh = tmp_path.parent / "fresh"
    run_imp(fresh, _model(), tiny_task, collate, _cfg())
    a = Ticket.load(tmp_path / "level_02" / "ticket.safetensors").mask
    b = Ticket.load(fresh / "level_02" / "ticket.safetensors").mask
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_configuration_is_refused(tmp_path, tiny_task):
    run_imp(tmp_path, _model(), tiny_task, collate, _cfg(levels=[0.2]))
    with pytest.raises(RunError, match="another configuration.*levels"):
        run_imp(tmp_path, _model(), tiny_task, collate, _cfg(levels=[0.3]))
    with pytest.raises(RunError, match="train"):
        run_imp(tmp_path, _model(), tiny_task, collate, _cfg(levels=[0.2], lr=5e-4))


def test_imp_level_equals_retraining_its_ticket_from_theta0(tmp_path, tiny_task):
    cfg = _cfg(levels=[0.3])
    res = run_imp(tmp_path / "run", _model(), tiny_task, collate, cfg)
    ticket = Ticket.load(tmp_path / "run" / "level_01" / "ticket.safetensors")
    m = retrain_ticket(ticket, _model(), tiny_task, collate, cfg.train, tmp_path / "re",
                       theta0=tmp_path / "run" / "theta0.safetensors")
    assert m["test"] == res[1]["test"] and m["val"] == res[1]["val"]
    from safetensors.torch import load_file
    w = load_file(str(tmp_path / "re" / "weights.safetensors"))
    assert all(torch.count_nonzero(w[n][~mk]) == 0 for n, mk in ticket.mask.items())


def test_rewinding_saves_theta_i_and_resets_to_it(tmp_path, tiny_task):
    cfg = IMPConfig(model="uniter-tiny", task="tiny", levels=[0.3], rewind_step=2,
                    train=TrainConfig(steps=4, batch_size=8, warmup=1))
    from safetensors.torch import load_file

    from vlsparse.lottery.imp import TaskRounds

    class Recording(TaskRounds):  # the weights each round starts from
        starts = []

        def train(self, model, mask, cfg, progress, snapshot_step, start_step):
            self.starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return super().train(model, mask, cfg, progress, snapshot_step, start_step)

    calls = []
    run_imp(tmp_path, _model(), tiny_task, collate, cfg, lambda d, s, t: calls.append((d, s)),
            rounds=Recording(tiny_task, collate))
    theta_i = load_file(str(tmp_path / "theta_rewind.safetensors"))
    theta0 = load_file(str(tmp_path / "theta0.safetensors"))
    assert any(not torch.equal(theta_i[k], theta0[k]) for k in theta0)  # θ_i is not θ0
    assert all(torch.equal(Recording.starts[0][k], theta0[k]) for k in theta0)  # level 0 starts from θ0
    assert all(torch.equal(Recording.starts[1][k], theta_i[k]) for k in theta0)  # level 1 starts from θ_i
    assert max(s for d, s in calls if d.startswith("level 1")) == 2  # trains θ_i from step i to t
    with pytest.raises(ValueError, match="rewind"):
        IMPConfig(model="m", task="t", levels=[0.3], rewind_step=4, train=TrainConfig(steps=4))


def test_bad_levels():
    with pytest.raises(ValueError, match="levels"):
        _cfg(levels=[0.5, 0.2])
    with pytest.raises(ValueError, match="levels"):
        _cfg(levels=[1.2])
