"""The architecture-only "light" models shipped with the onnx package, made runnable.

``onnx/backend/test/data/light/*.onnx`` are the classic ONNX model-zoo CNNs (AlexNet,
DenseNet-121, GoogLeNet/Inception v1+v2, ResNet-50, ShuffleNet v1, SqueezeNet, VGG-19,
ZFNet-512; Caffe2 exports, IR version 3, opset 9) with the big weights replaced by
placeholders: each weight ``w`` is the output of ``ConstantOfShape(w__SHAPE)`` with value
0.02, ``w__SHAPE`` being an int64 initializer.  A few small float vectors (some biases
and BatchNorm/scale parameters) are stored as ordinary initializers and are kept.

``materialize(path, seed)`` replaces every placeholder by an initializer with seeded
random values of the same shape and dtype, chosen by the tensor's role so the network
stays numerically sane (He-uniform for Conv/Gemm/MatMul weights, values in [0.5, 1.5]
for BatchNorm scale/variance and Mul scales, uniform with std 0.1 otherwise).  It also turns the
IR-3 convention "every initializer is also a graph input" into plain constants (IR 4),
because a graph input is a pruning boundary for SPA, and drops initializers that nothing
uses.  Nodes, attributes and the real initializers are left as they are.

Run ``python -m tests.light_models`` for the survey table (timings on this machine).
"""
from __future__ import annotations

import math
import os
import pathlib
import time
import zlib
from collections import Counter, defaultdict

import numpy as np
from spa.runtime import random_inputs as spa_random_inputs
import onnx
from onnx import helper, numpy_helper, shape_inference, version_converter

__all__ = [
    "LIGHT_DIR",
    "SLOW_LIGHT_MODELS",
    "light_model_paths",
    "materialize",
    "random_feeds",
    "run_once",
    "survey",
]

LIGHT_DIR = pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

# Models whose materialize + checker + onnxruntime load + one run takes more than ~2 s on
# the 2-core CI machine (see the survey in the module's __main__ / the report).
SLOW_LIGHT_MODELS = frozenset({"light_vgg19", "light_bvlc_alexnet", "light_zfnet512"})

PLACEHOLDER_OPS = ("ConstantOfShape", "RandomNormal", "RandomUniform")
_PASS_THROUGH = ("Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast", "Transpose",
                 "Flatten")
_POSITIVE_ROLES = {("BatchNormalization", 1), ("BatchNormalization", 4),
                   ("InstanceNormalization", 1)}


def light_model_paths(include_slow: bool = True) -> list[pathlib.Path]:
    """The ``light_*.onnx`` files, sorted by name (optionally without the slow ones)."""
    paths = sorted(LIGHT_DIR.glob("light_*.onnx"))
    if not include_slow:
        paths = [p for p in paths if p.stem not in SLOW_LIGHT_MODELS]
    return paths


def _const_value(name, inits, const_nodes):
    if name in inits:
        return numpy_helper.to_array(inits[name])
    if name in const_nodes:
        attr = const_nodes[name].attribute[0]
        return np.asarray(helper.get_attribute_value(attr)
                          if attr.name != "value" else numpy_helper.to_array(attr.t))
    return None


def _final_use(name, consumers):
    """Follow pass-through ops (Unsqueeze, Reshape, ...) to the op that uses a weight."""
    cur = name
    for _ in range(16):
        uses = consumers.get(cur, [])
        if not uses:
            return None, cur
        node, idx = uses[0]
        if node.op_type in _PASS_THROUGH and idx == 0:
            cur = node.output[0]
            continue
        return (node, idx), cur
    return None, cur


def _fan_in(use, shape):
    node, idx = use
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("Conv", "ConvTranspose") and idx == 1 and len(shape) >= 2:
        return int(np.prod(shape[1:]))
    if node.op_type == "Gemm" and idx in (0, 1) and len(shape) == 2:
        if idx == 1:
            return shape[1] if attrs.get("transB", 0) else shape[0]
        return shape[0] if attrs.get("transA", 0) else shape[1]
    if node.op_type == "MatMul" and idx == 1 and len(shape) >= 2:
        return shape[-2]
    return None


def _random_like(name, shape, dtype, use, use_shape, seed):
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shape = tuple(int(s) for s in shape)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"placeholder {name!r} has non-float dtype {dtype}")
    fan_in = _fan_in(use, use_shape) if use is not None and use_shape is not None else None
    role = (use[0].op_type, use[1]) if use is not None else None
    if role in _POSITIVE_ROLES or (role and role[0] in ("Mul", "Div")):
        arr = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    else:
        if fan_in:
            std = math.sqrt(2.0 / fan_in)
        elif len(shape) >= 2 and int(np.prod(shape[1:])) > 1:
            std = math.sqrt(1.0 / int(np.prod(shape[1:])))
        else:
            std = 0.1
        arr = rng.random(shape, dtype=np.float32)  # uniform: 2x faster than normal
        arr -= np.float32(0.5)
        arr *= np.float32(2.0 * math.sqrt(3.0) * std)  # U(-b, b) with std `std`
    return arr.astype(dtype, copy=False)


