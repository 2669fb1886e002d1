"""Chain consecutive ``vlsparse.SparseLinear`` nodes of a sparsified ONNX graph in feature-major layout.

The kernel computes feature-major (Y^T = W X^T): a token-major node transposes its input into a scratch
buffer and its result back on the way out. :func:`chain_sparse_nodes` (run by
:func:`vlsparse.export.onnx_sparse.sparsify_onnx`) rewrites a graph whose SparseLinear nodes are all
token-major so that those transposes cancel where sparse nodes follow each other, as in a BERT layer:

1. **GELU epilogue**: a SparseLinear whose output goes only into a GELU (erf form: torch's
   ``x * 0.5 * (1 + erf(x / sqrt 2))`` as exported, nodes Div, Erf, Add, Mul, Mul in any operand order;
   or an ONNX ``Gelu`` node with ``approximate="none"``) computes it in its epilogue (``activation=1``)
   and the GELU nodes go (the intermediate Linear of BERT, LXMERT, UNITER, ViLT).
2. **Feature-major links**: a SparseLinear whose output is read only by SparseLinear nodes (as their X)
   writes it feature-major (``output_layout=1``: shape (out, ...), the token dims after the features)
   and they read it so (``input_layout=1``): intermediate -> output keeps no transpose in between.
3. **Shared input**: a tensor of known rank read as X by two or more token-major SparseLinear nodes
   (query, key and value) is transposed once by an ONNX ``Transpose`` (last axis first) that they read
   feature-major: one transpose instead of one per node.

In the transposes' terms: each node is a feature-major core between a transpose in and a transpose out;
step 2 removes the pair out -> in between two nodes, step 3 merges the three equal "in" transposes into
one. Values are unchanged (parity with the masked dense model is tested to <= 1e-4). The shapes
(``value_info``) of the feature-major tensors are the token-major ones with the last axis moved first.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from vlsparse.runtime.ort import DOMAIN, OP_TYPE, OP_TYPE_INT8

__all__ = ["chain_sparse_nodes", "GraphLinks", "GELU", "FEATURE_MAJOR"]

GELU = 1  #: the op's ``activation`` for GELU (erf form)
FEATURE_MAJOR = 1  #: the op's ``input_layout`` / ``output_layout`` for feature-major tensors
_SQRT2 = float(np.sqrt(2.0))


def chain_sparse_nodes(model: onnx.ModelProto, shapes: dict[str, onnx.ValueInfoProto] | None = None) -> int:
    """Apply the three steps of the module docstring to ``model``'s main graph in place; return the number
    of links made (GELUs fused + feature-major edges + shared transposes).

    ``shapes``: value infos by tensor name (e.g. ONNX shape inference of the dense model), used for the rank
    of shared inputs (step 3 skips a tensor of unknown rank) and the shapes of the new tensors; the graph's
    own value_info, inputs and outputs are used too. Nodes other than SparseLinear are left alone.
    """
    g = model.graph
    shapes = {**(shapes or {}), **{v.name: v for v in (*g.input, *g.output, *g.value_info)}}
    fused = _fuse_gelus(g, shapes)
    linked = _link_feature_major(g)
    shared, served = _share_inputs(g, shapes)
    _set_value_info(g, shapes, linked | shared)
    return fused + len(linked) + served


def _sparse(n: onnx.NodeProto) -> bool:
    return n.domain == DOMAIN and n.op_type == OP_TYPE


def _any_sparse(n: onnx.NodeProto) -> bool:
    """SparseLinear or SparseLinearInt8: both take the GELU epilogue; only SparseLinear has feature-major layouts."""
    return n.domain == DOMAIN and n.op_type in (OP_TYPE, OP_TYPE_INT8)


def _attr(n: onnx.NodeProto, name: str, default=0):
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(n: onnx.NodeProto, name: str, value: int) -> None:
    for i, a in enumerate(n.attribute):
        if a.name == name:
            del n.attribute[i]
            break
    n.attribute.append(helper.make_attribute(name, int(value)))


class GraphLinks:
    """Readers, producers and scalar constants of ONNX graph ``g`` as it is now (``outputs``: graph output names;
    ``producer``: tensor -> node; ``readers``: tensor -> nodes reading it; ``inits``: initializers by name)."""

    def __init__(self, g: onnx.GraphProto):
        self.outputs = {o.name for o in g.output}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for name in n.input:
                self.readers.setdefault(name, []).append(n)
        self.inits = {t.name: t for t in g.initializer}

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        r = self.readers.get(name, [])
        return r[0] if len(r) == 1 and name not in self.outputs else None

    def scalar(self, name: str) -> float | None:
        """The value of a one-element float constant (initializer or Constant node), else None."""
        if name in self.inits:
            a = onnx.numpy_helper.to_array(self.inits[name])
        elif name in self.producer and self.producer[name].op_type == "Constant" and self.producer[name].attribute:
            a = onnx.numpy_helper.to_array(_attr(self.producer[name], "value", None) or onnx.TensorProto())
        else:
            return None
        return float(a.reshape(())) if a.size == 1 and a.dtype.kind == "f" else None


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The other operand of a binary node that reads ``name`` once."""
    ins = list(node.input)
    if len(ins) != 2 or ins.count(name) != 1:
        return None
    return ins[1] if ins[0] == name else ins[0]


