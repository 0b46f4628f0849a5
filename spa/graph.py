"""Load an ONNX model and give the analysis what it needs: constants, producers, consumers, shapes."""
from __future__ import annotations

import contextlib
import functools
import heapq
import math
import os
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.inliner
from onnx import numpy_helper, shape_inference

from . import external_data
from .errors import SpaError, SpaWarning, first_line
from .runtime import FLOATS

CONTROL_FLOW = {"If", "Loop", "Scan"}


def as_model(model_or_path) -> onnx.ModelProto:
    """A ModelProto as is, or the file at that path read by `load_model`."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return load_model(os.fspath(model_or_path))


def load_model(path: str, stream: bool | None = None) -> onnx.ModelProto:
    """Read an ONNX file (and its external data) or raise a one-line SpaError. `stream`: leave
    the external data in its files, read tensor by tensor (spa.external_data); by default when
    the model keeps more than external_data.STREAM_BYTES there."""
    from .integrity import check_external, check_structure, check_tensors

    if os.path.isdir(path):
        raise SpaError(f"{path} is a directory, not an ONNX file")
    if not os.path.exists(path):
        raise SpaError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise SpaError(f"{path} is not a regular file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf gives long, unhelpful messages
        raise SpaError(f"{path} is not a valid ONNX model ({type(exc).__name__})") from None
    if not model.graph.node and not model.graph.initializer:
        raise SpaError(f"{path} is not an ONNX model (empty or not a ModelProto)")
    base = os.path.dirname(os.path.abspath(path))
    files = _EXTERNAL_FILES[_file_key(path)] = check_external(model, path)  # before reading a byte of it
    if stream is None:
        stream = sum(os.path.getsize(f) for f in files) > external_data.STREAM_BYTES
    try:  # onnx refuses paths outside `base` too
        if stream:
            external_data.stream(model, base)
        else:
            onnx.load_external_data_for_model(model, base)
    except Exception as exc:
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SpaError(f"{path}: external data could not be read ({why})") from None
    check_tensors(model, path)  # before numpy, shape inference or onnxruntime trust the dims
    check_structure(model, path)
    inlined = inline_functions(model)
    if inlined:
        warnings.warn(f"{path}: {inlined_note(inlined)}", SpaWarning)
    if sort_topologically(model.graph):
        warnings.warn(f"{path}: its nodes were not in topological order, which the onnx checker requires "
                      "(onnxruntime's float16 converter writes such files): SPA reads them sorted, and writes them so",
                      SpaWarning)
    return model


def inline_functions(model: onnx.ModelProto) -> list:
    """Replace, in place, every call of one of `model`'s local functions by the function's nodes
    (onnx.inliner; torch's export_modules_as_functions writes each module as one, and every op inside
    would read as one custom-domain boundary); the names of the functions called ([] where none is).
    A model onnx cannot inline (over 2 GiB in memory) keeps its calls."""
    local = {(f.domain, f.name) for f in model.functions}
    called = sorted({n.op_type for n in all_nodes(model.graph) if (n.domain, n.op_type) in local})
    if not called:
        return []
    try:
        model.CopyFrom(onnx.inliner.inline_local_functions(model))
    except Exception as exc:  # serialization past 2 GiB
        warnings.warn(f"local functions {', '.join(called)} not inlined ({first_line(exc, 120)}): the layers "
                      "inside them stay whole", SpaWarning)
        return []
    return called


def inlined_note(names: list) -> str:
    """What is said where `inline_functions` inlined the calls of local functions `names`."""
    return (f"the calls of its local function{'s' * (len(names) > 1)} {', '.join(names)} inlined, so the layers "
            "inside prune with the rest; a pruned model is written with them inlined")


def elem_types(model: onnx.ModelProto):
    """tensor name -> element type (initializers first; shape inference once, when needed)."""
    known = {t.name: t.data_type for t in model.graph.initializer}
    inferred: dict = {}

    def elem_type(tensor):
        if tensor in known:
            return known[tensor]
        if not inferred:
            model_types = shape_inference.infer_shapes(model)
            inferred.update({vi.name: vi.type.tensor_type.elem_type for vi in list(model_types.graph.value_info) +
                             list(model_types.graph.input) + list(model_types.graph.output)})
            inferred.setdefault("", onnx.TensorProto.FLOAT)
        return inferred.get(tensor, onnx.TensorProto.FLOAT)
    return elem_type


def all_nodes(graph: onnx.GraphProto):
    """Every node of `graph` and of its subgraphs, at any depth."""
    for node in graph.node:
        yield node
        for body in _subgraphs(node):
            yield from all_nodes(body)


def sort_topologically(graph: onnx.GraphProto) -> bool:
    """Reorder `graph`'s nodes so each comes after the nodes it reads (stable: the given order wherever it
    already works; a control-flow node after what its subgraphs read). Whether it changed anything; a
    cycle leaves the order as it was."""
    nodes = list(graph.node)
    producer = {out: k for k, node in enumerate(nodes) for out in node.output if out}
    needs = [{producer[x] for x in set(node.input) | outer_scope_inputs(node) if x in producer} - {k}
             for k, node in enumerate(nodes)]
    if all(max(before, default=-1) < k for k, before in enumerate(needs)):
        return False
    readers = defaultdict(list)
    for k, before in enumerate(needs):
        for j in before:
            readers[j].append(k)
    waiting = [len(before) for before in needs]
    ready = [k for k, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers[k]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        return False
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)
    return True


_EXTERNAL_FILES = {}  # (real path, mtime, size) of a model file -> its external data files, from load_model


def _file_key(path: str) -> tuple:
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_mtime_ns, stat.st_size


def external_data_files(path: str) -> set:
    """Real paths of the files a model file keeps external data in (empty when none)."""
    key = _file_key(path)
    if key not in _EXTERNAL_FILES:
        from .integrity import check_external

        try:
            model = onnx.load(path, load_external_data=False)
        except Exception:
            return set()
        _EXTERNAL_FILES[key] = check_external(model, path)
    return _EXTERNAL_FILES[key]


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
    for g in _subgraphs(node):
        local = {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            local.update(n.output)
        for n in g.node:
            used.update(x for x in n.input if x and x not in local)
            used.update(outer_scope_inputs(n) - local)
        used.update(o.name for o in g.output if o.name not in local)
    return used


def subgraph_weights(model: onnx.ModelProto) -> dict:
    """{"If 'name'": count} of the float constants of rank 2 or more (initializers and Constant nodes)
    inside each top-level control-flow node's subgraphs, at any depth: weights SPA does not analyze."""
    def weights(graph) -> int:
        tensors = list(graph.initializer) + [a.t for n in graph.node if n.op_type == "Constant"
                                             for a in n.attribute if a.name == "value"]
        count = sum(len(t.dims) >= 2 and t.data_type in FLOATS for t in tensors)
        return count + sum(weights(g) for n in graph.node for g in _subgraphs(n))
    found = {}
    for k, node in enumerate(model.graph.node):
        count = sum(weights(g) for g in _subgraphs(node))
        if count:
            found[f"{node.op_type} '{node.name or '#' + str(k)}'"] = count
    return found


