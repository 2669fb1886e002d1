"""Global magnitude pruning and random pruning over a prune scope.

Global magnitude pruning follows Han et al. (2015) as used by IMP in Gan et al. (2022, sec. 3,
Algorithm 1) and open_lth's ``pruning/sparse_global.py``: rank the magnitudes of all *kept*
weights in the scope together and remove the smallest until the target global sparsity is reached.
Ties are broken by position (torch.topk on the flattened vector), so results are deterministic.

Block pruning (``block=(rows, cols)``, e.g. (1, 4): 4 consecutive inputs of one output row, the groups the
int8 kernel's VNNI path multiplies): the same global ranking over whole blocks scored by their L2 norm
(group-lasso-style block magnitude, as in Narang et al. 2017 "Block-sparse recurrent neural networks" and
Gray et al. 2017's block-sparse kernels), so every mask is made of whole blocks; the target sparsity is
counted in blocks (= in weights, every block being the same size).
"""

from __future__ import annotations

import torch

from vlsparse.pruning.blocks import check_block
from vlsparse.pruning.mask import Mask


def _check_sparsity(target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {target}")


def _n_to_prune(mask: Mask, target: float) -> int:
    total = sum(m.numel() for m in mask.values())
    pruned = total - sum(int(m.sum()) for m in mask.values())
    want = round(target * total)
    if want >= total - len(mask) + 1 and want > pruned:  # fewer kept weights than pruned tensors
        raise ValueError(f"sparsity {target} keeps {total - want} of {total:,} weights, fewer than one per pruned "
                         f"tensor ({len(mask)}); a ticket keeps at least one weight in each: choose a lower sparsity")
    if want < pruned:
        raise ValueError(f"target sparsity {target} is below the mask's current sparsity {pruned / total:.4f}")
    return want - pruned


def _blocks(t: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """(out, in) -> (out / rows, in / cols, rows * cols): the weights of every block; ValueError if it does not divide."""
    (r, c), shape = block, tuple(t.shape)
    check_block({name: shape}, block)
    return t.reshape(shape[0] // r, r, shape[1] // c, c).transpose(1, 2).reshape(shape[0] // r, shape[1] // c, r * c)


def global_magnitude_prune(weights: dict[str, torch.Tensor], mask: Mask, target: float,
                           block: tuple[int, int] = (1, 1)) -> Mask:
    """Extend ``mask`` to global ``target`` sparsity by removing the smallest-magnitude kept weights.

    Args:
        weights: name -> trained weight tensor (any float dtype/device), the keys of ``mask``.
        mask: current mask (name -> bool tensor, True = kept); already-pruned weights stay pruned.
        target: global sparsity after pruning, a fraction in [0, 1).
        block: (rows, cols): prune whole blocks ranked by their L2 norm (module docstring); (1, 1): weights.

    Returns:
        a new mask (CPU bool tensors) with exactly ``round(target * total)`` zeros (in blocks: round(target *
        blocks) whole blocks pruned).

    Raises:
        ValueError: target outside [0, 1) or below the current sparsity; a weight whose shape the block does
            not divide (naming it).
    """
    if tuple(block) != (1, 1):
        return _block_prune(weights, mask, target, tuple(block))
    _check_sparsity(target)
    n = _n_to_prune(mask, target)
    names = list(mask)
    scores = torch.cat([torch.where(mask[k], weights[k].detach().abs().float().cpu(), torch.inf).flatten()
                        for k in names])
    flat = torch.cat([mask[k].flatten() for k in names]).clone()
    if n:
        flat[torch.topk(scores, n, largest=False, sorted=False).indices] = False
    return _unflatten(flat, mask)


def _block_prune(weights: dict[str, torch.Tensor], mask: Mask, target: float, block: tuple[int, int]) -> Mask:
    """:func:`global_magnitude_prune` over blocks: a block is kept while any of its weights is (block masks are
    exact, so all are); its score is the L2 norm of its weights."""
    bmask = {k: _blocks(m, block, k).any(-1) for k, m in mask.items()}  # (out / r, in / c) bool
    norms = {k: _blocks(weights[k].detach().float().cpu(), block, k).norm(dim=-1) for k in mask}
    kept = global_magnitude_prune(norms, bmask, target)
    r, c = block
    return {k: m.repeat_interleave(r, 0).repeat_interleave(c, 1) for k, m in kept.items()}


def random_prune(mask: Mask, target: float, seed: int = 0) -> Mask:
    """Random pruning baseline (Gan et al. 2022, Table 1 row 5): remove uniformly random kept weights
    over the whole scope until global ``target`` sparsity; same signature and errors as
    :func:`global_magnitude_prune`, reproducible from ``seed``."""
    _check_sparsity(target)
    n = _n_to_prune(mask, target)
    gen = torch.Generator().manual_seed(seed)
    flat = torch.cat([mask[k].flatten() for k in mask]).clone()
    kept = flat.nonzero().squeeze(1)
    flat[kept[torch.randperm(kept.numel(), generator=gen)[:n]]] = False
    return _unflatten(flat, mask)


def _unflatten(flat: torch.Tensor, like: Mask) -> Mask:
    """``flat`` as masks shaped like ``like``; ValueError when it empties a tensor that still had weights."""
    out, i = {}, 0
    for k, m in like.items():
        out[k] = flat[i:i + m.numel()].view(m.shape).clone()
        i += m.numel()
        if m.any() and not out[k].any():
            raise ValueError(f"this sparsity prunes every weight of {k}; a ticket keeps at least one weight per "
                             "pruned tensor: choose a lower sparsity")
    return out
