"""Random, valid convolutional ONNX models for property-based tests.

Models are built directly with ``onnx.helper`` (no torch).  A model is described by a
plain, JSON-serialisable list of *blocks* plus a weight seed; :func:`build_from_blocks`
turns that description into a ``ModelProto`` deterministically, and the hypothesis
strategies below draw descriptions with the tensor shapes tracked so that every drawn
model is valid.

Public API
----------
``cnn_models(**kw)``            strategy of ``onnx.ModelProto``
``cnn_specs(**kw)``             strategy of :class:`CNNSpec` (readable repr, ``.build()``)
``build_from_blocks(blocks, seed=0, *, opset=17, size=16, in_channels=3)``
``spec_from_model(model)``      recover the :class:`CNNSpec` stored in a built model
``random_inputs(model, batch=2, seed=0)`` / ``run_model(model, batch=2, seed=0)``

The graph input is ``input`` with shape ``["batch", in_channels, size, size]``.  Every
model carries its description in ``metadata_props["spa.random_graphs"]`` (JSON), so a
failing example can be rebuilt with ``spec_from_model(m).build()``.

Block vocabulary (each block is a dict with an ``"op"`` key).  *Layers* are the simple
blocks that may also appear inside branches:

``{"op": "conv", "out": 8, "k": 3, "stride": 1, "bias": True}``   (pads k//2)
``{"op": "dwconv", "k": 3, "stride": 1, "bias": False}``          (group == C == C_out)
``{"op": "gconv", "group": 2, "out": 8, "k": 1, "stride": 1, "bias": True}``
``{"op": "bn"}``
``{"op": "act", "kind": "relu"|"sigmoid"|"leaky_relu"|"clip"|"hardswish", "alpha": 0.1}``
    (clip is Clip(0, 6) with min/max as inputs; hardswish at opset < 14 is emitted as
    HardSigmoid(1/6, 0.5) + Mul, as exporters do)
``{"op": "pool", "kind": "max"|"avg", "k": 2|3, "stride": 1|2}``  (k=3 pads 1)

Composite blocks:

``{"op": "residual", "branches": [[layers...], [layers...]]}``  two branches of the
    same tensor, joined by Add; an empty branch is the identity shortcut.
``{"op": "concat", "branches": [[layers...], ...]}``  2-3 branches, Concat axis 1;
    an empty branch passes the input through.
``{"op": "se", "hidden": 4}``  GlobalAveragePool -> Conv1x1 -> Relu -> Conv1x1 ->
    Sigmoid -> Mul.
``{"op": "split", "sizes": [2, 6], "branches": [[layers] or None, ...], "order": [1, 0]}``
    Split axis 1 (sizes as an input), each part goes through its branch (None = the
    part is left unused), then the parts listed in ``order`` are concatenated (a single
    kept part is used directly).
``{"op": "slice", "start": 1, "end": 5, "enc": "plain"|"int64max"|"negative"}``
    Slice axis 1; ``int64max`` writes end as INT64_MAX (only when end == C),
    ``negative`` writes start (and end when end < C) as negative indices.
``{"op": "tap"}``  make the current tensor an extra graph output.
``{"op": "head", "kind": "gap_gemm"|"flatten_gemm", "classes": 5, "transB": True,
    "bias": True}``  GlobalAveragePool + Flatten + Gemm, or Flatten(axis=1) + Gemm.
``{"op": "head", "kind": "reshape_matmul", "classes": 5, "batch_dim": -1|0}``
    Reshape to [batch_dim, C*H*W] (constant shape) + MatMul (constant weight) + Add.

A head must be the last block; without one the final feature map is the output.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from spa.runtime import random_inputs as spa_random_inputs
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "INPUT_NAME",
    "CNNSpec",
    "build_from_blocks",
    "cnn_models",
    "cnn_specs",
    "spec_from_model",
    "random_inputs",
    "run_model",
]

INPUT_NAME = "input"
BATCH_DIM = "batch"
META_KEY = "spa.random_graphs"
INT64_MAX = 2**63 - 1
IR_VERSION = 8  # covers opsets 13..17 and is accepted by every onnxruntime we target

OPSETS = (17, 13)
SIZES = (8, 12, 16)
HEADS = ("gap_gemm", "flatten_gemm", "reshape_matmul")
ACTS = ("relu", "sigmoid", "leaky_relu", "clip", "hardswish")
LAYER_OPS = ("conv", "dwconv", "gconv", "bn", "act", "pool")
BLOCK_OPS = LAYER_OPS + ("residual", "concat", "se", "split", "slice", "tap")
POOL_CONFIGS = ((3, 1), (2, 2), (3, 2))  # (kernel, stride)


# --------------------------------------------------------------------------- builder


class _Builder:
    def __init__(self, seed: int, opset: int):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.output_names: set[str] = set()
        self._count: collections.Counter = collections.Counter()

    def fresh(self, base: str) -> str:
        self._count[base] += 1
        return f"{base}_{self._count[base]}"

    def const(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> Any:
        name = self.fresh(op.lower())
        outs = [f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    # random parameters -------------------------------------------------------------
    def weight(self, shape, fan_in: int) -> np.ndarray:
        std = np.sqrt(2.0 / max(fan_in, 1))
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def small(self, shape) -> np.ndarray:
        return (self.rng.standard_normal(shape) * 0.1).astype(np.float32)

    def positive(self, shape) -> np.ndarray:
        return self.rng.uniform(0.5, 1.5, size=shape).astype(np.float32)

    def add_output(self, name: str, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        self.output_names.add(name)


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _check_keys(blk: dict, where: str, required: tuple[str, ...]):
    missing = [k for k in required if k not in blk]
    if missing:
        _fail(where, f"missing keys {missing} in {blk!r}")


def _conv(b: _Builder, x, C, H, *, out, k, stride, bias, group, where):
    if k not in (1, 3):
        _fail(where, f"kernel must be 1 or 3, got {k}")
    if stride not in (1, 2):
        _fail(where, f"stride must be 1 or 2, got {stride}")
    if out < 1 or group < 1 or C % group or out % group:
        _fail(where, f"group {group} must divide C_in {C} and C_out {out}")
    cpg = C // group
    w = b.const("W", b.weight((out, cpg, k, k), cpg * k * k))
    inputs = [x, w]
    if bias:
        inputs.append(b.const("B", b.small((out,))))
    p = k // 2
    y = b.node("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride],
               pads=[p, p, p, p], group=group)
    return y, out, (H - 1) // stride + 1


def _act(b: _Builder, x, kind: str, alpha, where):
    if kind == "relu":
        return b.node("Relu", [x])
    if kind == "sigmoid":
        return b.node("Sigmoid", [x])
    if kind == "leaky_relu":
        return b.node("LeakyRelu", [x], alpha=float(0.01 if alpha is None else alpha))
    if kind == "clip":
        lo = b.const("clip_min", np.array(0.0, dtype=np.float32))
        hi = b.const("clip_max", np.array(6.0, dtype=np.float32))
        return b.node("Clip", [x, lo, hi])
    if kind == "hardswish":
        if b.opset >= 14:
            return b.node("HardSwish", [x])
        hs = b.node("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)
        return b.node("Mul", [x, hs])
    _fail(where, f"unknown activation {kind!r}")


def _emit_layer(b: _Builder, x: str, C: int, H: int, blk: dict, where: str):
    op = blk.get("op")
    if op == "conv":
        _check_keys(blk, where, ("out", "k", "stride"))
        return _conv(b, x, C, H, out=blk["out"], k=blk["k"], stride=blk["stride"],
                     bias=blk.get("bias", True), group=1, where=where)
    if op == "dwconv":
        _check_keys(blk, where, ("k", "stride"))
        return _conv(b, x, C, H, out=C, k=blk["k"], stride=blk["stride"],
                     bias=blk.get("bias", True), group=C, where=where)
    if op == "gconv":
        _check_keys(blk, where, ("group", "out", "k", "stride"))
        return _conv(b, x, C, H, out=blk["out"], k=blk["k"], stride=blk["stride"],
                     bias=blk.get("bias", True), group=blk["group"], where=where)
    if op == "bn":
        scale = b.const("bn_scale", b.positive((C,)))
        bias = b.const("bn_bias", b.small((C,)))
        mean = b.const("bn_mean", b.small((C,)))
        var = b.const("bn_var", b.positive((C,)))
        return b.node("BatchNormalization", [x, scale, bias, mean, var], epsilon=1e-5), C, H
    if op == "act":
        _check_keys(blk, where, ("kind",))
        return _act(b, x, blk["kind"], blk.get("alpha"), where), C, H
    if op == "pool":
        _check_keys(blk, where, ("kind", "k", "stride"))
        k, s = blk["k"], blk["stride"]
        if (k, s) not in POOL_CONFIGS:
            _fail(where, f"pool (k, stride) must be one of {POOL_CONFIGS}, got {(k, s)}")
        if k > H + 2 * (k // 2):
            _fail(where, f"pool kernel {k} larger than padded input {H}")
        p = k // 2 if k == 3 else 0
        kind = {"max": "MaxPool", "avg": "AveragePool"}.get(blk["kind"])
        if kind is None:
            _fail(where, f"pool kind must be max or avg, got {blk['kind']!r}")
        y = b.node(kind, [x], kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])
        return y, C, (H + 2 * p - k) // s + 1
    _fail(where, f"not a layer op: {op!r}")


def _emit_branch(b, x, C, H, layers, where):
    for j, lyr in enumerate(layers):
        x, C, H = _emit_layer(b, x, C, H, lyr, f"{where}[{j}]")
    return x, C, H


def _emit_block(b: _Builder, x: str, C: int, H: int, blk: dict, where: str):
    op = blk.get("op")
    if op in LAYER_OPS:
        return _emit_layer(b, x, C, H, blk, where)
    if op == "residual":
        branches = blk.get("branches")
        if not isinstance(branches, list) or len(branches) != 2:
            _fail(where, "residual needs exactly two branches")
        ys = [_emit_branch(b, x, C, H, br, f"{where}.branches[{i}]")
              for i, br in enumerate(branches)]
        if ys[0][1:] != ys[1][1:]:
            _fail(where, f"residual branch shapes differ: {ys[0][1:]} vs {ys[1][1:]}")
        return b.node("Add", [ys[0][0], ys[1][0]]), ys[0][1], ys[0][2]
    if op == "concat":
        branches = blk.get("branches")
        if not isinstance(branches, list) or len(branches) < 2:
            _fail(where, "concat needs at least two branches")
        ys = [_emit_branch(b, x, C, H, br, f"{where}.branches[{i}]")
              for i, br in enumerate(branches)]
        if len({y[2] for y in ys}) != 1:
            _fail(where, f"concat branch spatial sizes differ: {[y[2] for y in ys]}")
        return b.node("Concat", [y[0] for y in ys], axis=1), sum(y[1] for y in ys), ys[0][2]
    if op == "se":
        _check_keys(blk, where, ("hidden",))
        r = blk["hidden"]
        g = b.node("GlobalAveragePool", [x])
        h, _, _ = _conv(b, g, C, 1, out=r, k=1, stride=1, bias=True, group=1, where=where)
        h = b.node("Relu", [h])
        s, _, _ = _conv(b, h, r, 1, out=C, k=1, stride=1, bias=True, group=1, where=where)
        s = b.node("Sigmoid", [s])
        return b.node("Mul", [x, s]), C, H
    if op == "split":
        _check_keys(blk, where, ("sizes", "branches", "order"))
        sizes, branches, order = blk["sizes"], blk["branches"], blk["order"]
        if len(sizes) < 2 or sum(sizes) != C or min(sizes) < 1:
            _fail(where, f"split sizes {sizes} must be >= 2 positive parts summing to {C}")
        if len(branches) != len(sizes):
            _fail(where, "one branch (or None) per split part")
        kept = [i for i, br in enumerate(branches) if br is not None]
        if not kept or sorted(order) != kept:
            _fail(where, f"order {order} must be a permutation of the kept parts {kept}")
        split = b.const("split", np.array(sizes, dtype=np.int64))
        parts = b.node("Split", [x, split], n_out=len(sizes), axis=1)
        ys = {}
        for i in kept:
            ys[i] = _emit_branch(b, parts[i], sizes[i], H, branches[i],
                                 f"{where}.branches[{i}]")
        if len({ys[i][2] for i in kept}) != 1:
            _fail(where, "split branch spatial sizes differ")
        if len(order) == 1:
            return ys[order[0]]
        y = b.node("Concat", [ys[i][0] for i in order], axis=1)
        return y, sum(ys[i][1] for i in order), ys[order[0]][2]
    if op == "slice":
        _check_keys(blk, where, ("start", "end"))
        s, e, enc = blk["start"], blk["end"], blk.get("enc", "plain")
        if not 0 <= s < e <= C:
            _fail(where, f"need 0 <= start < end <= C={C}, got {s}, {e}")
        if enc == "plain":
            es, ee = s, e
        elif enc == "int64max":
            if e != C:
                _fail(where, "enc int64max needs end == C")
            es, ee = s, INT64_MAX
        elif enc == "negative":
            es, ee = s - C, (e - C if e < C else INT64_MAX)
        else:
            _fail(where, f"unknown slice encoding {enc!r}")
        ins = [x,
               b.const("starts", np.array([es], dtype=np.int64)),
               b.const("ends", np.array([ee], dtype=np.int64)),
               b.const("axes", np.array([1], dtype=np.int64)),
               b.const("steps", np.array([1], dtype=np.int64))]
        return b.node("Slice", ins), e - s, H
    _fail(where, f"unknown block op {op!r}")


def _emit_head(b: _Builder, x, C, H, blk, where):
    _check_keys(blk, where, ("kind", "classes"))
    kind, n = blk["kind"], blk["classes"]
    if kind in ("gap_gemm", "flatten_gemm"):
        if kind == "gap_gemm":
            x = b.node("GlobalAveragePool", [x])
            K = C
        else:
            K = C * H * H
        f = b.node("Flatten", [x], axis=1)
        trans_b = bool(blk.get("transB", True))
        w = b.weight((n, K) if trans_b else (K, n), K)
        inputs = [f, b.const("fc_W", w)]
        if blk.get("bias", True):
            inputs.append(b.const("fc_B", b.small((n,))))
        return b.node("Gemm", inputs, transB=int(trans_b)), n
    if kind == "reshape_matmul":
        K = C * H * H
        bd = blk.get("batch_dim", -1)
        if bd not in (-1, 0):
            _fail(where, "batch_dim must be -1 or 0")
        r = b.node("Reshape", [x, b.const("shape", np.array([bd, K], dtype=np.int64))])
        m = b.node("MatMul", [r, b.const("fc_W", b.weight((K, n), K))])
        return b.node("Add", [m, b.const("fc_B", b.small((n,)))]), n
    _fail(where, f"unknown head kind {kind!r}")


def build_from_blocks(blocks: list[dict], seed: int = 0, *, opset: int = 17, size: int = 16,
                      in_channels: int = 3) -> onnx.ModelProto:
    """Build the model described by ``blocks`` (see the module docstring).

    Deterministic: the same arguments give byte-identical models.  Raises ``ValueError``
    for a description that does not fit the tracked shapes.
    """
    if opset < 13:
        raise ValueError("opset must be >= 13 (Split sizes are passed as an input)")
    b = _Builder(seed, opset)
    x, C, H = INPUT_NAME, in_channels, size
    out_shape: list = [BATCH_DIM, C, H, H]
    for i, blk in enumerate(blocks):
        where = f"blocks[{i}]"
        op = blk.get("op")
        if op == "head":
            if i != len(blocks) - 1:
                _fail(where, "head must be the last block")
            x, n = _emit_head(b, x, C, H, blk, where)
            out_shape = [BATCH_DIM, n]
            break
        if op == "tap":
            if x == INPUT_NAME:
                _fail(where, "cannot tap the graph input")
            if x not in b.output_names:
                b.add_output(x, [BATCH_DIM, C, H, H])
            continue
        x, C, H = _emit_block(b, x, C, H, blk, where)
        if H < 1:
            _fail(where, "spatial size dropped below 1")
        out_shape = [BATCH_DIM, C, H, H]
    if x == INPUT_NAME or x in b.output_names:
        x = b.node("Identity", [x])
    b.add_output(x, out_shape)
    graph = helper.make_graph(
        b.nodes, "spa_random_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                       [BATCH_DIM, in_channels, size, size])],
        b.outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="spa-tests-random-graphs")
    model.ir_version = IR_VERSION
    spec = dict(blocks=blocks, seed=seed, opset=opset, size=size, in_channels=in_channels)
    helper.set_model_props(model, {META_KEY: json.dumps(spec)})
    return model


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class CNNSpec:
    """A model description; ``repr`` is the Python call that rebuilds it."""

    blocks: list = field(hash=False)
    seed: int = 0
    opset: int = 17
    size: int = 16
    in_channels: int = 3

    def build(self) -> onnx.ModelProto:
        return build_from_blocks(self.blocks, self.seed, opset=self.opset, size=self.size,
                                 in_channels=self.in_channels)

    def __repr__(self) -> str:
        return (f"build_from_blocks({self.blocks!r}, seed={self.seed}, opset={self.opset}, "
                f"size={self.size}, in_channels={self.in_channels})")

    def _repr_pretty_(self, p, cycle):  # hypothesis / IPython pretty printer
        p.text(repr(self))


def spec_from_model(model: onnx.ModelProto) -> CNNSpec:
    """The description stored in a model made by :func:`build_from_blocks`."""
    for prop in model.metadata_props:
        if prop.key == META_KEY:
            return CNNSpec(**json.loads(prop.value))
    raise KeyError(f"model has no {META_KEY!r} metadata")


# --------------------------------------------------------------------------- strategies


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def _draw_layer(draw, C: int, H: int, *, allow_stride: bool, allow_pool: bool = True):
    can_stride = allow_stride and H >= 4
    ops = [o for o in LAYER_OPS if allow_pool or o != "pool"]
    op = draw(st.sampled_from(ops))
    if op == "gconv" and not _divisors(C):
        op = "conv"
    stride = draw(st.sampled_from((1, 2))) if can_stride and op in ("conv", "dwconv", "gconv") else 1
    if op == "conv":
        blk = {"op": "conv", "out": draw(st.integers(2, 16)), "k": draw(st.sampled_from((1, 3))),
               "stride": stride, "bias": draw(st.booleans())}
    elif op == "dwconv":
        blk = {"op": "dwconv", "k": draw(st.sampled_from((3, 1))), "stride": stride,
               "bias": draw(st.booleans())}
    elif op == "gconv":
        g = draw(st.sampled_from(_divisors(C)))
        out = g * draw(st.integers(1, max(1, 16 // g)))
        blk = {"op": "gconv", "group": g, "out": out, "k": draw(st.sampled_from((1, 3))),
               "stride": stride, "bias": draw(st.booleans())}
    elif op == "bn":
        blk = {"op": "bn"}
    elif op == "act":
        kind = draw(st.sampled_from(ACTS))
        blk = {"op": "act", "kind": kind}
        if kind == "leaky_relu":
            blk["alpha"] = draw(st.sampled_from((0.1, 0.01, 0.2)))
    else:  # pool
        configs = [(3, 1)]
        if can_stride:
            configs.append((3, 2))
            if H % 2 == 0:
                configs.append((2, 2))
        k, s = draw(st.sampled_from(configs))
        blk = {"op": "pool", "kind": draw(st.sampled_from(("max", "avg"))), "k": k, "stride": s}
    _, C2, H2 = _emit_shape(blk, C, H)
    return blk, C2, H2


def _emit_shape(blk: dict, C: int, H: int):
    """Shape effect of a layer without building it."""
    op = blk["op"]
    if op in ("conv", "gconv"):
        return None, blk["out"], (H - 1) // blk["stride"] + 1
    if op == "dwconv":
        return None, C, (H - 1) // blk["stride"] + 1
    if op == "pool":
        k, s = blk["k"], blk["stride"]
        p = k // 2 if k == 3 else 0
        return None, C, (H + 2 * p - k) // s + 1
    return None, C, H


def _draw_branch(draw, C, H, max_layers=2, allow_pool=True):
    layers = []
    for _ in range(draw(st.integers(0, max_layers))):
        blk, C, H = _draw_layer(draw, C, H, allow_stride=False, allow_pool=allow_pool)
        layers.append(blk)
    return layers, C, H


def _draw_block(draw, C: int, H: int, tapped: bool, allow_tap: bool):
    ops = [o for o in BLOCK_OPS if o != "tap" or (allow_tap and not tapped)]
    op = draw(st.sampled_from(ops))
    if op in ("split", "slice") and C < 2:
        op = "act"
    if op == "concat" and C > 24:
        op = "bn"
    if op in LAYER_OPS:
        return _draw_layer(draw, C, H, allow_stride=True)
    if op == "tap":
        return {"op": "tap"}, C, H
    if op == "residual":
        identity = draw(st.booleans())
        out = C if identity else draw(st.integers(2, 16))
        stride = 1 if identity or H < 4 else draw(st.sampled_from((1, 2)))
        branches = []
        for i in range(2):
            if i == 1 and identity:
                branches.append([])
                continue
            layers, c, _ = _draw_branch(draw, C, H, allow_pool=False)
            layers.append({"op": "conv", "out": out, "k": draw(st.sampled_from((1, 3))),
                           "stride": stride, "bias": draw(st.booleans())})
            branches.append(layers)
        return {"op": "residual", "branches": branches}, out, (H - 1) // stride + 1
    if op == "concat":
        n = draw(st.integers(2, 3))
        branches, total = [], 0
        for _ in range(n):
            layers, c, _ = _draw_branch(draw, C, H)
            branches.append(layers)
            total += c
        return {"op": "concat", "branches": branches}, total, H
    if op == "se":
        return {"op": "se", "hidden": draw(st.integers(1, 16))}, C, H
    if op == "split":
        n = draw(st.integers(2, min(3, C)))
        cuts = sorted(draw(st.lists(st.integers(1, C - 1), min_size=n - 1, max_size=n - 1,
                                    unique=True)))
        bounds = [0] + cuts + [C]
        sizes = [bounds[i + 1] - bounds[i] for i in range(n)]
        branches = []
        for s in sizes:
            fate = draw(st.sampled_from(("keep", "layers", "drop")))
            if fate == "drop":
                branches.append(None)
            elif fate == "keep":
                branches.append([])
            else:
                branches.append(_draw_branch(draw, s, H)[0])
        if all(br is None for br in branches):
            branches[0] = []
        kept = [i for i, br in enumerate(branches) if br is not None]
        order = list(draw(st.permutations(kept)))
        blk = {"op": "split", "sizes": sizes, "branches": branches, "order": order}
        out_c = 0
        for i in order:
            c = sizes[i]
            for lyr in branches[i]:
                _, c, _ = _emit_shape(lyr, c, H)
            out_c += c
        return blk, out_c, H
    if op == "slice":
        s = draw(st.integers(0, C - 1))
        e = draw(st.integers(s + 1, C))
        encs = ["plain", "negative"] + (["int64max"] if e == C else [])
        return {"op": "slice", "start": s, "end": e, "enc": draw(st.sampled_from(encs))}, e - s, H
    raise AssertionError(op)


@st.composite
def cnn_specs(draw, *, max_blocks: int = 6, opsets=OPSETS, sizes=SIZES, heads=HEADS,
              two_outputs: bool = True, in_channels: int = 3) -> CNNSpec:
    """Strategy for :class:`CNNSpec`.

    ``heads`` may include ``"none"`` (the final feature map is the output).  Opset 13 is
    drawn about a quarter of the time when ``opsets`` holds 17 and 13.
    """
    opsets = tuple(opsets)
    opset = opsets[0]
    if len(opsets) > 1 and draw(st.integers(0, 3)) == 3:
        opset = draw(st.sampled_from(opsets[1:]))
    size = draw(st.sampled_from(tuple(sizes)))
    C, H = in_channels, size
    blocks: list[dict] = []
    tapped = False
    for i in range(draw(st.integers(1, max_blocks))):
        blk, C, H = _draw_block(draw, C, H, tapped, allow_tap=two_outputs and i > 0)
        tapped = tapped or blk["op"] == "tap"
        blocks.append(blk)
    head = draw(st.sampled_from(tuple(heads)))
    if head in ("gap_gemm", "flatten_gemm"):
        blocks.append({"op": "head", "kind": head, "classes": draw(st.integers(2, 10)),
                       "transB": draw(st.booleans()), "bias": draw(st.booleans())})
    elif head == "reshape_matmul":
        blocks.append({"op": "head", "kind": head, "classes": draw(st.integers(2, 10)),
                       "batch_dim": draw(st.sampled_from((-1, 0)))})
    elif head not in ("none", None):
        raise ValueError(f"unknown head {head!r}")
    seed = draw(st.integers(0, 2**32 - 1))
    return CNNSpec(blocks, seed, opset, size, in_channels)


def cnn_models(**kwargs) -> st.SearchStrategy[onnx.ModelProto]:
    """Strategy for random valid CNN ``ModelProto``s (keyword arguments as :func:`cnn_specs`).

    Failing examples print as the ``build_from_blocks(...)`` call that rebuilds them.
    """
    return cnn_specs(**kwargs).map(CNNSpec.build)


def _pretty_model(obj, p, cycle):
    try:
        p.text(f"<ModelProto: {spec_from_model(obj)!r}>")
    except KeyError:
        p.text(f"<ModelProto graph={obj.graph.name!r} nodes={len(obj.graph.node)}>")


try:  # print drawn ModelProtos compactly in hypothesis failure reports
    from hypothesis.vendor.pretty import for_type_by_name

    for_type_by_name(type(onnx.ModelProto()).__module__, "ModelProto", _pretty_model)
except Exception:  # pragma: no cover - private hypothesis API may change
    pass


# --------------------------------------------------------------------------- running

def random_inputs(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict:
    """Standard-normal feeds for every graph input (symbolic dims get ``batch``)."""
    return spa_random_inputs(model, batch=batch, seed=seed)


def run_model(model: onnx.ModelProto, batch: int = 2, seed: int = 0, feeds: dict | None = None):
    """Run ``model`` once in onnxruntime (CPU); returns the list of outputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    if feeds is None:
        feeds = random_inputs(model, batch, seed)
    return sess.run(None, feeds)
