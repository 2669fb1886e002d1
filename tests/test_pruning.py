"""Masks, global magnitude and random pruning, tickets, schedules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from vlsparse.lottery.imp import schedule
from vlsparse.pruning.magnitude import global_magnitude_prune, random_prune
from vlsparse.pruning.mask import layer_sparsity, ones_mask, overlap, sparsity, to_torch_prune_names
from vlsparse.pruning.ticket import Ticket, TicketError


def _layers(seed=0):
    torch.manual_seed(seed)
    return nn.ModuleDict({"a": nn.Linear(20, 30), "b": nn.Linear(30, 10), "c": nn.Linear(10, 7)})


def _mask_of(layers):
    return {f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}


def test_global_magnitude_matches_torch_prune_global_unstructured():
    ours_layers, ref_layers = _layers(), _layers()
    mask = _mask_of(ours_layers)
    total = sum(m.numel() for m in mask.values())
    params = [(m, "weight") for m in ref_layers.values()]
    for target in (0.3, 0.55, 0.8):  # iterative: each round prunes among the remaining weights
        weights = {f"{n}.weight": m.weight for n, m in ours_layers.items()}
        n_new = round(target * total) - (total - sum(int(v.sum()) for v in mask.values()))
        mask = global_magnitude_prune(weights, mask, target)
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=n_new)
        for n, m in ref_layers.items():
            assert torch.equal(mask[f"{n}.weight"], m.weight_mask.bool()), (target, n)
        assert sparsity(mask) == pytest.approx(round(target * total) / total)


def test_global_magnitude_keeps_pruned_weights_pruned_even_if_large():
    w = {"x": torch.tensor([[5.0, 0.1, 0.2, 3.0]])}
    m = {"x": torch.tensor([[False, True, True, True]])}
    out = global_magnitude_prune(w, m, 0.5)
    assert out["x"].tolist() == [[False, False, True, True]]  # 0.1 is the smallest *kept* weight


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match="sparsity"):
        global_magnitude_prune({"x": torch.ones(3)}, {"x": torch.ones(3, dtype=torch.bool)}, bad)
    with pytest.raises(ValueError, match="sparsity"):
        random_prune({"x": torch.ones(3, dtype=torch.bool)}, bad)


def test_target_below_current_sparsity():
    m = {"x": torch.tensor([False, False, True, True])}
    with pytest.raises(ValueError, match="below"):
        global_magnitude_prune({"x": torch.ones(4)}, m, 0.25)


def test_random_prune_exact_count_reproducible_and_nested():
    base = _mask_of(_layers())
    total = sum(m.numel() for m in base.values())
    a, b, c = random_prune(base, 0.7, seed=1), random_prune(base, 0.7, seed=1), random_prune(base, 0.7, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert sum(int(v.sum()) for v in a.values()) == total - round(0.7 * total)
    d = random_prune(a, 0.9, seed=3)
    assert all(not (d[k] & ~a[k]).any() for k in a)  # never revives a pruned weight
    # roughly uniform over layers (global random pruning): every layer near 70%
    assert all(abs(s - 0.7) < 0.12 for s in layer_sparsity(a).values())


def test_overlap_hand_computed():
    a = {"x": torch.tensor([False, False, True, True, True])}
    b = {"x": torch.tensor([False, True, False, True, True])}
    assert overlap(a, b) == pytest.approx(1 / 3)  # pruned {0,1} vs {0,2}: |∩|=1, |∪|=3
    assert overlap(a, a) == 1.0
    with pytest.raises(ValueError):
        overlap(a, {"y": a["x"]})


def test_torch_prune_names_reproduce_masked_weights():
    layers = _layers()
    mask = random_prune(_mask_of(layers), 0.5, seed=0)
    named = to_torch_prune_names(mask)
    for n, m in layers.items():
        expected = m.weight.detach() * mask[f"{n}.weight"]
        prune.custom_from_mask(m, "weight", named[f"{n}.weight_mask"])
        assert torch.equal(m.weight, expected)


def test_ticket_roundtrip_metadata_and_no_overwrite(tmp_path):
    mask = random_prune(_mask_of(_layers()), 0.4, seed=0)
    path = tmp_path / "t.safetensors"
    Ticket(mask, {"model": "m", "imp_round": "3"}).save(path)
    t = Ticket.load(path)
    assert all(torch.equal(t.mask[k], mask[k]) for k in mask)
    assert t.meta["model"] == "m" and t.meta["imp_round"] == "3"
    assert float(t.meta["sparsity"]) == pytest.approx(sparsity(mask), abs=1e-6)
    before = path.read_bytes()
    with pytest.raises(TicketError, match="refusing to overwrite"):
        Ticket(ones_mask(_layers(), list(mask)), {}).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temp files left


def test_ticket_load_errors(tmp_path):
    with pytest.raises(TicketError, match="not found"):
        Ticket.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(TicketError, match="bad.safetensors"):
        Ticket.load(bad)
    from safetensors.torch import save_file
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    with pytest.raises(TicketError, match="not a vlsparse ticket"):
        Ticket.load(other)


def test_schedules():
    assert schedule(0.5) == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert schedule(0.35) == [0.1, 0.2, 0.3, 0.35]
    assert schedule(0.3, rate=0.1) == [0.1, 0.19, 0.271, 0.3]
    assert schedule(0.0) == []
    with pytest.raises(ValueError):
        schedule(1.0)
