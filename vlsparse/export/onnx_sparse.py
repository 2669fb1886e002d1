"""Sparse ONNX: rewrite masked dense Linears into ``vlsparse.SparseLinear`` nodes.

``sparsify_onnx(model)`` walks the main graph of an exported model and replaces

* ``MatMul(X, B)`` where ``B`` is a constant 2-D float32 tensor of shape (in, out) (W^T: how torch
  exports ``nn.Linear`` for inputs of rank > 2), optionally followed by ``Add`` with a constant float32
  bias of shape (out,) (either operand order), and
* ``Gemm(X, B, C)`` with ``transA = 0`` and ``transB`` 0 or 1 (torch emits it for 2-D inputs); ``alpha``
  is folded into the values and ``beta`` into the bias; ``C`` must be constant and broadcast to (out,),
  or be absent.

"Constant" means an initializer (not also a graph input), or what Identity (the legacy exporter writes
it for tied or equal tensors), Transpose(perm=[1, 0]) (unoptimised exports) or Constant nodes make of
one. Each match becomes one ``vlsparse.SparseLinear`` node (see ``csrc/ort_sparse_linear.cc``) whose
CSR arrays of W (out, in) are ordinary 1-D initializers ``<name>.crow_indices`` (int32, out + 1),
``<name>.col_indices`` (int16 or int32, nnz) and ``<name>.values`` (float32, nnz), ``<name>`` being
the weight's name (the node's for the legacy exporter's ``onnx::MatMul_N``). The bias input is the
existing (out,) initializer when there is one, else a new ``<name>.bias``, and is left out when there
is no bias. A weight read by several nodes gets one set of CSR arrays. The node carries the int
attributes ``in_features`` and ``out_features``, which the kernel checks. Dense initializers (and the
Identity/Transpose/Constant nodes in front of them) that nothing reads any more are removed. Only
weights with at least ``min_sparsity`` zeros are converted; the others stay dense. Nodes inside
subgraphs (If/Loop bodies) are left alone.

Not used, on purpose (measured, see shared/MEASURED.md): ``graph.sparse_initializer`` (onnxruntime
densifies it at load) and ``com.microsoft.SparseToDenseMatMul`` (10-800x slower than dense MatMul).

The rewritten model needs our custom-op library: open it with :func:`vlsparse.runtime.ort.ort_session`
(``vlsparse.ort_session``), which also explains the failure of plain onnxruntime.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

import onnx
from onnx import helper, numpy_helper

from vlsparse._compat import moved
from vlsparse.runtime.ort import DOMAIN, OP_TYPE, REQUIRES_MESSAGE

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "REQUIRES_MESSAGE",
    "csr_from_dense",
    "sparsify_onnx",
]

DOMAIN_VERSION = 1
INT16_MAX_IN_FEATURES = 32768  # col index <= 32767

# ort_session and requires_vlsparse lived here before 0.2: vlsparse.runtime.ort is their home
__getattr__ = moved(__name__, {"ort_session": "vlsparse.runtime.ort", "requires_vlsparse": "vlsparse.runtime.ort"})


# --------------------------------------------------------------------------------------------------
# CSR
# --------------------------------------------------------------------------------------------------
def _index_dtype(index_dtype, in_features: int) -> np.dtype:
    if isinstance(index_dtype, str) and index_dtype == "auto":
        return np.dtype(np.int16) if in_features <= INT16_MAX_IN_FEATURES else np.dtype(np.int32)
    dt = np.dtype(index_dtype)
    if dt == np.int16:
        if in_features > INT16_MAX_IN_FEATURES:
            raise ValueError(
                f"index_dtype=int16 cannot index {in_features} input features (at most {INT16_MAX_IN_FEATURES}); "
                "use 'int32' or 'auto'"
            )
        return dt
    if dt == np.int32:
        return dt
    raise ValueError(f"index_dtype must be 'auto', 'int16' or 'int32', got {index_dtype!r}")


def csr_from_dense(w: np.ndarray, index_dtype="auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays (crow_indices int32, col_indices int16/int32, values float32) of a 2-D W (out, in).

    Columns are sorted within each row; exact zeros are dropped (NaN counts as nonzero).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"W must be 2-D, got shape {w.shape}")
    idx = _index_dtype(index_dtype, w.shape[1])
    nz = w != 0
    nnz = int(nz.sum())
    if nnz >= 2**31:
        raise ValueError(f"{nnz} nonzeros do not fit int32 crow_indices")
    crow = np.zeros(w.shape[0] + 1, dtype=np.int32)
    np.cumsum(nz.sum(axis=1), out=crow[1:])
    _, cols = np.nonzero(nz)  # row-major order: rows ascending, columns ascending within a row
    return crow, cols.astype(idx), np.ascontiguousarray(w[nz], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Graph rewrite
# --------------------------------------------------------------------------------------------------
def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraph_inputs(graph: onnx.GraphProto) -> Iterable[str]:
    """Names that nodes of nested subgraphs read (they may refer to outer-scope initializers)."""
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                subs = [a.g]
            elif a.type == onnx.AttributeProto.GRAPHS:
                subs = list(a.graphs)
            else:
                continue
            for g in subs:
                for n in g.node:
                    yield from n.input
                yield from _subgraph_inputs(g)


class _Names:
    def __init__(self, graph: onnx.GraphProto):
        used = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
        used |= {v.name for v in graph.value_info}
        for n in graph.node:
            used.update(n.input)
            used.update(n.output)
            used.add(n.name)
        self.used = used

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name


def _bias_vector(t: np.ndarray, out_features: int) -> np.ndarray | None:
    """A bias operand as a (out,) float32 vector, or None when it does not broadcast that way."""
    if t.dtype != np.float32:
        return None
    if t.size == 1 and t.ndim <= 1:  # scalar broadcast
        return np.full(out_features, t.reshape(()), dtype=np.float32)
    if t.shape == (out_features,) or t.shape == (1, out_features):
        return t.reshape(out_features).astype(np.float32, copy=False)
    return None


def sparsify_onnx(model: onnx.ModelProto, min_sparsity: float = 0.0, index_dtype="auto") -> onnx.ModelProto:
    """Return a copy of ``model`` whose sparse enough Linears run as ``vlsparse.SparseLinear``.

    ``min_sparsity``: the fraction of zeros a weight needs (0.0: convert every candidate, even dense
    ones). ``index_dtype``: ``"auto"`` (int16 when in_features <= 32768, else int32), ``"int16"`` or
    ``"int32"``. The input model is not modified. See the module docstring for the patterns handled.
    """
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph

    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    names = _Names(g)
    arrays: dict[str, tuple[np.ndarray, str] | None] = {}

    def const(name: str, depth: int = 0) -> tuple[np.ndarray, str] | None:
        """(value, how) of a tensor that is constant in the graph, else None.

        how = "init" for an initializer (not overridable by a graph input), "t" when the value is the
        transpose of a 2-D constant (Transpose perm=[1, 0]), "node" for other constant producers
        (Identity of a constant, as the legacy exporter writes for tied or duplicated tensors; Constant).
        """
        if name in arrays:
            return arrays[name]
        res = None
        if name in inits and name not in graph_inputs:
            res = (numpy_helper.to_array(inits[name]), "init")
        elif name in producer and depth < 16:
            n = producer[name]
            if n.domain in ("", "ai.onnx"):
                if n.op_type == "Identity":
                    src = const(n.input[0], depth + 1)
                    res = (src[0], "t" if src[1] == "t" else "node") if src else None
                elif n.op_type == "Transpose":
                    src = const(n.input[0], depth + 1)
                    if src is not None and src[0].ndim == 2 and list(_attr(n, "perm", [1, 0])) == [1, 0]:
                        res = (src[0].T, "t")
                elif n.op_type == "Constant" and any(a.name == "value" for a in n.attribute):
                    res = (numpy_helper.to_array(_attr(n, "value", None)), "node")
        arrays[name] = res
        return res

    def is_const(name: str) -> bool:
        return const(name) is not None

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    dropped: set[int] = set()  # ids of fused Add nodes
    touched: set[str] = set()  # tensors that lost a reader
    csr_cache: dict[tuple, tuple[str, str, str]] = {}
    replaced = 0

    for node in g.node:
        if id(node) in dropped:
            continue
        rewrite = None
        std = node.domain in ("", "ai.onnx")
        if std and node.op_type == "MatMul" and len(node.input) == 2 and not is_const(node.input[0]):
            b = const(node.input[1])
            if b is not None and b[0].ndim == 2 and b[0].dtype == np.float32:
                rewrite = ("matmul", b[0], 1.0)
        elif std and node.op_type == "Gemm" and len(node.input) >= 2 and not is_const(node.input[0]):
            b = const(node.input[1])
            if b is not None and b[0].ndim == 2 and b[0].dtype == np.float32 and int(_attr(node, "transA", 0)) == 0:
                mat = b[0].T if int(_attr(node, "transB", 0)) else b[0]
                rewrite = ("gemm", mat, float(_attr(node, "alpha", 1.0)))
        if rewrite is None:
            new_nodes.append(node)
            continue

        kind, b, alpha = rewrite  # b: (in, out), the operand as MatMul sees it
        in_features, out_features = b.shape
        zeros = int(b.size - np.count_nonzero(b))
        if b.size == 0 or zeros / b.size < min_sparsity:
            new_nodes.append(node)
            continue

        # Bias: Gemm's C, or a following Add with a constant (out,) operand.
        bias = None
        bias_sources: list[str] = []
        output = node.output[0]
        fused_add = None
        if kind == "gemm" and len(node.input) >= 3 and node.input[2]:
            c = const(node.input[2])
            vec = _bias_vector(c[0], out_features) if c is not None else None
            if vec is None:  # runtime or oddly shaped C: leave this Gemm dense
                new_nodes.append(node)
                continue
            beta = float(_attr(node, "beta", 1.0))
            bias = vec if beta == 1.0 else (vec * np.float32(beta)).astype(np.float32)
            bias_sources.append(node.input[2])
        elif kind == "matmul":
            readers = consumers.get(output, [])
            if len(readers) == 1 and output not in graph_outputs:
                add = readers[0]
                if add.domain in ("", "ai.onnx") and add.op_type == "Add" and len(add.input) == 2:
                    other = add.input[1] if add.input[0] == output else add.input[0]
                    c = const(other) if other != output else None
                    if c is not None and c[0].dtype == np.float32 and c[0].shape == (out_features,):
                        bias = c[0]
                        bias_sources.append(other)
                        fused_add = add

        w_src = node.input[1]
        readable = w_src if not w_src.startswith("onnx::") or not node.name else node.name.strip("/").replace("/", ".")
        key = (w_src, alpha)
        if key not in csr_cache:
            w = b.T  # (out, in)
            if alpha != 1.0:
                w = w * np.float32(alpha)
            crow, col, val = csr_from_dense(w, index_dtype)
            trio = tuple(names.fresh(f"{readable}.{part}") for part in ("crow_indices", "col_indices", "values"))
            new_inits += [numpy_helper.from_array(a, n) for a, n in zip((crow, col, val), trio)]
            csr_cache[key] = trio
        inputs = [node.input[0], *csr_cache[key]]
        if bias is not None:
            src = bias_sources[0]
            if kind == "matmul" and const(src)[1] == "init":
                bias_name = src  # reuse the existing (out,) initializer as is
            else:  # Gemm (beta, broadcast) or a bias made by a node: a fresh (out,) initializer
                bias_name = names.fresh(f"{readable}.bias")
                new_inits.append(numpy_helper.from_array(np.ascontiguousarray(bias, dtype=np.float32), bias_name))
            inputs.append(bias_name)

        if fused_add is not None:
            dropped.add(id(fused_add))
            output = fused_add.output[0]
        new_nodes.append(
            helper.make_node(
                OP_TYPE,
                inputs,
                [output],
                name=names.fresh((node.name or readable) + "_sparse"),
                domain=DOMAIN,
                in_features=int(in_features),
                out_features=int(out_features),
            )
        )
        touched.add(w_src)
        touched.update(bias_sources)
        replaced += 1

    if replaced == 0:
        return out

    # Remove what only fed the replaced nodes: constant producers (Identity / Transpose / Constant)
    # whose outputs nobody reads any more, then initializers nobody reads (nodes, nested subgraphs,
    # graph outputs).
    def reads(nodes):
        c = Counter(name for n in nodes for name in n.input)
        c.update(_subgraph_inputs(g))
        c.update(graph_outputs)
        return c

    while True:
        still_read = reads(new_nodes)
        dead_nodes = [
            n
            for n in new_nodes
            if n.op_type in ("Identity", "Transpose", "Constant")
            and n.domain in ("", "ai.onnx")
            and any(o in touched for o in n.output)
            and all(still_read[o] == 0 for o in n.output)
        ]
        if not dead_nodes:
            break
        for n in dead_nodes:
            touched.update(n.input)
        dead_ids = {id(n) for n in dead_nodes}
        new_nodes = [n for n in new_nodes if id(n) not in dead_ids]
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    dead = {name for name in touched if still_read[name] == 0 and name in inits}
    keep = [t for t in g.initializer if t.name not in dead]
    del g.initializer[:]
    g.initializer.extend(keep)
    keep_inputs = [i for i in g.input if i.name not in dead]  # IR < 4 lists initializers as inputs
    del g.input[:]
    g.input.extend(keep_inputs)
    produced = {o for n in g.node for o in n.output}
    keep_vi = [v for v in g.value_info if v.name in produced or v.name in graph_inputs]
    # onnxruntime cannot infer SparseLinear's output shape (the op has no shape-inference function):
    # carry over what ONNX shape inference finds for the same tensor in the dense model.
    known = {v.name for v in keep_vi} | graph_outputs
    wanted = {n.output[0] for n in g.node if n.domain == DOMAIN} - known
    if wanted:
        keep_vi += [v for v in _inferred_value_info(model) if v.name in wanted]
    del g.value_info[:]
    g.value_info.extend(keep_vi)

    if not any(op.domain == DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    _set_metadata(out, "vlsparse.requires", REQUIRES_MESSAGE)
    out.doc_string = (REQUIRES_MESSAGE + ("\n\n" + out.doc_string if out.doc_string else ""))[:4096]
    return out


def _inferred_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    try:
        return list(onnx.shape_inference.infer_shapes(model).graph.value_info)
    except Exception:  # shape inference is a nicety here (models > 2 GB, unknown ops, ...)
        return []


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
