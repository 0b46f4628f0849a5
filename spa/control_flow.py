"""Layers inside control-flow bodies: If branches, Loop and Scan bodies.

silero-vad keeps its whole network inside an If (one branch per sample rate), optimum's merged decoders
read every weight inside one, tf2onnx writes Keras LSTMs as Loops. Their channels are not analysed (a
control-flow node is a boundary of the coupling analysis), but fine-grained sparsity changes weight values
only: `lifted` moves the constants that a Conv, Gemm or MatMul inside a body reads to the top-level graph
(subgraphs may read outer names), where they are rewritten like any weight, and `body_layers` finds those
layers for their masks.
"""
from __future__ import annotations

from collections import Counter

import onnx

from .graph import FLOATS, _subgraphs

LAYER_OPS = ("Conv", "Gemm", "MatMul")


def has_bodies(model: onnx.ModelProto) -> bool:
    return any(_subgraphs(node) for node in model.graph.node)


def lifted(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(a copy of `model` whose float constants of rank 2 or more that a Conv, Gemm or MatMul inside a
    control-flow body reads as its weight are top-level initializers, how many were moved); `model`
    itself where there are none to move. Body
    initializers and Constant nodes are moved at any depth; a name defined elsewhere too is renamed
    within its body."""
    if not any(_liftable(body) for node in model.graph.node for body in _subgraphs(node)):
        return model, 0  # no copy (a big model's If holding shape logic only)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    defined = Counter(_definitions(out.graph))
    moved = 0
    for node in out.graph.node:
        for body in _subgraphs(node):
            moved += _lift(body, out.graph, defined)
    return out, moved


def _liftable(body: onnx.GraphProto) -> bool:
    """Whether `_lift` would move anything out of `body` (or its nested bodies)."""
    local = {t.name for t in body.initializer if _is_weight(t)} | \
        {n.output[0] for n in body.node if n.op_type == "Constant" and any(a.name == "value" and _is_weight(a.t)
                                                                           for a in n.attribute)}
    return bool(_layer_inputs(body.node) & local) or any(_liftable(b) for n in body.node for b in _subgraphs(n))


def _layer_inputs(nodes) -> set:
    """The names the Conv, Gemm and MatMul among `nodes` may read as their weight."""
    from .layers import weight_slots

    return {n.input[slot] for n in nodes if n.op_type in LAYER_OPS for slot in weight_slots(n) if len(n.input) > slot}


def body_layers(g) -> list:
    """spa.layers.Layer of every Conv, Gemm and MatMul inside the control-flow bodies of graph `g` whose
    weight is one of g's float constants (after `lifted`; or a Loop's carried constant: `_carried_constants`):
    `node` is the top-level control-flow node, `inside` the layer's own node, no bias (a mask never changes it)."""
    from .layers import _layer, weight_axis, weight_slots

    found = []
    for index, node in enumerate(g.nodes):
        carried = _carried_constants(g, node)
        for body in _subgraphs(node):
            for inner in _nodes(body):
                for slot in weight_slots(inner):
                    if inner.op_type not in LAYER_OPS or len(inner.input) <= slot:
                        continue
                    weight = carried.get(inner.input[slot], inner.input[slot])
                    if weight not in g.consts:
                        continue
                    layer = _layer(g, index, inner, slot, weight_axis(inner, slot), weight)
                    if layer is not None:
                        layer.bias, layer.compensable = None, False
                        layer.inside = (inner.op_type, inner.name or inner.output[0])
                        found.append(layer)
                        break
    return found


