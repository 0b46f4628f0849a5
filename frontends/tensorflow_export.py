"""Keras models, tf.Modules, SavedModel directories and TFLite files -> ONNX through tf2onnx, with a
map from ONNX initializers to Keras variables (stored in the ONNX metadata).

Named tensorflow_*: every import is absolute, so `import tensorflow` is the real TensorFlow.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from spa.errors import SpaError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

WEIGHT_MAP_KEY = "spa.keras.weight_map"
DEFAULT_OPSET = 17
VERIFY_RTOL = 1e-4


@contextlib.contextmanager
def _native_logs_hidden():
    """TensorFlow's C++ start-up lines (absl's "All log messages before absl::InitializeLog()",
    oneDNN's notice) ignore TF_CPP_MIN_LOG_LEVEL: unless the user asked for logs (spa --verbose
    leaves TF_CPP_MIN_LOG_LEVEL unset), file descriptor 2 points at /dev/null meanwhile."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tf():
    with _native_logs_hidden():
        import tensorflow as tf  # the real package: imports are absolute
    return tf


def _keras():
    with _native_logs_hidden():
        import keras
    return keras


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
@dataclass
class Exported:
    """What export wrote: the ONNX file and, for Keras models, how its weights map to variables."""
    path: str
    model: onnx.ModelProto
    weight_map: dict

    def __fspath__(self):
        return self.path

    def __str__(self):
        return self.path


def export(model, path, *, input_signature=None, opset=None) -> Exported:
    """Convert a Keras model, a tf.Module / SavedModel directory or a .tflite file to ONNX at `path`.

    Keras models get a dynamic batch axis by default and a weight map (ONNX initializer ->
    Keras variable, with the transpose/reshape/folded-scale relating them) stored in the model's
    metadata_props under "spa.keras.weight_map".
    """
    opset = opset or DEFAULT_OPSET
    keras = _keras()
    if isinstance(model, keras.Model):
        proto = _export_keras(model, input_signature, opset)
        weight_map = keras_weight_map(model, proto)
        _set_metadata(proto, WEIGHT_MAP_KEY, json.dumps(weight_map))
    elif isinstance(model, (str, os.PathLike)):
        proto = _export_file(os.fspath(model), input_signature, opset)
        weight_map = {}
    elif isinstance(model, _tf().Module):
        proto = _export_module(model, input_signature, opset)
        weight_map = {}
    else:
        raise SpaError(f"cannot export {type(model).__name__}: expected a Keras model, a tf.Module, "
                       "a SavedModel directory or a .tflite file")
    onnx.checker.check_model(proto)
    onnx.save(proto, os.fspath(path))
    return Exported(os.fspath(path), proto, weight_map)


FILE_SUFFIXES = (".keras", ".h5", ".tflite")


def handles(path) -> bool:
    """True for the files this frontend converts: .keras/.h5, .tflite, SavedModel directories."""
    path = os.fspath(path)
    return path.endswith(FILE_SUFFIXES) or os.path.isfile(os.path.join(path, "saved_model.pb"))


def to_onnx(path, out_path) -> str:
    """A saved TensorFlow model (.keras/.h5, SavedModel directory, .tflite) -> ONNX at out_path;
    what `spa prune` runs on such files."""
    export(os.fspath(path), out_path)
    return os.fspath(out_path)


def keras_input_signature(model) -> list:
    tf = _tf()
    return [tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype, name=_input_name(t, i))
            for i, t in enumerate(model.inputs)]


def _input_name(tensor, index):
    name = getattr(tensor, "name", "") or ""
    return name if name and not name.startswith("keras_tensor") else f"input{index}"


