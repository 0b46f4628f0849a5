"""Concat, Split, Slice, Gather: offset and index maps along the joined / split / picked axis."""
from __future__ import annotations

import numpy as np

from . import Frozen, FreezeIndices, Link, Rule, attr, identity, register


@register
class Concat(Rule):
    ops = ("Concat",)

    def operands(self, c):
        return [t for t in c.node.input if t]

    def propagate(self, c, tensor, axis):
        y = c.out(0)
        cat = c.norm_axis(c.attr("axis"), y)
        inputs = self.operands(c)
        pair = (tensor, axis)
        # complete from either side: the output's other slices belong to the other inputs. Once
        # the output carries channels, its own visit (or the input's that marked it) did that, so
        # an input entering later only links its slice: linear, not quadratic, in the inputs
        complete = tensor == y or (y, axis) not in c.marked
        if axis != cat:
            return [identity(pair, (t, axis), c.dim(tensor, axis)) for t in (inputs if complete else []) + [y]
                    if t != tensor]
        offsets = self._offsets(c, inputs, cat)
        sizes = np.diff(offsets)
        links = [Link(pair, (y, cat), np.arange(sizes[i]), np.arange(offsets[i], offsets[i + 1]))
                 for i, t in enumerate(inputs) if t == tensor]
        return links + ([Link((y, cat), (t, cat), np.arange(offsets[i], offsets[i + 1]), np.arange(sizes[i]))
                         for i, t in enumerate(inputs) if t != tensor] if complete else [])

    def input_sizes(self, node, shape):
        """A decoder's cache unrolled (HF exports, onnxruntime-genai's float16 CPU decoders): a graph input
        concatenated with computed keys or values into a graph output (past -> Concat -> present). It is
        fed empty along the concatenation, its other sizes those of the computed part (heads, head size)."""
        if node.output[0] not in shape.outputs or len(node.input) != 2:
            return {}
        past, new = node.input
        sizes = shape(new)
        if past not in shape.inputs or new in shape.inputs or not sizes:
            return {}
        cat = attr(node, "axis") % len(sizes)
        return {past: {k: (0 if k == cat else d) for k, d in enumerate(sizes) if k and (k == cat or d)}}

    @staticmethod
    def _offsets(c, inputs, cat):
        cache = c.g.__dict__.setdefault("_concat_offsets", {})  # static sizes: once per node
        if c.index in cache:
            return cache[c.index]
        sizes = [c.dim(t, cat) for t in inputs]
        if None in sizes:
            raise Frozen("Concat input sizes unknown")
        offsets = np.cumsum([0] + sizes)
        if all(c.g.dim(t, cat) is not None for t in inputs):  # not a virtual size (may still change)
            cache[c.index] = offsets
        return offsets


@register
class Split(Rule):
    ops = ("Split",)

    def _axis(self, c):
        return c.norm_axis(c.attr("axis", 0), c.inp(0))

    def propagate(self, c, tensor, axis):
        x = c.inp(0)
        outs = [o for o in c.node.output]
        ins, _ = c.slots(tensor)
        if ins and ins[0] != 0:
            return []
        pair = (tensor, axis)
        if axis != self._axis(c):
            return [identity(pair, (t, axis), c.dim(tensor, axis)) for t in [x] + outs if t and t != tensor]
        sizes = [c.dim(o, axis) for o in outs]
        if None in sizes:
            raise Frozen("Split output sizes unknown")
        offsets = np.cumsum([0] + sizes)
        links = []
        if tensor != x:  # complete from either side: x's other slices belong to the other outputs
            i = outs.index(tensor)
            links.append(Link(pair, (x, axis), np.arange(sizes[i]), np.arange(offsets[i], offsets[i + 1])))
        return links + [Link((x, axis), (o, axis), np.arange(offsets[i], offsets[i + 1]), np.arange(sizes[i]))
                        for i, o in enumerate(outs) if o and o != tensor]

    def rewrite(self, c, plan):
        axis = self._axis(c)
        if not plan.changed(c.inp(0), axis):
            return
        sizes = [plan.new_dim(o, axis) for o in c.node.output]
        if c.g.opset() >= 13:
            plan.set_input(c.node, 1, np.array(sizes, dtype=np.int64))
            plan.del_attr(c.node, "num_outputs")
        else:
            plan.set_attr(c.node, "split", sizes)


