"""Intermediate tensors of a model over calibration batches, from onnxruntime.

- `fetch`: one pass of the model per batch returning the named tensors (a prefix model that
  computes only what they need);
- `StagedRun`: the graph cut into stages at chosen nodes (the layers OBS compensates), run one
  stage at a time over every batch. Between the part of a stage that computes its layers' inputs
  and the layers themselves the caller sees those inputs and may change the layers' weights; the
  changed weights are then used for everything downstream. All stages together cost one forward
  pass, where re-running the whole model for every stage would cost one pass per stage. Only the
  tensors a later stage still reads are kept, for every batch.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import constant_node_value, elem_types, outer_scope_inputs
from .progress import bar
from .runtime import session


def _needs(node) -> set:
    return {x for x in set(node.input) | outer_scope_inputs(node) if x}


def prefix(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of the model computing only `names` (its outputs): the nodes they depend on."""
    producer = {o: k for k, n in enumerate(model.graph.node) for o in n.output if o}
    needed, stack = set(), [producer[n] for n in names if n in producer]
    while stack:
        k = stack.pop()
        if k in needed:
            continue
        needed.add(k)
        stack.extend(producer[x] for x in _needs(model.graph.node[k]) if x in producer)
    return _submodel(model, [n for k, n in enumerate(model.graph.node) if k in needed],
                     list(model.graph.input), names)


def _submodel(model, nodes, inputs, outputs, initializers=None) -> onnx.ModelProto:
    part = onnx.ModelProto()
    part.ir_version = model.ir_version
    part.opset_import.extend(model.opset_import)
    part.functions.extend(model.functions)
    part.metadata_props.extend(model.metadata_props)  # a streamed model's base: where its weights are
    graph = part.graph
    graph.node.extend(nodes)
    used = set().union(*(_needs(n) for n in nodes)) if nodes else set()
    constants = initializers if initializers is not None else model.graph.initializer
    graph.initializer.extend(t for t in constants if t.name in used)
    unused = {t.name for t in constants} - used  # IR < 4 lists initializers as inputs: not ones left out
    graph.input.extend(i for i in inputs if i.name not in unused)
    graph.output.extend(helper.ValueInfoProto(name=n) for n in outputs)
    return part


def fetch(model: onnx.ModelProto, names, batches, desc: str | None = "running calibration batches"):
    """For each batch, {name: value} of the requested tensors (graph inputs included); a
    progress bar over the batches unless `desc` is None (the caller shows its own)."""
    names = list(dict.fromkeys(names))
    inputs = {i.name for i in model.graph.input}
    computed = [n for n in names if n not in inputs]
    model, steps = every_iteration(model, computed)
    fetched = [steps.get(n, n) for n in computed]
    sess = session(prefix(model, fetched), quiet=True, calibration_pass=True) if computed else None
    for feeds in (batches if desc is None else bar(batches, desc)):
        got = dict(zip(computed, sess.run(fetched, feeds))) if computed else {}
        for name in steps:  # [iterations, *the tensor's shape] -> the iterations as more rows
            got[name] = got[name].reshape(-1, *got[name].shape[2:]) if got[name].ndim > 1 else got[name]
        got.update({n: feeds[n] for n in names if n in inputs})
        yield got


def every_iteration(model: onnx.ModelProto, names) -> tuple[onnx.ModelProto, dict]:
    """(`model`, {}), or where some of `names` are tensors of a flattened Loop's first-iteration copy
    (spa.control_flow.flattened), a copy of `model` whose Loops also give those tensors of every iteration
    as scan outputs, and {name: that scan output}: a layer inside a Loop is calibrated on all iterations'
    inputs, not the first one's."""
    from .control_flow import loop_prefixes

    loops = loop_prefixes(model)
    wanted = {n: (loop, n[len(p):]) for n in names for loop, p in loops.items() if n.startswith(p)}
    if not wanted:
        return model, {}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = elem_types(out)
    steps = {}
    for node in out.graph.node:
        inner = [(n, name) for n, (loop, name) in wanted.items() if loop == node.name and node.op_type == "Loop"]
        body = node.attribute[0].g if inner else None
        for n, name in inner:
            steps[n] = f"{n}/every_iteration"
            body.node.append(helper.make_node("Identity", [name], [steps[n]]))
            body.output.append(helper.make_tensor_value_info(steps[n], types(n), None))
            node.output.append(steps[n])
    return out, steps


def constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose Constant nodes (tensor values) are initializers, so that stages share them
    instead of passing them along as per-batch values."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = []
    for node in copy.graph.node:
        value = constant_node_value(node) if node.op_type == "Constant" else None
        if value is None:
            keep.append(node)
        else:
            copy.graph.initializer.append(numpy_helper.from_array(np.asarray(value), node.output[0]))
    del copy.graph.node[:]
    copy.graph.node.extend(keep)
    return copy


