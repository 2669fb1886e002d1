"""Tickets: a mask plus metadata, stored as one safetensors file.

Format: one bool tensor per pruned parameter, keyed by its ``state_dict`` name (True = kept), and
string metadata in the safetensors header: ``model``, ``task``, ``target_sparsity``,
``sparsity`` (actual, global over the scope), ``imp_round``, ``rewind_step``, ``seed``,
``val_metric`` (validation metric of the trained round that produced the mask, JSON),
``method`` (imp | random), ``training`` (standard | adversarial) with ``adversarial`` (its settings, JSON;
:func:`vlsparse.training.adversarial_config.training_meta`), ``vlsparse_version``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from vlsparse._version import __version__
from vlsparse.atomic import atomic_write
from vlsparse.pruning.mask import Mask, sparsity, to_torch_prune_names


class TicketError(ValueError):
    """A ticket file is missing, corrupt, would be overwritten, or does not fit a model."""


@dataclass
class Ticket:
    """A pruning mask with its provenance.

    Attributes:
        mask: name -> bool tensor (True = kept), one per weight in the prune scope.
        meta: provenance strings (see module docstring); ``sparsity`` is filled on save.
    """

    mask: Mask
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Global sparsity over the scope, a fraction in [0, 1)."""
        return sparsity(self.mask)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the ticket atomically to ``path``.

        Raises:
            TicketError: ``path`` exists and ``overwrite`` is False (tickets are never silently replaced).
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise TicketError(f"{path}: a ticket already exists; refusing to overwrite it")
        meta = {k: str(v) for k, v in self.meta.items()}
        meta.update(sparsity=f"{self.sparsity:.6f}", vlsparse_version=__version__, format="vlsparse-ticket-1")
        tensors = {k: v.to(torch.bool).contiguous().cpu() for k, v in self.mask.items()}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "Ticket":
        """Read a ticket file.

        Raises:
            TicketError: missing file, not a safetensors file, or tensors that are not bool masks.
        """
        path = Path(path)
        if not path.is_file():
            raise TicketError(f"{path}: ticket file not found")
        try:
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
            mask = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TicketError(f"{path}: not a readable ticket (safetensors: {exc})") from exc
        if meta.get("format") != "vlsparse-ticket-1":
            raise TicketError(f"{path}: not a vlsparse ticket (header lacks format=vlsparse-ticket-1)")
        bad = [k for k, v in mask.items() if v.dtype != torch.bool]
        if bad:
            raise TicketError(f"{path}: mask {bad[0]!r} is {mask[bad[0]].dtype}, expected bool")
        return cls(mask=mask, meta=meta)

    def metric(self) -> dict:
        """The validation metric stored with the ticket (dict, possibly empty)."""
        return json.loads(self.meta.get("val_metric", "{}") or "{}")


def save_torch_prune_masks(ticket: str | Path, out: str | Path) -> dict[str, torch.Tensor]:
    """Write the masks of the ticket file ``ticket`` under torch.nn.utils.prune's names (``<module>.weight_mask``,
    float32 0/1; :func:`vlsparse.pruning.mask.to_torch_prune_names`) to the safetensors file ``out``; returns them.

    Raises:
        TicketError: ``out`` exists (never overwritten), or ``ticket`` is missing or not a ticket.
    """
    out = Path(out)
    if out.exists():
        raise TicketError(f"{out}: exists; refusing to overwrite")
    masks = to_torch_prune_names(Ticket.load(ticket).mask)
    atomic_write(out, lambda tmp: save_file(masks, tmp))
    return masks


__all__ = ["Ticket", "TicketError", "save_torch_prune_masks"]
