"""Per-operator channel rules: how a channel on one tensor axis maps onto a node's other tensors.

A rule is told that `tensor` (an input or output of its node) carries channels on `axis` and
answers with links: index maps from that axis onto axes of the node's other tensors. Links are
unions: linked indices are removed together. A rule that cannot map the channel raises `Frozen`
with a reason; nothing is ever guessed. Rules may also seed channel sources (weight output axes)
and rewrite attributes or shape constants once the plan is known.

The rules live in one module per op family (elementwise, layers, norms, axis, shapes, joins,
attention, quantized, filled, recurrent, boundaries); this module holds the registry core. Adding an
operator means adding one rule class to its family's module (and one equivalence test).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph import Graph, attr, infer_shapes


class Frozen(Exception):
    """The channel cannot cross this node; the reason is reported by `spa analyze`."""


@dataclass
class Link:
    """Union index src_idx[k] of `src` (tensor, axis) with dst_idx[k] of `dst`."""

    src: tuple
    dst: tuple
    src_idx: np.ndarray
    dst_idx: np.ndarray
    # (node index, input slot) where `dst` is contracted by its consumer: the equivalence oracle
    # zeroes exactly these slices in the original model.
    contracted: tuple | None = None
    # what a channel of this group is, when not a plain channel: "head", "head-dim", or
    # "approximate" (removing it changes normalisation statistics)
    unit: str | None = None
    # channels on an axis that also folds in a symbolic size (heads merged into the batch axis,
    # [B*H, S, d]): the axis is "virtual", with this many channels each repeated B times
    dst_size: int | None = None


@dataclass
class FreezeIndices:
    """Freeze some indices of a pair (e.g. a channel read by a scalar Gather)."""

    pair: tuple
    indices: np.ndarray
    reason: str


def identity(src, dst, size, contracted=None, unit=None):
    idx = np.arange(size)
    return Link(src, dst, idx, idx, contracted, unit)


class Ctx:
    """What a rule sees: the graph, its node, and the analysis options."""

    def __init__(self, graph: Graph, index: int, options, virtual: dict | None = None, marked=()):
        self.g = graph
        self.index = index
        self.node = graph.nodes[index]
        self.options = options
        self.virtual = virtual or {}
        self.marked = marked  # pairs (tensor, axis) the propagation already carries channels on

    def inp(self, k):
        return self.node.input[k] if len(self.node.input) > k and self.node.input[k] else None

    def out(self, k):
        return self.node.output[k] if len(self.node.output) > k and self.node.output[k] else None

    def attr(self, name, default=None):
        return attr(self.node, name, default)

    def rank(self, tensor):
        r = self.g.rank(tensor)
        if r is None:
            raise Frozen(f"rank of '{tensor}' unknown")
        return r

    def norm_axis(self, axis, tensor):
        return axis + self.rank(tensor) if axis < 0 else axis

    def dim(self, tensor, axis):
        return self.virtual.get((tensor, axis)) or self.g.dim(tensor, axis)

    def const(self, tensor):
        return self.g.const(tensor)

    def const_ints(self, k, attr_name=None):
        """An int list from input k (opset >= 10-18 style) or from an attribute (older opsets)."""
        name = self.inp(k)
        if name is not None:
            value = self.g.static_value(name)
            if value is None:
                raise Frozen(f"input '{name}' of {self.node.op_type} is computed at run time")
            return [int(v) for v in np.atleast_1d(value)]
        if attr_name is not None:
            value = self.attr(attr_name)
            return None if value is None else [int(v) for v in np.atleast_1d(value)]
        return None

    def slots(self, tensor):
        """Input slots and output slots of this node where `tensor` appears."""
        ins = [k for k, x in enumerate(self.node.input) if x == tensor]
        outs = [k for k, x in enumerate(self.node.output) if x == tensor]
        return ins, outs


class Rule:
    """Contract: entered from any of its tensors, `propagate` links every tensor of the node that
    shares the channel (the engine does not ask the node again from the tensors it marked). A
    rule with `hub_output` may instead link an input to the output alone, if entered from the
    output it links every input: the engine then asks it again from the output it marked (n
    links for an n-input op instead of n^2)."""

    ops: tuple = ()
    domain: str = ""  # a custom domain's rules are registered as "domain::op"
    hub_output: bool = False

    def sources(self, c: Ctx) -> list:
        """Pairs (tensor, axis) where new channels are created (weight output axes)."""
        return []

    def propagate(self, c: Ctx, tensor: str, axis: int) -> list:
        raise Frozen(f"{c.node.op_type} has no channel rule")

    def rewrite(self, c: Ctx, plan) -> None:
        """Fix attributes and shape constants after channels were removed."""

    def reads(self, c: Ctx) -> list:
        """Tensors other than its inputs and outputs whose pruning `rewrite` must follow (a size read
        off one at run time that the rewrite turns into a constant)."""
        return []

    def held_heads(self, c: Ctx):
        """A (tensor, axis) of grouped-query heads: where its head group is held only by the graph's
        inputs or outputs (a key/value cache), the analysis runs again with this node in
        `options.query_slots`, and the query heads that share a key/value head prune as slots."""
        return None

    def input_sizes(self, node, shape: "Inferred") -> dict:
        """{input tensor: {axis: size}} this op needs of inputs that the graph's inputs may feed, for
        generated inputs to run (an empty key/value cache at its head count and size); `shape(tensor)`:
        the tensor's inferred shape, ints or None per axis, or None."""
        return {}


