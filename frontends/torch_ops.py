"""ONNX operators as torch functions, for the interpreter in torch_onnx.

Each entry is ``fn(module, node, env, *inputs)`` returning one tensor or a tuple (one per node
output). ``module`` is the OnnxModule (training flag, float dtype); ``node`` a NodeInfo.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from spa.errors import SpaError

OPS: dict = {}

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


@dataclass
class NodeInfo:
    op: str
    name: str
    inputs: list
    outputs: list
    attrs: dict
    opset: int
    graphs: dict = field(default_factory=dict)  # attribute name -> list of NodeInfo
    graph_protos: dict = field(default_factory=dict)
    domain: str = ""

    @classmethod
    def of(cls, node, opset: int) -> "NodeInfo":
        attrs, graphs, protos = {}, {}, {}
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                graphs[a.name] = [cls.of(n, opset) for n in a.g.node]
                protos[a.name] = a.g
                continue
            value = helper.get_attribute_value(a)
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode() for v in value]
            elif isinstance(value, onnx.TensorProto):
                value = numpy_helper.to_array(value)
            attrs[a.name] = value
        return cls(node.op_type, node.name, list(node.input), list(node.output), attrs, opset,
                   graphs, protos, node.domain)

    @property
    def key(self) -> str:
        return op_key(self.op, self.domain)

    def get(self, key, default=None):
        return self.attrs.get(key, default)


def op_key(op_type: str, domain: str) -> str:
    """An op's key in OPS: its type, prefixed with "domain:" outside the default domain."""
    return op_type if domain in ("", "ai.onnx") else f"{domain}:{op_type}"


def op(*names):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn
    return register


