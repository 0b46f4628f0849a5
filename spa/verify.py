"""Validity checks for every model SPA writes, plus the equivalence oracle used by the tests."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from .errors import SpaError, SpaWarning
from .plan import Plan
from .quant import at_zero_point
from .runtime import _NP_TYPES, is_float, random_inputs, session

def validate(source: str | bytes, feeds: dict | None = None, model: onnx.ModelProto | None = None) -> None:
    """Full checker (with strict, type-checking shape inference), an onnxruntime session and one
    run; SpaError if not. `source`: a model file or serialised model; `model`: the same proto, to
    read its inputs from."""
    stage = "onnx checker / strict shape inference"
    try:
        onnx.checker.check_model(source, full_check=True)
        stage = "onnxruntime"
        sess = session(source)
        if feeds is None:
            if model is None:
                model = onnx.load(source, load_external_data=False) if isinstance(source, str) else onnx.load_from_string(source)
            feeds = random_inputs(model)
        outputs = sess.run(None, feeds)
        if getattr(sess, "surrogate", False):
            warnings.warn("verified on a float32 copy: onnxruntime's CPU provider has no kernel for some of the "
                          "model's float16/bfloat16/float64 ops (the written model keeps its types)", SpaWarning)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpaError(f"pruned model failed {stage}: {first_line[:300]}") from None
    for out in outputs:
        if isinstance(out, np.ndarray) and is_float(out.dtype) and not np.all(np.isfinite(np.asarray(out, np.float32))):
            raise SpaError("pruned model produced NaN or Inf")


def masked_original(plan: Plan) -> onnx.ModelProto:
    """The oracle: the original model with every removed channel's consumer slices zeroed.

    Removing channel c must be exactly the same as zeroing input slice c of every consumer;
    a Mul by a 0/1 mask is inserted in front of each contracted input. The integer weight of a
    QOperator layer (QLinearConv, QLinearMatMul, QGemm) gets its slices set to its zero point.
    """
    g = plan.analysis.graph
    model = onnx.ModelProto()
    model.CopyFrom(g.model)
    members = {m.tensor for m in plan.analysis.members.values()}
    for alias, (i, slot, _, _) in g.aliases.items():  # a consumer's own copy of a shared constant
        if alias in members:  # (compensation may give it its own value)
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(g.consts[alias]), alias))
            model.graph.node[i].input[slot] = alias
    masked: dict = {}
    for node_index, slot, axis in plan.analysis.contracted:
        tensor = g.nodes[node_index].input[slot]
        removed = plan.removed(tensor, axis)
        if len(removed) == 0:
            continue
        key = (tensor, axis)
        integer = None if key in masked else at_zero_point(g, tensor, axis, removed)
        if integer is not None:  # a QOperator layer's integer weight: removed slices := zero point
            masked[key] = f"{tensor}__spa_masked{axis}"
            model.graph.initializer.append(numpy_helper.from_array(integer, masked[key]))
        elif key not in masked:
            shape = [1] * g.rank(tensor)
            shape[axis] = g.dim(tensor, axis)
            mask = np.ones(shape, dtype=_NP_TYPES.get(_elem_type(model, tensor), np.float32))
            np.moveaxis(mask, axis, 0)[removed] = 0
            out = f"{tensor}__spa_masked{axis}"
            model.graph.initializer.append(numpy_helper.from_array(mask, out + "_mask"))
            model.graph.node.append(helper.make_node("Mul", [tensor, out + "_mask"], [out]))
            masked[key] = out
        model.graph.node[node_index].input[slot] = masked[key]
    return _toposort(model)


def _elem_type(model, tensor):
    for t in model.graph.initializer:
        if t.name == tensor:
            return t.data_type
    inferred = shape_inference.infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.name == tensor:
            return vi.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def _toposort(model):
    nodes = list(model.graph.node)
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            from .graph import outer_scope_inputs
            needs = set(n.input) | outer_scope_inputs(n)
            if needs <= available:
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            ordered += rest
            break
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model
