"""VL pre-training (issue 11): UNITER hidden states, new-parameter prefixes, objectives, corpus, inits."""

from __future__ import annotations

import torch

from vlsparse.models import load_model


def test_uniter_returns_text_and_region_hidden_states(tiny_model, batch):
    pooled, regions, text = tiny_model.uniter(**batch, return_text=True)
    b, length = batch["input_ids"].shape
    h = tiny_model.config.hidden_size
    assert pooled.shape == (b, h) and regions.shape == (b, batch["img_feat"].shape[1], h) and text.shape == (b, length, h)
    p2, r2 = tiny_model.uniter(**batch)
    assert torch.equal(p2, pooled) and torch.equal(r2, regions)


def test_image_embeddings_are_new_only_when_fresh():
    model, _ = load_model("uniter-tiny", img_dim=12, num_answers=4)
    assert model.head_prefixes == ("uniter.img_embeddings.", "vqa_output.")
    model.config.img_embeddings_pretrained = True
    assert model.head_prefixes == ("vqa_output.",)
