"""The model inputs of region-feature backbones (UNITER, LXMERT): names, dynamic axes, examples."""

from __future__ import annotations

import torch

#: model inputs in order, with their dynamic axes (ONNX export)
REGION_INPUT_AXES = {"input_ids": ("batch", "text"), "attention_mask": ("batch", "text"),
                     "img_feat": ("batch", "regions"), "img_pos": ("batch", "regions"),
                     "img_mask": ("batch", "regions")}


def region_example_inputs(vocab_size: int, img_dim: int, batch: int = 2, text_len: int = 8, regions: int = 6,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Random but valid inputs (for export and benchmarks): input_ids (batch, text_len) int64 in
    [1, min(vocab_size, 1000)), attention_mask (batch, text_len) int64 ones, img_feat (batch, regions,
    img_dim) float32 N(0, 1), img_pos (batch, regions, 7) float32 in [0, 1), img_mask (batch, regions) ones."""
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, min(vocab_size, 1000), (batch, text_len), generator=g),
            "attention_mask": torch.ones(batch, text_len, dtype=torch.long),
            "img_feat": torch.randn(batch, regions, img_dim, generator=g),
            "img_pos": torch.rand(batch, regions, 7, generator=g),
            "img_mask": torch.ones(batch, regions, dtype=torch.long)}
