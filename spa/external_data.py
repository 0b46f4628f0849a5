"""Models too large to hold: weights stay in their external data files and are handled one tensor
at a time. A streamed model is an ordinary ModelProto whose big tensors still point at their files
(the folder they resolve against is kept in a metadata entry); values are read through memory maps
(`array`), tensors the rewrite makes are appended to a scratch file as they are made (`Spill`), and
`write` copies every tensor into the output's one data file sequentially. Nothing ever holds the
whole model, so the peak memory is a few tensors plus whatever verification needs."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper

from .errors import SpaError

BASE_KEY = "spa:external_data_base"  # metadata entry: the folder external locations resolve against
STREAM_BYTES = 1 << 30  # load_model streams a model whose external data is larger than this
INLINE_BYTES = 1 << 16  # smaller external tensors (shape constants) are read into the proto
ALIGN = 4096  # offsets in written data files (onnxruntime maps aligned tensors instead of copying)
_CHUNK = 1 << 26
# bits per element of the types ONNX packs below a byte, where numpy holds one to a byte (read, not memory-mapped)
SUB_BYTE_BITS = {getattr(TensorProto, name): bits for name, bits in
                 (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                  ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)) if hasattr(TensorProto, name)}
SUB_BYTE = frozenset(SUB_BYTE_BITS)


def data_bytes(data_type: int, count: int) -> int:
    """Bytes of `count` elements of an ONNX element type as raw data holds them (SUB_BYTE_BITS packed)."""
    bits = SUB_BYTE_BITS.get(data_type)
    return -(-count * bits // 8) if bits else count * _itemsize(data_type)


@functools.cache
def _itemsize(data_type: int) -> int:
    return helper.tensor_dtype_to_np_dtype(data_type).itemsize
_VALUE_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def external_tensors(model: onnx.ModelProto):
    from .graph import _all_tensors
    return [t for t in _all_tensors(model.graph) if t.data_location == TensorProto.EXTERNAL]


def stream(model: onnx.ModelProto, base: str) -> onnx.ModelProto:
    """Mark `model` (loaded without its external data) as streamed from folder `base`. Read now:
    tensors under INLINE_BYTES (analysis reads shape constants as values) and those outside the
    main graph's initializers (Constant nodes' values, subgraphs), which only initializers can
    be mapped for."""
    from .graph import _all_tensors, tensor_bytes
    initializers = list(model.graph.initializer)
    elsewhere = list(_all_tensors(model.graph))[len(initializers):]  # _all_tensors yields initializers first
    for tensor in [t for t in initializers if tensor_bytes(t) <= INLINE_BYTES] + elsewhere:
        if tensor.data_location == TensorProto.EXTERNAL:
            external_data_helper.load_external_data_for_tensor(tensor, base)
    _set_base(model, os.path.abspath(base))
    return model


def base_of(model: onnx.ModelProto) -> str | None:
    """The folder a streamed model's external tensors resolve against; None for a loaded model."""
    for prop in model.metadata_props:
        if prop.key == BASE_KEY:
            return prop.value
    return None


def is_streamed(model: onnx.ModelProto) -> bool:
    return base_of(model) is not None


def _set_base(model, base):
    _drop_base(model)
    model.metadata_props.add(key=BASE_KEY, value=base)


def _drop_base(model):
    keep = [p for p in model.metadata_props if p.key != BASE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)


def location(tensor: TensorProto, base: str) -> tuple[str, int, int]:
    """(file, offset, length) of an external tensor."""
    from .graph import tensor_bytes
    info = external_data_helper.ExternalDataInfo(tensor)
    length = int(info.length) if info.length is not None else tensor_bytes(tensor)
    return os.path.join(base, info.location), int(info.offset or 0), length


