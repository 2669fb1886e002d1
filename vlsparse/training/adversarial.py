"""Adversarial training in the embedding space, VILLA's finetuning stage (Gan et al. 2020, "Large-Scale
Adversarial Training for Vision-and-Language Representation Learning", Section 3; code: zhegan27/VILLA
``train_vqa_adv.py``), for every backbone; settings in :mod:`vlsparse.training.adversarial_config`.

One training step (:func:`adversarial_backward`), for each perturbed modality m in turn (one at a time):

1. a clean forward pass gives the logits z (B, O) (shared by all modalities; not detached, as in VILLA);
2. δ_m starts at zero (VILLA: "for simplicity, we initialize the delta as zero vectors");
3. K times: forward with δ_m added at the modality's embedding, loss
   ``L = task_loss(z_adv, targets) + w * SKL(z, z_adv)``, backward of ``L / (K * M)`` (M modalities), which
   accumulates the parameter gradients over the K passes (FreeLB, Zhu et al. 2020); then, except after the
   last pass, one ascent step ``δ <- Π_ε(δ + lr * g / ||g||)`` with g = dL/dδ and the norm per example
   (:func:`ascent_step`);

then the optimizer steps once on the accumulated gradients. So a step costs 1 + K * M forward and K * M backward
passes (K = 3, text only: about 4x plain training). SKL is the symmetric KL divergence between the softmax
answer distributions (VILLA's "adversarial regularization", :func:`symmetric_kl`).

Each backbone names where δ goes in its ``adversarial_points`` attribute, modality -> (module name, "output" |
"input"): a forward hook adds δ to that module's output, a forward pre-hook to its first input
(:func:`perturbation`); no forward pass is copied. Masked training is unchanged: the mask's gradient hooks act
on every backward, so pruned weights stay exactly zero (tests/test_adversarial.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vlsparse.training.adversarial_config import AdversarialConfig


def perturbation_point(model: nn.Module, modality: str) -> tuple[nn.Module, str]:
    """The module where ``modality``'s perturbation is added, and "output" or "input".

    Raises:
        ValueError: the model names no such point (a modality the backbone lacks).
    """
    points = getattr(model, "adversarial_points", {})
    if modality not in points:
        have = ", ".join(points) or "none"
        raise ValueError(f"--adv-modality {modality}: {type(model).__name__} has no {modality} embeddings to "
                         f"perturb (it has: {have})")
    name, where = points[modality]
    return model.get_submodule(name), where


class Delta:
    """The perturbation δ of one modality for one batch: created as zeros on the first forward pass (its shape,
    dtype and device are those of the perturbed tensor, e.g. (B, L, h) float32), a leaf that requires grad."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> torch.Tensor:
        """``x + δ``; δ = zeros_like(x) on first use."""
        if self.value is None:
            self.value = torch.zeros_like(x, requires_grad=True)
        return x + self.value

    def step(self, lr: float, eps: float | None, norm: str) -> None:
        """One projected ascent step along ``value.grad`` (:func:`ascent_step`); the new δ is a fresh leaf."""
        grad = self.value.grad if self.value.grad is not None else torch.zeros_like(self.value)
        self.value = ascent_step(self.value.detach(), grad, lr, eps, norm).requires_grad_()


