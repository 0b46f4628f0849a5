"""Layers inside control-flow bodies: If branches, Loop and Scan bodies.

silero-vad keeps its whole network inside an If (one branch per sample rate), optimum's merged decoders
read every weight inside one, tf2onnx writes Keras LSTMs as Loops. Their channels are not analysed (a
control-flow node is a boundary of the coupling analysis), but fine-grained sparsity changes weight values
only: `lifted` moves the constants that a Conv, Gemm or MatMul inside a body reads to the top-level graph
(subgraphs may read outer names), where they are rewritten like any weight, and `body_layers` finds those
layers for their masks.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import onnx

from .graph import FLOATS, _subgraphs, all_nodes

LAYER_OPS = ("Conv", "Gemm", "MatMul")
# an If whose branches hold one of these is flattened: its channels may prune with the rest
FLATTENED_OPS = LAYER_OPS + ("ConvTranspose", "LSTM", "GRU", "RNN")
BRANCHES = ("then_branch", "else_branch")
FLATTENED = "spa.flattened"  # metadata of a `flattened` copy: its Flattened records, for `folded`


def branches(node: onnx.NodeProto) -> list:
    """An If's [then, else] branch graphs; [] for any other node."""
    named = {a.name: a.g for a in node.attribute if a.name in BRANCHES}
    return [named[k] for k in BRANCHES] if node.op_type == "If" and len(named) == 2 else []


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
            for inner in all_nodes(body):
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
        pair = branches(node)
        reads = [_weights_read(branch, g) for branch in pair]
        if not pair or not any(reads):
            nodes.append(node)
            continue
        branch = pair[0] if len(reads[0]) >= len(reads[1]) else pair[1]
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
    return {name for name in _layer_inputs(all_nodes(graph)) if name in g.consts}


def _carried_constants(g, node: onnx.NodeProto) -> dict:
    """{body input: top-level constant} of a Loop's loop-carried values that are constants its body passes
    on unchanged (tf2onnx hands a Keras LSTM's weights to its Loop so): in every iteration the constant."""
    if node.op_type != "Loop" or not _subgraphs(node):
        return {}
    return {inner: given for inner, given in _passed_on(node, _subgraphs(node)[0]).items() if given in g.consts}


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
        _rename_reads(body, {name: tensor.name})
    top.initializer.append(tensor)


@dataclass(frozen=True)
class Flattened:
    """An If whose branches `flattened` moved into its enclosing graph: the name of the selector left in its
    place and the prefix of every name each branch defined (then, else). Or (`kind` "Loop") a Loop whose body
    `flattened` copied into its enclosing graph as the first iteration: the Loop's name, the copy's prefix and
    the copy's outputs."""

    name: str
    prefixes: tuple
    kind: str = "If"
    stepped: tuple = ()  # a Loop's: the copy's body outputs (the condition, loop-carried values, scan values)


