"""Per-operator channel rules: how a channel on one tensor axis maps onto a node's other tensors.

A rule is told that `tensor` (an input or output of its node) carries channels on `axis` and
answers with links: index maps from that axis onto axes of the node's other tensors. Links are
unions: linked indices are removed together. A rule that cannot map the channel raises `Frozen`
with a reason; nothing is ever guessed. Rules may also seed channel sources (weight output axes)
and rewrite attributes or shape constants once the plan is known.

Adding an operator means adding one rule class here (and one equivalence test).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import CONTROL_FLOW, PARAMETER_SLOTS, Graph, attr, fill_unknown_dim
from .quant import param_slots


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
    shares the channel (the engine does not ask the node again from the tensors it marked)."""

    ops: tuple = ()
    domain: str = ""  # a custom domain's rules are registered as "domain::op"

    def sources(self, c: Ctx) -> list:
        """Pairs (tensor, axis) where new channels are created (weight output axes)."""
        return []

    def propagate(self, c: Ctx, tensor: str, axis: int) -> list:
        raise Frozen(f"{c.node.op_type} has no channel rule")

    def rewrite(self, c: Ctx, plan) -> None:
        """Fix attributes and shape constants after channels were removed."""


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
    if node.op_type in CONTROL_FLOW:
        return Boundary(f"control flow ({node.op_type}) is a boundary")
    return REGISTRY.get(node.op_type) or Boundary(f"no channel rule for {node.op_type}")


class Boundary(Rule):
    def __init__(self, reason):
        self.reason = reason

    def propagate(self, c, tensor, axis):
        raise Frozen(self.reason)


def same_axis_everywhere(c: Ctx, tensor, axis, tensors):
    """Link `axis` of `tensor` to the same axis of each of `tensors` (all same rank)."""
    size = c.dim(tensor, axis)
    return [identity((tensor, axis), (t, axis), size) for t in tensors if t and t != tensor]


# ----------------------------------------------------------------------------------------------
# element-wise


@register
class Unary(Rule):
    ops = (
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu",
        "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Abs", "Neg",
        "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Erf", "Sin", "Cos",
        "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN",
        "IsInf", "Identity", "Dropout", "Cast", "Shrink", "Clip", "CastLike", "Swish",
    )

    def propagate(self, c, tensor, axis):
        ins, outs = c.slots(tensor)
        if ins and ins[0] != 0:
            return []  # Clip bounds, CastLike's type source, Dropout ratio: not data
        data = [c.inp(0)] + [o for o in c.node.output if o]
        return same_axis_everywhere(c, tensor, axis, data)


@register
class Broadcast(Rule):
    """N-ary numpy-broadcasting ops: every operand with a full-size axis shares the channel."""

    ops = (
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod", "Where", "Equal",
        "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "PRelu", "BitShift",
        "BitwiseAnd", "BitwiseOr", "BitwiseXor",
    )

    def operands(self, c):
        return [x for x in c.node.input if x]

    def propagate(self, c, tensor, axis):
        out = c.out(0)
        r_out = c.rank(out)
        size = c.dim(tensor, axis)
        out_axis = axis + (r_out - c.rank(tensor))
        links = []
        for t in self.operands(c) + [out]:
            if t == tensor:
                continue
            a = out_axis - (r_out - c.rank(t))
            if a < 0 or c.dim(t, a) == 1:
                continue  # broadcast along this axis: untouched by channel removal
            if c.dim(t, a) is None:
                raise Frozen(f"size of '{t}' axis {a} unknown")
            links.append(identity((tensor, axis), (t, a), size))
        return links


@register
class QuantizeDequantize(Rule):
    """QuantizeLinear / DequantizeLinear (QDQ models): element-wise on the data input. A per-axis
    scale / zero point (1-D, along `axis`) is sliced with a channel on that axis and untouched by a
    channel on any other; a per-tensor one is untouched. Blocked quantization (`block_size`) shares
    every axis but the blocked one with the data; a channel on the blocked axis is frozen (whole
    blocks only would keep it exact). DynamicQuantizeLinear has no rule: its scale is computed
    from the whole tensor, so removing channels would change it."""

    ops = ("QuantizeLinear", "DequantizeLinear")

    def _params(self, c, data_axis):
        """(tensor, axis) of the scale / zero point that carry data axis `data_axis`."""
        x = c.inp(0)
        axis = c.norm_axis(c.attr("axis", 1), x)
        blocked = c.attr("block_size", 0) > 0
        pairs = []
        for p in (c.inp(1), c.inp(2)):
            if p is None or c.rank(p) == 0:
                continue  # per-tensor
            if blocked:
                if data_axis == axis:
                    raise Frozen(f"{c.node.op_type}: blocked quantization along the channel axis {axis}")
                pairs.append((p, data_axis))
                continue
            size, channels = c.dim(p, 0), c.dim(x, data_axis)
            if data_axis != axis or size == 1:
                continue  # per-tensor ([1]) or per-axis along another axis
            if size is None or channels is None or size != channels:
                raise Frozen(f"{c.node.op_type}: scale '{p}' of size {size} does not match axis {axis} ({channels})")
            pairs.append((p, 0))
        return pairs

    def _data_axis(self, c, tensor, axis):
        ins, outs = c.slots(tensor)
        if outs or (ins and ins[0] == 0):
            return axis
        if c.attr("block_size", 0) > 0:
            return axis
        return c.norm_axis(c.attr("axis", 1), c.inp(0))  # a per-axis scale or zero point

    def propagate(self, c, tensor, axis):
        d = self._data_axis(c, tensor, axis)
        pairs = [(c.inp(0), d), (c.out(0), d)] + self._params(c, d)
        pair = (tensor, axis)
        if pair not in pairs:
            raise Frozen(f"{c.node.op_type}: channel on axis {axis} of '{tensor}'")
        return [identity(pair, p, c.dim(tensor, axis)) for p in pairs if p != pair]


