"""onnxruntime: vlsparse.SparseLinear (custom op) vs dense MatMul, BERT-base Linear shapes.

One-node graphs built with onnx.helper: Y = X W^T with X (T, in), W (out, in) at 50/70/90% random
unstructured sparsity, no bias. Both sessions use 2 intra-op threads (and 2 OpenMP threads for
the custom op). Run with

    pytest benchmarks/test_bench_ort.py --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds

Each group is one (out x in, T); compare the sparse rows against the dense one in it.
VLSPARSE_BENCH_THREADS=1 runs both single-threaded (steadier on a shared, busy machine).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("pytest_benchmark")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vlsparse.export.onnx_sparse import csr_from_dense  # noqa: E402
from vlsparse.runtime.ort import DOMAIN, OP_TYPE, ort_session  # noqa: E402

THREADS = int(os.environ.get("VLSPARSE_BENCH_THREADS", "2"))  # 2: the target machine's cores
SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # (out, in)
TOKENS = [1, 40, 200]
SPARSITIES = [0.5, 0.7, 0.9]


def _weight(out_f: int, in_f: int, sparsity: float) -> np.ndarray:
    rng = np.random.default_rng(out_f * 7 + in_f + int(sparsity * 100))
    w = rng.standard_normal((out_f, in_f)).astype(np.float32) * 0.02
    w[rng.random(w.shape) < sparsity] = 0.0
    return w


def _model(nodes, inits, in_f: int, out_f: int, opsets) -> bytes:
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", out_f])],
        inits,
    )
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


def dense_model(w: np.ndarray) -> bytes:
    out_f, in_f = w.shape
    node = helper.make_node("MatMul", ["x", "Wt"], ["y"])
    return _model([node], [numpy_helper.from_array(np.ascontiguousarray(w.T), "Wt")], in_f, out_f,
                  [helper.make_opsetid("", 17)])


def sparse_model(w: np.ndarray) -> bytes:
    out_f, in_f = w.shape
    crow, col, val = csr_from_dense(w, "auto")
    inits = [numpy_helper.from_array(crow, "crow"), numpy_helper.from_array(col, "col"),
             numpy_helper.from_array(val, "val")]
    node = helper.make_node(OP_TYPE, ["x", "crow", "col", "val"], ["y"], domain=DOMAIN,
                            in_features=in_f, out_features=out_f)
    return _model([node], inits, in_f, out_f, [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


_sessions: dict[tuple, object] = {}


def _session(kind: str, out_f: int, in_f: int, sparsity: float):
    key = (kind, out_f, in_f, sparsity)
    if key not in _sessions:
        w = _weight(out_f, in_f, sparsity)
        src = dense_model(w) if kind == "dense" else sparse_model(w)
        # ort_session also registers the library for the dense graph: same session setup for both
        _sessions[key] = (ort_session(src, threads=THREADS), w)
    return _sessions[key]


def _run(benchmark, kind, out_f, in_f, tokens, sparsity):
    sess, w = _session(kind, out_f, in_f, sparsity)
    x = np.random.default_rng(tokens).standard_normal((tokens, in_f)).astype(np.float32)
    feed = {"x": x}
    y = sess.run(None, feed)[0]
    np.testing.assert_allclose(y, x @ w.T, atol=2e-4, rtol=1e-4)
    benchmark.group = f"ort {out_f}x{in_f} T={tokens}"
    benchmark.extra_info.update(kind=kind, out=out_f, inp=in_f, tokens=tokens, sparsity=sparsity, threads=THREADS)
    benchmark(sess.run, None, feed)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_dense_matmul(benchmark, shape, tokens):
    # dense cost does not depend on the zeros; 0.7 only picks the weight values
    _run(benchmark, "dense", *shape, tokens, 0.7)


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=[f"s{int(s * 100)}" for s in SPARSITIES])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_sparse_linear(benchmark, shape, tokens, sparsity):
    _run(benchmark, "sparse", *shape, tokens, sparsity)
