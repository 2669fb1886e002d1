"""UNITER: forward shapes, masking, MiniLM init against transformers' BertModel, save/load, official keys."""

from __future__ import annotations

import pytest
import torch
from transformers import BertModel

from vlsparse.models import PRESETS, CheckpointError, load_model
from vlsparse.models.checkpoints import map_official_uniter, minilm_dir

from .conftest import ANSWERS, IMG_DIM


def test_forward_shape_and_dtype(tiny_model, batch):
    out = tiny_model(**batch)
    assert out.shape == (5, len(ANSWERS)) and out.dtype == torch.float32


def test_padded_regions_and_tokens_do_not_change_outputs(tiny_model, batch):
    ref = tiny_model(**batch)
    padded = dict(batch)
    padded["img_feat"] = torch.cat([batch["img_feat"], torch.randn(5, 2, IMG_DIM) * 100], 1)
    padded["img_pos"] = torch.cat([batch["img_pos"], torch.rand(5, 2, 7)], 1)
    padded["img_mask"] = torch.cat([batch["img_mask"], torch.zeros(5, 2, dtype=torch.long)], 1)
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.full((5, 3), 7592)], 1)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(5, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(tiny_model(**padded), ref, rtol=1e-5, atol=1e-5)


def test_minilm_preset_matches_transformers_bert_mean_pooling(tokenizer):
    """With no regions, UNITER-MiniLM's pooled vector is MiniLM's mean-pooled sentence embedding."""
    model, _ = load_model("uniter-minilm", img_dim=IMG_DIM, num_answers=3)
    bert = BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
    enc = tokenizer(["what color is the circle?", "is there a red shape?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = bert(**enc).last_hidden_state
        ref = (ref * enc["attention_mask"][..., None]).sum(1) / enc["attention_mask"].sum(1, keepdim=True)
        ours, _ = model.uniter(enc["input_ids"], enc["attention_mask"], torch.zeros(2, 0, IMG_DIM),
                               torch.zeros(2, 0, 7), torch.zeros(2, 0, dtype=torch.long))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_save_pretrained_roundtrip(tmp_path, tiny_model, batch):
    tiny_model.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"), img_dim=IMG_DIM, num_answers=len(ANSWERS))
    torch.testing.assert_close(loaded(**batch), tiny_model(**batch), rtol=0, atol=0)
    # another task: the backbone is kept, the head is new (φ0 of the new size / kind)
    other, _ = load_model(str(tmp_path / "m"), img_dim=IMG_DIM, num_answers=99)
    assert other(**batch).shape == (5, 99)
    assert torch.equal(other.uniter.encoder.layer[0].output.dense.weight, tiny_model.uniter.encoder.layer[0].output.dense.weight)
    pair, _ = load_model(str(tmp_path / "m"), img_dim=IMG_DIM, num_answers=2, head="pair", num_images=2)
    assert pair.vqa_output[0].in_features == 2 * tiny_model.config.hidden_size
    with pytest.raises(CheckpointError, match="region features of size"):
        load_model(str(tmp_path / "m"), img_dim=IMG_DIM + 1, num_answers=len(ANSWERS))


def _official_style(state):
    """Rename to the official checkpoint's conventions: gamma/beta LayerNorms, module. prefix, heads."""
    out = {}
    for k, v in state.items():
        if "LayerNorm" in k or "layer_norm" in k or k == "vqa_output.2.weight" or k == "vqa_output.2.bias":
            k = k.replace(".weight", ".gamma").replace(".bias", ".beta")
        out["module." + k] = v
    out["module.cls.predictions.bias"] = torch.zeros(3)
    out["module.feat_regress.weight"] = torch.zeros(2, 2)
    return out


def test_official_checkpoint_key_mapping(tmp_path, batch):
    from vlsparse.models import UniterConfig, UniterForTask

    torch.manual_seed(0)  # official heads are 64 wide: heads = hidden / 64
    tiny_model = UniterForTask(UniterConfig(img_dim=IMG_DIM, num_answers=len(ANSWERS), hidden_size=128,
                                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)).eval()
    state = _official_style(tiny_model.state_dict())
    assert "module.uniter.embeddings.LayerNorm.gamma" in state
    mapped = map_official_uniter(state)
    assert set(mapped) == set(tiny_model.state_dict())
    path = tmp_path / "uniter.pt"
    torch.save(state, path)
    # official files use [CLS] pooling; uniter-tiny does too, so outputs are identical
    loaded, _ = load_model(str(path), img_dim=IMG_DIM, num_answers=len(ANSWERS))
    assert loaded.config.num_hidden_layers == 2 and loaded.config.hidden_size == 128
    torch.testing.assert_close(loaded(**batch), tiny_model(**batch), rtol=0, atol=0)
    # another answer vocabulary: the backbone loads, the head is new
    other, _ = load_model(str(path), img_dim=IMG_DIM, num_answers=7)
    assert torch.equal(other.uniter.encoder.layer[1].output.dense.weight, tiny_model.uniter.encoder.layer[1].output.dense.weight)


def test_bad_model_inputs(tmp_path):
    with pytest.raises(ValueError, match="not a preset"):
        load_model("uniter-huge")
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_model(str(bad))
    other = tmp_path / "bert.pt"
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(3, 4)}, other)
    with pytest.raises(CheckpointError, match="uniter"):
        load_model(str(other))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(str(tmp_path / "emptydir"))


def test_prune_scope_is_encoder_linears_only():
    model, _ = load_model("uniter-tiny")
    scope = model.prune_scope()
    assert len(scope) == 6 * 2
    assert all(n.startswith("uniter.encoder.layer.") and n.endswith(".weight") for n in scope)
    # hand count: per layer 4 x 64x64 (q, k, v, attn-out) + 2 x 64x128 (intermediate, output)
    params = dict(model.named_parameters())
    assert sum(params[n].numel() for n in scope) == 2 * (4 * 64 * 64 + 2 * 64 * 128)
    assert set(PRESETS) >= {"uniter-tiny", "uniter-minilm", "uniter-base"}
