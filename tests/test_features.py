"""Region-feature readers (vlsparse.data.visual.features) against the arrays written into fixtures."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from vlsparse.data.visual import tsv_index
from vlsparse.data.visual.features import (
    NpzFeatures,
    RegionStore,
    TSVFeatures,
    box7,
    open_region_features,
    write_npz,
    write_tsv,
)


def ref_box7(b: np.ndarray, w: float, h: float) -> np.ndarray:
    """Independent reference for boxes inside the image (no clipping needed)."""
    x1, y1, x2, y2 = (b[:, i].astype(np.float64) for i in range(4))
    bw, bh = (x2 - x1) / w, (y2 - y1) / h
    return np.stack([x1 / w, y1 / h, x2 / w, y2 / h, bw, bh, bw * bh], axis=1)


def make_records(rng, n_images=5, dim=8, prefix="img"):
    recs = []
    for i in range(n_images):
        n = int(rng.integers(1, 6))
        h, w = int(rng.integers(50, 400)), int(rng.integers(50, 400))
        x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1).astype(np.float32)
        recs.append((f"{prefix}{i}", h, w, boxes, rng.standard_normal((n, dim)).astype(np.float32)))
    return recs


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_box7_hand_computed():
    got = box7(np.array([[10, 20, 30, 60]]), img_w=100, img_h=200)
    assert got.dtype == np.float32 and got.shape == (1, 7)
    np.testing.assert_allclose(got[0], [0.1, 0.1, 0.3, 0.3, 0.2, 0.2, 0.04], rtol=1e-6)
    # clipping: box sticks out of a 100 x 200 image on three sides
    got = box7(np.array([[-10, 5, 150, 300]]), 100, 200)
    np.testing.assert_allclose(got[0], [0, 0.025, 1, 1, 1, 0.975, 0.975], rtol=1e-6)
    with pytest.raises(ValueError, match="boxes_xyxy"):
        box7(np.zeros((3, 5)), 10, 10)
    with pytest.raises(ValueError, match="img_w"):
        box7(np.zeros((3, 4)), 0, 10)


@pytest.mark.parametrize("layout", ["lxmert", "bottom-up"])
def test_tsv_round_trip(tmp_path, cache, layout):
    rng = np.random.default_rng(0)
    recs = make_records(rng)
    path = tmp_path / "feat.tsv"
    write_tsv(path, recs, layout=layout)
    n_fields = {line.count(b"\t") + 1 for line in path.read_bytes().splitlines()}
    assert n_fields == {10 if layout == "lxmert" else 6}
    store = TSVFeatures(path, cache_dir=cache)
    assert list(store) == [r[0] for r in recs] and len(store) == 5
    assert store.feature_dim == 8
    for img_id, h, w, boxes, feats in recs:
        f, b = store[img_id]
        assert f.dtype == np.float32 and b.dtype == np.float32 and b.shape == (len(boxes), 7)
        np.testing.assert_array_equal(f, feats)
        np.testing.assert_allclose(b, ref_box7(boxes, w, h), rtol=1e-6, atol=1e-7)


def test_tsv_lxmert_fields_match_load_obj_tsv(tmp_path, cache):
    # decode as airsplay/lxmert's load_obj_tsv does: fixed field names, base64 float32/int64
    recs = make_records(np.random.default_rng(1), n_images=1)
    path = tmp_path / "a.tsv"
    write_tsv(path, recs)
    fields = path.read_bytes().rstrip(b"\n").split(b"\t")
    img_id, h, w, boxes, feats = recs[0]
    assert (fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[7])) == (img_id, h, w, len(boxes))
    assert np.frombuffer(base64.b64decode(fields[3]), np.int64).shape == (len(boxes),)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(fields[8]), np.float32).reshape(-1, 4), boxes)


def test_tsv_multiple_files_and_duplicates(tmp_path, cache):
    rng = np.random.default_rng(2)
    a, b = make_records(rng, 3, prefix="a"), make_records(rng, 3, prefix="b")
    dup = ("a1",) + b[0][1:]  # same id as a1, in the later file
    write_tsv(tmp_path / "1.tsv", a)
    write_tsv(tmp_path / "2.tsv", b + [dup], layout="bottom-up")
    store = TSVFeatures([tmp_path / "1.tsv", str(tmp_path / "2.tsv")], cache_dir=cache)
    assert len(store) == 6
    np.testing.assert_array_equal(store["a1"][0], b[0][4])  # last wins
    np.testing.assert_array_equal(store["b2"][0], b[2][4])
    np.testing.assert_array_equal(store["a0"][0], a[0][4])


def test_tsv_reads_only_requested_line(tmp_path, cache):
    recs = make_records(np.random.default_rng(3))
    path = tmp_path / "feat.tsv"
    write_tsv(path, recs)
    lines = path.read_bytes().splitlines(keepends=True)
    fields = lines[2].split(b"\t")
    fields[-1] = fields[-1][:-9] + b"\n"  # truncate img2's features
    lines[2] = b"\t".join(fields)
    path.write_bytes(b"".join(lines))
    store = TSVFeatures(path, cache_dir=cache)
    for i in (0, 1, 3, 4):
        np.testing.assert_array_equal(store[f"img{i}"][0], recs[i][4])
    with pytest.raises(ValueError, match=r"feat\.tsv.*'img2'"):
        store["img2"]


def test_tsv_malformed_lines(tmp_path, cache):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"x\t1\t2\t3\n")  # 4 fields: neither layout
    with pytest.raises(ValueError, match=r"bad\.tsv: image 'x': 4 tab-separated fields"):
        TSVFeatures(path, cache_dir=cache)["x"]
    path.write_bytes(b"\n" + b"no tabs here\n")
    with pytest.raises(ValueError, match=r"bad\.tsv: line 2"):
        TSVFeatures(path, cache_dir=cache)


def test_tsv_index_cache_reused_and_invalidated(tmp_path, cache, monkeypatch):
    rng = np.random.default_rng(4)
    recs = make_records(rng)
    path = tmp_path / "feat.tsv"
    write_tsv(path, recs)
    first = TSVFeatures(path, cache_dir=cache)
    index_file = first.index_path(path)
    assert index_file.parent == cache / "feature-index" and index_file.is_file()
    stamp = index_file.stat().st_mtime_ns

    def no_scan(p):
        raise AssertionError(f"rescanned {p}")

    with monkeypatch.context() as m:
        m.setattr(tsv_index, "scan_tsv", no_scan)
        second = TSVFeatures(path, cache_dir=cache)
    assert list(second) == list(first)
    np.testing.assert_array_equal(second["img3"][0], recs[3][4])
    assert index_file.stat().st_mtime_ns == stamp

    # the TSV grows: a new index, which holds the new record
    extra = make_records(rng, 1, prefix="new")
    write_tsv(path, recs + extra)
    third = TSVFeatures(path, cache_dir=cache)
    assert third.index_path(path) != index_file
    np.testing.assert_array_equal(third["new0"][0], extra[0][4])
    assert len(list((cache / "feature-index").glob("*.json"))) == 2


def test_tsv_missing(tmp_path, cache):
    path = tmp_path / "feat.tsv"
    write_tsv(path, make_records(np.random.default_rng(5), 2))
    store = TSVFeatures(path, cache_dir=cache)
    with pytest.raises(KeyError, match=r"'nope' not in .*feat\.tsv"):
        store["nope"]
    assert "nope" not in store and "img1" in store and store.get("nope") is None
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        TSVFeatures(tmp_path / "missing.tsv", cache_dir=cache)


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    d = tmp_path / "npz"
    recs = make_records(rng, 4)
    # img0/img1: pixel boxes + size; img2: norm_bb (N, 7) float16 features; img3: norm_bb (N, 6)
    for img_id, h, w, boxes, feats in recs[:2]:
        write_npz(d / f"{img_id}.npz", feats, boxes_xyxy=boxes, img_h=h, img_w=w)
    nb7 = ref_box7(recs[2][3], recs[2][2], recs[2][1]).astype(np.float32)
    write_npz(d / "img2.npz", recs[2][4].astype(np.float16), norm_bb=nb7)
    nb6 = ref_box7(recs[3][3], recs[3][2], recs[3][1])[:, :6].astype(np.float32)
    write_npz(d / "img3.npz", recs[3][4], norm_bb=nb6)
    (d / "notes.txt").write_text("ignored")
    store = NpzFeatures(d)
    assert sorted(store) == ["img0", "img1", "img2", "img3"] and store.feature_dim == 8
    for img_id, h, w, boxes, feats in recs[:2]:
        f, b = store[img_id]
        np.testing.assert_array_equal(f, feats)
        np.testing.assert_allclose(b, ref_box7(boxes, w, h), rtol=1e-6, atol=1e-7)
    f, b = store["img2"]
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, recs[2][4].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(b, nb7)
    f, b = store["img3"]
    np.testing.assert_array_equal(b[:, :6], nb6)
    np.testing.assert_allclose(b[:, 6], nb6[:, 4] * nb6[:, 5], rtol=1e-6)


def test_npz_errors(tmp_path):
    d = tmp_path / "npz"
    d.mkdir()
    np.savez(d / "odd.npz", features=np.zeros((2, 3), np.float32), conf=np.ones(2))
    (d / "junk.npz").write_bytes(b"not a zip")
    store = NpzFeatures(d)
    with pytest.raises(ValueError, match=r"odd\.npz.*keys: conf, features"):
        store["odd"]
    with pytest.raises(ValueError, match=r"junk\.npz"):
        store["junk"]
    with pytest.raises(KeyError, match=f"'nope'.*{d.name}"):
        store["nope"]
    with pytest.raises(FileNotFoundError, match="absent"):
        NpzFeatures(tmp_path / "absent")
    with pytest.raises(ValueError, match="either norm_bb"):
        write_npz(d / "x.npz", np.zeros((1, 2)))


def test_region_store_merges_and_lowercases(tmp_path, cache):
    rng = np.random.default_rng(7)
    t = make_records(rng, 2, prefix="t")
    write_tsv(tmp_path / "f.tsv", t + [("42",) + t[0][1:], ("COCO_1",) + t[1][1:]])
    write_npz(tmp_path / "coco_1.npz", np.ones((1, 8), np.float32), norm_bb=np.full((1, 7), 0.5, np.float32))
    write_npz(tmp_path / "n0.npz", np.full((1, 8), 3, np.float32), norm_bb=np.full((1, 7), 0.5, np.float32))
    store = RegionStore([TSVFeatures(tmp_path / "f.tsv", cache_dir=cache), NpzFeatures(tmp_path)])
    assert len(store) == 6 and store.feature_dim == 8
    np.testing.assert_array_equal(store["t1"][0], t[1][4])
    np.testing.assert_array_equal(store["n0"][0], np.full((1, 8), 3))
    np.testing.assert_array_equal(store[42][0], t[0][4])  # int key -> "42"
    np.testing.assert_array_equal(store["COCO_1"][0], t[1][4])  # exact key in the first store
    np.testing.assert_array_equal(store["Coco_1"][0], np.ones((1, 8)))  # lower-cased, found in the npz store
    assert 42 in store and "missing" not in store
    with pytest.raises(KeyError, match="'missing' not in TSVFeatures"):
        store["missing"]


def test_open_region_features(tmp_path, cache):
    rng = np.random.default_rng(8)
    a, b = make_records(rng, 2, prefix="a"), make_records(rng, 2, prefix="b")
    write_tsv(tmp_path / "x.tsv", a)
    write_tsv(tmp_path / "y.tsv.0", b, layout="bottom-up")  # bottom-up split file
    write_npz(tmp_path / "c.npz", b[0][4], boxes_xyxy=b[0][3], img_h=b[0][1], img_w=b[0][2])
    (tmp_path / "sub").mkdir()
    write_npz(tmp_path / "sub" / "deep.npz", b[0][4], boxes_xyxy=b[0][3], img_h=b[0][1], img_w=b[0][2])
    store = open_region_features(tmp_path, cache_dir=cache)
    assert sorted(store) == ["a0", "a1", "b0", "b1", "c"]
    np.testing.assert_array_equal(store["b1"][0], b[1][4])
    np.testing.assert_array_equal(store["c"][0], b[0][4])

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no region features \(\*\.tsv"):
        open_region_features(empty, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_region_features(tmp_path / "nowhere", cache_dir=cache)


def test_dataset_reads_features_only_when_an_item_is_taken(tmp_path, cache, tokenizer, monkeypatch):
    from vlsparse.data.dataset import VLDataset, VLExample, collate

    recs = make_records(np.random.default_rng(3), n_images=4)
    write_tsv(tmp_path / "f.tsv", recs)
    store = open_region_features(tmp_path, cache_dir=cache)
    reads = []
    original = TSVFeatures.__getitem__
    monkeypatch.setattr(TSVFeatures, "__getitem__", lambda self, k: reads.append(k) or original(self, k))
    ds = VLDataset([VLExample("is it red?", f"img{i}", {"yes": 1.0}) for i in range(4)], store, tokenizer,
                    ["yes", "no"])
    assert reads == []  # building the dataset looks at the index only
    batch = collate([ds[2], ds[0]])
    assert reads == ["img2", "img0"]
    n = len(recs[2][4])
    np.testing.assert_array_equal(batch["img_feat"][0, :n].numpy(), recs[2][4])
    np.testing.assert_allclose(batch["img_pos"][0, :n].numpy(), ref_box7(recs[2][3], recs[2][2], recs[2][1]), rtol=1e-6)
    assert batch["img_mask"][0].sum() == n