def _concrete(t) -> bool:
    """A plain tensor holding real values (not a torch.export fake or functional tensor)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta"


def _values(t) -> np.ndarray:
    """The values of a concrete tensor, read with torch function and dispatch modes off: while
    torch.export traces, a constant (a shape, a clip bound) stays a Python value instead of
    becoming a data-dependent symbol."""
    with torch._C.DisableTorchFunction(), torch._C._DisableTorchDispatch():
        t = t.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def ints(t) -> list[int]:
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        if _concrete(t):
            return [int(v) for v in _values(t).reshape(-1)]
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(t).reshape(-1)]


def scalar(t):
    """``t.item()``, read like :func:`ints` for concrete tensors."""
    if isinstance(t, torch.Tensor) and _concrete(t):
        return _values(t).reshape(-1)[0].item()
    return t.item()


def _float_dtype(module) -> torch.dtype:
    return module.float_dtype() if hasattr(module, "float_dtype") else torch.float32


def _onnx_dtype(module, code: int) -> torch.dtype:
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise SpaError(f"unsupported ONNX tensor type {code}")
    if dtype == torch.float32:  # a float64 module computes in float64 throughout
        return _float_dtype(module)
    return dtype


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ------------------------------------------------------------------------------------------------
# element-wise
# ------------------------------------------------------------------------------------------------
def _binary(fn):
    return lambda m, n, env, a, b: fn(a, b)


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": None,
                   "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt,
                   "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
                   "And": torch.logical_and, "Or": torch.logical_or,
                   "Xor": torch.logical_xor, "BitwiseAnd": torch.bitwise_and,
                   "BitwiseOr": torch.bitwise_or}.items():
    if _fn is not None:
        OPS[_name] = _binary(_fn)


@op("Pow")
def _pow(m, n, env, a, b):
    out = torch.pow(a, b)
    return out.to(a.dtype) if out.dtype != a.dtype else out


@op("Div")
def _div(m, n, env, a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@op("Mod")
def _mod(m, n, env, a, b):
    return torch.fmod(a, b) if n.get("fmod", 0) else torch.remainder(a, b)


@op("Max", "Min", "Sum", "Mean")
def _variadic(m, n, env, *xs):
    out = xs[0]
    for x in xs[1:]:
        out = {"Max": torch.maximum, "Min": torch.minimum}.get(n.op, torch.add)(out, x)
    return out / len(xs) if n.op == "Mean" else out


_UNARY = {
    "Abs": torch.abs, "Neg": torch.neg, "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin,
    "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh,
    "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh, "Erf": torch.erf,
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Softsign": F.softsign,
    "Softplus": F.softplus, "Mish": F.mish, "HardSwish": F.hardswish, "IsNaN": torch.isnan,
    "Not": torch.logical_not, "BitwiseNot": torch.bitwise_not,
}
for _name, _fn in _UNARY.items():
    OPS[_name] = (lambda fn: lambda m, n, env, x: fn(x))(_fn)


@op("Identity")
def _identity(m, n, env, x):
    return x


@op("LeakyRelu")
def _leaky(m, n, env, x):
    return F.leaky_relu(x, n.get("alpha", 0.01))


@op("Elu")
def _elu(m, n, env, x):
    return F.elu(x, n.get("alpha", 1.0))


@op("Celu")
def _celu(m, n, env, x):
    return F.celu(x, n.get("alpha", 1.0))


@op("Selu")
def _selu(m, n, env, x):
    alpha, gamma = n.get("alpha", 1.67326319217681884765625), n.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("HardSigmoid")
def _hard_sigmoid(m, n, env, x):
    return torch.clamp(n.get("alpha", 0.2) * x + n.get("beta", 0.5), 0, 1)


@op("ThresholdedRelu")
def _thresholded(m, n, env, x):
    return torch.where(x > n.get("alpha", 1.0), x, torch.zeros_like(x))


@op("Gelu")
def _gelu(m, n, env, x):
    return F.gelu(x, approximate=n.get("approximate", "none"))


@op("PRelu")
def _prelu(m, n, env, x, slope):
    return torch.where(x >= 0, x, x * slope)


@op("IsInf")
def _isinf(m, n, env, x):
    pos, neg = n.get("detect_positive", 1), n.get("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


@op("Clip")
def _clip(m, n, env, x, lo=None, hi=None):
    if n.opset < 11:
        lo, hi = n.get("min"), n.get("max")
    lo = scalar(lo) if isinstance(lo, torch.Tensor) else lo
    hi = scalar(hi) if isinstance(hi, torch.Tensor) else hi
    return torch.clamp(x, lo, hi) if lo is not None or hi is not None else x


@op("Where")
def _where(m, n, env, cond, a, b):
    return torch.where(cond.bool(), a, b)


@op("Cast")
def _cast(m, n, env, x):
    return x.to(_onnx_dtype(m, n.get("to")))


@op("CastLike")
def _cast_like(m, n, env, x, like):
    return x.to(like.dtype)


@op("Dropout")
def _dropout(m, n, env, x, ratio=None, training=None):
    p = float(ratio) if ratio is not None else n.get("ratio", 0.5)
    active = m.training and not m.mimic_onnx and p > 0
    if active:
        mask = (torch.rand_like(x) >= p)
        y = x * mask / (1 - p)
    else:
        y, mask = x, torch.ones_like(x, dtype=torch.bool)
    return (y, mask) if len(n.outputs) > 1 else y


# ------------------------------------------------------------------------------------------------
# constants and shapes
# ------------------------------------------------------------------------------------------------
@op("Constant")
def _constant(m, n, env):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in n.attrs:
            value = np.asarray(n.attrs[key])
            if key in ("value_float", "value_floats"):
                value = value.astype(np.float32)
            tensor = torch.from_numpy(np.array(value))
            return tensor.to(_float_dtype(m)) if tensor.dtype == torch.float32 else tensor
    raise SpaError(f"Constant '{n.name}': unsupported value attribute {sorted(n.attrs)}")


@op("Shape")
def _shape(m, n, env, x):
    dims = list(x.shape)
    start, end = n.get("start", 0), n.get("end", None)
    return torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64)


@op("Size")
def _size(m, n, env, x):
    return torch.tensor(x.numel(), dtype=torch.int64)


@op("ConstantOfShape")
def _constant_of_shape(m, n, env, shape):
    value = n.get("value")
    fill = np.array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    dtype = _float_dtype(m) if fill.dtype == np.float32 else torch.from_numpy(fill).dtype
    return torch.full(ints(shape), fill[0].item(), dtype=dtype)


@op("Range")
def _range(m, n, env, start, limit, delta):
    return torch.arange(scalar(start), scalar(limit), scalar(delta), dtype=start.dtype)


@op("Reshape")
def _reshape(m, n, env, x, shape):
    dims = ints(shape)
    if not n.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@op("Flatten")
def _flatten(m, n, env, x):
    axis = _axis(n.get("axis", 1), x.dim())
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _axes_input(n, axes, key="axes"):
    return ints(axes) if axes is not None else list(n.get(key, []) or [])


@op("Squeeze")
def _squeeze(m, n, env, x, axes=None):
    dims = _axes_input(n, axes)
    if not dims:
        return x.squeeze()
    for d in sorted((_axis(a, x.dim()) for a in dims), reverse=True):
        x = x.squeeze(d)
    return x


@op("Unsqueeze")
def _unsqueeze(m, n, env, x, axes=None):
    dims = _axes_input(n, axes)
    rank = x.dim() + len(dims)
    for d in sorted(_axis(a, rank) for a in dims):
        x = x.unsqueeze(d)
    return x


@op("Transpose")
def _transpose(m, n, env, x):
    perm = n.get("perm") or list(range(x.dim()))[::-1]
    return x.permute(*perm)


@op("Concat")
def _concat(m, n, env, *xs):
    xs = [x for x in xs if x is not None]
    dtype = xs[0].dtype
    return torch.cat([x.to(dtype) for x in xs], dim=n.get("axis"))


@op("Split")
def _split(m, n, env, x, split=None):
    axis = _axis(n.get("axis", 0), x.dim())
    sizes = ints(split) if split is not None else list(n.get("split", []) or [])
    if not sizes:
        parts = n.get("num_outputs", len(n.outputs))
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - k * chunk) for k in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(m, n, env, x, starts=None, ends=None, axes=None, steps=None):
    if n.opset < 10:
        starts, ends, axes = n.get("starts"), n.get("ends"), n.get("axes")
    starts, ends = ints(starts), ints(ends)
    axes = ints(axes) if axes is not None else list(range(len(starts)))
    steps = ints(steps) if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        size = x.shape[axis]
        if step > 0:
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            if step == 1:
                x = x.narrow(axis, start, max(end - start, 0))
                continue
        else:
            start = min(max(start + size if start < 0 else start, -1), size - 1)
            end = min(max(end + size if end < 0 else end, -1), size - 1)
        index = torch.arange(start, end, step, dtype=torch.int64)
        x = x.index_select(axis, index)
    return x


@op("Gather")
def _gather(m, n, env, x, index):
    axis = _axis(n.get("axis", 0), x.dim())
    index = torch.where(index < 0, index + x.shape[axis], index).long()
    out = x.index_select(axis, index.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(index.shape) + tuple(x.shape[axis + 1:]))


@op("GatherElements")
def _gather_elements(m, n, env, x, index):
    axis = _axis(n.get("axis", 0), x.dim())
    index = torch.where(index < 0, index + x.shape[axis], index).long()
    return torch.gather(x, axis, index)


@op("GatherND")
def _gather_nd(m, n, env, x, index):
    b = n.get("batch_dims", 0)
    if b:
        raise SpaError("GatherND with batch_dims > 0 is not supported")
    index = index.long()
    return x[tuple(index[..., k] for k in range(index.shape[-1]))]


@op("ScatterND")
def _scatter_nd(m, n, env, x, index, updates):
    if n.get("reduction", "none") != "none":
        raise SpaError("ScatterND with a reduction is not supported")
    out = x.clone()
    index = index.long()
    out[tuple(index[..., k] for k in range(index.shape[-1]))] = updates
    return out


@op("ScatterElements", "Scatter")
def _scatter_elements(m, n, env, x, index, updates):
    axis = _axis(n.get("axis", 0), x.dim())
    index = torch.where(index < 0, index + x.shape[axis], index).long()
    reduction = n.get("reduction", "none")
    if reduction == "none":
        return torch.scatter(x, axis, index, updates)
    return torch.scatter_reduce(x, axis, index, updates, {"add": "sum", "mul": "prod"}.get(
        reduction, reduction), include_self=True)


@op("Expand")
def _expand(m, n, env, x, shape):
    target = torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape)))
    return x.expand(target)


@op("Tile")
def _tile(m, n, env, x, repeats):
    return x.repeat(ints(repeats))


@op("Trilu")
def _trilu(m, n, env, x, k=None):
    k = int(scalar(k)) if k is not None else 0
    return torch.triu(x, k) if n.get("upper", 1) else torch.tril(x, k)


@op("CumSum")
def _cumsum(m, n, env, x, axis):
    axis = int(scalar(axis))
    if n.get("reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, axis).to(x.dtype)
    if n.get("exclusive", 0):
        out = out - x
    return out.flip(axis) if n.get("reverse", 0) else out


@op("NonZero")
def _nonzero(m, n, env, x):
    return torch.nonzero(x).T.contiguous()


@op("TopK")
def _topk(m, n, env, x, k):
    values, indices = torch.topk(x, int(scalar(k)), dim=n.get("axis", -1),
                                 largest=bool(n.get("largest", 1)), sorted=True)
    return values, indices


@op("ArgMax", "ArgMin")
def _argmax(m, n, env, x):
    axis = _axis(n.get("axis", 0), x.dim())
    keep = bool(n.get("keepdims", 1))
    if n.get("select_last_index", 0):
        flipped = x.flip(axis)
        idx = (flipped.argmax if n.op == "ArgMax" else flipped.argmin)(axis, keepdim=keep)
        return x.shape[axis] - 1 - idx
    return (x.argmax if n.op == "ArgMax" else x.argmin)(axis, keepdim=keep)


@op("OneHot")
def _one_hot(m, n, env, index, depth, values):
    depth = int(scalar(depth))
    index = torch.where(index < 0, index + depth, index).long()
    hot = F.one_hot(index, depth)
    axis = n.get("axis", -1)
    if axis != -1:
        hot = hot.movedim(-1, _axis(axis, hot.dim()))
    return torch.where(hot.bool(), values[1], values[0])


@op("Einsum")
def _einsum(m, n, env, *xs):
    return torch.einsum(n.get("equation"), *xs)


@op("Pad")
def _pad(m, n, env, x, pads=None, value=None, axes=None):
    if n.opset < 11:
        pads, value = n.get("pads"), n.get("value", 0.0)
    pads = ints(pads)
    rank = x.dim()
    axes = [_axis(a, rank) for a in ints(axes)] if axes is not None else list(range(rank))
    begin, end = pads[:len(axes)], pads[len(axes):]
    full = [(0, 0)] * rank
    for a, b, e in zip(axes, begin, end):
        full[a] = (b, e)
    while full and full[0] == (0, 0) and len(full) > 0:
        full = full[1:]
        rank -= 1
    flat = [p for pair in reversed(full) for p in pair]
    mode = n.get("mode", "constant")
    if mode == "constant":
        fill = scalar(value) if isinstance(value, torch.Tensor) and value.numel() else (value or 0.0)
        return F.pad(x, flat, mode="constant", value=fill)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    return F.pad(x, flat, mode=torch_mode)


# ------------------------------------------------------------------------------------------------
# reductions and normalisation
# ------------------------------------------------------------------------------------------------
def _reduce_axes(n, x, axes):
    if axes is not None or n.get("axes") is not None:
        dims = ints(axes) if axes is not None else list(n.get("axes"))
    else:
        dims = []
    if not dims:
        return None if n.get("noop_with_empty_axes", 0) else list(range(x.dim()))
    return [_axis(a, x.dim()) for a in dims]


_REDUCERS = {
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceL2": lambda x, d, k: x.pow(2).sum(d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: x.pow(2).sum(d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: x.sum(d, keepdim=k).log(),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keep)
    return x


@op(*_REDUCERS)
def _reduce(m, n, env, x, axes=None):
    dims = _reduce_axes(n, x, axes)
    if dims is None:
        return x
    return _REDUCERS[n.op](x, dims, bool(n.get("keepdims", 1)))


@op("Softmax", "LogSoftmax", "Hardmax")
def _softmax(m, n, env, x):
    if n.opset < 13:  # coerce to 2-D at axis (default 1)
        axis = _axis(n.get("axis", 1), x.dim())
        flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
        return _softmax_last(n.op, flat).reshape(x.shape)
    axis = _axis(n.get("axis", -1), x.dim())
    return _softmax_last(n.op, x.movedim(axis, -1)).movedim(-1, axis)


def _softmax_last(kind, x):
    if kind == "Softmax":
        return torch.softmax(x, -1)
    if kind == "LogSoftmax":
        return torch.log_softmax(x, -1)
    return F.one_hot(x.argmax(-1), x.shape[-1]).to(x.dtype)


@op("BatchNormalization")
def _batch_norm(m, n, env, x, scale, bias, mean, var):
    eps, momentum = n.get("epsilon", 1e-5), n.get("momentum", 0.9)
    if m.mimic_onnx:
        training = bool(n.get("training_mode", 0))
        y = F.batch_norm(x, None if training else mean, None if training else var, scale, bias,
                         training=training, eps=eps)
    else:
        y = F.batch_norm(x, mean, var, scale, bias, training=m.training, momentum=1 - momentum,
                         eps=eps)
    return (y, mean, var)[:len(n.outputs)] if len(n.outputs) > 1 else y


@op("InstanceNormalization")
def _instance_norm(m, n, env, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=n.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layer_norm(m, n, env, x, scale, bias=None):
    axis = _axis(n.get("axis", -1), x.dim())
    eps = n.get("epsilon", 1e-5)
    dims = list(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    inv = torch.rsqrt(var + eps)
    if tuple(scale.shape) == tuple(x.shape[axis:]) and (bias is None or bias.shape == scale.shape):
        y = F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, eps)
    else:
        y = (x - mean) * inv * scale + (bias if bias is not None else 0)
    return (y, mean, inv)[:len(n.outputs)] if len(n.outputs) > 1 else y


@op("RMSNormalization")
def _rms_norm(m, n, env, x, scale):
    axis = _axis(n.get("axis", -1), x.dim())
    dims = list(range(axis, x.dim()))
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + n.get("epsilon", 1e-5)) * scale


@op("Attention")
def _attention(m, n, env, q, k, v, mask=None, past_key=None, past_value=None, nonpad=None):
    """ONNX Attention (opset 23), as its reference implementation computes it: [B, heads, S, d] or
    [B, S, heads x d] inputs, a key/value cache, grouped key/value heads, a boolean or additive mask,
    causal masking aligned to the cache's end, softcap, the scale split over Q and K."""
    if nonpad is not None or n.get("left_window_size", -1) >= 0 or n.get("right_window_size", -1) >= 0 \
            or (len(n.outputs) > 3 and n.outputs[3]):
        raise SpaError("from_onnx: Attention with nonpad_kv_seqlen, a sliding window or its qk output is not "
                       "supported")
    packed = q.dim() == 3
    if packed:
        q, k, v = (t.reshape(t.shape[0], t.shape[1], n.get(heads), -1).transpose(1, 2)
                   for t, heads in ((q, "q_num_heads"), (k, "kv_num_heads"), (v, "kv_num_heads")))
    past = past_key.shape[2] if past_key is not None else 0
    k = torch.cat([past_key, k], 2) if past_key is not None else k
    v = torch.cat([past_value, v], 2) if past_value is not None else v
    present = (k, v)
    length, total = q.shape[2], k.shape[2]
    bias = torch.zeros(length, total, dtype=q.dtype)
    if mask is not None:
        if mask.shape[-1] < total:
            mask = F.pad(mask, (0, total - mask.shape[-1]), value=False if mask.dtype == torch.bool else -math.inf)
        bias = bias + (torch.where(mask, 0.0, -math.inf).to(q.dtype) if mask.dtype == torch.bool else mask)
    if n.get("is_causal", 0):
        allowed = torch.arange(total)[None, :] <= torch.arange(length)[:, None] + past
        bias = bias + torch.where(allowed, 0.0, -math.inf).to(q.dtype)
    share = q.shape[1] // k.shape[1]
    if share > 1:
        k, v = k.repeat_interleave(share, 1), v.repeat_interleave(share, 1)
    root = math.sqrt(n.get("scale") or 1.0 / math.sqrt(q.shape[-1]))
    scores = (q * root) @ (k * root).transpose(-1, -2)
    softcap = n.get("softcap", 0.0) or 0.0
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores + bias
    probs = torch.softmax(scores, -1)
    probs = torch.where(torch.isneginf(bias.amax(-1, keepdim=True)), torch.zeros_like(probs), probs)
    y = probs @ v
    if packed:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return (y, *present)[:len(n.outputs)] if len(n.outputs) > 1 else y