class StagedRun:
    """Run `model` over `batches` stage by stage; a stage ends at the nodes in `cuts`.

    A tensor's depth is the number of cut nodes on its longest input path; stage s holds the nodes
    whose inputs have depth s at most and reach s: its cut nodes (the "layers" of stage s) and the
    other nodes ("pre"). Nothing in stage s reads a layer's output (that has depth s + 1), so
    for each stage: run pre, show the layers' inputs, take new weights, run the layers.
    """

    def __init__(self, model: onnx.ModelProto, cuts, batches, desc: str | None = "stages"):
        """cuts: output names of the cut nodes (first outputs); desc None: no progress bar (a run
        in step with another, whose bar shows)."""
        self.model = constants_as_initializers(model)
        self.batches = batches
        self.desc = desc
        nodes = list(self.model.graph.node)
        cuts = set(cuts)
        cut = {j for j, n in enumerate(nodes) if n.output and n.output[0] in cuts}
        self.initializers = {t.name: t for t in self.model.graph.initializer}
        # nodes that read no graph input (constant subgraphs, e.g. a weight times a mask) run
        # inside every stage that reads them, so they always see the current weights
        self.graph_inputs = {i.name for i in self.model.graph.input} - set(self.initializers)
        dynamic = set(self.graph_inputs)
        self.static_producer = {}
        for j, node in enumerate(nodes):
            if _needs(node) & dynamic:
                dynamic.update(o for o in node.output if o)
            else:
                self.static_producer.update({o: j for o in node.output if o})
        depth = {}
        self.stage = []
        for j, node in enumerate(nodes):
            d = max((depth.get(x, 0) for x in _needs(node)), default=0)
            self.stage.append(d if j not in self.static_producer.values() else -1)
            for out in node.output:
                depth[out] = d + (1 if j in cut else 0)
        self.cut = cut
        self.count = max(self.stage, default=-1) + 1
        self.graph_outputs = [o.name for o in self.model.graph.output]
        # the last stage that reads each tensor (graph outputs: past the end)
        self.last_use = {}
        for j, node in enumerate(nodes):
            for x in _needs(node):
                self.last_use[x] = max(self.last_use.get(x, -1), self.stage[j])
        for name in self.graph_outputs:
            self.last_use[name] = self.count
        self.nodes = nodes
        self.outputs = {}
        self.values = {name: [b[name] for b in batches] for name in self.graph_inputs if name in batches[0]}

    def _run(self, indices, weights, extra_outputs=()):
        if not indices:
            return
        stage = self.stage[indices[0]]
        nodes = [self.nodes[j] for j in self._with_static_inputs(indices)]
        produced = {o for n in nodes for o in n.output if o}
        reads = set().union(*(_needs(n) for n in nodes))
        inputs = sorted(x for x in reads - produced if x in self.values)
        outputs = [o for o in dict.fromkeys(o for n in nodes for o in n.output if o)
                   if (self.last_use.get(o, -1) > stage or o in extra_outputs) and o not in self.static_producer]
        initializers = [numpy_helper.from_array(np.asarray(weights[t]), t) if t in weights else self.initializers[t]
                        for t in reads if t in self.initializers]
        value_infos = [helper.make_tensor_value_info(
            x, helper.np_dtype_to_tensor_dtype(self.values[x][0].dtype), None) for x in inputs]
        sess = session(_submodel(self.model, nodes, value_infos, outputs, initializers), quiet=True,
                       calibration_pass=True)
        results = {o: [] for o in outputs}
        for b in range(len(self.batches)):
            for o, v in zip(outputs, sess.run(outputs, {x: self.values[x][b] for x in inputs})):
                results[o].append(v)
        self.values.update(results)

    def _with_static_inputs(self, indices) -> list:
        chosen, stack = set(indices), list(indices)
        while stack:
            for x in _needs(self.nodes[stack.pop()]):
                j = self.static_producer.get(x)
                if j is not None and j not in chosen:
                    chosen.add(j)
                    stack.append(j)
        return sorted(chosen)

    def _forget(self, s):
        for name in [n for n in self.values if self.last_use.get(n, -1) <= s]:
            del self.values[name]

    def stages(self, weights: dict, wanted: dict):
        """Yields (stage, output names of its cut nodes, {name: per-batch values}) with the
        tensors `wanted` ({cut node output: names}) lists for its cut nodes; between yields the
        caller may add entries to `weights` ({constant name: value}), which the cut nodes of that
        stage and everything downstream then use. Ends with the graph outputs per batch in
        `self.outputs`."""
        for s in range(self.count) if self.desc is None else bar(range(self.count), self.desc):
            cut = [j for j in range(len(self.nodes)) if self.stage[j] == s and j in self.cut]
            pre = [j for j in range(len(self.nodes)) if self.stage[j] == s and j not in self.cut]
            names = [self.nodes[j].output[0] for j in cut]
            requested = {x for n in names for x in wanted.get(n, ())}
            self._run(pre, weights, extra_outputs=requested | {x for j in cut for x in _needs(self.nodes[j])})
            if cut:
                yield s, names, {x: self.values[x] for x in requested}
                self._run(cut, weights)
            self._forget(s)
        self.outputs = {name: self.values[name] for name in self.graph_outputs if name in self.values}