def _subgraphs(node: onnx.NodeProto) -> list:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


class Consts(Mapping):
    """Constant tensors by name (initializers and Constant nodes), read lazily. Values are kept
    once read (scoring and rewriting read the same weights) up to a memory budget; beyond it
    they are converted on every access, so big models are not held twice."""

    CACHE_BUDGET = 1 << 28  # bytes of numpy copies kept

    def __init__(self, model: onnx.ModelProto):
        self._protos = {t.name: t for t in model.graph.initializer}
        self._base = external_data.base_of(model)
        self._cache = {}
        self._cached_bytes = 0
        self._aliases = {}  # name -> (root constant, dtype of a Cast on the way or None)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = constant_node_value(node)
                if value is not None:
                    self._cache[node.output[0]] = value
        self._fills = {}
        self._fills = _constant_fills(model, self)  # name -> (shape, 0-d fill value)

    def __getitem__(self, name):
        if name in self._cache:
            return self._cache[name]
        if name in self._fills:  # a read-only view: no memory, whatever the shape
            shape, value = self._fills[name]
            return np.broadcast_to(value, shape)
        if name in self._aliases:
            root, dtype = self._aliases[name]
            value = self[root]
            return value if dtype is None or value.dtype == dtype else value.astype(dtype)
        proto = self._protos[name]
        if proto.data_location == onnx.TensorProto.EXTERNAL:  # a streamed model: mapped, never cached
            return external_data.array(proto, self._base)
        value = numpy_helper.to_array(proto)
        if self._cached_bytes + value.nbytes <= self.CACHE_BUDGET:
            self._cache[name] = value
            self._cached_bytes += value.nbytes
        return value

    def __contains__(self, name):
        return name in self._cache or name in self._protos or name in self._aliases or name in self._fills

    def __iter__(self):  # aliases are views of their roots: not iterated, not counted twice
        yield from self._protos
        yield from (n for n in self._cache if n not in self._protos)
        yield from (n for n in self._fills if n not in self._protos and n not in self._cache)

    def __len__(self):
        return len(set(self._protos) | set(self._cache) | set(self._fills))

    def fill(self, name):
        """The value a uniformly filled constant (ConstantOfShape of a constant shape) holds
        everywhere, as a 0-d array; None for any other tensor."""
        if name in self._aliases:
            root, dtype = self._aliases[name]
            value = self.fill(root)
            return value if value is None or dtype is None else value.astype(dtype)
        return self._fills[name][1] if name in self._fills else None

    def shape(self, name) -> tuple:
        if name in self._aliases:
            return self.shape(self._aliases[name][0])
        if name in self._protos:
            return tuple(self._protos[name].dims)
        if name in self._fills:
            return self._fills[name][0]
        return tuple(self._cache[name].shape)

    def dtype(self, name):
        if name in self._aliases:
            root, dtype = self._aliases[name]
            return np.dtype(dtype) if dtype is not None else self.dtype(root)
        if name in self._protos:
            return onnx.helper.tensor_dtype_to_np_dtype(self._protos[name].data_type)
        if name in self._fills:
            return self._fills[name][1].dtype
        return self._cache[name].dtype

    def nbytes(self, name) -> int:
        return math.prod(self.shape(name)) * np.dtype(self.dtype(name)).itemsize

    def alias(self, name, root, dtype=None):
        self._aliases[name] = (root, dtype)


