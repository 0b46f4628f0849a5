"""JAX / Flax NNX frontend: export an ``nnx.Module`` to ONNX with jax2onnx, remember which ONNX
weight is which NNX parameter, and narrow the module with a SPA plan.

    from spa.frontends import jax as spa_jax
    spa_jax.export(module, example_input, "model.onnx")        # verified against JAX
    result = spa.pipeline.prune(onnx.load("model.onnx"), Target(ratio=0.5))
    spa_jax.apply_plan(module, result.plan, pruned=result.model)  # the same channels, in place

jax2onnx names weights ``const_<i>`` (i = position among the traced constants) or, where a
plugin rewrote a constant at export time, ``kernel_oih_<i>`` (Conv, HWIO -> OIHW),
``kernel2d_<i>``/``bias_vec_<i>`` (LinearGeneral, reshaped). The weight map is therefore
recovered by value: each ONNX initializer is matched to the NNX parameter it equals under an axis
permutation followed by a reshape; ties (equal values, e.g. default ones/zeros) are broken by the
traced constant's identity, then by a mapped sibling input of the same node. What stays
ambiguous is recorded as such. The map is stored as JSON in the model's metadata_props under
``spa.jax.weight_map``.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# Absolute imports: this module is spa.frontends.jax, these are the real jax and flax.
import jax
import jax.numpy as jnp
import numpy as np
import onnx
from flax import nnx
from onnx import numpy_helper

from spa.errors import SpaError, first_line
from spa.runtime import FLOATS

__all__ = ["Exported", "export", "to_onnx", "weight_map", "apply_plan", "WEIGHT_MAP_KEY"]

WEIGHT_MAP_KEY = "spa.jax.weight_map"
BATCH = "B"


@dataclass
class Exported:
    path: str
    weight_map: dict  # as returned by weight_map()
    input_names: list
    output_names: list


def export(module, example_inputs, path, *, opset: int | None = None, dynamic_batch: bool = True,
           input_names=None, output_names=None, verify: bool = True, rtol: float = 1e-4) -> Exported:
    """Export ``module`` to ``path``, written only after it passed the checks.

    ``example_inputs``: an array, a shape tuple (float32), a ``jax.ShapeDtypeStruct``, or a list
    of these (one per positional input). ``dynamic_batch`` makes axis 0 of every input symbolic.
    ``verify`` runs the ONNX model in onnxruntime against the module on the example inputs
    (random normal ones when only shapes are given) and raises SpaError on a mismatch.
    """
    model = to_onnx(module, example_inputs, opset=opset, dynamic_batch=dynamic_batch,
                    input_names=input_names, output_names=output_names)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:  # ValidationError, shape inference errors
        raise SpaError(f"jax2onnx produced an invalid model: {first_line(error)}") from error
    if verify:
        _verify(module, model, _example_arrays(example_inputs), rtol)
    _write_atomically(model, path)
    return Exported(os.fspath(path), weight_map(model), [i.name for i in model.graph.input],
                    [o.name for o in model.graph.output])


def to_onnx(module, example_inputs, *, opset: int | None = None, dynamic_batch: bool = True,
            input_names=None, output_names=None) -> onnx.ModelProto:
    """The ONNX ModelProto of ``module`` (not verified), with the weight map in its metadata."""
    if not isinstance(module, nnx.Module):
        raise SpaError(f"expected a flax.nnx.Module, got {type(module).__name__}")
    specs = _input_specs(example_inputs, dynamic_batch)
    kwargs = {"opset": opset} if opset is not None else {}
    with _needed_plugins_only():
        from jax2onnx import to_onnx as jax2onnx_to_onnx

        try:
            model = jax2onnx_to_onnx(module, specs, model_name=type(module).__name__,
                                     input_names=input_names, output_names=output_names, **kwargs)
        except Exception as error:  # jax2onnx raises many kinds: unsupported primitive, shapes, ...
            raise SpaError(f"jax2onnx could not export {type(module).__name__}: "
                           f"{type(error).__name__}: {first_line(error)}") from error
        constants = _traced_constants(module, specs)
    mapping = _build_weight_map(module, model, constants)
    entry = model.metadata_props.add()
    entry.key, entry.value = WEIGHT_MAP_KEY, json.dumps(mapping, sort_keys=True)
    return model


def weight_map(model) -> dict:
    """The weight map stored by :func:`export` (a ModelProto or a path):
    ``{"weights": {onnx_name: {"path", "perm", "shape", "onnx_shape"}},
    "ambiguous": {onnx_name: [paths]}, "unmapped": [paths]}`` with
    ``onnx value == param.transpose(perm).reshape(onnx_shape)``."""
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == WEIGHT_MAP_KEY:
            return json.loads(prop.value)
    raise SpaError(f"the model has no {WEIGHT_MAP_KEY} metadata (not exported by spa.frontends.jax)")


# ---------------------------------------------------------------------------------------------
# inputs


def _input_specs(example_inputs, dynamic_batch):
    items = _as_list(example_inputs)
    scope = jax.export.SymbolicScope()
    batch = jax.export.symbolic_shape(BATCH, scope=scope)[0] if dynamic_batch else None
    specs = []
    for item in items:
        shape, dtype = _shape_dtype(item)
        if dynamic_batch:
            if not shape:
                raise SpaError("dynamic_batch needs inputs with a batch axis (rank >= 1)")
            shape = (batch, *shape[1:])
        specs.append(jax.ShapeDtypeStruct(shape, dtype))
    return specs


def _as_list(example_inputs):
    if _is_shape(example_inputs) or hasattr(example_inputs, "shape"):
        return [example_inputs]
    if isinstance(example_inputs, (list, tuple)) and example_inputs:
        return list(example_inputs)
    raise SpaError("example_inputs must be an array, a shape tuple, a ShapeDtypeStruct "
                   "or a non-empty list of them")


def _is_shape(item):
    return isinstance(item, tuple) and all(isinstance(d, (int, np.integer)) for d in item)


def _shape_dtype(item):
    if _is_shape(item):
        return tuple(int(d) for d in item), np.float32
    if hasattr(item, "shape") and hasattr(item, "dtype"):
        return tuple(int(d) for d in item.shape), np.dtype(item.dtype)
    raise SpaError(f"cannot read a shape from example input of type {type(item).__name__}")


def _example_arrays(example_inputs):
    rng = np.random.default_rng(0)
    arrays = []
    for item in _as_list(example_inputs):
        if hasattr(item, "shape") and not isinstance(item, jax.ShapeDtypeStruct):
            arrays.append(np.asarray(item))
            continue
        shape, dtype = _shape_dtype(item)
        if not np.issubdtype(dtype, np.floating):
            raise SpaError("verify needs example arrays for non-float inputs (got only a shape)")
        arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


# ---------------------------------------------------------------------------------------------
# jax2onnx internals, each with a fallback


@contextlib.contextmanager
def _needed_plugins_only():
    """Load jax2onnx's jax, flax and dm_pix plugins only, for the duration of one export.

    jax2onnx's first conversion imports every plugin tree, equinox and example models included,
    whose import-time jit compiles take 15-30 s on 2 cores; the examples register test cases,
    not conversions. The flag is restored afterwards so that jax2onnx used directly later still
    loads everything."""
    try:
        from jax2onnx.plugins import plugin_system as plugins
    except ImportError as error:
        raise SpaError("the JAX frontend needs jax2onnx: pip install 'spa[jax]'") from error
    skip = not getattr(plugins, "_already_imported_plugins", True) and hasattr(plugins, "_import_tree")
    if skip:
        root = Path(plugins.__file__).parent
        for tree in ("jax", "flax", "dm_pix"):
            plugins._import_tree(root / tree, f"jax2onnx.plugins.{tree}")
        plugins._already_imported_plugins = True
    try:
        yield
    finally:
        if skip:
            plugins._already_imported_plugins = False


def _traced_constants(module, specs):
    """The jaxpr constants in jax2onnx's order (its ``const_<i>`` names); [] if unavailable."""
    try:
        from jax2onnx.converter import conversion_api

        trace = conversion_api._trace_to_jaxpr(
            fn=module, inputs=specs, input_params=None, enable_double_precision=False,
            inputs_as_nchw=None, outputs_as_nchw=None, input_names=None, output_names=None)
        return list(trace.closed_jaxpr.consts)
    except Exception:  # private API: the map then relies on values alone
        return []


