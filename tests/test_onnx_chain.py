"""Chained sparse ONNX: the op's token-/feature-major layouts and the rewrite that links consecutive nodes."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
scipy_sparse = pytest.importorskip("scipy.sparse")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vlsparse.export.onnx_sparse import csr_from_dense, sparsify_onnx  # noqa: E402
from vlsparse.models.registry import PRESETS  # noqa: E402
from vlsparse.models.uniter import UniterConfig, UniterForTask  # noqa: E402
from vlsparse.pruning.magnitude import global_magnitude_prune  # noqa: E402
from vlsparse.pruning.mask import apply_mask, ones_mask  # noqa: E402
from vlsparse.runtime.ort import DOMAIN, OP_TYPE, ort_session  # noqa: E402

TOL = 1e-4


def _attrs(n) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _layout_node(w, b, x_fm: int, y_fm: int, act: int, rank: int) -> onnx.ModelProto:
    """One SparseLinear with the given layouts over CSR initializers of w (out, in); X of the given rank."""
    out_f, in_f = w.shape
    crow, col, val = csr_from_dense(w)
    inits = [numpy_helper.from_array(a, n) for a, n in ((crow, "crow"), (col, "col"), (val, "val"), (b, "b"))]
    node = helper.make_node(OP_TYPE, ["x", "crow", "col", "val", "b"], ["y"], domain=DOMAIN, in_features=in_f,
                            out_features=out_f, activation=act, input_layout=x_fm, output_layout=y_fm)
    lead = [f"d{i}" for i in range(rank - 1)]
    x_shape = [in_f, *lead] if x_fm else [*lead, in_f]
    y_shape = [out_f, *lead] if y_fm else [*lead, out_f]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


@pytest.mark.parametrize("lead", [(1,), (2, 1), (3, 13), (2, 20)])
def test_op_layouts_match_scipy(lead):
    """Every (input, output) layout pair, with and without GELU, gives act(X W^T + b) laid out as asked."""
    rng = np.random.default_rng(len(lead) * 100 + lead[-1])
    w = rng.standard_normal((80, 48)).astype(np.float32) * (rng.random((80, 48)) >= 0.7)
    b = rng.standard_normal(80).astype(np.float32)
    x = rng.standard_normal((*lead, 48)).astype(np.float32) * 2
    lin = (scipy_sparse.csr_matrix(w) @ x.reshape(-1, 48).T).T.reshape(*lead, 80) + b
    for act in (0, 1):
        ref = torch.nn.functional.gelu(torch.from_numpy(lin)).numpy() if act else lin
        for x_fm in (0, 1):
            for y_fm in (0, 1):
                sess = ort_session(_layout_node(w, b, x_fm, y_fm, act, len(lead) + 1), threads=2)
                xin = np.ascontiguousarray(np.moveaxis(x, -1, 0)) if x_fm else x
                y = sess.run(None, {"x": xin})[0]
                want = np.moveaxis(ref, -1, 0) if y_fm else ref
                assert y.shape == want.shape, (x_fm, y_fm)
                np.testing.assert_allclose(y, want, atol=TOL, rtol=1e-5, err_msg=f"x_fm={x_fm} y_fm={y_fm} act={act}")
    with pytest.raises(Exception, match="input_layout must be 0"):
        ort_session(_layout_node(w, b, 2, 0, 0, 2)).run(None, {"x": x.reshape(-1, 48)})


def _export(model, kwargs: dict, names, axes) -> onnx.ModelProto:
    f = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy (TorchScript) exporter warns that it is deprecated
        torch.onnx.export(model, (), f, kwargs=kwargs, input_names=list(names), output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return onnx.load_from_string(f.getvalue())


def _masked_uniter(config: dict, sparsity: float = 0.7):
    """A random UNITER of ``config`` under a global magnitude mask of its encoder Linears (the pruned scope)."""
    torch.manual_seed(0)
    model = UniterForTask(UniterConfig(**config)).eval()
    scope = model.prune_scope()
    params = dict(model.named_parameters())
    mask = global_magnitude_prune({n: params[n] for n in scope}, ones_mask(model, scope), sparsity)
    with torch.no_grad():
        apply_mask(model, mask)
    return model


def _check_uniter_chain(model, batches, tmp_path):
    """Export, sparsify with and without chaining; check the chained graph's structure and that both
    match the masked dense model to TOL at each (batch, text, regions)."""
    layers = model.config.num_hidden_layers
    axes = {k: dict(enumerate(v)) for k, v in model.input_axes.items()}
    axes["logits"] = {0: "batch"}
    dense = _export(model, model.example_inputs(batch=2, text_len=5, regions=3), model.input_axes, axes)
    chained = sparsify_onnx(dense, min_sparsity=0.5)
    plain = sparsify_onnx(dense, min_sparsity=0.5, chain=False)
    onnx.checker.check_model(chained)
    sparse_nodes = [n for n in chained.graph.node if n.op_type == OP_TYPE]
    assert len(sparse_nodes) == 6 * layers
    attrs = [_attrs(n) for n in sparse_nodes]
    assert sum(a.get("activation") == 1 for a in attrs) == layers  # every intermediate Linear fused its GELU
    assert sum(a.get("output_layout") == 1 for a in attrs) == layers  # intermediate -> output, feature-major
    assert sum(a.get("input_layout") == 1 for a in attrs) == 4 * layers  # Q, K, V (shared) and output
    assert not [n for n in chained.graph.node if n.op_type == "Erf" and "encoder" in n.name]  # the head's stays
    ops = [n.op_type for n in chained.graph.node]
    assert ops.count("Transpose") == [n.op_type for n in plain.graph.node].count("Transpose") + layers
    path = tmp_path / "chained.onnx"
    onnx.save(chained, path)
    sessions = {"chained": ort_session(path, threads=2), "plain": ort_session(plain.SerializeToString(), threads=2)}
    for batch, text, regions in batches:
        inputs = model.example_inputs(batch=batch, text_len=text, regions=regions, seed=batch)
        with torch.no_grad():
            ref = model(**inputs).numpy()
        feed = {k: v.numpy() for k, v in inputs.items()}
        for name, sess in sessions.items():
            np.testing.assert_allclose(sess.run(None, feed)[0], ref, atol=TOL, rtol=0, err_msg=name)


def test_uniter_tiny_chain_matches_masked_dense(tmp_path):
    config = dict(PRESETS["uniter-tiny"].config, img_dim=12, num_answers=4)
    _check_uniter_chain(_masked_uniter(config), [(1, 1, 1), (1, 4, 3), (3, 9, 5)], tmp_path)


def test_uniter_base_shaped_layer_chain_matches_masked_dense(tmp_path):
    """One layer of the UNITER-base shape (768 hidden, 3072 intermediate, 12 heads), small vocabulary."""
    config = dict(PRESETS["uniter-base"].config, num_hidden_layers=1, vocab_size=200, img_dim=16, num_answers=5)
    _check_uniter_chain(_masked_uniter(config), [(1, 20, 36), (2, 7, 3)], tmp_path)


def _layer_graph(gelu_form: str) -> onnx.ModelProto:
    """x -> three MatMul+Add (Q, K, V) summed, and x -> MatMul+Add -> GELU -> MatMul+Add (hand-built)."""
    rng = np.random.default_rng(3)
    d, h = 16, 32
    inits, nodes = [], []

    def linear(x, name, n_in, n_out):
        w = (rng.standard_normal((n_in, n_out)) * (rng.random((n_in, n_out)) >= 0.6)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(
            rng.standard_normal(n_out).astype(np.float32), f"{name}.b")])
        nodes.extend([helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}.mm"]),
                      helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [f"{name}.y"])])
        return f"{name}.y"

    q, k, v = (linear("x", n, d, d) for n in "qkv")
    nodes += [helper.make_node("Add", [q, k], ["qk"]), helper.make_node("Add", ["qk", v], ["qkv"])]
    u = linear("x", "inter", d, h)
    consts = {"sqrt2": np.sqrt(2.0), "inv_sqrt2": 1 / np.sqrt(2.0), "one": 1.0, "half": 0.5}
    inits += [numpy_helper.from_array(np.array(c, np.float32), n) for n, c in consts.items()]
    if gelu_form == "gelu-op":
        nodes.append(helper.make_node("Gelu", [u], ["g"]))
    else:
        scaled = helper.make_node("Div", [u, "sqrt2"], ["s"]) if gelu_form == "div" else \
            helper.make_node("Mul", ["inv_sqrt2", u], ["s"])
        nodes += [scaled, helper.make_node("Erf", ["s"], ["e"]), helper.make_node("Add", ["one", "e"], ["e1"]),
                  helper.make_node("Mul", ["e1", u], ["m"]), helper.make_node("Mul", ["half", "m"], ["g"])]
    o = linear("g", "out", h, d)
    nodes.append(helper.make_node("Add", ["qkv", o], ["y"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])], inits)
    opset = 20 if gelu_form == "gelu-op" else 17
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


@pytest.mark.parametrize("gelu_form", ["div", "mul", "gelu-op"])
def test_gelu_forms_and_shared_input_hand_built(gelu_form):
    """The GELU is recognised in each form and fused; Q, K, V read one Transpose of x; values as the
    dense graph in onnxruntime (its own Erf / Gelu)."""
    import onnxruntime as ort

    dense = _layer_graph(gelu_form)
    sparse = sparsify_onnx(dense)
    ops = [n.op_type for n in sparse.graph.node]
    assert ops.count(OP_TYPE) == 5 and ops.count("Transpose") == 1
    assert not {"Erf", "Gelu", "Div"} & set(ops)
    transpose = next(n for n in sparse.graph.node if n.op_type == "Transpose")
    assert list(_attrs(transpose)["perm"]) == [2, 0, 1]
    by_out = {n.output[0]: _attrs(n) for n in sparse.graph.node if n.op_type == OP_TYPE}
    assert by_out["g"] == dict(by_out["g"], activation=1, output_layout=1)
    assert by_out["out.y"]["input_layout"] == 1 and by_out["q.y"]["input_layout"] == 1
    x = np.random.default_rng(0).standard_normal((2, 7, 16)).astype(np.float32) * 2
    ref = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort_session(sparse.SerializeToString()).run(None, {"x": x})[0], ref, atol=TOL, rtol=0)


def test_no_chain_when_a_dense_op_reads_the_output():
    """An intermediate output that a dense node also reads stays token-major (and its GELU stays)."""
    dense = _layer_graph("div")
    g = dense.graph
    g.node.append(helper.make_node("Identity", ["inter.y"], ["inter_copy"]))
    g.output.append(helper.make_tensor_value_info("inter_copy", TensorProto.FLOAT, ["B", "S", 32]))
    sparse = sparsify_onnx(dense)
    by_out = {n.output[0]: _attrs(n) for n in sparse.graph.node if n.op_type == OP_TYPE}
    assert by_out["inter.y"].get("activation", 0) == 0 and by_out["inter.y"].get("output_layout", 0) == 0
    assert "Erf" in [n.op_type for n in sparse.graph.node]