def raw_bytes(value: np.ndarray):
    """The bytes ONNX stores for an array (a buffer): sub-byte types packed (SUB_BYTE_BITS)."""
    if helper.np_dtype_to_tensor_dtype(value.dtype) in SUB_BYTE:
        return onnx.numpy_helper.from_array(np.asarray(value)).raw_data
    return np.ascontiguousarray(value).reshape(-1).view(np.uint8).data  # bytes of any dtype (bfloat16 too)


def array(tensor: TensorProto, base: str) -> np.ndarray:
    """A read-only memory map of an external tensor (pages are read as they are touched and leave
    memory when the array is dropped); a SUB_BYTE tensor is read and unpacked."""
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    path, offset, length = location(tensor, base)
    if not tensor.dims or length == 0 or tensor.data_type in SUB_BYTE:
        return onnx.numpy_helper.to_array(_loaded_copy(tensor, base))
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(tensor.dims))


def _loaded_copy(tensor, base):
    copy = TensorProto()
    copy.CopyFrom(tensor)
    external_data_helper.load_external_data_for_tensor(copy, base)
    return copy


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Read every external tensor of a streamed model into the proto (for stages that run the
    model with its weights, e.g. calibration passes); a loaded model is returned as is."""
    base = base_of(model)
    if base is None:
        return model
    for tensor in external_tensors(model):
        external_data_helper.load_external_data_for_tensor(tensor, base)
    _drop_base(model)
    return model


class Spill:
    """A scratch data file the rewrite appends new tensors to; a tensor added here points at it
    by absolute path (resolved the same way as relative ones) until `write` copies it out."""

    _folders = []

    def __init__(self):
        if not Spill._folders:
            atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for f in Spill._folders])
        folder = tempfile.mkdtemp(prefix="spa-spill-")
        Spill._folders.append(folder)
        self.path = os.path.join(folder, "tensors.data")
        self.file = open(self.path, "wb")

    def add(self, graph: onnx.GraphProto, value: np.ndarray, name: str) -> TensorProto:
        value = np.ascontiguousarray(value)
        tensor = graph.initializer.add(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype),
                                       dims=value.shape)
        self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        offset = self.file.tell()
        raw = raw_bytes(value)
        self.file.write(raw)
        self.file.flush()
        _point(tensor, self.path, offset, len(raw))
        return tensor


def _point(tensor, where, offset, length):
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", where), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def write(model: onnx.ModelProto, path: str, data_name: str) -> None:
    """Write a streamed model to `path` with every tensor over INLINE_BYTES in `data_name` (beside
    it), copied file to file in chunks; in-proto tensors that large move out too. The model is
    left untouched."""
    from .graph import tensor_bytes
    base = base_of(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)  # big tensors are references here: a small copy
    _drop_base(out)
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), data_name)
    with open(data_path, "wb") as data:
        for tensor in external_tensors(out) + [t for t in out.graph.initializer
                                                if t.data_location != TensorProto.EXTERNAL
                                                and tensor_bytes(t) > INLINE_BYTES]:
            data.write(b"\0" * (-data.tell() % ALIGN))
            offset = data.tell()
            if tensor.data_location == TensorProto.EXTERNAL:
                source, start, length = location(tensor, base)
                _copy_range(source, start, length, data)
            else:
                raw = tensor.raw_data if tensor.HasField("raw_data") else raw_bytes(onnx.numpy_helper.to_array(tensor))
                length = len(raw)
                data.write(raw)
                for field in _VALUE_FIELDS:
                    tensor.ClearField(field)
            _point(tensor, data_name, offset, length)
    try:
        onnx.save_model(out, path)
    except Exception as exc:
        raise SpaError(f"cannot write {path} ({type(exc).__name__}: {str(exc)[:200]})") from None


def _copy_range(source: str, start: int, length: int, sink) -> None:
    with open(source, "rb") as f:
        f.seek(start)
        left = length
        while left:
            block = f.read(min(_CHUNK, left))
            if not block:
                raise SpaError(f"external data file {source} ended early")
            sink.write(block)
            left -= len(block)
