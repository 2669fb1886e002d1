"""Issue 17, items 2 and 7: export refuses non-finite weights naming the tensor; `predict --json` is always valid
JSON and says when the question was cut; a ticket keeps at least one weight per pruned tensor (random-ticket
--sparsity 0.99999999 used to write a 100%-pruned ticket)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.tiny_bundles import tiny_bundles
from vlsparse.export.exporters import export_csr, export_onnx
from vlsparse.runtime.load import ExportError
from vlsparse.pruning.magnitude import global_magnitude_prune, random_prune
from vlsparse.pruning.mask import ones_mask


@pytest.mark.parametrize("export", [export_csr, export_onnx])
def test_export_refuses_a_nan_weight_naming_the_tensor(tmp_path, tiny_model, export):
    mask = ones_mask(tiny_model, tiny_model.prune_scope())
    name = sorted(mask)[3]
    with torch.no_grad():
        dict(tiny_model.named_parameters())[name][0, 0] = float("nan")
    with pytest.raises(ExportError, match=rf"{name}: 1 non-finite value"):
        export(tiny_model, mask, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_ticket_keeps_at_least_one_weight_per_tensor(tiny_model):
    mask = ones_mask(tiny_model, tiny_model.prune_scope())  # 65,536 weights in 12 tensors
    for prune in (lambda m, s: random_prune(m, s), lambda m, s: global_magnitude_prune(
            dict(tiny_model.named_parameters()), m, s)):
        with pytest.raises(ValueError, match="keeps 0 of 65,536 weights, fewer than one per pruned tensor"):
            prune(mask, 0.99999999)
        assert all(m.any() for m in prune(mask, 0.99).values())
    weights = {"big": torch.full((4, 4), 100.0), "small": torch.full((4, 4), 0.01)}
    with pytest.raises(ValueError, match="prunes every weight of small"):
        global_magnitude_prune(weights, {k: torch.ones(4, 4, dtype=torch.bool) for k in weights}, 0.5)


def test_cli_random_ticket_refuses_a_sparsity_that_rounds_to_everything(tmp_path):
    from typer.testing import CliRunner

    from vlsparse.cli import app

    r = CliRunner().invoke(app, ["random-ticket", "--model", "uniter-tiny", "--sparsity", "0.99999999", "--out",
                                 str(tmp_path / "t.safetensors")])
    assert r.exit_code != 0 and "fewer than one per pruned tensor" in str(r.exception)
    assert not (tmp_path / "t.safetensors").exists()


def test_predict_json_says_when_the_question_was_cut(tmp_path):
    from typer.testing import CliRunner

    from vlsparse.cli import app

    image = tmp_path / "x.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    args = ["predict", "--model", str(tiny_bundles()["onnx"]), "--image", str(image), "--json", "--question"]
    long = CliRunner().invoke(app, args + [" ".join(["what"] * 500)])
    assert long.exit_code == 0, long.output
    out = json.loads(long.stdout)
    assert out["truncated"] is True and "truncated to 12 tokens" in out["warning"] and len(out["answers"]) == 5
    short = json.loads(CliRunner().invoke(app, args + ["what color?"]).stdout)
    assert short["truncated"] is False and short["warning"] is None


def test_a_killed_exports_temporary_directory_is_removed_by_the_next_export(tmp_path, tiny_model):
    left = tmp_path / ".out.tmp-k1ll3d_x"  # what a SIGKILLed export of tmp_path/out leaves (55 MB for the main model)
    left.mkdir()
    (left / "model.onnx").write_bytes(b"partial")
    other = tmp_path / ".other.tmp-abcd1234"  # another export's: not ours to remove
    other.mkdir()
    export_csr(tiny_model, ones_mask(tiny_model, tiny_model.prune_scope()), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-abcd1234", "out"]