def _constant_fills(model: onnx.ModelProto, consts: Consts) -> dict:
    """ConstantOfShape nodes whose shape is a constant (read directly or through Identity nodes):
    uniformly filled constants (placeholder weights, zero biases). The analysis treats them as
    constants; the rewrite shrinks their shape vector and never writes their values out."""
    identity = {n.output[0]: n.input[0] for n in model.graph.node
                if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.output and n.input}
    fills = {}
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx") or not node.input \
                or not node.output or not node.output[0]:
            continue
        shape_name, seen = node.input[0], set()
        while shape_name not in consts and shape_name in identity and shape_name not in seen:
            seen.add(shape_name)
            shape_name = identity[shape_name]
        if shape_name not in consts or len(consts.shape(shape_name)) != 1:
            continue
        shape = tuple(int(d) for d in np.asarray(consts[shape_name]).reshape(-1))
        if any(d < 0 for d in shape):
            continue
        value = attr(node, "value")
        value = numpy_helper.to_array(value).reshape(-1)[:1] if value is not None else np.zeros(1, np.float32)
        if value.size == 1:
            fills[node.output[0]] = (shape, value.reshape(()))
    return fills


@dataclass
class Graph:
    """A read-mostly view of the top-level graph of a model."""

    model: onnx.ModelProto
    nodes: list = field(init=False)
    producer: dict = field(init=False)
    consumers: dict = field(init=False)
    consts: dict = field(init=False)
    shapes: dict = field(init=False)
    notes: list = field(init=False)  # what the analysis could not learn, for the user (a shape probe that died)
    graph_inputs: set = field(init=False)
    graph_outputs: set = field(init=False)
    folding: tuple = field(init=False, default=())  # spa.control_flow.Flattened: the Ifs and Loops flattened

    def __post_init__(self):
        from .runtime import symbolic_declarations

        # dims declared as -1 or 0 (Paddle2ONNX) are symbolic: a copy says so (shape inference,
        # probes, the rewritten model and the oracle all start from it)
        self.model = symbolic_declarations(self.model)
        self._index()
        self.aliases = self._unshare_constants()
        self.notes = []
        self.shapes = infer_shapes(self.model, self.notes)
        for name in list(self.consts) + list(self.aliases):
            self.shapes[name] = self.consts.shape(name)

    @classmethod
    def indexed(cls, model: onnx.ModelProto) -> "Graph":
        """Nodes, producers, consumers and constants of `model` as it is: no shape inference, and a
        constant keeps all its readers (none unshared). Enough for readers such as spa.quant's."""
        g = cls.__new__(cls)
        g.model = model
        g._index()
        g.aliases, g.notes, g.shapes = {}, [], {}
        return g

    def _index(self) -> None:
        """nodes, producers, consumers, constants, graph inputs and outputs of `model`."""
        g = self.model.graph
        self.nodes = list(g.node)
        self.index_nodes()
        self.consts = Consts(self.model)
        self.graph_inputs = {i.name for i in g.input if i.name not in self.consts}
        self.graph_outputs = {o.name for o in g.output}

    def index_nodes(self) -> None:
        """producer and consumers of every tensor, from `nodes` (a control-flow node also consumes
        the outer-scope names its subgraphs read)."""
        from .control_flow import stepped_values

        self.producer, self.consumers = {}, defaultdict(list)
        stepped = stepped_values(self.model)
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            inputs = list(node.input)
            if node.op_type in CONTROL_FLOW:
                inputs += sorted(outer_scope_inputs(node) - set(inputs))
                inputs += stepped.get(node.name, [])[1:] if node.op_type == "Loop" else []
            for slot, name in enumerate(inputs):
                if name:
                    self.consumers[name].append((i, slot))

    def _unshare_constants(self) -> dict:
        """Exporters and simplifiers deduplicate equal constants (one zero bias per width, read by
        convs of every stage, often through Identity nodes): a constant read by several consumers
        must not couple them. In this view each consumer reads its own alias of the constant (an
        Identity/Cast chain on the way is folded in); the model is unchanged. The rewrite writes an
        alias only where its slice or value differs, so unchanged constants stay shared.
        Returns {alias: (node index, input slot, the name the model's node reads, root)}."""
        aliases, copied = {}, set()
        names = set(self.consts) | set(self.producer) | self.graph_inputs
        for root in list(self.consts):
            if root in self.graph_outputs:
                continue
            leaves, stack, ok = [], [(root, None)], True
            while stack and ok:
                name, dtype = stack.pop()
                for i, slot in self.consumers.get(name, []):
                    node = self.nodes[i]
                    if slot >= len(node.input):  # read inside a subgraph: cannot be renamed
                        ok = False
                        break
                    folded = _folded_dtype(node, dtype, self.consts.dtype(root))
                    if folded is not False and node.output[0] not in self.graph_outputs:
                        stack.append((node.output[0], folded))
                    else:
                        leaves.append((i, slot, name, dtype))
            if not ok or len(leaves) < 2 or _tied_parameter(self.consts, root):
                continue
            for k, (i, slot, name, dtype) in enumerate(leaves):
                alias = f"{root}__spa{k}"
                while alias in names:
                    alias += "_"
                names.add(alias)
                if i not in copied:  # the model's own node: edit a copy
                    copied.add(i)
                    self.nodes[i] = onnx.NodeProto()
                    self.nodes[i].CopyFrom(self.model.graph.node[i])
                self.nodes[i].input[slot] = alias
                self.consumers[alias] = [(i, slot)]
                self.consts.alias(alias, root, dtype)
                aliases[alias] = (i, slot, name, root)
            moved = {(i, slot) for i, slot, _, _ in leaves}
            for name in {leaf[2] for leaf in leaves}:
                self.consumers[name] = [use for use in self.consumers[name] if use not in moved]
        return aliases

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

    def behind_casts(self, name: str) -> str:
        """The tensor `name` repeats through Cast and Identity nodes (itself where none)."""
        while name in self.producer and self.nodes[self.producer[name]].op_type in ("Cast", "Identity"):
            name = self.nodes[self.producer[name]].input[0]
        return name

    def slice_bounds(self, node: onnx.NodeProto) -> tuple | None:
        """(starts, ends, axes, steps) of a Slice as int lists, from its inputs (opset 10 on) or its
        attributes (before: paddle2onnx still writes opset 7); axes and steps None where not given.
        None where any given bound is not static."""
        if self.opset() < 10:
            starts, ends = attr(node, "starts"), attr(node, "ends")
            return None if starts is None or ends is None else (list(starts), list(ends), attr(node, "axes"), None)
        names = (list(node.input[1:5]) + [""] * 4)[:4]
        values = [self.static_value(x) if x else None for x in names]
        if values[0] is None or values[1] is None or any(x and v is None for x, v in zip(names, values)):
            return None
        return tuple(None if v is None else [int(x) for x in np.atleast_1d(v)] for v in values)

    def _probe_parameter_inputs(self) -> dict:
        wanted = set()
        for node in self.nodes:
            slots = PARAMETER_SLOTS.get(node.op_type, ())
            for x in (x for k, x in enumerate(node.input) if x and k in slots and x not in self.consts):
                wanted.add(x)
                source = self.behind_casts(x)  # paddle2onnx's Identity, tf2onnx's Cast
                producer = self.nodes[self.producer[source]] if source in self.producer else None
                if producer is not None and producer.op_type == "Concat":  # pieces of a shape
                    wanted.update(p for p in producer.input if p and p not in self.consts)
        if not wanted or weight_bytes(self.model) > PROBE_LIMIT:
            return {}
        probed = _run_with_outputs(self.model, sorted(wanted), notes=self.notes)
        if probed is None:
            return {}
        first, second = probed[0]
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
        if name in cache:
            return cache[name]

        def known(x):  # True / False, or None when not visited yet
            return True if x in self.consts else False if x in self.graph_inputs else cache.get(x)

        # depth-first without recursion (a ResNet-152 or a long chain is thousands deep): a frame
        # is (tensor, position of the producer's next input to look at)
        cache[name] = False  # while in progress: guards against cycles
        stack = [(name, 0)]
        while stack:
            tensor, k = stack.pop()
            index = self.producer.get(tensor)
            node = self.nodes[index] if index is not None else None
            if node is None or node.op_type in NOT_STATIC_OPS:
                cache[tensor] = False
                continue
            inputs = node.input
            while k < len(inputs) and (not inputs[k] or known(inputs[k])):
                k += 1
            if k < len(inputs) and known(inputs[k]) is None:
                cache[inputs[k]] = False
                stack.append((tensor, k))  # resume here once the input is known
                stack.append((inputs[k], 0))
                continue
            cache[tensor] = k == len(inputs)
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


