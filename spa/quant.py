"""Quantized models: the float value an integer weight stands for.

In a QDQ model (onnxruntime.quantization's QuantFormat.QDQ) a weight is an integer initializer
read by a DequantizeLinear: x = (q - zero_point) * scale, per tensor, per axis (`axis`) or per
block (`block_size`). In a QOperator model (QuantFormat.QOperator) QLinearConv, QLinearMatMul and
com.microsoft QGemm read it with their own scale and zero point inputs (per tensor, or per output
channel), and their int32 bias stands for bias * input scale * weight scale. Criteria score the
dequantized value; scales and zero points are quantization parameters, not weights (they are
sliced with the channel by the rules, never scored).
"""
from __future__ import annotations

import numpy as np

from .graph import Graph, attr

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# input slots of the scales and zero points of QOperator ops (QLinearConcat: param_slots)
QOPERATOR_PARAMS = {
    "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7), "QGemm": (1, 2, 4, 5, 7, 8),
    "QLinearAdd": (1, 2, 4, 5, 6, 7), "QLinearMul": (1, 2, 4, 5, 6, 7),
    "QLinearSigmoid": (1, 2, 3, 4), "QLinearLeakyRelu": (1, 2, 3, 4),
    "QLinearGlobalAveragePool": (1, 2, 3, 4), "QLinearAveragePool": (1, 2, 3, 4), "MatMulNBits": (2, 3),
    "QAttention": (3, 4, 6, 7), "DynamicQuantizeLSTM": (8, 9, 10, 11),
}
# integer weights of QOperator layers: weight slot -> (scale slot, zero point slot); MatMulInteger and
# ConvInteger (dynamic quantization) have no scale input: the float ops after them apply it
QOPERATOR_WEIGHTS = {"QLinearConv": {3: (4, 5)}, "QLinearMatMul": {0: (1, 2), 3: (4, 5)},
                     "QGemm": {0: (1, 2), 3: (4, 5)}, "MatMulInteger": {0: (None, 2), 1: (None, 3)},
                     "ConvInteger": {1: (None, 3)}, "QAttention": {1: (4, 7)},
                     "DynamicQuantizeLSTM": {1: (8, 9), 2: (10, 11)}}
# the right-hand (B) operand's slot of the matrix layers above
MATRIX_B = {"QLinearMatMul": 3, "QGemm": 3, "MatMulInteger": 1, "QAttention": 1}
# int32 biases of QOperator layers: bias slot -> (input scale slot, weight scale slot); zero point 0
QOPERATOR_BIASES = {"QLinearConv": {8: (1, 4)}, "QGemm": {6: (1, 4)}}


def param_slots(node) -> tuple:
    """Input slots of `node` that hold quantization scales and zero points."""
    if node.op_type in QDQ_OPS:
        return (1, 2)
    if node.op_type == "QLinearConcat":  # Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) triples
        return tuple(k for k in range(len(node.input)) if k < 2 or (k - 2) % 3)
    return QOPERATOR_PARAMS.get(node.op_type, ())


def is_quant_param(g: Graph, tensor: str) -> bool:
    """A scale or zero point of a QDQ or QOperator op (every reader)."""
    uses = g.consumers.get(tensor, [])
    return bool(uses) and all(slot in param_slots(g.nodes[i]) for i, slot in uses)


