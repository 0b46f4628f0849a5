"""Quantized (QDQ) models: the float value an integer weight stands for.

In a QDQ model (onnxruntime.quantization's QuantFormat.QDQ) a weight is an integer initializer
read by a DequantizeLinear: x = (q - zero_point) * scale, per tensor, per axis (`axis`) or per
block (`block_size`). Criteria score the dequantized value; the scale and zero point are
quantization parameters, not weights (they are sliced with the channel by the rules, never scored).
"""
from __future__ import annotations

import numpy as np

from .graph import Graph, attr

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def is_quant_param(g: Graph, tensor: str) -> bool:
    """A scale or zero point of QuantizeLinear / DequantizeLinear (every reader)."""
    uses = g.consumers.get(tensor, [])
    return bool(uses) and all(g.nodes[i].op_type in QDQ_OPS and slot >= 1 for i, slot in uses)


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
    if scale.size == 1:
        return (q - zero.reshape(())) * scale.reshape(())
    shape = [1] * q.ndim
    shape[axis] = scale.size
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def weight_value(g: Graph, tensor: str) -> np.ndarray:
    """The value constant `tensor` stands for, for scoring: dequantized (float64) when a
    DequantizeLinear reads it; float32 / float64 as stored; any other type (float16, bfloat16,
    integers) in float64, so that squares and absolute values neither overflow nor wrap."""
    node = dequantizer(g, tensor)
    if node is None:
        value = g.consts[tensor]
        return value if value.dtype in (np.float32, np.float64) else np.asarray(value).astype(np.float64)
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return dequantize(g.consts[tensor], g.consts[node.input[1]], None if zero is None else g.consts[zero],
                      attr(node, "axis", 1), attr(node, "block_size", 0))


def quantized_source(g: Graph, tensor: str) -> str | None:
    """The integer constant that `tensor`, a DequantizeLinear output, dequantizes (with constant
    scale and zero point), or None."""
    if tensor not in g.producer:
        return None
    node = g.nodes[g.producer[tensor]]
    if node.op_type != "DequantizeLinear" or node.input[0] not in g.consts:
        return None
    return node.input[0] if dequantizer(g, node.input[0]) is node else None


def layer_value(g: Graph, tensor: str) -> np.ndarray:
    """A layer's weight: a constant, or the dequantized constant behind a DequantizeLinear."""
    return g.consts[tensor] if tensor in g.consts else weight_value(g, quantized_source(g, tensor))
