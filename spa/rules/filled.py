"""Filled and constant tensors: ConstantOfShape (sizes rewritten), Constant (sliced by the rewriter)."""
from __future__ import annotations

from . import Frozen, Rule, register
from .shapes import constant_size_at, rewrite_shape_vector, size_follows


@register
class ConstantOfShape(Rule):
    """A filled tensor (e.g. zero initial states): its size on the channel axis is rewritten where the
    shape vector holds it as a constant, and goes with the axis it is read off where the vector reads
    it from a tensor's Shape (a graph network's zeros [nodes, Shape(messages)[1]])."""

    ops = ("ConstantOfShape",)

    def propagate(self, c, tensor, axis):
        if tensor == c.out(0) and constant_size_at(c, 0, tensor, axis):
            return []
        follows = size_follows(c, 0, tensor, axis) if tensor == c.out(0) else None
        if follows:
            return follows
        raise Frozen("ConstantOfShape size on the channel axis is computed at run time")

    def rewrite(self, c, plan):
        rewrite_shape_vector(c, plan, 0, c.out(0))


@register
class ConstantLeaf(Rule):
    """A Constant node's value is sliced directly by the rewriter."""

    ops = ("Constant",)

    def propagate(self, c, tensor, axis):
        return []
