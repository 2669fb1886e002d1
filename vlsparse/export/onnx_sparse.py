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

With ``dtype="int8"`` each match becomes a ``vlsparse.SparseLinearInt8`` node instead, with the initializers
``<name>.crow_indices`` (int32, out + 1, over 1x4 blocks), ``<name>.block_cols`` (int16 or int32), ``<name>.qvalues``
(int8, 4 per block) and ``<name>.scales`` (float32, out): :func:`int8_blocks`, the csr int8 export's quantisation.

The rewritten model needs our custom-op library: open it with :func:`vlsparse.runtime.ort.ort_session`
(``vlsparse.ort_session``), which also explains the failure of plain onnxruntime.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Collection, Iterable

import numpy as np

import onnx
from onnx import helper, numpy_helper

from vlsparse._compat import moved
from vlsparse.export.onnx_arrays import INT16_MAX_IN_FEATURES, csr_from_dense, int8_blocks
from vlsparse.export.onnx_chain import GraphLinks, chain_sparse_nodes
from vlsparse.runtime.ort import DOMAIN, DTYPE_KEY, OP_TYPE, OP_TYPE_INT8, REQUIRES_MESSAGE, set_metadata

__all__ = ["DOMAIN", "OP_TYPE", "OP_TYPE_INT8", "REQUIRES_MESSAGE", "INT16_MAX_IN_FEATURES", "csr_from_dense",
           "int8_blocks", "sparsify_onnx"]

DOMAIN_VERSION = 1

# ort_session and requires_vlsparse lived here before 0.2: vlsparse.runtime.ort is their home
__getattr__ = moved(__name__, {"ort_session": "vlsparse.runtime.ort", "requires_vlsparse": "vlsparse.runtime.ort"})


# --------------------------------------------------------------------------------------------------
# Graph rewrite
# --------------------------------------------------------------------------------------------------
def sparsify_onnx(model: onnx.ModelProto, min_sparsity: float = 0.0, index_dtype="auto",
                  chain: bool = True, dense: Collection[str] = (), dtype: str = "fp32") -> onnx.ModelProto:
    """Return a copy of ``model`` whose sparse enough Linears run as ``vlsparse.SparseLinear``.

    ``min_sparsity``: the fraction of zeros a weight needs (0.0: convert every candidate, even dense
    ones). ``index_dtype``: ``"auto"`` (int16 when in_features <= 32768, else int32), ``"int16"`` or
    ``"int32"``. ``chain``: fuse GELUs into the nodes before them and keep consecutive sparse nodes
    feature-major (:func:`vlsparse.export.onnx_chain.chain_sparse_nodes`; same values, fewer transposes).
    ``dense``: module paths (``a.b.dense``) whose Linears stay dense, found by the node names torch's exporter
    writes (``/a/b/dense/MatMul``; ``export --autotune``).
    ``dtype``: ``"fp32"`` (``vlsparse.SparseLinear`` nodes) or ``"int8"`` (``vlsparse.SparseLinearInt8`` nodes:
    the weights quantised as :meth:`vlsparse.sparse.int8.Int8BlockMatrix.from_dense` does, symmetric int8 per
    output channel in 1x4 blocks, activations quantised per token at run time; GELUs are fused, the nodes stay
    token-major). The input model is not modified. See the module docstring for the patterns handled.

    Raises:
        ValueError: ``min_sparsity`` outside [0, 1], an unknown ``index_dtype`` or ``dtype``.
    """
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if dtype not in ("fp32", "int8"):
        raise ValueError(f"dtype must be 'fp32' or 'int8', got {dtype!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = _GraphIndex(out.graph)
    rewriter = _Rewriter(index, index_dtype, dtype)
    new_nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if id(node) in rewriter.fused_adds:
            continue  # folded into the SparseLinear node of the MatMul before it
        linear = None if _module_path(node) in dense else _match_linear(node, index, min_sparsity)
        new_nodes.append(node if linear is None else rewriter.rewrite(linear))
    if rewriter.replaced == 0:
        return out
    _drop_dead(out.graph, new_nodes, rewriter, index)
    inferred = _inferred_value_info(model)
    _carry_value_info(out.graph, inferred, index)
    if chain:
        chain_sparse_nodes(out, {v.name: v for v in inferred})
    _mark_requires(out)
    set_metadata(out, DTYPE_KEY, dtype)  # what an int8 runner checks (vlsparse.runtime.runners)
    return out


# ---- 1. index the graph: producers, readers, constant values -------------------------------------
class _GraphIndex(GraphLinks):
    """Lookups over the main graph as it was before the rewrite: :class:`GraphLinks` plus the graph inputs,
    fresh names and constant folding."""

    def __init__(self, g: onnx.GraphProto):
        super().__init__(g)
        self.inputs = {i.name for i in g.input}
        self.names = _Names(g)
        self._const: dict[str, tuple[np.ndarray, str] | None] = {}

    def const(self, name: str, depth: int = 0) -> tuple[np.ndarray, str] | None:
        """(value, how) of a tensor that is constant in the graph, else None.

        how = "init" for an initializer (not overridable by a graph input), "t" when the value is the
        transpose of a 2-D constant (Transpose perm=[1, 0]), "node" for other constant producers
        (Identity of a constant, as the legacy exporter writes for tied or duplicated tensors; Constant).
        """
        if name in self._const:
            return self._const[name]
        res = None
        if name in self.inits and name not in self.inputs:
            res = (numpy_helper.to_array(self.inits[name]), "init")
        elif name in self.producer and depth < 16:
            res = self._produced(self.producer[name], depth)
        self._const[name] = res
        return res

    def _produced(self, n: onnx.NodeProto, depth: int) -> tuple[np.ndarray, str] | None:
        """:meth:`const` of the output of an Identity, Transpose or Constant node ``n``."""
        if not _standard(n):
            return None
        if n.op_type == "Identity":
            src = self.const(n.input[0], depth + 1)
            return (src[0], "t" if src[1] == "t" else "node") if src else None
        if n.op_type == "Transpose":
            src = self.const(n.input[0], depth + 1)
            if src is not None and src[0].ndim == 2 and list(_attr(n, "perm", [1, 0])) == [1, 0]:
                return (src[0].T, "t")
            return None
        if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute):
            return (numpy_helper.to_array(_attr(n, "value", None)), "node")
        return None

    def is_const(self, name: str) -> bool:
        return self.const(name) is not None


