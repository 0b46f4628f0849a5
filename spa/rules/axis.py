"""Ops that act along some axes (pooling, Resize, Pad, Softmax, Reduce, TopK, ReverseSequence,
ScatterElements / GatherElements): identity on the channel axis when it is not the op's own axis."""
from __future__ import annotations

import numpy as np

from . import Frozen, Link, Rule, identity, register
from .shapes import own_sizes, rewrite_shape_vector, shape_vector_pieces


class AxisOp(Rule):
    """Ops that are per-channel identities unless they act on the channel axis."""

    boundary = "acts across the channel axis"

    def acted_axes(self, c, tensor) -> set:
        raise NotImplementedError

    def out_axis(self, c, axis):
        return axis

    def propagate(self, c, tensor, axis):
        x = c.inp(0)
        ins, outs = c.slots(tensor)
        if ins and ins[0] != 0:
            return []
        in_axis = axis if ins else self.in_axis(c, axis)
        if in_axis in self.acted_axes(c, x):
            raise Frozen(f"{c.node.op_type} {self.boundary} (axis {in_axis} of '{x}')")
        size = c.dim(tensor, axis)
        links = []
        if tensor != x:
            links.append(identity((tensor, axis), (x, in_axis), size))
        for o in c.node.output:
            if o and o != tensor and c.rank(o) is not None:
                links.append(identity((tensor, axis), (o, self.out_axis(c, in_axis)), size))
        return links

    def in_axis(self, c, out_axis):
        return out_axis


@register
class Spatial(AxisOp):
    """Pooling and friends on [N, C, spatial...]: they act on axes 2+."""

    ops = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
           "GlobalLpPool")

    def acted_axes(self, c, tensor):
        return set(range(2, c.rank(tensor))) | {0}


@register
class Resize(AxisOp):
    ops = ("Resize", "Upsample")
    boundary = "rescales the channel axis"

    def acted_axes(self, c, tensor):
        r = c.rank(tensor)
        acted = set()
        for value in self._factors(c):
            acted |= {k for k in range(r) if value[k] != 1}
        return acted

    def _factors(self, c):
        if c.node.op_type == "Upsample" and c.attr("scales") is not None:
            return [c.attr("scales")]
        x = c.inp(0)
        factors = []
        slots = (1,) if c.node.op_type == "Upsample" or c.g.opset() < 11 else (2, 3)
        for k in slots:
            name = c.inp(k)
            if not name:
                continue
            value = c.const(name)
            if value is None and k == 3:
                factors.append(self._computed_sizes(c, x))
                continue
            if value is None:
                raise Frozen(f"{c.node.op_type} scales/sizes '{name}' are computed")
            if value.size == 0:
                continue
            if k == 3:  # sizes: a factor of 1 where the size equals the input size
                dims = [c.dim(x, i) for i in range(len(value))]
                value = [1 if d == v else 0 for d, v in zip(dims, value)]
            factors.append(list(np.asarray(value).ravel()))
        if c.attr("axes") is not None:
            raise Frozen("Resize with an axes attribute")
        return factors

    @staticmethod
    def _computed_sizes(c, x) -> list:
        """Factors of sizes computed at run time: 1 where an element is the input's own size (read
        off Shape(x)) or a constant equal to it, 0 (rescaled) elsewhere."""
        rank = c.rank(x)
        if rank is None or c.g.dim(c.inp(3), 0) != rank:
            raise Frozen(f"{c.node.op_type} scales/sizes '{c.inp(3)}' are computed")
        own, pieces = own_sizes(c, 3, x), shape_vector_pieces(c, 3) or {}
        constant = {p: np.asarray(c.g.static_value(node.input[k])).reshape(-1)[j] for p, (node, k, j) in pieces.items()}
        return [1 if p in own or (p in constant and constant[p] == c.dim(x, p)) else 0 for p in range(rank)]

    def rewrite(self, c, plan):
        if c.node.op_type == "Resize" and c.g.opset() >= 11 and len(c.node.input) > 3 and c.inp(3) \
                and c.const(c.inp(3)) is None:
            rewrite_shape_vector(c, plan, 3, c.out(0))  # constant pieces; Shape(x) pieces follow x
            return
        sizes = c.const(c.inp(3)) if c.node.op_type == "Resize" and c.g.opset() >= 11 else None
        if sizes is None or sizes.size == 0:
            return
        sizes = np.array(sizes, dtype=np.int64).copy()
        changed = [a for a in range(len(sizes)) if plan.changed(c.out(0), a)]
        for a in changed:
            sizes[a] = plan.new_dim(c.out(0), a)
        if changed:
            plan.set_input(c.node, 3, sizes)