NOT_STATIC_OPS = CONTROL_FLOW | {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                 "Multinomial", "Bernoulli"}
ALIAS_LIMIT = 1 << 24  # bytes: a bigger shared constant stays one parameter


def _tied_parameter(consts, name) -> bool:
    """A shared weight matrix with varied values is one parameter used twice (tied embeddings, a
    reused module): it stays tied. Deduplication shares vectors, scalars and constant-valued
    tensors (a fresh model's zeros and ones), never trained matrices."""
    if consts.fill(name) is not None:  # one value everywhere: never a trained parameter
        return False
    if consts.nbytes(name) > ALIAS_LIMIT:
        return True
    if sum(d > 1 for d in consts.shape(name)) <= 1:
        return False
    value = consts[name]
    return value.size > 0 and not np.all(value == value.flat[0])

_PLAIN_CASTS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def _folded_dtype(node, dtype, root_dtype):
    """For an Identity or a plain Cast of a constant: the dtype of its output (None: unchanged);
    False for any other node."""
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1 or not node.output[0]:
        return False
    if node.op_type == "Identity":
        return dtype
    if node.op_type == "Cast" and attr(node, "to") in _PLAIN_CASTS \
            and np.dtype(dtype or root_dtype).kind in "biuf" and np.dtype(dtype or root_dtype).itemsize <= 8:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(attr(node, "to")))
    return False


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
    """Size of a tensor's data from its dims (ByteSize() walks the bytes and is slow); sub-byte types packed."""
    return external_data.data_bytes(tensor.data_type, math.prod(tensor.dims))


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
                d.dim_value if d.HasField("dim_value") and d.dim_value >= 0
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
        # where it gives up, it first writes sym_shape_infer_temp.onnx and per-tensor uuid .data
        # files into the working directory: run it inside a scratch folder
        with tempfile.TemporaryDirectory(prefix="spa-shapes-") as scratch, contextlib.chdir(scratch):
            inferred = _symbolic_shape_inference().infer_shapes(_weights_as_inputs(light), auto_merge=True)
    except Exception:
        return {}
    if inferred is None:  # it gave up
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