@op("RotaryEmbedding")
def _rotary_embedding(m, n, env, x, cos, sin, positions=None):
    """ONNX RotaryEmbedding (opset 23), as its reference implementation computes it."""
    four_d = x.dim() == 4
    shape = x.shape
    x = x.transpose(1, 2) if four_d else x.reshape(shape[0], shape[1], n.get("num_heads"), -1)
    rotated = n.get("rotary_embedding_dim", 0) or x.shape[-1]
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    turn, keep = x[..., :rotated], x[..., rotated:]
    if n.get("interleaved", 0):
        x1, x2 = turn[..., 0::2], turn[..., 1::2]
    else:
        x1, x2 = turn.chunk(2, dim=-1)
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if n.get("interleaved", 0):
        turn = torch.stack([real, imag], -1).reshape(turn.shape)
    else:
        turn = torch.cat([real, imag], -1)
    y = torch.cat([turn, keep], -1)
    return y.transpose(1, 2) if four_d else y.reshape(shape)


@op("GroupNormalization")
def _group_norm(m, n, env, x, scale, bias):
    groups, eps = n.get("num_groups"), n.get("epsilon", 1e-5)
    channels = x.shape[1]
    if scale.numel() != channels:  # opset 18: one scale per group
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return F.group_norm(x, groups, scale, bias, eps)


