"""Load an ONNX model and give the analysis what it needs: constants, producers, consumers, shapes."""
from __future__ import annotations

import functools
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from .errors import SpaError

CONTROL_FLOW = {"If", "Loop", "Scan"}


def as_model(model_or_path) -> onnx.ModelProto:
    """A ModelProto as is, or the file at that path read by `load_model`."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return load_model(os.fspath(model_or_path))


def load_model(path: str) -> onnx.ModelProto:
    """Read an ONNX file (and its external data) or raise a one-line SpaError."""
    if os.path.isdir(path):
        raise SpaError(f"{path} is a directory, not an ONNX file")
    if not os.path.exists(path):
        raise SpaError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf gives long, unhelpful messages
        raise SpaError(f"{path} is not a valid ONNX model ({type(exc).__name__})") from None
    if not model.graph.node and not model.graph.initializer:
        raise SpaError(f"{path} is not an ONNX model (empty or not a ModelProto)")
    base = os.path.dirname(os.path.abspath(path))
    for tensor in _external_tensors(model):
        location = dict((e.key, e.value) for e in tensor.external_data).get("location", "")
        if not os.path.exists(os.path.join(base, location)):
            raise SpaError(f"{path}: external data file '{location}' for tensor '{tensor.name}' is missing")
    try:
        onnx.load_external_data_for_model(model, base)
    except Exception as exc:
        raise SpaError(f"{path}: external data could not be read ({exc})") from None
    return model


def external_tensor_names(path: str) -> set:
    """Names of the tensors a model file keeps in external data (empty when none)."""
    return {t.name for t in _external_tensors(onnx.load(path, load_external_data=False))}


def _external_tensors(model: onnx.ModelProto):
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, whatever attribute carries it."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def outer_scope_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read from the enclosing graph (hidden consumers)."""
    used: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                used.update(x for x in n.input if x and x not in local)
                used.update(outer_scope_inputs(n) - local)
            used.update(o.name for o in g.output if o.name not in local)
    return used


class Consts(Mapping):
    """Constant tensors by name (initializers and Constant nodes), read lazily. Values are kept
    once read (scoring and rewriting read the same weights) up to a memory budget; beyond it
    they are converted on every access, so big models are not held twice."""

    CACHE_BUDGET = 1 << 28  # bytes of numpy copies kept

    def __init__(self, model: onnx.ModelProto):
        self._protos = {t.name: t for t in model.graph.initializer}
        self._cache = {}
        self._cached_bytes = 0
        for node in model.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = constant_node_value(node)
                if value is not None:
                    self._cache[node.output[0]] = value

    def __getitem__(self, name):
        if name in self._cache:
            return self._cache[name]
        value = numpy_helper.to_array(self._protos[name])
        if self._cached_bytes + value.nbytes <= self.CACHE_BUDGET:
            self._cache[name] = value
            self._cached_bytes += value.nbytes
        return value

    def __contains__(self, name):
        return name in self._cache or name in self._protos

    def __iter__(self):
        yield from self._protos
        yield from (n for n in self._cache if n not in self._protos)

    def __len__(self):
        return len(set(self._protos) | set(self._cache))

    def shape(self, name) -> tuple:
        if name in self._protos:
            return tuple(self._protos[name].dims)
        return tuple(self._cache[name].shape)

    def dtype(self, name):
        if name in self._protos:
            return onnx.helper.tensor_dtype_to_np_dtype(self._protos[name].data_type)
        return self._cache[name].dtype