def _bypass_identities(light: onnx.ModelProto) -> dict:
    """Rewire `light` around its Identity nodes ({output: the tensor it repeats}). paddle2onnx routes
    every shape vector through one or two ("auto.cast"): ONNX's shape inference reads a Reshape's
    target only from a constant, and onnxruntime's symbolic inference passes a shape through Identity
    but not a vector's values, so the Reshape's output sizes stayed unknown (or were merged with a
    broadcast partner's dims: a conv bias [480] reshaped to [1, -1, 1, 1] read as [N, 480, 6, W]; a
    static 120 channels in PP-OCRv5's recognizer, read as a new symbol)."""
    keep = {o.name for o in light.graph.output}.union(*(outer_scope_inputs(n) for n in light.graph.node))
    source, kept = {}, []
    for node in light.graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] and node.output[0] not in keep:
            source[node.output[0]] = source.get(node.input[0], node.input[0])
        else:
            kept.append(node)
    if source:
        for node in kept:
            for k, name in enumerate(node.input):
                node.input[k] = source.get(name, name)
        del light.graph.node[:]
        light.graph.node.extend(kept)
    return source


def infer_shapes(model: onnx.ModelProto, notes: list | None = None) -> dict:
    """Per-tensor shapes (ints, or strings for symbolic dims) from ONNX shape inference (and, where
    it leaves some open, from a probe: `notes` receives why a probe could not run)."""
    from .runtime import symbolic_declarations

    light = symbolic_declarations(_without_large_data(model))  # declared -1 / 0 dims: symbolic
    bypassed = _bypass_identities(light)
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
    g = inferred.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}

    def open_outputs():
        return [o for n in g.node for o in n.output if o and o not in consts and (o not in shapes or "?" in shapes[o])]

    if open_outputs():  # ONNX's inference stops at an op it does not know (com.microsoft's, where no value_info says)
        for name, better in _symbolic_shapes(light).items():
            if name not in shapes or ("?" in shapes[name] and len(better) == len(shapes[name])):
                shapes[name] = better
    dims = {t.name: tuple(t.dims) for t in light.graph.initializer}
    shapes.update({out: shapes[src] if src in shapes else dims[src] for out, src in bypassed.items()
                   if src in shapes or src in dims})
    missing = open_outputs()
    if missing and weight_bytes(model) < PROBE_LIMIT:
        for name, ran in shapes_by_running(model, missing, notes).items():
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
# where those fail, multiples of 32 (a detector's feature pyramid concatenates maps of stride 8 to 32)
ALIGNED_PROBE_SIZES, ALIGNED_STEP = ((2, 64), (3, 128)), 32


