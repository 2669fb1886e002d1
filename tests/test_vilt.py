"""ViLT: pixel data through ViltImageProcessor, the deterministic full-patch embedding against
transformers' ViltForQuestionAnswering, checkpoint loading, prune scope, one IMP round, re-training,
random tickets and export (ONNX works with the deterministic embedding)."""

from __future__ import annotations

import pytest
import torch
from transformers import (ViltConfig, ViltForImageAndTextRetrieval, ViltForImagesAndTextClassification,
                          ViltForQuestionAnswering)

from vlsparse.data import collate, load_task
from vlsparse.data.visual.pixels import PixelImages, image_processor
from vlsparse.data.dataset import TaskData, VLDataset, VLExample
from vlsparse.models import PRESETS, ViltForTask, dims_from_state, load_model, visual_input

from .backbone_checks import export_parity, imp_round

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=96,
            patch_size=32)


@pytest.fixture(scope="module")
def easy():
    import easy_vqa

    return easy_vqa


@pytest.fixture(scope="module")
def pixel_task(tokenizer, easy) -> TaskData:
    """12 easy-VQA train images at 96 px: questions of images 0-7 train, 8-9 val, 10-11 test."""
    paths = easy.get_train_image_paths()
    images = PixelImages({i: paths[i] for i in range(12)}, 96)
    answers = list(easy.get_answers())
    examples = [VLExample(q, int(i), {a: 1.0}) for q, a, i in zip(*easy.get_train_questions()) if int(i) < 12]
    parts = [[e for e in examples if lo <= e.image_id < hi] for lo, hi in ((0, 8), (8, 10), (10, 12))]
    ds = [VLDataset(p, images, tokenizer, answers, max_text_len=20) for p in parts]
    return TaskData("tiny-pixels", *ds, answers, None, visual="pixels")


def _tiny(num_answers=13, seed=0):
    return load_model("vilt-tiny", num_answers=num_answers, seed=seed)[0]


def _inputs(model, size=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    inp = model.example_inputs(batch=3, text_len=9, seed=seed)
    inp["attention_mask"][1, 5:] = 0
    inp["pixel_values"] = torch.randn(3, 3, size, size, generator=g)
    inp["pixel_mask"] = torch.ones(3, size, size, dtype=torch.long)
    return inp


def test_pixel_images_equal_the_processor_and_collate_pads(easy):
    path = easy.get_train_image_paths()[3]
    values, mask = PixelImages({3: path}, 96)[3]
    from PIL import Image

    ref = image_processor(96)(Image.open(path).convert("RGB"), return_tensors="pt")
    assert values.shape == (3, 96, 96) and values.dtype == torch.float32
    torch.testing.assert_close(values, ref["pixel_values"][0], atol=1e-6, rtol=0)
    assert torch.equal(mask, ref["pixel_mask"][0])
    with pytest.raises(ValueError, match="multiple of 32"):
        image_processor(100)
    items = [{"input_ids": torch.tensor([101, 7, 102]), "attention_mask": torch.ones(3, dtype=torch.long),
              "pixel_values": torch.ones(3, 64, 96),
              "pixel_mask": torch.ones(64, 96, dtype=torch.long), "targets": torch.tensor([1.0, 0.0])},
             {"input_ids": torch.tensor([101, 102]), "attention_mask": torch.ones(2, dtype=torch.long),
              "pixel_values": torch.full((3, 96, 64), 2.0),
              "pixel_mask": torch.ones(96, 64, dtype=torch.long), "targets": torch.tensor([0.0, 1.0])}]
    b = collate(items)
    assert sorted(b) == ["attention_mask", "input_ids", "pixel_mask", "pixel_values", "targets"]
    assert b["pixel_values"].shape == (2, 3, 96, 96) and b["pixel_mask"].dtype == torch.int64
    assert b["pixel_mask"][0].sum() == 64 * 96 and b["pixel_mask"][0, 64:].sum() == 0
    assert b["pixel_values"][1, :, :, 64:].abs().sum() == 0 and b["pixel_values"][1, :, :, :64].eq(2).all()
    assert b["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]


def test_deterministic_and_equal_to_transformers_vilt(tmp_path):
    torch.manual_seed(0)
    ref = ViltForQuestionAnswering(ViltConfig(**TINY, num_labels=5)).eval()
    ref.save_pretrained(tmp_path / "qa")
    assert visual_input(str(tmp_path / "qa")) == visual_input("vilt-tiny") == "pixels"
    model, _ = load_model(str(tmp_path / "qa"), num_answers=5, seed=3)
    assert isinstance(model, ViltForTask)
    for size in (96, 64):  # the configured grid (3x3 patches), and 2x2 patches with interpolated positions
        inp = _inputs(model, size)
        with torch.no_grad():
            a, b = model(**inp), model(**inp)
            want = ref(**inp).logits
        assert a.shape == (3, 5) and torch.equal(a, b)  # two identical calls, identical outputs
        torch.testing.assert_close(a, want, atol=1e-5, rtol=0)  # stock ViLT permutes the patches: rounding
    assert dims_from_state(model.state_dict()) == (None, 5)
    model.save_pretrained(tmp_path / "own")  # vlsparse's own directories keep their head
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "own"), num_answers=5, seed=9)[0](**inp), a)
    other, _ = load_model(str(tmp_path / "qa"), num_answers=3)  # another answer set: new head φ0
    assert other.classifier[3].weight.shape == (3, 128)
    assert torch.equal(other.vilt.pooler.dense.weight, ref.vilt.pooler.dense.weight)
    with pytest.raises(ValueError, match="pixels"):
        load_model("vilt-tiny", img_dim=12)