@dataclass
class Graph:
    """A read-mostly view of the top-level graph of a model."""

    model: onnx.ModelProto
    nodes: list = field(init=False)
    producer: dict = field(init=False)
    consumers: dict = field(init=False)
    consts: dict = field(init=False)
    shapes: dict = field(init=False)
    graph_inputs: set = field(init=False)
    graph_outputs: set = field(init=False)

    def __post_init__(self):
        g = self.model.graph
        self.nodes = list(g.node)
        self.producer = {}
        self.consumers = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            inputs = list(node.input)
            if node.op_type in CONTROL_FLOW:
                inputs += sorted(outer_scope_inputs(node) - set(inputs))
            for slot, name in enumerate(inputs):
                if name:
                    self.consumers[name].append((i, slot))
        self.consts = Consts(self.model)
        self.graph_inputs = {i.name for i in g.input if i.name not in self.consts}
        self.graph_outputs = {o.name for o in g.output}
        self.shapes = infer_shapes(self.model)
        for name in self.consts:
            self.shapes[name] = self.consts.shape(name)

    def const(self, name: str):
        """The constant value of a tensor (initializer or Constant node), or None."""
        return self.consts.get(name) if name else None

    def static_value(self, name: str):
        """A constant, or an integer tensor computed from shapes whose value does not change when
        the symbolic sizes do (e.g. Slice bounds derived from a static channel count)."""
        if not name:
            return None
        if name in self.consts:
            return self.consts[name]
        if "_probed" not in self.__dict__:
            self._probed = self._probe_parameter_inputs()
        return self._probed.get(name)

    def _probe_parameter_inputs(self) -> dict:
        wanted = set()
        for node in self.nodes:
            slots = PARAMETER_SLOTS.get(node.op_type, ())
            for x in (x for k, x in enumerate(node.input) if x and k in slots and x not in self.consts):
                wanted.add(x)
                producer = self.nodes[self.producer[x]] if x in self.producer else None
                if producer is not None and producer.op_type == "Concat":  # pieces of a shape
                    wanted.update(p for p in producer.input if p and p not in self.consts)
        if not wanted or weight_bytes(self.model) > PROBE_LIMIT:
            return {}
        runs = _run_with_outputs(self.model, sorted(wanted))
        if runs is None:
            return {}
        first, second = runs
        return {n: first[n] for n in wanted
                if n in first and n in second and np.shape(first[n]) == np.shape(second[n])
                and np.array_equal(first[n], second[n])}

    def is_static(self, name: str) -> bool:
        """True for constants and tensors computed from constants only (e.g. Cast(weight))."""
        if not name:
            return False
        if name in self.consts:
            return True
        if name in self.graph_inputs:
            return False
        cache = self.__dict__.setdefault("_static", {})
        if name not in cache:
            cache[name] = False  # guards against cycles
            index = self.producer.get(name)
            node = self.nodes[index] if index is not None else None
            cache[name] = bool(node is not None and node.op_type not in CONTROL_FLOW | {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
                               and all(self.is_static(x) for x in node.input if x))
        return cache[name]

    def dim(self, tensor: str, axis: int):
        """Static size of tensor's axis, or None when unknown or symbolic."""
        shape = self.shapes.get(tensor)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        d = shape[axis]
        return d if isinstance(d, int) and d >= 0 else None

    def rank(self, tensor: str):
        shape = self.shapes.get(tensor)
        return None if shape is None else len(shape)

    def node_name(self, index: int) -> str:
        node = self.nodes[index]
        return node.name or f"{node.op_type}#{index}"

    def opset(self, domain: str = "") -> int:
        for imp in self.model.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                return imp.version
        return 1


def fill_unknown_dim(shape, other):
    """A reshape keeps the element count: one unknown dim of `shape` (e.g. a -1 head count) is
    the quotient once the symbolic dims the two shapes share cancel out."""
    if shape is None or other is None or list(shape).count("?") != 1:
        return shape
    rest = [d for d in shape if d != "?"]
    known_other = list(other)
    for d in list(rest):
        if isinstance(d, str) and d in known_other:
            rest.remove(d)
            known_other.remove(d)
    if not all(isinstance(d, int) for d in rest + known_other):
        return shape
    total, part = int(np.prod(known_other, dtype=np.int64)), int(np.prod(rest, dtype=np.int64))
    if part == 0 or total % part:
        return shape
    return tuple(total // part if d == "?" else d for d in shape)


PROBE_LIMIT = 200_000_000  # bytes of weights above which SPA does not run the model to learn shapes


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Size of a tensor's data from its dims (ByteSize() walks the bytes and is slow)."""
    return math.prod(tensor.dims) * _itemsize(tensor.data_type)


@functools.cache
def _itemsize(data_type: int) -> int:
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def weight_bytes(model: onnx.ModelProto) -> int:
    """Size of the weights (ModelProto.ByteSize() fails above protobuf's 2 GB limit)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer)


_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
                  onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}


def _shape_relevant(tensor: onnx.TensorProto) -> bool:
    """Whether shape inference may read the tensor's values: integer vectors (shapes, axes,
    bounds, indices) and tiny scalars; weights only contribute their dims."""
    size = tensor_bytes(tensor)
    return size <= 1024 or (tensor.data_type in _INTEGER_TYPES and size <= 1 << 20)


def _without_large_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference needs weights' shapes, not their bytes: a copy of the model whose weights
    carry dims only (never copying their data), far under protobuf's 2 GB."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.name = model.graph.name
    for field_name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(light.graph, field_name).extend(getattr(model.graph, field_name))
    for tensor in model.graph.initializer:
        if _shape_relevant(tensor):
            light.graph.initializer.append(tensor)
        else:
            light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    light.functions.extend(model.functions)
    return light


def _read_shapes(graph) -> dict:
    shapes = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value")
                else "?" if not d.dim_param or d.dim_param.startswith("unk__") else d.dim_param
                for d in t.shape.dim)
    return shapes


def _symbolic_shapes(light: onnx.ModelProto) -> dict:
    """onnxruntime's symbolic shape inference: it follows shape arithmetic (Shape -> Gather ->
    Div -> Concat -> Expand/Slice/Reshape) that ONNX's own inference gives up on. `light`'s weights
    carry dims only (_without_large_data); they go in as graph inputs, because the inference reads
    the values of any initializer an elementwise op touches and fails on an empty one (an RMSNorm
    weight of 2048 floats froze every head of a 1.1B LLaMA; 256 floats fit under the size limit)."""
    try:
        inferred = _symbolic_shape_inference().infer_shapes(_weights_as_inputs(light), auto_merge=True)
    except Exception:
        return {}
    weights = {t.name for t in light.graph.initializer}
    return {k: v for k, v in _read_shapes(inferred.graph).items() if "?" not in v and k not in weights}


def _weights_as_inputs(light: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `light` whose data-less weights are graph inputs of the same type and shape."""
    model = onnx.ModelProto()
    model.CopyFrom(light)
    kept = [t for t in model.graph.initializer if _shape_relevant(t)]
    dropped = [t for t in model.graph.initializer if not _shape_relevant(t)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in dropped)
    return model


