"""onnxruntime helpers: input specs, random inputs, sessions."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .external_data import SUB_BYTE, array, base_of


class _NpTypes(dict):
    """ONNX element type -> numpy dtype for every type onnx knows (bfloat16 and the float8s
    through ml_dtypes, as onnx's own helpers do)."""

    def __missing__(self, elem_type):
        try:
            self[elem_type] = helper.tensor_dtype_to_np_dtype(elem_type)
        except (KeyError, ValueError, TypeError):
            raise KeyError(elem_type) from None
        return self[elem_type]

    def get(self, elem_type, default=None):
        try:
            return self[elem_type]
        except KeyError:
            return default


_NP_TYPES = _NpTypes({
    TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32, TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8,
    TensorProto.BOOL: np.bool_,
})
# floating types onnxruntime's CPU provider lacks kernels for in places (bfloat16 everywhere,
# double for Conv and pooling): such a model runs on a float32 copy (float32_surrogate)
OTHER_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
FLOATS = (TensorProto.FLOAT, *OTHER_FLOATS)  # the ONNX float element types SPA reads


DEFAULT_DIM = 32  # the size of a symbolic input dim nobody gave (verification, reports)
# symbolic sizes tried, smallest first, where a model does not run at the placeholder size (16, 32) of a
# size nobody gave: silero-vad's voice detectors take frames of 256 or 512 samples
LARGER_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@functools.cache
def onnxruntime_onnx_ops() -> frozenset:
    """Ops onnxruntime defines in the ONNX domain and ONNX does not: SimplifiedLayerNormalization,
    the RMS norm its transformer optimizer writes, and ONNX's retired experimental ops."""
    try:
        from onnxruntime.capi import _pybind_state
        schemas = _pybind_state.get_all_operator_schema()
    except (ImportError, AttributeError):  # a build without its schemas
        return frozenset({"SimplifiedLayerNormalization"})
    return frozenset(s.name for s in schemas if s.domain in ("", "ai.onnx") and not onnx.defs.has(s.name))


def input_specs(model: onnx.ModelProto, batch: int = 1, dims: dict | None = None, default_dim: int = DEFAULT_DIM,
                shapes: dict | None = None):
    """(name, shape, numpy dtype) for each real graph input, symbolic dims made concrete: a name
    given in `dims` takes that size, a name that leads any input is the batch, others default_dim.
    shapes: {input: full shape} the user gave (`spa.calibration.user_shapes` checks them): every
    axis as given, its symbolic name passed on to inputs that share it, except a 1 on a batch axis,
    which leaves the batch to the caller (`batch`). So a model that takes batches of 4 runs at the
    4 given, and a leading axis that is no batch (a graph's node count) takes its size."""
    dims = dict(dims or {})
    shapes = shapes or {}
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    batches = {_dim_name(vi.name, 0, d[0]) for vi in inputs
               for d in [vi.type.tensor_type.shape.dim] if d and not is_static_dim(d[0])}

    def given_size(vi, k, d):  # the user's size for this axis, or None where the default stands
        size = shapes[vi.name][k] if vi.name in shapes and not is_static_dim(d) else None
        return None if size == 1 and _dim_name(vi.name, k, d) in batches else size

    for vi in inputs:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            size = given_size(vi, k, d)
            if size is not None and (k == 0 or d.dim_param not in ("", "?")):
                dims.setdefault(_dim_name(vi.name, k, d), size)
    for name in batches:
        dims.setdefault(name, batch)
    declared = {vi.name: vi.type.tensor_type.shape.dim for vi in inputs}
    for (name, k), size in imposed_sizes(model).items():
        d = declared[name][k] if name in declared and k < len(declared[name]) else None
        if d is not None and not is_static_dim(d) and name not in shapes:
            dims.setdefault(_dim_name(name, k, d), size)
    specs = []
    for vi in inputs:
        t = vi.type.tensor_type
        shape = [d.dim_value if is_static_dim(d) else
                 _or(given_size(vi, k, d), dims.get(_dim_name(vi.name, k, d), default_dim))
                 for k, d in enumerate(t.shape.dim)]
        specs.append((vi.name, tuple(shape), _NP_TYPES.get(t.elem_type, np.float32)))
    return specs


def _or(value, default):
    return default if value is None else value


def imposed_sizes(model: onnx.ModelProto) -> dict:
    """{(graph input, axis): size} the model's ops need generated inputs to take (an empty key/value
    cache: `spa.rules.imposed_input_sizes`), those inside If branches too (a merged decoder's cache)."""
    from .control_flow import flattened
    from .graph import outer_scope_inputs
    from .rules import imposed_input_sizes

    inputs = {i.name for i in model.graph.input}
    inside = any(outer_scope_inputs(n) & inputs for n in model.graph.node if n.op_type in ("If", "Loop"))
    return imposed_input_sizes(flattened(model)[0] if inside else model)  # a flattened copy only where it can tell


def is_static_dim(d) -> bool:
    """A declared dim with a real size. Paddle2ONNX (and others) declare dynamic dims as
    dim_value -1 or 0: onnxruntime takes -1 as dynamic and 0 as "empty" (any other size fails),
    so both are symbolic here."""
    return d.HasField("dim_value") and d.dim_value > 0


def _dim_name(input_name, k, d) -> str:
    """The symbolic name of a non-static input dim (the one symbolic_declarations gives a
    dim_value <= 0), "?" for an unnamed one."""
    if d.HasField("dim_value"):
        return f"{input_name}_dim{k}"
    return d.dim_param or "?"


def symbolic_declarations(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself when every declared graph input/output/value_info dim is a real size or
    symbolic; else a copy whose dim_value <= 0 are symbolic: named `<input>_dim<k>` on graph
    inputs (so that onnxruntime runs them at any size), left unknown on outputs and value_info."""
    def bad(vi):
        return any(d.HasField("dim_value") and d.dim_value <= 0 for d in vi.type.tensor_type.shape.dim)

    g = model.graph
    if not any(bad(vi) for vi in list(g.input) + list(g.output) + list(g.value_info)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for kind in ("input", "output", "value_info"):
        for vi in getattr(copy.graph, kind):
            for k, d in enumerate(vi.type.tensor_type.shape.dim):
                if d.HasField("dim_value") and d.dim_value <= 0:
                    name = _dim_name(vi.name, k, d)
                    d.ClearField("dim_value")
                    if kind == "input":
                        d.dim_param = name
    return copy


def named_mask(name: str) -> bool:
    """An input named like an attention mask: generated feeds (verification, calibration) give it ones."""
    return "mask" in name.lower()


def random_inputs(model, batch=1, seed=0, dims=None, default_dim=DEFAULT_DIM, shapes=None):
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in input_specs(model, batch, dims, default_dim, shapes):
        if is_float(dtype):
            feeds[name] = np.asarray(rng.standard_normal(shape)).astype(dtype)  # bfloat16 too (ml_dtypes)
        elif dtype == np.bool_:  # np.asarray: a scalar (an If condition) must stay an ndarray
            feeds[name] = np.asarray(rng.random(shape) < 0.5)
        elif named_mask(name):  # an attention mask: every position present, as calibration feeds it
            feeds[name] = np.ones(shape, dtype=dtype)
        elif dtype == np.object_:  # strings (a LabelEncoder's keys): "0" and "1"
            feeds[name] = np.asarray(rng.integers(0, 2, size=shape)).astype(str).astype(object)
        else:
            feeds[name] = np.asarray(rng.integers(0, 2, size=shape)).astype(dtype)
    return feeds


# a model with more weights in its proto than this goes to onnxruntime without them, as arrays (protobuf
# cannot serialize past 2 GiB; below, the serialized copy cost time: a VGG-16 session 6.6 s, 2.8 s without;
# MiniLM's 90 MB 0.34-0.37 s, 0.09-0.12 s without)
SERIALIZE_BYTES = 1 << 24
# a calibration pass leaves the weights of a model with more than this unprepacked (`session`)
UNPACKED_BYTES = 1 << 28
BIG_TENSOR = 1 << 16  # initializers up to this size stay in the proto
# element types that cannot go to onnxruntime as arrays: sub-byte ones (packed below a byte, where numpy
# holds one to a byte: an OrtValue over that buffer reads the wrong bytes, silently) and strings
NOT_AS_ARRAYS = SUB_BYTE | {TensorProto.STRING}


def _session(source, options, unpacked: bool = False):
    """An InferenceSession of a path, serialized bytes or a ModelProto. A proto with over
    SERIALIZE_BYTES of weights, or one whose weights stream from external data (spa.external_data),
    goes without its big initializers: onnxruntime takes them as arrays (memory maps of a streamed
    model's file: no copy at all) through add_external_initializers, which the session keeps;
    `unpacked`: a model with over UNPACKED_BYTES of weights, streamed or not, has them not
    prepacked (`session(calibration_pass=True)`; by size, not by path, so that a model computes
    the same streamed or in memory)."""
    if isinstance(source, (str, bytes)):
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    from .graph import weight_bytes

    if unpacked and weight_bytes(source) >= UNPACKED_BYTES:
        options.add_session_config_entry("session.disable_prepacking", "1")
    skeleton, names, values = _without_big_tensors(source)
    if names:
        options.add_external_initializers(names, values)
    base = base_of(source)
    if base:  # where a streamed model's tensors stay external (NOT_AS_ARRAYS), onnxruntime reads them from its folder
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", base)
    sess = ort.InferenceSession(symbolic_declarations(skeleton).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    sess.spa_arrays = values  # onnxruntime reads these buffers for as long as the session lives
    return sess


def _without_big_tensors(model: onnx.ModelProto):
    """(model, [], []) for a model that goes to onnxruntime whole; else (a copy whose external
    initializers and main-graph ones over BIG_TENSOR point at data that is never read, their
    names, their values). Tensors of NOT_AS_ARRAYS types stay as they are: in the proto, or
    external in a streamed model's folder."""
    from .graph import tensor_bytes

    base = base_of(model)
    inits = model.graph.initializer
    external = [t.data_location == TensorProto.EXTERNAL for t in inits]
    if not (base and any(external)) and sum(tensor_bytes(t) for t, e in zip(inits, external) if not e) \
            < SERIALIZE_BYTES:
        return model, [], []
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    names, values = [], []
    for tensor, is_external in zip(inits, external):
        if (is_external and not base) or tensor.data_type in NOT_AS_ARRAYS or \
                (not is_external and tensor_bytes(tensor) <= BIG_TENSOR):
            skeleton.graph.initializer.append(tensor)
            continue
        names.append(tensor.name)
        values.append(_ort_value(_value(tensor, base), tensor.data_type))
        reference = skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        reference.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "spa-in-memory"), ("offset", "0"), ("length", str(tensor_bytes(tensor)))):
            reference.external_data.add(key=key, value=value)
    return skeleton, names, values


def _value(tensor: TensorProto, base: str | None) -> np.ndarray:
    """A tensor's value: a memory map of its file for an external tensor of a streamed model (`base`:
    the folder it resolves against), else read from the proto."""
    return array(tensor, base) if base and tensor.data_location == TensorProto.EXTERNAL else \
        numpy_helper.to_array(tensor)


def _ort_value(value: np.ndarray, data_type: int):
    """An OrtValue over the array's own buffer; types numpy has no kernel for in onnxruntime's
    binding (bfloat16, the float8s: ml_dtypes) go as unsigned integers of their width."""
    if value.dtype.kind in "biuf" and value.dtype.type.__module__ == "numpy":
        return ort.OrtValue.ortvalue_from_numpy(value)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value.view(f"u{value.dtype.itemsize}"), data_type)


