"""Block tickets (`find-ticket --block 1x4`): whole blocks pruned by L2 norm, globally, nested across IMP levels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsparse.data import collate
from vlsparse.lottery.imp import IMPConfig, run_imp
from vlsparse.models import load_model
from vlsparse.pruning.blocks import parse_block
from vlsparse.pruning.magnitude import global_magnitude_prune
from vlsparse.pruning.mask import ones_mask
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.loop import TrainConfig

from .conftest import ANSWERS, IMG_DIM


def _np_blocks(m: np.ndarray, r: int, c: int) -> np.ndarray:
    """(out, in) -> (out/r, in/c, r*c), independently of the code under test."""
    o, i = m.shape
    return m.reshape(o // r, r, i // c, c).swapaxes(1, 2).reshape(o // r, i // c, r * c)


def _exact_blocks(mask: dict, r: int, c: int) -> bool:
    return all(((b := _np_blocks(m.numpy(), r, c)).all(-1) | ~b.any(-1)).all() for m in mask.values())


@pytest.mark.parametrize("block", [(1, 4), (1, 8), (2, 2)])
def test_block_prune_removes_the_smallest_l2_blocks_globally(block):
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(16, 32, generator=g), "b": torch.randn(32, 16, generator=g) * 0.9}
    mask = global_magnitude_prune(weights, {k: torch.ones_like(w, dtype=torch.bool) for k, w in weights.items()},
                                  0.7, block)
    r, c = block
    assert _exact_blocks(mask, r, c)
    norms = np.concatenate([np.linalg.norm(_np_blocks(w.numpy(), r, c), axis=-1).ravel() for w in weights.values()])
    kept = np.concatenate([_np_blocks(m.numpy(), r, c).all(-1).ravel() for m in mask.values()])
    assert (~kept).sum() == round(0.7 * kept.size)
    assert norms[~kept].max() <= norms[kept].min()  # every pruned block is smaller than every kept one


def test_bad_block_shapes_are_one_line_errors():
    w = {"enc.weight": torch.randn(8, 10)}
    with pytest.raises(ValueError) as info:
        global_magnitude_prune(w, {"enc.weight": torch.ones(8, 10, dtype=torch.bool)}, 0.5, (1, 4))
    assert "\n" not in str(info.value) and "enc.weight of shape (8, 10) does not divide into 1x4" in str(info.value)
    for bad in ("4", "1x0", "ax4", "1x4x2", "1x65"):
        with pytest.raises(ValueError, match="--block must be ROWSxCOLS"):
            parse_block(bad)
    assert parse_block("1x4") == (1, 4)


def test_block_imp_tickets_are_exact_nested_blocks_with_the_shape_in_their_metadata(tmp_path, tiny_task):
    model = load_model("uniter-tiny", img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=0)[0]
    cfg = IMPConfig(model="uniter-tiny", task="tiny", levels=[0.5, 0.7], block="1x4",
                    train=TrainConfig(steps=2, batch_size=8, warmup=1))
    res = run_imp(tmp_path, model, tiny_task, collate, cfg)
    tickets = [Ticket.load(tmp_path / f"level_{k:02d}" / "ticket.safetensors") for k in (1, 2)]
    for t, target in zip(tickets, (0.5, 0.7)):
        assert _exact_blocks(t.mask, 1, 4) and t.meta["block"] == "1x4"
        assert abs(t.sparsity - target) < 1e-3
    assert all(bool((tickets[1].mask[k] <= tickets[0].mask[k]).all()) for k in tickets[0].mask)  # nested
    assert [r["level"] for r in res] == [0, 1, 2]
    with pytest.raises(ValueError, match="does not divide into 1x5 blocks"):
        run_imp(tmp_path / "bad", model, tiny_task, collate,
                IMPConfig(model="uniter-tiny", task="tiny", levels=[0.5], block="1x5", train=cfg.train))
    assert not (tmp_path / "bad" / "theta0.safetensors").exists()  # refused before anything was written
    assert ones_mask(model, model.prune_scope())  # the scope the check covered
