"""Sparse int8 ONNX: ``sparsify_onnx(dtype="int8")`` -> vlsparse.SparseLinearInt8 in onnxruntime, against a numpy
reference of the quantisation (vlsparse.sparse.int8's docstring) and the csr int8 export of the same model."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tests.test_int8 import np_quantize_tokens, np_quantize_weight  # noqa: E402
from tests.test_onnx_sparse import _export, _masked_mlp  # noqa: E402
from vlsparse.export.onnx_sparse import int8_blocks, sparsify_onnx  # noqa: E402
from vlsparse.runtime.ort import DOMAIN, OP_TYPE_INT8, ort_session  # noqa: E402
from vlsparse.sparse.int8 import Int8SparseLinear  # noqa: E402
from vlsparse.sparse.kernels.ort import set_openmp  # noqa: E402


def _np_int8_linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, gelu: bool) -> np.ndarray:
    """y = act(s_x s_w sum_k (x_q - zp) w_q + b): the integer sum exact (int64), the rest in float32."""
    xq, sx, zp = np_quantize_tokens(x)
    wq, sw = np_quantize_weight(w, w != 0)
    acc = (xq.astype(np.int64) - zp[:, None]) @ wq.T.astype(np.int64)
    y = acc.astype(np.float32) * (sx[:, None] * sw[None, :]) + (0 if b is None else b)
    return torch.nn.functional.gelu(torch.from_numpy(y)).numpy() if gelu else y


def _int8_node(w: np.ndarray, b: np.ndarray | None, **attrs) -> onnx.ModelProto:
    """y = SparseLinearInt8(x) with W (out, in) as int8 block initializers; x (T, in) float32."""
    out_f, in_f = w.shape
    arrays = int8_blocks(w)
    names = ["crow", "bcol", "qv", "scales"]
    inits = [numpy_helper.from_array(a, n) for a, n in zip(arrays, names)]
    if b is not None:
        inits.append(numpy_helper.from_array(b, "b"))
        names.append("b")
    node = helper.make_node(OP_TYPE_INT8, ["x", *names], ["y"], domain=DOMAIN, in_features=in_f, out_features=out_f,
                            **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", in_f])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", out_f])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


@pytest.mark.parametrize("tokens,gelu", [(1, False), (40, True), (145, False)])
def test_int8_node_equals_the_numpy_reference_on_both_thread_pools(tokens, gelu):
    """in = 45 (a partial last block), an empty row, a bias; onnxruntime's pool and the OpenMP fallback."""
    rng = np.random.default_rng(tokens)
    w = (rng.standard_normal((70, 45)) * 0.05 * (rng.random((70, 45)) >= 0.7)).astype(np.float32)
    w[3] = 0
    b = (rng.standard_normal(70) * 0.1).astype(np.float32)
    x = (rng.standard_normal((tokens, 45)) * 2).astype(np.float32)
    ref = _np_int8_linear(x, w, b, gelu)
    sess = ort_session(_int8_node(w, b, activation=int(gelu)), threads=2)
    y_ort = sess.run(None, {"x": x})[0]
    try:
        set_openmp(True)
        y_omp = sess.run(None, {"x": x})[0]
    finally:
        set_openmp(False)
    for y in (y_ort, y_omp):
        np.testing.assert_allclose(y, ref, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(_np_int8_linear(x, w, None, False), ort_session(_int8_node(w, None)).run(
        None, {"x": x})[0], atol=2e-6, rtol=1e-5)


def test_sparsified_mlp_runs_the_int8_op_like_the_csr_int8_layers():
    """A torch MLP (GELU after fc1) exported and rewritten with dtype="int8": every Linear becomes one int8 node,
    the GELU is fused, and the output equals Int8SparseLinear (the csr int8 export's layer) to float rounding."""
    m = _masked_mlp(seed=3, sparsity=0.7, d_in=50)
    x = torch.randn(2, 9, 50)
    proto = sparsify_onnx(_export(m, x, {0: "b", 1: "t"}), dtype="int8")
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in nodes] == [OP_TYPE_INT8] * 3
    assert [next((a.i for a in n.attribute if a.name == "activation"), 0) for n in nodes] == [1, 0, 0]
    assert not any(n.op_type in ("Erf", "MatMul", "Gemm") for n in proto.graph.node)
    y = ort_session(proto).run(None, {"x": x.numpy()})[0]
    fc1, fc2, fc3 = (Int8SparseLinear.from_dense(lin) for lin in (m.fc1, m.fc2, m.fc3))
    with torch.no_grad():
        ref = fc3(torch.relu(fc2(torch.nn.functional.gelu(fc1(x)))))
    np.testing.assert_allclose(y, ref.numpy(), atol=1e-5, rtol=1e-5)


def test_int8_node_refuses_corrupt_blocks_and_layouts():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 16)) * (rng.random((8, 16)) >= 0.5)).astype(np.float32)
    x = np.zeros((2, 16), np.float32)
    model = _int8_node(w, None)
    for t in model.graph.initializer:  # a block column past in_features / 4: refused, no read out of bounds
        if t.name == "bcol":
            col = numpy_helper.to_array(t).copy()
            col[0] = 4
            t.CopyFrom(numpy_helper.from_array(col, t.name))
    with pytest.raises(Exception, match=r"SparseLinearInt8: block_cols\[0\] = 4 is outside \[0, 4\)"):
        ort_session(model).run(None, {"x": x})
    with pytest.raises(Exception, match="SparseLinearInt8: input_layout and output_layout must be 0"):
        ort_session(_int8_node(w, None, input_layout=1)).run(None, {"x": x})
    with pytest.raises(ValueError, match="dtype must be 'fp32' or 'int8'"):
        sparsify_onnx(model, dtype="int4")