def _export_keras(model, input_signature, opset):
    tf = _tf()
    if input_signature is None:
        if not getattr(model, "inputs", None):
            raise SpaError(f"Keras model '{model.name}' has no symbolic inputs (subclassed?): "
                           "pass input_signature=[tf.TensorSpec(...)]")
        input_signature = keras_input_signature(model)
    input_signature = list(input_signature)
    output_names = _keras_output_names(model)

    def call(*args):
        out = model(list(args) if len(args) > 1 else args[0], training=False)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if len(outs) != len(output_names):
            output_names[:] = [f"output{i}" for i in range(len(outs))]
        return {name: o for name, o in zip(output_names, outs)}

    fn = tf.function(call, input_signature=input_signature)
    with _exportable_keras_ops():
        proto = _convert_function(fn, input_signature, opset, model.name)
    _order_outputs(proto, output_names)
    return proto


def _convert_function(fn, input_signature, opset, name):
    """tf2onnx's from_function, except that tensors the function captures (constants such as a
    Normalization layer's mean) are frozen into the graph instead of becoming graph inputs."""
    tf = _tf()
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common, tensor_names_from_structed
    concrete = fn.get_concrete_function(*input_signature)
    captured = {t.name for t in concrete.graph.internal_captures}
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.resource and t.name not in captured]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.resource]
    renames = tensor_names_from_structed(concrete, inputs, outputs)
    with tf.device("/cpu:0"):
        frozen = tf_loader.from_function(concrete, inputs, outputs)
        return _convert(lambda tf2onnx: _convert_common(
            frozen, name=name, continue_on_error=True, opset=opset, input_names=inputs,
            output_names=outputs, tensors_to_rename=renames))


@contextlib.contextmanager
def _exportable_keras_ops():
    """Trace Keras ops in forms tf2onnx converts: grouped convolutions without the XLA-compiled
    function Keras wraps them in on CPU (an opaque call to tf2onnx; only the trace sees it, it is
    never run), and exact GELU through erf instead of erfc (no ONNX op)."""
    from keras.src.backend.tensorflow import nn as backend_nn
    tf = _tf()
    saved = backend_nn.conv, backend_nn.gelu

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        data_format = backend_nn._convert_data_format(
            backend_nn.backend.standardize_data_format(data_format), len(inputs.shape))
        return tf.nn.convolution(inputs, kernel, strides, padding.upper(), data_format=data_format,
                                 dilations=dilation_rate)

    def gelu(x, approximate=True):
        x = tf.convert_to_tensor(x)
        if approximate:
            return tf.nn.gelu(x, approximate=True)
        return 0.5 * x * (1.0 + tf.math.erf(x * np.float32(1 / np.sqrt(2))))

    backend_nn.conv, backend_nn.gelu = conv, gelu
    try:
        yield
    finally:
        backend_nn.conv, backend_nn.gelu = saved


def _keras_output_names(model):
    names = []
    for i, t in enumerate(getattr(model, "outputs", None) or []):
        layer = t._keras_history[0] if hasattr(t, "_keras_history") else None
        names.append(layer.name if layer is not None else f"output{i}")
    if not names or len(set(names)) != len(names):
        names = [f"output{i}" for i in range(max(len(names), 1))]
    return names


def _order_outputs(proto, names):
    by_name = {o.name: o for o in proto.graph.output}
    if set(by_name) == set(names):
        ordered = [by_name[n] for n in names]
        del proto.graph.output[:]
        proto.graph.output.extend(ordered)


def _export_module(module, input_signature, opset):
    tf = _tf()
    fn = getattr(module, "__call__", None)
    if input_signature is None:
        if isinstance(fn, tf.types.experimental.PolymorphicFunction) and fn.input_signature:
            input_signature = fn.input_signature
        else:
            raise SpaError("tf.Module export needs input_signature (or a @tf.function(input_signature=...) "
                           "__call__)")
    fn = fn if isinstance(fn, tf.types.experimental.PolymorphicFunction) else tf.function(fn)
    return _convert_function(fn, list(input_signature), opset, type(module).__name__)


