"""Rewrite the model: slice every weight, fix attributes and shape constants, re-infer shapes."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .control_flow import folded, stepped_values
from .external_data import Spill, is_streamed, raw_bytes
from .graph import Graph
from .plan import Plan
from .rules import Ctx, rule_for


class Editor:
    """Edits a copy of the model on behalf of the rules (they only see the original graph)."""

    def __init__(self, plan: Plan, model: onnx.ModelProto):
        self.plan = plan
        self.model = model
        self.g = plan.analysis.graph
        self._index = {id(n): i for i, n in enumerate(self.g.nodes)}
        self._names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
        self.new_initializers = []
        # copy on write: a rule edits the shape-vector nodes upstream of its node (a Concat piece, a
        # head-count Mul); where other nodes read them too, its node gets its own copies of them
        self.writer = None  # index of the node whose rule is rewriting
        self._clones = {}  # (writer, original index) -> the writer's copy of the node
        self._fresh = {}  # name -> value of the constants set_input made

    # -- what rules call ------------------------------------------------------------------------
    def removed(self, tensor, axis):
        return self.plan.removed(tensor, axis)

    def changed(self, tensor, axis):
        return self.plan.changed(tensor, axis)

    def kept(self, tensor, axis):
        return self.plan.kept(tensor, axis)

    def new_dim(self, tensor, axis):
        return self.plan.new_dim(tensor, axis)

    def node(self, original):
        return self.model.graph.node[self._index[id(original)]]

    def set_attr(self, original, name, value):
        node = self._writable(original)
        self.del_attr(original, name)
        node.attribute.append(helper.make_attribute(name, value))

    def del_attr(self, original, name):
        node = self._writable(original)
        keep = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(keep)

    def set_input(self, original, slot, value: np.ndarray):
        """Point input `slot` at a fresh constant (never mutating a shared one)."""
        node = self._writable(original)
        base = f"{node.name or node.op_type}_in{slot}_spa"
        name = self._fresh_name(base)
        self.new_initializers.append(numpy_helper.from_array(np.asarray(value), name))
        self._fresh[name] = np.asarray(value)
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name

    def _fresh_name(self, base):
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}{k}"
        self._names.add(name)
        return name

    # -- copy on write ----------------------------------------------------------------------------
    def _writable(self, original):
        """The node to edit for `original`: the model's own, or, when `original` lies upstream of
        the rewriting node on a path that other nodes read too, the rewriting node's copy."""
        t, w = self._index[id(original)], self.writer
        if w is None or t == w:
            return self.model.graph.node[t]
        if (w, t) in self._clones:
            return self._clones[(w, t)]
        path = self._path(w, t)
        if path is None:
            return self.model.graph.node[t]
        down, shared = w, False
        for up, slot in path:
            tensor = self.g.nodes[down].input[slot]
            if len({i for i, _ in self.g.consumers.get(tensor, [])}) > 1 or tensor in self.g.graph_outputs \
                    or (w, up) in self._clones:
                shared = True
                break
            down = up
        if not shared:
            return self.model.graph.node[t]
        # the whole path below the writer is copied: only the writer (and its copies) read them
        down = self.model.graph.node[w]
        for up, slot in path:
            clone = self._clones.get((w, up))
            read = self.g.nodes[up].output
            name = down.input[slot]
            if clone is None:
                clone = onnx.NodeProto()
                clone.CopyFrom(self.model.graph.node[up])
                clone.name = self._fresh_name(f"{clone.name or clone.op_type}_spa_own")
                for k, out in enumerate(read):
                    if out:
                        clone.output[k] = self._fresh_name(f"{out}_spa_own")
                self._clones[(w, up)] = clone
            if name in read:
                down.input[slot] = clone.output[list(read).index(name)]
            down = clone
        return down

    def _path(self, w, t, depth=12):
        """[(node index, slot of the node below it that reads it), ...] from the node just above
        `w` up to `t`, through producers; None when `t` is not found within `depth` nodes."""
        frontier, seen = [(w, [])], {w}
        for _ in range(depth):
            nxt = []
            for i, path in frontier:
                for slot, name in enumerate(self.g.nodes[i].input):
                    up = self.g.producer.get(name) if name else None
                    if up is None or up in seen:
                        continue
                    seen.add(up)
                    step = path + [(up, slot)]
                    if up == t:
                        return step
                    nxt.append((up, step))
            frontier = nxt
        return None

    def place_copies(self):
        """Put each rewriting node's copies right before it; copies equal to an earlier one (same
        op, attributes and inputs, the new constants compared by value) are dropped for it."""
        if not self._clones:
            return
        graph = self.model.graph
        by_writer = {}
        for (w, up), clone in self._clones.items():
            by_writer.setdefault(w, []).append((up, clone))
        rename, seen, before = {}, {}, {}
        for w in sorted(by_writer):
            kept = []
            for _, clone in sorted(by_writer[w], key=lambda item: item[0]):
                for k, name in enumerate(clone.input):
                    clone.input[k] = rename.get(name, name)
                key = (clone.op_type, clone.domain, tuple(a.SerializeToString() for a in clone.attribute),
                       tuple(("v", v.dtype.str, v.shape, v.tobytes()) if (v := self._fresh.get(x)) is not None
                             else ("n", x) for x in clone.input))
                if key in seen:
                    rename.update((o, c) for o, c in zip(clone.output, seen[key].output) if o)
                    continue
                seen[key] = clone
                kept.append(clone)
            before[w] = kept
        nodes = []
        for i, node in enumerate(graph.node):
            nodes.extend(before.get(i, ()))
            for k, name in enumerate(node.input):
                if name in rename:
                    node.input[k] = rename[name]
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)