def _near(v: float | None, target: float) -> bool:
    return v is not None and abs(v - target) <= 1e-6 * max(1.0, abs(target))


# ---- 1. GELU ------------------------------------------------------------------------------------------
def _match_gelu(y: str, gr: GraphLinks) -> tuple[list[onnx.NodeProto], str] | None:
    """(the GELU's nodes, its output) when ``y`` is read only by an exact GELU of itself, else None."""
    readers = gr.readers.get(y, [])
    if y in gr.outputs or not readers or any(r.domain not in ("", "ai.onnx") for r in readers):
        return None
    if len(readers) == 1 and readers[0].op_type == "Gelu" and _attr(readers[0], "approximate", b"none") in (b"none", "none"):
        return [readers[0]], readers[0].output[0]
    by_op = {r.op_type: r for r in readers}
    if len(readers) != 2 or set(by_op) not in ({"Div", "Mul"}, {"Mul"}):
        return None
    scale = by_op.get("Div") or next((r for r in readers if _near(gr.scalar(_other(r, y) or ""), 1 / _SQRT2)), None)
    if scale is None or (scale.op_type == "Div" and (scale.input[0] != y or not _near(gr.scalar(scale.input[1]), _SQRT2))):
        return None
    mul = next(r for r in readers if r is not scale)
    erf = gr.only_reader(scale.output[0])
    add = erf and erf.op_type == "Erf" and gr.only_reader(erf.output[0])
    if not add or add.op_type != "Add" or not _near(gr.scalar(_other(add, erf.output[0]) or ""), 1.0):
        return None
    if mul.op_type != "Mul" or _other(mul, y) != add.output[0]:
        return None
    half = gr.only_reader(mul.output[0])
    if half is None or half.op_type != "Mul" or not _near(gr.scalar(_other(half, mul.output[0]) or ""), 0.5):
        return None
    return [scale, erf, add, mul, half], half.output[0]


def _fuse_gelus(g: onnx.GraphProto, shapes: dict) -> int:
    gr = GraphLinks(g)
    dead: set[int] = set()
    fused = 0
    for n in g.node:
        if not _any_sparse(n) or _attr(n, "activation", 0) != 0:
            continue
        m = _match_gelu(n.output[0], gr)
        if m is None:
            continue
        nodes, out = m
        if n.output[0] in shapes:  # the fused output has the same shape as the GELU's input
            shapes.setdefault(out, _renamed(shapes[n.output[0]], out))
        n.output[0] = out
        _set_attr(n, "activation", GELU)
        dead.update(id(x) for x in nodes)
        fused += 1
    if fused:
        dead_inputs = {i for n in g.node if id(n) in dead for i in n.input}
        keep = [n for n in g.node if id(n) not in dead]
        del g.node[:]
        g.node.extend(_drop_unread_constants(keep, dead_inputs, {o.name for o in g.output}))
    return fused


