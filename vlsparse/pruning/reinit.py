"""Initialisations for the ticket baselines of Gan et al. (2022), Table 1.

- ``pretrained``: θ0 itself (row 4; for the MiniLM preset this is the paper's θ'0, text-only BERT
  weights, row 6).
- ``shuffled``: θ''0, the pre-trained weights permuted within each tensor (row 7, "shuffling the
  pre-trained weights within each layer"). Every pre-trained parameter is shuffled; the new task
  parameters (the model's ``head_prefixes``: image embeddings and head φ0) keep θ0's values.
- ``random``: a fresh random initialisation of the pre-trained parameters (the model's own
  ``_init_weights``), φ0 again kept.
"""

from __future__ import annotations

import torch
from torch import nn

INITS = ("pretrained", "shuffled", "random")


@torch.no_grad()
def reinitialize(model: nn.Module, init: str, seed: int = 0) -> None:
    """Re-initialise ``model`` in place (it must hold θ0); ``init`` is one of :data:`INITS`.

    Raises:
        ValueError: unknown ``init``.
    """
    if init not in INITS:
        raise ValueError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "pretrained":
        return
    head = tuple(getattr(model, "head_prefixes", ()))
    gen = torch.Generator().manual_seed(seed)
    fresh = None
    if init == "random":
        torch.manual_seed(seed)
        fresh = dict(type(model)(model.config).named_parameters())
    for name, p in model.named_parameters():
        if name.startswith(head):
            continue
        if init == "shuffled":
            flat = p.detach().flatten()
            p.copy_(flat[torch.randperm(flat.numel(), generator=gen).to(flat.device)].view_as(p))
        else:
            p.copy_(fresh[name])