# ---------------------------------------------------------------------------------------------
# weight map


def _parameters(module):
    """Floating-point NNX variables as {"a.b.kernel": (array, variable)}."""
    found = {}
    for path, variable in nnx.to_flat_state(nnx.state(module)):
        value = variable.get_value()
        if hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.floating) and value.size > 1:
            found[".".join(str(p) for p in path)] = (value, variable)
    return found


def _build_weight_map(module, model, constants):
    found = _parameters(module)
    params = {path: np.asarray(value) for path, (value, _) in found.items()}
    by_identity = {id(value): path for path, (value, _) in found.items()}
    hints = {f"const_{i}": by_identity[id(c)] for i, c in enumerate(constants) if id(c) in by_identity}
    by_content = defaultdict(list)
    for path, value in params.items():
        by_content[_content_key(value)].append(path)

    weights, ambiguous = {}, {}
    for init in model.graph.initializer:
        if init.data_type not in FLOATS or int(np.prod(init.dims)) <= 1:
            continue
        value = numpy_helper.to_array(init)
        matches = {}
        for path in by_content.get(_content_key(value), ()):
            perm = _layout(params[path], value)
            if perm is not None:
                matches[path] = _entry(path, perm, params[path], value)
        hint = hints.get(init.name)
        if hint in matches or len(matches) == 1:
            weights[init.name] = matches[hint if hint in matches else next(iter(matches))]
        elif matches:
            ambiguous[init.name] = sorted(matches)
    _resolve_by_siblings(model, weights, ambiguous, params)
    used = {entry["path"] for entry in weights.values()} | {p for ps in ambiguous.values() for p in ps}
    return {"format": 1, "weights": weights, "ambiguous": ambiguous,
            "unmapped": sorted(set(params) - used)}


