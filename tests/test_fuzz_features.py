"""Issue 17: property-based fuzzing of the region-feature readers (vlsparse.data.visual.features, tsv_index):
bottom-up-attention TSV files (fields replaced, lines damaged, arbitrary bytes), per-image .npz files (arbitrary
bytes, and archives of arrays of any dtype and shape under the keys the reader looks for) and the cached TSV
index. Opening the directory and reading every image must give features or a ValueError / FileNotFoundError
naming the file (see tests/fuzzing.py)."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.fuzzing import damaged_bytes, mutated, own_errors_only
from vlsparse.data.visual.features import open_region_features, write_tsv
from vlsparse.data.visual.tsv_index import index_path

_RNG = np.random.default_rng(0)
_RECORDS = [(f"img{i}", 48, 64, np.array([[1, 2, 30, 40], [0, 0, 64, 48]], np.float32),
             _RNG.standard_normal((2, 5)).astype(np.float32)) for i in range(2)]


def _valid_tsv(layout: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        write_tsv(Path(d) / "x.tsv", _RECORDS, layout=layout)
        return (Path(d) / "x.tsv").read_bytes()


_TSV = {layout: _valid_tsv(layout) for layout in ("lxmert", "bottom-up")}


def _read_all(directory: Path, cache: Path):
    store = open_region_features(directory, cache_dir=cache)
    out = {k: store[k] for k in list(store)}
    for feats, boxes in out.values():  # what the readers promise
        assert feats.dtype == np.float32 and boxes.dtype == np.float32 and boxes.shape == (len(feats), 7)
        assert np.isfinite(feats).all() and np.isfinite(boxes).all()
    if out:
        store.feature_dim
    return out


def _check(files: dict[str, bytes], cache_files: dict[str, bytes] | None = None):
    with tempfile.TemporaryDirectory() as d:
        root, cache = Path(d) / "features", Path(d) / "cache"
        root.mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data)
        for name, data in (cache_files or {}).items():  # "PATH" stands for the TSV file's absolute path
            data = data.replace(b'"PATH"', json.dumps(str((root / name).resolve())).encode())
            path = index_path((root / name).resolve(), cache)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        own_errors_only(lambda: _read_all(root, cache), list(files) + [str(root)])


@st.composite
def _tsv_with_a_damaged_field(draw):
    data = _TSV[draw(st.sampled_from(sorted(_TSV)))]
    lines = data.split(b"\n")
    n = draw(st.integers(0, 1))
    fields = lines[n].split(b"\t")
    i = draw(st.integers(0, len(fields) - 1))
    fields[i] = draw(st.binary(max_size=40) | st.sampled_from([b"", b"0", b"-3", b"nan", b"inf", b"1e400",
                                                               b"99999999999999999999", b"AAAA", b"AAAAAAAA"]))
    lines[n] = b"\t".join(fields)
    return b"\n".join(lines)


def _nan_tsv() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        write_tsv(Path(d) / "x.tsv", [(*_RECORDS[0][:4], np.full((2, 5), np.nan, np.float32))])
        return (Path(d) / "x.tsv").read_bytes()


@given(_tsv_with_a_damaged_field() | damaged_bytes(_TSV["lxmert"]))
@example(_nan_tsv())  # NaN features would poison training: refused, naming the file
def test_tsv_reader_raises_only_its_own_errors(data):
    _check({"x.tsv": data})


_NPZ_KEYS = st.sampled_from(["features", "norm_bb", "boxes", "img_h", "img_w", "conf"])
_ARRAYS = hnp.arrays(st.sampled_from([np.float16, np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex64,
                                      "<U3"]),
                     hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))


def _npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


_VALID_NPZ = _npz({"features": _RECORDS[0][4], "boxes": _RECORDS[0][3], "img_h": np.asarray(48), "img_w": np.asarray(64)})


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@given(st.dictionaries(_NPZ_KEYS, _ARRAYS, max_size=5).map(_npz) | damaged_bytes(_VALID_NPZ))
@example(_npy(np.zeros((2, 5), np.float32)))  # an .npy named .npz: np.load gives an array, not an archive
@example(_npz({"features": np.full((1, 2), np.nan, np.float32), "norm_bb": np.zeros((1, 7), np.float32)}))
@example(_npz({"features": np.ones((1, 2), np.complex64), "norm_bb": np.zeros((1, 7), np.float32)}))
def test_npz_reader_raises_only_its_own_errors(data):
    _check({"img0.npz": data})


_INDEX = {"version": 1, "path": "PATH", "ids": ["img0", "img1"], "offsets": [0, len(_TSV["lxmert"].split(b"\n")[0]) + 1]}


@given(mutated(_INDEX).map(lambda doc: json.dumps(doc).encode()) | st.binary(max_size=100))
def test_a_damaged_tsv_index_cache_is_rebuilt_or_named(data):
    _check({"x.tsv": _TSV["lxmert"]}, cache_files={"x.tsv": data})
