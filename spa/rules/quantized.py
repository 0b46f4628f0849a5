"""Quantized ops: QDQ (QuantizeLinear / DequantizeLinear), dynamic quantization
(DynamicQuantizeLinear, MatMulInteger, ConvInteger) and QOperator layers, which reuse the float
rules of their family."""
from __future__ import annotations

import numpy as np

from ..quant import nbits_blocks, pack_bits, param_slots
from . import Ctx, Frozen, Link, Rule, identity, register
from .axis import Spatial
from .elementwise import Broadcast, Unary
from .joins import Concat
from .layers import ConvRule, GemmRule, MatMulRule


@register
class QuantizeDequantize(Rule):
    """QuantizeLinear / DequantizeLinear (QDQ models): element-wise on the data input. A per-axis
    scale / zero point (1-D, along `axis`) is sliced with a channel on that axis and untouched by a
    channel on any other; a per-tensor one is untouched. Blocked quantization (`block_size`) shares
    every axis but the blocked one with the data; a channel on the blocked axis is frozen (whole
    blocks only would keep it exact)."""

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
class DynamicQuantize(Rule):
    """DynamicQuantizeLinear (onnxruntime's quantize_dynamic): element-wise from x to the quantized
    y; its scale and zero point come from the whole tensor's range, which always includes 0, so
    zeroing a channel of x leaves them as removing it does: exact against the oracle, which zeroes
    x's removed slices here (a contracted input of this node)."""

    ops = ("DynamicQuantizeLinear",)

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if tensor not in (x, y):
            raise Frozen(f"DynamicQuantizeLinear: channel on its scale or zero point '{tensor}'")
        other = (y, axis) if tensor == x else (x, axis)
        return [identity((tensor, axis), other, c.dim(tensor, axis), contracted=(c.index, 0))]


@register
class MatMulIntegerRule(MatMulRule):
    """MatMulInteger (a, b, a_zero_point, b_zero_point), as quantize_dynamic writes it after a
    DynamicQuantizeLinear: MatMul's channel map on a, b and y; a per-column b_zero_point is sliced
    with N; a_zero_point must be per-tensor. The int32 product's scale is applied by the float ops
    after it (Cast, Mul), whose rules slice a per-column weight scale."""

    ops = ("MatMulInteger",)

    def contracted(self, c, slot):
        return integer_weight(c, slot)

    def propagate(self, c, tensor, axis):
        per_tensor(c, (2,))
        return super().propagate(c, tensor, axis)

    def params(self, c):
        b = c.inp(self.B)
        return dict.fromkeys(channel_params(c, (3,), c.dim(b, c.rank(b) - 1)), "n")


@register
class ConvIntegerRule(ConvRule):
    """ConvInteger (x, w, x_zero_point, w_zero_point): Conv's channel map on x, w and y (grouped and
    depthwise too); a per-channel w_zero_point is sliced with the output channel, x_zero_point must
    be per-tensor."""

    ops = ("ConvInteger",)
    X, W, B = 0, 1, 4  # no bias input

    def propagate(self, c, tensor, axis):
        per_tensor(c, (2,))
        return super().propagate(c, tensor, axis)

    def contracted(self, c):
        return integer_weight(c, self.W)

    def out_params(self, c, c_out):
        return channel_params(c, (3,), c_out)


@register
class MatMulNBitsRule(Rule):
    """com.microsoft MatMulNBits (A, B, scales, [zero_points], [g_idx], [bias]), the 2-, 4- and
    8-bit weights of onnxruntime-genai's LLM exports and of MatMulNBitsQuantizer: y = A [..., K]
    times the dequantized B, packed as [N, blocks, block_size * bits / 8] with one scale and zero
    point per block. An output channel is row n of B, scales, zero points and bias. Input channels
    go in whole blocks (units of block_size channels): a block's channels share its scale, so only
    removing all of them keeps every other code and scale exact. The oracle zeroes their slices of A.
    Scales and zero points (packed along the blocks) are rewritten with the plan; act-order weights
    (g_idx) are frozen."""

    domain = "com.microsoft"
    ops = ("MatMulNBits",)

    def sources(self, c):  # the weight's rows, whose shape is known even where y's is not
        return [(c.inp(1), 0)] if c.inp(1) in c.g.consts else []

    def propagate(self, c, tensor, axis):
        a, b, y, bias = c.inp(0), c.inp(1), c.out(0), c.inp(5)
        if b not in c.g.consts or c.rank(b) != 3:
            raise Frozen(f"MatMulNBits: weight '{b}' is computed or not [N, blocks, bytes]")
        if c.inp(4):
            raise Frozen("MatMulNBits: act-order weights (g_idx) mix blocks across the input channels")
        if nbits_blocks(c.g, c.node) is None:
            raise Frozen("MatMulNBits: scales or zero points computed or of an unknown size")
        pair, last = (tensor, axis), c.rank(y) - 1
        outputs = [(y, last), (b, 0)] + ([(bias, 0)] if bias else [])
        if pair in outputs:
            return [identity(pair, p, c.dim(tensor, axis)) for p in outputs if p != pair]
        channels = np.arange(c.attr("K"))
        block_of = channels // c.attr("block_size")
        if pair == (a, last):
            return [Link(pair, (b, 1), channels, block_of, contracted=(c.index, 0), unit="block")]
        if pair == (b, 1):
            return [Link(pair, (a, last), block_of, channels, contracted=(c.index, 0), unit="block")]
        if tensor in (a, y) and axis < last:  # a batch axis
            other = y if tensor == a else a
            return [identity(pair, (other, axis), c.dim(tensor, axis))]
        raise Frozen(f"MatMulNBits: channel on axis {axis} of '{tensor}'")

    def rewrite(self, c, plan):
        a, b = c.inp(0), c.inp(1)
        rows, blocks = plan.kept(b, 0), plan.kept(b, 1)
        plan.set_attr(c.node, "N", len(rows))
        plan.set_attr(c.node, "K", plan.new_dim(a, c.rank(a) - 1))
        scales, zero = nbits_blocks(c.g, c.node)
        kept = np.ix_(rows, blocks)
        plan.set_input(c.node, 2, scales[kept].reshape(-1) if c.rank(c.inp(2)) == 1 else scales[kept])
        if c.inp(3):
            stored = c.const(c.inp(3))
            zero = pack_bits(zero[kept], c.attr("bits", 4)) if stored.dtype == np.uint8 else zero[kept]
            plan.set_input(c.node, 3, zero.reshape(-1) if stored.ndim == 1 else zero)


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
