"""Computed tensors read by several unrelated consumers (issue 12, the computed case).

An exporter computes a mask once and every layer reads it: the dynamo export of
nn.TransformerEncoder expands a [B, 1, 1, S] padding mask to [B, H, S, S] and adds that one
tensor to the scores of every layer. Its head axis exists only by broadcasting, yet as one tensor
it links the heads of every layer into one group. Constants have the same problem and their fix
(Graph._unshare_constants); this is the fix for computed tensors: after a first analysis, a
tensor whose small producing cone reads no weight, and whose readers fall apart into separately
coupled sets once its channel-carrying producers are set aside, gets one copy of those producers
per set of readers (nodes with fresh output names, inserted in the Graph's working copy of the
model, after their originals). The analysis then runs again. The copies read the same shape
vectors; the rewrite gives a copy its own shape-vector nodes where it edits them (copy on write,
spa.rewrite.Editor).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from .graph import CONTROL_FLOW, NOT_STATIC_OPS

CONE_LIMIT = 32  # nodes in a producing cone that may be copied
FLOAT_WEIGHT_TYPES = (np.float16, np.float32, np.float64)


def split_shared_tensors(prop) -> bool:
    """Copy the channel-carrying producers of shared channel-free tensors (see the module doc) in
    prop's graph; True when the graph changed (the analysis must run again)."""
    g = prop.g
    axes_of = defaultdict(list)
    for tensor, axis in prop.members:
        axes_of[tensor].append(axis)
    candidates = []
    for tensor in axes_of:
        if tensor in g.consts or tensor in g.graph_inputs or tensor in g.graph_outputs or tensor not in g.producer:
            continue
        uses = g.consumers.get(tensor, [])
        users = sorted({i for i, _ in uses})
        if len(users) < 2 or any(slot >= len(g.nodes[i].input) for i, slot in uses):  # read in a subgraph
            continue
        copied = _channel_producers(g, tensor, axes_of)
        if copied is not None:
            candidates.append((tensor, users, copied))
    if not candidates:
        return False
    set_aside = {o for _, _, copied in candidates for i in copied for o in g.nodes[i].output if o}
    component = _components_without(prop, set_aside)
    plans, taken = [], set()
    for tensor, users, copied in candidates:
        if taken.intersection(copied):  # nested in a cone already copied: one round only
            continue
        classes = _reader_classes(g, tensor, users, component, set_aside)
        if len(classes) < 2:
            continue  # the readers are coupled anyway: nothing to gain
        taken.update(copied)
        plans.append((tensor, classes, copied))
    if not plans:
        return False
    _duplicate(g, plans)
    return True


def _channel_producers(g, tensor, axes_of):
    """Indices of the nodes of `tensor`'s producing cone that carry channels (their outputs are
    analysis members), or None when the cone is not small, reads a float weight of rank >= 2, a
    constant or graph input that carries channels, or holds a node that cannot be copied."""
    cone, stack = set(), [g.producer[tensor]]
    while stack:
        i = stack.pop()
        if i in cone:
            continue
        cone.add(i)
        if len(cone) > CONE_LIMIT:
            return None
        node = g.nodes[i]
        if node.domain not in ("", "ai.onnx") or node.op_type in CONTROL_FLOW | NOT_STATIC_OPS \
                or node.op_type == "Constant":
            return None
        for name in node.input:
            if not name:
                continue
            if name in g.consts:
                if name in axes_of:
                    return None
                dtype = g.consts.dtype(name)
                if np.dtype(dtype).type in FLOAT_WEIGHT_TYPES and len(g.consts.shape(name)) >= 2 \
                        and g.consts.fill(name) is None:  # a weight (a uniformly filled one is none)
                    return None
            elif name in g.graph_inputs:
                if name in axes_of:
                    return None
            elif name in g.producer:
                stack.append(g.producer[name])
            else:
                return None
    return sorted(i for i in cone if any(o in axes_of for o in g.nodes[i].output if o))


def _components_without(prop, set_aside):
    """Component of each member pair once the pairs on `set_aside` tensors are dropped."""
    from .groups import connected_components

    pairs = [p for p in prop.members if p[0] not in set_aside]
    index = {p: k for k, p in enumerate(pairs)}
    edges = [(index[a], index[b]) for a, b in prop.pair_edges if a in index and b in index]
    a = np.array([e[0] for e in edges], dtype=np.int64)
    b = np.array([e[1] for e in edges], dtype=np.int64)
    labels = connected_components(len(pairs), a, b)
    return {p: int(labels[k]) for p, k in index.items()}


