"""Sparse ONNX path: torch export -> sparsify_onnx -> onnxruntime with the vlsparse custom op."""

from __future__ import annotations

import ctypes
import io
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
scipy_sparse = pytest.importorskip("scipy.sparse")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vlsparse.export.onnx_sparse import csr_from_dense, sparsify_onnx  # noqa: E402
from vlsparse.runtime.ort import DOMAIN, OP_TYPE, ort_session, requires_vlsparse  # noqa: E402
from vlsparse.sparse.kernels.ort import custom_op_library, set_openmp, uses_ort_pool  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Build the library into a per-run cache so the test also covers a cold build."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLSPARSE_CACHE", str(tmp_path_factory.mktemp("vlsparse_cache")))
    yield
    mp.undo()


class MLP(torch.nn.Module):
    def __init__(self, d_in=48, d_hidden=96, d_out=40, bias_last=True):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.fc2 = torch.nn.Linear(d_hidden, d_hidden)
        self.fc3 = torch.nn.Linear(d_hidden, d_out, bias=bias_last)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))


def _masked_mlp(seed=0, sparsity=0.7, **kw):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = MLP(**kw).eval()
    with torch.no_grad():
        for lin in (m.fc1, m.fc2, m.fc3):
            keep = torch.rand(lin.weight.shape, generator=g) >= sparsity
            lin.weight.mul_(keep)
    return m


def _export(m, example, dynamic: dict) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():  # the legacy (TorchScript) exporter warns that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            m,
            (example,),
            f,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": dynamic, "y": dynamic},
            opset_version=17,
        )
    return onnx.load_from_string(f.getvalue())


def _plain(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _weights_by_shape(m):
    return {tuple(lin.weight.shape): lin.weight.detach().numpy() for lin in (m.fc1, m.fc2, m.fc3)}


@pytest.mark.parametrize("index_dtype", ["int16", "int32"])
def test_mlp_3d_matches_torch(tmp_path, index_dtype):
    m = _masked_mlp()
    dense = _export(m, torch.randn(2, 5, 48), {0: "batch", 1: "seq"})
    assert [n.op_type for n in dense.graph.node].count("MatMul") == 3

    sparse = sparsify_onnx(dense, min_sparsity=0.5, index_dtype=index_dtype)
    ops = [(n.domain, n.op_type) for n in sparse.graph.node]
    assert ops.count((DOMAIN, OP_TYPE)) == 3
    dense_ops = [(n.domain, n.op_type) for n in dense.graph.node]
    assert ("", "MatMul") not in ops
    # the three bias Adds are fused, and fc1's GELU (Div, Erf, Add, Mul, Mul) into fc1's epilogue
    assert ops.count(("", "Add")) == dense_ops.count(("", "Add")) - 4 and ("", "Erf") not in ops
    assert requires_vlsparse(sparse) and not requires_vlsparse(dense)
    onnx.checker.check_model(sparse)

    dense_path, sparse_path = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    onnx.save(dense, dense_path)
    onnx.save(sparse, sparse_path)
    # 70% zeros: int16 CSR costs 6 bytes per nonzero (0.3 * 6 / 4 = 45% of dense), int32 8 (60%)
    limit = {"int16": 0.55, "int32": 0.7}[index_dtype]  # + biases, graph, doc string
    assert sparse_path.stat().st_size < limit * dense_path.stat().st_size

    plain = _plain(dense)
    sess = ort_session(sparse_path, threads=2)
    for shape in [(3, 7, 48), (1, 33, 48)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = m(x).numpy()
        y_dense = plain.run(None, {"x": x.numpy()})[0]
        y_sparse = sess.run(None, {"x": x.numpy()})[0]
        assert y_sparse.shape == ref.shape
        np.testing.assert_allclose(y_dense, ref, atol=TOL, rtol=0)
        np.testing.assert_allclose(y_sparse, ref, atol=TOL, rtol=0)


def test_csr_initializers_match_scipy():
    m = _masked_mlp(seed=1)
    dense = _export(m, torch.randn(2, 5, 48), {0: "batch", 1: "seq"})
    sparse = sparsify_onnx(dense, index_dtype="int16")
    inits = {t.name: numpy_helper.to_array(t) for t in sparse.graph.initializer}
    weights = _weights_by_shape(m)
    biases = {tuple(lin.weight.shape): lin.bias.detach().numpy() for lin in (m.fc1, m.fc2, m.fc3)}
    seen = 0
    for n in sparse.graph.node:
        if n.op_type != OP_TYPE:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        crow, col, val = (inits[name] for name in n.input[1:4])
        w = weights[(attrs["out_features"], attrs["in_features"])]
        ref = scipy_sparse.csr_matrix(w)
        ref.sort_indices()
        assert crow.dtype == np.int32 and col.dtype == np.int16 and val.dtype == np.float32
        np.testing.assert_array_equal(crow, ref.indptr)
        np.testing.assert_array_equal(col, ref.indices)
        np.testing.assert_array_equal(val, ref.data)
        np.testing.assert_array_equal(inits[n.input[4]], biases[(attrs["out_features"], attrs["in_features"])])
        seen += 1
    assert seen == 3
    # dense weights are gone; nothing but CSR arrays and biases is left
    assert not any(v.ndim == 2 for v in inits.values())


def test_gemm_2d_input_and_no_bias():
    m = _masked_mlp(seed=2, bias_last=False)
    dense = _export(m, torch.randn(4, 48), {0: "batch"})
    assert [n.op_type for n in dense.graph.node].count("Gemm") >= 2  # torch emits Gemm for 2-D
    sparse = sparsify_onnx(dense, index_dtype="int32")
    assert not any(n.op_type in ("Gemm", "MatMul") for n in sparse.graph.node)
    sess = ort_session(sparse.SerializeToString())
    for batch in (1, 9):
        x = torch.randn(batch, 48)
        with torch.no_grad():
            ref = m(x).numpy()
        np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], ref, atol=TOL, rtol=0)