def sliced(value: np.ndarray, plan: Plan, name: str) -> np.ndarray:
    for axis in range(value.ndim):
        if plan.changed(name, axis):
            value = np.take(value, plan.kept(name, axis), axis=axis)
    return value


def _add_tensor(graph, value: np.ndarray, name: str, spill: Spill | None = None):
    """Append a tensor built in place (one copy of the bytes, not three); with a spill (a
    streamed model) its bytes go to the spill file instead of the proto."""
    if spill is not None:
        return spill.add(graph, value, name)
    tensor = graph.initializer.add()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
    tensor.dims.extend(value.shape)
    tensor.raw_data = bytes(raw_bytes(value))


def rewrite(plan: Plan, weights: dict | None = None, fold: bool = True) -> onnx.ModelProto:
    """A new, smaller ModelProto with the plan's channels removed (not yet verified); where the analysis
    flattened If branches (spa.control_flow), folded back unless `fold` is False.

    weights: new values (original shapes and dtypes) for constants, e.g. weights compensated by
    OBSPA; they replace the model's values before slicing."""
    g: Graph = plan.analysis.graph
    weights = weights or {}
    sliced_names = {m.tensor for m in plan.analysis.members.values() if m.is_const and plan.changed(m.tensor, m.axis)}
    written = sliced_names | set(weights)
    model = _copy_without_initializers(g.model)
    graph = model.graph
    spill = Spill() if is_streamed(g.model) else None
    for init in g.model.graph.initializer:  # one weight at a time: never two copies of the model
        if init.name in written:
            _add_tensor(graph, sliced(weights.get(init.name, g.consts[init.name]), plan, init.name), init.name,
                        spill)
        else:
            graph.initializer.append(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in written:
            value = sliced(weights.get(node.output[0], g.consts[node.output[0]]), plan, node.output[0])
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))
    fills = _write_aliases(g, plan, weights, written, model, spill)
    editor = Editor(plan, model)
    changed = {m.tensor for m in plan.analysis.members.values() if plan.changed(m.tensor, m.axis)}
    for i, node in enumerate(g.nodes):
        rule, c = rule_for(node), Ctx(g, i, plan.analysis.options)
        if changed.intersection([*node.input, *node.output]) or changed.intersection(rule.reads(c)):
            editor.writer = i
            rule.rewrite(c, editor)
    editor.writer = None
    for name in weights:
        if g.consts.fill(name) is not None and name in g.producer:
            fill_to_constant(graph.node[g.producer[name]], sliced(weights[name], plan, name))
    editor.place_copies()  # after the last edit that finds nodes by index
    if fills:  # the aliases' own fills, first (they read initializers only): after the rules, which index nodes
        nodes = fills + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    graph.initializer.extend(editor.new_initializers)
    _drop_dead_nodes(model)
    _drop_unused_initializers(model)
    _update_initializer_inputs(model, plan, sliced_names)
    _list_new_initializers_as_inputs(model)
    del graph.value_info[:]
    if g.folding and fold:
        model = folded(model, g.folding)
    return model


