"""SparseLinear parity with masked F.linear for every CPU backend, plus the raw kernel entry points."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlsparse.sparse.csr import CSRMatrix
from vlsparse.sparse.linear import SparseLinear, sparsify_linears

ATOL = 1e-4
CPU_BACKENDS = ["cpu", "dense", "torch-sparse"]


@pytest.fixture(scope="module")
def cpu_kernel():
    from vlsparse.sparse.kernels import cpu

    try:
        cpu.load_extension()
    except cpu.CompilerNotFoundError as e:  # pragma: no cover - CI images have g++
        pytest.skip(str(e))
    return cpu


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _layer(out_f, in_f, sparsity, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    return lin, mask


def _ref(lin, mask, x):
    return F.linear(x, lin.weight * mask, lin.bias)


def _check(layer, lin, mask, x):
    with torch.no_grad():
        y = layer(x)
        ref = _ref(lin, mask, x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)


SHAPES = [(37, 53), (768, 768), (16, 3072), (1, 5), (130, 17)]
TOKENS = [1, 2, 3, 4, 5, 16, 17, 40, 129, 200]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_parity_2d(cpu_kernel, backend, shape, sparsity):
    lin, mask = _layer(*shape, sparsity, seed=shape[0] + shape[1])
    layer = SparseLinear.from_dense(lin, mask, backend=backend)
    for t in TOKENS:
        _check(layer, lin, mask, torch.randn(t, shape[1]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_parity_index_dtypes_and_threads(cpu_kernel, threads, backend, index_dtype, nthreads):
    threads(nthreads)
    lin, mask = _layer(37, 53, 0.7, seed=5)
    layer = SparseLinear.from_dense(lin, mask, backend=backend, index_dtype=index_dtype)
    assert layer.col_indices.dtype == index_dtype
    for t in (1, 3, 40, 200):
        _check(layer, lin, mask, torch.randn(t, 53))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_parity_3d_and_empty_batch(cpu_kernel, backend):
    lin, mask = _layer(64, 96, 0.7, seed=1)
    layer = SparseLinear.from_dense(lin, mask, backend=backend)
    _check(layer, lin, mask, torch.randn(4, 27, 96))
    _check(layer, lin, mask, torch.randn(2, 3, 5, 96))
    _check(layer, lin, mask, torch.randn(96))
    _check(layer, lin, mask, torch.randn(0, 96))
    _check(layer, lin, mask, torch.randn(3, 0, 96))
    # non-contiguous input
    x = torch.randn(96, 30).t()
    _check(layer, lin, mask, x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_rows_all_zero_and_no_bias(cpu_kernel, backend):
    lin, mask = _layer(37, 53, 0.7, seed=2)
    mask[::3] = False  # empty rows
    mask[:, ::5] = False  # empty columns
    _check(SparseLinear.from_dense(lin, mask, backend=backend), lin, mask, torch.randn(40, 53))
    zero = torch.zeros_like(mask)
    _check(SparseLinear.from_dense(lin, zero, backend=backend), lin, zero, torch.randn(40, 53))
    _check(SparseLinear.from_dense(lin, zero, backend=backend), lin, zero, torch.randn(1, 53))
    full = torch.ones_like(mask)
    _check(SparseLinear.from_dense(lin, full, backend=backend), lin, full, torch.randn(17, 53))
    nb, mask_nb = _layer(37, 53, 0.7, seed=4, bias=False)
    layer = SparseLinear.from_dense(nb, mask_nb, backend=backend)
    assert layer.bias is None
    _check(layer, nb, mask_nb, torch.randn(9, 53))
    _check(layer, nb, mask_nb, torch.randn(1, 53))


def test_no_mask_keeps_nonzeros(cpu_kernel):
    lin, mask = _layer(20, 30, 0.6)
    with torch.no_grad():
        lin.weight.mul_(mask)
    layer = SparseLinear.from_dense(lin, backend="cpu")
    assert layer.nnz == int(mask.sum())
    _check(layer, lin, mask, torch.randn(7, 30))


def test_wide_matrix_int32_indices(cpu_kernel):
    lin, mask = _layer(8, 33000, 0.99, seed=7)
    layer = SparseLinear.from_dense(lin, mask, backend="cpu")
    assert layer.col_indices.dtype == torch.int32
    for t in (1, 20):
        _check(layer, lin, mask, torch.randn(t, 33000))


def test_auto_backend_and_other_dtypes(cpu_kernel):
    lin, mask = _layer(37, 53, 0.7)
    layer = SparseLinear.from_dense(lin, mask)
    assert layer.backend == "auto" and layer.resolve_backend(torch.zeros(1, 53)) == "cpu"
    _check(layer, lin, mask, torch.randn(40, 53))
    x = torch.randn(40, 53, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _ref(lin, mask, x.float()).double(), atol=ATOL, rtol=0)


def test_grad_falls_back_to_dense(cpu_kernel):
    lin, mask = _layer(37, 53, 0.7)
    layer = SparseLinear.from_dense(lin, mask, backend="cpu")
    x = torch.randn(5, 53, requires_grad=True)
    layer(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    _ref(lin, mask, x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=ATOL, rtol=0)


def test_buffers_state_dict_and_to(cpu_kernel):
    lin, mask = _layer(37, 53, 0.7)
    layer = SparseLinear.from_dense(lin, mask, backend="cpu")
    sd = layer.state_dict()
    assert set(sd) == {"crow_indices", "col_indices", "values", "bias"}
    assert sd["crow_indices"].dtype == torch.int32 and sd["col_indices"].dtype == torch.int16
    # load into a layer of another sparsity (other nnz): buffers are resized
    lin2, mask2 = _layer(37, 53, 0.3, seed=9)
    other = SparseLinear.from_dense(lin2, mask2, backend="cpu")
    other.load_state_dict(sd)
    _check(other, lin, mask, torch.randn(6, 53))
    assert [n for n, _ in layer.named_buffers()] == ["crow_indices", "col_indices", "values", "bias"]
    half = SparseLinear.from_dense(lin, mask, backend="cpu").half()
    assert half.values.dtype == torch.float16 and half.col_indices.dtype == torch.int16
    y = half(torch.randn(4, 53).half())
    assert y.dtype == torch.float16
    d = SparseLinear.from_dense(lin, mask, backend="dense").to(torch.float64)
    _check(d, lin.double(), mask, torch.randn(3, 53, dtype=torch.float64))


def test_modifying_values_invalidates_caches(cpu_kernel):
    lin, mask = _layer(20, 30, 0.5)
    for backend in CPU_BACKENDS:
        layer = SparseLinear.from_dense(lin, mask, backend=backend)
        x = torch.randn(3, 30)
        layer(x)
        with torch.no_grad():
            layer.values.mul_(2)
            torch.testing.assert_close(layer(x), F.linear(x, 2 * lin.weight * mask, lin.bias), atol=ATOL, rtol=0)


def test_backend_errors(monkeypatch):
    lin, mask = _layer(8, 8, 0.5)
    with pytest.raises(ValueError, match="unknown SparseLinear backend"):
        SparseLinear.from_dense(lin, mask, backend="mkl")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="CUDA"):
            SparseLinear.from_dense(lin, mask, backend="triton")
    try:
        import torch_sparse  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torch_sparse"):
            SparseLinear.from_dense(lin, mask, backend="torch_sparse")
    layer = SparseLinear.from_dense(lin, mask, backend="cpu")
    with pytest.raises(ValueError, match="expects"):
        layer(torch.randn(2, 9))
    with pytest.raises(TypeError):
        SparseLinear.from_dense(nn.Conv1d(2, 2, 1))
    bad = CSRMatrix.from_dense(lin.weight.detach(), mask)
    with pytest.raises(ValueError, match="out of range"):
        SparseLinear(4, 8, bad.crow_indices, bad.col_indices, bad.values)


def test_torch_sparse_pyg_backend_if_installed():
    pytest.importorskip("torch_sparse")
    lin, mask = _layer(37, 53, 0.7)
    _check(SparseLinear.from_dense(lin, mask, backend="torch_sparse"), lin, mask, torch.randn(9, 53))


def test_from_csr_with_half_values(cpu_kernel):
    lin, mask = _layer(37, 53, 0.7)
    csr = CSRMatrix.from_dense(lin.weight.detach(), mask, dtype=torch.float16)
    layer = SparseLinear.from_csr(csr, lin.bias.detach(), backend="cpu")
    ref = F.linear(torch.ones(2, 53), (lin.weight * mask).half().float(), lin.bias)
    torch.testing.assert_close(layer(torch.ones(2, 53)), ref, atol=ATOL, rtol=0)


def test_sparsify_linears(cpu_kernel):
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    _, m0 = _layer(20, 10, 0.5)
    x = torch.randn(3, 10)
    ref = model[2](model[1](F.linear(x, model[0].weight * m0, model[0].bias)))
    sparsify_linears(model, {"0.weight": m0}, backend="cpu")
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- raw kernel entry points
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_kernel_row_major_and_feature_major(cpu_kernel, threads, index_dtype, nthreads):
    threads(nthreads)
    assert cpu_kernel.simd() in ("avx512", "avx2", "scalar")
    for out_f, in_f in ((37, 53), (300, 129)):
        lin, mask = _layer(out_f, in_f, 0.7, seed=out_f)
        csr = CSRMatrix.from_dense(lin.weight.detach(), mask, index_dtype=index_dtype)
        args = (csr.crow_indices, csr.col_indices, csr.values)
        for t in (1, 2, 3, 4, 5, 8, 9, 15, 16, 24, 33, 40, 129, 200, 300):
            x = torch.randn(t, in_f)
            ref = _ref(lin, mask, x).detach()
            y = cpu_kernel.spmm_cpu(x, *args, lin.bias.detach(), out_features=out_f)
            torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
            yt = cpu_kernel.spmm_cpu_fm(x.t().contiguous(), *args, lin.bias.detach(), out_features=out_f)
            torch.testing.assert_close(yt.t(), ref, atol=ATOL, rtol=0)
            # padded leading dimension (a view into a wider buffer)
            wide = torch.zeros(in_f, t + 7)
            wide[:, :t] = x.t()
            yt2 = cpu_kernel.spmm_cpu_fm(wide[:, :t], *args, None, out_features=out_f)
            torch.testing.assert_close(yt2.t(), ref - lin.bias.detach(), atol=ATOL, rtol=0)


def test_kernel_rejects_bad_arguments(cpu_kernel):
    lin, mask = _layer(8, 8, 0.5)
    csr = CSRMatrix.from_dense(lin.weight.detach(), mask)
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="out_features"):
        cpu_kernel.spmm_cpu(x, csr.crow_indices, csr.col_indices, csr.values, out_features=9)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernel.spmm_cpu(x.double(), csr.crow_indices, csr.col_indices, csr.values, out_features=8)
    with pytest.raises(ValueError, match="2-D"):
        cpu_kernel.spmm_cpu(x[0], csr.crow_indices, csr.col_indices, csr.values, out_features=8)
    with pytest.raises(RuntimeError, match="differ"):
        cpu_kernel.spmm_cpu(x, csr.crow_indices, csr.col_indices[:-1], csr.values, out_features=8)


def test_threads_follow_torch(cpu_kernel, threads):
    m = cpu_kernel.load_extension()
    threads(1)
    assert m.omp_threads() == 1
    threads(2)
    assert m.omp_threads() == 2


# ----------------------------------------------------------------------------- build and cache
def test_build_key_tracks_sources_and_cache_dir(tmp_path, monkeypatch):
    import shutil

    from vlsparse.sparse.kernels import cpu

    key = cpu._build_key()
    src = tmp_path / "csrc"
    shutil.copytree(cpu.CSRC, src)
    monkeypatch.setattr(cpu, "CSRC", src)
    assert cpu._build_key() == key
    (src / "spmm.h").write_text((src / "spmm.h").read_text() + "\n// edited\n")
    assert cpu._build_key() != key
    monkeypatch.setenv("VLSPARSE_CACHE", str(tmp_path / "cache"))
    assert cpu.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("VLSPARSE_CACHE")
    assert cpu.cache_dir().name == "vlsparse"


def test_missing_compiler_is_a_clear_error(monkeypatch):
    from vlsparse.sparse.kernels import cpu

    monkeypatch.setenv("CXX", "/nonexistent/bin/c++")
    with pytest.raises(cpu.CompilerNotFoundError, match="no C\\+\\+ compiler"):
        cpu._find_compiler()


def test_auto_falls_back_to_dense_without_compiler(monkeypatch):
    from vlsparse.sparse import linear as sl
    from vlsparse.sparse.kernels import cpu

    def no_compiler(*a, **k):
        raise cpu.CompilerNotFoundError("vlsparse: no C++ compiler found")

    monkeypatch.setattr(sl, "_cpu_ext", None)
    monkeypatch.setattr(sl, "_auto_cache", {})
    monkeypatch.setattr(cpu, "load_extension", no_compiler)
    lin, mask = _layer(37, 53, 0.7)
    layer = SparseLinear.from_dense(lin, mask)
    with pytest.warns(RuntimeWarning, match="masked dense"):
        assert layer.resolve_backend(torch.zeros(1, 53)) == "dense"
    _check(layer, lin, mask, torch.randn(5, 53))
    with pytest.raises(cpu.CompilerNotFoundError):
        SparseLinear.from_dense(lin, mask, backend="cpu")(torch.randn(5, 53))


@pytest.mark.parametrize("tokens", [1, 2, 37, 130])
def test_chained_feature_major_layers_match_masked_dense(cpu_kernel, threads, tokens):
    """intermediate (GELU in the epilogue, feature-major out) -> output, and Q/K/V sharing one transposed
    input: the same values as masked F.linear (+ F.gelu), in every layout."""
    from vlsparse.sparse.linear import InputShare

    threads(2)
    (l1, m1), (l2, m2) = _layer(96, 40, 0.7, seed=1), _layer(40, 96, 0.7, seed=2)
    up = SparseLinear.from_dense(l1, m1, backend="cpu")
    down = SparseLinear.from_dense(l2, m2, backend="cpu")
    up.activation, up.out_layout = "gelu", "feature"
    x = torch.randn(2, tokens, 40) if tokens > 2 else torch.randn(tokens, 40)
    h = up(x)
    ref_h = F.gelu(_ref(l1, m1, x))
    torch.testing.assert_close(h, ref_h, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(down(h), _ref(l2, m2, ref_h), atol=1e-4, rtol=1e-5)
    share = InputShare()
    qkv = [_layer(40, 40, 0.7, seed=s) for s in (3, 4, 5)]
    mods = [SparseLinear.from_dense(lin, m, backend="cpu") for lin, m in qkv]
    for mod in mods:
        mod.input_share = share
    for mod, (lin, m) in zip(mods, qkv):
        torch.testing.assert_close(mod(x), _ref(lin, m, x), atol=1e-4, rtol=1e-5)
    x.mul_(2)  # a new value in the same tensor: a new forward must not reuse the old transpose
    share.clear()
    torch.testing.assert_close(mods[0](x), _ref(*qkv[0], x), atol=1e-4, rtol=1e-5)


def test_gelu_epilogue_on_other_backends_and_bad_activation():
    lin, mask = _layer(24, 16, 0.5)
    x = torch.randn(5, 16)
    layer = SparseLinear.from_dense(lin, mask, backend="dense")
    layer.activation = "gelu"
    torch.testing.assert_close(layer(x), F.gelu(_ref(lin, mask, x)), atol=1e-5, rtol=1e-5)
    csr = layer.to_csr()
    with pytest.raises(ValueError, match="activation"):
        SparseLinear(16, 24, csr.crow_indices, csr.col_indices, csr.values, activation="relu")