def _probe_sizes(aligned: bool) -> tuple:
    return ALIGNED_PROBE_SIZES if aligned else PROBE_SIZES


def _probe_dims(model: onnx.ModelProto, run: int, aligned: bool = False) -> dict:
    """A distinct size for every symbolic input dim (batch names from the probe's batch), so a
    probed shape can say which symbolic dim it carries."""
    base = _probe_sizes(aligned)[run][1]
    names = []
    for vi in model.graph.input:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param and not d.HasField("dim_value") and d.dim_param not in names and k > 0:
                names.append(d.dim_param)
    return {name: base + (ALIGNED_STEP if aligned else 2) * i for i, name in enumerate(names)}


def _probe_feeds(model: onnx.ModelProto, run: int, aligned: bool = False) -> dict:
    from .runtime import random_inputs

    batch, base = _probe_sizes(aligned)[run]
    return random_inputs(model, batch=batch, dims=_probe_dims(model, run, aligned), default_dim=base)


def _run_with_outputs(model: onnx.ModelProto, names, values: bool = True, notes: list | None = None):
    """(two onnxruntime runs (different symbolic sizes) exposing the named tensors ({name: value},
    or {name: shape} without `values`), whether they took the aligned sizes), or None. The runs take
    sizes that are multiples of 32 where the first sizes fail (a YOLO's upsampled maps concatenated
    with maps of a 30-pixel image's size do not match). They run in a child process where one can be
    forked: probe sizes are sizes the model was not built for, and onnxruntime may die of a signal
    there (onnx-asr's wespeaker fbank: an integer division by zero on fewer samples than its
    window), which would take the whole command with it; `notes` then says so."""
    from .runtime import session

    def probe_runs():
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        known = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.helper.ValueInfoProto(name=n) for n in names if n not in known)
        try:
            sess = session(probe, quiet=True)  # a probe that fails is fine: the caller freezes
        except Exception:
            return None
        outs = [o.name for o in sess.get_outputs()]
        for aligned in (False, True):
            try:
                runs = [dict(zip(outs, sess.run(None, _probe_feeds(model, r, aligned)))) for r in (0, 1)]
            except Exception:
                continue
            return (runs if values else [{n: np.shape(v) for n, v in run.items()} for run in runs]), aligned
        return None

    try:
        return in_child_process(probe_runs)
    except ChildDied as died:
        note = _probe_death(died.exitcode)
        if notes is not None and note not in notes:
            notes.append(note)
        return None


