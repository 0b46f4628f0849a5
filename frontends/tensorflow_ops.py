"""ONNX operators as TensorFlow ops, in ONNX's layout (NCHW: convolutions and pools transpose to
NHWC and back, as TensorFlow's CPU kernels need). OPS: op type -> fn(node, *inputs)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from spa.errors import SpaError

from .tensorflow_export import _tf


class _Node:
    """Attribute access for one ONNX node."""

    def __init__(self, node, opset):
        self.node, self.opset = node, opset
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def __call__(self, name, default=None):
        value = self.attrs.get(name, default)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return [v.decode() for v in value]
        return value

    @property
    def name(self):
        return self.node.name or self.node.op_type


OPS = {}


def op(*names):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn
    return register


def _as_tensor(x):
    return _tf().convert_to_tensor(x)


def _static(x):
    """Python/numpy value of a tensor known at trace time, else None."""
    if x is None:
        return None
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.asarray(x)
    value = _tf().get_static_value(x)
    return None if value is None else np.asarray(value)


def _ints(x, node, what):
    value = _static(x)
    if value is None:
        raise SpaError(f"from_onnx: {node.node.op_type} '{node.name}' needs a constant {what}")
    return [int(v) for v in np.atleast_1d(value)]


def _axes(node, x, slot_value, attr="axes"):
    """Axes from the attribute (older opsets) or the input (newer)."""
    if slot_value is not None:
        return _ints(slot_value, node, "axes")
    return node(attr)


def _rank(x):
    return len(_as_tensor(x).shape)


# ---- element-wise -----------------------------------------------------------------------------
def _binary(fn):
    def run(node, a, b):
        tf = _tf()
        a, b = _as_tensor(a), _as_tensor(b)
        if a.dtype != b.dtype:
            b = tf.cast(b, a.dtype)
        return fn(a, b)
    return run


def _unary(fn):
    return lambda node, x, *rest: fn(_as_tensor(x))


def register_elementwise():
    tf = _tf()
    binaries = {
        "Add": tf.add, "Sub": tf.subtract, "Mul": tf.multiply, "Pow": tf.pow,
        "Equal": tf.equal, "Less": tf.less, "Greater": tf.greater, "LessOrEqual": tf.less_equal,
        "GreaterOrEqual": tf.greater_equal, "And": tf.logical_and, "Or": tf.logical_or,
        "Xor": tf.math.logical_xor, "BitShift": None,
    }
    for name, fn in binaries.items():
        if fn is not None:
            OPS[name] = _binary(fn)
    unaries = {
        "Neg": tf.negative, "Abs": tf.abs, "Exp": tf.exp, "Log": tf.math.log, "Sqrt": tf.sqrt,
        "Reciprocal": tf.math.reciprocal, "Sin": tf.sin, "Cos": tf.cos, "Tanh": tf.tanh,
        "Sigmoid": tf.sigmoid, "Relu": tf.nn.relu, "Erf": tf.math.erf, "Floor": tf.floor,
        "Ceil": tf.math.ceil, "Round": tf.round, "Not": tf.logical_not, "IsNaN": tf.math.is_nan,
        "Sign": tf.sign, "Softplus": tf.nn.softplus, "Softsign": tf.nn.softsign,
        "Identity": tf.identity, "Tan": tf.tan, "Atan": tf.atan, "Asin": tf.asin, "Acos": tf.acos,
        "Sinh": tf.sinh, "Cosh": tf.cosh,
    }
    for name, fn in unaries.items():
        OPS[name] = _unary(fn)


@op("Div")
def _div(node, a, b):
    tf = _tf()
    a, b = _as_tensor(a), _as_tensor(b)
    b = tf.cast(b, a.dtype) if a.dtype != b.dtype else b
    return tf.truncatediv(a, b) if a.dtype.is_integer else a / b


@op("Mod")
def _mod(node, a, b):
    tf = _tf()
    a, b = _as_tensor(a), _as_tensor(b)
    return tf.math.truncatemod(a, b) if node("fmod", 0) else tf.math.floormod(a, b)


@op("Max", "Min", "Sum", "Mean")
def _variadic(node, *xs):
    tf = _tf()
    xs = [_as_tensor(x) for x in xs]
    fn = {"Max": tf.maximum, "Min": tf.minimum, "Sum": tf.add, "Mean": tf.add}[node.node.op_type]
    result = xs[0]
    for x in xs[1:]:
        result = fn(result, tf.cast(x, result.dtype))
    return result / len(xs) if node.node.op_type == "Mean" else result


@op("IsInf")
def _isinf(node, x):
    tf = _tf()
    x = _as_tensor(x)
    pos = tf.logical_and(tf.math.is_inf(x), x > 0) if node("detect_positive", 1) else tf.zeros_like(x, tf.bool)
    neg = tf.logical_and(tf.math.is_inf(x), x < 0) if node("detect_negative", 1) else tf.zeros_like(x, tf.bool)
    return tf.logical_or(pos, neg)


@op("Where")
def _where(node, cond, a, b):
    tf = _tf()
    a, b = _as_tensor(a), _as_tensor(b)
    return tf.where(_as_tensor(cond), a, tf.cast(b, a.dtype))


@op("Clip")
def _clip(node, x, low=None, high=None):
    tf = _tf()
    x = _as_tensor(x)
    low = node("min") if low is None and node.opset < 11 else low
    high = node("max") if high is None and node.opset < 11 else high
    if low is not None:
        x = tf.maximum(x, tf.cast(low, x.dtype))
    if high is not None:
        x = tf.minimum(x, tf.cast(high, x.dtype))
    return x


@op("LeakyRelu")
def _leaky(node, x):
    return _tf().nn.leaky_relu(_as_tensor(x), alpha=node("alpha", 0.01))


@op("Elu")
def _elu(node, x):
    tf = _tf()
    x = _as_tensor(x)
    return tf.where(x > 0, x, node("alpha", 1.0) * (tf.exp(x) - 1))


@op("Selu")
def _selu(node, x):
    tf = _tf()
    x = _as_tensor(x)
    alpha, gamma = node("alpha", 1.67326319217681884765625), node("gamma", 1.05070102214813232421875)
    return gamma * tf.where(x > 0, x, alpha * (tf.exp(x) - 1))


@op("HardSigmoid")
def _hard_sigmoid(node, x):
    tf = _tf()
    return tf.clip_by_value(node("alpha", 0.2) * _as_tensor(x) + node("beta", 0.5), 0.0, 1.0)


@op("HardSwish")
def _hard_swish(node, x):
    tf = _tf()
    x = _as_tensor(x)
    return x * tf.clip_by_value(x / 6.0 + 0.5, 0.0, 1.0)


@op("Gelu")
def _gelu(node, x):
    return _tf().nn.gelu(_as_tensor(x), approximate=node("approximate", "none") == "tanh")


@op("PRelu")
def _prelu(node, x, slope):
    tf = _tf()
    x = _as_tensor(x)
    return tf.where(x >= 0, x, x * tf.cast(slope, x.dtype))


@op("Cast")
def _cast(node, x):
    return _tf().cast(_as_tensor(x), _TF_TYPES()[node("to")])


@op("CastLike")
def _cast_like(node, x, like):
    return _tf().cast(_as_tensor(x), _as_tensor(like).dtype)


def _TF_TYPES():  # noqa: N802
    tf = _tf()
    T = onnx.TensorProto
    return {T.FLOAT: tf.float32, T.DOUBLE: tf.float64, T.FLOAT16: tf.float16, T.INT64: tf.int64,
            T.INT32: tf.int32, T.INT8: tf.int8, T.UINT8: tf.uint8, T.BOOL: tf.bool,
            T.INT16: tf.int16, T.BFLOAT16: tf.bfloat16}


@op("Dropout")
def _dropout(node, x, *rest):
    tf = _tf()
    x = _as_tensor(x)
    return x, tf.ones_like(x, dtype=tf.bool)


# ---- reductions, softmax, norms -----------------------------------------------------------------
@op("Softmax", "LogSoftmax")
def _softmax(node, x):
    tf = _tf()
    x = _as_tensor(x)
    axis = node("axis", -1 if node.opset >= 13 else 1)
    if node.opset < 13 and axis % _rank(x) != _rank(x) - 1:
        raise SpaError(f"from_onnx: {node.node.op_type} before opset 13 over a non-last axis")
    fn = tf.nn.softmax if node.node.op_type == "Softmax" else tf.nn.log_softmax
    return fn(x, axis=axis)


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
    "ReduceSumSquare", "ReduceLogSumExp")
def _reduce(node, x, axes=None):
    tf = _tf()
    x = _as_tensor(x)
    kind = node.node.op_type
    from_input = kind == "ReduceSum" and node.opset >= 13 or node.opset >= 18
    axes = _ints(axes, node, "axes") if (from_input and axes is not None) else (None if from_input else node("axes"))
    if not axes:
        if node("noop_with_empty_axes", 0):
            return x
        axes = list(range(_rank(x)))
    keep = bool(node("keepdims", 1))
    fns = {"ReduceMean": tf.reduce_mean, "ReduceSum": tf.reduce_sum, "ReduceMax": tf.reduce_max,
           "ReduceMin": tf.reduce_min, "ReduceProd": tf.reduce_prod,
           "ReduceLogSumExp": tf.reduce_logsumexp}
    if kind in fns:
        return fns[kind](x, axis=axes, keepdims=keep)
    if kind == "ReduceL2":
        return tf.sqrt(tf.reduce_sum(x * x, axis=axes, keepdims=keep))
    if kind == "ReduceL1":
        return tf.reduce_sum(tf.abs(x), axis=axes, keepdims=keep)
    return tf.reduce_sum(x * x, axis=axes, keepdims=keep)


@op("ArgMax", "ArgMin")
def _argmax(node, x):
    tf = _tf()
    axis = node("axis", 0)
    fn = tf.argmax if node.node.op_type == "ArgMax" else tf.argmin
    out = fn(_as_tensor(x), axis=axis, output_type=tf.int64)
    return tf.expand_dims(out, axis) if node("keepdims", 1) else out


def _channel_shape(x, axis=1):
    shape = [1] * _rank(x)
    shape[axis] = -1
    return shape


@op("BatchNormalization")
def _batch_norm(node, x, scale, bias, mean, var):
    tf = _tf()
    x = _as_tensor(x)
    eps = node("epsilon", 1e-5)
    shape = _channel_shape(x)
    axes = [a for a in range(_rank(x)) if a != 1]
    if node("training_mode", 0):
        batch_mean, batch_var = tf.nn.moments(x, axes=axes)
        momentum = node("momentum", 0.9)
        y = _normalize(x, batch_mean, batch_var, scale, bias, eps, shape)
        count = tf.cast(tf.size(x) // tf.shape(x)[1], x.dtype)
        unbiased = batch_var * count / tf.maximum(count - 1, 1)
        return (y, mean * momentum + batch_mean * (1 - momentum),
                var * momentum + unbiased * (1 - momentum))
    return _normalize(x, mean, var, scale, bias, eps, shape)


def _normalize(x, mean, var, scale, bias, eps, shape):
    tf = _tf()
    inv = tf.math.rsqrt(tf.reshape(var, shape) + eps) * tf.reshape(scale, shape)
    return (x - tf.reshape(mean, shape)) * inv + tf.reshape(bias, shape)


@op("InstanceNormalization")
def _instance_norm(node, x, scale, bias):
    tf = _tf()
    x = _as_tensor(x)
    axes = list(range(2, _rank(x)))
    mean, var = tf.nn.moments(x, axes=axes, keepdims=True)
    shape = _channel_shape(x)
    return (x - mean) * tf.math.rsqrt(var + node("epsilon", 1e-5)) * tf.reshape(scale, shape) + \
        tf.reshape(bias, shape)


@op("LayerNormalization")
def _layer_norm(node, x, scale, bias=None):
    tf = _tf()
    x = _as_tensor(x)
    axis = node("axis", -1) % _rank(x)
    mean, var = tf.nn.moments(x, axes=list(range(axis, _rank(x))), keepdims=True)
    y = (x - mean) * tf.math.rsqrt(var + node("epsilon", 1e-5)) * scale
    return y + bias if bias is not None else y


@op("GroupNormalization")
def _group_norm(node, x, scale, bias):
    tf = _tf()
    x = _as_tensor(x)
    groups = node("num_groups")
    shape = tf.shape(x)
    grouped = tf.reshape(x, tf.concat([[shape[0], groups, -1]], axis=0))
    mean, var = tf.nn.moments(grouped, axes=[2], keepdims=True)
    y = tf.reshape((grouped - mean) * tf.math.rsqrt(var + node("epsilon", 1e-5)), shape)
    channels = x.shape[1]
    if node.opset < 21 and scale.shape[0] != channels:  # opset 18: one scale per group
        scale = tf.repeat(scale, channels // groups)
        bias = tf.repeat(bias, channels // groups)
    cshape = _channel_shape(x)
    return y * tf.reshape(scale, cshape) + tf.reshape(bias, cshape)


# ---- linear algebra -----------------------------------------------------------------------------
@op("MatMul")
def _matmul(node, a, b):
    tf = _tf()
    a, b = _as_tensor(a), _as_tensor(b)
    if _rank(a) == 1 or _rank(b) == 1:
        return tf.experimental.numpy.matmul(a, b)
    return tf.linalg.matmul(a, b)


@op("Gemm")
def _gemm(node, a, b, c=None):
    tf = _tf()
    y = tf.linalg.matmul(_as_tensor(a), _as_tensor(b), transpose_a=bool(node("transA", 0)),
                         transpose_b=bool(node("transB", 0)))
    y = y * node("alpha", 1.0) if node("alpha", 1.0) != 1.0 else y
    if c is not None:
        y = y + node("beta", 1.0) * _as_tensor(c)
    return y


@op("Einsum")
def _einsum(node, *xs):
    return _tf().einsum(node("equation"), *[_as_tensor(x) for x in xs])


# ---- convolution and pooling (NCHW in ONNX, NHWC for TensorFlow) ---------------------------------
def _to_nhwc(x):
    rank = _rank(x)
    return _tf().transpose(x, [0] + list(range(2, rank)) + [1])


def _to_nchw(x):
    rank = _rank(x)
    return _tf().transpose(x, [0, rank - 1] + list(range(1, rank - 1)))


def _conv_pads(node, x_spatial, kernel, strides, dilations):
    """(begin, end) explicit pads per spatial axis, auto_pad resolved."""
    auto = node("auto_pad", "NOTSET")
    n = len(kernel)
    if auto in ("NOTSET", ""):
        pads = node("pads", [0] * (2 * n))
        return pads[:n], pads[n:]
    if auto == "VALID":
        return [0] * n, [0] * n
    begin, end = [], []
    for size, k, s, d in zip(x_spatial, kernel, strides, dilations):
        if size is None:
            raise SpaError(f"from_onnx: {node.node.op_type} '{node.name}' with auto_pad SAME needs static sizes")
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin, end


def _pad_spatial(x_nhwc, begin, end, value=0.0):
    if not any(begin) and not any(end):
        return x_nhwc
    pads = [[0, 0]] + [[b, e] for b, e in zip(begin, end)] + [[0, 0]]
    return _tf().pad(x_nhwc, pads, constant_values=value)


def _conv_geometry(node, x, w):
    """Spatial rank, kernel size, strides and dilations of a Conv / ConvTranspose node."""
    n = _rank(x) - 2
    return n, list(w.shape[2:]), node("strides", [1] * n), node("dilations", [1] * n)


@op("Conv")
def _conv(node, x, w, b=None):
    tf = _tf()
    x, w = _as_tensor(x), _as_tensor(w)
    n, kernel, strides, dilations = _conv_geometry(node, x, w)
    group = node("group", 1)
    begin, end = _conv_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    if n == 1:  # as a 2-D convolution over a height of 1
        x, w = tf.expand_dims(x, 2), tf.expand_dims(w, 2)
        kernel, strides, dilations = [1] + kernel, [1] + strides, [1] + dilations
        begin, end = [0] + begin, [0] + end
    xs = _pad_spatial(_to_nhwc(x), begin, end)
    filters = tf.transpose(w, list(range(2, _rank(w))) + [1, 0])  # (*k, in/group, out)
    channels = xs.shape[-1]
    if group == 1:
        y = tf.nn.convolution(xs, filters, strides=strides, padding="VALID", dilations=dilations)
    elif group == channels and len(kernel) == 2:
        mult = w.shape[0] // group
        depthwise = tf.reshape(tf.transpose(w, [2, 3, 0, 1]), kernel + [group, mult])
        y = tf.nn.depthwise_conv2d(xs, depthwise, [1] + strides + [1], "VALID", dilations=dilations)
    else:
        parts = zip(tf.split(xs, group, axis=-1), tf.split(filters, group, axis=-1))
        y = tf.concat([tf.nn.convolution(p, f, strides=strides, padding="VALID", dilations=dilations)
                       for p, f in parts], axis=-1)
    y = _to_nchw(y)
    if n == 1:
        y = tf.squeeze(y, 2)
    if b is not None:
        y = y + tf.reshape(b, _channel_shape(y))
    return y


@op("ConvTranspose")
def _conv_transpose(node, x, w, b=None):
    tf = _tf()
    x, w = _as_tensor(x), _as_tensor(w)
    n, kernel, strides, dilations = _conv_geometry(node, x, w)
    if any(d != 1 for d in dilations) or node("output_shape") or node("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise SpaError(f"from_onnx: ConvTranspose '{node.name}' with dilations, output_shape or auto_pad")
    pads = node("pads", [0] * (2 * n))
    extra = node("output_padding", [0] * n)
    group = node("group", 1)
    one_d = n == 1
    if one_d:  # as a 2-D transposed convolution over a height of 1
        x, w = tf.expand_dims(x, 2), tf.expand_dims(w, 2)
        kernel, strides, pads, extra = [1] + kernel, [1] + strides, [0] + pads[:1] + [0] + pads[1:], [0] + extra
        n = 2
    xs = _to_nhwc(x)
    parts = []
    for xg, wg in zip(tf.split(xs, group, axis=-1), tf.split(w, group, axis=0)):
        filters = tf.transpose(wg, list(range(2, n + 2)) + [1, 0])  # (*k, out/group, in/group)
        shape = tf.shape(xg)
        full = [(xg.shape[1 + i] - 1) * strides[i] + kernel[i] + extra[i] if xg.shape[1 + i] is not None
                else (shape[1 + i] - 1) * strides[i] + kernel[i] + extra[i] for i in range(n)]
        out_shape = tf.stack([shape[0]] + [tf.cast(f, tf.int32) for f in full] + [filters.shape[-2]])
        fn = tf.nn.conv2d_transpose if n == 2 else tf.nn.conv3d_transpose
        parts.append(fn(xg, filters, out_shape, [1] + strides + [1], padding="VALID"))
    y = parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)
    index = [slice(None)] + [slice(pads[i], -pads[n + i] if pads[n + i] else None)
                             for i in range(n)] + [slice(None)]
    y = _to_nchw(y[tuple(index)])
    if one_d:
        y = tf.squeeze(y, 2)
    if b is not None:
        y = y + tf.reshape(b, _channel_shape(y))
    return y


def _pool(node, x, kind):
    tf = _tf()
    x = _as_tensor(x)
    n = _rank(x) - 2
    kernel = node("kernel_shape")
    strides = node("strides", [1] * n)
    dilations = node("dilations", [1] * n)
    if any(d != 1 for d in dilations):
        raise SpaError(f"from_onnx: dilated {node.node.op_type} '{node.name}'")
    spatial = list(x.shape[2:])
    begin, end = _conv_pads(node, spatial, kernel, strides, dilations)
    if node("ceil_mode", 0):
        end = list(end)
        for i, size in enumerate(spatial):
            padded = size + begin[i] + end[i]
            out = -(-(padded - kernel[i]) // strides[i]) + 1
            if (out - 1) * strides[i] >= size + begin[i]:  # the last window must start inside
                out -= 1
            end[i] += max((out - 1) * strides[i] + kernel[i] - padded, 0)
    xs = _to_nhwc(x)
    if kind == "MAX":
        padded = _pad_spatial(xs, begin, end, value=float("-inf"))
        y = tf.nn.pool(padded, kernel, "MAX", strides=strides, padding="VALID")
        return _to_nchw(y)
    summed = tf.nn.pool(_pad_spatial(xs, begin, end), kernel, "AVG", strides=strides, padding="VALID")
    area = float(np.prod(kernel))
    if not node("count_include_pad", 0) or node("ceil_mode", 0):
        ones = tf.ones_like(xs[..., :1])
        if node("count_include_pad", 0):
            ones = _pad_spatial(ones, begin, [0] * n, value=1.0)
            ones = _pad_spatial(ones, [0] * n, end, value=0.0)
        else:
            ones = _pad_spatial(ones, begin, end)
        count = tf.nn.pool(ones, kernel, "AVG", strides=strides, padding="VALID") * area
        return _to_nchw(summed * area / count)
    return _to_nchw(summed)


@op("MaxPool")
def _max_pool(node, x):
    if len(node.node.output) > 1 and node.node.output[1]:
        raise SpaError(f"from_onnx: MaxPool '{node.name}' with indices output")
    return _pool(node, x, "MAX")


@op("AveragePool")
def _avg_pool(node, x):
    return _pool(node, x, "AVG")


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node, x):
    tf = _tf()
    x = _as_tensor(x)
    axes = list(range(2, _rank(x)))
    fn = tf.reduce_mean if node.node.op_type == "GlobalAveragePool" else tf.reduce_max
    return fn(x, axis=axes, keepdims=True)


@op("Resize", "Upsample")
def _resize(node, x, roi=None, scales=None, sizes=None):
    tf = _tf()
    x = _as_tensor(x)
    if node.node.op_type == "Upsample":
        scales, sizes = roi, None
    mode = node("mode", "nearest")
    transform = node("coordinate_transformation_mode", "half_pixel")
    if sizes is not None and _static(sizes) is not None and _static(sizes).size:
        target = _ints(sizes, node, "sizes")[2:]
    else:
        factors = [float(v) for v in np.atleast_1d(_static(scales))]
        if factors[:2] != [1.0, 1.0]:
            raise SpaError(f"from_onnx: Resize '{node.name}' scales batch or channels")
        target = [int(np.floor(s * f)) for s, f in zip(x.shape[2:], factors[2:])]
    if _rank(x) != 4:
        raise SpaError(f"from_onnx: Resize '{node.name}' of a rank-{_rank(x)} tensor")
    xs = _to_nhwc(x)
    if mode == "nearest":
        if transform not in ("asymmetric", "half_pixel", "pytorch_half_pixel") or \
                node("nearest_mode", "round_prefer_floor") not in ("floor", "round_prefer_floor"):
            raise SpaError(f"from_onnx: nearest Resize '{node.name}' with {transform}")
        y = _nearest(xs, target, transform == "asymmetric" and node("nearest_mode") == "floor")
    elif mode == "linear":
        if transform == "align_corners":
            y = tf.compat.v1.image.resize_bilinear(xs, target, align_corners=True)
        elif transform in ("half_pixel", "pytorch_half_pixel"):
            y = tf.image.resize(xs, target, method="bilinear")
        elif transform == "asymmetric":
            y = tf.compat.v1.image.resize_bilinear(xs, target, align_corners=False)
        else:
            raise SpaError(f"from_onnx: linear Resize '{node.name}' with {transform}")
    else:
        raise SpaError(f"from_onnx: Resize '{node.name}' mode {mode}")
    return _to_nchw(tf.cast(y, x.dtype))


def _nearest(xs, target, asymmetric_floor):
    """Nearest neighbour by index gathers (exact for ONNX's asymmetric/floor and half_pixel)."""
    tf = _tf()
    for axis, out in zip((1, 2), target):
        size = xs.shape[axis]
        pos = np.arange(out) * size / out if asymmetric_floor else (np.arange(out) + 0.5) * size / out - 0.5
        index = np.floor(pos) if asymmetric_floor else np.ceil(pos - 0.5)  # round half down
        xs = tf.gather(xs, np.clip(index, 0, size - 1).astype(np.int64), axis=axis)
    return xs


@op("DepthToSpace", "SpaceToDepth")
def _depth_space(node, x):
    tf = _tf()
    x = _as_tensor(x)
    block = node("blocksize")
    if node.node.op_type == "SpaceToDepth":
        return _to_nchw(tf.nn.space_to_depth(_to_nhwc(x), block))
    if node("mode", "DCR") == "DCR":
        return _to_nchw(tf.nn.depth_to_space(_to_nhwc(x), block))
    n, c, h, w = tf.unstack(tf.shape(x))
    cout = x.shape[1] // (block * block)
    y = tf.reshape(x, [n, cout, block, block, h, w])
    y = tf.transpose(y, [0, 1, 4, 2, 5, 3])
    return tf.reshape(y, [n, cout, h * block, w * block])


# ---- shapes and layout ----------------------------------------------------------------------------
@op("Constant")
def _constant(node):
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in node.attrs:
            value = node.attrs[key]
            return numpy_helper.to_array(value) if key == "value" else np.asarray(value)
    raise SpaError(f"from_onnx: Constant '{node.name}' of an unsupported kind")


@op("Shape")
def _shape(node, x):
    tf = _tf()
    x = _as_tensor(x)
    static = x.shape.as_list()
    start, end = node("start", 0), node("end", None)
    if None not in static:
        return np.asarray(static[start:end], dtype=np.int64)
    return tf.shape(x, out_type=tf.int64)[start:end]


@op("Size")
def _size(node, x):
    return _tf().size(_as_tensor(x), out_type=_tf().int64)


@op("ConstantOfShape")
def _constant_of_shape(node, shape):
    tf = _tf()
    value = node.attrs.get("value")
    fill = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
    static = _static(shape)
    if static is not None:
        return np.full([int(v) for v in static], fill, dtype=fill.dtype)
    return tf.fill(shape, tf.constant(fill))


def _is_static(*xs):
    return all(x is None or isinstance(x, np.ndarray) or np.isscalar(x) for x in xs)


@op("Reshape")
def _reshape(node, x, shape):
    tf = _tf()
    target = _static(shape)
    if target is not None:
        target = [int(v) for v in target]
        if not node("allowzero", 0):
            dims = _dims(x)
            target = [dims[i] if v == 0 else v for i, v in enumerate(target)]
        if _is_static(x) and all(isinstance(v, int) for v in target):
            return np.reshape(x, target)
        return tf.reshape(x, tf.stack([tf.cast(v, tf.int64) for v in target]) if any(
            not isinstance(v, int) for v in target) else target)
    shape = tf.cast(shape, tf.int64)
    if not node("allowzero", 0):
        actual = tf.shape(x, out_type=tf.int64)[:tf.size(shape)]
        shape = tf.where(tf.equal(shape, 0), actual, shape)
    return tf.reshape(x, shape)


def _dims(x):
    """Static sizes where known, else scalar tensors."""
    if isinstance(x, np.ndarray):
        return list(x.shape)
    x = _as_tensor(x)
    dynamic = _tf().shape(x, out_type=_tf().int64)
    return [d if d is not None else dynamic[i] for i, d in enumerate(x.shape.as_list())]


@op("Flatten")
def _flatten(node, x):
    tf = _tf()
    axis = node("axis", 1)
    axis = axis + _rank(x) if axis < 0 else axis
    if _is_static(x):
        return np.reshape(x, (int(np.prod(x.shape[:axis])), -1))
    dims = _dims(x)
    outer = tf.reduce_prod(tf.stack([tf.cast(d, tf.int64) for d in dims[:axis]])) if axis else 1
    return tf.reshape(x, tf.stack([tf.cast(outer, tf.int64), tf.constant(-1, tf.int64)]))


@op("Transpose")
def _transpose(node, x):
    perm = node("perm") or list(reversed(range(_rank(x))))
    return np.transpose(x, perm) if _is_static(x) else _tf().transpose(x, perm)


@op("Squeeze")
def _squeeze(node, x, axes=None):
    axes = _axes(node, x, axes)
    if _is_static(x):
        return np.squeeze(x, axis=tuple(axes) if axes else None)
    return _tf().squeeze(x, axis=axes) if axes else _tf().squeeze(x)


@op("Unsqueeze")
def _unsqueeze(node, x, axes=None):
    axes = _axes(node, x, axes)
    rank = _rank(x) + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = np.expand_dims(x, axis) if _is_static(x) else _tf().expand_dims(x, axis)
    return x


@op("Concat")
def _concat(node, *xs):
    xs = [x for x in xs if x is not None]
    if _is_static(*xs):
        return np.concatenate([np.atleast_1d(x) for x in xs], axis=node("axis"))
    tf = _tf()
    tensors = [_as_tensor(x) for x in xs]
    dtype = tensors[0].dtype
    return tf.concat([tf.cast(t, dtype) for t in tensors], axis=node("axis"))


@op("Split")
def _split(node, x, split=None):
    tf = _tf()
    axis = node("axis", 0)
    sizes = _ints(split, node, "split") if split is not None else node("split")
    count = len(node.node.output)
    if sizes is None:
        size = x.shape[axis]
        chunk = -(-size // count)
        sizes = [chunk] * (count - 1) + [size - chunk * (count - 1)]
    if _is_static(x):
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    return tf.split(x, sizes, axis=axis)


@op("Slice")
def _slice(node, x, starts=None, ends=None, axes=None, steps=None):
    if node.opset < 10:
        starts, ends, axes = node("starts"), node("ends"), node("axes")
    else:
        starts, ends = _ints(starts, node, "starts"), _ints(ends, node, "ends")
        axes = _ints(axes, node, "axes") if axes is not None else None
    steps = _ints(steps, node, "steps") if steps is not None else [1] * len(starts)
    rank = _rank(x) if not _is_static(x) else np.ndim(x)
    axes = axes if axes is not None else list(range(len(starts)))
    index = [slice(None)] * rank
    big = 2 ** 62
    for start, end, axis, step in zip(starts, ends, axes, steps):
        start = None if (step < 0 and start >= big) or (step > 0 and start <= -big) else start
        end = None if abs(end) >= big else end
        index[axis % rank] = slice(max(start, -big) if start is not None else None, end, step)
    return x[tuple(index)]


@op("Gather")
def _gather(node, x, indices):
    tf = _tf()
    axis = node("axis", 0)
    if _is_static(x, indices):
        return np.take(x, np.asarray(indices, dtype=np.int64), axis=axis)
    x = _as_tensor(x)
    idx = _as_tensor(indices)
    size = tf.shape(x, out_type=idx.dtype)[axis]
    idx = tf.where(idx < 0, idx + size, idx)
    return tf.gather(x, idx, axis=axis)


@op("GatherElements")
def _gather_elements(node, x, indices):
    tf = _tf()
    x, idx = _as_tensor(x), tf.cast(_as_tensor(indices), tf.int64)
    axis = node("axis", 0) % _rank(x)
    size = tf.shape(x, out_type=tf.int64)[axis]
    idx = tf.where(idx < 0, idx + size, idx)
    return tf.experimental.numpy.take_along_axis(x, idx, axis=axis)


@op("Expand")
def _expand(node, x, shape):
    tf = _tf()
    if _is_static(x, shape):
        return np.broadcast_to(x, np.broadcast_shapes(np.shape(x), tuple(int(v) for v in shape))).copy()
    x = _as_tensor(x)
    target = tf.broadcast_dynamic_shape(tf.shape(x, out_type=tf.int64), tf.cast(shape, tf.int64))
    return tf.broadcast_to(x, target)


@op("Tile")
def _tile(node, x, repeats):
    if _is_static(x, repeats):
        return np.tile(x, [int(v) for v in repeats])
    return _tf().tile(x, repeats)


@op("Range")
def _range(node, start, limit, delta):
    if _is_static(start, limit, delta):
        return np.arange(start, limit, delta, dtype=np.asarray(start).dtype)
    tf = _tf()
    start = _as_tensor(start)
    return tf.range(start, tf.cast(limit, start.dtype), tf.cast(delta, start.dtype))


@op("Trilu")
def _trilu(node, x, k=None):
    tf = _tf()
    x = _as_tensor(x)
    k = 0 if k is None else _ints(k, node, "k")[0]
    rows, cols = x.shape[-2], x.shape[-1]
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    keep = (j - i >= k) if node("upper", 1) else (j - i <= k)
    return tf.where(keep, x, tf.zeros_like(x))


@op("Pad")
def _pad(node, x, pads=None, value=None, axes=None):
    tf = _tf()
    x = _as_tensor(x)
    rank = _rank(x)
    pads = node("pads") if node.opset < 11 else _ints(pads, node, "pads")
    fill = node("value", 0.0) if node.opset < 11 else (0 if value is None else _static(value).item())
    axes = list(range(rank)) if axes is None else [a % rank for a in _ints(axes, node, "axes")]
    n = len(axes)
    full = [[0, 0] for _ in range(rank)]
    for k, axis in enumerate(axes):
        full[axis] = [pads[k], pads[n + k]]
    if any(p < 0 for pair in full for p in pair):
        raise SpaError(f"from_onnx: Pad '{node.name}' with negative pads")
    mode = node("mode", "constant")
    modes = {"constant": "CONSTANT", "reflect": "REFLECT", "edge": "SYMMETRIC"}
    if mode == "edge" and any(p > 1 for pair in full for p in pair):
        raise SpaError(f"from_onnx: edge Pad '{node.name}' wider than 1")
    if mode == "constant":
        return tf.pad(x, full, constant_values=tf.cast(fill, x.dtype))
    return tf.pad(x, full, mode=modes[mode])


@op("CumSum")
def _cumsum(node, x, axis):
    return _tf().math.cumsum(_as_tensor(x), axis=int(_static(axis)), exclusive=bool(node("exclusive", 0)),
                             reverse=bool(node("reverse", 0)))


@op("ScatterND")
def _scatter_nd(node, x, indices, updates):
    if node("reduction", "none") != "none":
        raise SpaError(f"from_onnx: ScatterND '{node.name}' with a reduction")
    return _tf().tensor_scatter_nd_update(_as_tensor(x), indices, updates)


# ---- recurrent layers (ONNX gate order: LSTM i,o,f,c; GRU z,r,h) -------------------------------------
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Tanh": "tanh", "Relu": "relu"}


def _activation(name):
    tf = _tf()
    return {"sigmoid": tf.sigmoid, "tanh": tf.tanh, "relu": tf.nn.relu}[_ACTIVATIONS[name]]


def _recurrent(node, x, w, r, b, seq_lens, h0, c0, cell, gates):
    """Shared driver: Y [T, D, N, H], Y_h [D, N, H] (and Y_c for LSTM); layout 1 is batch first."""
    tf = _tf()
    if seq_lens is not None:
        raise SpaError(f"from_onnx: {node.node.op_type} '{node.name}' with sequence_lens")
    if node("clip") is not None or node("input_forget", 0):
        raise SpaError(f"from_onnx: {node.node.op_type} '{node.name}' with clip or input_forget")
    x = _as_tensor(x)
    if node("layout", 0):
        x = tf.transpose(x, [1, 0, 2])
    hidden = node("hidden_size")
    directions = 2 if node("direction", "forward") == "bidirectional" else 1
    default_acts = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
    acts = node("activations") or default_acts[node.node.op_type] * directions
    batch = tf.shape(x)[1]
    ys, hs, cs = [], [], []
    for d in range(directions):
        reverse = node("direction", "forward") == "reverse" or d == 1
        bias = b[d] if b is not None else tf.zeros([2 * gates * hidden], x.dtype)
        h = h0[d] if h0 is not None else tf.zeros(tf.stack([batch, hidden]), x.dtype)
        c = c0[d] if c0 is not None else tf.zeros(tf.stack([batch, hidden]), x.dtype)
        n_acts = len(acts) // directions
        fns = [_activation(a) for a in acts[d * n_acts:(d + 1) * n_acts]]
        step = cell(node, w[d], r[d], bias, hidden, fns)
        seq = tf.reverse(x, [0]) if reverse else x
        h_all, c_all = tf.scan(lambda state, xt: step(state, xt), seq, initializer=(h, c))
        if reverse:
            h_all = tf.reverse(h_all, [0])
        ys.append(h_all)
        hs.append(h_all[0] if reverse else h_all[-1])
        cs.append(c_all[-1])
    y = tf.stack(ys, axis=1)
    y_h, y_c = tf.stack(hs), tf.stack(cs)
    if node("layout", 0):
        y, y_h, y_c = tf.transpose(y, [2, 0, 1, 3]), tf.transpose(y_h, [1, 0, 2]), tf.transpose(y_c, [1, 0, 2])
    return y, y_h, y_c


def _lstm_cell(node, w, r, bias, hidden, fns):
    tf = _tf()
    f, g, h_act = fns
    wb, rb = bias[:4 * hidden], bias[4 * hidden:]

    def step(state, xt):
        h, c = state
        z = tf.linalg.matmul(xt, w, transpose_b=True) + tf.linalg.matmul(h, r, transpose_b=True) + wb + rb
        i, o, fg, cand = tf.split(z, 4, axis=-1)
        c_new = f(fg) * c + f(i) * g(cand)
        return h_act(c_new) * f(o), c_new
    return step


def _gru_cell(node, w, r, bias, hidden, fns):
    tf = _tf()
    f, g = fns
    wb, rb = bias[:3 * hidden], bias[3 * hidden:]
    linear_before_reset = node("linear_before_reset", 0)

    def step(state, xt):
        h, c = state
        xw = tf.linalg.matmul(xt, w, transpose_b=True) + wb
        xz, xr, xh = tf.split(xw, 3, axis=-1)
        rz, rr, rh = tf.split(r, 3, axis=0)
        bz, br, bh = tf.split(rb, 3)
        z = f(xz + tf.linalg.matmul(h, rz, transpose_b=True) + bz)
        reset = f(xr + tf.linalg.matmul(h, rr, transpose_b=True) + br)
        if linear_before_reset:
            cand = g(xh + reset * (tf.linalg.matmul(h, rh, transpose_b=True) + bh))
        else:
            cand = g(xh + tf.linalg.matmul(reset * h, rh, transpose_b=True) + bh)
        return (1 - z) * cand + z * h, c
    return step


def _rnn_cell(node, w, r, bias, hidden, fns):
    tf = _tf()
    (f,) = fns
    wb, rb = bias[:hidden], bias[hidden:]

    def step(state, xt):
        h, c = state
        return f(tf.linalg.matmul(xt, w, transpose_b=True) + tf.linalg.matmul(h, r, transpose_b=True)
                 + wb + rb), c
    return step


@op("LSTM")
def _lstm(node, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
    if p is not None:
        raise SpaError(f"from_onnx: LSTM '{node.name}' with peepholes")
    return _recurrent(node, x, w, r, b, seq_lens, h0, c0, _lstm_cell, 4)


@op("GRU")
def _gru(node, x, w, r, b=None, seq_lens=None, h0=None):
    return _recurrent(node, x, w, r, b, seq_lens, h0, None, _gru_cell, 3)[:2]


@op("RNN")
def _rnn(node, x, w, r, b=None, seq_lens=None, h0=None):
    return _recurrent(node, x, w, r, b, seq_lens, h0, None, _rnn_cell, 1)[:2]


for _name in ("Add", "Sub", "Mul", "Pow", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
              "And", "Or", "Xor", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Sin", "Cos", "Tanh",
              "Sigmoid", "Relu", "Erf", "Floor", "Ceil", "Round", "Not", "IsNaN", "Sign", "Softplus",
              "Softsign", "Identity", "Tan", "Atan", "Asin", "Acos", "Sinh", "Cosh"):
    OPS.setdefault(_name, None)  # filled by register_elementwise when TensorFlow is imported