def _gemm_model(w, c, trans_b, alpha, beta):
    b = w if trans_b else w.T.copy()
    inits = [numpy_helper.from_array(b.astype(np.float32), "B")]
    inputs = ["x", "B"]
    if c is not None:
        inits.append(numpy_helper.from_array(c.astype(np.float32), "C"))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], transB=int(trans_b), alpha=alpha, beta=beta)
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[0]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, "vec", "row", "scalar"])
def test_gemm_attributes(trans_b, c_shape):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    w[rng.random(w.shape) < 0.8] = 0
    c = {
        None: None,
        "vec": rng.standard_normal(24),
        "row": rng.standard_normal((1, 24)),
        "scalar": np.array([0.7]),
    }[c_shape]
    model = _gemm_model(w, c, trans_b, alpha=0.5, beta=2.0)
    sparse = sparsify_onnx(model)
    assert [n.op_type for n in sparse.graph.node] == [OP_TYPE]
    assert {t.name for t in sparse.graph.initializer}.isdisjoint({"B", "C"})
    x = rng.standard_normal((6, 40)).astype(np.float32)
    ref = _plain(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort_session(sparse).run(None, {"x": x})[0], ref, atol=TOL, rtol=0)


def test_min_sparsity_and_shared_weights():
    rng = np.random.default_rng(4)
    w_sparse = rng.standard_normal((16, 32)).astype(np.float32)
    w_sparse[rng.random(w_sparse.shape) < 0.9] = 0
    w_dense = rng.standard_normal((16, 8)).astype(np.float32)  # B = (in, out), no zeros
    nodes = [
        helper.make_node("MatMul", ["x", "Ws"], ["h1"]),
        helper.make_node("MatMul", ["x", "Ws"], ["h2"]),  # the same weight read twice
        helper.make_node("Add", ["h1", "h2"], ["h"]),
        helper.make_node("MatMul", ["h", "Wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w_sparse.T.copy(), "Ws"), numpy_helper.from_array(w_dense, "Wd")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sparse = sparsify_onnx(model, min_sparsity=0.5)
    ops = [n.op_type for n in sparse.graph.node]
    assert ops.count(OP_TYPE) == 2 and ops.count("MatMul") == 1 and ops.count("Add") == 1
    names = {t.name for t in sparse.graph.initializer}
    assert "Wd" in names and "Ws" not in names
    assert sum(1 for n in names if n.endswith(".values")) == 1  # one CSR copy for the shared weight
    x = rng.standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_allclose(
        ort_session(sparse).run(None, {"x": x})[0], _plain(model).run(None, {"x": x})[0], atol=TOL, rtol=0
    )
    with pytest.raises(ValueError, match="int16"):
        sparsify_onnx(model, index_dtype="int64")
    assert sparsify_onnx(model, min_sparsity=0.95) == model  # nothing sparse enough: unchanged copy


def test_plain_onnxruntime_error_is_clear():
    m = _masked_mlp(seed=5)
    sparse = sparsify_onnx(_export(m, torch.randn(2, 3, 48), {0: "batch", 1: "seq"}))
    with pytest.raises(Exception, match=r"vlsparse:SparseLinear\(-1\) is not a registered function/op"):
        _plain(sparse)
    meta = {p.key: p.value for p in sparse.metadata_props}
    assert "ort_session" in meta["vlsparse.requires"] and "register_custom_ops_library" in sparse.doc_string


def test_kernel_rejects_bad_input_and_index_dtype_limits():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    sparse = sparsify_onnx(_gemm_model(w, None, 1, 1.0, 1.0))
    sess = ort_session(sparse)
    with pytest.raises(Exception, match="16"):  # caught by ORT (input shape) or the kernel
        sess.run(None, {"x": np.zeros((2, 15), np.float32)})
    for t in sparse.graph.initializer:  # corrupt one column index: the kernel refuses, no OOB read
        if t.name.endswith(".col_indices"):
            col = numpy_helper.to_array(t).copy()
            col[0] = 99
            t.CopyFrom(numpy_helper.from_array(col, t.name))
    with pytest.raises(Exception, match=r"col_indices\[0\] = 99 is outside \[0, 16\)"):
        ort_session(sparse).run(None, {"x": np.zeros((2, 16), np.float32)})
    crow, col, val = csr_from_dense(np.zeros((3, 40000), np.float32))
    assert col.dtype == np.int32 and crow.tolist() == [0, 0, 0, 0] and val.size == 0
    with pytest.raises(ValueError):
        csr_from_dense(np.ones((2, 40000), np.float32), index_dtype="int16")


def _one_node(w: np.ndarray, bias: np.ndarray | None, **attrs) -> onnx.ModelProto:
    """Y = SparseLinear(x) with W (out, in) as CSR initializers; x (T, in) float32."""
    out_f, in_f = w.shape
    crow, col, val = csr_from_dense(w)
    inits = [numpy_helper.from_array(a, n) for a, n in ((crow, "crow"), (col, "col"), (val, "val"))]
    names = ["x", "crow", "col", "val"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        names.append("b")
    node = helper.make_node(OP_TYPE, names, ["y"], domain=DOMAIN, in_features=in_f, out_features=out_f, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", in_f])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", out_f])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


@pytest.mark.parametrize("tokens", [1, 2, 40, 333])
def test_op_runs_on_onnxruntime_pool_and_on_openmp_alike(tokens):
    """Both thread pools (onnxruntime's intra-op pool, the OpenMP fallback) give X W^T + b (scipy)."""
    rng = np.random.default_rng(tokens)
    w = rng.standard_normal((200, 96)).astype(np.float32) * (rng.random((200, 96)) >= 0.7)
    b = rng.standard_normal(200).astype(np.float32)
    x = rng.standard_normal((tokens, 96)).astype(np.float32)
    ref = np.asarray(scipy_sparse.csr_matrix(w) @ x.T).T + b
    sess = ort_session(_one_node(w, b), threads=2)
    assert uses_ort_pool()  # onnxruntime >= 1.17 is installed
    try:
        set_openmp(True)
        assert not uses_ort_pool()
        y_omp = sess.run(None, {"x": x})[0]
    finally:
        set_openmp(False)
    y_ort = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(y_ort, ref, atol=TOL, rtol=1e-5)
    np.testing.assert_allclose(y_omp, ref, atol=TOL, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 37])
def test_gelu_epilogue_matches_torch_gelu(tokens):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((64, 48)).astype(np.float32) * (rng.random((64, 48)) >= 0.7)
    b = rng.standard_normal(64).astype(np.float32)
    x = rng.standard_normal((tokens, 48)).astype(np.float32) * 3
    ref = torch.nn.functional.gelu(torch.from_numpy(x @ w.T + b)).numpy()
    y = ort_session(_one_node(w, b, activation=1)).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=TOL, rtol=1e-5)
    with pytest.raises(Exception, match="activation must be 0"):
        ort_session(_one_node(w, b, activation=7)).run(None, {"x": x})


def test_library_abi_facts():
    lib = ctypes.CDLL(str(custom_op_library()))
    assert lib.vlsparse_ort_custom_op_size() == 8 + 25 * ctypes.sizeof(ctypes.c_void_p)
    assert lib.vlsparse_ort_op_version() >= 16


def test_dynamo_exporter_if_available(tmp_path):
    pytest.importorskip("onnxscript")
    m = _masked_mlp(seed=7)
    prog = torch.onnx.export(
        m,
        (torch.randn(2, 5, 48),),
        dynamo=True,
        input_names=["x"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}},
    )
    path = tmp_path / "dense.onnx"
    prog.save(str(path))
    sparse = sparsify_onnx(onnx.load(str(path)))
    assert sum(n.op_type == OP_TYPE for n in sparse.graph.node) == 3
    x = torch.randn(3, 4, 48)
    with torch.no_grad():
        ref = m(x).numpy()
    inp = ort_session(sparse).get_inputs()[0].name
    np.testing.assert_allclose(ort_session(sparse).run(None, {inp: x.numpy()})[0], ref, atol=TOL, rtol=0)