class ChildDied(Exception):
    """The child process of `in_child_process` died before it could answer."""

    def __init__(self, exitcode):
        super().__init__(f"child process died (exit code {exitcode})")
        self.exitcode = exitcode


def in_child_process(work):
    """work() in a forked child process, its result sent back; ChildDied where the child dies (a
    signal in native code). In this process where fork is unavailable (Windows)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        return work()
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(work, sender), daemon=True)
    child.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:  # it died before sending
        child.join()
        raise ChildDied(child.exitcode) from None
    finally:
        receiver.close()
    child.join()
    return result


def death_cause(exitcode) -> str:
    """How a child process ended, for a message: 'was killed by SIGKILL (out of memory?)', ..."""
    import signal

    if exitcode and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exited with status {exitcode}"


def _probe_death(exitcode) -> str:
    cause = death_cause(exitcode)
    sizes = " and ".join(str(size) for _, size in PROBE_SIZES)
    return (f"shape probe: onnxruntime {cause} running the model at the probe's sizes (batch "
            f"{' and '.join(str(batch) for batch, _ in PROBE_SIZES)}, free sizes from {sizes}); the shapes ONNX "
            "shape inference leaves open stay unknown, and channels that reach them are frozen")


def _send_result(work, sender):
    try:
        result = work()
    except BaseException:
        result = None
    sender.send(result)
    sender.close()


def shapes_by_running(model: onnx.ModelProto, names, notes: list | None = None) -> dict:
    """Shapes shape inference could not give, read from two onnxruntime runs with different
    symbolic sizes: a dim that differs between the runs is symbolic."""
    probed = _run_with_outputs(model, names, values=False, notes=notes)
    if probed is None:
        return {}
    runs, aligned = probed
    probe_sizes = _probe_sizes(aligned)
    sizes = {}  # (size in run 0, size in run 1) -> symbolic input dim
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].dim_param and not dims[0].HasField("dim_value"):
            sizes.setdefault((probe_sizes[0][0], probe_sizes[1][0]), dims[0].dim_param)
    first, second = _probe_dims(model, 0, aligned), _probe_dims(model, 1, aligned)
    sizes.update({(first[n], second[n]): n for n in first})
    shapes = {}
    for n in names:
        if n in runs[0] and n in runs[1]:
            a, b = runs[0][n], runs[1][n]
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
