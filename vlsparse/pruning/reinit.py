"""Initialisations for the ticket baselines of Gan et al. (2022), Table 1.

- ``pretrained``: θ0 itself (row 4): the weights of ``--model`` plus the task head φ0. For a VL-pre-trained
  model (``vlsparse pretrain``) that is pre-trained UNITER; for the MiniLM preset it is text-only weights.
- ``text-only``: θ'0 (row 6, "pre-trained BERT weights"): the text weights VL pre-training started from
  (``config.pretrained_from``) with freshly initialised image embeddings; φ0 kept. For a model that was not
  VL-pre-trained (its image embeddings are fresh already) this is θ0.
- ``shuffled``: θ''0 (row 7, "shuffling the pre-trained weights within each layer"): every pre-trained
  parameter, pre-trained image embeddings included, permuted within its tensor; the new parameters (the
  model's ``head_prefixes``: φ0, and image embeddings that were freshly initialised) keep θ0's values.
- ``random``: a fresh random initialisation of the pre-trained parameters (the model's own
  ``_init_weights``), φ0 again kept.
"""

from __future__ import annotations

import torch
from torch import nn

INITS = ("pretrained", "text-only", "shuffled", "random")


@torch.no_grad()
def reinitialize(model: nn.Module, init: str, seed: int = 0) -> None:
    """Re-initialise ``model`` in place (it must hold θ0); ``init`` is one of :data:`INITS`.

    ``text-only`` and ``random`` mark the image embeddings of a UNITER as fresh again
    (``config.img_embeddings_pretrained = False``), so that they train as new parameters.

    Raises:
        ValueError: unknown ``init``.
        CheckpointError: ``text-only`` whose source model (``config.pretrained_from``) cannot be loaded.
    """
    if init not in INITS:
        raise ValueError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "pretrained":
        return
    head = tuple(getattr(model, "head_prefixes", ()))
    if init == "text-only":
        _text_only(model, head, seed)
        return
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
    if init == "random" and hasattr(model.config, "img_embeddings_pretrained"):
        model.config.img_embeddings_pretrained = False


def _text_only(model: nn.Module, head: tuple[str, ...], seed: int) -> None:
    """θ'0: the parameters of ``config.pretrained_from`` (loaded with the seed's fresh image embeddings) for
    everything but the task head ``head``."""
    source = getattr(model.config, "pretrained_from", None)
    if not getattr(model.config, "img_embeddings_pretrained", False) or source is None:
        return  # the image embeddings are fresh already: θ0 is text-only
    from vlsparse.models.registry import load_model

    cfg = model.config
    text, _ = load_model(source, img_dim=cfg.img_dim, num_answers=cfg.num_answers, seed=seed, head=cfg.task_head,
                         num_images=getattr(cfg, "task_images", 1))
    own = dict(text.named_parameters())
    task_head = tuple(getattr(model, "task_head_prefixes", head))
    for name, p in model.named_parameters():
        if not name.startswith(task_head):
            p.copy_(own[name].to(p.device))
    model.config.img_embeddings_pretrained = False