class _Names:
    """Tensor and node names in use; ``fresh`` makes new ones."""

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


def _module_path(node: onnx.NodeProto) -> str:
    return node.name.strip("/").rpartition("/")[0].replace("/", ".")


def _standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


# ---- 2. match one Linear: MatMul [+ Add] or Gemm -------------------------------------------------
@dataclass
class _Linear:
    """A matched Linear: ``node`` computes X @ b (+ bias) with constant b and bias."""

    node: onnx.NodeProto
    kind: str  # "matmul" | "gemm"
    b: np.ndarray  # (in, out): the weight operand as MatMul sees it (Gemm's transB applied)
    alpha: float  # Gemm's alpha, folded into the values
    bias: np.ndarray | None = None  # (out,) float32 (Gemm's beta folded in)
    bias_source: str | None = None  # the tensor the bias was read from
    fused_add: onnx.NodeProto | None = None  # the Add after a MatMul, folded into the new node


def _match_linear(node: onnx.NodeProto, index: _GraphIndex, min_sparsity: float) -> _Linear | None:
    """The Linear ``node`` computes, when its weight has at least ``min_sparsity`` zeros; else None."""
    weight = _match_weight(node, index)
    if weight is None:
        return None
    kind, b, alpha = weight
    zeros = int(b.size - np.count_nonzero(b))
    if b.size == 0 or zeros / b.size < min_sparsity:
        return None
    linear = _Linear(node, kind, b, alpha)
    return _with_gemm_bias(linear, index) if kind == "gemm" else _with_fused_add(linear, index)


def _match_weight(node: onnx.NodeProto, index: _GraphIndex) -> tuple[str, np.ndarray, float] | None:
    """(kind, b (in, out), alpha) of a MatMul / Gemm of a runtime X by a constant 2-D float32 matrix."""
    if not _standard(node) or node.op_type not in ("MatMul", "Gemm"):
        return None
    n_inputs_ok = len(node.input) == 2 if node.op_type == "MatMul" else len(node.input) >= 2
    if not n_inputs_ok or index.is_const(node.input[0]):
        return None
    b = index.const(node.input[1])
    if b is None or b[0].ndim != 2 or b[0].dtype != np.float32:
        return None
    if node.op_type == "MatMul":
        return "matmul", b[0], 1.0
    if int(_attr(node, "transA", 0)) != 0:
        return None
    mat = b[0].T if int(_attr(node, "transB", 0)) else b[0]
    return "gemm", mat, float(_attr(node, "alpha", 1.0))


