"""Every inner kernel of the CPU SpMM (kernel= auto | legacy | gather | strips | xreg) against scipy.sparse.

The reference is ``scipy.sparse.csr_matrix`` in float64 on the same CSR arrays. Rows are ragged on purpose:
empty rows, a row with one nonzero, lengths around multiples of the vector widths (8, 16, 32) so that the
gather kernel's masked tail and two-chain main loop, the register-x kernel's 32-lane steps (one, several, or a
partial one per 64-column block) and the strips' pair loop and odd nonzero all run.
Both entries (row-major spmm_cpu; feature-major spmm_cpu_fm with either output layout, its input dense or
inside a wider buffer, i.e. unit and non-unit column stride) at T in {1, 2, 3, 7, 40, 150, 175, 200}.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.special
import torch

from tests.test_sparse_linear import cpu_kernel, threads  # noqa: F401  (fixtures: built kernel, torch threads)

ATOL = 1e-4
TOKENS = (1, 2, 3, 7, 40, 150, 175, 200)  # 150, 175: strips of 9 + half and 11 vectors
# nonzeros per row of the ragged block (the rest of the rows are random at 30% density)
RAGGED = (0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 49, 0, 63, 64, 65, 96, 1, 0)


def ragged_csr(out_f: int, in_f: int, seed: int, shuffle: bool = False):
    """(crow int32, col, values float32, bias float32) with RAGGED row lengths first; columns sorted per row
    unless ``shuffle`` (the kernels' contract allows any order)."""
    rng = np.random.default_rng(seed)
    lengths = list(RAGGED[:out_f]) + [int(rng.binomial(in_f, 0.3)) for _ in range(out_f - len(RAGGED))]
    cols = []
    for n in lengths:
        c = np.sort(rng.choice(in_f, size=min(n, in_f), replace=False))
        cols.append(rng.permutation(c) if shuffle else c)
    crow = np.zeros(out_f + 1, dtype=np.int32)
    crow[1:] = np.cumsum([len(c) for c in cols])
    col = np.concatenate(cols).astype(np.int32)
    vals = (rng.standard_normal(col.size) / np.sqrt(in_f)).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    return crow, col, vals, bias


def reference(crow, col, vals, bias, x: np.ndarray, gelu: bool = False) -> np.ndarray:
    """(T, out) float64: x (T, in) @ A.T + bias with A = scipy.sparse.csr_matrix((vals, col, crow))."""
    a = scipy.sparse.csr_matrix((vals.astype(np.float64), col, crow), shape=(crow.size - 1, x.shape[1]))
    y = (a @ x.astype(np.float64).T).T + bias.astype(np.float64)
    return 0.5 * y * (1.0 + scipy.special.erf(y / np.sqrt(2.0))) if gelu else y


def run_entries(cpu_kernel, kernel: str, args, out_f: int, x: torch.Tensor, activation: str = "none"):
    """{entry name: (T, out) result} for the row-major entry and the feature-major one (both output layouts,
    input contiguous and inside a wider buffer)."""
    t, in_f = x.shape
    xt = x.t().contiguous()  # (in, T)
    wide = torch.zeros(in_f, t + 5)
    wide[:, :t] = xt
    kw = dict(out_features=out_f, activation=activation, kernel=kernel)
    return {
        "row": cpu_kernel.spmm_cpu(x, *args, **kw),
        "fm": cpu_kernel.spmm_cpu_fm(xt, *args, **kw).t(),
        "fm->row": cpu_kernel.spmm_cpu_fm(xt, *args, out_layout="row", **kw),
        "fm strided": cpu_kernel.spmm_cpu_fm(wide[:, :t], *args, **kw).t(),
    }


def check_all(cpu_kernel, kernel, csr, index_dtype, out_f, in_f, seed=0, activation="none", ref_vals=None):
    """Every entry of ``kernel`` on ``csr`` at every T in TOKENS equals the scipy reference (computed with
    ``ref_vals`` in place of the values when given) within ATOL."""
    crow, col, vals, bias = csr
    ref_vals = vals if ref_vals is None else ref_vals
    args = (torch.from_numpy(crow), torch.from_numpy(col).to(index_dtype), torch.from_numpy(vals),
            torch.from_numpy(bias))
    g = torch.Generator().manual_seed(seed)
    for t in TOKENS:
        x = torch.randn(t, in_f, generator=g)
        ref = torch.from_numpy(reference(crow, col, ref_vals, bias, x.numpy(), activation == "gelu")).float()
        for entry, y in run_entries(cpu_kernel, kernel, args, out_f, x, activation).items():
            assert y.shape == (t, out_f), (kernel, entry, t)
            torch.testing.assert_close(y, ref, atol=ATOL, rtol=0, msg=lambda m: f"{kernel} {entry} T={t}: {m}")


@pytest.mark.parametrize("kernel", ["auto", "legacy", "gather", "strips", "xreg", "insert"])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_every_kernel_matches_scipy_on_ragged_rows(cpu_kernel, threads, kernel, index_dtype, nthreads):
    threads(nthreads)
    wide = cpu_kernel.tuning()["wide_min_in"]
    cpu_kernel.set_tuning(wide_min_in=0)  # strips of up to max_vectors (12) vectors at these small shapes too
    try:
        check_all(cpu_kernel, kernel, ragged_csr(150, 700, seed=1), index_dtype, 150, 700)  # 3 row, 2+ col blocks
    finally:
        cpu_kernel.set_tuning(wide_min_in=wide)
    check_all(cpu_kernel, kernel, ragged_csr(150, 700, seed=1), index_dtype, 150, 700)  # strips of <= 8 vectors
    check_all(cpu_kernel, kernel, ragged_csr(22, 97, seed=2), index_dtype, 22, 97)  # only the ragged rows


@pytest.mark.parametrize("kernel", ["gather", "strips", "xreg", "insert"])
def test_unsorted_columns_and_gelu(cpu_kernel, kernel):
    check_all(cpu_kernel, kernel, ragged_csr(70, 130, seed=3, shuffle=True), torch.int32, 70, 130)
    check_all(cpu_kernel, kernel, ragged_csr(70, 130, seed=4), torch.int16, 70, 130, activation="gelu")


def test_kernel_names_and_the_small_token_threshold(cpu_kernel):
    small = cpu_kernel.tuning()["small_tokens"]
    xreg = "xreg" if cpu_kernel.simd() == "avx512" and " avx512bw" in open("/proc/cpuinfo").read() else "small_rows"
    assert small >= 1
    assert cpu_kernel.tuning()["insert_tokens"] == 1 and cpu_kernel.kernel_path("auto", 1) == "insert"
    assert cpu_kernel.tuning()["max_vectors"] == 12
    assert cpu_kernel.kernel_path("auto", small) == "small_rows" and cpu_kernel.kernel_path("insert", 7) == "insert"
    assert cpu_kernel.kernel_path("auto", small + 1) == "strips"
    assert cpu_kernel.kernel_path("legacy", 1) == "small_rows" and cpu_kernel.kernel_path("legacy", 3) == "strips"
    assert cpu_kernel.kernel_path("gather", 200) == "gather" and cpu_kernel.kernel_path("strips", 1) == "strips"
    assert cpu_kernel.kernel_path("xreg", 1) == xreg and cpu_kernel.kernel_path("xreg", 200) == xreg
    try:
        cpu_kernel.set_tuning(small_tokens=7)  # auto's small-token kernel at T = 3 and 7 too (legacy keeps 2)
        assert cpu_kernel.kernel_path("auto", 7) == "small_rows" and cpu_kernel.kernel_path("legacy", 7) == "strips"
        check_all(cpu_kernel, "auto", ragged_csr(22, 97, seed=5), torch.int16, 22, 97)
    finally:
        cpu_kernel.set_tuning(small_tokens=small)
    with pytest.raises(ValueError, match="kernel must be one of"):
        cpu_kernel.kernel_path("fastest", 1)
    with pytest.raises(RuntimeError, match="unknown tunable"):
        cpu_kernel.set_tuning(no_such_knob=1)


@pytest.mark.parametrize("kernel", ["gather", "strips", "legacy", "xreg", "insert"])
def test_the_check_sees_one_wrong_tail_nonzero(cpu_kernel, kernel):
    """The comparison can fail: the last nonzero of the 17-long row (the masked tail lane of a 16-wide gather)
    changed by 1 changes that output by 1 with x = 1, and check_all's assertion reports it."""
    crow, col, vals, bias = ragged_csr(22, 97, seed=6)
    row = RAGGED.index(17)
    bad = vals.copy()
    bad[crow[row + 1] - 1] += 1.0
    x = torch.ones(3, 97)
    args = (torch.from_numpy(crow), torch.from_numpy(col), torch.from_numpy(bad), torch.from_numpy(bias))
    y = cpu_kernel.spmm_cpu(x, *args, out_features=22, kernel=kernel)
    ref = reference(crow, col, vals, bias, x.numpy())
    assert np.allclose((y.numpy() - ref)[:, row], 1.0, atol=1e-4)
    check_all(cpu_kernel, kernel, (crow, col, bad, bias), torch.int32, 22, 97)  # consistent with itself
    with pytest.raises(AssertionError, match=f"{kernel} row T=1"):
        check_all(cpu_kernel, kernel, (crow, col, bad, bias), torch.int32, 22, 97, ref_vals=vals)