@contextmanager
def perturbation(model: nn.Module, modality: str) -> Iterator[Delta]:
    """Within the block, every forward pass of ``model`` adds the yielded :class:`Delta` at ``modality``'s point.

    The hook is removed on exit. A point module called several times per forward pass (with one shape) gets
    the same δ each time.

    Raises:
        ValueError: see :func:`perturbation_point`.
    """
    module, where = perturbation_point(model, modality)
    delta = Delta()
    if where == "input":
        handle = module.register_forward_pre_hook(lambda mod, args: (delta.add(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(lambda mod, args, out: delta.add(out))
    try:
        yield delta
    finally:
        handle.remove()


def _per_example_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    """(B, ...) -> (B, 1, ..., 1): the L2 or L-inf norm of each example over all its other dimensions."""
    flat = x.flatten(1)
    n = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    return n.view(-1, *([1] * (x.dim() - 1)))


def project(delta: torch.Tensor, eps: float | None, norm: str) -> torch.Tensor:
    """Π_ε: ``delta`` (B, ...) onto the ball of radius ``eps`` per example (L2: rescale the examples outside it,
    VILLA's ``adv_max_norm``; L-inf: clamp every entry to [-eps, eps]); ``eps`` None: unchanged; 0: zeros."""
    if eps is None:
        return delta
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _per_example_norm(delta, "l2")
    return delta * torch.where(n > eps, eps / n.clamp(min=1e-30), torch.ones_like(n))


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, lr: float, eps: float | None, norm: str) -> torch.Tensor:
    """``Π_ε(delta + lr * grad / ||grad||)``, norms per example (VILLA ``train_vqa_adv.py``: the gradient is
    divided by its L2 norm, or by its L-inf norm for "linf", clamped at 1e-8; then the projection).

    Args:
        delta, grad: (B, ...) float tensors of one shape (embedding units).
        lr: step size (> 0); eps: ball radius or None (unbounded); norm: "l2" | "linf".

    Returns:
        the new delta, (B, ...), not requiring grad.
    """
    step = lr * grad / _per_example_norm(grad, norm).clamp(min=1e-8)
    return project((delta + step).detach(), eps, norm)


def symmetric_kl(logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """KL(p || q) + KL(q || p), p = softmax(clean), q = softmax(logits) over the last dimension, summed over it
    and averaged over the batch: a scalar (nats), exactly 0 for identical logits (VILLA: ``kl_div`` both ways,
    ``mean() * num_answers``). Args: (B, O) logits, any float dtype (computed in float32)."""
    lq, lp = F.log_softmax(logits.float(), dim=-1), F.log_softmax(clean.float(), dim=-1)
    return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1).mean()


def adversarial_backward(model: nn.Module, batch: dict, targets: torch.Tensor, objective,
                         cfg: AdversarialConfig) -> torch.Tensor:
    """Accumulate one step's adversarial gradients into the parameters' ``.grad`` (see the module docstring).

    Args:
        model: a vlsparse model (``forward(**batch) -> (B, O) logits``, ``adversarial_points``), in train mode.
        batch: the model inputs (on the model's device); targets: (B, O) float32.
        objective: has ``compute_loss(logits, targets) -> scalar`` (:mod:`vlsparse.data.objective`).
        cfg: the adversarial settings.

    Returns:
        the loss that was backpropagated (a detached scalar): the mean over modalities and passes of
        ``task_loss + adv_kl_weight * SKL``. With a zero perturbation (e.g. a ball of radius 0) and no dropout
        it equals the plain task loss, and so do the gradients.

    Raises:
        ValueError: the backbone lacks a perturbed modality (before any forward pass).
    """
    for m in cfg.modalities:
        perturbation_point(model, m)
    clean = model(**batch)  # (B, O)
    scale = 1.0 / (cfg.adv_steps * len(cfg.modalities))
    total = torch.zeros((), device=clean.device)
    for m in cfg.modalities:
        with perturbation(model, m) as delta:
            for k in range(cfg.adv_steps):
                logits = model(**batch)  # (B, O)
                loss = objective.compute_loss(logits, targets) + cfg.adv_kl_weight * symmetric_kl(logits, clean)
                (loss * scale).backward(retain_graph=True)  # the clean graph serves every pass
                total += loss.detach() * scale
                if k + 1 < cfg.adv_steps:
                    delta.step(cfg.adv_lr, cfg.adv_eps, cfg.adv_norm)
    return total


def backward_step(model: nn.Module, objective, cfg: AdversarialConfig | None) -> Callable[[dict, torch.Tensor],
                                                                                          torch.Tensor]:
    """The training loop's loss-and-backward of one step: ``f(batch, targets) -> loss`` (detached scalar), plain
    (``objective.compute_loss(model(**batch), targets).backward()``) for ``cfg`` None, else
    :func:`adversarial_backward`.

    Raises:
        ValueError: the backbone lacks a perturbed modality (checked here, before training starts).
    """
    if cfg is None:
        def plain(batch: dict, targets: torch.Tensor) -> torch.Tensor:
            loss = objective.compute_loss(model(**batch), targets)
            loss.backward()
            return loss.detach()
        return plain
    for m in cfg.modalities:
        perturbation_point(model, m)
    return lambda batch, targets: adversarial_backward(model, batch, targets, objective, cfg)


__all__ = ["Delta", "adversarial_backward", "ascent_step", "backward_step", "perturbation", "perturbation_point",
           "project", "symmetric_kl"]