def _export_file(path, input_signature, opset):
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise SpaError(f"{path} is a directory without saved_model.pb (not a SavedModel)")
        return _export_saved_model(path, opset)
    if path.endswith(".tflite"):
        _check_tflite(path)
        return _export_tflite(path, opset)
    if path.endswith(".keras") or path.endswith(".h5"):
        if not os.path.isfile(path):
            raise SpaError(f"{path} does not exist")
        try:
            model = _keras().models.load_model(path, compile=False)
        except Exception as exc:  # noqa: BLE001 - any load failure is bad input
            raise SpaError(f"cannot load Keras model {path}: {type(exc).__name__}") from None
        return _export_keras(model, input_signature, opset)
    raise SpaError(f"{path}: not a .keras/.h5 file, a .tflite file or a SavedModel directory")


def _export_saved_model(path, opset):
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common
    frozen, inputs, outputs, _, _, tables, renames = tf_loader.from_saved_model(
        path, None, None, return_concrete_func=True, return_initialized_tables=True,
        return_tensors_to_rename=True)
    return _convert(lambda tf2onnx: _convert_common(
        frozen, name=os.path.basename(path.rstrip("/")), opset=opset, input_names=inputs,
        output_names=outputs, tensors_to_rename=renames, initialized_tables=tables,
        continue_on_error=True))


RESOURCE_VARIABLE_OPS = {129: "CALL_ONCE", 142: "VAR_HANDLE", 143: "READ_VARIABLE", 144: "ASSIGN_VARIABLE"}


def _export_tflite(path, opset):
    """tf2onnx's tflite path, with handlers for the TFLite custom ops SPA converts
    (tflite_custom_ops: MediaPipe's Convolution2DTransposeBias) and sparse weights made dense
    (tflite_sparse); a custom op nobody converts is refused up front, by name."""
    from . import tflite_custom_ops as custom
    from . import tflite_sparse
    custom_ops = custom.read_custom_ops(path)
    with _native_logs_hidden():
        unknown = custom.unconvertible(custom_ops)  # imports tf2onnx
    if unknown:
        raise SpaError(f"{path}: TFLite custom op{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(unknown)} cannot be converted to ONNX (SPA converts "
                       f"{', '.join(custom.supported_codes())}; tf2onnx converts Flex ops and "
                       "TFLite_Detection_PostProcess)")
    codes = custom.builtin_codes(path)
    stateful = sorted(name for code, name in RESOURCE_VARIABLE_OPS.items() if code in codes)
    if stateful:
        raise SpaError(f"{path}: TFLite resource-variable ops ({', '.join(stateful)}: a streaming model that keeps "
                       "its state inside the file between calls) cannot be converted to ONNX by tf2onnx")
    errors = []
    handlers = custom.handlers(custom_ops, errors) or None
    with tempfile.TemporaryDirectory(prefix="spa-tflite-") as work:
        with _native_logs_hidden():  # sparse weights made dense: tf2onnx reads every weight as dense
            dense = tflite_sparse.densified_copy(path, work) if tflite_sparse.DENSIFY in codes else None
        return _convert(lambda tf2onnx: tf2onnx.convert.from_tflite(
            dense or path, opset=opset, custom_op_handlers=handlers), path, errors)


