"""CSR / bitmask storage: arrays against scipy.sparse, validation errors, round trips, sizes."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from vlsparse.sparse.csr import BitmaskMatrix, CSRMatrix, decode_sparse, encode_sparse


def _random(out_f, in_f, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    return w, mask


@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (16, 768), (5, 7)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.95, 1.0])
def test_csr_matches_scipy(shape, sparsity):
    w, mask = _random(*shape, sparsity, seed=shape[0] * 1000 + int(sparsity * 100))
    csr = CSRMatrix.from_dense(w, mask).validate()
    ref = sp.csr_matrix(np.where(mask.numpy(), w.numpy(), 0))
    # scipy drops nothing here unless a kept weight is exactly 0 (probability 0 with randn)
    ref.sort_indices()
    assert csr.crow_indices.dtype == torch.int32
    assert csr.col_indices.dtype == torch.int16
    assert csr.values.dtype == torch.float32
    np.testing.assert_array_equal(csr.crow_indices.numpy(), ref.indptr)
    np.testing.assert_array_equal(csr.col_indices.numpy(), ref.indices)
    np.testing.assert_array_equal(csr.values.numpy(), ref.data)
    assert torch.equal(csr.to_dense(), w * mask)
    assert torch.equal(csr.mask(), mask)


def test_mask_keeps_explicit_zeros_and_no_mask_keeps_nonzeros():
    w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    mask = torch.tensor([[True, True, False], [False, False, True]])
    csr = CSRMatrix.from_dense(w, mask)
    assert csr.crow_indices.tolist() == [0, 2, 3]
    assert csr.col_indices.tolist() == [0, 1, 2]
    assert csr.values.tolist() == [0.0, 2.0, 3.0]
    nz = CSRMatrix.from_dense(w)
    ref = sp.csr_matrix(w.numpy())
    np.testing.assert_array_equal(nz.crow_indices.numpy(), ref.indptr)
    np.testing.assert_array_equal(nz.col_indices.numpy(), ref.indices)
    np.testing.assert_array_equal(nz.values.numpy(), ref.data)


def test_index_dtype_switches_to_int32_for_wide_matrices():
    w, mask = _random(3, 40000, 0.99)
    csr = CSRMatrix.from_dense(w, mask).validate()
    assert csr.col_indices.dtype == torch.int32
    assert torch.equal(csr.to_dense(), w * mask)
    assert CSRMatrix.from_dense(w[:, :32767]).col_indices.dtype == torch.int16
    assert CSRMatrix.from_dense(w[:, :32768]).col_indices.dtype == torch.int32
    with pytest.raises(ValueError, match="int16"):
        CSRMatrix.from_dense(w, mask, index_dtype=torch.int16)
    forced = CSRMatrix.from_dense(w[:, :100], index_dtype=torch.int32)
    assert forced.col_indices.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_value_dtypes(dtype):
    w, mask = _random(20, 30, 0.7)
    csr = CSRMatrix.from_dense(w, mask, dtype=dtype).validate()
    assert csr.values.dtype == dtype
    assert torch.equal(csr.to_dense(), (w * mask).to(dtype).float())
    with pytest.raises(ValueError, match="values dtype"):
        CSRMatrix.from_dense(w, mask, dtype=torch.int32)


def test_empty_rows_and_all_zero():
    w = torch.zeros(6, 9)
    csr = CSRMatrix.from_dense(w).validate()
    assert csr.nnz == 0 and csr.crow_indices.tolist() == [0] * 7
    assert torch.equal(csr.to_dense(), w)
    w[2, 3] = 1.5
    csr = CSRMatrix.from_dense(w).validate()
    assert csr.crow_indices.tolist() == [0, 0, 0, 1, 1, 1, 1]
    empty = CSRMatrix.from_dense(torch.zeros(0, 4)).validate()
    assert empty.crow_indices.tolist() == [0]


def _good():
    return CSRMatrix.from_dense(torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [4.0, 5.0, 6.0]]))


@pytest.mark.parametrize("mutate, message", [
    (lambda m: setattr(m, "col_indices", torch.tensor([0, 2, 1, 0, 1, 3], dtype=torch.int16)), "out of range"),
    (lambda m: setattr(m, "col_indices", torch.tensor([0, 2, 1, 0, -1, 2], dtype=torch.int16)), "out of range"),
    (lambda m: setattr(m, "crow_indices", torch.tensor([0, 2, 1, 6], dtype=torch.int32)), "monotonic"),
    (lambda m: setattr(m, "crow_indices", torch.tensor([0, 2, 3], dtype=torch.int32)), "out_features \\+ 1"),
    (lambda m: setattr(m, "crow_indices", torch.tensor([1, 2, 3, 6], dtype=torch.int32)), "crow_indices\\[0\\]"),
    (lambda m: setattr(m, "crow_indices", torch.tensor([0, 2, 3, 5], dtype=torch.int32)), "nonzeros"),
    (lambda m: setattr(m, "values", m.values[:-1]), "differ in length"),
    (lambda m: setattr(m, "crow_indices", m.crow_indices.long()), "crow_indices must be int32"),
    (lambda m: setattr(m, "col_indices", m.col_indices.long()), "col_indices must be int16 or int32"),
    (lambda m: setattr(m, "values", m.values.double()), "values must be"),
    (lambda m: setattr(m, "values", m.values.view(2, 3)), "1-D"),
    (lambda m: setattr(m, "col_indices", torch.tensor([2, 0, 1, 0, 1, 2], dtype=torch.int16)), "strictly increasing"),
    (lambda m: setattr(m, "col_indices", torch.tensor([0, 2, 1, 0, 0, 2], dtype=torch.int16)), "within row 2"),
    (lambda m: setattr(m, "shape", (3, 40000)), "int16"),
    (lambda m: setattr(m, "shape", (3,)), "shape"),
])
def test_validate_rejects(mutate, message):
    m = _good().validate()
    mutate(m)
    with pytest.raises(ValueError, match=message):
        m.validate()


def test_validate_accepts_row_boundary_decrease():
    # column index goes down across a row boundary (row 0 ends at 2, row 1 starts at 1): valid
    _good().validate()


def test_tensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    w, mask = _random(37, 53, 0.7)
    csr = CSRMatrix.from_dense(w, mask)
    tensors = {**csr.to_tensors("layer.q"), **CSRMatrix.from_dense(w).to_tensors("layer.k.")}
    assert set(tensors) >= {"layer.q.crow_indices", "layer.q.col_indices", "layer.q.values", "layer.q.shape",
                            "layer.k.values"}
    save_file(tensors, tmp_path / "w.safetensors")
    back = load_file(tmp_path / "w.safetensors")
    for shape in (None, (37, 53)):
        r = CSRMatrix.from_tensors(back, "layer.q", shape)
        assert r.shape == (37, 53)
        assert torch.equal(r.to_dense(), w * mask)
    with pytest.raises(ValueError, match="missing"):
        CSRMatrix.from_tensors({"layer.q.shape": back["layer.q.shape"]}, "layer.q")
    with pytest.raises(ValueError, match="out of range"):
        CSRMatrix.from_tensors(back, "layer.q", (37, 10))


@pytest.mark.parametrize("shape", [(37, 53), (3, 5), (8, 8), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitmask_round_trip(shape, dtype):
    w, mask = _random(*shape, 0.7, seed=3)
    bm = BitmaskMatrix.from_dense(w, mask, dtype=dtype).validate()
    assert bm.bitmask.dtype == torch.uint8 and bm.bitmask.numel() == (shape[0] * shape[1] + 7) // 8
    assert torch.equal(bm.mask_tensor(), mask)
    # packed bits, row-major, little-endian within a byte: same as numpy packbits(bitorder="little")
    np.testing.assert_array_equal(bm.bitmask.numpy(), np.packbits(mask.numpy().reshape(-1), bitorder="little"))
    csr = bm.to_csr()
    ref = CSRMatrix.from_dense(w, mask, dtype=dtype)
    assert torch.equal(csr.crow_indices, ref.crow_indices)
    assert torch.equal(csr.col_indices, ref.col_indices)
    assert torch.equal(csr.values, ref.values)
    assert torch.equal(BitmaskMatrix.from_csr(ref).bitmask, bm.bitmask)
    back = BitmaskMatrix.from_tensors(bm.to_tensors("p"), "p")
    assert torch.equal(back.to_dense(), (w * mask).to(dtype).float())


def test_bitmask_validate():
    w, mask = _random(5, 7, 0.5)
    bm = BitmaskMatrix.from_dense(w, mask)
    with pytest.raises(ValueError, match="values"):
        BitmaskMatrix(bm.bitmask, bm.values[:-1], bm.shape).validate()
    with pytest.raises(ValueError, match="bytes"):
        BitmaskMatrix(bm.bitmask[:-1], bm.values, bm.shape).validate()


def test_storage_ratios_at_70_percent():
    out_f, in_f = 768, 768
    w = torch.randn(out_f, in_f)
    mask = torch.zeros(out_f * in_f, dtype=torch.bool)
    mask[torch.randperm(out_f * in_f)[: round(0.3 * out_f * in_f)]] = True
    mask = mask.view(out_f, in_f)
    dense = out_f * in_f * 4
    csr = CSRMatrix.from_dense(w, mask)
    bm = BitmaskMatrix.from_dense(w, mask)
    # 0.3 * (4 + 2) / 4 = 0.45, plus 4 bytes per row of crow_indices (1/in_features)
    assert csr.nbytes / dense <= 0.45 + 1.01 / in_f
    assert abs(bm.nbytes / dense - (0.3 + 1 / 32)) < 1e-3
    assert isinstance(encode_sparse(w, mask), BitmaskMatrix)
    # very sparse: CSR wins
    w2, mask2 = _random(768, 768, 0.98)
    assert isinstance(encode_sparse(w2, mask2), CSRMatrix)


@pytest.mark.parametrize("sparsity", [0.5, 0.99])
def test_encode_decode(sparsity):
    w, mask = _random(40, 70, sparsity)
    enc = encode_sparse(w, mask)
    csr = decode_sparse(enc.to_tensors("x"), "x")
    assert torch.equal(csr.to_dense(), w * mask)
    assert csr.col_indices.dtype == torch.int16
    assert decode_sparse(enc.to_tensors("x"), "x", index_dtype=torch.int32).col_indices.dtype == torch.int32