def _with_gemm_bias(linear: _Linear, index: _GraphIndex) -> _Linear | None:
    """``linear`` with Gemm's C (times beta) as its bias; None when C is not a constant (out,) vector."""
    node, out_features = linear.node, linear.b.shape[1]
    if len(node.input) < 3 or not node.input[2]:
        return linear
    c = index.const(node.input[2])
    vec = _bias_vector(c[0], out_features) if c is not None else None
    if vec is None:  # runtime or oddly shaped C: leave this Gemm dense
        return None
    beta = float(_attr(node, "beta", 1.0))
    linear.bias = vec if beta == 1.0 else (vec * np.float32(beta)).astype(np.float32)
    linear.bias_source = node.input[2]
    return linear


def _bias_vector(t: np.ndarray, out_features: int) -> np.ndarray | None:
    """A bias operand as a (out,) float32 vector, or None when it does not broadcast that way."""
    if t.dtype != np.float32:
        return None
    if t.size == 1 and t.ndim <= 1:  # scalar broadcast
        return np.full(out_features, t.reshape(()), dtype=np.float32)
    if t.shape == (out_features,) or t.shape == (1, out_features):
        return t.reshape(out_features).astype(np.float32, copy=False)
    return None


def _with_fused_add(linear: _Linear, index: _GraphIndex) -> _Linear:
    """``linear`` with the bias of the Add that is the MatMul's only reader, when it adds a constant (out,)."""
    output = linear.node.output[0]
    readers = index.readers.get(output, [])
    if len(readers) != 1 or output in index.outputs:
        return linear
    add = readers[0]
    if not (_standard(add) and add.op_type == "Add" and len(add.input) == 2):
        return linear
    other = add.input[1] if add.input[0] == output else add.input[0]
    c = index.const(other) if other != output else None
    if c is not None and c[0].dtype == np.float32 and c[0].shape == (linear.b.shape[1],):
        linear.bias, linear.bias_source, linear.fused_add = c[0], other, add
    return linear


# ---- 3. rewrite: one SparseLinear node per match -------------------------------------------------
class _Rewriter:
    """Makes the SparseLinear nodes; collects their new initializers and the tensors that lost a reader."""

    def __init__(self, index: _GraphIndex, index_dtype, dtype: str = "fp32"):
        self.index = index
        self.index_dtype = index_dtype
        self.int8 = dtype == "int8"
        self.new_inits: list[onnx.TensorProto] = []
        self.fused_adds: set[int] = set()  # ids of the Add nodes folded into a SparseLinear
        self.touched: set[str] = set()  # tensors that lost a reader
        self.replaced = 0
        self._csr: dict[tuple[str, float], tuple[str, ...]] = {}  # (weight, alpha) -> CSR initializers

    def rewrite(self, linear: _Linear) -> onnx.NodeProto:
        """The ``vlsparse.SparseLinear`` (or ``SparseLinearInt8``) node that replaces ``linear`` (and its fused Add)."""
        node = linear.node
        w_src = node.input[1]
        readable = w_src if not w_src.startswith("onnx::") or not node.name else node.name.strip("/").replace("/", ".")
        inputs = [node.input[0], *self._csr_inputs(linear, readable)]
        if linear.bias is not None:
            inputs.append(self._bias_input(linear, readable))
        output = node.output[0]
        if linear.fused_add is not None:
            self.fused_adds.add(id(linear.fused_add))
            output = linear.fused_add.output[0]
        self.touched.add(w_src)
        if linear.bias_source is not None:
            self.touched.add(linear.bias_source)
        self.replaced += 1
        in_features, out_features = linear.b.shape
        name = self.index.names.fresh((node.name or readable) + "_sparse")
        return helper.make_node(OP_TYPE_INT8 if self.int8 else OP_TYPE, inputs, [output], name=name, domain=DOMAIN,
                                in_features=int(in_features), out_features=int(out_features))

    def _csr_inputs(self, linear: _Linear, readable: str) -> tuple[str, ...]:
        """Names of the CSR initializers of W (out, in) = alpha * b^T, made once per (weight, alpha): crow_indices,
        col_indices, values (fp32); or crow_indices, block_cols, values (int8), scales (int8: :func:`int8_blocks`)."""
        key = (linear.node.input[1], linear.alpha)
        if key not in self._csr:
            w = linear.b.T  # (out, in)
            if linear.alpha != 1.0:
                w = w * np.float32(linear.alpha)
            if self.int8:
                arrays = int8_blocks(w, self.index_dtype)
                parts = ("crow_indices", "block_cols", "qvalues", "scales")
            else:
                arrays = csr_from_dense(w, self.index_dtype)
                parts = ("crow_indices", "col_indices", "values")
            names = tuple(self.index.names.fresh(f"{readable}.{part}") for part in parts)
            self.new_inits += [numpy_helper.from_array(a, n) for a, n in zip(arrays, names)]
            self._csr[key] = names
        return self._csr[key]

    def _bias_input(self, linear: _Linear, readable: str) -> str:
        """The bias initializer: a MatMul's (out,) initializer as is, else a fresh one."""
        if linear.kind == "matmul" and self.index.const(linear.bias_source)[1] == "init":
            return linear.bias_source
        name = self.index.names.fresh(f"{readable}.bias")  # Gemm (beta, broadcast) or a bias made by a node
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(linear.bias, dtype=np.float32), name))
        return name


