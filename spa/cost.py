"""Parameters, multiply-accumulates (MACs) and tensor sizes, for targets, reports, benchmarks and the
calibration's memory."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper

from .graph import Consts, Graph, attr, infer_shapes
from .quant import QOPERATOR_WEIGHTS
from .runtime import is_float

CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1}  # op -> weight slot
MATRIX_OPS = ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "QGemm", "MatMulNBits", "FusedMatMul",
              "FusedGemm")  # A: input 0
MAC_OPS = (*CONV_WEIGHT, "ConvTranspose", *MATRIX_OPS, "LSTM", "GRU", "RNN", "DynamicQuantizeLSTM", "Attention",
           "GroupQueryAttention", "Einsum")


def concrete_shapes(model: onnx.ModelProto, batch: int = 1, dims: dict | None = None,
                    shapes: dict | None = None, run: bool = True) -> dict:
    """Shapes with every symbolic dim fixed (batch first, then `dims`, the user's input `shapes`);
    where inference leaves a MAC op's shapes open, falls back to a run (unless `run` is False)."""
    from .runtime import input_specs, random_inputs, session

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    specs = {name: shape for name, shape, _ in input_specs(model, batch, dims, shapes=shapes)}
    for vi in fixed.graph.input:
        if vi.name in specs:
            for d, value in zip(vi.type.tensor_type.shape.dim, specs[vi.name]):
                d.Clear()
                d.dim_value = value
    inferred = infer_shapes(fixed)
    g = fixed.graph
    wanted = {x for n in g.node if n.op_type in MAC_OPS for x in list(n.input) + list(n.output) if x}
    missing = [t for t in wanted if not _static(inferred.get(t)) and t not in {i.name for i in g.initializer}]
    if missing and run:
        known = {o.name for o in g.output}
        g.output.extend(helper.ValueInfoProto(name=t) for t in missing if t not in known)
        try:
            sess = session(fixed, quiet=True)  # a model that fails at these sizes is counted without them
            values = sess.run(None, random_inputs(model, batch, dims=dims, shapes=shapes))
            for out, value in zip(sess.get_outputs(), values):
                inferred[out.name] = tuple(np.shape(value))
        except Exception:
            pass
    for t in model.graph.initializer:
        inferred[t.name] = tuple(t.dims)
    return inferred


def _static(shape):
    return shape is not None and all(isinstance(d, int) for d in shape)


def largest_node(model: onnx.ModelProto, shapes: dict) -> tuple[str, int]:
    """("Op 'output'", elements) of the node whose computed inputs and outputs together hold the most
    elements (what must be alive at once while it runs), counting the tensors `shapes` knows in full;
    ("", 0) when it knows none."""
    weights = {t.name for t in model.graph.initializer}

    def elements(name):
        shape = shapes.get(name)
        return int(np.prod(shape, dtype=np.int64)) if name and name not in weights and _static(shape) else 0

    sizes = {f"{n.op_type} '{n.output[0]}'": sum(map(elements, {*n.input, *n.output}))
             for n in model.graph.node if n.output}
    label = max(sizes, key=sizes.get, default="")
    return label, sizes.get(label, 0)


def node_macs(node, dim) -> int:
    """MACs of one node; dim(tensor, axis) gives (possibly pruned) sizes, None when unknown."""
    def numel(t):
        shape = [dim(t, a) for a in range(_rank(dim, t))]
        return None if None in shape else int(np.prod(shape, dtype=np.int64))

    op = node.op_type
    try:
        if op in CONV_WEIGHT:
            w = node.input[CONV_WEIGHT[op]]
            per_out = np.prod([dim(w, a) for a in range(1, _rank(dim, w))], dtype=np.int64)
            return int(numel(node.output[0]) * per_out)
        if op == "ConvTranspose":
            w = node.input[1]
            per_in = np.prod([dim(w, a) for a in range(1, _rank(dim, w))], dtype=np.int64)
            return int(numel(node.input[0]) * per_in)
        if op in MATRIX_OPS:
            a = node.input[0]
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            k_axis = {"Gemm": 0, "QGemm": 0, "FusedGemm": 0, "FusedMatMul": -2}.get(op, -1) if trans_a else -1
            return int(numel(node.output[0]) * dim(a, k_axis % _rank(dim, a)))
        if op == "Attention":  # com.microsoft: x [B, S, hidden] times the packed q | k | v weight, then
            x, columns = node.input[0], dim(node.input[1], 1)  # q k^T and the weights times v per head
            sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), [1, 1, 1])
            rows = numel(x) // dim(x, 2)
            return int(rows * dim(x, 2) * columns + rows * dim(x, 1) * columns * (sizes[0] + sizes[2]) / sum(sizes))
        if op == "GroupQueryAttention":  # q k^T and the weights times v: 2 x output x keys attended
            y, present = node.output[0], node.output[1] if len(node.output) > 1 and node.output[1] else None
            return int(2 * numel(y) * (dim(present, 2) if present else dim(y, 1)))
        if op == "Einsum" and len(node.input) == 2:  # one multiply-add per combination of all labels
            from .rules import Frozen
            from .rules.layers import einsum_labels

            equation = next(a.s for a in node.attribute if a.name == "equation")
            try:
                terms, _ = einsum_labels(equation, [_rank(dim, x) for x in node.input])
            except Frozen:  # a diagonal: not a product of two operands' labels
                return 0
            sizes = {label: dim(x, k) for x, term in zip(node.input, terms) for k, label in enumerate(term)}
            return int(np.prod(list(sizes.values()), dtype=np.int64))
        if op in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"):
            w, r, x = node.input[1], node.input[2], node.input[0]
            steps, batch = dim(x, 0), dim(x, 1)
            return int(steps * batch * (numel(w) + numel(r)) // 1)
    except (TypeError, ValueError, ZeroDivisionError):  # unknown sizes (rank 0 where shapes are unknown)
        return 0
    return 0


def _rank(dim, tensor):
    return dim.rank(tensor)


class Dims:
    """dim(tensor, axis) over concrete shapes, minus what a plan removes."""

    def __init__(self, shapes: dict, plan=None):
        self.shapes = shapes
        self.plan = plan

    def rank(self, tensor):
        return len(self.shapes.get(tensor, ()))

    def __call__(self, tensor, axis):
        shape = self.shapes.get(tensor)
        if shape is None or axis >= len(shape) or not isinstance(shape[axis], int):
            return None
        if self.plan is not None and (tensor, axis) in self.plan.analysis.members:
            return shape[axis] - len(self.plan.removed(tensor, axis))
        return shape[axis]


def macs_by_op(model_or_graph, shapes: dict, plan=None) -> dict:
    nodes = model_or_graph.nodes if isinstance(model_or_graph, Graph) else model_or_graph.graph.node
    dims = Dims(shapes, plan)
    totals = defaultdict(int)
    for node in nodes:
        if node.op_type in MAC_OPS:
            totals[node.op_type] += node_macs(node, dims)
    return dict(totals)


def count_macs(model_or_graph, shapes: dict | None = None, plan=None) -> int:
    """Multiply-accumulates of one pass (MAC_OPS): at `shapes` (default: a model's own at batch 1),
    with `plan`'s channels removed."""
    return int(sum(macs_by_op(model_or_graph, concrete_shapes(model_or_graph, batch=1) if shapes is None else shapes,
                              plan).values()))


# integer constants that are weights (not shapes or indices), by the op that reads them and its input slots
INTEGER_WEIGHTS = {"DequantizeLinear": (0,), "ConvInteger": (1,), "MatMulInteger": (1,),
                   **{op: tuple(slots) for op, slots in QOPERATOR_WEIGHTS.items()}}


def count_params(model_or_graph, plan=None) -> int:
    """Number of elements in float weights and in the integer weights of quantized layers
    (INTEGER_WEIGHTS: 8- or 4-bit, one element each; a MatMulNBits' packed bytes hold 8 / bits),
    initializers and Constant nodes."""
    graph = isinstance(model_or_graph, Graph)
    consts = model_or_graph.consts if graph else Consts(model_or_graph)
    nodes = model_or_graph.nodes if graph else model_or_graph.graph.node
    per_element = {node.input[k]: 1 for node in nodes for k in INTEGER_WEIGHTS.get(node.op_type, ())
                   if k < len(node.input)}
    per_element |= {node.input[1]: 8 // attr(node, "bits", 4) for node in nodes if node.op_type == "MatMulNBits"}
    total = 0
    for name in consts:
        if not is_float(consts.dtype(name)) and name not in per_element:
            continue
        shape = list(consts.shape(name))
        if plan is not None:
            for axis in range(len(shape)):
                shape[axis] -= len(plan.removed(name, axis))
        total += int(np.prod(shape, dtype=np.int64)) * per_element.get(name, 1)
    return total