def dequantizer(g: Graph, tensor: str):
    """The DequantizeLinear node that reads constant `tensor` as its data, when that is its only
    reader and its scale (and zero point) are constants; else None."""
    uses = g.consumers.get(tensor, [])
    if len(uses) != 1 or uses[0][1] != 0:
        return None
    node = g.nodes[uses[0][0]]
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    params = [x for x in list(node.input)[1:3] if x]
    return node if all(x in g.consts for x in params) else None


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1,
               block_size: int = 0) -> np.ndarray:
    """(q - zero_point) * scale in float64, broadcast as DequantizeLinear does."""
    q = np.asarray(q).astype(np.float64)
    scale = np.asarray(scale).astype(np.float64)
    zero = np.zeros_like(scale) if zero_point is None else np.asarray(zero_point).astype(np.float64)
    if scale.ndim == 0 or scale.size == 1 and q.ndim == 0:
        return (q - zero.reshape(())) * scale.reshape(())
    axis = axis + q.ndim if axis < 0 else axis
    if block_size:
        scale = np.repeat(scale, block_size, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
        zero = np.repeat(zero, block_size, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
        return (q - zero) * scale
    if scale.ndim == q.ndim > 1:  # shaped to broadcast already (DynamicQuantizeLSTM: [directions, 1, 1 or 4 x hidden])
        return (q - zero) * scale
    if scale.size == 1:
        return (q - zero.reshape(())) * scale.reshape(())
    shape = [1] * q.ndim
    shape[axis] = scale.size
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def qoperator_params(g: Graph, tensor: str):
    """(scale, zero point or None, axis) that constant `tensor` is dequantized with as the weight or
    int32 bias of a QOperator layer (its only reader), with constant parameters; else None. A
    per-channel scale runs along the output channels: axis 0 of a QLinearConv weight or bias, N of a
    matrix weight (rows of a left-hand one)."""
    uses = g.consumers.get(tensor, [])
    if tensor not in g.consts or len(uses) != 1:
        return None
    node, slot = g.nodes[uses[0][0]], uses[0][1]

    def inputs(*slots):
        return [node.input[k] if k is not None and len(node.input) > k and node.input[k] else None for k in slots]

    rank = len(g.consts.shape(tensor))
    if slot in QOPERATOR_WEIGHTS.get(node.op_type, {}):
        scale_slot, zero_slot = QOPERATOR_WEIGHTS[node.op_type][slot]
        scale, zero = inputs(scale_slot, zero_slot)
        if node.op_type == "DynamicQuantizeLSTM":
            return _lstm_params(g, tensor, scale, zero)
        if node.op_type in ("QLinearConv", "ConvInteger"):
            axis = 0
        elif node.op_type == "QGemm" and slot == 3:
            axis = 0 if attr(node, "transB", 0) else 1
        else:
            axis = rank - 1 if slot == MATRIX_B[node.op_type] else rank - 2
        if zero is not None and zero not in g.consts:
            return None
        zero = None if zero is None else g.consts[zero]
        if scale_slot is None:
            return _scale_applied_after(g, node.output[0], zero), zero, axis
        return (g.consts[scale], zero, axis) if scale in g.consts else None
    if slot in QOPERATOR_BIASES.get(node.op_type, {}):
        x_scale, w_scale = inputs(*QOPERATOR_BIASES[node.op_type][slot])
        if x_scale in g.consts and w_scale in g.consts:
            return np.asarray(g.consts[x_scale]).reshape(()) * g.consts[w_scale], None, rank - 1
    return None


def dq_params(g: Graph, tensor: str):
    """(scale, zero point or None, axis) that integer constant `tensor` is dequantized with by the
    DequantizeLinear that is its only reader (a QDQ model's weight or int32 bias), per tensor or per
    axis with constant parameters; else None (blocked quantization too)."""
    node = dequantizer(g, tensor) if tensor in g.consts else None
    if node is None or np.asarray(g.consts[tensor]).dtype.kind not in "iu":
        return None
    scale, zero, axis, block_size = _dequantizer_params(g, node)
    if block_size:
        return None
    return scale, zero, axis + len(g.consts.shape(tensor)) if axis < 0 else axis


def _dequantizer_params(g: Graph, node) -> tuple:
    """(scale, zero point or None, axis, block size) of a DequantizeLinear with constant parameters."""
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return (g.consts[node.input[1]], None if zero is None else g.consts[zero], attr(node, "axis", 1),
            attr(node, "block_size", 0))


def grid_params(g: Graph, tensor: str):
    """(scale, zero point or None, axis) of an integer weight or bias, read by a QOperator or
    dynamically quantized layer or by a DequantizeLinear; else None."""
    return qoperator_params(g, tensor) or dq_params(g, tensor)


def _lstm_params(g: Graph, tensor: str, scale, zero):
    """(scale, zero point, 2) of a DynamicQuantizeLSTM weight W [directions, input, 4 x hidden] or R
    [directions, hidden, 4 x hidden]: one per direction or one per gate row and direction, shaped
    [directions, 1, 1 or 4 x hidden] to broadcast against it; None where they are not constants."""
    if scale not in g.consts or (zero is not None and zero not in g.consts):
        return None
    directions, rows = g.consts.shape(tensor)[0], g.consts.shape(tensor)[2]

    def shaped(p):
        p = np.asarray(g.consts[p])
        return p.reshape(directions, 1, rows if p.size == directions * rows else 1)

    return shaped(scale), None if zero is None else shaped(zero), 2


def _scale_applied_after(g: Graph, product: str, zero) -> np.ndarray:
    """The weight scale of a MatMulInteger / ConvInteger, which quantize_dynamic applies after it:
    Cast(float) -> Mul(·, Mul(input scale, weight scale)), the weight scale a constant scalar or one
    per channel (the zero point's shape); ones (scores in integer steps) where the graph differs."""
    unit = np.ones(np.shape(zero) if zero is not None else (), np.float32)
    cast = _only_reader(g, product, "Cast")
    mul = cast and _only_reader(g, cast.output[0], "Mul")
    if not mul:
        return unit
    factor = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    scaling = g.nodes[g.producer[factor]] if factor in g.producer else None
    if scaling is None or scaling.op_type != "Mul":
        return unit
    scales = [np.asarray(g.consts[x]) for x in scaling.input if x in g.consts]
    fits = [s for s in scales if s.size == 1 or s.shape == np.shape(zero)]
    return fits[0].astype(np.float32) if len(fits) == 1 else unit


def _only_reader(g: Graph, tensor: str, op_type: str):
    uses = g.consumers.get(tensor, [])
    node = g.nodes[uses[0][0]] if len(uses) == 1 else None
    return node if node is not None and node.op_type == op_type else None


def weight_value(g: Graph, tensor: str) -> np.ndarray:
    """The value constant `tensor` stands for, for scoring: dequantized (float64) when a
    DequantizeLinear, a QOperator layer or a MatMulNBits reads it; float32 / float64 as stored; any
    other type (float16, bfloat16, integers) in float64, so that squares and absolute values neither
    overflow nor wrap."""
    packed = nbits_reader(g, tensor)
    if packed is not None:
        return nbits_weight(g, packed)
    node = dequantizer(g, tensor)
    if node is not None:
        return dequantize(g.consts[tensor], *_dequantizer_params(g, node))
    params = qoperator_params(g, tensor)
    if params is not None:
        return dequantize(g.consts[tensor], *params)
    value = g.consts[tensor]
    return value if value.dtype in (np.float32, np.float64) else np.asarray(value).astype(np.float64)


def quantized_source(g: Graph, tensor: str) -> str | None:
    """The integer constant that `tensor`, a DequantizeLinear output, dequantizes (with constant
    scale and zero point), or None."""
    if tensor not in g.producer:
        return None
    node = g.nodes[g.producer[tensor]]
    if node.op_type != "DequantizeLinear" or node.input[0] not in g.consts:
        return None
    return node.input[0] if dequantizer(g, node.input[0]) is node else None


def integer_conv_weights(g: Graph) -> dict:
    """{integer weight: whether its conv is depthwise} of the convs that run on integers: QLinearConv,
    ConvInteger, and a Conv whose weight and input both come from DequantizeLinear (the QDQ pattern
    onnxruntime runs as a QLinearConv). onnxruntime's symmetric int8 kernels (MLAS, `MlasConvSymPackWSize`)
    take a depthwise conv of a multiple of 16 channels only on x86 (8 on ARM64), and any other conv whose
    input channels are a multiple of 4; other widths run slower generic kernels (docs/latency.md)."""
    found = {}
    for node in g.nodes:
        slot = {"QLinearConv": 3, "ConvInteger": 1, "Conv": 1}.get(node.op_type)
        if slot is None or len(node.input) <= slot or node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        weight = node.input[slot]
        if node.op_type == "Conv":
            source = g.producer.get(node.input[0])
            weight = quantized_source(g, weight)
            if weight is None or source is None or g.nodes[source].op_type != "DequantizeLinear":
                continue
        shape = g.consts.shape(weight) if weight in g.consts else None
        if shape is not None and len(shape) > 2:
            found[weight] = shape[1] == 1 and attr(node, "group", 1) == shape[0] > 1
    return found


def is_integer_weight(g: Graph, tensor: str) -> bool:
    """An integer constant that a QOperator, dynamically quantized or MatMulNBits layer reads as its
    weight, or a DequantizeLinear (a QDQ model's weight or bias)."""
    return tensor in g.consts and np.asarray(g.consts[tensor]).dtype.kind in "iu" \
        and (grid_params(g, tensor) is not None or nbits_reader(g, tensor) is not None)


def as_float(g: Graph, tensor: str, stored: np.ndarray) -> np.ndarray:
    """What `stored`, a value of constant `tensor`, stands for: dequantized for an integer weight (a
    MatMulNBits weight as the [N, K] matrix its packed blocks hold)."""
    if not is_integer_weight(g, tensor):
        return stored
    packed = nbits_reader(g, tensor)
    if packed is not None:
        value = nbits_weight(g, packed, stored)
        return value.reshape(len(value), -1)[:, :attr(packed, "K")]
    return dequantize(stored, *grid_params(g, tensor))


def weight_grid(g: Graph, tensor: str) -> tuple:
    """(scale, zero point, lowest, highest integer) of integer weight `tensor` as its layer's OBS
    matrices hold it, rows the output channels: scale and zero point one per row (or one for all),
    or for a MatMulNBits one per weight ([N, K], a scale per block)."""
    packed = nbits_reader(g, tensor)
    if packed is not None:
        return (*_nbits_grid(g, packed), 0, (1 << attr(packed, "bits", 4)) - 1)
    scale, zero, _ = grid_params(g, tensor)
    limits = np.iinfo(np.asarray(g.consts[tensor]).dtype)
    zero = np.zeros(1) if zero is None else np.asarray(zero, np.float64).reshape(-1)
    return np.asarray(scale, np.float64).reshape(-1), zero, limits.min, limits.max


def requantized(g: Graph, tensor: str, value: np.ndarray) -> np.ndarray:
    """Float `value` on integer weight `tensor`'s grid: round(value / scale) + zero point, clipped to
    its integer type (an OBS update of a dynamically quantized layer, written back as integers; of a
    MatMulNBits, packed as its weight)."""
    packed = nbits_reader(g, tensor)
    if packed is not None:
        return _nbits_requantized(g, packed, value)
    value = np.asarray(value, np.float64)
    scale, zero, lowest, highest = stored_grid(g, tensor, value.ndim)
    dtype = np.asarray(g.consts[tensor]).dtype
    return np.clip(np.rint(value / scale) + zero, lowest, highest).astype(dtype)


def stored_grid(g: Graph, tensor: str, rank: int | None = None) -> tuple:
    """(scale, zero point, lowest, highest integer) of integer weight `tensor` (not a MatMulNBits one)
    as stored, scale and zero point shaped to broadcast against a value of its rank (float64)."""
    scale, zero, axis = grid_params(g, tensor)
    rank = len(g.consts.shape(tensor)) if rank is None else rank

    def along(p):
        p = np.asarray(0.0 if p is None else p, np.float64)
        if p.ndim == rank:  # shaped to broadcast already
            return p
        if p.size <= 1:
            return p.reshape(())
        shape = [1] * rank
        shape[axis] = p.size
        return p.reshape(shape)

    limits = np.iinfo(np.asarray(g.consts[tensor]).dtype)
    return along(scale), along(zero), limits.min, limits.max


def stored_value(g: Graph, tensor: str, value: np.ndarray) -> np.ndarray:
    """A new float `value` of constant `tensor` as it is stored: on its integer grid for an integer weight
    (`requantized`: a zero at the zero point, exactly), else in its own dtype."""
    if is_integer_weight(g, tensor):
        return requantized(g, tensor, value)
    return np.asarray(value).astype(np.asarray(g.consts[tensor]).dtype)


def float_shape(g: Graph, tensor: str) -> tuple:
    """The shape of the float weight constant `tensor` stands for: a MatMulNBits' [N, K] (its codes are
    packed in blocks), any other as stored."""
    packed = nbits_reader(g, tensor)
    return (attr(packed, "N"), attr(packed, "K")) if packed is not None else tuple(g.consts.shape(tensor))


def layer_value(g: Graph, tensor: str) -> np.ndarray:
    """A layer's weight: a float constant, or the dequantized value of an integer one (a
    DequantizeLinear's, or a QOperator / dynamically quantized / MatMulNBits layer's: as_float)."""
    if tensor in g.consts:
        return as_float(g, tensor, g.consts[tensor])
    return weight_value(g, quantized_source(g, tensor))


def at_zero_point(g: Graph, tensor: str, axis: int, removed, value=None) -> np.ndarray | None:
    """The integer weight `tensor` of a QOperator layer (or its compensated `value`) with slices
    `removed` of `axis` set to its zero point (the integer that dequantizes to 0), or None when
    `tensor` is no such weight."""
    params = qoperator_params(g, tensor)
    if params is None:
        return None
    q = np.array(g.consts[tensor] if value is None else value)
    _, zero, zero_axis = params
    if zero is not None and np.size(zero) > 1 and np.ndim(zero) != q.ndim:
        shape = [1] * q.ndim
        shape[zero_axis] = np.size(zero)
        zero = np.reshape(zero, shape)
    zeros = np.broadcast_to(np.zeros((), q.dtype) if zero is None else np.asarray(zero, q.dtype), q.shape)
    np.moveaxis(q, axis, 0)[removed] = np.moveaxis(zeros, axis, 0)[removed]
    return q


# ----------------------------------------------------------------------------------------------
# com.microsoft MatMulNBits (onnxruntime-genai's and MatMulNBitsQuantizer's 2-, 4- and 8-bit
# weights): A [..., K] x B, B packed as uint8 [N, blocks, block_size * bits / 8], codes low bits
# first along K, one scale (and zero point) per block: w = (code - zero_point) * scale


def nbits_reader(g: Graph, tensor: str):
    """The MatMulNBits node that reads constant `tensor` as its packed weight B (its only reader),
    with constant scales and zero points (`nbits_blocks`); else None."""
    uses = g.consumers.get(tensor, [])
    if tensor not in g.consts or len(uses) != 1 or uses[0][1] != 1:
        return None
    node = g.nodes[uses[0][0]]
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return None
    return node if nbits_blocks(g, node) is not None else None


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit codes packed low bits first into the uint8 last axis, unpacked along it."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """`unpack_bits`' inverse; the last axis is padded with zero codes to whole bytes."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes
    per_byte = 8 // bits
    codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, -codes.shape[-1] % per_byte)])
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte) << np.arange(0, 8, bits, dtype=np.uint8)
    return np.bitwise_or.reduce(codes, axis=-1).astype(np.uint8)


