"""Issue 13 for ``vlsparse transfer`` and ``vlsparse pretrain`` / ``find-ticket --task pretrain``: the adversarial
options reach the training (one adversarial pass, where δ never moves, is standard training to the bit; a zero-
radius ball gives the standard gradients up to rounding; a real adversarial run differs), the outputs record the
training method, a transfer copies an own-task IMP level only when its training matches, resume refuses to mix,
bad values are one line, exit 2. Models without dropout: clean and perturbed passes are then the same function."""

from __future__ import annotations

import dataclasses
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vlsparse import cli
from vlsparse.data.corpus import load_corpus
from vlsparse.lottery import transfer
from vlsparse.lottery.config import IMPConfig
from vlsparse.lottery.imp import run_imp
from vlsparse.lottery.setup import setup
from vlsparse.lottery.transfer import cell_dir, run_transfer
from vlsparse.models import default_tokenizer, load_model
from vlsparse.pruning.ticket import Ticket
from vlsparse.training import pretrain as pretraining
from vlsparse.training.adversarial_config import AdversarialConfig
from vlsparse.training.config import TrainConfig
from vlsparse.training.objectives import OBJECTIVES, parse_objectives

from .test_pretrain import _cli as _pretrain_cli
from .test_pretrain import corpus_file  # noqa: F401 - fixture
from .test_transfer import SHORT, tiny_tasks  # noqa: F401 - fixture

ONE_PASS = AdversarialConfig(adversarial=True, adv_steps=1)  # K = 1: δ stays 0 whatever ε
STRONG = AdversarialConfig(adversarial=True, adv_steps=2, adv_lr=1.0, adv_modality="both")


def dataclass_replace(cfg: TrainConfig, **changes) -> TrainConfig:
    return dataclasses.replace(cfg, **changes)