# ---- 4. drop dead nodes and initializers; carry shapes over --------------------------------------
def _drop_dead(g: onnx.GraphProto, new_nodes: list[onnx.NodeProto], rewriter: _Rewriter, index: _GraphIndex) -> None:
    """Set ``g``'s nodes to ``new_nodes`` and add the new initializers, less what only fed the replaced
    nodes: constant producers (Identity / Transpose / Constant) whose outputs nobody reads any more,
    then initializers (and their IR < 4 graph inputs) that nobody reads (nodes, nested subgraphs,
    graph outputs)."""
    touched = rewriter.touched
    subgraph_reads = Counter(_subgraph_inputs(g))
    while True:
        still_read = Counter(name for n in new_nodes for name in n.input)
        still_read.update(subgraph_reads)
        still_read.update(index.outputs)
        dead_nodes = [n for n in new_nodes
                      if n.op_type in ("Identity", "Transpose", "Constant") and _standard(n)
                      and any(o in touched for o in n.output) and all(still_read[o] == 0 for o in n.output)]
        if not dead_nodes:
            break
        for n in dead_nodes:
            touched.update(n.input)
        dead_ids = {id(n) for n in dead_nodes}
        new_nodes = [n for n in new_nodes if id(n) not in dead_ids]
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(rewriter.new_inits)
    dead = {name for name in touched if still_read[name] == 0 and name in index.inits}
    keep = [t for t in g.initializer if t.name not in dead]
    del g.initializer[:]
    g.initializer.extend(keep)
    keep_inputs = [i for i in g.input if i.name not in dead]  # IR < 4 lists initializers as inputs
    del g.input[:]
    g.input.extend(keep_inputs)


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


def _carry_value_info(g: onnx.GraphProto, inferred: list[onnx.ValueInfoProto], index: _GraphIndex) -> None:
    """Keep the value_info of tensors that still exist, and add the SparseLinear outputs' shapes."""
    produced = {o for n in g.node for o in n.output}
    keep_vi = [v for v in g.value_info if v.name in produced or v.name in index.inputs]
    # onnxruntime cannot infer SparseLinear's output shape (the op has no shape-inference function):
    # carry over what ONNX shape inference finds for the same tensor in the dense model.
    known = {v.name for v in keep_vi} | index.outputs
    wanted = {n.output[0] for n in g.node if n.domain == DOMAIN} - known
    if wanted:
        keep_vi += [v for v in inferred if v.name in wanted]
    del g.value_info[:]
    g.value_info.extend(keep_vi)


def _mark_requires(model: onnx.ModelProto) -> None:
    """Declare the custom domain and say, in metadata and doc_string, what opening the model needs."""
    if not any(op.domain == DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    set_metadata(model, "vlsparse.requires", REQUIRES_MESSAGE)
    model.doc_string = (REQUIRES_MESSAGE + ("\n\n" + model.doc_string if model.doc_string else ""))[:4096]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


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
