"""Adversarial training (VILLA finetuning) on the tiny presets of UNITER, LXMERT and ViLT: the ascent step stays in
the ε-ball, a zero-radius ball gives the plain loss and gradients, the KL term of a zero perturbation is zero,
pruned weights stay exactly zero; the ticket header, resume refusal and bad input."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import default_collate

from vlsparse.cli import main
from vlsparse.data import collate
from vlsparse.data.objective import VQA_OBJECTIVE
from vlsparse.lottery.config import IMPConfig
from vlsparse.lottery.imp import run_imp
from vlsparse.lottery.runs import RunError, check_config
from vlsparse.models import load_model
from vlsparse.pruning.magnitude import random_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.adversarial import (adversarial_backward, ascent_step, perturbation, perturbation_point,
                                           symmetric_kl)
from vlsparse.training.adversarial_config import AdversarialConfig, adversarial_config
from vlsparse.training.config import TrainConfig
from vlsparse.training.loop import train

from .conftest import ANSWERS, IMG_DIM

BACKBONES = ("uniter-tiny", "lxmert-tiny", "vilt-tiny")
ADV = AdversarialConfig(adversarial=True, adv_steps=2, adv_lr=0.05, adv_eps=0.1, adv_modality="both")


def _model(name: str) -> torch.nn.Module:
    img_dim = None if name.startswith("vilt") else IMG_DIM
    return load_model(name, img_dim=img_dim, num_answers=len(ANSWERS), seed=0)[0]


def _batch(model, n: int = 3, seed: int = 1) -> tuple[dict, torch.Tensor]:
    inputs = model.example_inputs(batch=n, text_len=6, regions=3, seed=seed)
    inputs["attention_mask"][0, 4:] = 0
    targets = torch.nn.functional.one_hot(torch.arange(n) % len(ANSWERS), len(ANSWERS)).float()  # (n, 4)
    return inputs, targets


def _norms(x: torch.Tensor, norm: str) -> torch.Tensor:
    return x.flatten(1).norm(dim=1) if norm == "l2" else x.flatten(1).abs().amax(dim=1)


@pytest.mark.parametrize("name", BACKBONES)
def test_one_ascent_step_moves_the_perturbation_within_the_ball(name):
    model = _model(name).eval()
    inputs, targets = _batch(model)
    for modality in ("text", "image"):
        with perturbation(model, modality) as delta:
            loss0 = VQA_OBJECTIVE.compute_loss(model(**inputs), targets)
            loss0.backward()
            grad = delta.value.grad
            assert grad is not None and grad.abs().sum() > 0, (name, modality)
            for norm in ("l2", "linf"):
                eps = 0.1
                big = ascent_step(delta.value.detach(), grad, lr=0.5, eps=eps, norm=norm)  # projected back
                small = ascent_step(delta.value.detach(), grad, lr=0.01, eps=eps, norm=norm)  # inside the ball
                assert torch.all(_norms(big, norm) <= eps * (1 + 1e-5)), (name, modality, norm)
                torch.testing.assert_close(_norms(big, norm), torch.full((3,), eps))
                torch.testing.assert_close(_norms(small, norm), torch.full((3,), 0.01))
                assert torch.all(_norms(ascent_step(delta.value.detach(), grad, 0.5, None, norm), norm) > 0.49)
            delta.value = small.requires_grad_()
            with torch.no_grad():
                loss1 = VQA_OBJECTIVE.compute_loss(model(**inputs), targets)
        assert loss1 > loss0.detach(), (name, modality)  # an ascent step


@pytest.mark.parametrize("name", BACKBONES)
def test_zero_radius_ball_gives_the_standard_loss_and_gradients(name):
    model = _model(name).eval()  # no dropout: clean and perturbed passes are the same function
    inputs, targets = _batch(model)
    plain = VQA_OBJECTIVE.compute_loss(model(**inputs), targets)
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    # the library takes radius 0 (the command line refuses it: --adv-eps must be > 0)
    cfg = SimpleNamespace(modalities=("text", "image"), adv_steps=3, adv_lr=0.5, adv_eps=0.0, adv_kl_weight=1.5,
                          adv_norm="l2")
    loss = adversarial_backward(model, inputs, targets, VQA_OBJECTIVE, cfg)
    torch.testing.assert_close(loss, plain.detach())
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)  # float summation over 6 passes


@pytest.mark.parametrize("name", BACKBONES)
def test_kl_term_is_zero_for_a_zero_perturbation(name):
    model = _model(name).eval()
    inputs, _ = _batch(model)
    with torch.no_grad():
        clean = model(**inputs)
        for modality in ("text", "image"):
            with perturbation(model, modality) as delta:
                logits = model(**inputs)
            assert delta.value is not None and not delta.value.any()
            assert symmetric_kl(logits, clean).item() == 0.0
    other = clean + torch.randn_like(clean)
    assert symmetric_kl(other, clean) > 0
    torch.testing.assert_close(symmetric_kl(other, clean), symmetric_kl(clean, other))


def _pixel_items(model, n: int = 8) -> list[dict]:
    inputs, targets = _batch(model, n=n, seed=3)
    return [{**{k: v[i] for k, v in inputs.items()}, "targets": targets[i]} for i in range(n)]


@pytest.mark.parametrize("name", BACKBONES)
def test_pruned_weights_stay_exactly_zero_under_adversarial_training(name, tiny_task):
    model = _model(name)
    mask = random_prune(ones_mask(model, model.prune_scope()), 0.6, seed=0)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in mask}
    data, coll = (_pixel_items(model), default_collate) if name.startswith("vilt") else (tiny_task.train, collate)
    checked = []

    def check(step):
        for n, m in mask.items():
            assert torch.count_nonzero(params[n].detach()[~m]) == 0, (step, n)
        checked.append(step)

    train(model, mask, data, coll, TrainConfig(steps=2, batch_size=4, lr=1e-2, head_lr=1e-2, warmup=1,
                                               weight_decay=0.5, adversarial=ADV), progress=check)
    assert checked == [1, 2]
    assert any(not torch.equal(params[n].detach(), before[n]) for n in mask)  # kept weights do train


def test_a_modality_the_backbone_lacks_is_refused(tiny_model, tiny_task):
    tiny_model.adversarial_points = {"text": tiny_model.adversarial_points["text"]}
    with pytest.raises(ValueError, match="has no image embeddings"):
        perturbation_point(tiny_model, "image")
    with pytest.raises(ValueError, match="--adv-modality image"):
        train(tiny_model, None, tiny_task.train, collate,
              TrainConfig(steps=1, batch_size=4, warmup=1, adversarial=AdversarialConfig(True, adv_modality="image")))


def _imp(adversarial=None, levels=(0.5,)):
    return IMPConfig(model="uniter-tiny", task="tiny", levels=list(levels),
                     train=TrainConfig(steps=1, batch_size=8, warmup=1, adversarial=adversarial))


def test_ticket_header_records_the_training_and_resume_refuses_to_mix(tmp_path, tiny_task):
    assert "adversarial" not in _imp().identity()["train"]  # runs from before adversarial training still resume
    check_config(tmp_path / "std", _imp())
    with pytest.raises(RunError, match="another configuration"):
        check_config(tmp_path / "std", _imp(ADV))
    run_imp(tmp_path / "adv", _model("uniter-tiny"), tiny_task, collate, _imp(ADV))
    meta = Ticket.load(tmp_path / "adv" / "level_01" / "ticket.safetensors").meta
    assert meta["training"] == "adversarial"
    assert json.loads(meta["adversarial"]) == {"adversarial": True, "adv_steps": 2, "adv_lr": 0.05, "adv_eps": 0.1,
                                               "adv_kl_weight": 1.5, "adv_modality": "both", "adv_norm": "l2"}
    with pytest.raises(RunError, match="another configuration"):
        check_config(tmp_path / "adv", _imp())
    with pytest.raises(RunError, match="another configuration"):
        check_config(tmp_path / "adv", _imp(AdversarialConfig(True, adv_steps=3)))


def test_defaults_are_villas_and_off_means_none():
    cfg = AdversarialConfig(adversarial=True)
    assert (cfg.adv_steps, cfg.adv_lr, cfg.adv_eps, cfg.adv_kl_weight, cfg.adv_modality, cfg.adv_norm) == (
        3, 1e-3, None, 1.5, "text", "l2")
    assert adversarial_config(adv_steps=5) is None and adversarial_config(adversarial=True) == cfg


@pytest.mark.parametrize("args,fragment", [
    (["--adv-steps", "0"], "--adv-steps must be >= 1"), (["--adv-steps", "-2"], "--adv-steps must be >= 1"),
    (["--adv-eps", "0"], "--adv-eps must be > 0"), (["--adv-eps", "-0.1"], "--adv-eps must be > 0"),
    (["--adv-modality", "audio"], "--adv-modality must be one of text, image, both"),
    (["--adv-norm", "l1"], "--adv-norm must be one of l2, linf")])
def test_bad_adversarial_options_are_one_line_exit_2(args, fragment, tmp_path, monkeypatch, capsys):
    for command in (["find-ticket", "--sparsity", "0.5"], ["train-ticket", "--ticket", str(tmp_path / "t")]):
        monkeypatch.setattr(sys, "argv", ["vlsparse", *command, "--model", "uniter-tiny", "--out",
                                          str(tmp_path / "out"), "--adversarial", *args])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == [lines[0]] and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "out").exists()