def _copy_fields(source, target, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def batch_size(feeds: dict) -> int:
    """Samples in one feed: the leading dimension of its first input."""
    return len(next(iter(feeds.values())))


def sample_count(batches) -> int:
    """Samples in a list of feeds."""
    return sum(batch_size(feeds) for feeds in batches)


def feed_shapes(feeds: dict) -> str:
    """'name 1x3x224x224, mask 1x12': the sizes of a batch of inputs, for messages."""
    return shapes_text({name: np.shape(value) for name, value in feeds.items()})


def shapes_text(shapes: dict) -> str:
    """'name 1x3x224x224, mask 1x12, rate scalar' from {input: shape}."""
    return ", ".join(f"{name} {'x'.join(map(str, shape)) or 'scalar'}" for name, shape in shapes.items())


def is_float(dtype) -> bool:
    """numpy floating types plus ml_dtypes' bfloat16 (which numpy does not class as floating)."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype == _NP_TYPES[TensorProto.BFLOAT16]


DEFAULT_THREADS = None  # onnxruntime's intra-op threads when a caller gives none (None: its default)


def session(model_or_path, threads: int | None = None, quiet: bool = False, calibration_pass: bool = False):
    """An onnxruntime CPU session. A model whose float16 / bfloat16 / double operators the CPU
    provider has no kernel for (bfloat16 almost everywhere, double Conv and pooling) runs on its
    float32 copy instead (a Float32Session: inputs cast in, outputs cast back to the model's
    types); any other failure is raised as is.

    calibration_pass: a session for one of SPA's own passes over calibration batches, not what a
    timed run of the user's runtime measures (that keeps onnxruntime's defaults):
    - its threads do not spin-wait for work after a run: the numpy work between two runs shares
      those cores (MiniLM's Hessians from 1024 sentences: 13.4 -> 9.3 s, docs/obspa.md);
    - a big model's weights (over UNPACKED_BYTES in all, streamed or not) are not
      prepacked: that took 15.7 s of a 1.1B LLaMA's 19.4 s session, for runs 12 % faster, and a
      pass under the MAC budget runs few batches (docs/obspa.md)."""
    def options():
        made = ort.SessionOptions()
        made.log_severity_level = 4 if quiet else 3
        if threads or DEFAULT_THREADS:
            made.intra_op_num_threads = threads or DEFAULT_THREADS
        if calibration_pass:
            made.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return made

    try:
        sess = _session(model_or_path, options(), calibration_pass)
    except Exception as exc:
        if not _kernel_missing(exc):
            raise
        model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else \
            onnx.load(model_or_path) if isinstance(model_or_path, str) else onnx.load_from_string(model_or_path)
        types = float_types(model)
        if not types:
            raise
        try:
            copy = _session(float32_surrogate(model), options(), calibration_pass)
        except Exception:
            raise exc from None
        return Float32Session(copy, types)
    if isinstance(model_or_path, (str, bytes)) and any(0 in list(i.shape or []) for i in sess.get_inputs()):
        # a file declaring dynamic input dims as 0 (Paddle2ONNX): onnxruntime would accept only
        # empty tensors; run its copy with those dims symbolic (symbolic_declarations)
        model = onnx.load(model_or_path) if isinstance(model_or_path, str) else onnx.load_from_string(model_or_path)
        return session(symbolic_declarations(model), threads, quiet, calibration_pass)
    return sess


def _kernel_missing(exc) -> bool:
    text = str(exc)
    return "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text or \
        ("Type Error" in text and any(t in text for t in ("bfloat16", "float16", "double")))


class Float32Session:
    """A float32 copy of a model standing in for a session onnxruntime cannot create on CPU:
    feeds are cast to float32, results back to the original model's types. `surrogate` is True
    so that callers can say the run was in float32."""

    surrogate = True

    def __init__(self, sess, types: dict):
        self.sess = sess
        self.types = types  # tensor name -> numpy dtype in the original model (non-float32 floats)

    def get_inputs(self):
        return self.sess.get_inputs()

    def get_outputs(self):
        return self.sess.get_outputs()

    def run(self, output_names, feeds, run_options=None):
        feeds = {k: np.asarray(v).astype(np.float32) if k in self.types else v for k, v in feeds.items()}
        names = output_names or [o.name for o in self.sess.get_outputs()]
        values = self.sess.run(names, feeds, run_options)
        return [np.asarray(v).astype(self.types[n]) if n in self.types else v for n, v in zip(names, values)]


def float_types(model: onnx.ModelProto) -> dict:
    """{tensor name: numpy dtype} of every tensor of a float16 / bfloat16 / double type (graph
    inputs, outputs, initializers, inferred values), main graph only."""
    types = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    for vi in list(inferred.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type in OTHER_FLOATS:
            types[vi.name] = _NP_TYPES[vi.type.tensor_type.elem_type]
    for t in model.graph.initializer:
        if t.data_type in OTHER_FLOATS:
            types[t.name] = _NP_TYPES[t.data_type]
    return types


def float32_surrogate(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model with every float16 / bfloat16 / double tensor, value type, Cast target
    and constant turned float32 (subgraphs included): the same computation in float32."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # a streamed model's weights are references here: a small copy
    _float32_graph(copy.graph, base_of(model))
    return copy


def _float32_tensor(t: onnx.TensorProto, base: str | None = None) -> onnx.TensorProto:
    """`t` in float32 (a streamed model's external tensor read from its map: `_value`)."""
    if t.data_type not in OTHER_FLOATS:
        return t
    return numpy_helper.from_array(np.asarray(_value(t, base), dtype=np.float32), t.name)


def _float32_graph(graph: onnx.GraphProto, base: str | None = None) -> None:
    inits = [_float32_tensor(t, base) for t in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.tensor_type.elem_type in OTHER_FLOATS:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.CopyFrom(_float32_tensor(a.t))
            elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i in OTHER_FLOATS:
                a.i = TensorProto.FLOAT
            elif a.type == onnx.AttributeProto.GRAPH:
                _float32_graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _float32_graph(sub)


def run(model_or_path, feeds) -> list:
    return session(model_or_path).run(None, feeds)


def batch_names(declared_dims) -> set:
    """The symbolic names that lead some input's declared dims (`declared_inputs`' dims): the
    batch, wherever else it stands."""
    return {dims[0] for dims in declared_dims if dims and isinstance(dims[0], str)}


def batch_axes(declared_dims: list) -> list:
    """The axis that carries the batch in each of `declared_dims` (`declared_inputs`' dims): the first, unless
    that one is fixed and a later axis bears a batch name ([2, batch, 128]), or, where another input's first
    axis is free, is the one unnamed free axis (silero-vad's state [2, ?, 128] beside its input [?, ?]); None for
    a scalar, and for a one-element input beside a free batch (a merged decoder's use_cache_branch [1])."""
    names = batch_names(declared_dims)
    free_first = any(dims and not isinstance(dims[0], int) for dims in declared_dims)
    axes = []
    for dims in declared_dims:
        named = next((k for k, d in enumerate(dims) if isinstance(d, str) and d in names), None)
        unnamed = [k for k, d in enumerate(dims) if d is None]
        one = free_first and all(d == 1 for d in dims)
        axes.append(None if not dims or one else 0 if not isinstance(dims[0], int) else named if named is not None
                    else unnamed[0] if free_first and len(unnamed) == 1 else 0)
    return axes


def declared_inputs(model: onnx.ModelProto):
    """(name, dims, numpy dtype) for each real graph input, as declared: each dim an int (static),
    a str (its symbolic name) or None (unnamed: no dim_param, or paddle2onnx's "?")."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if is_static_dim(d) else (d.dim_param if d.dim_param not in ("", "?") else None)
                     for d in t.shape.dim)
        out.append((vi.name, dims, _NP_TYPES.get(t.elem_type, np.float32)))
    return out


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs fix (the same static first dim on every input), or None."""
    firsts = {dims[0] if dims else None for _, dims, _ in declared_inputs(model)}
    return firsts.pop() if len(firsts) == 1 and isinstance(next(iter(firsts)), int) else None