@register
class Pad(AxisOp):
    """Identity on unpadded axes. Constant padding of the channel axis (BlazeFace's channel-pad
    shortcut, NCHW or NHWC) is an offset map: input channel c is output channel c + begin; the
    padded channels are constants of their own (removable when their consumers allow), and
    negative pads crop. pads (input or attribute) are rewritten to the kept counts."""

    ops = ("Pad",)
    boundary = "pads the channel axis"

    def _pads(self, c):
        """{axis: (begin, end)} of the input's axes."""
        if c.g.opset() >= 11:
            pads = c.const_ints(1)
        else:
            pads = c.attr("pads", c.attr("paddings"))
        if pads is None:
            raise Frozen("Pad without pads")
        r = c.rank(c.inp(0))
        axes = c.const_ints(3) if c.g.opset() >= 18 and c.inp(3) else list(range(r))
        n = len(axes)
        if len(pads) != 2 * n:
            raise Frozen(f"Pad with {len(pads)} pads for {n} axes")
        return {a % r: (int(pads[i]), int(pads[i + n])) for i, a in enumerate(axes)}

    def acted_axes(self, c, tensor):
        return {a for a, (b, e) in self._pads(c).items() if b or e}

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if tensor not in (x, y):
            return []  # pads, constant value, axes
        other = y if tensor == x else x
        begin, end = self._pads(c).get(axis, (0, 0))
        if not begin and not end:
            return [identity((tensor, axis), (other, axis), c.dim(tensor, axis))]
        mode = c.attr("mode", "constant")
        if mode != "constant":
            raise Frozen(f"{mode} Pad of the channel axis fills it from other channels")
        n_in = c.dim(x, axis)
        if n_in is None:
            raise Frozen("Pad of a channel axis of unknown size")
        src = np.arange(max(0, -begin), max(max(0, -begin), n_in - max(0, -end)))
        if tensor == x:
            return [Link((x, axis), (y, axis), src, src + begin)]
        return [Link((y, axis), (x, axis), src + begin, src)]

    def rewrite(self, c, plan):
        x, y = c.inp(0), c.out(0)
        pads = self._pads(c)
        new = {}
        for a, (begin, end) in pads.items():
            if (begin or end) and (plan.changed(x, a) or plan.changed(y, a)):
                kept_in, kept_out = plan.kept(x, a), plan.kept(y, a)
                n_in, n_out = c.g.dim(x, a), c.g.dim(y, a)
                new[a] = (int(np.sum(kept_out < begin)) if begin >= 0 else -int(np.sum(kept_in < -begin)),
                          int(np.sum(kept_out >= n_out - end)) if end >= 0 else -int(np.sum(kept_in >= n_in + end)))
        if not new:
            return
        axes = list(pads)
        values = [new.get(a, pads[a])[0] for a in axes] + [new.get(a, pads[a])[1] for a in axes]
        if c.g.opset() >= 11:
            plan.set_input(c.node, 1, np.array(values, dtype=np.int64))
        else:
            plan.set_attr(c.node, "pads" if c.attr("pads") is not None else "paddings", values)