@register
class QuantizedOperator(Rule):
    """Dynamically quantized layers: frozen, with the reason. DynamicQuantizeLinear derives its
    scale from the whole tensor, so removing channels changes it; ConvInteger / MatMulInteger read
    its output."""

    ops = ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")

    def sources(self, c):
        """The output channels a weighted layer would create: seeded so that `spa analyze` shows
        them frozen, with the reason, instead of finding nothing."""
        y = c.out(0)
        if c.node.op_type == "ConvInteger":
            return [(y, 1)] if c.g.rank(y) else []
        if c.node.op_type == "MatMulInteger":
            rank = c.g.rank(y)
            return [(y, rank - 1)] if rank and c.g.is_static(c.inp(1)) else []
        return []

    def propagate(self, c, tensor, axis):
        if c.node.op_type == "DynamicQuantizeLinear":
            raise Frozen("DynamicQuantizeLinear: its scale is computed from the whole tensor, so removing "
                         "channels would change it")
        raise Frozen(f"{c.node.op_type} (dynamic quantization) has no channel rule: quantize statically "
                     "(QuantFormat.QDQ or QOperator) to prune")


# ----------------------------------------------------------------------------------------------
# layers with weights


def in_group_positions(n, per_group):
    """Map channel j of a grouped tensor to its position inside its group."""
    return np.arange(n) % per_group


def shrink_depthwise_group(c, plan, groups, in_per_group):
    """A depthwise conv has one group per input channel: the group count follows the channels."""
    if groups > 1 and in_per_group == 1:
        plan.set_attr(c.node, "group", plan.new_dim(c.inp(0), 1))


