"""Checks on the tensors of a loaded model file: every tensor's data matches its dims and type,
and external data stays inside the model's folder, in a regular file, within its bounds. A bad
file is one SpaError naming the tensor, raised before any large allocation (numpy, onnxruntime
and shape inference trust the dims)."""
from __future__ import annotations

import math
import os

import onnx
from onnx import TensorProto

from .errors import SpaError
from .external_data import SUB_BYTE_BITS, data_bytes
from .runtime import onnxruntime_onnx_ops

_TYPED_PACKED = {t for t, bits in SUB_BYTE_BITS.items() if bits in (2, 4)}  # int32_data holds packed bytes
_COMPLEX = {TensorProto.COMPLEX64, TensorProto.COMPLEX128}


def all_tensors(model: onnx.ModelProto):
    """Every TensorProto of a model: initializers, sparse initializers' parts, tensor attributes,
    in the main graph, every subgraph and every local function."""
    def graph_tensors(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from node_tensors(graph.node)

    def node_tensors(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for g in attr.graphs:
                    yield from graph_tensors(g)

    yield from graph_tensors(model.graph)
    for function in model.functions:
        yield from node_tensors(function.node)


def _name(tensor) -> str:
    return tensor.name or "(unnamed)"


def _elements(tensor, path) -> int:
    """The element count its dims give; its type must be known."""
    if tensor.data_type not in TensorProto.DataType.values() or tensor.data_type == TensorProto.UNDEFINED:
        raise SpaError(f"{path}: tensor '{_name(tensor)}' has unknown data type {tensor.data_type}")
    if any(d < 0 for d in tensor.dims):
        raise SpaError(f"{path}: tensor '{_name(tensor)}' has a negative dimension {list(tensor.dims)}")
    return math.prod(tensor.dims)


def expected_bytes(tensor: TensorProto, path: str = "model") -> int:
    """Bytes of raw (or external) data that the tensor's dims and type need."""
    count = _elements(tensor, path)
    if tensor.data_type == TensorProto.STRING:
        raise SpaError(f"{path}: tensor '{_name(tensor)}' of type string keeps its data outside string_data")
    return data_bytes(tensor.data_type, count)


def check_tensor(tensor: TensorProto, path: str) -> None:
    """The data present (raw bytes or the typed field) is exactly what the dims and type need."""
    count = _elements(tensor, path)
    if tensor.data_location == TensorProto.EXTERNAL:
        return  # checked against the file by check_external, then loaded as raw data
    shown = f"{path}: tensor '{_name(tensor)}' of dims {list(tensor.dims)}"
    if tensor.HasField("raw_data"):  # what numpy_helper.to_array reads first
        if tensor.data_type == TensorProto.STRING:
            raise SpaError(f"{shown} has raw data, which a string tensor cannot have")
        need = data_bytes(tensor.data_type, count)
        if len(tensor.raw_data) != need:
            raise SpaError(f"{shown} has {len(tensor.raw_data)} bytes of data where its dims and type need {need}")
        return
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    have = len(getattr(tensor, field))
    if tensor.data_type in _COMPLEX:
        need = 2 * count
    elif tensor.data_type in _TYPED_PACKED:
        need = data_bytes(tensor.data_type, count)
    else:
        need = count
    if have != need:
        raise SpaError(f"{shown} has {have} values where its dims and type need {need}")


def check_tensors(model: onnx.ModelProto, path: str) -> None:
    for tensor in all_tensors(model):
        check_tensor(tensor, path)


def check_external(model: onnx.ModelProto, path: str) -> set:
    """Every external tensor's file: inside the model's folder (symbolic links resolved), a regular
    file, offset + length within it, length what the dims need. Returns the files (real paths)."""
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    files, sizes = set(), {}
    for tensor in all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        shown = f"{path}: external data of tensor '{_name(tensor)}'"
        if not location:
            raise SpaError(f"{shown} names no file")
        try:
            where = os.path.realpath(os.path.join(base, location))
        except (ValueError, OSError):  # a NUL byte, a loop of links
            raise SpaError(f"{shown} names an unusable path") from None
        if os.path.islink(os.path.join(base, location)):
            raise SpaError(f"{shown}: '{location}' is a symbolic link (onnx reads external data only from regular "
                           "files inside the model's folder)")
        if os.path.isabs(location) or os.path.commonpath([base, where]) != base:
            raise SpaError(f"{shown} is outside the model's folder ('{location}')")
        if not os.path.exists(where):
            raise SpaError(f"{path}: external data file '{location}' for tensor '{_name(tensor)}' is missing")
        if not os.path.isfile(where):
            raise SpaError(f"{shown}: '{location}' is not a regular file")
        if where not in sizes:
            sizes[where] = os.path.getsize(where)
        files.add(where)
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise SpaError(f"{shown} has a malformed offset or length") from None
        need = expected_bytes(tensor, path)
        if offset < 0 or (length is not None and length < 0):
            raise SpaError(f"{shown} has a negative offset or length")
        end = offset + (need if length is None else length)
        if length is not None and length != need:
            raise SpaError(f"{shown} has length {length} where its dims {list(tensor.dims)} need {need} bytes")
        if end > sizes[where]:
            raise SpaError(f"{shown} runs past the end of '{location}' (bytes {offset}..{end} of {sizes[where]})")
    return files


def _check_text(message, path: str, where: str = "") -> None:
    """Every string field of `message` and its submessages is valid UTF-8 (protobuf hands back
    bytes for one that is not, and the first copy of it fails)."""
    from google.protobuf.descriptor import FieldDescriptor

    if isinstance(message, TensorProto):  # ListFields would copy raw_data: read the text fields only
        for name in ("name", "doc_string"):
            if isinstance(getattr(message, name), bytes):
                raise SpaError(f"{path}: {where}{name} is not valid UTF-8 text")
        return
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if _repeated(field) else [value]
            if any(isinstance(v, bytes) for v in values):
                raise SpaError(f"{path}: {where}{field.name} is not valid UTF-8 text")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            values = value if _repeated(field) else [value]
            for k, v in enumerate(values):
                label = getattr(v, "name", "") if isinstance(getattr(v, "name", None), str) else ""
                _check_text(v, path, f"{where}{field.name}[{label or k}].")


def _repeated(field) -> bool:
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def check_structure(model: onnx.ModelProto, path: str) -> None:
    """Text fields are valid UTF-8; every input of a top-level node is a graph input, an
    initializer or some node's output; no two nodes write the same tensor."""
    _check_text(model, path)
    graph = model.graph
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
        {t.values.name for t in graph.sparse_initializer}
    written = set()
    for node in graph.node:
        for out in node.output:
            if out and out in written:
                raise SpaError(f"{path}: tensor '{out}' is written by two nodes")
            written.add(out)
    defined |= written
    local = {(f.domain, f.name) for f in model.functions}
    for k, node in enumerate(graph.node):
        if node.domain in ("", "ai.onnx") and (node.domain, node.op_type) not in local and \
                not onnx.defs.has(node.op_type) and node.op_type not in onnxruntime_onnx_ops():
            raise SpaError(f"{path}: node '{node.name or '#' + str(k)}' has operator '{node.op_type}', which ONNX "
                           "does not define")
    for k, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in defined:
                raise SpaError(f"{path}: node '{node.name or node.op_type + '#' + str(k)}' reads '{name}', which no "
                               "node, input or initializer provides")
    for out in graph.output:
        if out.name not in defined:
            raise SpaError(f"{path}: graph output '{out.name}' is not computed by the graph")
