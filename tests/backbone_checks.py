"""End-to-end checks that every backbone must pass (used by test_lxmert.py and test_vilt.py):
one IMP round, re-training a ticket from θ0, a random ticket, CSR and ONNX export parity."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlsparse.data import collate
from vlsparse.export.exporters import export_csr, export_onnx, masked_copy
from vlsparse.runtime.load import load_sparse
from vlsparse.sparse.linear import SparseLinear
from vlsparse.lottery.imp import IMPConfig, run_imp
from vlsparse.pruning.magnitude import random_prune
from vlsparse.pruning.mask import Mask, ones_mask
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.loop import TrainConfig
from vlsparse.lottery.retrain import retrain_ticket


def imp_round(tmp_path: Path, make_model: Callable[[], torch.nn.Module], task,
              name: str) -> tuple[torch.nn.Module, Mask]:
    """find-ticket (one round to 50%), train-ticket (shuffled init) and random-ticket on ``task``.

    Returns the level-1 model (trained, pruned weights zero) and its mask.
    """
    train = TrainConfig(steps=3, batch_size=8, warmup=1)
    run = tmp_path / "run"
    res = run_imp(run, make_model(), task, collate, IMPConfig(model=name, task="tiny", levels=[0.5], train=train))
    assert [r["level"] for r in res] == [0, 1]
    model = make_model()
    scope = model.prune_scope()
    total = sum(model.get_parameter(n).numel() for n in scope)
    ticket = Ticket.load(run / "level_01" / "ticket.safetensors")
    assert sorted(ticket.mask) == sorted(scope)
    assert ticket.sparsity == pytest.approx(round(0.5 * total) / total)
    trained = load_file(str(run / "level_01" / "weights.safetensors"))
    assert all(not trained[n][~m].any() for n, m in ticket.mask.items())  # pruned weights stayed exactly zero
    theta0 = load_file(str(run / "theta0.safetensors"))
    assert any(not torch.equal(trained[n], theta0[n]) for n in scope)  # ... and the kept ones were trained

    m = retrain_ticket(ticket, model, task, collate, train, tmp_path / "retrain", theta0=run / "theta0.safetensors",
                       init="shuffled")
    assert m["sparsity"] == pytest.approx(ticket.sparsity) and 0.0 <= m["test"]["vqa_score"] <= 1.0
    rand = random_prune(ones_mask(model, scope), 0.5, seed=0)
    assert sorted(rand) == sorted(scope)
    assert 1 - sum(int(v.sum()) for v in rand.values()) / total == pytest.approx(round(0.5 * total) / total)
    model.load_state_dict(trained)
    return model.eval(), ticket.mask


def export_parity(tmp_path: Path, model: torch.nn.Module, mask: Mask, inputs: list[dict],
                  unused: frozenset[str] = frozenset()) -> None:
    """export_csr + load_sparse and export_onnx (dense and sparse) give the masked model's logits (<= 1e-4).

    The sparse ONNX graph has one SparseLinear per masked weight with >= 50% zeros (export_onnx's
    default min_sparsity), except the ``unused`` ones, which do not reach the logits (the exporter
    drops them from the graph).
    """
    import onnx
    import onnxruntime as ort

    from vlsparse.runtime.ort import ort_session

    ref = masked_copy(model, mask)
    sparse = load_sparse(export_csr(model, mask, tmp_path / "csr"), backend="dense")
    assert sorted(n + ".weight" for n, m in sparse.named_modules() if isinstance(m, SparseLinear)) == sorted(mask)
    sessions = {}
    for kind in (False, True):
        path = str(export_onnx(model, mask, tmp_path / f"onnx{int(kind)}", sparse=kind) / "model.onnx")
        ops = [n.op_type for n in onnx.load(path).graph.node]
        eligible = [n for n, m in mask.items() if n not in unused and 1 - m.float().mean() >= 0.5]
        assert ops.count("SparseLinear") == (len(eligible) if kind else 0)
        sessions[kind] = ort_session(path) if kind else ort.InferenceSession(path)
    for inp in inputs:
        with torch.no_grad():
            want = ref(**inp).numpy()
            np.testing.assert_allclose(sparse(**inp).numpy(), want, atol=1e-4, rtol=0)
        for session in sessions.values():
            got = session.run(None, {k: v.numpy() for k, v in inp.items()})[0]
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
