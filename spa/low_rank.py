"""A dense low-rank term beside a sparsified layer (`spa sparsify --low-rank R`).

A layer sparsified to W' leaves the error E = W_t - W' against the dense weights it was fitted to
(W_t: the layer's own, or the original model's outputs' fit, `sparse_obs.reference_target`). A
rank-R term U V added beside the sparse layer (sparse plus low-rank, as SLiM and SLoPe do for 2:4
LLMs) is fitted to E in the metric of the layer's calibration inputs, min ||(E - U V) X||: the
truncated SVD of E L (H = L L^T), mapped back through L^-1. A layer with a bias takes the part of
E that the column of ones carries into its bias exactly, at no cost (the Schur complement of H's
bias entry is the metric of the rest). The pattern's zeros stay exact: the term is a branch of its
own, x -> x V^T -> U^T (two MatMuls, or a Conv of R filters then a 1x1 Conv), added to the layer's
output.

`spa.sparse_obs` then fits the sparse part and the term in turn (OATS's alternation). Measured on
all-MiniLM-L6-v2 at 2:4 with its tokenizer, no data (docs/sparsity.md): rank 16 / 32 raise the mean
sentence cosine 0.874 -> 0.925 / 0.948 for 6.2 / 12.5 % more of the dense layers' weights (one round:
0.891 / 0.905). On the real sentences' inputs, the 2:4 error of its layers is low-rank: rank 8 holds
38 % of it, rank 32 60 %.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import obs
from .graph import attr


def fit(error: np.ndarray, H: np.ndarray, rank: int, bias: bool, damp: float = obs.DEFAULT_DAMP,
        factor: tuple | None = None) -> tuple:
    """(U (rows, r), V (r, weight columns), bias change (rows,) or None) minimising
    ||(error - [U V, b]) X||^2 for H = 2 X X^T / N (damped as the sweep damps it); with `bias`, the
    last column of `error` and H is the bias's (a column of ones in X). `factor`: `metric(H, bias,
    damp)`, for the rounds that fit a term against the same H."""
    from scipy.linalg import solve_triangular

    L, carried = factor or metric(H, bias, damp)
    weights = error[:, :-1] if bias else error
    left, values, right = _top_singular(weights @ L, rank)
    U = left * values
    V = solve_triangular(L, right.T, lower=True, trans="T").T  # right L^-1
    if not bias:
        return U, V, None
    return U, V, error[:, -1] + (weights - U @ V) @ carried


def metric(H: np.ndarray, bias: bool, damp: float = obs.DEFAULT_DAMP) -> tuple:
    """(L, carried): the Cholesky factor of the damped H the term is measured in and, with `bias`,
    what the bias takes per weight column (the bias carries (weights - U V) exactly; the rest is
    measured by H's Schur complement)."""
    Hd = obs.damped(H, damp)
    if not bias:
        return np.linalg.cholesky(Hd), None
    carried = Hd[:-1, -1] / Hd[-1, -1]
    return np.linalg.cholesky(Hd[:-1, :-1] - np.outer(Hd[:-1, -1], carried)), carried


def _top_singular(M: np.ndarray, rank: int) -> tuple:
    """(left (rows, r), values (r,), right (r, cols)): M's top r singular triplets, from the
    eigenvectors of its smaller Gram matrix (6x faster than a full SVD of a 1536 x 384 layer)."""
    from scipy.linalg import eigh

    tall = M.shape[0] >= M.shape[1]
    gram = M.T @ M if tall else M @ M.T
    r = min(rank, len(gram))
    energy, vectors = eigh(gram, subset_by_index=[len(gram) - r, len(gram) - 1])
    energy, vectors = energy[::-1], vectors[:, ::-1]
    values = np.sqrt(np.maximum(energy, 0.0))
    scale = np.divide(1.0, values, out=np.zeros_like(values), where=values > values[:1] * 1e-12)
    if tall:
        return (M @ vectors) * scale, values, vectors.T
    return vectors, values, (vectors.T @ M) * scale[:, None]


def as_matrices(mats: np.ndarray, U: np.ndarray, V: np.ndarray, bias_change) -> np.ndarray:
    """(1, rows, cols) matrices of a layer with its low-rank term folded in (what the branch computes)."""
    out = np.array(mats, dtype=np.float64)
    width = V.shape[1]
    out[0, :, :width] += U @ V
    if bias_change is not None:
        out[0, :, -1] += bias_change
    return out


def parameters(rows: int, cols: int, rank: int) -> int:
    return rank * (rows + cols)


def added(branches: list) -> int:
    """The dense weights the branches ([(Layer, U, V)]) add."""
    return int(sum(U.size + V.size for _, U, V in branches))


def takes_branch(g, layer) -> bool:
    """Whether `layer` has a branch form: a float MatMul, Gemm or ungrouped Conv whose activation is
    on the left of its product (not an integer layer, a grouped Conv or a weight on the left)."""
    from .quant import is_integer_weight

    node = g.nodes[layer.node]
    integer = is_integer_weight(g, layer.weight) or layer.input_grid is not None or layer.channels is not None
    left = layer.rows_from_left or (node.op_type == "Gemm" and attr(node, "transA", 0))
    return node.op_type in ("MatMul", "Gemm", "Conv") and not integer and layer.blocks == 1 and not left


def with_branches(model: onnx.ModelProto, g, branches: list) -> onnx.ModelProto:
    """`model` (in place) with each layer's branch ([(Layer, U, V)]) added to its output."""
    position = {node.output[0]: i for i, node in enumerate(model.graph.node)}
    inserted = {}
    for k, (layer, U, V) in enumerate(branches):
        at = position[g.nodes[layer.node].output[0]]
        dtype = np.asarray(g.consts[layer.weight]).dtype
        inserted[at] = _branch(model, model.graph.node[at], layer, U.astype(dtype), V.astype(dtype), f"low_rank_{k}")
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for i, node in enumerate(nodes):
        model.graph.node.append(node)
        model.graph.node.extend(inserted.get(i, []))
    return model


def _branch(model, node, layer, U, V, prefix: str) -> list:
    """The nodes x -> x V^T -> U^T -> + the layer's output (renamed), their weights added to `model`."""
    out = node.output[0]
    node.output[0] = f"{prefix}/sparse"
    if layer.kind == "conv":
        kernel = layer.kernel
        first = V.reshape((V.shape[0], -1) + tuple(kernel))
        second = U.reshape(U.shape + (1,) * len(kernel))
        keep = [a for a in node.attribute if a.name in ("pads", "strides", "dilations", "auto_pad")]
        nodes = [helper.make_node("Conv", [layer.activation, f"{prefix}/V"], [f"{prefix}/xV"], name=f"{prefix}/V"),
                 helper.make_node("Conv", [f"{prefix}/xV", f"{prefix}/U"], [f"{prefix}/xVU"], name=f"{prefix}/U")]
        nodes[0].attribute.extend(keep)
    else:
        first, second = V.T, U.T
        nodes = [helper.make_node("MatMul", [layer.activation, f"{prefix}/V"], [f"{prefix}/xV"], name=f"{prefix}/V"),
                 helper.make_node("MatMul", [f"{prefix}/xV", f"{prefix}/U"], [f"{prefix}/xVU"], name=f"{prefix}/U")]
    model.graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(first), f"{prefix}/V"),
                                    numpy_helper.from_array(np.ascontiguousarray(second), f"{prefix}/U")])
    return nodes + [helper.make_node("Add", [f"{prefix}/sparse", f"{prefix}/xVU"], [out], name=f"{prefix}/add")]