def _no_dropout(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return net


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# --------------------------------------------------------------------------- transfer


@pytest.fixture
def quiet_setup(monkeypatch, tiny_tasks):  # noqa: F811 - the fixture imported above
    """transfer's setup gives dropout-free models; returns the list of (cell, trained state) of every cell trained."""
    real_setup, real_retrain, trained = transfer.setup, transfer.retrain_ticket, []

    def quiet(*a, **kw):
        net, data, collate = real_setup(*a, **kw)
        return _no_dropout(net), data, collate

    monkeypatch.setattr(transfer, "setup", quiet)

    def spy(ticket, model, task, collate, cfg, out, **kw):
        metrics = real_retrain(ticket, model, task, collate, cfg, out, **kw)
        trained.append((out, _state(model), cfg.adversarial))
        return metrics

    monkeypatch.setattr(transfer, "retrain_ticket", spy)
    return trained


def _imp_run(path, train: TrainConfig):
    net, data, collate = setup("uniter-tiny", "tiny-a", train.seed)
    run_imp(path, _no_dropout(net), data, collate, IMPConfig("uniter-tiny", "tiny-a", [0.5], train))
    return path


def test_transfer_cells_train_adversarially_and_copy_only_matching_imp_runs(quiet_setup, tmp_path):
    trained = quiet_setup
    standard = _imp_run(tmp_path / "imp-standard", SHORT)
    run_transfer(tmp_path / "std", [standard], ["tiny-a", "tiny-b"], [0.5], SHORT)
    std = {o.relative_to(tmp_path / "std"): s for o, s, _ in trained}
    # the own-task IMP run trained the standard way: copied into the standard transfer (2 cells trained on tiny-b)
    assert sorted(str(c) for c in std) == ["cells/dense/tiny-b/s0", "cells/tiny-a/tiny-b/s50"]

    trained.clear()  # one adversarial pass: δ never moves, so every cell is its standard cell to the bit
    one = dataclass_replace(SHORT, adversarial=ONE_PASS)
    records, _ = run_transfer(tmp_path / "one", [standard], ["tiny-a", "tiny-b"], [0.5], one)
    assert {t[2] for t in trained} == {ONE_PASS}  # the settings reached every cell's training
    # a standard IMP run is not an adversarial training: the tiny-a cells are trained here, not copied
    assert sorted(str(o.relative_to(tmp_path / "one")) for o, _, _ in trained) == [
        "cells/dense/tiny-a/s0", "cells/dense/tiny-b/s0", "cells/tiny-a/tiny-a/s50", "cells/tiny-a/tiny-b/s50"]
    for out, state, _ in trained:
        cell = out.relative_to(tmp_path / "one")
        if cell in std:
            assert all(torch.equal(state[k], std[cell][k]) for k in state), cell
    assert all(r["training"] == "adversarial" and r["from_run"] == "" for r in records)
    meta = json.loads((cell_dir(tmp_path / "one", "tiny-a", "tiny-b", 0.5) / "metrics.json").read_text())
    assert meta["training"] == "adversarial" and json.loads(meta["adversarial"])["adv_steps"] == 1
    assert json.loads((tmp_path / "one" / "config.json").read_text())["train"]["adversarial"]["adv_steps"] == 1

    trained.clear()  # a real adversarial run differs from the standard one
    run_transfer(tmp_path / "strong", [standard], ["tiny-b"], [0.5], dataclass_replace(SHORT, adversarial=STRONG))
    strong = {o.relative_to(tmp_path / "strong"): s for o, s, _ in trained}
    for cell, state in strong.items():
        assert any(not torch.equal(state[k], std[cell][k]) for k in state), cell

    # an IMP run trained with the same adversarial settings is copied; resume refuses to mix trainings
    trained.clear()
    adversarial = _imp_run(tmp_path / "imp-adv", one)
    records, _ = run_transfer(tmp_path / "adv", [adversarial], ["tiny-a"], [0.5], one)
    assert trained == [] and all(r["from_run"] and r["training"] == "adversarial" for r in records)
    with pytest.raises(transfer.RunError, match="another configuration"):
        run_transfer(tmp_path / "std", [standard], ["tiny-a"], [0.5], one)
    with pytest.raises(transfer.RunError, match="another configuration"):
        run_transfer(tmp_path / "one", [standard], ["tiny-a"], [0.5], SHORT)


def test_transfer_csv_records_the_training_and_the_cli_takes_the_options(quiet_setup, tmp_path, monkeypatch, capsys):
    standard = _imp_run(tmp_path / "imp", SHORT)
    base = ["transfer", "--source", standard, "--target", "tiny-b", "--levels", "0.5", "--steps", 2,
            "--batch-size", 4, "--warmup", 1, "--no-plots", "--out", tmp_path / "t"]
    monkeypatch.setattr(sys, "argv", ["vlsparse", *map(str, base), "--adversarial", "--adv-steps", "2",
                                      "--adv-modality", "image", "--adv-eps", "0.5"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    assert {t[2] for t in quiet_setup} == {AdversarialConfig(True, adv_steps=2, adv_modality="image", adv_eps=0.5)}
    rows = (tmp_path / "t" / "transfer.csv").read_text().splitlines()
    assert rows[0].endswith(",training") and all(r.endswith(",adversarial") for r in rows[1:])
    monkeypatch.setattr(sys, "argv", ["vlsparse", *map(str, base)])  # the same DIR without --adversarial
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and "another configuration" in err and \
        err.count("\n") == 1, err


# --------------------------------------------------------------------------- pre-training


@pytest.fixture(scope="module")
def captions(corpus_file):  # noqa: F811 - the fixture imported above
    return load_corpus(str(corpus_file), default_tokenizer())


def _pretrained(captions, cfg: TrainConfig, objectives: str = "mlm,mrfr,itm,wra") -> dict[str, torch.Tensor]:
    net, heads = _model_and_heads(captions)
    captions.train.rng = np.random.default_rng(0)  # the negative images drawn as items are read: the same draws
    pretraining.pretrain(_no_dropout(net), heads, None, captions.train, parse_objectives(objectives), cfg)
    return {**_state(net), **{f"heads.{k}": v for k, v in _state(heads).items()}}


def _model_and_heads(captions):
    net, _ = load_model("uniter-tiny", img_dim=captions.region_feature_dim, num_answers=1, seed=0)
    return net, pretraining.new_heads(net, 0)


def test_pretraining_takes_the_adversarial_settings(captions):
    cfg = TrainConfig(steps=4, batch_size=8, warmup=1, lr=1e-3)
    standard = _pretrained(captions, cfg)
    one = _pretrained(captions, dataclass_replace(cfg, adversarial=ONE_PASS))
    assert all(torch.equal(one[k], standard[k]) for k in standard)  # δ never moves: standard pre-training exactly
    strong = _pretrained(captions, dataclass_replace(cfg, adversarial=STRONG))
    assert any(not torch.equal(strong[k], standard[k]) for k in standard)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_zero_radius_pretraining_gradients_are_the_standard_ones(captions, name):
    net, heads = _model_and_heads(captions)
    _no_dropout(net).train()
    heads.train()

    def gradients(adversarial) -> dict[str, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)
        captions.train.rng = np.random.default_rng(0)
        with pretraining._compact(net, captions.train, pretraining._special_ids(net)) as ctx:
            batch = pretraining._on_device(next(pretraining._forever(captions.train, 8, 0)), ctx, "cpu")
            out = pretraining._backward(net, heads, OBJECTIVES[name], batch, ctx, torch.Generator().manual_seed(1),
                                        adversarial)
        assert out.count > 0 and (out.logits is None) == (name in ("mrfr", "wra"))
        return {n: p.grad.clone() for n, p in [*net.named_parameters(), *heads.named_parameters()]
                if p.grad is not None}

    want = gradients(None)
    # the library takes radius 0 (the command line refuses it); K = 3 passes per modality, both modalities
    zero = SimpleNamespace(modalities=("text", "image"), adv_steps=3, adv_lr=0.5, adv_eps=0.0, adv_kl_weight=1.5,
                           adv_norm="l2")
    got = gradients(zero)
    assert sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)  # float32 sums of 6 passes
    moved = gradients(SimpleNamespace(**{**vars(zero), "adv_eps": None}))
    assert any(not torch.allclose(moved[n], want[n]) for n in want)


def test_pretrain_and_find_ticket_pretrain_record_the_training(tmp_path, corpus_file):  # noqa: F811
    torch.set_num_threads(1)
    out = tmp_path / "pt"
    _pretrain_cli("pretrain", "--model", "uniter-tiny", "--corpus", corpus_file, "--objectives", "mlm,itm",
                  "--steps", 2, "--warmup", 1, "--batch-size", 8, "--adversarial", "--adv-modality", "both",
                  "--out", out)
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["training"] == "adversarial" and json.loads(metrics["adversarial"])["adv_modality"] == "both"
    run = tmp_path / "run"
    args = ["find-ticket", "--model", "uniter-tiny", "--task", "pretrain", "--corpus", corpus_file, "--objectives",
            "itm", "--sparsity", 0.5, "--levels", 0.5, "--steps", 2, "--warmup", 1, "--batch-size", 8, "--out", run]
    _pretrain_cli(*args, "--adversarial", "--adv-steps", 2)
    ticket = Ticket.load(run / "level_01" / "ticket.safetensors")
    assert ticket.meta["training"] == "adversarial" and json.loads(ticket.meta["adversarial"])["adv_steps"] == 2
    weights = load_file(str(run / "level_01" / "weights.safetensors"))  # trained adversarially with that mask
    assert all(not weights[n][~m].any() for n, m in ticket.mask.items())  # pruned weights stayed exactly zero
    _pretrain_cli(*args, code=2)  # a standard run into the adversarial run's directory is refused
    assert not (run / "level_02").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--adv-steps", "0"], "--adv-steps must be >= 1"), (["--adv-eps", "0"], "--adv-eps must be > 0"),
    (["--adv-modality", "audio"], "--adv-modality must be one of text, image, both")])
def test_bad_adversarial_options_of_transfer_and_pretrain(args, fragment, tmp_path, monkeypatch, capsys):
    for command in (["transfer", "--source", str(tmp_path / "run"), "--target", "easy-vqa"],
                    ["pretrain", "--model", "uniter-tiny", "--corpus", "easy-vqa-captions"]):
        monkeypatch.setattr(sys, "argv", ["vlsparse", *command, "--out", str(tmp_path / "out"), "--adversarial",
                                          *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == [lines[0]] and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "out").exists()
