"""Sparse TFLite weights made dense before tf2onnx reads them.

A TFLite file may store a constant in a sparse format (TensorFlow Lite's sparsity parameters:
per dimension DENSE or SPARSE_CSR, in a traversal order, optionally in blocks) and expand it at run
time with a DENSIFY op (MediaPipe's `*_sparse.tflite` models). tf2onnx reads every constant
buffer as a dense array of the tensor's shape and fails on such a file ("cannot reshape array of
size 77 into shape (8,1,1,32)"). `densified_copy` writes a copy in which each DENSIFY's input
holds the dense values and its readers read that constant directly.
"""
from __future__ import annotations

import os

import numpy as np

from spa.errors import SpaError

DENSIFY = 124  # BuiltinOperator.DENSIFY
DENSE, SPARSE_CSR = 0, 1  # DimensionType
TENSOR_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8,
                10: np.float64}  # TensorType -> numpy


def densified_copy(path: str, out_dir: str) -> str | None:
    """A copy of the .tflite file at `path` in `out_dir` without DENSIFY ops (their readers read the
    densified constant), or None where the file has none. Unpacks the whole flatbuffer: ask
    `tflite_custom_ops.builtin_codes` first whether the file has DENSIFY at all."""
    from tensorflow.lite.tools import flatbuffer_utils

    try:
        model = flatbuffer_utils.read_model(path)
    except Exception as exc:  # noqa: BLE001 - a damaged flatbuffer is bad input
        raise SpaError(f"{path}: damaged TFLite file: its sparse weights cannot be read "
                       f"({type(exc).__name__})") from None
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    found = False
    for graph in model.subgraphs:
        kept = []
        for op in graph.operators or []:
            if codes[op.opcodeIndex] != DENSIFY:
                kept.append(op)
                continue
            source, target = op.inputs[0], op.outputs[0]
            tensor = graph.tensors[source]
            buffer = model.buffers[tensor.buffer]
            buffer.data = np.frombuffer(dense_values(tensor, bytes(bytearray(buffer.data))).tobytes(), np.uint8)
            tensor.sparsity = None
            _rewire(graph, target, source)
            found = True
        graph.operators = kept
    if not found:
        return None
    out = os.path.join(out_dir, os.path.basename(path))
    flatbuffer_utils.write_model(model, out)
    return out


def _rewire(graph, old: int, new: int) -> None:
    """Every reader of tensor `old` (and the graph's outputs) reads tensor `new` instead."""
    for op in graph.operators or []:
        op.inputs = [new if k == old else k for k in op.inputs]
    graph.outputs = [new if k == old else k for k in graph.outputs]


def dense_values(tensor, data: bytes) -> np.ndarray:
    """The dense array that sparse constant `tensor` (a TensorT with sparsity parameters) holds in
    `data`: the values in traversal order, walking its dimensions' metadata as TensorFlow Lite's
    FormatConverter does. Block maps are followed as its schema lays them out; no file here has one
    (MediaPipe's and TFLiteConverter's sparse weights are CSR along the last dimension)."""
    dtype = TENSOR_TYPES.get(tensor.type)
    if dtype is None:
        raise SpaError(f"sparse TFLite tensor '{_name(tensor)}' of type {tensor.type}: not densified")
    values = np.frombuffer(data, dtype)
    sparsity, shape = tensor.sparsity, [int(d) for d in tensor.shape]
    order = [int(d) for d in sparsity.traversalOrder]
    blocks = [] if sparsity.blockMap is None else [int(d) for d in sparsity.blockMap]
    levels = sparsity.dimMetadata
    rank = len(shape)
    # traversed dimensions: 0 .. rank - 1 the tensor's (a blocked one counted in blocks), rank + k block k's offset
    block_sizes = [levels[order.index(rank + k)].denseSize for k in range(len(blocks))]
    dense = np.zeros(shape, dtype)
    index = [0] * len(order)

    def place(level: int, position: int) -> None:
        if level == len(order):
            coords = [index[order.index(d)] for d in range(rank)]
            for k, d in enumerate(blocks):  # a blocked dimension: block index x block size + offset in it
                coords[d] = coords[d] * block_sizes[k] + index[order.index(rank + k)]
            dense[tuple(coords)] = values[position]
            return
        meta = levels[level]
        if meta.format == DENSE:
            for i in range(meta.denseSize):
                index[level] = i
                place(level + 1, position * meta.denseSize + i)
            return
        segments, indices = _vector(meta.arraySegments), _vector(meta.arrayIndices)
        for k in range(segments[position], segments[position + 1]):
            index[level] = indices[k]
            place(level + 1, k)

    if len(order) != len(levels) or len(order) != rank + len(blocks):
        raise SpaError(f"sparse TFLite tensor '{_name(tensor)}': {len(levels)} dimension metadata for "
                       f"{len(order)} traversed dimensions")
    place(0, 0)
    return dense


def _vector(union) -> list:
    if union is None or getattr(union, "values", None) is None:
        raise SpaError("sparse TFLite tensor: a SPARSE_CSR dimension without segments or indices")
    return [int(v) for v in union.values]


def _name(tensor) -> str:
    name = tensor.name
    return name.decode() if isinstance(name, bytes) else str(name)