def inlined(model: onnx.ModelProto, g) -> onnx.ModelProto | None:
    """A copy of `model` (lifted) with each top-level If whose branches hold layers replaced by the nodes of
    one branch, the one whose layers read the most of g's constants (the then-branch on ties), its outputs
    passed to the If's through Identity nodes: the layers there become top-level layers, whose inputs a
    calibration run can read (OBS needs them). It computes what the model does where that branch is
    taken, whatever the condition; only the calibration runs it. None where no If holds a layer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, changed = [], False
    for node in model.graph.node:
        named = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
        branches = [named[k] for k in ("then_branch", "else_branch") if k in named]
        reads = [_weights_read(branch, g) for branch in branches]
        if node.op_type != "If" or len(branches) != 2 or not any(reads):
            nodes.append(node)
            continue
        branch = branches[0] if len(reads[0]) >= len(reads[1]) else branches[1]
        out.graph.initializer.extend(branch.initializer)
        nodes.extend(branch.node)
        nodes.extend(onnx.helper.make_node("Identity", [inner.name], [outer], name=f"{node.name or 'If'}/{outer}")
                     for inner, outer in zip(branch.output, node.output))
        changed = True
    if not changed:
        return None
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _weights_read(graph: onnx.GraphProto, g) -> set:
    """g's constants that the layers of `graph` (and its nested bodies) read as weights."""
    return {name for name in _layer_inputs(_nodes(graph)) if name in g.consts}


def _carried_constants(g, node: onnx.NodeProto) -> dict:
    """{body input: top-level constant} of a Loop's loop-carried values that are constants its body passes
    on unchanged (tf2onnx hands a Keras LSTM's weights to its Loop so): in every iteration the constant."""
    if node.op_type != "Loop" or not _subgraphs(node):
        return {}
    body = _subgraphs(node)[0]
    made = {n.output[0]: n.input[0] for n in body.node if n.op_type == "Identity"}
    out = {}
    for k, given in enumerate(node.input[2:]):
        inner = body.input[k + 2].name if k + 2 < len(body.input) else None
        passed = body.output[k + 1].name if k + 1 < len(body.output) else None
        if inner and given in g.consts and passed is not None and made.get(passed, passed) == inner:
            out[inner] = given
    return out


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for body in _subgraphs(node):
            yield from _nodes(body)


def _definitions(graph: onnx.GraphProto):
    """Every name a graph and its subgraphs define (inputs, initializers, node outputs), with repeats."""
    yield from (i.name for i in graph.input)
    yield from (t.name for t in graph.initializer)
    for node in graph.node:
        yield from (o for o in node.output if o)
        for body in _subgraphs(node):
            yield from _definitions(body)


def _lift(body: onnx.GraphProto, top: onnx.GraphProto, defined: Counter) -> int:
    """Move `body`'s layer weights (and its nested bodies') to `top`; the count moved."""
    read = _layer_inputs(body.node)
    moved = 0
    for tensor in [t for t in body.initializer if t.name in read and _is_weight(t)]:
        body.initializer.remove(tensor)
        _add(top, body, tensor, defined)
        moved += 1
    for node in [n for n in body.node if n.op_type == "Constant" and n.output[0] in read]:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if value is not None and _is_weight(value):
            body.node.remove(node)
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            _add(top, body, tensor, defined)
            moved += 1
    for node in body.node:
        for nested in _subgraphs(node):
            moved += _lift(nested, top, defined)
    return moved


def _is_weight(tensor: onnx.TensorProto) -> bool:
    return len(tensor.dims) >= 2 and tensor.data_type in FLOATS


def _add(top: onnx.GraphProto, body: onnx.GraphProto, tensor: onnx.TensorProto, defined: Counter) -> None:
    """`tensor` (defined in `body`) as a top-level initializer, renamed within `body` where its name is
    defined anywhere else."""
    name = tensor.name
    if defined[name] > 1:
        k = 1
        while f"{name}__{k}" in defined:
            k += 1
        tensor.name = f"{name}__{k}"
        defined[name] -= 1
        defined[tensor.name] += 1
        _rename(body, name, tensor.name)
    top.initializer.append(tensor)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        for body in _subgraphs(node):
            _rename(body, old, new)
    for output in graph.output:
        if output.name == old:
            output.name = new


__all__ = ["lifted", "body_layers", "has_bodies", "inlined"]