def nbits_blocks(g: Graph, node) -> tuple:
    """(scales, zero points) of MatMulNBits `node`, each [N, blocks] (zero points as codes or, where
    they are stored as floats, floats; the default 2^(bits-1) where absent); None where either is
    computed or has a size that fits neither layout."""
    n, bits = attr(node, "N"), attr(node, "bits", 4)
    blocks = g.consts.shape(node.input[1])[1]
    scale, zero = node.input[2], node.input[3] if len(node.input) > 3 else ""
    if scale not in g.consts or (zero and zero not in g.consts) or np.size(g.consts[scale]) != n * blocks:
        return None
    scales = np.asarray(g.consts[scale]).reshape(n, blocks)
    if not zero:
        return scales, np.full((n, blocks), 1 << (bits - 1), np.uint8)
    stored = np.asarray(g.consts[zero])
    if stored.dtype == np.uint8 and stored.size == n * -(-blocks * bits // 8):
        return scales, unpack_bits(stored.reshape(n, -1), bits)[:, :blocks]
    if stored.dtype == scales.dtype and stored.size == n * blocks:
        return scales, stored.reshape(n, blocks)
    return None


def nbits_weight(g: Graph, node, packed: np.ndarray | None = None) -> np.ndarray:
    """The float64 value of MatMulNBits `node`'s weight (or of `packed` codes in its place), laid out
    as its B: [N, blocks, block_size], the last block zero past K."""
    scales, zero = nbits_blocks(g, node)
    codes = unpack_bits(g.consts[node.input[1]] if packed is None else packed, attr(node, "bits", 4))
    value = (codes - np.asarray(zero, np.float64)[..., None]) * np.asarray(scales, np.float64)[..., None]
    past_k = np.arange(value.shape[1] * value.shape[2]).reshape(value.shape[1:]) >= attr(node, "K")
    value[:, past_k] = 0.0
    return value


def _nbits_grid(g: Graph, node) -> tuple:
    """(scale, zero point) of every weight of MatMulNBits `node`, each [N, K]."""
    scales, zero = nbits_blocks(g, node)
    size, k = attr(node, "block_size"), attr(node, "K")
    return tuple(np.repeat(np.asarray(p, np.float64), size, axis=1)[:, :k] for p in (scales, zero))


def _nbits_requantized(g: Graph, node, value: np.ndarray) -> np.ndarray:
    """A float [N, K] weight on MatMulNBits `node`'s grid (its scales and zero points), packed as its B."""
    scale, zero = _nbits_grid(g, node)
    bits, shape = attr(node, "bits", 4), g.consts.shape(node.input[1])
    codes = np.clip(np.rint(np.asarray(value, np.float64) / scale) + zero, 0, (1 << bits) - 1).astype(np.uint8)
    codes = np.pad(codes, [(0, 0), (0, shape[1] * shape[2] * 8 // bits - codes.shape[1])])
    return pack_bits(codes.reshape(shape[0], shape[1], -1), bits)