def flattened(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
    """(a copy of `model` in which every If whose branches hold layers, at any depth, has the nodes of both
    branches in its enclosing graph, the names they define prefixed, and in its place a selector: an If whose
    branches only pass those nodes' outputs on (Identity), the Flattened record of each); (`model`, []) where
    no If holds a layer. The analysis sees through a selector (spa.rules.control), so the channels of layers
    inside branches couple with the rest, and a weight both branches read prunes alike in both; `folded`
    moves the nodes back after the rewrite. The copy computes both branches where the model computes one:
    for the analysis and calibration only. The copy carries its records (metadata): flattening it again
    returns it with them."""
    if any(p.key == FLATTENED for p in model.metadata_props):  # flattened already: the records it carries
        return model, _records(model)
    if not any(_flattenable(node) for node in model.graph.node):
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    found = []
    _flatten_graph(out.graph, set(_definitions(out.graph)), found)
    out.metadata_props.add(key=FLATTENED, value=json.dumps([[f.name, list(f.prefixes), f.kind, list(f.stepped)]
                                                            for f in found]))
    return out, found


def stepped_values(model: onnx.ModelProto) -> dict:
    """{Loop name: [the outputs of the first-iteration copy of its body: the condition, the loop-carried values
    it hands the next iteration, the scan values]} of the Loops a `flattened` copy holds ({} for any other
    model): the analysis reads the Loop as reading them (spa.rules.control couples them with its inputs and
    outputs), and the rewrite keeps the nodes that compute them."""
    return {f.name: list(f.stepped) for f in _records(model) if f.kind == "Loop"}


def loop_prefixes(model: onnx.ModelProto) -> dict:
    """{Loop name: the prefix of its first-iteration copy's names} of the Loops a `flattened` copy holds."""
    return {f.name: f.prefixes[0] for f in _records(model) if f.kind == "Loop"}


def _records(model: onnx.ModelProto) -> list:
    """The Flattened records a `flattened` copy carries ([] for any other model)."""
    done = next((p.value for p in model.metadata_props if p.key == FLATTENED), None)
    return [Flattened(name, tuple(prefixes), kind, tuple(stepped))
            for name, prefixes, kind, stepped in json.loads(done)] if done else []


def folded(model: onnx.ModelProto, found: list, outside=()) -> onnx.ModelProto:
    """`model` (a rewrite of a `flattened` copy) with each selector's branches holding again the nodes
    whose outputs carry their prefix, in their order, and each flattened Loop's body its first-iteration
    copy; in place. Initializers named in `outside` stay where they are (a Loop's body reads them there)."""
    kept = [p for p in model.metadata_props if p.key != FLATTENED]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    loops = {entry.name: entry.prefixes[0] for entry in found if entry.kind == "Loop"}
    entries = {entry.name: entry for entry in found if entry.kind == "If"}
    if loops:
        _fold_loops(model.graph, loops, set(outside))
    _fold_graph(model.graph, entries)
    _restore_names(model.graph, entries, set())
    return model


def _flattenable(node: onnx.NodeProto) -> bool:
    return node.op_type in ("If", "Loop") and any(n.op_type in FLATTENED_OPS for body in _subgraphs(node)
                                                  for n in all_nodes(body))


def _flatten_graph(graph: onnx.GraphProto, names: set, found: list) -> None:
    nodes = []
    for node in graph.node:
        if not _flattenable(node):
            nodes.append(node)
            continue
        if node.op_type == "Loop":
            node.name = _unique(node.name or f"Loop_{len(found)}", names)
            prefix = _unique(f"{node.name}/body/", names)
            copy, initializers, stepped = _first_iteration(node, prefix, names, {t.name for t in graph.initializer})
            nodes.extend(copy + [node])
            graph.initializer.extend(initializers)
            found.append(Flattened(node.name, (prefix,), "Loop", stepped))
            continue
        base = _unique(node.name or f"If_{len(found)}", names)
        sources, prefixes = {}, []
        for key, branch in zip(BRANCHES, branches(node)):
            prefix = _unique(f"{base}/{key.split('_')[0]}/", names)
            prefixes.append(prefix)
            _prefix(branch, prefix, names)
            _flatten_graph(branch, names, found)
            nodes.extend(branch.node)
            graph.initializer.extend(branch.initializer)
            sources[key] = branch.output
        nodes.append(_selector(node, base, sources, prefixes, names))
        found.append(Flattened(base, tuple(prefixes)))
    del graph.node[:]
    graph.node.extend(nodes)


def _first_iteration(loop: onnx.NodeProto, prefix: str, names: set, constants: set) -> tuple[list, list, tuple]:
    """(nodes, initializers, outputs) of a copy of `loop`'s body, every name it defines (its inputs too)
    prefixed, whose inputs are the first iteration's: iteration 0, the loop's condition and the initial
    loop-carried values. The Loop itself stays and computes what the model computes; the copy is what the
    analysis reads of its body (spa.rules.control couples the two), and `folded` makes the rewritten copy its
    body."""
    body = onnx.GraphProto()
    body.CopyFrom(_subgraphs(loop)[0])
    inputs = {i.name: prefix + i.name for i in body.input}
    names.update(inputs.values())
    # a constant the body passes on unchanged (tf2onnx hands a Keras LSTM's weights over so) is read as itself:
    # the copy's layers read their weights
    constant = {inner: given for inner, given in _passed_on(loop, body).items() if given in constants}
    _rename_reads(body, {**inputs, **constant})
    _prefix(body, prefix, names)  # control flow inside it stays as it is: a boundary
    start = [onnx.helper.make_node("Constant", [], [inputs[body.input[0].name]], name=inputs[body.input[0].name],
                                   value=onnx.helper.make_tensor("i", onnx.TensorProto.INT64, [], [0]))]
    cond = body.input[1].name
    start.append(onnx.helper.make_node("Identity", [loop.input[1]], [inputs[cond]], name=inputs[cond])
                 if len(loop.input) > 1 and loop.input[1] else
                 onnx.helper.make_node("Constant", [], [inputs[cond]], name=inputs[cond],
                                       value=onnx.helper.make_tensor("c", onnx.TensorProto.BOOL, [], [True])))
    start += [onnx.helper.make_node("Identity", [given], [inputs[carried.name]], name=inputs[carried.name])
              for given, carried in zip(loop.input[2:], body.input[2:]) if carried.name not in constant]
    return start + list(body.node), list(body.initializer), tuple(o.name for o in body.output)


def _passed_on(loop: onnx.NodeProto, body: onnx.GraphProto) -> dict:
    """{body input: the Loop's input} of the loop-carried values the body hands the next iteration unchanged
    (its output the input itself, or an Identity of it)."""
    made = {n.output[0]: n.input[0] for n in body.node if n.op_type == "Identity"}
    return {inner.name: given for given, inner, passed in zip(loop.input[2:], body.input[2:], body.output[1:])
            if given and made.get(passed.name, passed.name) == inner.name}


def _fold_loops(graph: onnx.GraphProto, loops: dict, outside: set) -> None:
    """Each flattened Loop (`loops`: name -> prefix) takes as its body the nodes and initializers that carry
    its prefix (the rewritten first-iteration copy), unprefixed, less the nodes that fed it the first
    iteration's inputs; the body's declared values keep their names and types, not their shapes (but for the
    iteration and condition scalars)."""
    for name, prefix in loops.items():
        loop = next((n for n in graph.node if n.op_type == "Loop" and n.name == name), None)
        if loop is None:
            continue
        body = _subgraphs(loop)[0]
        starts = {prefix + i.name for i in body.input}
        ours = [n for n in graph.node if n is not loop and any(o.startswith(prefix) for o in n.output if o)]
        del body.node[:]
        body.node.extend(n for n in ours if n.output[0] not in starts)
        own = [k for k, t in enumerate(graph.initializer) if t.name.startswith(prefix) and t.name not in outside]
        del body.initializer[:]
        body.initializer.extend(graph.initializer[k] for k in own)
        for k in reversed(own):  # by index: a big model's other tensors are never compared or copied
            del graph.initializer[k]
        unprefixed = {n: n[len(prefix):] for n in _level_names(body) if n.startswith(prefix)}
        unprefixed.update((n, n[len(prefix):]) for n in starts)
        for tensor in body.initializer:
            tensor.name = unprefixed.get(tensor.name, tensor.name)
        for node in body.node:
            node.output[:] = [unprefixed.get(o, o) for o in node.output]
            node.name = node.name[len(prefix):] if node.name.startswith(prefix) else node.name
        _rename_reads(body, unprefixed)
        for value in list(body.input[2:]) + list(body.output[1:]):  # the iteration and condition stay scalars
            if value.type.HasField("tensor_type"):
                value.type.tensor_type.ClearField("shape")
        moved = {id(n) for n in ours}
        kept = []
        for node in graph.node:
            if id(node) not in moved:
                kept.append(onnx.NodeProto())
                kept[-1].CopyFrom(node)
        del graph.node[:]
        graph.node.extend(kept)


def _unique(name: str, names: set) -> str:
    k, found = 0, name
    while found in names:
        k += 1
        found = f"{name}{k}" if not name.endswith("/") else f"{name[:-1]}{k}/"
    names.add(found)
    return found


def _prefix(branch: onnx.GraphProto, prefix: str, names: set) -> None:
    """Rename every name `branch` defines (node outputs and names, initializers) to `prefix` + name, where
    it is read in `branch` and in its nested bodies."""
    mapping = {t.name: prefix + t.name for t in branch.initializer}
    mapping.update((o, prefix + o) for n in branch.node for o in n.output if o)
    names.update(mapping.values())
    for tensor in branch.initializer:
        tensor.name = mapping[tensor.name]
    for node in branch.node:
        node.name = prefix + node.name if node.name else ""
        node.output[:] = [mapping.get(o, o) for o in node.output]
    _rename_reads(branch, mapping)


def _rename_reads(graph: onnx.GraphProto, mapping: dict) -> None:
    """`mapping` applied to what `graph` reads and outputs, and to what its nested bodies read of it (not to a
    name a body defines again for itself)."""
    for node in graph.node:
        node.input[:] = [mapping.get(x, x) for x in node.input]
        for body in _subgraphs(node):
            shadowed = set(_definitions(body)) & mapping.keys()
            _rename_reads(body, {k: v for k, v in mapping.items() if k not in shadowed} if shadowed else mapping)
    for output in graph.output:
        output.name = mapping.get(output.name, output.name)


def _selector(node: onnx.NodeProto, base: str, sources: dict, prefixes: list, names: set) -> onnx.NodeProto:
    """The If that takes `node`'s place: each branch passes its flattened outputs on (no shapes declared:
    the rewrite changes them)."""
    branches = {}
    for (key, outputs), prefix in zip(sources.items(), prefixes):
        passed = [_unique(f"{prefix}{output.name}/selected", names) for output in outputs]
        declared = []
        for output, name in zip(outputs, passed):
            info = onnx.ValueInfoProto()
            info.CopyFrom(output)
            info.name = name
            if info.type.HasField("tensor_type"):
                info.type.tensor_type.ClearField("shape")
            declared.append(info)
        branches[key] = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", [o.name], [p], name=p) for o, p in zip(outputs, passed)],
            f"{base}/{key}", [], declared)
    return onnx.helper.make_node("If", list(node.input), list(node.output), name=base, **branches)