def _entry(path, perm, param, value):
    return {"path": path, "perm": perm, "shape": list(param.shape), "onnx_shape": list(value.shape)}


def _content_key(value):
    """Equal for tensors that are transposes/reshapes of each other (same multiset of values)."""
    flat = np.sort(np.asarray(value, dtype=np.float64).ravel())
    return flat.size, hashlib.sha1(flat.tobytes()).hexdigest()


def _layout(param, value):
    """The permutation p with param.transpose(p).reshape(value.shape) == value, identity first."""
    perms = list(itertools.permutations(range(param.ndim)))
    exact = [p for p in perms if tuple(param.shape[i] for i in p) == value.shape]
    for perm in exact + [p for p in perms if p not in exact]:  # a plain transpose before a reshape
        if np.array_equal(np.transpose(param, perm).reshape(value.shape), value):
            return list(perm)
    return None


def _resolve_by_siblings(model, weights, ambiguous, params):
    """An ambiguous input of a node belongs to the module of a mapped input of the same node."""
    for node in model.graph.node:
        modules = {weights[name]["path"].rsplit(".", 1)[0] for name in node.input if name in weights}
        for name in node.input:
            if name not in ambiguous:
                continue
            same_module = [p for p in ambiguous[name] if p.rsplit(".", 1)[0] in modules]
            if len(same_module) == 1:
                path = same_module[0]
                value = numpy_helper.to_array(_initializer(model, name))
                weights[name] = _entry(path, _layout(params[path], value), params[path], value)
                del ambiguous[name]


def _initializer(model, name):
    return next(init for init in model.graph.initializer if init.name == name)


# ---------------------------------------------------------------------------------------------
# verification and writing


def _verify(module, model, arrays, rtol, what="the ONNX export"):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a for i, a in zip(session.get_inputs(), arrays)}
    got = session.run(None, feeds)
    expected = [np.asarray(y) for y in jax.tree.leaves(nnx.jit(lambda m, *xs: m(*xs))(module, *arrays))]
    if len(got) != len(expected):
        raise SpaError(f"the ONNX model has {len(got)} outputs, the module {len(expected)}")
    for index, (g, e) in enumerate(zip(got, expected)):
        scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
        if g.shape != e.shape or not np.allclose(g, e, rtol=rtol, atol=rtol * scale):
            deviation = float(np.abs(g - e).max()) if g.shape == e.shape else float("nan")
            raise SpaError(f"{what} differs from the JAX module at output {index} (shapes {g.shape} "
                           f"and {e.shape}, max deviation {deviation:.3g})")


def _write_atomically(model, path):
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SpaError(f"output directory {directory} does not exist")
    handle, staged = tempfile.mkstemp(prefix=".spa-", suffix=".onnx", dir=directory)
    os.close(handle)
    try:
        onnx.save_model(model, staged)
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)


# ---------------------------------------------------------------------------------------------
# narrowing the module