def test_matmul_over_transposed_initializer():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((12, 20)).astype(np.float32)  # (out, in), as nn.Linear stores it
    w[rng.random(w.shape) < 0.75] = 0
    bias = rng.standard_normal(12).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["h"]),
        helper.make_node("Add", ["bias", "h"], ["y"]),  # bias first, as the legacy exporter writes it
    ]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 12])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sparse = sparsify_onnx(model)
    assert [n.op_type for n in sparse.graph.node] == [OP_TYPE]
    init_names = {t.name for t in sparse.graph.initializer}
    assert "bias" in init_names and "W" not in init_names
    x = rng.standard_normal((2, 3, 20)).astype(np.float32)
    np.testing.assert_allclose(ort_session(sparse).run(None, {"x": x})[0], x @ w.T + bias, atol=TOL, rtol=0)


def test_runtime_modules_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from vlsparse.export.onnx_sparse import sparsify_onnx\n"
        "from vlsparse.runtime.ort import ort_session\n"
        "from vlsparse.sparse.kernels.ort import custom_op_library\n"
        "print(custom_op_library())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_constants_behind_identity_and_constant_nodes():
    """The legacy exporter shares equal tensors through Identity nodes (e.g. freshly initialised
    biases); weights may also come as Constant nodes. Both are followed, and cleaned up after."""
    rng = np.random.default_rng(9)
    w1 = rng.standard_normal((10, 6)).astype(np.float32)
    w2 = rng.standard_normal((10, 10)).astype(np.float32)
    for w in (w1, w2):
        w[rng.random(w.shape) < 0.6] = 0
    bias = rng.standard_normal(10).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["b_shared"], ["b1"]),
        helper.make_node("Identity", ["b_shared"], ["b2"]),
        helper.make_node("Constant", [], ["W2t"], value=numpy_helper.from_array(w2.T.copy(), "c")),
        helper.make_node("MatMul", ["x", "W1t"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "W2t"], ["h2"]),
        helper.make_node("Add", ["b2", "h2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ident",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(w1.T.copy(), "W1t"), numpy_helper.from_array(bias, "b_shared")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sparse = sparsify_onnx(model)
    assert [n.op_type for n in sparse.graph.node] == [OP_TYPE, OP_TYPE]
    assert {t.name for t in sparse.graph.initializer}.isdisjoint({"W1t", "b_shared"})
    x = rng.standard_normal((4, 6)).astype(np.float32)
    ref = (x @ w1.T + bias) @ w2.T + bias
    np.testing.assert_allclose(ort_session(sparse).run(None, {"x": x})[0], ref, atol=TOL, rtol=0)


def test_library_build_cache_and_compiler_errors(tmp_path, monkeypatch):
    from vlsparse.sparse.kernels import ort as ort_lib

    monkeypatch.setenv("VLSPARSE_CACHE", str(tmp_path / "own-cache"))  # not the cache other processes share
    lib = custom_op_library()
    assert lib.parent == ort_lib.cache_dir() and lib.is_file()
    mtime = lib.stat().st_mtime_ns
    assert custom_op_library() == lib and lib.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert not [p for p in lib.parent.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left

    monkeypatch.setenv("VLSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="no-such-compiler-xyz"):
        custom_op_library()

    broken = tmp_path / "broken-cxx"  # answers --version, fails to compile
    broken.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\necho "boom: no" >&2\nexit 3\n')
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    with pytest.raises(RuntimeError, match=r"(?s)broken-cxx.*exit 3.*boom"):
        custom_op_library()
    assert not list((tmp_path / "cache").iterdir())  # the failed build left no file behind
