"""Filled and constant tensors: ConstantOfShape (sizes rewritten), Constant (sliced by the rewriter)."""
from __future__ import annotations

from . import Frozen, Rule, register
from .shapes import constant_size_at, rewrite_shape_vector


@register
class ConstantOfShape(Rule):
    """A filled tensor (e.g. zero initial states): its size on the channel axis is rewritten."""

    ops = ("ConstantOfShape",)

    def propagate(self, c, tensor, axis):
        if tensor == c.out(0) and constant_size_at(c, 0, tensor, axis):
            return []
        raise Frozen("ConstantOfShape size on the channel axis is computed at run time")

    def rewrite(self, c, plan):
        rewrite_shape_vector(c, plan, 0, c.out(0))


@register
class ConstantLeaf(Rule):
    """A Constant node's value is sliced directly by the rewriter."""

    ops = ("Constant",)

    def propagate(self, c, tensor, axis):
        return []