def _shapes(model):
    """name -> static shape, from onnx shape inference (graph inputs, outputs, values)."""
    inferred = shape_inference.infer_shapes(model)
    out = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[vi.name] = [d.dim_value for d in tt.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


def materialize(path, seed: int = 0, *, check: bool = True, run: bool = False,
                calibrate: bool = True, strip_initializer_inputs: bool = True,
                opset: int | None = None) -> onnx.ModelProto:
    """Load a light model and replace every placeholder weight by seeded random values.

    Placeholders are ``ConstantOfShape`` / ``RandomNormal`` / ``RandomUniform`` nodes whose
    inputs are all constant; each becomes an initializer with the node's output name.

    ``check``: ``onnx.checker.check_model(full_check=True)``.
    ``calibrate``: one onnxruntime run on random inputs, then the last linear layer before
    each Softmax (or graph output) is scaled so its logits have std ~2; without it the
    random ResNet-50 / ShuffleNet logits reach 1e4..1e7 and the softmax saturates.
    ``run``: fail unless that onnxruntime run gives finite outputs (runs it if needed).
    ``strip_initializer_inputs``: drop initializers from ``graph.input`` (IR >= 4).
    ``opset``: convert with ``onnx.version_converter`` (13 and 17 verified: same outputs).
    Deterministic: the same ``path`` and ``seed`` give byte-identical models.
    """
    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    consumers = defaultdict(list)
    for n in g.node:
        for i, name in enumerate(n.input):
            consumers[name].append((n, i))
    shapes = _shapes(model)

    keep, new_names = [], set()
    for n in g.node:
        if n.op_type in PLACEHOLDER_OPS:
            attrs = {a.name: a for a in n.attribute}
            if n.op_type == "ConstantOfShape":
                shape = _const_value(n.input[0], inits, const_nodes)
                dtype = (helper.tensor_dtype_to_np_dtype(attrs["value"].t.data_type)
                         if "value" in attrs else np.float32)
            else:
                shape = (helper.get_attribute_value(attrs["shape"])
                         if "shape" in attrs and not n.input else None)
                dtype = helper.tensor_dtype_to_np_dtype(
                    helper.get_attribute_value(attrs["dtype"]) if "dtype" in attrs else 1)
            if shape is not None:
                name = n.output[0]
                use, used_as = _final_use(name, consumers)
                arr = _random_like(name, np.asarray(shape).reshape(-1), dtype, use,
                                   shapes.get(used_as), seed)
                t = g.initializer.add()  # written in place: no copy of big tensors
                t.name = name
                t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
                t.dims.extend(arr.shape)
                t.raw_data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
                new_names.add(name)
                continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)

    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in used:
            del g.initializer[i]
    new_inits = [t for t in g.initializer if t.name in new_names]
    if strip_initializer_inputs:
        init_names = {t.name for t in g.initializer}
        real_inputs = [vi for vi in g.input if vi.name not in init_names and vi.name in used]
        del g.input[:]
        g.input.extend(real_inputs)
        model.ir_version = max(model.ir_version, 4)
    else:
        init_names = {t.name for t in g.initializer}
        have = {vi.name for vi in g.input}
        for t in new_inits:
            if t.name not in have:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        real_inputs = [vi for vi in g.input if vi.name in used]
        del g.input[:]
        g.input.extend(real_inputs)

    if opset is not None and opset != _onnx_opset(model):
        model = version_converter.convert_version(model, opset)
        model.ir_version = max(model.ir_version,
                               helper.find_min_ir_version_for(list(model.opset_import)))
    if check:
        onnx.checker.check_model(model, full_check=True)
    if calibrate or run:
        outs = _calibrate(model, new_names, seed, scale=calibrate)
        if run:
            for o in outs:
                if not np.isfinite(o).all():
                    raise AssertionError(f"{path}: non-finite output")
    return model


def _onnx_opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


_HOMOGENEOUS = ("Relu", "GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool",
                "Reshape", "Flatten", "Dropout", "Identity", "Squeeze", "Unsqueeze")
LOGIT_STD = 2.0


def _calibrate(model, placeholder_names, seed, scale=True):
    """Run once; rescale each logit-producing layer's placeholder weight and bias so the
    logits have std LOGIT_STD (exact: only positively homogeneous ops lie in between).
    Returns the model's outputs (before rescaling)."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}

    def init_behind(name):  # weight initializer, possibly behind Reshape/Unsqueeze
        while name not in inits and name in producers and \
                producers[name].op_type in _PASS_THROUGH:
            name = producers[name].input[0]
        return name if name in inits else None

    logits = [n.input[0] for n in g.node if n.op_type in ("Softmax", "LogSoftmax")]
    logits = logits or [o.name for o in g.output]
    plan = {}
    for name in logits:
        cur = name
        while cur in producers and producers[cur].op_type in _HOMOGENEOUS:
            cur = producers[cur].input[0]
        node = producers.get(cur)
        if node is None or node.op_type not in ("Conv", "Gemm"):
            continue
        params = [init_behind(i) for i in node.input[1:] if i]
        if params and all(p in placeholder_names for p in params):
            plan[name] = params
    extra = [n for n in plan if n not in {o.name for o in g.output}]
    g.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                    for n in extra)
    try:
        outs, _, _ = run_once(model, seed=seed)
    finally:
        del g.output[len(g.output) - len(extra):]
    values = dict(zip([o.name for o in g.output] + extra, outs))
    if scale:
        done = set()
        for name, params in plan.items():
            std = float(np.std(values[name]))
            if not np.isfinite(std) or std == 0 or done & set(params):
                continue
            for p in params:
                arr = numpy_helper.to_array(inits[p])
                inits[p].CopyFrom(numpy_helper.from_array(
                    (arr * np.float32(LOGIT_STD / std)).astype(arr.dtype), p))
            done |= set(params)
    return outs[:len(outs) - len(extra)]


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 1) -> dict:
    """Random feeds for the model's non-initializer inputs (symbolic dims -> ``batch``)."""
    return spa_random_inputs(model, batch=batch, seed=seed)