def _write_aliases(g: Graph, plan: Plan, weights: dict, written: set, model: onnx.ModelProto, spill):
    """A consumer's own alias of a shared constant (Graph._unshare_constants) is written only when
    its slice or value changed; aliases of one constant that end up equal share one tensor."""
    names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    by_value, fills = {}, []
    for alias, (i, slot, _, root) in g.aliases.items():
        if alias not in written:
            continue  # the node still reads the shared original
        fill = g.consts.fill(alias) if alias not in weights else None
        if fill is not None:  # a filled constant's own copy: a ConstantOfShape of its new shape
            shape = [len(plan.kept(alias, a)) for a in range(len(g.consts.shape(alias)))]
            key = (root, fill.dtype.str, tuple(shape), "fill")
        else:
            value = np.ascontiguousarray(sliced(weights.get(alias, g.consts[alias]), plan, alias))
            key = (root, value.dtype.str, value.shape, hashlib.blake2b(value.tobytes(), digest_size=16).digest())
        if key not in by_value:
            name = alias
            while name in names or name + "_shape" in names:
                name += "_"
            names.update((name, name + "_shape"))
            if fill is not None:
                shape_tensor, node = filled(name, shape, fill)
                model.graph.initializer.append(shape_tensor)
                fills.append(node)
            else:
                _add_tensor(model.graph, value, name, spill)
            by_value[key] = name
        model.graph.node[i].input[slot] = by_value[key]
    return fills


def filled(name: str, shape, fill: np.ndarray) -> tuple[onnx.TensorProto, onnx.NodeProto]:
    """A ConstantOfShape node making `name`, `shape` filled with the 0-d `fill`, and the shape
    initializer it reads (`name`_shape)."""
    return (numpy_helper.from_array(np.array(shape, dtype=np.int64), name + "_shape"),
            helper.make_node("ConstantOfShape", [name + "_shape"], [name], name=name,
                             value=numpy_helper.from_array(fill.reshape(1))))


def fill_to_constant(node: onnx.NodeProto, value: np.ndarray):
    """A filled constant (ConstantOfShape) given new values, e.g. compensated by OBSPA, is no
    longer uniform: its node becomes a Constant holding them (the only case its values are
    written out)."""
    name = node.output[0]
    node.op_type, node.domain = "Constant", ""
    del node.input[:]
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.ascontiguousarray(value), name)))


def _copy_without_initializers(src: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    _copy_fields(src, model, skip="graph")
    _copy_fields(src.graph, model.graph, skip="initializer")
    return model


def _copy_fields(src, dst, skip):
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED:
            getattr(dst, field.name).extend(value)
        elif field.message_type:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _drop_dead_nodes(model):
    """Shape computations a rewrite replaced by constants are left without readers: drop them (not what a
    flattened Loop's first-iteration copy computes, which becomes its body)."""
    from .graph import outer_scope_inputs
    graph = model.graph
    kept = {name for values in stepped_values(model).values() for name in values}
    while True:
        used = {o.name for o in graph.output} | kept
        for n in graph.node:
            used.update(n.input)
            used |= outer_scope_inputs(n)
        dead = [k for k, n in enumerate(graph.node) if not any(o in used for o in n.output if o)]
        if not dead:
            return
        for k in reversed(dead):
            del graph.node[k]


def _drop_unused_initializers(model):
    used = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    from .graph import outer_scope_inputs
    for n in model.graph.node:
        used |= outer_scope_inputs(n)
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        names = {t.name for t in keep}
        graph_inputs = [i for i in model.graph.input if i.name in names or i.name in used]
        del model.graph.input[:]
        model.graph.input.extend(graph_inputs)


def _list_new_initializers_as_inputs(model):
    """IR < 4 requires every initializer among the graph inputs: constants the rewrite added too."""
    if model.ir_version >= 4:
        return
    listed = {vi.name for vi in model.graph.input}
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer if t.name not in listed)


def _update_initializer_inputs(model, plan, sliced_names):
    """Old exporters list initializers among graph inputs: their declared shapes must follow."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in sliced_names and vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, new in zip(dims, shapes[vi.name]):
                d.dim_value = new