def _fold_graph(graph: onnx.GraphProto, entries: dict) -> None:
    found = {n.name for n in graph.node if n.op_type == "If" and n.name in entries}
    # the outermost here: a selector flattened out of another's branch folds back into it first
    selectors = {s for s in found if not any(s.startswith(entries[t].prefixes) for t in found - {s})}
    if not selectors:
        return
    owners = [(prefix, name, k) for name in selectors for k, prefix in enumerate(entries[name].prefixes)]
    top, inside = [], {(name, k): [] for _, name, k in owners}
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        owner = next(((name, k) for prefix, name, k in owners
                      if any(o.startswith(prefix) for o in node.output if o)), None)
        (inside[owner] if owner is not None else top).append(copy)
    for node in top:
        if node.op_type != "If" or node.name not in selectors:
            continue
        for k, branch in enumerate(branches(node)):
            passing = list(branch.node)
            del branch.node[:]
            branch.node.extend(inside[(node.name, k)] + passing)
            _fold_graph(branch, entries)
    del graph.node[:]
    graph.node.extend(top)


def _restore_names(graph: onnx.GraphProto, entries: dict, visible: set, enclosing: str = "") -> None:
    """Top down, after `_fold_graph`: each folded branch takes back the initializers that carry its prefix
    and passes its own outputs on without the selector's Identity; the names it defines (not those of the Ifs
    flattened inside it, whose turn comes next) lose the prefix where that clashes with no name it can see."""
    visible = visible | set(_level_names(graph))
    for selector in [n for n in graph.node if n.op_type == "If" and n.name in entries]:
        for branch, prefix in zip(branches(selector), entries[selector.name].prefixes):
            own = [k for k, t in enumerate(graph.initializer) if t.name.startswith(prefix)]
            for k in own:
                branch.initializer.add().CopyFrom(graph.initializer[k])
            for k in reversed(own):  # by index: a big model's other tensors are never compared or copied
                del graph.initializer[k]
            _drop_passing(branch)
            deeper = tuple(p for e in entries.values() for p in e.prefixes if p != prefix and p.startswith(prefix))

            def ours(name):
                return name.startswith(prefix) and not (deeper and name.startswith(deeper))
            mapping = {name: name[len(prefix):] for name in _level_names(branch)
                       if ours(name) and name[len(prefix):] not in visible}
            for tensor in branch.initializer:
                tensor.name = mapping.get(tensor.name, tensor.name)
            for node in branch.node:
                node.output[:] = [mapping.get(o, o) for o in node.output]
                if ours(node.name) and node.name not in entries:
                    node.name = node.name[len(prefix):]
            _rename_reads(branch, mapping)
            _restore_names(branch, entries, visible, prefix)
        if enclosing and selector.name.startswith(enclosing):
            selector.name = selector.name[len(enclosing):]


def _level_names(graph: onnx.GraphProto):
    yield from (i.name for i in graph.input)
    yield from (t.name for t in graph.initializer)
    yield from (o for n in graph.node for o in n.output if o)


def _drop_passing(branch: onnx.GraphProto) -> None:
    """The selector's Identity nodes (those giving the branch outputs) whose input the branch itself computes:
    the branch outputs that input instead."""
    made = {o for n in branch.node for o in n.output}
    outputs = {o.name for o in branch.output}
    passing = {n.output[0]: n.input[0] for n in branch.node
               if n.op_type == "Identity" and n.output[0] in outputs and n.input[0] in made}
    if not passing:
        return
    kept = [n for n in branch.node if not (n.op_type == "Identity" and n.output[0] in passing)]
    del branch.node[:]
    branch.node.extend(kept)
    for output in branch.output:
        output.name = passing.get(output.name, output.name)


__all__ = ["lifted", "body_layers", "has_bodies", "inlined", "flattened", "folded", "Flattened"]