@register
class Softmax(AxisOp):
    ops = ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "LRN",
           "MeanVarianceNormalization")
    boundary = "normalises across the channel axis"

    def acted_axes(self, c, tensor):
        r = c.rank(tensor)
        op = c.node.op_type
        if op == "LRN":
            return {1}
        if op == "MeanVarianceNormalization":
            return {a % r for a in c.attr("axes", [0, 2, 3])}
        default = -1 if (op == "LpNormalization" or c.g.opset() >= 13) else 1
        axis = c.attr("axis", default) % r
        if op != "LpNormalization" and c.g.opset() < 13:
            return set(range(axis, r))  # old semantics: coerced to 2-D at `axis`
        return {axis}


@register
class Reduce(AxisOp):
    ops = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
           "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")
    boundary = "reduces over the channel axis"

    def _axes(self, c, r):
        op = c.node.op_type
        if op in ("ArgMax", "ArgMin"):
            return [c.attr("axis", 0) % r]
        from_input = (op == "ReduceSum" and c.g.opset() >= 13) or c.g.opset() >= 18
        axes = c.const_ints(1) if from_input else c.attr("axes")
        if not axes:
            return [] if c.attr("noop_with_empty_axes", 0) else list(range(r))
        return sorted(a % r for a in axes)

    def acted_axes(self, c, tensor):
        return set(self._axes(c, c.rank(tensor)))

    def propagate(self, c, tensor, axis):
        ins, _ = c.slots(tensor)
        statistic = c.node.op_type in ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2")
        if (c.options.approximate and statistic and ins and ins[0] == 0 and self._keep(c)
                and axis in self.acted_axes(c, tensor)):
            # a norm's statistic (decomposed RMSNorm/LayerNorm): its size-1 output broadcasts back
            c.options.approximate_nodes.add(c.g.node_name(c.index))
            idx = np.arange(c.dim(tensor, axis))
            return [Link((tensor, axis), (tensor, axis), idx, idx, unit="approximate")]
        return super().propagate(c, tensor, axis)

    def _keep(self, c):
        return c.attr("keepdims", 1)

    def out_axis(self, c, axis):
        if self._keep(c):
            return axis
        return axis - sum(1 for a in self._axes(c, c.rank(c.inp(0))) if a < axis)

    def in_axis(self, c, out_axis):
        if self._keep(c):
            return out_axis
        reduced = self._axes(c, c.rank(c.inp(0)))
        kept = [a for a in range(c.rank(c.inp(0))) if a not in reduced]
        return kept[out_axis]


@register
class TopK(AxisOp):
    ops = ("TopK",)
    boundary = "selects along the channel axis"

    def acted_axes(self, c, tensor):
        return {c.attr("axis", -1) % c.rank(tensor)}


@register
class ReverseSequence(AxisOp):
    """ReverseSequence (input, sequence_lens): each batch entry's first sequence_lens steps reversed
    along time_axis (a bidirectional recurrence written out, as TensorFlow exports it); any other axis
    passes through."""

    ops = ("ReverseSequence",)
    boundary = "reverses along the channel axis"

    def acted_axes(self, c, tensor):
        return {c.attr("time_axis", 0), c.attr("batch_axis", 1)}


@register
class ElementsByIndex(Rule):
    """ScatterElements (data, indices, updates; any reduction) and GatherElements (data, indices):
    along `axis` they move elements by index; on any other axis every tensor of theirs holds the same
    position, so a channel there goes through all of them alike (a graph network's scatter-add of
    edge messages into node features; the indices, an Expand of one index per edge, are sliced with
    it). Where their sizes on that axis differ, frozen."""

    ops = ("ScatterElements", "GatherElements")

    def propagate(self, c, tensor, axis):
        if axis == c.attr("axis", 0) % c.rank(tensor):
            raise Frozen(f"{c.node.op_type} moves elements along the channel axis (axis {axis} of '{tensor}')")
        members = [t for t in [*c.node.input, c.out(0)] if t and t != tensor]
        size = c.dim(tensor, axis)
        if any(c.dim(t, axis) != size for t in members):
            raise Frozen(f"{c.node.op_type}: its tensors differ in size on axis {axis}")
        return [identity((tensor, axis), (t, axis), size) for t in members]