def _check_tflite(path):
    """A TFLite flatbuffer carries the file identifier TFL3 at bytes 4..8."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise SpaError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if head[4:8] != b"TFL3":
        raise SpaError(f"{path} is not a TFLite model (no TFL3 flatbuffer identifier)")


def _convert(run, what="the model", handler_errors=()):
    """Run a tf2onnx conversion; any failure is one SpaError line. `handler_errors`: the list our
    custom-op handlers append to (tf2onnx swallows handler exceptions); the first is raised."""
    import logging
    with _native_logs_hidden():
        import tf2onnx
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        with _native_logs_hidden():
            proto, _ = run(tf2onnx)
    except SpaError:
        raise
    except Exception as exc:  # noqa: BLE001 - a converter failure on the user's file is bad input
        if handler_errors:
            raise handler_errors[0] from None
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise SpaError(f"tf2onnx could not convert {what}: {type(exc).__name__}"
                       f"{': ' + detail if detail else ''}") from None
    if handler_errors:
        raise handler_errors[0]
    unsupported = sorted({n.op_type for n in proto.graph.node
                          if not onnx.defs.has(n.op_type, n.domain or "")})
    if unsupported:
        raise SpaError(f"tf2onnx left ops it could not convert: {', '.join(unsupported)}")
    _renumber_made_names(proto.graph)
    return proto


MADE_NAME = re.compile(r"^(?P<stem>.+?)__(?P<number>\d+)(?P<port>:\d+)?$")  # tf2onnx's utils.make_name


def _renumber_made_names(graph: onnx.GraphProto) -> None:
    """Renumber the names tf2onnx makes (stem__N, N from a counter the whole conversion shares) in the
    order the graph first uses them. Which N a name gets varied from run to run (MediaPipe's face
    detector: const_fold_opt__973 in one conversion, __878 in the next), so a plan written from a
    .tflite file named weights that the next conversion of the same file did not have. The graph's
    inputs and outputs keep their names."""
    keep = {v.name for v in list(graph.input) + list(graph.output)}
    names = {t.name for t in graph.initializer} | {x for n in graph.node for x in [*n.input, *n.output, n.name]}
    taken = keep | {x for x in names if not MADE_NAME.match(x)}  # the names that stay (every made one goes)
    count = itertools.count()
    tensors, nodes = {}, {}

    def renamed(name, table):
        if name in table:
            return table[name]
        made = MADE_NAME.match(name)
        new = name
        if made and name not in keep:
            new = f"{made['stem']}__{next(count)}{made['port'] or ''}"
            while new in taken:
                new = f"{made['stem']}__{next(count)}{made['port'] or ''}"
            taken.add(new)
        table[name] = new
        return new

    def walk(g, top=True):
        if not top:  # a control-flow body's formal inputs and outputs are its own
            for v in list(g.input) + list(g.output):
                v.name = renamed(v.name, tensors)
        for node in g.node:
            node.name = renamed(node.name, nodes) if node.name else node.name
            node.input[:] = [renamed(x, tensors) if x else x for x in node.input]
            node.output[:] = [renamed(x, tensors) if x else x for x in node.output]
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub, top=False)
        for t in g.initializer:
            t.name = renamed(t.name, tensors)
        for v in g.value_info:
            v.name = renamed(v.name, tensors)

    walk(graph)


def _set_metadata(proto, key, value):
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    proto.metadata_props.add(key=key, value=value)


def read_weight_map(onnx_model) -> dict:
    proto = _load(onnx_model, load_weights=False)
    for prop in proto.metadata_props:
        if prop.key == WEIGHT_MAP_KEY:
            return json.loads(prop.value)
    return {}


def _load(model_or_path, load_weights=True):
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = os.fspath(model_or_path)
    try:
        return onnx.load(path, load_external_data=load_weights)
    except Exception as exc:  # noqa: BLE001 - any load failure is bad input
        raise SpaError(f"cannot read ONNX model {path}: {type(exc).__name__}") from None


# ----------------------------------------------------------------------------------------------
# weight map: ONNX initializer <-> Keras variable
# ----------------------------------------------------------------------------------------------
def _candidate_perms(rank):
    perms = [tuple(range(rank))]
    if rank == 2:
        perms.append((1, 0))
    if rank >= 3:  # conv kernels: (*spatial, in, out) -> (out, in, *spatial)
        perms.append((rank - 1, rank - 2) + tuple(range(rank - 2)))
    if rank == 4:  # depthwise (kh, kw, in, mult) -> (in * mult, 1, kh, kw)
        perms.append((2, 3, 0, 1))
    return perms


# Keras recurrent gate order -> ONNX's: LSTM i,f,c,o -> i,o,f,c; GRU z,r,h is the same.
GATE_ORDERS = {4: [0, 3, 1, 2], 3: [0, 1, 2]}


def _moved(value, perm, blocks, shape):
    moved = np.transpose(value, perm)
    if blocks:
        moved = _reorder_blocks(moved, blocks)
    return moved.reshape(shape)


def _reorder_blocks(array, order, inverse=False):
    """Reorder equal blocks of axis 0 (recurrent gates)."""
    order = np.argsort(order) if inverse else np.asarray(order)
    pieces = np.split(array, len(order), axis=0)
    return np.concatenate([pieces[k] for k in order], axis=0)


def _may_match(value, perm, blocks, onnx_value, probe=32):
    """Cheap test on the first elements of the first ONNX row: equal, or proportional."""
    if blocks:
        return True
    row = int(np.prod(onnx_value.shape[1:])) if onnx_value.ndim > 1 else onnx_value.size
    k = max(1, min(probe, row))
    head = np.transpose(value, perm).flat[:k]
    target = onnx_value.reshape(-1)[:k]
    if np.allclose(head, target, rtol=1e-5, atol=1e-7):
        return True
    if onnx_value.ndim < 2 or not head.any():
        return False
    pivot = int(np.abs(head).argmax())
    return np.allclose(head * (target[pivot] / head[pivot]), target, rtol=1e-4, atol=1e-6)


def _relation(value, onnx_value):
    """(perm, blocks, scaled): onnx == reshape(reorder(transpose(value, perm), blocks)) [* a scale
    per ONNX row], or None."""
    options = [(perm, None) for perm in _candidate_perms(value.ndim)]
    if value.ndim == 2:  # recurrent kernels (in, G*H) -> W/R (1, G*H, in), gates reordered
        options += [((1, 0), GATE_ORDERS[g]) for g in (4, 3) if value.shape[1] % g == 0]
    for perm, blocks in options:
        if not _may_match(value, perm, blocks, onnx_value):
            continue
        try:
            moved = _moved(value, perm, blocks, onnx_value.shape)
        except ValueError:
            continue
        if np.allclose(moved, onnx_value, rtol=1e-5, atol=1e-7):
            return perm, blocks, False
        if onnx_value.ndim >= 2 and onnx_value.shape[0] > 0:
            rows, onnx_rows = moved.reshape(len(moved), -1), onnx_value.reshape(len(onnx_value), -1)
            if rows.shape[1] < 2:
                continue
            pivot = np.abs(rows).argmax(axis=1)
            denom = rows[np.arange(len(rows)), pivot]
            if np.any(denom == 0):
                continue
            scale = onnx_rows[np.arange(len(rows)), pivot] / denom
            if np.allclose(rows * scale[:, None], onnx_rows, rtol=1e-4, atol=1e-6):
                return perm, blocks, True
    return None


def keras_weight_map(model, proto) -> dict:
    """{onnx initializer: {"variable", "layer", "perm", "blocks", "scaled", "shape"}} found by value.

    onnx = reshape(transpose(variable, perm), shape) with axis 0's equal blocks put in the order
    "blocks" (recurrent gates; null for none), times one factor per ONNX row when
    "scaled" (a BatchNormalization folded into the conv/dense before it). Constant-valued
    variables (zero biases, unit scales) are ambiguous and left out; apply_plan follows their
    channels through the Keras graph instead.
    """
    by_size = {}
    for var in model.weights:
        value = np.asarray(var.numpy())
        if value.dtype.kind != "f" or value.size < 2 or np.ptp(value) == 0:
            continue
        by_size.setdefault(value.size, []).append((var.path, value))
    found = {}
    for init in proto.graph.initializer:
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            continue
        candidates = by_size.get(int(np.prod(init.dims)) if init.dims else 1, [])
        if not candidates:
            continue
        onnx_value = numpy_helper.to_array(init)
        for var_path, value in candidates:
            rel = _relation(value, onnx_value)
            if rel is not None:
                found[init.name] = {"variable": var_path, "layer": var_path.rsplit("/", 1)[0],
                                    "perm": list(rel[0]), "blocks": rel[1], "scaled": rel[2],
                                    "shape": list(onnx_value.shape),
                                    "variable_shape": list(value.shape)}
                break
    return found
