"""apply_plan: a SPA plan (kept channels per ONNX weight) onto a narrower Keras model of the same
architecture, layers re-created from their configs and weights sliced from the original."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import onnx

from spa.errors import SpaError

from .tensorflow_export import VERIFY_RTOL, _keras, _load, _reorder_blocks, export, read_weight_map


def apply_plan(keras_model, plan, *, pruned=None, weight_map=None, example_inputs=None, verify=None,
               rtol=VERIFY_RTOL, **deprecated):
    """A new Keras model with the layers of `keras_model` narrowed to the channels `plan` keeps.

    Keras layers cannot be resized in place, so unlike the torch and JAX `apply_plan` (which
    narrow the module you pass and return that same object) this returns a *new* model of the same
    architecture; `keras_model` is left as it was.

    plan: a plan JSON path (`spa prune --plan-out`), its dict, or a spa.plan.Plan. The ONNX
    names in it are tied to Keras variables by the weight map that `export` stored in the ONNX
    metadata: taken from `weight_map` (the dict, or an ONNX path/ModelProto holding it), else from
    `pruned` (the pruned ONNX, path or ModelProto), else the model is exported again to find it.
    Layers are re-created from their configs with fewer filters/units and the kept slices of the
    original weights, ready for compile + fit.
    verify (default: on when `pruned` is given) runs both on `example_inputs` (an array or a
    tuple in graph-input order; default random inputs) and raises SpaError when they differ by more
    than rtol relative to the largest output. Deprecated names: `pruned_onnx=` (now `pruned=`),
    `onnx_model=` (now `weight_map=`).
    """
    from ._apply import renamed_keywords

    given = renamed_keywords("keras", deprecated, {"pruned": pruned, "weight_map": weight_map})
    pruned, weight_map = given["pruned"], given["weight_map"]
    keras = _keras()
    if not isinstance(keras_model, keras.Model):
        raise SpaError(f"apply_plan needs a Keras model, got {type(keras_model).__name__}")
    graph_model = _functional_graph(keras_model)
    entries = _plan_entries(plan)
    if weight_map is not None and not isinstance(weight_map, dict):
        weight_map = read_weight_map(weight_map)
    if weight_map is None:
        weight_map = read_weight_map(pruned) if pruned is not None else {}
        if not weight_map:
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                weight_map = export(keras_model, os.path.join(tmp, "model.onnx")).weight_map
    var_kept = _variable_kept(weight_map, entries)
    unknown = set(n for n, _ in entries) - set(weight_map)
    layer_plans = _narrow_layers(graph_model, var_kept)
    new_model = _rebuild(keras_model, layer_plans)
    if verify is None:
        verify = pruned is not None
    if verify:
        if pruned is None:
            raise SpaError("apply_plan(verify=True) needs pruned= (the pruned ONNX model to compare with)")
        new_model.spa_max_error = compare_keras_onnx(new_model, pruned, rtol=rtol, inputs=example_inputs)
    new_model.spa_unmapped_plan_weights = sorted(unknown)
    return new_model


def _plan_entries(plan) -> dict:
    """{(onnx weight name, axis): kept indices} from a path, dict or spa.plan.Plan."""
    if hasattr(plan, "weight_entries"):
        weights = plan.weight_entries()
    else:
        if isinstance(plan, (str, os.PathLike)):
            try:
                with open(plan) as f:
                    plan = json.load(f)
            except (OSError, ValueError) as exc:
                raise SpaError(f"{plan} is not a SPA plan ({type(exc).__name__})") from None
        if not isinstance(plan, dict) or "weights" not in plan:
            raise SpaError("plan must be a SPA plan file, its dict (with 'weights') or a spa.plan.Plan")
        weights = plan["weights"]
    return {(w["name"], int(w["axis"])): np.asarray(w["kept"], dtype=np.int64) for w in weights}


def _variable_kept(weight_map, entries) -> dict:
    """{keras variable path: [kept indices or None per axis]} for the mapped ONNX weights the plan
    slices: the kept mask over the ONNX tensor, carried back through the recorded relation."""
    by_name = {}
    for (name, axis), kept in entries.items():
        by_name.setdefault(name, {})[axis] = kept
    result = {}
    for name, axes in by_name.items():
        rel = weight_map.get(name)
        if rel is None:
            continue
        mask = np.ones(rel["shape"], dtype=bool)
        for axis, kept in axes.items():
            keep = np.zeros(rel["shape"][axis], dtype=bool)
            keep[kept] = True
            shape = [1] * len(rel["shape"])
            shape[axis] = -1
            mask &= keep.reshape(shape)
        per_axis = _factor_mask(_unmove_mask(mask, rel), rel["variable"])
        previous = result.get(rel["variable"])
        if previous is not None and not _same_kept(previous, per_axis):
            raise SpaError(f"plan slices variable '{rel['variable']}' inconsistently")
        result[rel["variable"]] = per_axis
    return result


def _unmove_mask(mask, rel):
    """Invert onnx = reshape(reorder(transpose(var, perm), blocks)) for a boolean mask."""
    perm, var_shape = rel["perm"], rel["variable_shape"]
    moved = mask.reshape([var_shape[p] for p in perm])
    if rel.get("blocks"):
        moved = _reorder_blocks(moved, rel["blocks"], inverse=True)
    return np.transpose(moved, np.argsort(perm))


def _factor_mask(mask, variable):
    """Per-axis kept indices of a mask that is an outer product of per-axis masks."""
    per_axis = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        kept = np.nonzero(mask.any(axis=others))[0]
        per_axis.append(None if len(kept) == mask.shape[axis] else kept)
    rebuilt = np.ones(mask.shape, dtype=bool)
    for axis, kept in enumerate(per_axis):
        if kept is not None:
            keep = np.zeros(mask.shape[axis], dtype=bool)
            keep[kept] = True
            shape = [1] * mask.ndim
            shape[axis] = -1
            rebuilt &= keep.reshape(shape)
    if not np.array_equal(rebuilt, mask):
        raise SpaError(f"the plan removes a non-rectangular slice of Keras variable '{variable}'")
    return per_axis


def _same_kept(a, b):
    return all((x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
               for x, y in zip(a, b))


def _functional_graph(model):
    keras = _keras()
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise SpaError("Sequential model is not built: give it an Input or call it once")
        return graph
    if not hasattr(model, "_nodes_by_depth"):
        raise SpaError(f"'{model.name}' is a subclassed Keras model: apply_plan needs a Functional or "
                       "Sequential model (its layer graph); use from_onnx on the pruned ONNX instead")
    return model


@dataclass
class _LayerPlan:
    config: dict
    slices: list  # per variable: list of kept indices (or None) per axis


def _narrow_layers(graph_model, var_kept) -> dict:
    """{layer name: _LayerPlan} for every layer whose channels change; walks the layer graph
    in order, carrying the kept channels (last axis) of every tensor."""
    kept_of = {}
    plans = {}

    def kept(tensor):
        return kept_of.get(id(tensor), np.arange(_channels(tensor)))

    for depth in sorted(graph_model._nodes_by_depth, reverse=True):
        for node in graph_model._nodes_by_depth[depth]:
            layer = node.operation
            inputs, outputs = list(node.input_tensors), list(node.output_tensors)
            if not inputs:
                continue
            in_kept = [kept(t) for t in inputs]
            out_kept, plan = _narrow(layer, inputs, in_kept, outputs, var_kept)
            if plan is not None:
                if layer.name in plans and not _same_plan(plans[layer.name], plan):
                    raise SpaError(f"shared layer '{layer.name}' is narrowed differently at two calls")
                plans[layer.name] = plan
            for t, k in zip(outputs, out_kept):
                if k is not None:
                    kept_of[id(t)] = np.asarray(k, dtype=np.int64)
    return plans


def _same_plan(a, b):
    return a.config == b.config and all(_same_kept(x, y) for x, y in zip(a.slices, b.slices))


def _channels(tensor):
    dim = tensor.shape[-1] if tensor.shape else 1
    return int(dim) if dim is not None else 0


def _full(kept, size):
    return kept is None or (len(kept) == size and np.array_equal(kept, np.arange(size)))


IDENTITY_LAYERS = {
    "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
    "ActivityRegularization", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
    "AveragePooling2D", "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
    "UpSampling1D", "UpSampling2D", "UpSampling3D", "Identity", "Masking", "Rescaling",
    "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "InputLayer",
}
PER_CHANNEL_LAYERS = {"BatchNormalization", "LayerNormalization", "GroupNormalization",
                      "Normalization", "LayerScale", "PReLU"}
CONV_LAYERS = {"Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
               "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
               "SeparableConv2D"}
RECURRENT_LAYERS = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}


def _narrow(layer, inputs, in_kept, outputs, var_kept):
    """(kept channels of each output, _LayerPlan or None) for one layer call."""
    kind = type(layer).__name__
    if kind in IDENTITY_LAYERS:
        return [_merge_kept(layer, inputs, in_kept, outputs[0])] * len(outputs), None
    if kind == "Concatenate":
        return [_concat_kept(layer, inputs, in_kept)], None
    if kind in ("Flatten", "Reshape", "Permute"):
        return _reshape_kept(layer, inputs[0], in_kept[0], outputs[0])
    if kind == "Dense":
        return _narrow_dense(layer, in_kept[0], var_kept)
    if kind in CONV_LAYERS:
        return _narrow_conv(layer, kind, in_kept[0], var_kept)
    if kind in PER_CHANNEL_LAYERS:
        return _narrow_per_channel(layer, kind, inputs[0], in_kept[0])
    if kind == "Embedding":
        return _narrow_embedding(layer, var_kept)
    if kind in RECURRENT_LAYERS:
        return _narrow_recurrent(layer, kind, in_kept[0], outputs, var_kept)
    changed = [v.path for v in layer.weights if v.path in var_kept]
    pruned_in = [not _full(k, _channels(t)) for t, k in zip(inputs, in_kept)]
    if changed or any(pruned_in):
        raise SpaError(f"apply_plan cannot narrow a {kind} layer ('{layer.name}') yet")
    return [None] * len(outputs), None


def _merge_kept(layer, inputs, in_kept, output):
    """Element-wise merges: every full-size input carries the same channels (broadcast ones
    of size 1 are left alone)."""
    channels = _channels(output)
    result = None
    for t, k in zip(inputs, in_kept):
        if _channels(t) != channels:
            continue
        if result is not None and not np.array_equal(result, k):
            raise SpaError(f"inputs of '{layer.name}' keep different channels")
        result = k
    return result


def _concat_kept(layer, inputs, in_kept):
    rank = len(inputs[0].shape)
    if layer.axis not in (-1, rank - 1):
        return _merge_kept(layer, inputs, in_kept, inputs[0])
    parts, offset = [], 0
    for t, k in zip(inputs, in_kept):
        parts.append(np.asarray(k) + offset)
        offset += _channels(t)
    return np.concatenate(parts)


def _reshape_kept(layer, inp, kept, out):
    """Channel mask through a row-major reshape; Reshape targets get the new channel count."""
    in_shape, out_shape = tuple(inp.shape[1:]), tuple(out.shape[1:])
    size = _channels(inp)
    if _full(kept, size):
        return [None], None
    if None in in_shape or None in out_shape:
        raise SpaError(f"cannot narrow '{layer.name}': {type(layer).__name__} of a dynamic shape")
    mask = np.zeros(in_shape, dtype=bool)
    mask[..., kept] = True
    if type(layer).__name__ == "Permute":
        if tuple(layer.dims)[-1] != len(in_shape):
            raise SpaError(f"cannot narrow '{layer.name}': Permute moves the channel axis")
        return [kept], None
    flat = mask.reshape(out_shape)
    lead = flat.reshape(-1, out_shape[-1])
    if not (lead == lead[:1]).all():
        raise SpaError(f"cannot narrow '{layer.name}': the kept channels do not form whole slices "
                       "of its output's last axis")
    out_kept = np.nonzero(lead[0])[0]
    if type(layer).__name__ != "Reshape":
        return [out_kept], None
    config = layer.get_config()
    target = list(config["target_shape"])
    target[-1] = len(out_kept)
    config["target_shape"] = tuple(target)
    return [out_kept], _LayerPlan(config, [])


def _expand_gates(kept, units, gates):
    return np.concatenate([np.asarray(kept) + g * units for g in range(gates)])


def _from_plan(var_kept, variable, axis):
    per_axis = var_kept.get(variable.path)
    return None if per_axis is None else per_axis[axis]


def _check_in(layer, planned, propagated):
    if planned is not None and propagated is not None and not np.array_equal(planned, propagated):
        raise SpaError(f"plan and layer graph disagree on the input channels of '{layer.name}'")
    return planned if planned is not None else propagated


def _weight(layer, name):
    for v in layer.weights:
        if v.path.rsplit("/", 1)[-1] == name:
            return v
    return None


def _slices_for(layer, rules):
    """One per-axis kept list per layer weight, from {weight name: {axis: kept}}."""
    slices = []
    for v in layer.weights:
        axes = rules.get(v.path.rsplit("/", 1)[-1], {})
        slices.append([axes.get(a) if a in axes else axes.get(a - len(v.shape))
                       for a in range(len(v.shape))])
    return slices


def _narrow_dense(layer, in_kept, var_kept):
    kernel = _weight(layer, "kernel")
    n_in, n_out = kernel.shape
    k_in = _check_in(layer, _from_plan(var_kept, kernel, 0), None if _full(in_kept, n_in) else in_kept)
    k_out = _from_plan(var_kept, kernel, 1)
    if k_in is None and k_out is None:
        return [None], None
    config = layer.get_config()
    if k_out is not None:
        config["units"] = len(k_out)
    return [k_out], _LayerPlan(config, _slices_for(layer, {"kernel": {0: k_in, 1: k_out},
                                                          "bias": {0: k_out}}))


def _narrow_conv(layer, kind, in_kept, var_kept):
    config = layer.get_config()
    if config.get("data_format", "channels_last") != "channels_last":
        raise SpaError(f"cannot narrow '{layer.name}': only channels_last convolutions")
    if kind.startswith("Depthwise") or kind.startswith("Separable"):
        return _narrow_depthwise(layer, kind, in_kept, var_kept, config)
    if config.get("groups", 1) != 1:
        return _narrow_grouped(layer, in_kept, var_kept, config)
    kernel = _weight(layer, "kernel")
    transpose = kind.endswith("Transpose")
    in_axis, out_axis = (-1, -2) if transpose else (-2, -1)
    n_in = kernel.shape[in_axis]
    planned_in = _from_plan(var_kept, kernel, len(kernel.shape) + in_axis)
    k_in = _check_in(layer, planned_in, None if _full(in_kept, n_in) else in_kept)
    k_out = _from_plan(var_kept, kernel, len(kernel.shape) + out_axis)
    if k_in is None and k_out is None:
        return [None], None
    if k_out is not None:
        config["filters"] = len(k_out)
    return [k_out], _LayerPlan(config, _slices_for(layer, {"kernel": {in_axis: k_in, out_axis: k_out},
                                                          "bias": {0: k_out}}))


def _narrow_grouped(layer, in_kept, var_kept, config):
    """Conv with groups: depthwise (one input channel per group) loses whole groups; otherwise the
    same in-group positions go in every group and the group count stays."""
    kernel = _weight(layer, "kernel")
    groups, per_group, n_out = config["groups"], kernel.shape[-2], kernel.shape[-1]
    rank = len(kernel.shape)
    n_in = per_group * groups
    k_out = _from_plan(var_kept, kernel, rank - 1)
    if per_group == 1 and n_out == groups:  # depthwise as a grouped Conv (e.g. ConvNeXt)
        k_out = _check_in(layer, k_out, None if _full(in_kept, n_in) else in_kept)
        if k_out is None:
            return [None], None
        config["groups"] = config["filters"] = len(k_out)
        return [k_out], _LayerPlan(config, _slices_for(layer, {"kernel": {-1: k_out}, "bias": {0: k_out}}))
    k_pos = _from_plan(var_kept, kernel, rank - 2)
    expected = None if k_pos is None else (np.arange(groups)[:, None] * per_group + k_pos[None, :]).reshape(-1)
    _check_in(layer, expected, None if _full(in_kept, n_in) else in_kept)
    if k_out is None and k_pos is None:
        return [None], None
    if k_out is not None:
        config["filters"] = len(k_out)
    return [k_out], _LayerPlan(config, _slices_for(layer, {"kernel": {-2: k_pos, -1: k_out},
                                                          "bias": {0: k_out}}))


def _narrow_depthwise(layer, kind, in_kept, var_kept, config):
    name = "kernel" if kind.startswith("Depthwise") else "depthwise_kernel"
    dw = _weight(layer, name)
    n_in, mult = dw.shape[-2], dw.shape[-1]
    k_in = _check_in(layer, _from_plan(var_kept, dw, len(dw.shape) - 2),
                     None if _full(in_kept, n_in) else in_kept)
    if _from_plan(var_kept, dw, len(dw.shape) - 1) is not None:
        raise SpaError(f"cannot narrow '{layer.name}': the plan prunes inside the depth multiplier")
    dw_out = None if k_in is None else _expand_blocks(k_in, mult)
    if kind.startswith("Depthwise"):
        if k_in is None:
            return [None], None
        rules = {name: {-2: k_in}, "bias": {0: dw_out}}
        return [dw_out], _LayerPlan(config, _slices_for(layer, rules))
    pointwise = _weight(layer, "pointwise_kernel")
    k_mid = _check_in(layer, _from_plan(var_kept, pointwise, len(pointwise.shape) - 2), dw_out)
    k_out = _from_plan(var_kept, pointwise, len(pointwise.shape) - 1)
    if k_in is None and k_out is None and k_mid is None:
        return [None], None
    if k_out is not None:
        config["filters"] = len(k_out)
    rules = {name: {-2: k_in}, "pointwise_kernel": {-2: k_mid, -1: k_out}, "bias": {0: k_out}}
    return [k_out], _LayerPlan(config, _slices_for(layer, rules))


def _expand_blocks(kept, block):
    """Channel c of a depth-multiplier block -> outputs c*block .. c*block+block-1."""
    return (np.asarray(kept)[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def _narrow_per_channel(layer, kind, inp, in_kept):
    size = _channels(inp)
    if _full(in_kept, size):
        return [None], None
    config = layer.get_config()
    axis = config.get("axis", -1)
    axis = axis if isinstance(axis, int) else (axis[0] if len(axis) == 1 else None)
    rank = len(inp.shape)
    if kind not in ("LayerScale", "PReLU") and axis not in (-1, rank - 1):
        raise SpaError(f"cannot narrow '{layer.name}': {kind} over an axis other than the channels")
    if kind == "GroupNormalization":
        per_group = size // config["groups"]
        groups = np.unique(np.asarray(in_kept) // per_group)
        if len(groups) * per_group != len(in_kept):
            raise SpaError(f"cannot narrow '{layer.name}': the plan keeps partial GroupNormalization groups")
        config["groups"] = len(groups)
    rules = {v.path.rsplit("/", 1)[-1]: {-1: in_kept} for v in layer.weights}
    return [in_kept], _LayerPlan(config, _slices_for(layer, rules))


def _narrow_embedding(layer, var_kept):
    table = _weight(layer, "embeddings")
    k_out = _from_plan(var_kept, table, 1)
    if k_out is None:
        return [None], None
    config = layer.get_config()
    config["output_dim"] = len(k_out)
    return [k_out], _LayerPlan(config, _slices_for(layer, {"embeddings": {1: k_out}}))


def _narrow_recurrent(layer, kind, in_kept, outputs, var_kept):
    gates = RECURRENT_LAYERS[kind]
    config = layer.get_config()
    kernel = _weight(layer, "kernel")
    units = config["units"]
    planned = _from_plan(var_kept, kernel, 1)
    k_hidden = None if planned is None else np.unique(planned % units)
    if planned is not None and not np.array_equal(planned, _expand_gates(k_hidden, units, gates)):
        raise SpaError(f"cannot narrow '{layer.name}': the plan keeps different units per gate")
    k_in = _check_in(layer, _from_plan(var_kept, kernel, 0),
                     None if _full(in_kept, kernel.shape[0]) else in_kept)
    if k_in is None and k_hidden is None:
        return [None] * len(outputs), None
    gate_kept = None if k_hidden is None else _expand_gates(k_hidden, units, gates)
    if k_hidden is not None:
        config["units"] = len(k_hidden)
    rules = {"kernel": {0: k_in, 1: gate_kept}, "recurrent_kernel": {0: k_hidden, 1: gate_kept},
             "bias": {-1: gate_kept}}
    return [k_hidden] * len(outputs), _LayerPlan(config, _slices_for(layer, rules))


def _rebuild(model, plans):
    keras = _keras()

    def clone(layer):
        plan = plans.get(layer.name)
        config = plan.config if plan is not None else layer.get_config()
        return layer.__class__.from_config(config)

    try:
        new_model = keras.models.clone_model(model, clone_function=clone)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds; report one line
        raise SpaError(f"could not rebuild '{model.name}' with the narrowed layers: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    for old, new in zip(_all_layers(model), _all_layers(new_model)):
        values = [np.asarray(v.numpy()) for v in old.weights]
        plan = plans.get(old.name)
        if plan is not None:
            values = [_take(v, s) for v, s in zip(values, plan.slices)]
        if values:
            new.set_weights(values)
    return new_model


def _all_layers(model):
    keras = _keras()
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    return [layer for layer in model.layers]


def _take(value, per_axis):
    for axis, kept in enumerate(per_axis):
        if kept is not None:
            value = np.take(value, kept, axis=axis)
    return value


def compare_keras_onnx(keras_model, onnx_model, *, rtol=VERIFY_RTOL, batch=2, seed=0, inputs=None):
    """Run a Keras model and an ONNX model on the same inputs (`inputs`: an array or a tuple in
    graph-input order; default random); SpaError when the largest difference exceeds rtol times
    the largest output magnitude (per output). Returns the largest relative difference."""
    from spa.runtime import random_inputs, run
    proto = _load(onnx_model)
    if inputs is not None:
        arrays = (inputs,) if not isinstance(inputs, (tuple, list)) else tuple(inputs)
        inits = {t.name for t in proto.graph.initializer}
        names = [i.name for i in proto.graph.input if i.name not in inits]
        if len(arrays) != len(names):
            raise SpaError(f"example_inputs has {len(arrays)} arrays, the pruned ONNX {len(names)} inputs")
        feeds = {name: np.asarray(a) for name, a in zip(names, arrays)}
    else:
        feeds = random_inputs(proto, batch=batch, seed=seed)
        if "int" in str(keras_model.inputs[0].dtype):
            vocab = _vocab_size(keras_model)
            rng = np.random.default_rng(seed)
            feeds = {k: rng.integers(0, vocab, v.shape).astype(v.dtype) for k, v in feeds.items()}
    expected = run(proto.SerializeToString() if isinstance(onnx_model, onnx.ModelProto)
                   else os.fspath(onnx_model), feeds)
    args = [feeds[name] for name in feeds]
    got = keras_model(args if len(args) > 1 else args[0], training=False)
    got = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
    worst = 0.0
    for index, (e, g) in enumerate(zip(expected, got)):
        if e.shape != g.shape:
            raise SpaError(f"output {index}: Keras gives shape {g.shape}, the pruned ONNX {e.shape}")
        error = float(np.abs(e - g).max()) / max(float(np.abs(e).max()), 1e-12)
        if not error <= rtol:
            raise SpaError(f"output {index}: Keras and the pruned ONNX differ by {error:.2e} "
                           f"(relative), more than {rtol:g}")
        worst = max(worst, error)
    return worst


def _vocab_size(model):
    sizes = [layer.get_config()["input_dim"] for layer in model.layers
             if type(layer).__name__ == "Embedding"]
    return min(sizes) if sizes else 2
