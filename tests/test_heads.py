"""Task heads on every backbone: pair, rank and region logits against the backbone's own encode()."""

from __future__ import annotations

import pytest
import torch

from vlsparse.models import load_model

BACKBONES = ["uniter-tiny", "lxmert-tiny", "vilt-tiny"]


def _model(name, head, answers, images=1):
    model, _ = load_model(name, img_dim=None if "vilt" in name else 12, num_answers=answers, head=head,
                          num_images=images, seed=0)
    return model.eval()


def _visual(x):
    return {k: v for k, v in x.items() if k not in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("name", BACKBONES)
def test_pair_head_concatenates_the_two_pooled_vectors(name):
    m = _model(name, "pair", 2, images=2)
    a, b = m.example_inputs(batch=3, seed=1), m.example_inputs(batch=3, seed=2)
    x = {"input_ids": a["input_ids"], "attention_mask": a["attention_mask"],
         **{k: torch.stack([a[k], b[k]], 1) for k in _visual(a)}}
    head = m.vqa_output if name.startswith("uniter") else (m.answer_head if name.startswith("lxmert") else m.classifier)
    with torch.no_grad():
        got = m(**x)
        pa = m.encode(a["input_ids"], a["attention_mask"], **_visual(a))[0]
        second = {"image_index": torch.ones(3, dtype=torch.long)} if name.startswith("vilt") else {}
        pb = m.encode(a["input_ids"], a["attention_mask"], **_visual(b), **second)[0]
        want = head(torch.cat([pa, pb], 1))
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_rank_head_scores_each_candidate_text_alone(name):
    m = _model(name, "rank", 1)
    x = m.example_inputs(batch=2, text_len=6)
    texts = torch.stack([x["input_ids"], x["input_ids"].flip(1), (x["input_ids"] + 1) % 900 + 1], 1)  # (2, 3, 6)
    with torch.no_grad():
        got = m(input_ids=texts, attention_mask=torch.ones_like(texts), **_visual(x))
        want = torch.stack([m(input_ids=texts[:, c], attention_mask=x["attention_mask"], **_visual(x))[:, 0]
                            for c in range(3)], 1)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:, 0], got[:, 1])  # the candidates are scored differently


@pytest.mark.parametrize("name", ["uniter-tiny", "lxmert-tiny"])
def test_region_head_one_score_per_region_padding_masked(name):
    m = _model(name, "region", 1)
    x = m.example_inputs(batch=2, regions=5)
    x["img_mask"][1, 3:] = 0
    with torch.no_grad():
        got = m(**x)
        _, hidden, _ = m.encode(**x)
        head = m.vqa_output if name.startswith("uniter") else m.answer_head
        want = head(hidden).squeeze(-1)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1, :3], want[1, :3])
    assert (got[1, 3:] == torch.finfo(torch.float32).min).all()


def test_vilt_box_pool_averages_the_patches_inside_each_box():
    m = _model("vilt-tiny", "region", 1)  # 96 px images, 32 px patches: a 3 x 3 grid, centres at 1/6, 1/2, 5/6
    patches = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1).expand(1, 9, 4).clone()
    mask = torch.ones(1, 96, 96, dtype=torch.long)
    boxes = torch.tensor([[[0.0, 0.0, 0.4, 0.4],     # only the top-left centre -> patch 0
                           [0.0, 0.0, 1.0, 0.3],     # top row -> patches 0, 1, 2
                           [0.55, 0.55, 0.6, 0.6],   # no centre inside; nearest centre (1/2, 1/2) -> patch 4
                           [0.4, 0.0, 1.0, 1.0]]])   # columns 2, 3 -> patches 1, 2, 4, 5, 7, 8
    got = m.box_pool(patches, (3, 3), mask, boxes)[0, :, 0]
    assert got.tolist() == pytest.approx([0.0, 1.0, 4.0, (1 + 2 + 4 + 5 + 7 + 8) / 6])
    # the real image is the top-left 64 x 96 of a padded 96 x 96: centres are measured in the real image
    mask[:, 64:, :] = 0
    got = m.box_pool(patches, (3, 3), mask, torch.tensor([[[0.0, 0.5, 1.0, 1.0]]]))[0, 0, 0]
    # row centres 16/64 = .25, 48/64 = .75, 80/64 = 1.25: only the middle row is in [0.5, 1]
    assert got.item() == pytest.approx(4.0)


def test_answer_head_is_unchanged_by_the_task_forward():
    m = _model("uniter-tiny", "answer", 5)
    x = m.example_inputs()
    with torch.no_grad():
        pooled, _ = m.uniter(**x)
        torch.testing.assert_close(m(**x), m.vqa_output(pooled))


def test_several_texts_and_several_images_refused():
    m = _model("uniter-tiny", "rank", 1)
    x = m.example_inputs(batch=2)
    with pytest.raises(ValueError, match="not both"):
        m(input_ids=x["input_ids"][:, None].expand(2, 2, -1), attention_mask=x["attention_mask"][:, None].expand(2, 2, -1),
          **{k: v[:, None].expand(2, 2, *v.shape[1:]) for k, v in _visual(x).items()})


@pytest.mark.parametrize("name", BACKBONES)
def test_rank_head_scores_each_candidate_image_alone(name):
    m = _model(name, "rank", 1)
    cands = [m.example_inputs(batch=2, seed=s) for s in range(4)]  # 4 candidate images per caption
    x = {"input_ids": cands[0]["input_ids"], "attention_mask": cands[0]["attention_mask"],
         **{k: torch.stack([c[k] for c in cands], 1) for k in _visual(cands[0])}}
    with torch.no_grad():
        got = m(**x)
        want = torch.stack([m(input_ids=x["input_ids"], attention_mask=x["attention_mask"], **_visual(c))[:, 0]
                            for c in cands], 1)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