REGISTRY: dict[str, Rule] = {}


def register(rule_cls):
    rule = rule_cls()
    for op in rule.ops:
        REGISTRY[f"{rule.domain}::{op}" if rule.domain else op] = rule
    return rule_cls


def rule_for(node) -> Rule:
    if node.domain not in ("", "ai.onnx"):
        return REGISTRY.get(f"{node.domain}::{node.op_type}") or \
            Boundary(f"custom-domain op {node.domain}::{node.op_type}")
    return REGISTRY.get(node.op_type) or Boundary(f"no channel rule for {node.op_type}")


class Boundary(Rule):
    def __init__(self, reason):
        self.reason = reason

    def propagate(self, c, tensor, axis):
        raise Frozen(self.reason)


_IMPOSING = []  # models whose imposed sizes are being read: Graph's shape probes generate inputs too


class Inferred:
    """What `Rule.input_sizes` sees of a model: shape(tensor), its inferred sizes (an int or None per
    axis; None where unknown), and its graph's `inputs` and `outputs` (names)."""

    def __init__(self, model, shapes: dict):
        self.shapes = shapes
        self.inputs = {i.name for i in model.graph.input}
        self.outputs = {o.name for o in model.graph.output}
        from .control import _passed

        for node in model.graph.node:  # what a flattened If's selector passes on to the graph's outputs
            for sources in (_passed(node) or []) if node.op_type == "If" else []:
                self.outputs |= {s for s, o in zip(sources, node.output) if o in self.outputs}

    def __call__(self, tensor):
        dims = self.shapes.get(tensor)
        return None if dims is None else [d if isinstance(d, int) else None for d in dims]


def imposed_input_sizes(model) -> dict:
    """{(graph input, axis): size} that ops impose on the graph's inputs (`Rule.input_sizes`): where
    generated inputs (verification, calibration) must take that size for the model to run."""
    inputs = {i.name for i in model.graph.input}
    readers = [node for node in model.graph.node if any(t in inputs for t in node.input)]  # sizes are of inputs
    rules = [(node, rule_for(node)) for node in readers]
    rules = [(node, rule) for node, rule in rules if type(rule).input_sizes is not Rule.input_sizes]
    if not rules or _IMPOSING:  # shape inference only for a model with such an op on a graph input
        return {}
    _IMPOSING.append(model)
    try:
        shapes = infer_shapes(model)
    except Exception:  # a graph SPA cannot read imposes nothing; its run will say why
        return {}
    finally:
        _IMPOSING.pop()

    shape = Inferred(model, shapes)
    sizes = {}
    for node, rule in rules:
        for tensor, axes in rule.input_sizes(node, shape).items():
            if tensor in inputs:
                sizes.update({(tensor, axis): size for axis, size in axes.items()})
    return sizes