@functools.lru_cache(maxsize=1)
def _symbolic_shape_inference():
    """onnxruntime.tools.symbolic_shape_infer, loaded without its package's __init__ (which
    imports torch when installed: seconds per process for nothing)."""
    import importlib.util
    import sys

    import onnxruntime

    name = "_spa_ort_symbolic_shape_infer"
    path = os.path.join(os.path.dirname(onnxruntime.__file__), "tools", "symbolic_shape_infer.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.SymbolicShapeInference


def _settle_reshapes(graph, shapes) -> list:
    """value_info for Reshape outputs whose one unknown dim (a -1) follows from the element count."""
    types = {vi.name: vi.type.tensor_type.elem_type for vi in graph.value_info}
    settled = []
    for node in graph.node:
        if node.op_type != "Reshape" or node.output[0] not in shapes:
            continue
        out = shapes[node.output[0]]
        filled = fill_unknown_dim(out, shapes.get(node.input[0]))
        if filled != out and node.output[0] in types:
            settled.append(onnx.helper.make_tensor_value_info(node.output[0], types[node.output[0]], list(filled)))
    return settled


def infer_shapes(model: onnx.ModelProto) -> dict:
    """Per-tensor shapes (ints, or strings for symbolic dims) from ONNX shape inference."""
    light = _without_large_data(model)
    for _ in range(4):  # each round may settle reshape dims that the next round propagates
        try:
            inferred = shape_inference.infer_shapes(light, data_prop=True)
        except Exception:
            inferred = model
        shapes = _read_shapes(inferred.graph)
        settled = _settle_reshapes(inferred.graph, shapes)
        if not settled or inferred is model:
            break
        light.graph.value_info.extend(settled)
    if any("?" in shape for shape in shapes.values()):
        for name, better in _symbolic_shapes(light).items():
            if name not in shapes or ("?" in shapes[name] and len(better) == len(shapes[name])):
                shapes[name] = better
    g = inferred.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    missing = [o for n in g.node for o in n.output
               if o and o not in consts and (o not in shapes or "?" in shapes[o])]
    if missing and weight_bytes(model) < PROBE_LIMIT:
        for name, ran in shapes_by_running(model, missing).items():
            inferred = shapes.get(name)
            if inferred is not None and len(inferred) == len(ran):
                ran = tuple(d if d != "?" else r for d, r in zip(inferred, ran))
            shapes[name] = ran
    return shapes


# integer inputs that parameterise an op (bounds, sizes, axes), by op type
PARAMETER_SLOTS = {"Slice": (1, 2, 3, 4), "Split": (1,), "Reshape": (1,), "Resize": (1, 2, 3),
                   "Pad": (1, 3), "Squeeze": (1,), "Unsqueeze": (1,), "Tile": (1,), "Expand": (1,),
                   "Gather": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,)}