@op("LRN")
def _lrn(m, n, env, x):
    return F.local_response_norm(x, n.get("size"), n.get("alpha", 1e-4), n.get("beta", 0.75),
                                 n.get("bias", 1.0))


# ------------------------------------------------------------------------------------------------
# dense, conv and pooling
# ------------------------------------------------------------------------------------------------
@op("MatMul")
def _matmul(m, n, env, a, b):
    return torch.matmul(a, b)


@op("Gemm")
def _gemm(m, n, env, a, b, c=None):
    a = a.T if n.get("transA", 0) else a
    b = b.T if n.get("transB", 0) else b
    y = n.get("alpha", 1.0) * (a @ b)
    return y + n.get("beta", 1.0) * c if c is not None else y


def _same_pads(n, spatial, kernel, strides, dilations):
    pads_begin, pads_end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        big = total - small
        upper = n.get("auto_pad") == "SAME_UPPER"
        pads_begin.append(small if upper else big)
        pads_end.append(big if upper else small)
    return pads_begin + pads_end


def _conv_pads(n, x, kernel, strides, dilations):
    rank = len(kernel)
    auto = n.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(n, x.shape[2:], kernel, strides, dilations)
    if auto == "VALID":
        return [0] * (2 * rank)
    return list(n.get("pads", [0] * (2 * rank)))