def same_axis_everywhere(c: Ctx, tensor, axis, tensors):
    """Link `axis` of `tensor` to the same axis of each of `tensors` (all same rank)."""
    size = c.dim(tensor, axis)
    return [identity((tensor, axis), (t, axis), size) for t in tensors if t and t != tensor]


# The families register their rules on import; they import the core above from this package, so
# these imports come last. The rule classes and public helpers are re-exported: `spa.rules.X`
# works as it did when the rules were one module.
from . import (  # noqa: E402,F401
    attention, axis, boundaries, control, elementwise, filled, joins, layers, norms, quantized, recurrent, shapes,
)
from .axis import AxisOp, Pad, Reduce, Resize, Softmax, Spatial, TopK  # noqa: E402
from .boundaries import PARAMETER_OPS, VIEW_OPS, ShapeOnly  # noqa: E402
from .control import Selector  # noqa: E402
from .elementwise import Broadcast, Unary  # noqa: E402
from .filled import ConstantLeaf, ConstantOfShape  # noqa: E402
from .joins import Concat, Gather, Slice, Split  # noqa: E402
from .layers import (  # noqa: E402
    ConvRule, ConvTransposeRule, GemmRule, MatMulRule, in_group_positions, shrink_depthwise_group,
)
from .norms import BatchNormRule, GroupNormRule, LayerNormRule  # noqa: E402
from .quantized import (  # noqa: E402
    ConvIntegerRule, DynamicQuantize, MatMulIntegerRule, MatMulNBitsRule, QGemmRule, QLinearBroadcast,
    QLinearConcat, QLinearConvRule, QLinearMatMulRule, QLinearPool, QLinearUnary, QuantizeDequantize, channel_params,
    integer_weight, per_tensor,
)
from .recurrent import ZERO_VIEWS, Recurrent  # noqa: E402
from .shapes import (  # noqa: E402
    INFERRED, LAYOUT_OPS, DepthToSpace, Expand, Reshape, SqueezeUnsqueeze, Transpose, constant_size_at,
    fold_factor, reshape_map, rewrite_shape_vector, shape_vector_pieces,
)

__all__ = [
    # registry core
    "Frozen", "Link", "FreezeIndices", "identity", "Ctx", "Rule", "REGISTRY", "register", "rule_for",
    "Boundary", "same_axis_everywhere",
    # family modules
    "attention", "axis", "boundaries", "control", "elementwise", "filled", "joins", "layers", "norms", "quantized",
    "recurrent", "shapes",
    # rules and helpers, by family
    "Unary", "Broadcast", "Selector",
    "ConvRule", "ConvTransposeRule", "GemmRule", "MatMulRule", "in_group_positions",
    "shrink_depthwise_group",
    "BatchNormRule", "GroupNormRule", "LayerNormRule",
    "AxisOp", "Spatial", "Resize", "Pad", "Softmax", "Reduce", "TopK",
    "Transpose", "SqueezeUnsqueeze", "Reshape", "Expand", "DepthToSpace", "INFERRED", "LAYOUT_OPS",
    "shape_vector_pieces", "fold_factor", "rewrite_shape_vector", "constant_size_at", "reshape_map",
    "Concat", "Split", "Slice", "Gather",
    "QuantizeDequantize", "DynamicQuantize", "MatMulIntegerRule", "MatMulNBitsRule", "ConvIntegerRule", "QLinearUnary",
    "QLinearBroadcast", "QLinearConcat",
    "QLinearPool", "QLinearConvRule", "QLinearMatMulRule", "QGemmRule", "per_tensor", "channel_params",
    "integer_weight",
    "ConstantOfShape", "ConstantLeaf",
    "Recurrent", "ZERO_VIEWS",
    "ShapeOnly", "PARAMETER_OPS", "VIEW_OPS",
]