def _reader_classes(g, tensor, users, component, set_aside):
    """The readers of `tensor` in sets coupled without it (readers that carry no channel go with the
    first set): a list of lists of node indices, in node order."""
    by_tensor = defaultdict(list)
    for pair, comp in component.items():
        by_tensor[pair[0]].append(comp)
    comps = {}
    for u in users:
        node = g.nodes[u]
        comps[u] = {c for name in list(node.input) + list(node.output)
                    if name and name != tensor and name not in set_aside for c in by_tensor.get(name, ())}
    classes = []  # [set of components, [users]]
    for u in users:
        if not comps[u]:
            continue
        merged = [cl for cl in classes if cl[0] & comps[u]]
        new = [set(comps[u]), [u]]
        for cl in merged:
            new[0] |= cl[0]
            new[1] += cl[1]
            classes.remove(cl)
        classes.append(new)
    classes = sorted((sorted(cl[1]) for cl in classes), key=lambda us: us[0])
    if classes:
        classes[0] = sorted(classes[0] + [u for u in users if not comps[u]])
    return classes


def _duplicate(g, plans):
    """For every class of readers but the first: copies of the channel-carrying producers, right
    after their originals, the class's readers pointed at the copy of the shared tensor."""
    old = g.model
    model = onnx.ModelProto()
    model.CopyFrom(old)  # the Graph may hold the caller's model: never edit it
    # view nodes that are the model's own protos (not a copy reading constants' aliases) become
    # the new model's
    own_view = [g.nodes[i] is old.graph.node[i] for i in range(len(g.nodes))]
    g.nodes = [model.graph.node[i] if own_view[i] else g.nodes[i] for i in range(len(g.nodes))]
    taken = set(g.producer) | set(g.consts.keys()) | g.graph_inputs | set(g.aliases) | set(g.shapes)
    taken |= {i for n in g.nodes for i in n.input} | {n.name for n in g.nodes}

    def fresh(base):
        name, k = f"{base}__spa_copy", 0
        while name in taken:
            k += 1
            name = f"{base}__spa_copy{k}"
        taken.add(name)
        return name

    after = defaultdict(list)  # original index -> [(view copy or None, model copy)]
    new_aliases = []  # (model copy, slot, alias it replaces)
    renamed = {}  # copy name -> original name
    for tensor, classes, copied in plans:
        for readers in classes[1:]:
            names = {}
            for i in copied:
                own = onnx.NodeProto()
                own.CopyFrom(model.graph.node[i])
                own.name = fresh(g.nodes[i].name or g.nodes[i].op_type)
                for k, out in enumerate(g.nodes[i].output):
                    if out:
                        names[out] = own.output[k] = fresh(out)
                        renamed[names[out]] = out
                view_inputs = list(g.nodes[i].input)
                for k, name in enumerate(view_inputs):
                    if name in names:
                        own.input[k] = names[name]
                    elif name in g.aliases:  # a constant's alias: the copy gets its own
                        new_aliases.append((own, k, name))
                after[i].append(own)
            for u in readers:
                for node in {id(n): n for n in (g.nodes[u], model.graph.node[u])}.values():
                    for k, name in enumerate(node.input):
                        if name == tensor:
                            node.input[k] = names[tensor]
    order = []  # (original index or None, model node)
    for i in range(len(g.nodes)):
        order.append((i, model.graph.node[i]))
        order.extend((None, own) for own in after.get(i, ()))
    views = [g.nodes[i] if i is not None and not own_view[i] else None for i, _ in order]
    old_index = {i: k for k, (i, _) in enumerate(order) if i is not None}
    position = {id(own): k for k, (_, own) in enumerate(order)}
    alias_edits = [(position[id(own)], slot, name) for own, slot, name in new_aliases]
    owns = [own for _, own in order]
    del model.graph.node[:]
    model.graph.node.extend(owns)
    g.model = model
    g.nodes = [views[k] if views[k] is not None else model.graph.node[k] for k in range(len(owns))]
    g.aliases = {a: (old_index[i], slot, name, root) for a, (i, slot, name, root) in g.aliases.items()}
    for k, slot, old_alias in alias_edits:
        _, _, model_name, alias_root = g.aliases[old_alias]
        root, dtype = g.consts._aliases[old_alias]
        alias = fresh(f"{alias_root}__spa")
        view = onnx.NodeProto()
        view.CopyFrom(g.nodes[k])
        view.input[slot] = alias
        if g.nodes[k] is model.graph.node[k]:
            g.nodes[k] = view
        else:
            g.nodes[k].input[slot] = alias
        g.consts.alias(alias, root, dtype)
        g.aliases[alias] = (k, slot, model_name, alias_root)
        if old_alias in g.shapes:
            g.shapes[alias] = g.shapes[old_alias]
    for copy, original in renamed.items():
        if original in g.shapes:
            g.shapes[copy] = g.shapes[original]
    probed = g.__dict__.get("_probed")
    if probed:
        probed.update({c: probed[o] for c, o in renamed.items() if o in probed})
    g.__dict__.pop("_static", None)
    g.index_nodes()  # the view nodes read the constants' aliases
