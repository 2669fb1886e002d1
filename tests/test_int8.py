"""The int8 sparse kernel and format against a numpy reference of the same quantisation.

Reference: ONNX DynamicQuantizeLinear (asymmetric uint8) applied per token, symmetric per-channel int8 weights
(vlsparse.sparse.int8's docstring), written here in numpy from the formulas, not from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlsparse.sparse.int8 import GELU_LIPSCHITZ, Int8BlockMatrix, Int8SparseLinear
from vlsparse.sparse.kernels import cpu_int8


def np_quantize_tokens(x: np.ndarray):
    """Per-row DynamicQuantizeLinear: (xq uint8, scale float32, zero point int32)."""
    x = x.astype(np.float32)
    lo = np.minimum(np.float32(0), x.min(1))
    hi = np.maximum(np.float32(0), x.max(1))
    s = ((hi - lo) / np.float32(255)).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    zp = np.clip(np.rint(-lo / s), 0, 255).astype(np.float32)
    q = np.clip(np.rint(x / s[:, None]) + zp[:, None], 0, 255)
    return q.astype(np.uint8), s, zp.astype(np.int32)


def np_quantize_weight(w: np.ndarray, mask: np.ndarray):
    w = (w * mask).astype(np.float32)
    amax = np.abs(w).max(1)
    s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8), s


def np_bound(x: np.ndarray, w: np.ndarray, mask: np.ndarray, wq: np.ndarray, sw: np.ndarray, sx: np.ndarray):
    """The docstring's bound (T, out): 1/2 s_x sum|w_hat| + 1/2 s_w sum_kept |x|."""
    what = np.abs(wq.astype(np.float64) * sw[:, None]).sum(1)
    return 0.5 * sx[:, None] * what[None, :] + 0.5 * sw[None, :] * (np.abs(x) @ mask.T.astype(np.float64))


def _case(out_f: int, in_f: int, sparsity: float, block: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    if block:
        kb = (in_f + 3) // 4
        keep = torch.rand(out_f, kb, generator=g) >= sparsity
        mask = keep.repeat_interleave(4, 1)[:, :in_f]
    else:
        mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    mask[1] = False  # an empty row
    return w, mask, torch.randn(out_f, generator=g) * 0.1


ISAS = cpu_int8.isas()


def test_every_isa_of_this_cpu_is_tested():
    assert ISAS[-1] == "scalar" and set(ISAS) <= set(cpu_int8.ISAS)


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantisation_equals_numpy(isa):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 37, generator=g) * 3
    x[1] = 0  # scale 1, zero point 0
    x[2] = x[2].abs() + 0.1  # all positive: lo = 0, zp = 0
    x[3] = -x[3].abs() - 0.1  # all negative: zp = 255
    x[4, :] = 0.5  # one value
    xq, sx, zp = cpu_int8.quantize(x, isa)
    rq, rs, rz = np_quantize_tokens(x.numpy())
    np.testing.assert_array_equal(xq.numpy(), rq)
    np.testing.assert_array_equal(sx.numpy(), rs)
    np.testing.assert_array_equal(zp.numpy(), rz)
    assert rz[2] == 0 and rz[3] == 255 and rs[1] == 1


def test_weight_quantisation_and_blocks_equal_numpy():
    w, mask, _ = _case(9, 22, 0.7, block=False, seed=1)
    m = Int8BlockMatrix.from_dense(w, mask)
    rq, rs = np_quantize_weight(w.numpy(), mask.numpy())
    np.testing.assert_array_equal(m.int8_dense().numpy(), rq)
    np.testing.assert_array_equal(m.scales.numpy(), rs)
    padded = np.zeros((9, 24), np.int8)
    padded[:, :22] = rq
    assert m.nblocks == int((padded.reshape(9, 6, 4) != 0).any(-1).sum())
    np.testing.assert_array_equal(m.row_sums().numpy(), rq.astype(np.int64).sum(1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tokens,out_f,in_f,block", [(1, 70, 45, False), (2, 70, 330, True), (40, 64, 96, True),
                                                     (145, 70, 330, False)])
def test_integer_accumulation_equals_numpy_exactly(isa, tokens, out_f, in_f, block):
    w, mask, bias = _case(out_f, in_f, 0.7, block, seed=tokens)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(5)) * 2
    m = Int8BlockMatrix.from_dense(w, mask)
    acc = cpu_int8.spmm_int8(x, m.crow_indices, m.block_cols, m.values, m.scales, m.row_sums(), bias,
                             out_features=out_f, isa=isa, raw=True)
    rq, rs = np_quantize_weight(w.numpy(), mask.numpy())
    xq, sx, zp = np_quantize_tokens(x.numpy())
    ref = (xq.astype(np.int64) - zp[:, None]) @ rq.astype(np.int64).T
    assert acc.dtype == torch.int32
    np.testing.assert_array_equal(acc.numpy(), ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("tokens", [2, 33])  # 2: the few-token path on AVX512-VNNI
def test_output_within_the_stated_bound_of_the_masked_fp32_layer(isa, activation, tokens):
    out_f, in_f = 96, 84
    w, mask, bias = _case(out_f, in_f, 0.7, False, seed=3)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(6))
    layer = Int8SparseLinear(Int8BlockMatrix.from_dense(w, mask), bias, backend="cpu", activation=activation)
    layer.isa = isa
    y = layer(x).double().numpy()
    ref = F.linear(x.double(), (w * mask).double(), bias.double())
    ref = (F.gelu(ref) if activation == "gelu" else ref).numpy()
    rq, rs = np_quantize_weight(w.numpy(), mask.numpy())
    bound = np_bound(x.numpy(), w.numpy(), mask.numpy(), rq, rs, np_quantize_tokens(x.numpy())[1])
    bound = bound * (GELU_LIPSCHITZ if activation == "gelu" else 1.0) + 1e-5
    err = np.abs(y - ref)
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 1e-4  # really quantised (the bound is not vacuous for a float path)


def test_disk_form_round_trips_and_corruption_is_named():
    w, mask, _ = _case(12, 30, 0.7, False, seed=4)
    m = Int8BlockMatrix.from_dense(w, mask)
    t = m.to_tensors("lin.weight")
    back = Int8BlockMatrix.from_tensors(t, "lin.weight")
    assert torch.equal(back.int8_dense(), m.int8_dense()) and torch.equal(back.scales, m.scales)
    assert t["lin.weight.qvalues"].numel() == int((m.int8_dense() != 0).sum())
    for key, bad, words in [("qvalues", t["lin.weight.qvalues"].clone().fill_(-128), "-128"),
                            ("qvalues", t["lin.weight.qvalues"][:-1], "one entry per set bit"),
                            ("scales", -t["lin.weight.scales"], "> 0"),
                            ("scales", t["lin.weight.scales"].double(), "float32")]:
        with pytest.raises(ValueError, match=words):
            Int8BlockMatrix.from_tensors({**t, f"lin.weight.{key}": bad}, "lin.weight")
    with pytest.raises(ValueError, match="out of range"):
        Int8BlockMatrix(m.crow_indices, m.block_cols + 100, m.values, m.scales, m.shape).validate()