@register
class Slice(Rule):
    ops = ("Slice",)

    def _axes(self, c):
        r = c.rank(c.inp(0))
        if c.g.opset() >= 10:
            count = c.g.dim(c.inp(1), 0)
            axes = c.const_ints(3) if c.inp(3) else (list(range(count)) if count else None)
        else:
            axes = c.attr("axes", list(range(len(c.attr("starts")))))
        if axes is None:
            raise Frozen("Slice axes unknown")
        return [a % r for a in axes]

    def _spec(self, c):
        if c.g.opset() >= 10:
            starts, ends = c.const_ints(1), c.const_ints(2)
            steps = c.const_ints(4) if c.inp(4) else [1] * len(starts)
        else:
            starts, ends = c.attr("starts"), c.attr("ends")
            steps = [1] * len(starts)
        return list(zip(self._axes(c), starts, ends, steps))

    def _range(self, c, axis):
        if axis not in self._axes(c):  # bounds on other axes may be computed: not our concern
            return None
        size = c.dim(c.inp(0), axis)
        for a, s, e, st in self._spec(c):
            if a == axis:
                if st != 1:
                    raise Frozen("Slice with a step on the channel axis")
                return slice(s, e).indices(size)[:2]
        return None

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if tensor not in (x, y):
            return []
        bounds = self._range(c, axis)
        if bounds is None:
            other = y if tensor == x else x
            return [identity((tensor, axis), (other, axis), c.dim(tensor, axis))]
        start, stop = bounds
        n = max(stop - start, 0)
        if tensor == x:
            return [Link((x, axis), (y, axis), np.arange(start, start + n), np.arange(n))]
        return [Link((y, axis), (x, axis), np.arange(n), np.arange(start, start + n))]

    def rewrite(self, c, plan):
        x = c.inp(0)
        if not any(plan.changed(x, a) for a in self._axes(c)):
            return  # only other axes shrank: the bounds stay as they are (even computed ones)
        spec = self._spec(c)
        new = []
        changed = False
        for a, s, e, st in spec:
            if plan.changed(x, a):
                start, stop = slice(s, e).indices(c.g.dim(x, a))[:2]
                kept = plan.kept(x, a)
                s, e = int(np.searchsorted(kept, start)), int(np.searchsorted(kept, stop))
                changed = True
            new.append((s, e))
        if not changed:
            return
        if c.g.opset() >= 10:  # starts, ends, axes and steps share one integer type (tf2onnx writes int32)
            index = np.int32 if np.asarray(c.const(c.inp(1))).dtype == np.int32 else np.int64
            plan.set_input(c.node, 1, np.array([s for s, _ in new], dtype=index))
            plan.set_input(c.node, 2, np.array([e for _, e in new], dtype=index))
        else:
            plan.set_attr(c.node, "starts", [s for s, _ in new])
            plan.set_attr(c.node, "ends", [e for _, e in new])


@register
class Gather(Rule):
    ops = ("Gather",)

    def propagate(self, c, tensor, axis):
        data, idx, y = c.inp(0), c.inp(1), c.out(0)
        gaxis = c.norm_axis(c.attr("axis", 0), data)
        q = c.rank(idx)
        if tensor == idx:
            raise Frozen("Gather indices carry channels")
        if tensor == data and axis != gaxis:
            return [identity((data, axis), (y, axis if axis < gaxis else axis + q - 1), c.dim(data, axis))]
        if tensor == y:
            if axis < gaxis or axis >= gaxis + q:
                return [identity((y, axis), (data, axis if axis < gaxis else axis - q + 1), c.dim(y, axis))]
            raise Frozen("Gather output axis comes from the indices")
        indices = c.const(idx)
        if indices is None:
            raise Frozen("Gather on the channel axis with computed indices")
        size = c.dim(data, axis)
        indices = np.asarray(indices).astype(np.int64) % size
        if indices.ndim == 0:
            return [FreezeIndices((data, axis), indices.reshape(1), "read by a scalar Gather")]
        if indices.ndim != 1:
            raise Frozen("Gather on the channel axis with multi-dimensional indices")
        return [Link((data, axis), (y, gaxis), indices, np.arange(len(indices)))]

    def rewrite(self, c, plan):
        data = c.inp(0)
        gaxis = c.norm_axis(c.attr("axis", 0), data)
        if not plan.changed(data, gaxis):
            return
        indices = np.asarray(c.const(c.inp(1))).astype(np.int64) % c.g.dim(data, gaxis)
        kept_in = plan.kept(data, gaxis)
        if indices.ndim == 1 and plan.changed(c.out(0), gaxis):
            indices = indices[plan.kept(c.out(0), gaxis)]
        plan.set_input(c.node, 1, np.searchsorted(kept_in, indices).astype(np.int64))