def apply_plan(module, plan, _pruned=None, /, *, pruned=None, weight_map=None, example_inputs=None,
               verify=None, rtol: float = 1e-4):
    """Narrow ``module`` in place to the channels ``plan`` keeps; returns the module (the same
    object).

    ``plan``: a spa Plan (``result.plan``), or its JSON (dict or path) when ``pruned`` is given.
    ``pruned``: the pruned ONNX model (ModelProto or path); its weight values are used, so weights
    that a method compensated (OBSPA) come along. Without it the module's own values are sliced.
    ``weight_map``: what :func:`weight_map` returns for the exported model, or an ONNX
    path/ModelProto to compute it from (default: from ``pruned``, else from the plan's model).
    The sizes of nnx.Linear/Conv/LinearGeneral/MultiHeadAttention/BatchNorm/LayerNorm/GroupNorm
    follow.
    ``verify`` (default: on when ``pruned`` or ``example_inputs`` is given): the narrowed module
    must match the pruned ONNX model (or, without ``pruned``, the plan rewritten) on
    ``example_inputs`` (default random inputs) within ``rtol``, or the module is restored and
    SpaError raised. The pruned model as third positional argument is deprecated: ``pruned=``.
    """
    if _pruned is not None:
        import warnings
        warnings.warn("apply_plan(module, plan, pruned_model) is deprecated: use pruned=", DeprecationWarning,
                      stacklevel=2)
        if pruned is not None:
            raise TypeError("apply_plan(): pass the pruned model once (pruned=)")
        pruned = _pruned
    if isinstance(pruned, (str, os.PathLike)):
        pruned = onnx.load(os.fspath(pruned))
    if weight_map is not None and not isinstance(weight_map, dict):
        weight_map = _weight_map_of(weight_map)
    mapping = (weight_map if weight_map is not None else _map_for(plan, pruned))["weights"]
    params = _parameters(module)
    values = {path: value for path, (value, _) in params.items()}
    for path, axes in _kept_by_parameter(_plan_weight_entries(plan), mapping).items():
        for axis, kept in axes.items():
            values[path] = jnp.take(values[path], jnp.asarray(kept), axis=axis)
    if pruned is not None:
        values.update(_values_from(pruned, mapping, values))
    original = {path: value for path, (value, _) in params.items()}
    _assign(module, params, values)
    if verify is None:
        verify = pruned is not None or example_inputs is not None
    if verify:
        reference = pruned if pruned is not None else _rewritten(plan)
        arrays = (_example_arrays(example_inputs) if example_inputs is not None
                  else _random_arrays(reference))
        try:
            _verify(module, reference, arrays, rtol, "the pruned ONNX model")
        except SpaError:
            _assign(module, params, original)
            raise
    return module


def _weight_map_of(model):
    return weight_map(model)  # the module-level function (apply_plan's keyword shadows it)


def _random_arrays(model):
    from spa.runtime import random_inputs

    return list(random_inputs(model, batch=2, seed=0).values())


def _map_for(plan, pruned):
    if pruned is not None:
        return weight_map(pruned)
    if hasattr(plan, "analysis"):
        return weight_map(plan.analysis.graph.model)
    raise SpaError("a plan read from JSON needs the pruned model too: apply_plan(module, plan, pruned=...)")


def _kept_by_parameter(entries, mapping):
    cuts = defaultdict(dict)  # param path -> {param axis: kept indices}
    for entry in entries:
        target = mapping.get(entry["name"])
        if target is None:
            raise SpaError(f"the plan slices ONNX weight {entry['name']!r}, "
                           "which maps to no NNX parameter")
        for axis, kept in _param_axes(target, entry["axis"], entry["kept"]).items():
            previous = cuts[target["path"]].get(axis)
            if previous is not None and not np.array_equal(previous, kept):
                raise SpaError(f"the plan keeps different channels of {target['path']} axis {axis}")
            cuts[target["path"]][axis] = kept
    return cuts


def _values_from(pruned, mapping, sliced):
    """The pruned model's weights, brought back to the NNX layout and the sliced shapes."""
    initializers = {init.name: init for init in pruned.graph.initializer}
    values = {}
    for name, target in mapping.items():
        if name not in initializers:
            raise SpaError(f"the pruned model has no weight {name!r}")
        value = numpy_helper.to_array(initializers[name])
        shape = sliced[target["path"]].shape
        perm = target["perm"]
        transposed = [shape[p] for p in perm]
        if value.size != int(np.prod(transposed)):
            raise SpaError(f"pruned weight {name!r} {value.shape} does not fit {target['path']} {shape}")
        values[target["path"]] = jnp.asarray(value.reshape(transposed).transpose(np.argsort(perm)))
    return values