def _split_pads(pads):
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    if begin == end:
        return begin, None
    flat = [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]
    return [0] * rank, flat


def _conv_geometry(n, w):
    """Kernel size, spatial rank, strides and dilations of a Conv / ConvTranspose node."""
    kernel = list(w.shape[2:])
    rank = len(kernel)
    return kernel, rank, list(n.get("strides", [1] * rank)), list(n.get("dilations", [1] * rank))


@op("Conv")
def _conv(m, n, env, x, w, b=None):
    kernel, rank, strides, dilations = _conv_geometry(n, w)
    padding, extra = _split_pads(_conv_pads(n, x, kernel, strides, dilations))
    if extra is not None:
        x = F.pad(x, extra)
    fn = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return fn(x, w, b, strides, padding, dilations, n.get("group", 1))


@op("ConvTranspose")
def _conv_transpose(m, n, env, x, w, b=None):
    kernel, rank, strides, dilations = _conv_geometry(n, w)
    out_pad = list(n.get("output_padding", [0] * rank))
    groups = n.get("group", 1)
    natural = [(s - 1) * st + op_ + (k - 1) * d + 1 for s, st, op_, k, d
               in zip(x.shape[2:], strides, out_pad, kernel, dilations)]
    if n.get("output_shape"):
        totals = [nat - o for nat, o in zip(natural, n.get("output_shape")[-rank:])]
        upper = n.get("auto_pad", "NOTSET") != "SAME_LOWER"
        pads = [t // 2 if upper else t - t // 2 for t in totals] + \
               [t - t // 2 if upper else t // 2 for t in totals]
    elif n.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        totals = [nat - s * st for nat, s, st in zip(natural, x.shape[2:], strides)]
        upper = n.get("auto_pad") == "SAME_UPPER"
        pads = [t // 2 if upper else t - t // 2 for t in totals] + \
               [t - t // 2 if upper else t // 2 for t in totals]
    else:
        pads = list(n.get("pads", [0] * (2 * rank)))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    y = fn(x, w, b, strides, 0, out_pad, groups, dilations)
    for axis, (begin, end) in enumerate(zip(pads[:rank], pads[rank:])):
        if begin or end:
            y = y.narrow(axis + 2, begin, y.shape[axis + 2] - begin - end)
    return y


def _pool_setup(n, x, short=True):
    kernel = list(n.get("kernel_shape"))
    rank = len(kernel)
    strides = list(n.get("strides", [1] * rank))
    dilations = list(n.get("dilations", [1] * rank))
    pads = _conv_pads(n, x, kernel, strides, dilations)
    if short:
        pads = _short_input_pads(x, kernel, strides, dilations, pads)
    return kernel, strides, dilations, pads


def _short_input_pads(x, kernel, strides, dilations, pads):
    """onnxruntime sizes a pool's output as trunc((in + pads - span) / stride) + 1 with C
    truncation toward zero, torch with floor: where the (padded) input is shorter than the window
    by less than a stride, onnxruntime still gives one output over what is there (PP-OCR's SVTR
    AveragePool of kernel 3 over a height of 1 or 2). Extend the end padding so torch does too;
    the extra positions are padding (never counted by count_include_pad=0; counted by
    count_include_pad=1 in floor mode, as onnxruntime does; ceil mode with count_include_pad=1
    divides differently and is left alone)."""
    rank = len(kernel)
    pads = list(pads)
    for axis in range(rank):
        span = dilations[axis] * (kernel[axis] - 1) + 1
        short = x.shape[axis + 2] + pads[axis] + pads[axis + rank] - span
        if -strides[axis] < short < 0:
            pads[axis + rank] -= short
    return pads


def _flat_pads(pads):
    rank = len(pads) // 2
    return [p for b, e in zip(reversed(pads[:rank]), reversed(pads[rank:])) for p in (b, e)]


@op("MaxPool")
def _max_pool(m, n, env, x):
    kernel, strides, dilations, pads = _pool_setup(n, x)
    rank = len(kernel)
    if any(pads):
        x = F.pad(x, _flat_pads(pads), value=-math.inf)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
    if len(n.outputs) > 1 and n.outputs[1]:
        raise SpaError("MaxPool with an Indices output is not supported")
    return fn(x, kernel, strides, 0, dilations, ceil_mode=bool(n.get("ceil_mode", 0)))


@op("AveragePool")
def _avg_pool(m, n, env, x):
    ceil = bool(n.get("ceil_mode", 0))
    kernel, strides, _, pads = _pool_setup(n, x, short=not (ceil and n.get("count_include_pad", 0)))
    rank = len(kernel)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
    if not any(pads):
        return fn(x, kernel, strides, 0, ceil_mode=ceil)
    flat = _flat_pads(pads)
    padded = F.pad(x, flat)
    if n.get("count_include_pad", 0):
        return fn(padded, kernel, strides, 0, ceil_mode=ceil)
    ones = F.pad(torch.ones_like(x[:1, :1]), flat)
    return fn(padded, kernel, strides, 0, ceil_mode=ceil) / fn(ones, kernel, strides, 0, ceil_mode=ceil)


@op("GlobalAveragePool")
def _global_avg(m, n, env, x):
    return x.mean(list(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def _global_max(m, n, env, x):
    return x.amax(list(range(2, x.dim())), keepdim=True)


@op("DepthToSpace")
def _depth_to_space(m, n, env, x):
    b = n.get("blocksize")
    if n.get("mode", "DCR") == "CRD":
        return F.pixel_shuffle(x, b)
    N, C, H, W = x.shape
    y = x.reshape(N, b, b, C // (b * b), H, W).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(N, C // (b * b), H * b, W * b)


@op("SpaceToDepth")
def _space_to_depth(m, n, env, x):
    b = n.get("blocksize")
    N, C, H, W = x.shape
    y = x.reshape(N, C, H // b, b, W // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(N, C * b * b, H // b, W // b)


# ------------------------------------------------------------------------------------------------
# Resize
# ------------------------------------------------------------------------------------------------
def _source_coords(mode, out_len, in_len, scale):
    x = torch.arange(out_len, dtype=torch.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * (in_len - 1) / (out_len - 1) if out_len > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        center = in_len / 2
        offset = center * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    raise SpaError(f"Resize: coordinate_transformation_mode '{mode}' is not supported")


def _nearest(coords, rounding):
    if rounding == "round_prefer_floor":
        return torch.ceil(coords - 0.5)
    if rounding == "round_prefer_ceil":
        return torch.floor(coords + 0.5)
    if rounding == "floor":
        return torch.floor(coords)
    return torch.ceil(coords)


@op("Resize", "Upsample")
def _resize(m, n, env, x, roi=None, scales=None, sizes=None):
    if n.op == "Upsample" or n.opset < 11:
        scales, sizes = roi, None
        ctm_default = "asymmetric"
    else:
        ctm_default = "half_pixel"
    rank = x.dim()
    axes = [_axis(a, rank) for a in n.get("axes", [])] or list(range(rank))
    in_shape = [x.shape[a] for a in axes]
    if sizes is not None and sizes.numel():
        out_shape = ints(sizes)
        scale_list = [o / i for o, i in zip(out_shape, in_shape)]
        if n.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise SpaError("Resize: keep_aspect_ratio_policy other than stretch is not supported")
    else:
        scale_list = [float(s) for s in (_values(scales) if _concrete(scales) else scales).reshape(-1).tolist()]
        out_shape = [int(math.floor(i * s)) for i, s in zip(in_shape, scale_list)]
    mode = n.get("mode", "nearest")
    ctm = n.get("coordinate_transformation_mode", ctm_default)
    if mode == "cubic":
        return _cubic(x, axes, out_shape, ctm, n)
    for axis, in_len, out_len, scale in zip(axes, in_shape, out_shape, scale_list):
        if in_len == out_len and scale == 1:
            continue
        coords = _source_coords(ctm, out_len, in_len, scale)
        if mode == "nearest":
            index = _nearest(coords, n.get("nearest_mode", "round_prefer_floor"))
            x = x.index_select(axis, index.clamp(0, in_len - 1).long())
        elif mode == "linear":
            coords = coords.clamp(0, in_len - 1)
            low = coords.floor().long()
            high = (low + 1).clamp(max=in_len - 1)
            weight = (coords - low).to(x.dtype)
            shape = [1] * rank
            shape[axis] = out_len
            weight = weight.reshape(shape)
            x = x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight
        else:
            raise SpaError(f"Resize: mode '{mode}' is not supported")
    return x


def _cubic(x, axes, out_shape, ctm, n):
    spatial = [a for a in axes if a >= 2]
    sizes = dict(zip(axes, out_shape))
    if any(sizes[a] != x.shape[a] for a in axes if a < 2) or len(spatial) != 2 or x.dim() != 4:
        raise SpaError("Resize: cubic only on the two spatial axes of a 4-D tensor")
    if n.get("cubic_coeff_a", -0.75) != -0.75 or n.get("exclude_outside", 0) or \
            ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        raise SpaError("Resize: this cubic variant is not supported")
    return F.interpolate(x, size=[sizes[2], sizes[3]], mode="bicubic",
                         align_corners=ctm == "align_corners")


# ------------------------------------------------------------------------------------------------
# recurrent
# ------------------------------------------------------------------------------------------------
_ACTIVATIONS = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu}


def _activations(n, defaults, dirs):
    names = n.get("activations") or defaults * dirs
    try:
        return [_ACTIVATIONS[a] for a in names]
    except KeyError as exc:
        raise SpaError(f"{n.op}: activation {exc.args[0]} is not supported") from None


def _recurrent(n, x, seq_lens, layout_h, step):
    """Shared driver: returns (Y [seq, dirs, batch, H], Y_h [dirs, batch, H], extra per dir)."""
    if seq_lens is not None and bool((seq_lens != x.shape[0]).any()):
        raise SpaError(f"{n.op}: sequence_lens shorter than the sequence are not supported")
    direction = n.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    ys, finals = [], []
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        outputs = [None] * x.shape[0]
        state = layout_h(d)
        for t in order:
            state = step(d, t, state)
            outputs[t] = state[0]
        ys.append(torch.stack(outputs))
        finals.append(state)
    return torch.stack(ys, 1), finals


def _rnn_io(n, x, *states):
    if n.get("layout", 0):
        return x.transpose(0, 1), [s.transpose(0, 1) if s is not None else None for s in states]
    return x, list(states)


def _rnn_out(n, y, *finals):
    if n.get("layout", 0):  # Y [batch, seq, dirs, H], states [batch, dirs, H]
        return (y.permute(2, 0, 1, 3),) + tuple(f.transpose(0, 1) for f in finals)
    return (y,) + finals


def _init(state, d, batch, hidden, like):
    if state is None:
        return torch.zeros(batch, hidden, dtype=like.dtype)
    return state[d]


def _clip_gates(n, g):
    c = n.get("clip")
    return g.clamp(-c, c) if c is not None else g


@op("LSTM")
def _lstm(m, n, env, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None, quantized=lambda v: v):
    """`quantized`: what the products read of the inputs and of each step's hidden state (onnxruntime's
    DynamicQuantizeLSTM quantizes both)."""
    x, (h0, c0) = _rnn_io(n, x, h0, c0)
    hidden = n.get("hidden_size") or r.shape[-1]
    dirs = w.shape[0]
    acts = _activations(n, ["Sigmoid", "Tanh", "Tanh"], dirs)
    batch = x.shape[1]
    proj = [torch.matmul(quantized(x), w[d].T) + (b[d, :4 * hidden] + b[d, 4 * hidden:] if b is not None else 0)
            for d in range(dirs)]

    def step(d, t, state):
        ht, ct = state
        fa, ga, ha = acts[3 * d:3 * d + 3]
        gates = _clip_gates(n, proj[d][t] + quantized(ht) @ r[d].T)
        i, o, fg, c = gates.chunk(4, -1)
        if p is not None:
            pi, po, pf = p[d].chunk(3)
            i, fg = i + pi * ct, fg + pf * ct
        i = fa(i)
        fg = 1 - i if n.get("input_forget", 0) else fa(fg)
        ct = fg * ct + i * ga(c)
        if p is not None:
            o = o + po * ct
        ht = fa(o) * ha(ct)
        return ht, ct

    def first(d):
        return _init(h0, d, batch, hidden, x), _init(c0, d, batch, hidden, x)

    y, finals = _recurrent(n, x, seq_lens, first, step)
    return _rnn_out(n, y, torch.stack([s[0] for s in finals]), torch.stack([s[1] for s in finals]))


@op("GRU")
def _gru(m, n, env, x, w, r, b=None, seq_lens=None, h0=None):
    x, (h0,) = _rnn_io(n, x, h0)
    hidden = n.get("hidden_size") or r.shape[-1]
    dirs = w.shape[0]
    acts = _activations(n, ["Sigmoid", "Tanh"], dirs)
    batch = x.shape[1]
    lbr = n.get("linear_before_reset", 0)
    proj = [torch.matmul(x, w[d].T) + (b[d, :3 * hidden] if b is not None else 0) for d in range(dirs)]

    def step(d, t, state):
        (ht,) = state
        fa, ga = acts[2 * d:2 * d + 2]
        rb = b[d, 3 * hidden:] if b is not None else torch.zeros(3 * hidden, dtype=x.dtype)
        xz, xr, xh = proj[d][t].chunk(3, -1)
        rz, rr, rh = r[d].chunk(3, 0)
        bz, br, bh = rb.chunk(3)
        z = fa(_clip_gates(n, xz + ht @ rz.T + bz))
        rt = fa(_clip_gates(n, xr + ht @ rr.T + br))
        if lbr:
            hh = ga(_clip_gates(n, xh + rt * (ht @ rh.T + bh)))
        else:
            hh = ga(_clip_gates(n, xh + (rt * ht) @ rh.T + bh))
        return ((1 - z) * hh + z * ht,)

    def first(d):
        return (_init(h0, d, batch, hidden, x),)

    y, finals = _recurrent(n, x, seq_lens, first, step)
    return _rnn_out(n, y, torch.stack([s[0] for s in finals]))


@op("RNN")
def _rnn(m, n, env, x, w, r, b=None, seq_lens=None, h0=None):
    x, (h0,) = _rnn_io(n, x, h0)
    hidden = n.get("hidden_size") or r.shape[-1]
    dirs = w.shape[0]
    acts = _activations(n, ["Tanh"], dirs)
    batch = x.shape[1]
    proj = [torch.matmul(x, w[d].T) + (b[d, :hidden] + b[d, hidden:] if b is not None else 0)
            for d in range(dirs)]

    def step(d, t, state):
        (ht,) = state
        return (acts[d](_clip_gates(n, proj[d][t] + ht @ r[d].T)),)

    def first(d):
        return (_init(h0, d, batch, hidden, x),)

    y, finals = _recurrent(n, x, seq_lens, first, step)
    return _rnn_out(n, y, torch.stack([s[0] for s in finals]))


# ------------------------------------------------------------------------------------------------
# control flow
# ------------------------------------------------------------------------------------------------
def _run_subgraph(m, n, key, env, bound: dict):
    from .torch_onnx import run_graph

    graph = n.graph_protos[key]
    scope = dict(env)
    for t in graph.initializer:
        scope[t.name] = torch.from_numpy(numpy_helper.to_array(t).copy())
    scope.update(bound)
    run_graph(m, n.graphs[key], scope)
    return [scope[o.name] for o in graph.output]


@op("If")
def _if(m, n, env, cond):
    branch = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
    return tuple(_run_subgraph(m, n, branch, env, {}))


@op("Loop")
def _loop(m, n, env, trip=None, cond=None, *carried):
    body = n.graph_protos["body"]
    names = [i.name for i in body.input]
    limit = int(trip.item()) if trip is not None else None
    keep_going = bool(cond.item()) if cond is not None else True
    carried = list(carried)
    scans: list[list] = []
    i = 0
    while keep_going and (limit is None or i < limit):
        bound = {names[0]: torch.tensor(i, dtype=torch.int64), names[1]: torch.tensor(keep_going)}
        bound.update(zip(names[2:], carried))
        out = _run_subgraph(m, n, "body", env, bound)
        keep_going = bool(out[0].item())
        carried = out[1:1 + len(carried)]
        scans.append(out[1 + len(carried):])
        i += 1
    n_scan = len(body.output) - 1 - len(carried)
    stacked = [torch.stack([s[k] for s in scans]) if scans else torch.zeros(0) for k in range(n_scan)]
    return tuple(carried) + tuple(stacked)