def run_once(model: onnx.ModelProto, seed: int = 0, threads: int = 1, feeds=None):
    """One onnxruntime CPU session + run: returns (outputs, load_seconds, run_seconds)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    outs = sess.run(None, feeds if feeds is not None else random_feeds(model, seed))
    t2 = time.perf_counter()
    return outs, t1 - t0, t2 - t1


def _macs(model, shapes):
    total = 0
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv" and n.output[0] in shapes and n.input[1] in shapes:
            w = shapes[n.input[1]]
            total += int(np.prod(shapes[n.output[0]])) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm" and n.input[0] in shapes and n.output[0] in shapes:
            a = shapes[n.input[0]]
            k = a[0] if attrs.get("transA", 0) else a[1]
            total += int(np.prod(shapes[n.output[0]])) * k
        elif n.op_type == "MatMul" and n.input[0] in shapes and n.output[0] in shapes:
            total += int(np.prod(shapes[n.output[0]])) * shapes[n.input[0]][-1]
    return total


def survey(path, seed: int = 0, threads: int = 1) -> dict:
    """Facts about one light model: ops, opset, inputs, weights, params, MACs, timings."""
    path = pathlib.Path(path)
    raw = onnx.load(str(path))
    g = raw.graph
    init_names = {t.name for t in g.initializer}
    n_placeholders = sum(n.op_type in PLACEHOLDER_OPS for n in g.node)
    n_real = sum(t.data_type == onnx.TensorProto.FLOAT for t in g.initializer)
    info = {
        "name": path.stem,
        "ir_version": raw.ir_version,
        "opset": {o.domain or "ai.onnx": o.version for o in raw.opset_import},
        "ops": dict(Counter(n.op_type for n in g.node if n.op_type not in PLACEHOLDER_OPS)),
        "inputs": {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
                   for vi in g.input if vi.name not in init_names},
        "outputs": {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
                    for vi in g.output},
        "weights": f"{n_placeholders} ConstantOfShape placeholders, "
                   f"{n_real} real float initializers",
    }
    t0 = time.perf_counter()
    try:
        m = materialize(path, seed, check=False)
        t1 = time.perf_counter()
        onnx.checker.check_model(m, full_check=True)
        t2 = time.perf_counter()
        info["materialize_s"], info["check_s"] = t1 - t0, t2 - t1
        info["params"] = int(sum(np.prod(t.dims) for t in m.graph.initializer
                                 if t.data_type == onnx.TensorProto.FLOAT))
        info["macs"] = _macs(raw, _shapes(raw))
        outs, load_s, run_s = run_once(m, seed, threads)
        info["load_s"], info["run_s"] = load_s, run_s
        info["finite"] = all(bool(np.isfinite(o).all()) for o in outs)
        info["runs"] = True
    except Exception as exc:  # report, do not hide
        info["runs"] = False
        info["error"] = f"{type(exc).__name__}: {exc}"[:300]
    info["total_s"] = time.perf_counter() - t0
    return info


def _main():
    import sys

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    print(f"onnx {onnx.__version__}, {os.cpu_count()} cpus, ort intra-op threads={threads}")
    print("| model | opset | input | ops | params | GMACs | runs | materialize+calib s | check s "
          "| ort load s | ort run s | total s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in light_model_paths():
        s = survey(p, threads=threads)
        ops = ", ".join(f"{k}x{v}" for k, v in sorted(s["ops"].items(), key=lambda kv: -kv[1]))
        inp = "; ".join(f"{v}" for v in s["inputs"].values())
        if not s["runs"]:
            print(f"| {s['name']} | {s['opset']} | {inp} | {ops} | | | NO: {s['error']} |")
            continue
        print(f"| {s['name']} | {s['opset']['ai.onnx']} | {inp} | {ops} | "
              f"{s['params'] / 1e6:.2f}M | {s['macs'] / 1e9:.2f} | "
              f"{'yes' if s['finite'] else 'NaN/inf'} | {s['materialize_s']:.2f} | "
              f"{s['check_s']:.2f} | {s['load_s']:.2f} | {s['run_s']:.2f} | "
              f"{s['total_s']:.2f} |")


if __name__ == "__main__":
    _main()