def _assign(module, params, values):
    for path, (_, variable) in params.items():
        variable.set_value(values[path])
    _refresh_sizes(module)


def _rewritten(plan):
    from spa.rewrite import rewrite

    return rewrite(plan)


def _plan_weight_entries(plan):
    if isinstance(plan, (str, os.PathLike)):
        with open(plan) as handle:
            plan = json.load(handle)
    if isinstance(plan, dict):
        return plan["weights"]
    return plan.weight_entries()


def _param_axes(target, onnx_axis, kept):
    """Map kept indices on an ONNX weight axis to kept indices on the NNX parameter's axes.

    The ONNX tensor is param.transpose(perm).reshape(onnx_shape): an ONNX axis is either one
    transposed param axis or a merge of consecutive ones (e.g. heads x head_dim of LinearGeneral).
    """
    shape, perm = target["shape"], target["perm"]
    transposed = [shape[p] for p in perm]
    onnx_shape = target["onnx_shape"]
    group = [a for a in _merged_axes(transposed, onnx_shape)[onnx_axis] if transposed[a] != 1]
    sizes = [transposed[i] for i in group]
    kept = np.asarray(kept, dtype=np.int64)
    if len(group) == 1:
        return {perm[group[0]]: kept}
    # a merged axis: pruning must keep whole blocks of the leading axis (e.g. whole heads)
    inner = int(np.prod(sizes[1:]))
    blocks = np.unique(kept // inner)
    whole = (blocks[:, None] * inner + np.arange(inner)).ravel()
    if np.array_equal(whole, kept):
        return {perm[group[0]]: blocks}
    positions = np.unique(kept % inner)
    every_block = (np.arange(sizes[0])[:, None] * inner + positions).ravel()
    if len(group) == 2 and np.array_equal(every_block, kept):
        return {perm[group[1]]: positions}
    raise SpaError(f"plan slices {target['path']} across merged axes in a way NNX cannot express")


def _merged_axes(transposed, onnx_shape):
    """Group consecutive transposed-param axes into the ONNX axes they reshape into."""
    if list(transposed) == list(onnx_shape):
        return [[a] for a in range(len(transposed))]
    groups, axis = [], 0
    for size in onnx_shape:
        group, product = [], 1
        unit_axis = size == 1 and axis < len(transposed) and transposed[axis] == 1
        while axis < len(transposed) and (product < size or (unit_axis and not group)):
            group.append(axis)
            product *= transposed[axis]
            axis += 1
        if product != size:
            raise SpaError(f"cannot relate shape {onnx_shape} to the parameter's {transposed}")
        groups.append(group)
    if any(transposed[a] != 1 for a in range(axis, len(transposed))):
        raise SpaError(f"cannot relate shape {onnx_shape} to the parameter's {transposed}")
    return groups


def _refresh_sizes(module):
    """Make the size attributes of the standard layers agree with their narrowed parameters."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Linear):
            node.in_features, node.out_features = node.kernel.get_value().shape
        elif isinstance(node, nnx.Conv):
            kernel = node.kernel.get_value().shape
            if kernel[-2] == 1 and node.feature_group_count == node.out_features:  # depthwise
                node.feature_group_count = kernel[-1]
            node.in_features = kernel[-2] * node.feature_group_count
            node.out_features = kernel[-1]
        elif isinstance(node, nnx.GroupNorm) and _norm_features(node):  # whole groups: same group size
            node.num_features = _norm_features(node)
            node.num_groups = node.num_features // node.group_size
        elif isinstance(node, nnx.LinearGeneral):
            kernel = node.kernel.get_value().shape
            node.in_features = tuple(kernel[:len(node.in_features)])
            node.out_features = tuple(kernel[len(node.in_features):])
        elif isinstance(node, nnx.MultiHeadAttention):
            node.num_heads, node.head_dim = node.query.kernel.get_value().shape[-2:]
            node.qkv_features = node.num_heads * node.head_dim
        elif isinstance(node, (nnx.BatchNorm, nnx.LayerNorm)) and _norm_features(node):
            node.num_features = _norm_features(node)


def _norm_features(norm):
    for name in ("scale", "bias", "mean"):
        variable = getattr(norm, name, None)
        if isinstance(variable, nnx.Variable):
            return variable.get_value().shape[-1]
    return None
