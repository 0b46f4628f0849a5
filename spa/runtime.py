"""onnxruntime helpers: input specs, random inputs, sessions."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def input_specs(model: onnx.ModelProto, batch: int = 1, dims: dict | None = None, default_dim: int = 32):
    """(name, shape, numpy dtype) for each real graph input, symbolic dims made concrete: a name
    given in `dims` takes that size, a name that leads any input is the batch, others default_dim."""
    dims = dict(dims or {})
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    for vi in inputs:
        shape = vi.type.tensor_type.shape.dim
        if shape and not shape[0].HasField("dim_value"):
            dims.setdefault(shape[0].dim_param or "?", batch)
    specs = []
    for vi in inputs:
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param or "?", default_dim)
                 for d in t.shape.dim]
        specs.append((vi.name, tuple(shape), _NP_TYPES.get(t.elem_type, np.float32)))
    return specs


def random_inputs(model, batch=1, seed=0, dims=None, default_dim=32):
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in input_specs(model, batch, dims, default_dim):
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.random(shape) < 0.5
        else:
            feeds[name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def session(model_or_path, threads: int | None = None, quiet: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3
    if threads:
        options.intra_op_num_threads = threads
    source = model_or_path if isinstance(model_or_path, (str, bytes)) else model_or_path.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model_or_path, feeds) -> list:
    return session(model_or_path).run(None, feeds)


def declared_inputs(model: onnx.ModelProto):
    """(name, dims, numpy dtype) for each real graph input, as declared: each dim an int (static),
    a str (its symbolic name) or None (unnamed: no dim_param, or paddle2onnx's "?")."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param if d.dim_param not in ("", "?") else None)
                     for d in t.shape.dim)
        out.append((vi.name, dims, _NP_TYPES.get(t.elem_type, np.float32)))
    return out


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs fix (the same static first dim on every input), or None."""
    firsts = {dims[0] if dims else None for _, dims, _ in declared_inputs(model)}
    return firsts.pop() if len(firsts) == 1 and isinstance(next(iter(firsts)), int) else None
