"""Shape-reading ops (Shape, Size) and the checks that freeze a channel count used as a number."""
from __future__ import annotations

import numpy as np

from ..graph import PARAMETER_SLOTS, attr
from ..runtime import FLOATS
from . import Ctx, Frozen, Rule, register
from .shapes import _whole_shape_source, pinned_read


@register
class ShapeOnly(Rule):
    """Ops that read only a tensor's shape: they follow the new size at run time."""

    ops = ("Shape", "Size")

    def propagate(self, c, tensor, axis):
        if c.node.op_type == "Size":
            positions = None
        else:
            start = c.attr("start", 0)
            start = start + c.rank(tensor) if start < 0 else start
            positions = {axis - start}
        if _used_as_number(c, c.out(0), positions):
            raise Frozen("the channel count is used as a number (e.g. an attention scale 1/sqrt(d))")
        other = _sizes_another_reshape(c, c.out(0), positions, tensor)
        if other is not None:
            # e.g. attention's merge view(B, T, E) with E read off the residual stream: the
            # reshaped tensor's width need not shrink with this axis, so no exact map exists
            raise Frozen(f"the channel count, read at run time, sizes Reshape '{other}' of another tensor")
        return []


PARAMETER_OPS = {**PARAMETER_SLOTS, "ConstantOfShape": (0,)}
def _sliced_positions(c: Ctx, node, vector, positions):
    """Where `positions` of a 1-D vector land after a constant Slice (None when unknown)."""
    length, bounds = c.g.dim(vector, 0), c.g.slice_bounds(node)
    if length is None or bounds is None or bounds[2] not in (None, [0], [-1]):
        return None
    starts, ends, _, steps = bounds
    kept = list(range(length))[slice(starts[0], ends[0], steps[0] if steps else 1)]
    return {k for k, p in enumerate(kept) if p in positions}


def _used_as_number(c: Ctx, tensor, positions, depth=0) -> bool:
    """Whether elements `positions` (None: all) of a shape vector reach floating-point data (a
    Cast to float): such values must not follow the pruned size."""
    return _reaches(c, tensor, positions, _float_use) is not None


def _float_use(node, slot):
    if node.op_type == "Cast" and attr(node, "to") in FLOATS:
        return True
    if node.op_type in PARAMETER_OPS and slot in PARAMETER_OPS[node.op_type]:
        return False  # a shape parameter follows the new sizes
    return None


def _sizes_another_reshape(c: Ctx, tensor, positions, source):
    """The name of a Reshape whose target shape takes elements `positions` of a shape vector
    read off `source`, when it reshapes another tensor than `source` (None if there is none)."""
    def use(node, slot):
        read = pinned_read(c, node, slot)
        if read is not None and read[0] in _same_shape_sources(c, source):
            return False  # the Reshapes take the size as a constant once pruned
        if node.op_type == "Reshape" and slot == 1:
            whole = _whole_shape_source(Ctx(c.g, c.g.producer[node.output[0]], c.options, c.virtual))
            sources = _same_shape_sources(c, source)  # whole: linked
            return whole not in sources and not any(_viewed_from(c, node.input[0], s) for s in sources)
        if node.op_type in PARAMETER_OPS and slot in PARAMETER_OPS[node.op_type]:
            return False
        return None
    hit = _reaches(c, tensor, positions, use)
    if hit is None or hit < 0:  # too deep to trace: the float check freezes that case
        return None
    return c.g.nodes[hit].name or c.g.nodes[hit].output[0]


VIEW_OPS = ("Unsqueeze", "Squeeze", "Transpose", "Expand", "Identity", "Cast", "Reshape", "Flatten",
            "DequantizeLinear", "QuantizeLinear")
SAME_SHAPE_OPS = ("Identity", "Cast", "DequantizeLinear", "QuantizeLinear")  # output shape == input shape


def _same_shape_sources(c: Ctx, source, depth=0) -> list:
    """`source` and the tensors it copies the shape of through SAME_SHAPE_OPS: a Shape read off a
    dequantized tensor sizes the quantized one as well (onnxruntime's QOperator channel shuffle)."""
    index = c.g.producer.get(source)
    if index is None or depth > 8 or c.g.nodes[index].op_type not in SAME_SHAPE_OPS:
        return [source]
    return [source] + _same_shape_sources(c, c.g.nodes[index].input[0], depth + 1)


def _viewed_from(c: Ctx, tensor, source, depth=0) -> bool:
    """Whether `tensor` is `source` itself or a view of it through layout ops (repeat_kv's
    Expand(Unsqueeze(k)) reshaped with k's head count)."""
    if tensor == source:
        return True
    index = c.g.producer.get(tensor)
    if index is None or depth > 8 or c.g.nodes[index].op_type not in VIEW_OPS:
        return False
    return _viewed_from(c, c.g.nodes[index].input[0], source, depth + 1)


def _reaches(c: Ctx, tensor, positions, use, depth=0):
    """The index of the first node where elements `positions` (None: all) of a shape vector meet
    a use for which use(node, slot) is True (False: a use that ends the walk), or None; -1 when
    the walk goes too deep (unknown counts as reached)."""
    if depth > 12:
        return -1
    for i, slot in c.g.consumers.get(tensor, []):
        node = c.g.nodes[i]
        out, picked = node.output[0] if node.output else None, None
        verdict = use(node, slot)
        if verdict:
            return i
        if verdict is False:
            continue
        if node.op_type in ("Cast", "Identity"):  # elementwise: the positions stay (tf2onnx casts)
            picked = positions
        if node.op_type == "Gather" and slot == 0 and positions is not None:
            idx = c.g.static_value(node.input[1])
            if idx is None:
                picked = None
            else:
                hits = [k for k, v in enumerate(np.atleast_1d(idx).tolist()) if v in positions]
                if not hits:
                    continue
                picked = set(hits) if np.ndim(idx) else None
        if node.op_type == "Slice" and slot == 0 and positions is not None:
            picked = _sliced_positions(c, node, tensor, positions)
            if picked == set():
                continue
        if out:
            hit = _reaches(c, out, picked, use, depth + 1)
            if hit is not None:
                return hit
    return None