@pytest.mark.parametrize("cls,extra", [(ViltForImagesAndTextClassification, dict(num_images=2,
                                                                                 modality_type_vocab_size=3)),
                                       (ViltForImageAndTextRetrieval, {})])
def test_other_heads_load_the_backbone_with_a_new_head(tmp_path, cls, extra):
    torch.manual_seed(0)
    ref = cls(ViltConfig(**TINY, num_labels=4, **extra)).eval()
    ref.save_pretrained(tmp_path / "m")
    model, _ = load_model(str(tmp_path / "m"), num_answers=4, seed=3)
    own = ref.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items() if k.startswith("vilt."))
    assert model.classifier[0].weight.shape == (128, 64)


def test_prune_scope():
    model = _tiny()
    scope = model.prune_scope()
    assert len(scope) == 12
    assert sum(model.get_parameter(n).numel() for n in scope) == 2 * (4 * 64 * 64 + 2 * 64 * 128) == 65_536
    linears = {f"{n}.weight" for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("vilt.encoder.layer.")}
    assert set(scope) == linears
    assert not any(s in n for n in scope for s in ("patch_embeddings", "embeddings", "pooler", "classifier"))
    with torch.device("meta"):  # shapes only
        base = ViltForTask(ViltConfig(**PRESETS["vilt-base"].config))
    assert sum(base.get_parameter(n).numel() for n in base.prune_scope()) == 12 * (4 * 768**2 + 2 * 768 * 3072)


def test_imp_round_retraining_and_export(tmp_path, pixel_task):
    batch = collate([pixel_task.train[i] for i in range(4)])
    model = _tiny()
    with torch.no_grad():
        assert model(**{k: v for k, v in batch.items() if k != "targets"}).shape == (4, 13)
    model, mask = imp_round(tmp_path, _tiny, pixel_task, "vilt-tiny")
    batch.pop("targets")
    export_parity(tmp_path, model, mask, [batch, _inputs(model, 64), _inputs(model, 128)])  # any image size


def test_load_task_pixels_rejects_unknown_visual(tokenizer):
    with pytest.raises(ValueError, match="visual"):
        load_task("easy-vqa", tokenizer, visual="patches")


def test_nlvr2_directory_of_transformers_loads_as_the_pair_head(tmp_path):
    """ViltForImagesAndTextClassification (ViLT's NLVR2 model) -> vlsparse's pair head, identical outputs."""
    from transformers import ViltForImagesAndTextClassification

    torch.manual_seed(0)
    ref = ViltForImagesAndTextClassification(ViltConfig(**TINY, num_images=2, modality_type_vocab_size=3,
                                                        num_labels=2)).eval()
    ref.save_pretrained(tmp_path / "nlvr2")
    model, _ = load_model(str(tmp_path / "nlvr2"), num_answers=2, head="pair", num_images=2, seed=3)
    a, b = _inputs(model, seed=1), _inputs(model, seed=2)
    pixels = torch.stack([a["pixel_values"], b["pixel_values"]], 1)  # (3, 2, 3, 96, 96)
    masks = torch.stack([a["pixel_mask"], b["pixel_mask"]], 1)
    with torch.no_grad():
        ours = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"], pixel_values=pixels, pixel_mask=masks)
        want = ref(input_ids=a["input_ids"], attention_mask=a["attention_mask"], pixel_values=pixels,
                   pixel_mask=masks).logits
        swapped = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"], pixel_values=pixels.flip(1),
                        pixel_mask=masks)
    assert ours.shape == (3, 2)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, swapped, atol=1e-4)  # left and right images have their own token types


def test_pair_head_from_a_two_type_checkpoint_copies_the_image_type(tmp_path):
    torch.manual_seed(0)
    ViltForQuestionAnswering(ViltConfig(**TINY, num_labels=5)).save_pretrained(tmp_path / "qa")
    model, _ = load_model(str(tmp_path / "qa"), num_answers=2, head="pair", num_images=2)
    types = model.vilt.embeddings.token_type_embeddings.weight
    assert types.shape[0] == 3 and torch.equal(types[2], types[1])  # ViLT's NLVR2 fine-tuning starts so
    assert model.classifier[0].in_features == 2 * TINY["hidden_size"]