@register
class ConvRule(Rule):
    ops = ("Conv",)
    X, W, B = 0, 1, 2  # input slots of data, weight and bias

    def contracted(self, c):
        """(node, input slot) where the input channels are contracted: the weight."""
        return (c.index, self.W)

    def out_params(self, c, c_out) -> list:
        """Pairs sliced with the output channel besides y, w and the bias."""
        return []

    def _geometry(self, c):
        x, w = c.inp(self.X), c.inp(self.W)
        groups = c.attr("group", 1)
        c_out, cin_g = c.dim(w, 0), c.dim(w, 1)
        c_in = c.dim(x, 1)
        if None in (c_out, cin_g):
            raise Frozen(f"{c.node.op_type} weight '{w}' shape unknown")
        if c_in is None:
            c_in = cin_g * groups
        return groups, c_in, c_out, cin_g

    def sources(self, c):
        return [(c.out(0), 1)]

    def propagate(self, c, tensor, axis):
        x, w, b, y = c.inp(self.X), c.inp(self.W), c.inp(self.B), c.out(0)
        groups, c_in, c_out, cin_g = self._geometry(c)
        depthwise = groups > 1 and cin_g == 1
        mult = c_out // groups
        pair = (tensor, axis)
        if tensor == x and axis == 1:
            if depthwise:
                # input channel g feeds exactly the `mult` outputs of group g
                return [Link(pair, (y, 1), np.repeat(np.arange(c_in), mult), np.arange(c_out))]
            return [Link(pair, (w, 1), np.arange(c_in), in_group_positions(c_in, cin_g),
                         contracted=self.contracted(c))]
        if (tensor == w and axis == 1) and not depthwise:
            return [Link(pair, (x, 1), in_group_positions(c_in, cin_g), np.arange(c_in),
                         contracted=self.contracted(c))]
        outs = [p for p in [(y, 1), (w, 0), (b, 0)] if p[0]] + self.out_params(c, c_out)
        if pair in outs:
            links = [identity(pair, p, c_out) for p in outs if p != pair]
            if depthwise:
                links.append(Link(pair, (x, 1), np.arange(c_out), np.arange(c_out) // mult))
            elif groups > 1:  # equal channels per group: same in-group position in every group
                links.append(Link(pair, pair, np.arange(c_out), in_group_positions(c_out, mult)))
            return links
        raise Frozen(f"{c.node.op_type}: channel on axis {axis} of '{tensor}' (not a channel axis)")

    def rewrite(self, c, plan):
        groups, _, _, cin_g = self._geometry(c)
        shrink_depthwise_group(c, plan, groups, cin_g)


@register
class ConvTransposeRule(Rule):
    """Weight is [C_in, C_out/group, k...]: axes swapped relative to Conv."""

    ops = ("ConvTranspose",)

    def _geometry(self, c):
        w = c.inp(1)
        groups = c.attr("group", 1)
        c_in, cout_g = c.dim(w, 0), c.dim(w, 1)
        if None in (c_in, cout_g):
            raise Frozen(f"ConvTranspose weight '{w}' shape unknown")
        return groups, c_in, cout_g * groups, c_in // groups, cout_g

    def sources(self, c):
        return [(c.out(0), 1)]

    def propagate(self, c, tensor, axis):
        x, w, b, y = c.inp(0), c.inp(1), c.inp(2), c.out(0)
        groups, c_in, c_out, cin_g, cout_g = self._geometry(c)
        depthwise = groups > 1 and cin_g == 1
        pair = (tensor, axis)
        if (tensor == x and axis == 1) or (tensor == w and axis == 0):
            links = [identity(pair, p, c_in, contracted=(c.index, 1) if p[0] == w else None)
                     for p in [(x, 1), (w, 0)] if p != pair]
            if depthwise:
                links.append(Link(pair, (y, 1), np.repeat(np.arange(c_in), cout_g), np.arange(c_out)))
            elif groups > 1:
                links.append(Link(pair, pair, np.arange(c_in), in_group_positions(c_in, cin_g)))
            return links
        if (tensor == y and axis == 1) or (tensor == b and axis == 0):
            links = [identity(pair, p, c_out) for p in [(y, 1), (b, 0)] if p[0] and p != pair]
            if depthwise:
                links.append(Link(pair, (x, 1), np.arange(c_out), np.arange(c_out) // cout_g))
            else:
                links.append(Link(pair, (w, 1), np.arange(c_out), in_group_positions(c_out, cout_g)))
            return links
        if tensor == w and axis == 1 and not depthwise:
            return [Link(pair, (y, 1), in_group_positions(c_out, cout_g), np.arange(c_out))]
        raise Frozen(f"ConvTranspose: channel on axis {axis} of '{tensor}' (not a channel axis)")

    def rewrite(self, c, plan):
        groups, _, _, cin_g, _ = self._geometry(c)
        shrink_depthwise_group(c, plan, groups, cin_g)


@register
class GemmRule(Rule):
    ops = ("Gemm",)
    A, B, C = 0, 1, 2  # input slots

    def contracted(self, c):
        return (c.index, self.B)

    def n_params(self, c) -> list:
        """Pairs sliced with the output column N besides B, Y and the bias."""
        return []

    def _axes(self, c):
        ka = 0 if c.attr("transA", 0) else 1
        kb, nb = (1, 0) if c.attr("transB", 0) else (0, 1)
        return ka, 1 - ka, kb, nb

    def sources(self, c):
        a, b = c.inp(self.A), c.inp(self.B)
        return [(c.out(0), 1)] if c.g.is_static(b) and not c.g.is_static(a) else []

    def propagate(self, c, tensor, axis):
        a, b, bias, y = c.inp(self.A), c.inp(self.B), c.inp(self.C), c.out(0)
        ka, ma, kb, nb = self._axes(c)
        pair = (tensor, axis)
        if (tensor, axis) in ((a, ka), (b, kb)):
            other = (b, kb) if tensor == a else (a, ka)
            return [identity(pair, other, c.dim(tensor, axis), contracted=self.contracted(c))]
        n_pairs = [(b, nb), (y, 1)] + self.n_params(c)
        if pair in n_pairs or (tensor == bias and axis == c.rank(bias) - 1):
            return self._with_bias(c, pair, n_pairs, 1)
        if (tensor, axis) in ((a, ma), (y, 0)) or (tensor == bias and axis == c.rank(bias) - 2):
            return self._with_bias(c, pair, [(a, ma), (y, 0)], 0)
        raise Frozen(f"Gemm: channel on axis {axis} of '{tensor}'")

    def _with_bias(self, c, pair, pairs, y_axis):
        bias = c.inp(self.C)
        if bias:
            a = c.rank(bias) - (2 - y_axis)
            if a >= 0 and c.dim(bias, a) not in (1, None):
                pairs.append((bias, a))
        size = c.dim(*pair)
        return [identity(pair, p, size) for p in pairs if p != pair]


@register
class MatMulRule(Rule):
    """[..., M, K] x [..., K, N]: K contracted, M and N pass through, batch axes broadcast."""

    ops = ("MatMul",)
    A, B = 0, 1  # input slots

    def contracted(self, c, slot):
        return (c.index, slot)

    def params(self, c) -> dict:
        """{pair: role} of tensors sliced with an M or N channel besides a, b and y."""
        return {}

    def sources(self, c):
        a, b = c.inp(self.A), c.inp(self.B)
        static_a, static_b = c.g.is_static(a), c.g.is_static(b)
        if static_b and not static_a and c.rank(b) >= 2:
            return [(c.out(0), c.rank(c.out(0)) - 1)]
        if static_a and not static_b and c.rank(a) >= 2:
            return [(c.out(0), c.rank(c.out(0)) - 2)]
        return []

    def propagate(self, c, tensor, axis):
        a, b, y = c.inp(self.A), c.inp(self.B), c.out(0)
        ra, rb, ry = c.rank(a), c.rank(b), c.rank(y)
        if ra < 2 or rb < 2:
            raise Frozen(f"{c.node.op_type} with a 1-D operand")
        pair = (tensor, axis)
        roles = {  # axis -> role for each operand and the output
            (a, ra - 1): "k", (b, rb - 2): "k", (a, ra - 2): "m", (y, ry - 2): "m",
            (b, rb - 1): "n", (y, ry - 1): "n",
        } | self.params(c)
        role = roles.get(pair)
        size = c.dim(tensor, axis)
        if role == "k":
            other = (b, rb - 2) if tensor == a else (a, ra - 1)
            slot = self.B if c.g.is_static(b) or not c.g.is_static(a) else self.A
            return [identity(pair, other, size, contracted=self.contracted(c, slot))]
        if role is not None:
            return [identity(pair, p, size) for p, r in roles.items() if r == role and p != pair]
        # a batch axis: aligned from the right across the operands and the output
        offset = axis - c.rank(tensor)
        links = []
        for t in (a, b, y):
            ax = c.rank(t) + offset
            if t != tensor and ax >= 0 and c.dim(t, ax) not in (1,):
                links.append(identity(pair, (t, ax), size))
        return links


@register
class BatchNormRule(Rule):
    ops = ("BatchNormalization", "InstanceNormalization")

    def propagate(self, c, tensor, axis):
        ins, outs = c.slots(tensor)
        if (ins and ins[0] == 0) or (outs and outs[0] == 0):
            if axis != 1:
                raise Frozen(f"{c.node.op_type}: channel on axis {axis}, not 1")
        elif axis != 0:
            raise Frozen(f"{c.node.op_type}: parameter '{tensor}' axis {axis}")
        size = c.dim(tensor, axis)
        pairs = [(c.inp(0), 1), (c.out(0), 1)]
        pairs += [(t, 0) for t in list(c.node.input)[1:] + list(c.node.output)[1:] if t]
        return [identity((tensor, axis), p, size) for p in pairs if p != (tensor, axis)]


@register
class GroupNormRule(Rule):
    """Channels move in whole normalisation groups; the group count shrinks."""

    ops = ("GroupNormalization",)

    def propagate(self, c, tensor, axis):
        x, scale, bias, y = c.inp(0), c.inp(1), c.inp(2), c.out(0)
        channels = c.dim(x, 1)
        if channels is None:
            raise Frozen("GroupNormalization: channel count unknown")
        per = channels // c.attr("num_groups")
        group_of = np.arange(channels) // per
        per_channel_params = c.dim(scale, 0) == channels
        pair = (tensor, axis)
        if tensor in (x, y) and axis == 1:
            every = np.arange(channels)
            links = [identity(pair, (t, 1), channels) for t in (x, y) if t != tensor]
            links.append(Link(pair, pair, every, group_of * per))  # a group goes as a whole
            param_idx = every if per_channel_params else group_of
            links += [Link(pair, (t, 0), every, param_idx) for t in (scale, bias) if t]
            return links
        if tensor in (scale, bias) and axis == 0:
            n = c.dim(tensor, 0)
            return [Link(pair, (x, 1), np.arange(n), np.arange(n) * (1 if per_channel_params else per))]
        raise Frozen(f"GroupNormalization: channel on axis {axis}")

    def rewrite(self, c, plan):
        channels = c.g.dim(c.inp(0), 1)
        per = channels // c.attr("num_groups")
        plan.set_attr(c.node, "num_groups", plan.new_dim(c.inp(0), 1) // per)


@register
class LayerNormRule(Rule):
    """Statistics over the normalised axes: pruning them is approximate, allowed only on request."""

    ops = ("LayerNormalization", "RMSNormalization")

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        r = c.rank(x)
        first = c.norm_axis(c.attr("axis", -1), x)
        ins, _ = c.slots(tensor)
        is_param = bool(ins) and ins[0] > 0
        data_axis = axis + (r - c.rank(tensor)) if is_param else axis
        if data_axis < first:
            return [] if is_param else same_axis_everywhere(c, tensor, axis, [x, y])
        if not c.options.approximate:
            raise Frozen(f"{c.node.op_type} normalises over the channel axis (pruning it changes "
                         "the statistics; allow with --granularity hidden)")
        c.options.approximate_nodes.add(c.g.node_name(c.index))
        size = c.dim(tensor, axis)
        pairs = [(x, data_axis), (y, data_axis)]
        for t in list(c.node.input)[1:]:
            a = data_axis - (r - c.rank(t)) if t else -1
            if a >= 0 and c.dim(t, a) == size:
                pairs.append((t, a))
        return [identity((tensor, axis), p, size, unit="approximate") for p in pairs if p != (tensor, axis)]


# ----------------------------------------------------------------------------------------------
# identity on the channel axis when it is not the op's own axis


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

    def rewrite(self, c, plan):
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


# ----------------------------------------------------------------------------------------------
# layout ops


@register
class Transpose(Rule):
    ops = ("Transpose",)

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        r = c.rank(x)
        perm = list(c.attr("perm", list(range(r))[::-1]))
        size = c.dim(tensor, axis)
        if tensor == x:
            return [identity((x, axis), (y, perm.index(axis)), size)]
        return [identity((y, axis), (x, perm[axis]), size)]


@register
class SqueezeUnsqueeze(Rule):
    ops = ("Squeeze", "Unsqueeze")

    def _axes(self, c):
        axes = c.const_ints(1) if c.g.opset() >= 13 else c.attr("axes")
        x, y = c.inp(0), c.out(0)
        if c.node.op_type == "Squeeze":
            r = c.rank(x)
            if axes is None:
                shape = c.g.shapes.get(x)
                axes = [i for i, d in enumerate(shape) if d == 1]
            return sorted(a % r for a in axes)
        r = c.rank(y)
        return sorted(a % r for a in axes)

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if tensor != x and tensor != y:
            return []
        axes = self._axes(c)
        big, small = (x, y) if c.node.op_type == "Squeeze" else (y, x)
        kept = [a for a in range(c.rank(big)) if a not in axes]
        if tensor == big:
            if axis in axes:
                raise Frozen(f"{c.node.op_type} removes the channel axis")
            return [identity((big, axis), (small, kept.index(axis)), c.dim(tensor, axis))]
        return [identity((small, axis), (big, kept[axis]), c.dim(tensor, axis))]


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


# ----------------------------------------------------------------------------------------------
# quantized operators (QuantFormat.QOperator): the float op's channel map on the data, per-channel
# weight parameters sliced with the output channel, per-tensor parameters untouched


def per_tensor(c: Ctx, slots):
    """Frozen unless the scales and zero points in `slots` are per-tensor (one element)."""
    for p in (c.inp(k) for k in slots):
        if p is not None and any(c.dim(p, a) != 1 for a in range(c.rank(p))):
            raise Frozen(f"{c.node.op_type}: quantization parameter '{p}' is not per-tensor")


def channel_params(c: Ctx, slots, channels) -> list:
    """Pairs of the scales / zero points in `slots` that run along a channel axis of `channels`
    (1-D, per channel); per-tensor ones stay; any other shape is frozen."""
    pairs = []
    for p in (c.inp(k) for k in slots):
        if p is None or all(c.dim(p, a) == 1 for a in range(c.rank(p))):
            continue
        if c.rank(p) != 1 or c.dim(p, 0) != channels:
            raise Frozen(f"{c.node.op_type}: quantization parameter '{p}' is neither per-tensor nor one per "
                         f"channel ({channels})")
        pairs.append((p, 0))
    return pairs


def integer_weight(c: Ctx, slot):
    """(node, slot) of a QOperator layer's contracted integer weight. It must be a constant: the
    oracle sets its removed slices to the zero point (an integer activation would need a mask)."""
    if c.inp(slot) not in c.g.consts:
        raise Frozen(f"{c.node.op_type}: contracted input '{c.inp(slot)}' is computed (only constant "
                     "integer weights are sliced)")
    return (c.index, slot)


@register
class QLinearUnary(Unary):
    """com.microsoft QLinearSigmoid / QLinearLeakyRelu (X, X_scale, X_zp, Y_scale, Y_zp): identity
    on the data with per-tensor parameters, which stay."""

    domain = "com.microsoft"
    ops = ("QLinearSigmoid", "QLinearLeakyRelu")

    def propagate(self, c, tensor, axis):
        per_tensor(c, param_slots(c.node))
        return super().propagate(c, tensor, axis)


@register
class QLinearBroadcast(Broadcast):
    """com.microsoft QLinearAdd / QLinearMul (A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp):
    broadcasting on A and B like Add / Mul, with per-tensor parameters, which stay."""

    domain = "com.microsoft"
    ops = ("QLinearAdd", "QLinearMul")

    def operands(self, c):
        return [t for t in (c.inp(0), c.inp(3)) if t]

    def propagate(self, c, tensor, axis):
        per_tensor(c, param_slots(c.node))
        return super().propagate(c, tensor, axis)


@register
class QLinearConcat(Concat):
    """com.microsoft QLinearConcat (Y_scale, Y_zp, then X, X_scale, X_zp per input): Concat of the
    data inputs, with per-tensor parameters, which stay."""

    domain = "com.microsoft"
    ops = ("QLinearConcat",)

    def operands(self, c):
        return [t for t in c.node.input[2::3] if t]

    def propagate(self, c, tensor, axis):
        per_tensor(c, param_slots(c.node))
        return super().propagate(c, tensor, axis)


@register
class QLinearPool(Spatial):
    """com.microsoft QLinearGlobalAveragePool / QLinearAveragePool (X, x_scale, x_zp, y_scale,
    y_zp): spatial, with per-tensor parameters, which stay; `channels_last` puts the channel last."""

    domain = "com.microsoft"
    ops = ("QLinearGlobalAveragePool", "QLinearAveragePool")

    def acted_axes(self, c, tensor):
        if c.attr("channels_last", 0):  # [N, spatial..., C]
            return set(range(1, c.rank(tensor) - 1)) | {0}
        return super().acted_axes(c, tensor)

    def propagate(self, c, tensor, axis):
        per_tensor(c, param_slots(c.node))
        return super().propagate(c, tensor, axis)


@register
class QLinearConvRule(ConvRule):
    """QLinearConv (x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, [B int32]): Conv's channel
    map on x, w, B and y (grouped and depthwise too); a per-channel w_scale / w_zp is sliced with
    the output channel; x and y parameters are per-tensor and stay."""

    ops = ("QLinearConv",)
    X, W, B = 0, 3, 8

    def propagate(self, c, tensor, axis):
        per_tensor(c, (1, 2, 6, 7))
        return super().propagate(c, tensor, axis)

    def contracted(self, c):
        return integer_weight(c, self.W)

    def out_params(self, c, c_out):
        return channel_params(c, (4, 5), c_out)


@register
class QLinearMatMulRule(MatMulRule):
    """QLinearMatMul (a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp): MatMul's channel map on
    a, b and y; a per-column b_scale / b_zp is sliced with N; a and y parameters must be
    per-tensor."""

    ops = ("QLinearMatMul",)
    A, B = 0, 3

    def contracted(self, c, slot):
        return integer_weight(c, slot)

    def propagate(self, c, tensor, axis):
        per_tensor(c, (1, 2, 6, 7))
        return super().propagate(c, tensor, axis)

    def params(self, c):
        b = c.inp(self.B)
        return dict.fromkeys(channel_params(c, (4, 5), c.dim(b, c.rank(b) - 1)), "n")


@register
class QGemmRule(GemmRule):
    """com.microsoft QGemm (A, a_scale, a_zp, B, b_scale, b_zp, [C int32], [y_scale, y_zp]): Gemm's
    channel map; a per-column b_scale / b_zp is sliced with N; a and y parameters are per-tensor."""

    domain = "com.microsoft"
    ops = ("QGemm",)
    A, B, C = 0, 3, 6

    def propagate(self, c, tensor, axis):
        per_tensor(c, (1, 2, 7, 8))
        return super().propagate(c, tensor, axis)

    def contracted(self, c):
        return integer_weight(c, self.B)

    def n_params(self, c):
        return channel_params(c, (4, 5), c.dim(c.inp(self.B), self._axes(c)[3]))


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
        if c.g.opset() >= 10:
            plan.set_input(c.node, 1, np.array([s for s, _ in new], dtype=np.int64))
            plan.set_input(c.node, 2, np.array([e for _, e in new], dtype=np.int64))
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


def shape_vector_pieces(c: Ctx, slot: int):
    """Where the elements of a shape-like input come from: {position: (node, input slot, index)}
    for elements that are constants (the vector itself, or constant pieces of a Concat building
    it); positions missing are computed at run time. None when the vector cannot be traced."""
    name = c.inp(slot)
    value = c.g.static_value(name)
    if value is not None:
        return {p: (c.node, slot, p) for p in range(value.size)}
    index = c.g.producer.get(name)
    while index is not None and c.g.nodes[index].op_type in ("Cast", "Identity"):
        index = c.g.producer.get(c.g.nodes[index].input[0])  # tf2onnx: int32 Concat -> Cast
    if index is None or c.g.nodes[index].op_type != "Concat":
        return None
    concat = c.g.nodes[index]
    pieces, pos = {}, 0
    for k, part in enumerate(concat.input):
        value = c.g.static_value(part)  # constant, or computed but the same for every input size
        length = value.size if value is not None else c.g.dim(part, 0)
        if length is None:
            return None
        if value is not None:
            pieces.update({pos + j: (concat, k, j) for j in range(length)})
        pos += length
    return pieces


INFERRED = "inferred"


def fold_factor(c: Ctx, slot: int, position: int):
    """(node, input slot) of the constant head count H in a shape element computed as
    batch * H (e.g. Concat([.., Unsqueeze(Mul(batch, H)), ..])), INFERRED for a -1 element, or
    None; position counts from the end."""
    value = c.const(c.inp(slot))
    if value is not None:  # a constant vector ([S, -1, d]: torch exports with a static sequence)
        value = np.asarray(value).reshape(-1)
        return INFERRED if -value.size <= position < 0 and int(value[position]) == -1 else None
    index = c.g.producer.get(c.inp(slot))
    if index is None or c.g.nodes[index].op_type != "Concat":
        return None
    concat, ends, pos = c.g.nodes[index], [], 0
    for part in concat.input:
        length = c.g.dim(part, 0)
        if length is None:
            return None
        pos += length
        ends.append(pos)
    position += pos
    part = next((p for p, end in zip(concat.input, ends) if position < end), None)
    if part is None or c.g.dim(part, 0) != 1:
        return None
    if c.const(part) is not None and int(c.const(part).reshape(-1)[0]) == -1:
        return INFERRED
    while part in c.g.producer:
        node = c.g.nodes[c.g.producer[part]]
        if node.op_type in ("Unsqueeze", "Reshape", "Squeeze", "Cast", "Identity"):
            part = node.input[0]
            continue
        if node.op_type != "Mul":
            return None
        for k, name in enumerate(node.input[:2]):
            value = c.const(name)
            if value is not None and value.size == 1 and not c.g.is_static(node.input[1 - k]):
                return node, k
        return None
    return None


def rewrite_shape_vector(c: Ctx, plan, slot: int, out: str):
    """Write the new sizes of `out`'s pruned axes into the shape vector at input `slot` (right
    aligned); elements computed at run time follow the new sizes by themselves."""
    pieces = shape_vector_pieces(c, slot) or {}
    length = c.g.dim(c.inp(slot), 0) or 0
    edits = {}
    for a in range(c.g.rank(out)):
        position = a - (c.g.rank(out) - length)
        if not plan.changed(out, a) or position not in pieces:
            continue
        node, k, j = pieces[position]
        key = (id(node), k)
        if key not in edits:
            value = np.asarray(c.g.static_value(node.input[k]))  # keeps int32 (tf2onnx Cast)
            edits[key] = (node, k, value.astype(np.int32 if value.dtype == np.int32 else np.int64))
        values = edits[key][2].reshape(-1)
        if values[j] == c.g.dim(out, a):  # 0 (copy), -1 (infer) and 1 (broadcast) stay
            values[j] = plan.new_dim(out, a)
    for node, k, values in edits.values():
        plan.set_input(node, k, values)


def constant_size_at(c: Ctx, slot: int, out: str, axis: int) -> bool:
    pieces = shape_vector_pieces(c, slot)
    length = c.g.dim(c.inp(slot), 0)
    return pieces is not None and length is not None and axis - (c.g.rank(out) - length) in pieces


def reshape_map(shape_from, shape_to, axis, split_policy="outer", channels=None):
    """Map channel `axis` of shape_from onto one axis of shape_to through a row-major reshape.

    Returns (axis_to, src_idx, dst_idx, unit, virtual_size) or raises Frozen; unit tags splits
    ("head" when whole outer blocks go, "head-dim" when the same inner position goes in every
    block); virtual_size is set when the channels fold into a symbolic axis. Trailing dims the reshape leaves
    alone (equal, even symbolic, e.g. sequence x head-dim) are set aside first; of the rest, only
    the dims from the channel axis inwards need to be static.
    """
    common = 0
    while (common < min(len(shape_from) - axis - 1, len(shape_to) - 1)
           and shape_from[-1 - common] == shape_to[-1 - common]
           and not (isinstance(shape_from[-1 - common], str) and shape_from[-1 - common] == "?")):
        common += 1
    if common:
        return reshape_map(shape_from[:-common], shape_to[:-common], axis, split_policy, channels)
    if channels is not None and not isinstance(shape_from[axis], int):  # a virtual axis
        if axis == len(shape_from) - 1 and shape_to and shape_to[-1] == channels:
            return len(shape_to) - 1, np.arange(channels), np.arange(channels), None, None
        unfolded = _unfold_virtual(shape_from, shape_to, axis, channels)
        if unfolded is not None:
            return unfolded, np.arange(channels), np.arange(channels), None, None
        raise Frozen("Reshape of an axis with heads merged into a symbolic size")
    channels = shape_from[axis]
    if (axis == len(shape_from) - 1 and isinstance(channels, int) and shape_to
            and not isinstance(shape_to[-1], int)
            and any(not isinstance(d, int) for d in shape_from[:axis])):
        # [B, H] -> [B*H]: the channels fold into a symbolic size; the merged axis is virtual
        return len(shape_to) - 1, np.arange(channels), np.arange(channels), None, channels
    inner_dims = shape_from[axis + 1:]
    if not all(isinstance(d, int) for d in inner_dims) or not isinstance(channels, int):
        raise Frozen("Reshape around the channel axis with symbolic sizes")
    inner = int(np.prod(inner_dims, dtype=np.int64))
    suffix = 1
    for b in range(len(shape_to) - 1, -1, -1):
        d = shape_to[b]
        if not isinstance(d, int):
            break
        inner_to, suffix = suffix, suffix * d
        if inner % inner_to == 0 and d % (channels * (inner // inner_to)) == 0:
            # axis b starts inside the channel's inner block (k = inner / inner_to positions per
            # channel) and holds outer * channels * k: position (o, c, j) comes from channel c.
            # The outer factor need not be whole dims: [B, L, C] -> [B, L/k, k*C] (byte models)
            k = inner // inner_to
            outer = d // (channels * k)
            pos = (np.arange(outer)[:, None, None] * channels * k + np.arange(channels)[None, :, None] * k
                   + np.arange(k)[None, None, :])
            src = np.broadcast_to(np.arange(channels)[None, :, None], pos.shape)
            return b, src.ravel(), pos.ravel(), None, None
        if inner_to == inner and b > 0 and isinstance(shape_to[b - 1], int) \
                and shape_to[b - 1] * d == channels and d > 1 and shape_to[b - 1] > 1:
            if split_policy == "outer":  # whole outer blocks (attention heads)
                return b - 1, np.arange(channels), np.arange(channels) // d, "head", None
            return b, np.arange(channels), np.arange(channels) % d, "head-dim", None
        if inner_to == inner and _folds_into(shape_from[:axis], shape_to[:b]) \
                and d > 1 and channels % d == 0 and channels // d > 1:
            # [S, B, H*d] -> [S, B*H, d]: the heads fold into the symbolic batch (virtual axis)
            if split_policy == "outer":
                return b - 1, np.arange(channels), np.arange(channels) // d, "head", channels // d
            return b, np.arange(channels), np.arange(channels) % d, "head-dim", None
        if inner_to == inner and b > 0 and d > 1 and channels % d == 0 and channels // d > 1:
            # the outer factor merges with outer dims ([N, H, W, A*V] -> [N, H*W*A, V], SSD heads;
            # [B, L/k, k*C] -> [B, L, C]): axis b index is c % d whatever axis b - 1 holds, so the
            # same position of every block goes together
            return b, np.arange(channels), np.arange(channels) % d, None, None
        if inner_to > inner and inner_to % inner == 0 and channels % (inner_to // inner) == 0 \
                and d % (channels // (inner_to // inner)) == 0:
            # the channel axis splits as (C/s, s) and s merges into the inner dims ([N, 8, H, W]
            # -> [N, 4, 2H, W]): axis b index o * C/s + c // s holds s channels, removed together
            s = inner_to // inner
            blocks = channels // s
            pos = np.arange(d // blocks)[:, None] * blocks + (np.arange(channels) // s)[None, :]
            src = np.broadcast_to(np.arange(channels)[None, :], pos.shape)
            return b, src.ravel(), pos.ravel(), None, None
    raise Frozen("Reshape regroups the channel axis in a way with no channel-wise map")


def _folds_into(dims_from, dims_to) -> bool:
    """dims_to equals dims_from except that its last dim, symbolic, absorbs one symbolic dim of
    dims_from (and the channel axis's outer factor)."""
    if not dims_to or isinstance(dims_to[-1], int) or "?" in dims_from or "?" in dims_to:
        return False
    rest_to, rest_from = list(dims_to[:-1]), list(dims_from)
    if dims_to[-1] in rest_from:
        return False
    for d in rest_to:
        if d not in rest_from:
            return False
        rest_from.remove(d)
    # the absorbed dim is a factor of the product's name ("4*batch", "batch*H"); not so for
    # [B, floor(L/2), 2*C] -> [B, L, C] (a sequence merged into the channels, split back)
    return len(rest_from) == 1 and not isinstance(rest_from[0], int) and rest_from[0] in dims_to[-1]


def _unfold_virtual(shape_from, shape_to, axis, channels):
    """[B*H] -> [B, H]: the axis of shape_to that takes back the heads of a virtual axis."""
    if axis != len(shape_from) - 1 or "?" in shape_to:
        return None
    ints = [b for b, d in enumerate(shape_to) if isinstance(d, int) and d != 1]
    if len(ints) == 1 and shape_to[ints[0]] == channels \
            and _folds_into(list(shape_to[:ints[0]]) + list(shape_to[ints[0] + 1:]), shape_from):
        return ints[0]
    return None


LAYOUT_OPS = ("Unsqueeze", "Squeeze", "Transpose", "Identity")


def _is_selected(c: Ctx, tensor, axis, depth=0) -> bool:
    """True when every use of `axis` of `tensor` (through layout ops) picks single indices of it:
    Gathers with constant indices or a Split along it."""
    uses = c.g.consumers.get(tensor, [])
    if not uses or depth > 8:
        return False
    for i, slot in uses:
        node = c.g.nodes[i]
        inner = Ctx(c.g, i, c.options, c.virtual)
        if slot != 0:
            return False
        if node.op_type == "Gather" and inner.norm_axis(inner.attr("axis", 0), tensor) == axis \
                and inner.const(inner.inp(1)) is not None:
            continue
        if node.op_type == "Split" and inner.norm_axis(inner.attr("axis", 0), tensor) == axis:
            continue
        if node.op_type not in LAYOUT_OPS:
            return False
        try:
            links = rule_for(node).propagate(inner, tensor, axis)
        except Frozen:
            return False
        if len(links) != 1 or not _is_selected(c, links[0].dst[0], links[0].dst[1], depth + 1):
            return False
    return True


def _whole_shape_source(c: Ctx):
    """T when a Reshape's target is Shape(T) read whole (jax2onnx's GroupNorm un-grouping)."""
    index = c.g.producer.get(c.inp(1))
    if index is None or c.g.nodes[index].op_type != "Shape":
        return None
    shape = c.g.nodes[index]
    if attr(shape, "start", 0) != 0 or attr(shape, "end") is not None:
        return None
    source = shape.input[0]
    return source if c.g.shapes.get(source) == c.g.shapes.get(c.out(0)) else None


@register
class Reshape(Rule):
    ops = ("Reshape", "Flatten")

    def _is_shuffle(self, c, split_axes):
        """A split whose two halves a Transpose then swaps is a channel shuffle."""
        for i, _ in c.g.consumers.get(c.out(0), []):
            node = c.g.nodes[i]
            if node.op_type == "Transpose":
                perm = list(attr(node, "perm", []))
                if sorted(a for a, p in enumerate(perm) if a != p) == sorted(split_axes):
                    return True
        return False

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if tensor not in (x, y):
            raise Frozen("Reshape shape input carries channels")
        sx, sy = c.g.shapes.get(x), c.g.shapes.get(y)
        if sx is None or sy is None:
            raise Frozen("Reshape with unknown input or output shape")
        shape_of = _whole_shape_source(c) if c.node.op_type == "Reshape" else None
        if c.node.op_type == "Reshape" and shape_of is None and shape_vector_pieces(c, 1) is None:
            raise Frozen("Reshape with a computed target shape")
        sx, sy = fill_unknown_dim(sx, sy), fill_unknown_dim(sy, sx)
        src_shape, dst_shape, dst = (sx, sy, y) if tensor == x else (sy, sx, x)
        # A split of the channel axis prunes whole heads (outer blocks), or the same position in
        # every block for head-dim granularity and for channel shuffles (unit None: plain channels).
        channels = c.dim(tensor, axis)
        b, src_idx, dst_idx, unit, virtual = reshape_map(src_shape, dst_shape, axis, "outer", channels)
        if virtual is not None and tensor == x and c.node.op_type == "Reshape" \
                and fold_factor(c, 1, b - c.rank(y)) is None:
            raise Frozen("heads fold into a size computed at run time without a head-count constant")
        # A split whose outer axis is then taken apart index by index (packed q/k/v picked by
        # Gathers) stacks tensors: the same inner position goes in every one of them.
        plain = unit == "head" and virtual is None and tensor == x and (
            self._is_shuffle(c, (b, b + 1)) or _is_selected(c, y, b))
        if plain or (unit == "head" and "head-dim" in c.options.granularity):
            b, src_idx, dst_idx, unit, virtual = reshape_map(src_shape, dst_shape, axis, "inner", channels)
        links = [Link((tensor, axis), (dst, b), src_idx, dst_idx, unit=None if plain else unit,
                      dst_size=virtual)]
        if shape_of is not None:  # y takes shape_of's run-time shape: their axes shrink together
            y_axis = axis if tensor == y else b
            links.append(identity((y, y_axis), (shape_of, y_axis), c.dim(y, y_axis)))
        return links

    def rewrite(self, c, plan):
        if c.node.op_type == "Reshape":
            rewrite_shape_vector(c, plan, 1, c.out(0))
            for axis in range(c.g.rank(c.out(0))):
                if c.g.dim(c.out(0), axis) is None and plan.changed(c.out(0), axis):
                    factor = fold_factor(c, 1, axis - c.g.rank(c.out(0)))
                    if factor == INFERRED:
                        continue
                    node, k = factor
                    plan.set_input(node, k, np.array(plan.new_dim(c.out(0), axis),
                                                     dtype=c.const(node.input[k]).dtype))


@register
class Expand(Rule):
    ops = ("Expand", "Tile")

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if tensor not in (x, y):
            return []
        ry, rx = c.rank(y), c.rank(x)
        if c.node.op_type == "Tile":
            reps = c.const_ints(1)
            if reps[axis] != 1:
                raise Frozen("Tile repeats the channel axis")
            other = y if tensor == x else x
            return [identity((tensor, axis), (other, axis), c.dim(tensor, axis))]
        if tensor == x:
            return [identity((x, axis), (y, axis + ry - rx), c.dim(x, axis))]
        ax = axis - (ry - rx)
        if ax < 0 or c.dim(x, ax) == 1:  # broadcast: only the target size changes
            if constant_size_at(c, 1, y, axis):
                return []
            raise Frozen("Expand broadcasts the channel axis to a size computed at run time")
        return [identity((y, axis), (x, ax), c.dim(y, axis))]

    def rewrite(self, c, plan):
        if c.node.op_type == "Expand":
            rewrite_shape_vector(c, plan, 1, c.out(0))


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
class DepthToSpace(Rule):
    """PixelShuffle: input channel c*b*b + k (CRD) or k*C + c (DCR) becomes output channel c."""

    ops = ("DepthToSpace", "SpaceToDepth")

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if axis != 1:
            raise Frozen(f"{c.node.op_type} on axis {axis}")
        b2 = c.attr("blocksize") ** 2
        deep, shallow = (x, y) if c.node.op_type == "DepthToSpace" else (y, x)
        n = c.dim(deep, 1)
        few = n // b2
        crd = c.node.op_type == "DepthToSpace" and c.attr("mode", "DCR") == "CRD"
        deep_to_shallow = np.arange(n) // b2 if crd else np.arange(n) % few
        if tensor == deep:
            return [Link((deep, 1), (shallow, 1), np.arange(n), deep_to_shallow)]
        return [Link((shallow, 1), (deep, 1), deep_to_shallow, np.arange(n))]


@register
class Recurrent(Rule):
    """LSTM/GRU/RNN: hidden unit j owns row j of every gate block in W, R, B and P, column j of R,
    and the last axis of Y, Y_h, Y_c and the initial states (both directions share j)."""

    ops = ("LSTM", "GRU", "RNN")
    GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}

    def _hidden_axes(self, c):
        """(tensor, axis, hidden index of each position, contracted input slot or None)."""
        h = c.attr("hidden_size")
        g = self.GATES[c.node.op_type]
        every = np.arange(h)
        rows = np.tile(every, g)
        # an all-zero initial state is the op's default: the rewrite drops it instead of linking
        # it (torch builds one zeros [layers * directions, B, hidden] for every layer of a stacked
        # RNN and slices it per layer, which would tie the layers' hidden sizes together)
        states = [(c.inp(k), 2, every, None) for k in (5, 6) if not _zero_state(c, c.inp(k))]
        spec = [(c.inp(1), 1, rows, None), (c.inp(2), 1, rows, None), (c.inp(2), 2, every, 2),
                (c.inp(3), 1, np.tile(every, 2 * g), None), *states,
                (c.inp(7), 1, np.tile(every, 3), None),
                (c.out(0), 3, every, None), (c.out(1), 2, every, None), (c.out(2), 2, every, None)]
        return [s for s in spec if s[0]]

    def sources(self, c):
        return [(c.inp(1), 1)]

    def propagate(self, c, tensor, axis):
        x, w = c.inp(0), c.inp(1)
        pair = (tensor, axis)
        if pair in ((x, 2), (w, 2)):  # input size: contracted by W
            other = (w, 2) if tensor == x else (x, 2)
            return [identity(pair, other, c.dim(tensor, axis), contracted=(c.index, 1))]
        spec = {(t, a): (hidden, slot) for t, a, hidden, slot in self._hidden_axes(c)}
        if pair not in spec:
            raise Frozen(f"{c.node.op_type}: channel on axis {axis} of '{tensor}'")
        hidden, _ = spec[pair]
        first = np.full(c.attr("hidden_size"), -1)
        for k in range(len(hidden) - 1, -1, -1):
            first[hidden[k]] = k
        links = [Link(pair, pair, first[hidden], np.arange(len(hidden)))]  # gate rows of unit j together
        for other, (other_hidden, slot) in spec.items():
            if other != pair:
                links.append(Link(pair, other, first[other_hidden], np.arange(len(other_hidden)),
                                  contracted=(c.index, slot) if slot is not None else None))
        return links

    def rewrite(self, c, plan):
        if plan.changed(c.inp(2), 2):
            plan.set_attr(c.node, "hidden_size", plan.new_dim(c.inp(2), 2))
            for k in (5, 6):
                if _zero_state(c, c.inp(k)):
                    plan.node(c.node).input[k] = ""  # omitted: zeros of the new hidden size


ZERO_VIEWS = ("Slice", "Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Expand", "Tile")


def _zero_state(c: Ctx, name, depth=0) -> bool:
    """Whether tensor `name` is all zeros whatever the inputs: a zero constant or a zero-filled
    ConstantOfShape, seen through views (Slice, Expand, Reshape, ...) of their data input."""
    if not name or depth > 8 or name in c.g.graph_inputs:
        return False
    value = c.const(name)
    if value is not None:
        return value.size > 0 and not np.any(value)
    index = c.g.producer.get(name)
    if index is None:
        return False
    node = c.g.nodes[index]
    if node.op_type == "ConstantOfShape":
        fill = attr(node, "value")
        return fill is None or not np.any(onnx.numpy_helper.to_array(fill))
    return node.op_type in ZERO_VIEWS and _zero_state(c, node.input[0], depth + 1)


@register
class ConstantLeaf(Rule):
    """A Constant node's value is sliced directly by the rewriter."""

    ops = ("Constant",)

    def propagate(self, c, tensor, axis):
        return []


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
    length = c.g.dim(vector, 0)
    bounds = [c.g.static_value(x) if x else None for x in list(node.input[1:5]) + [""] * 4][:4]
    if length is None or bounds[0] is None or bounds[1] is None or \
            (bounds[2] is not None and list(np.atleast_1d(bounds[2])) not in ([0], [-1])):
        return None
    step = int(np.atleast_1d(bounds[3])[0]) if bounds[3] is not None else 1
    kept = list(range(length))[slice(int(np.atleast_1d(bounds[0])[0]), int(np.atleast_1d(bounds[1])[0]), step)]
    return {k for k, p in enumerate(kept) if p in positions}


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}


def _used_as_number(c: Ctx, tensor, positions, depth=0) -> bool:
    """Whether elements `positions` (None: all) of a shape vector reach floating-point data (a
    Cast to float): such values must not follow the pruned size."""
    return _reaches(c, tensor, positions, _float_use) is not None


def _float_use(node, slot):
    if node.op_type == "Cast" and attr(node, "to") in FLOAT_TYPES:
        return True
    if node.op_type in PARAMETER_OPS and slot in PARAMETER_OPS[node.op_type]:
        return False  # a shape parameter follows the new sizes
    return None


def _sizes_another_reshape(c: Ctx, tensor, positions, source):
    """The name of a Reshape whose target shape takes elements `positions` of a shape vector
    read off `source`, when it reshapes another tensor than `source` (None if there is none)."""
    def use(node, slot):
        if node.op_type == "Reshape" and slot == 1:
            whole = _whole_shape_source(Ctx(c.g, c.g.producer[node.output[0]], c.options, c.virtual))
            return whole != source and not _viewed_from(c, node.input[0], source)  # whole: linked
        if node.op_type in PARAMETER_OPS and slot in PARAMETER_OPS[node.op_type]:
            return False
        return None
    hit = _reaches(c, tensor, positions, use)
    if hit is None or hit < 0:  # too deep to trace: the float check freezes that case
        return None
    return c.g.nodes[hit].name or c.g.nodes[hit].output[0]


VIEW_OPS = ("Unsqueeze", "Squeeze", "Transpose", "Expand", "Identity", "Cast", "Reshape", "Flatten")


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