PROBE_SIZES = ((2, 30), (3, 38))  # (batch, first other symbolic size) of the two probe runs


def _probe_dims(model: onnx.ModelProto, run: int) -> dict:
    """A distinct size for every symbolic input dim (batch names from the probe's batch), so a
    probed shape can say which symbolic dim it carries."""
    batch, base = PROBE_SIZES[run]
    names = []
    for vi in model.graph.input:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param and not d.HasField("dim_value") and d.dim_param not in names and k > 0:
                names.append(d.dim_param)
    return {name: base + 2 * i for i, name in enumerate(names)}


def _run_with_outputs(model: onnx.ModelProto, names):
    """Two onnxruntime runs (different symbolic sizes) exposing the named tensors, or None."""
    from .runtime import random_inputs, session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.ValueInfoProto(name=n) for n in names if n not in known)
    try:
        sess = session(probe, quiet=True)  # a probe that fails is fine: the caller freezes
        outs = [o.name for o in sess.get_outputs()]
        return [dict(zip(outs, sess.run(None, random_inputs(model, batch=PROBE_SIZES[r][0],
                                                             dims=_probe_dims(model, r),
                                                             default_dim=PROBE_SIZES[r][1]))))
                for r in (0, 1)]
    except Exception:
        return None


def shapes_by_running(model: onnx.ModelProto, names) -> dict:
    """Shapes shape inference could not give, read from two onnxruntime runs with different
    symbolic sizes: a dim that differs between the runs is symbolic."""
    runs = _run_with_outputs(model, names)
    if runs is None:
        return {}
    sizes = {}  # (size in run 0, size in run 1) -> symbolic input dim
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].dim_param and not dims[0].HasField("dim_value"):
            sizes.setdefault((PROBE_SIZES[0][0], PROBE_SIZES[1][0]), dims[0].dim_param)
    first, second = _probe_dims(model, 0), _probe_dims(model, 1)
    sizes.update({(first[n], second[n]): n for n in first})
    shapes = {}
    for n in names:
        if n in runs[0] and n in runs[1]:
            a, b = np.shape(runs[0][n]), np.shape(runs[1][n])
            if len(a) == len(b):
                shapes[n] = tuple(x if x == y else _symbolic_name(x, y, sizes) for x, y in zip(a, b))
    return shapes


def _symbolic_name(x, y, sizes) -> str:
    """The symbolic dim whose probe sizes were (x, y), or 'k*name' for a unique integer multiple
    (heads folded into the batch), else '?'."""
    if (x, y) in sizes:
        return sizes[(x, y)]
    multiples = {f"{x // a}*{name}" for (a, b), name in sizes.items()
                 if a and b and x % a == 0 and y % b == 0 and x // a == y // b > 1}
    return multiples.pop() if len(multiples) == 1 else "?"