def _drop_unread_constants(nodes: list[onnx.NodeProto], dead_inputs: set[str], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` less the Constant nodes that fed removed nodes only (``dead_inputs``) and nothing reads now."""
    read = {i for n in nodes for i in n.input} | outputs
    return [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in dead_inputs and n.output[0] not in read)]


# ---- 2. feature-major links ----------------------------------------------------------------------------
def _link_feature_major(g: onnx.GraphProto) -> set[str]:
    """Set output_layout / input_layout on sparse -> sparse edges; return the feature-major tensors."""
    gr = GraphLinks(g)
    fm: set[str] = set()
    for n in g.node:
        y = n.output[0] if _sparse(n) else None
        readers = gr.readers.get(y, []) if y else []
        if not readers or y in gr.outputs or _attr(n, "output_layout", 0) != 0:
            continue
        if all(_sparse(r) and list(r.input).count(y) == 1 and r.input[0] == y for r in readers):
            _set_attr(n, "output_layout", FEATURE_MAJOR)
            for r in readers:
                _set_attr(r, "input_layout", FEATURE_MAJOR)
            fm.add(y)
    return fm


# ---- 3. shared inputs ----------------------------------------------------------------------------------
def _rank(vi: onnx.ValueInfoProto | None) -> int | None:
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    return len(vi.type.tensor_type.shape.dim)


def _share_inputs(g: onnx.GraphProto, shapes: dict) -> tuple[set[str], int]:
    """Insert one Transpose per tensor read as X by >= 2 token-major SparseLinears; return the new
    feature-major tensors and how many readers they serve."""
    gr = GraphLinks(g)
    used = {n.name for n in g.node} | {t for n in g.node for t in (*n.input, *n.output)} | set(gr.inits)
    inserts: dict[int, onnx.NodeProto] = {}
    new: set[str] = set()
    served = 0
    for x, readers in gr.readers.items():
        sparse = [r for r in readers if _sparse(r) and r.input[0] == x and _attr(r, "input_layout", 0) == 0]
        rank = _rank(shapes.get(x))
        if len(sparse) < 2 or rank is None or rank < 2:
            continue
        xt = _fresh(x + "_feature_major", used)
        t = helper.make_node("Transpose", [x], [xt], name=_fresh(x + "_to_feature_major", used),
                             perm=[rank - 1, *range(rank - 1)])
        inserts[id(sparse[0])] = t
        for r in sparse:
            r.input[0] = xt
            _set_attr(r, "input_layout", FEATURE_MAJOR)
        shapes[xt] = _renamed(shapes[x], xt)
        new.add(xt)
        served += len(sparse) - 1
    if inserts:
        nodes = [m for n in g.node for m in ((inserts[id(n)], n) if id(n) in inserts else (n,))]
        del g.node[:]
        g.node.extend(nodes)
    return new, served


def _fresh(base: str, used: set[str]) -> str:
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name


# ---- value_info ----------------------------------------------------------------------------------------
def _renamed(vi: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    out.name = name
    return out


def _set_value_info(g: onnx.GraphProto, shapes: dict, fm: set[str]) -> None:
    """value_info of every SparseLinear output and shared transpose: token-major shapes as known, the
    feature-major ones with the last axis first (dropped where unknown)."""
    produced = {o for n in g.node for o in n.output}
    wanted = {n.output[0] for n in g.node if _any_sparse(n)} | fm
    graph_io = {v.name for v in (*g.input, *g.output)}
    keep = [v for v in g.value_info if v.name in produced and v.name not in wanted]
    for name in sorted(wanted - graph_io):
        vi = shapes.get(name)
        if vi is None:
            continue
        vi = _renamed(vi, name)
        dims = vi.type.tensor_type.shape.dim
        if name in fm and len(dims) >= 2 and vi.type.tensor_type.HasField("shape"):
            order = [dims[-1], *dims[:-1]]
            copies = [onnx.TensorShapeProto.Dimension() for _ in order]
            for c, d in zip(copies, order):
                c.CopyFrom(d)
            del dims[:]
            dims.extend(copies)
        keep.append(vi)
    del g.value_info[:]
    g.value_info.extend(keep)
