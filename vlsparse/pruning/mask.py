"""Masks: a dict ``parameter name -> bool tensor`` (True = kept) over a model's prune scope.

After open_lth's ``pruning/mask.py`` (Frankle et al.): a mask is plain data; sparsity is the
fraction of zeros over the whole prune scope (global), not an average over layers.
"""

from __future__ import annotations

import torch
from torch import nn

Mask = dict[str, torch.Tensor]


def ones_mask(model: nn.Module, scope: list[str]) -> Mask:
    """The dense mask (all True) over ``scope``; raises KeyError naming a scope entry the model lacks."""
    params = dict(model.named_parameters())
    missing = [n for n in scope if n not in params]
    if missing:
        raise KeyError(f"prune scope names parameters the model lacks: {missing[:3]}")
    return {n: torch.ones_like(params[n], dtype=torch.bool, device="cpu") for n in scope}


def sparsity(mask: Mask) -> float:
    """Global sparsity: pruned weights / all weights in the mask, a fraction in [0, 1]."""
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    return 1.0 - kept / total if total else 0.0


def layer_sparsity(mask: Mask) -> dict[str, float]:
    """Per-tensor sparsity (fraction of zeros) for every entry of ``mask``."""
    return {n: 1.0 - float(m.float().mean()) for n, m in mask.items()}


def overlap(a: Mask, b: Mask) -> float:
    """Mask similarity of Gan et al. (2022, sec. 5): |A ∩ B| / |A ∪ B| over the *pruned* weights.

    Returns a fraction in [0, 1] (1.0 when neither mask prunes anything).
    Raises ValueError when the masks have different names or shapes.
    """
    if a.keys() != b.keys() or any(a[n].shape != b[n].shape for n in a):
        raise ValueError("masks differ in parameter names or shapes: they come from different models")
    inter = sum(int((~a[n] & ~b[n]).sum()) for n in a)
    union = sum(int((~a[n] | ~b[n]).sum()) for n in a)
    return inter / union if union else 1.0


def random_overlap(sparsity_a: float, sparsity_b: float) -> float:
    """The :func:`overlap` expected of two independent uniformly random masks pruning the fractions
    ``sparsity_a`` and ``sparsity_b`` (in [0, 1]) of the same weights, for many weights:
    s_a s_b / (s_a + s_b - s_a s_b) (s / (2 - s) at equal sparsity s; 1.0 when neither prunes anything)."""
    union = sparsity_a + sparsity_b - sparsity_a * sparsity_b
    return sparsity_a * sparsity_b / union if union else 1.0


@torch.no_grad()
def apply_mask(model: nn.Module, mask: Mask) -> None:
    """Zero the pruned weights of ``model`` in place (weight *= mask)."""
    params = dict(model.named_parameters())
    for name, m in mask.items():
        params[name].mul_(m.to(params[name].device, params[name].dtype))


def check_mask_fits(mask: Mask, model: nn.Module, source: str) -> None:
    """Raise ValueError naming ``source`` if a mask key is not a model parameter or a shape differs."""
    params = dict(model.named_parameters())
    for name, m in mask.items():
        if name not in params:
            raise ValueError(f"{source}: mask entry {name!r} is not a parameter of the model")
        if tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(f"{source}: mask {name!r} has shape {tuple(m.shape)}, the model's weight "
                             f"{tuple(params[name].shape)}")
    scope = set(getattr(model, "prune_scope", lambda: mask.keys())())
    if scope != set(mask):
        raise ValueError(f"{source}: mask covers {len(mask)} tensors, the model's prune scope {len(scope)}")


def to_torch_prune_names(mask: Mask) -> dict[str, torch.Tensor]:
    """Rename to torch.nn.utils.prune's buffer names: ``<module>.weight`` -> ``<module>.weight_mask``
    (float32 0/1 tensors), for use with ``torch.nn.utils.prune.custom_from_mask``."""
    return {n.removesuffix("weight") + "weight_mask": m.float() for n, m in mask.items()}
