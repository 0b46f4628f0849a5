"""ONNX -> trainable torch: an nn.Module whose forward interprets the ONNX graph with torch ops.

Float weights (initializers and large Constant values) become ``nn.Parameter``s named after the
ONNX name (a dotted name like ``layer1.0.conv1.weight`` becomes the same nested attribute path,
so ``state_dict()`` keys equal ONNX names where possible); BatchNormalization running statistics
become buffers and are updated in train mode; Dropout is active in train mode. Shape arithmetic
(Shape/Gather/Concat/Range/...) simply runs eagerly on small int64 tensors. A quantized model's
integer weights become parameters holding the float values they stand for, read through a
straight-through rounding onto their grid (torch_quant_ops), and ``stored_values()`` gives them back as
integers.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from spa.errors import SpaError
from spa.graph import as_model, constant_node_value

from .torch_ops import _DTYPES, OPS, NodeInfo, op_key
from .torch_quant_ops import ROUNDING_RTOL, round_through, rounds_activations

__all__ = ["OnnxModule", "from_onnx", "supported_ops", "verify_module"]

# Tensors feeding these (op, input index) slots are indices, shapes or sizes, never weights.
_NON_WEIGHT_SLOTS = {("Resize", 1), ("Resize", 2), ("Resize", 3), ("Upsample", 1), ("Reshape", 1),
                     ("Expand", 1), ("Tile", 1), ("Pad", 1), ("Pad", 2), ("Slice", 1), ("Slice", 2),
                     ("Slice", 3), ("Slice", 4), ("ConstantOfShape", 0), ("Range", 0), ("Range", 1),
                     ("Range", 2), ("Clip", 1), ("Clip", 2), ("Dropout", 1), ("Split", 1),
                     ("Squeeze", 1), ("Unsqueeze", 1), ("ReduceMean", 1), ("ReduceSum", 1),
                     ("ReduceMax", 1), ("ReduceMin", 1), ("TopK", 1), ("CumSum", 1), ("Trilu", 1),
                     ("OneHot", 1), ("OneHot", 2)}
_BN_STATS = (3, 4)


def supported_ops() -> list[str]:
    return sorted(OPS)


def _to_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True, order="C"))


class _Holder(nn.Module):
    """Plain container for nested parameter names."""


def unsupported_ops(model: onnx.ModelProto) -> list:
    """The op types of `model` (subgraphs too) that this converter has no torch form for, and quantizers
    of the types torch has none for ("DequantizeLinear of int4")."""
    missing, types = set(), {t.name: t.data_type for t in model.graph.initializer}
    for node in _all_nodes(model.graph):
        if op_key(node.op_type, node.domain) not in OPS:
            missing.add(node.op_type)
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            codes = [types.get(x) for x in node.input] + [a.i for a in node.attribute if a.name == "output_dtype"]
            missing |= {f"{node.op_type} of {type_name(c)}" for c in codes if c and c not in _DTYPES}
    return sorted(missing)


def type_name(code: int) -> str:
    """An ONNX tensor type code by name ("int4"); 0 (undefined) as "of no declared type"."""
    return onnx.TensorProto.DataType.Name(code).lower() if code else "of no declared type"


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module. ``forward(*inputs)`` takes the graph inputs in order (or by
    name as keywords) and returns one tensor or a tuple. ``onnx_parameters()`` maps every ONNX
    weight name to its ``nn.Parameter``; ``onnx_tensor(name)`` gives any stored tensor."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        unknown = unsupported_ops(model)
        if unknown:
            raise SpaError(f"from_onnx: unsupported ONNX op(s): {', '.join(unknown)}")
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        init_names = {t.name for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]
        self._graph = graph
        self._nodes = [NodeInfo.of(n, self.opset) for n in graph.node]
        self._private_stats = self._separate_shared_stats(graph)
        self._stores: dict[str, tuple[str, str]] = {}  # onnx name -> (attribute path, kind)
        self._consts: dict[str, torch.Tensor] = {}
        self._used_names: set[str] = set()
        self._grids: dict[str, tuple] = {}  # integer weight -> (scale, zero point, lowest, highest, numpy dtype)
        self.mimic_onnx = False  # verification: follow each node's own training_mode instead
        self._register_tensors(model)

    # -- construction -------------------------------------------------------------------------
    def _separate_shared_stats(self, graph) -> dict[str, str]:
        """Running statistics are updated in place in train mode: a BN stat input that is also
        read elsewhere (exporters deduplicate equal constants, e.g. zeros shared by a bias and a
        running mean) gets a private copy. Returns private name -> original name."""
        uses: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
        private = {}
        # only stored constants have a value to copy (a stat computed by a node, e.g. a shared
        # ConstantOfShape fill, is recomputed on every run: nothing is updated in place)
        stored = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
        for info in self._nodes:
            if info.op != "BatchNormalization":
                continue
            for i in _BN_STATS:
                if len(info.inputs) > i and uses.get(info.inputs[i], 0) > 1 and info.inputs[i] in stored:
                    copy_name = f"{info.inputs[i]}.{info.name or 'bn'}.{i}"
                    private[copy_name] = info.inputs[i]
                    info.inputs[i] = copy_name
        return private

    def _register_tensors(self, model):
        graph = model.graph
        consumers = _consumer_slots(graph)
        stats = {n.inputs[i] for n in self._nodes if n.op == "BatchNormalization"
                 for i in _BN_STATS if len(n.inputs) > i}
        tensors = [(t.name, numpy_helper.to_array(t)) for t in graph.initializer]
        for node in graph.node:
            if node.op_type == "Constant":
                value = constant_node_value(node)
                if value is not None:
                    tensors.append((node.output[0], value))
        values = dict(tensors)
        tensors += [(copy, values[original]) for copy, original in self._private_stats.items()
                    if original in values]
        integers = _integer_weights(model, [name for name, array in tensors if array.dtype.kind in "iu"])
        for name, array in tensors:
            if name in integers:
                value, scale, zero, lowest, highest = integers[name]
                self._store(name, nn.Parameter(_to_torch(value.astype(np.float32))), "parameter")
                self._grids[name] = (_to_torch(scale.astype(np.float32)), _to_torch(zero.astype(np.float32)),
                                     lowest, highest, array.dtype)
                continue
            tensor = _to_torch(array)
            is_weight = (tensor.is_floating_point() and tensor.numel() > 1
                         and not any(slot in _NON_WEIGHT_SLOTS for slot in consumers.get(name, ())))
            if name in stats and tensor.is_floating_point():
                self._store(name, tensor, "buffer")
            elif is_weight:
                self._store(name, nn.Parameter(tensor), "parameter")
            else:
                self._consts[name] = tensor

    def _store(self, onnx_name, value, kind):
        parts = onnx_name.split(".")
        owner, path = self, []
        nested = len(parts) > 1 and all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in parts)
        if nested:
            for part in parts[:-1]:
                child = owner._modules.get(part)
                if child is None:
                    if hasattr(owner, part) or part in owner._parameters or part in owner._buffers:
                        nested = False
                        break
                    child = _Holder()
                    owner.add_module(part, child)
                owner = child
                path.append(part)
            leaf = parts[-1]
            if nested and (hasattr(owner, leaf) or leaf in owner._modules):
                nested = False
        if not nested:
            owner, path = self, []
            leaf = self._unique(re.sub(r"\W", "_", onnx_name).lstrip("_0123456789") or "w")
        if kind == "parameter":
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
        full = ".".join(path + [leaf])
        self._used_names.add(full)
        self._stores[onnx_name] = (full, kind)

    def _unique(self, base):
        name, k = base, 1
        while hasattr(self, name) or name in self._used_names:
            name, k = f"{base}_{k}", k + 1
        return name

    # -- access -------------------------------------------------------------------------------
    def onnx_tensor(self, name: str) -> torch.Tensor:
        if name in self._stores:
            return self.get_parameter(self._stores[name][0]) if self._stores[name][1] == "parameter" \
                else self.get_buffer(self._stores[name][0])
        return self._consts[name]

    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        """ONNX weight name -> the nn.Parameter holding it (for gradients w.r.t. ONNX weights). An integer
        weight of a quantized layer is held as the float value it stands for (see `stored_values`)."""
        return {n: self.get_parameter(p) for n, (p, kind) in self._stores.items() if kind == "parameter"}

    def stored_values(self) -> dict[str, np.ndarray]:
        """ONNX weight name -> its value as the ONNX model stores it: a float weight as it is, an integer
        weight rounded onto its grid (its scale and zero point) and clipped to its integer type."""
        values = {}
        for name, p in self.onnx_parameters().items():
            value = p.detach().cpu().double().numpy() if name in self._grids else p.detach().cpu().numpy()
            if name in self._grids and np.all(np.isfinite(value)):  # (a non-finite value is left for the caller)
                scale, zero, lowest, highest, dtype = self._grids[name]
                value = np.rint(value / scale.double().numpy()) + zero.double().numpy()
                value = np.clip(value, lowest, highest).astype(dtype)
            values[name] = value
        return values

    def fill_constants(self, env: dict) -> dict:
        """`env` with every constant and weight the graph reads added under its ONNX name (an integer
        weight as its layer reads it: `_integer_value`), what it holds already kept."""
        for name in self._consts:
            env.setdefault(name, self._consts[name])
        for name in self._stores:
            if name not in env:
                env[name] = self._integer_value(name) if name in self._grids else self.onnx_tensor(name)
        return env

    def _integer_value(self, name: str) -> torch.Tensor:
        """Integer weight `name` as its layer reads it: its float parameter fake-quantized (integers in float)."""
        scale, zero, lowest, highest, _ = self._grids[name]
        latent = self.onnx_tensor(name)
        scale, zero = scale.to(latent.device), zero.to(latent.device)
        return torch.clamp(round_through(latent / scale) + zero, lowest, highest)

    def onnx_names(self) -> dict[str, str]:
        """ONNX weight name -> attribute path of its parameter or buffer."""
        return {n: p for n, (p, _) in self._stores.items()}

    def float_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    # -- run ----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if len(args) > len(self.input_names):
            raise SpaError(f"expected at most {len(self.input_names)} inputs, got {len(args)}")
        env = dict(zip(self.input_names, args))
        env.update(kwargs)
        missing = [n for n in self.input_names if n not in env]
        if missing:
            raise SpaError(f"missing input(s): {', '.join(missing)}")
        self.fill_constants(env)
        run_graph(self, self._nodes, env)
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs


def _integer_weights(model: onnx.ModelProto, names: list) -> dict:
    """{name: (the float value it stands for, scale, zero point, lowest, highest)} of the integer
    constants among `names` that quantized layers read as weights (not MatMulNBits' packed blocks),
    scale and zero point shaped to broadcast against the weight (spa.quant)."""
    if not names:
        return {}
    from spa import quant
    from spa.graph import Graph

    g = Graph.indexed(model)
    found = {}
    for name in names:
        if quant.nbits_reader(g, name) is None and quant.is_integer_weight(g, name):
            found[name] = (np.asarray(quant.as_float(g, name, g.consts[name]), np.float64),
                           *quant.stored_grid(g, name))
    return found


def run_graph(module, nodes, env):
    for info in nodes:
        if info.op == "Constant" and info.outputs[0] in env:
            continue
        inputs = [env[i] if i else None for i in info.inputs]
        try:
            result = OPS[info.key](module, info, env, *inputs)
        except SpaError:
            raise
        except Exception as exc:
            raise SpaError(f"{info.op} node '{info.name}' failed in torch: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        if not isinstance(result, (tuple, list)):
            result = (result,)
        for name, value in zip(info.outputs, result):
            if name:
                env[name] = value


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            for g in a.graphs:
                yield from _all_nodes(g)


def _consumer_slots(graph) -> dict[str, list[tuple[str, int]]]:
    slots: dict[str, list] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            slots.setdefault(name, []).append((node.op_type, k))
    return slots


# ----------------------------------------------------------------------------------------------
# verification against onnxruntime
# ----------------------------------------------------------------------------------------------
def _without_training_dropout(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT applies a random mask where a Dropout node's training_mode input is true: compare
    against the deterministic (inference) graph instead."""
    if not any(n.op_type == "Dropout" and len(n.input) > 2 and n.input[2] for n in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "Dropout" and len(node.input) > 2:
            del node.input[2:]
    return copy


def _reference_session(model):
    """onnxruntime session for checking. A training-mode BatchNormalization whose running-stat
    outputs dangle is mis-optimised by onnxruntime's graph optimisations (measured with ORT 1.31:
    the output is neither batch- nor running-statistics normalisation), so such graphs are run
    unoptimised, which follows the ONNX specification."""
    import onnxruntime as ort

    model = _without_training_dropout(model)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if any(n.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i for a in n.attribute)
           for n in model.graph.node):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (the absolute tolerance scales with the output's magnitude)."""
    if ref.shape != got.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    if ref.dtype == np.bool_ or not np.issubdtype(ref.dtype, np.floating):
        return float(np.any(got != ref))
    scale = max(float(np.abs(ref).max()), 1e-6)
    return float(np.abs(got.astype(np.float64) - ref).max() / scale)


def ort_feeds(model: onnx.ModelProto, feeds=None, seed: int = 0, default_dim: int = 8, shapes=None) -> dict:
    from spa.runtime import random_inputs

    if feeds is not None:
        return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                for k, v in feeds.items()}
    return random_inputs(model, batch=2, seed=seed, default_dim=default_dim, shapes=shapes)


def verify_module(module: nn.Module, model: onnx.ModelProto, feeds: dict | None = None,
                  rtol: float = 1e-4, what: str = "module") -> float:
    """Run ``module`` (OnnxModule or any module taking the graph inputs positionally) and
    onnxruntime on the same inputs; raise SpaError if an output differs by more than rtol
    relative to the output's magnitude. Returns the worst relative error."""
    reference = _reference_session(model)
    for run_feeds in _trial_feeds(model, feeds):
        try:
            expected = reference.run(None, run_feeds)
            break
        except Exception as exc:
            failure = exc
    else:
        raise SpaError(f"verify: onnxruntime cannot run the ONNX model on the verification inputs "
                       f"({type(failure).__name__}); pass inputs explicitly") from None
    feeds = run_feeds
    inits = {t.name for t in model.graph.initializer}
    names = [n for n in (module.input_names if isinstance(module, OnnxModule)
                         else [i.name for i in model.graph.input if i.name not in inits]) if n in feeds]
    args = [torch.from_numpy(np.array(feeds[n])) for n in names]
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    try:
        with _onnx_semantics(module), torch.no_grad():
            out = module(*args)
    except SpaError:
        raise
    except Exception as exc:
        raise SpaError(f"verify: {what} fails to run: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    got = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(got) != len(expected):
        raise SpaError(f"verify: {what} returns {len(got)} outputs, the ONNX model {len(expected)}")
    worst = 0.0
    for k, (g, e) in enumerate(zip(got, expected)):
        err = relative_error(g.detach().cpu().numpy(), e)
        worst = max(worst, err)
        if not err <= rtol:
            raise SpaError(f"verify: {what} output {k} differs from onnxruntime: relative error "
                           f"{err:.3g} > {rtol:g}")
    return worst


_TRIAL_DIMS = (8, 7, 16, 4, 1)


def _trial_feeds(model: onnx.ModelProto, feeds: dict | None):
    """The given feeds; else random inputs at small symbolic sizes (a file that baked one, e.g. a
    traced sequence length, only runs with that size, so a few common ones), then at the sizes
    SPA's generated calibration gives (YOLOv8 takes multiples of 32: its metadata's imgsz)."""
    if feeds is not None:
        yield ort_feeds(model, feeds)
        return
    from spa.calibration import Calibration, generated_shapes

    for default_dim in _TRIAL_DIMS:
        yield ort_feeds(model, default_dim=default_dim)
    shapes = generated_shapes(model, Calibration())
    if shapes:
        yield ort_feeds(model, shapes=shapes)


class _onnx_semantics:
    """Run an OnnxModule as onnxruntime does: BN per node's training_mode (no running-stat
    update), no dropout. Other modules run in whatever mode the caller set."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.training = self.module.training
        if isinstance(self.module, OnnxModule):
            self.module.mimic_onnx = True
            self.module.train(False)

    def __exit__(self, *exc):
        if isinstance(self.module, OnnxModule):
            self.module.mimic_onnx = False
            self.module.train(self.training)


def from_onnx(path_or_model, *, verify: bool = True, inputs: dict | None = None,
              rtol: float = 1e-4, train: bool | None = None) -> OnnxModule:
    """Any ONNX model -> a trainable :class:`OnnxModule`.

    ``verify``: run it and onnxruntime on ``inputs`` (feeds by input name; default random inputs
    from :func:`spa.runtime.random_inputs`) and raise SpaError beyond ``rtol`` (relative to each
    output's magnitude; for a model that quantizes activations at run time at least ROUNDING_RTOL:
    onnxruntime's integer kernels round at other boundaries, torch_quant_ops). The module is returned in
    eval mode unless ``train`` is true, or the graph has training-mode BatchNormalization and ``train``
    is None."""
    model = as_model(path_or_model)
    module = OnnxModule(model)
    if verify and rounds_activations(model):
        try:
            verify_module(module, model, inputs, max(rtol, ROUNDING_RTOL), what="from_onnx module")
        except SpaError as exc:
            raise SpaError(f"{exc}: an int8 model, whose torch copy quantizes in float where onnxruntime's integer "
                           "kernels round at other boundaries, and on this one the difference grows past the "
                           "check's tolerance (-o NAME.onnx and the criteria that need no torch copy, l1 and "
                           "obspa, still work)") from None
    elif verify:
        verify_module(module, model, inputs, rtol, what="from_onnx module")
    if train is None:
        train = any(n.op_type == "BatchNormalization" and NodeInfo.of(n, module.opset).attrs.get(
            "training_mode", 0) for n in model.graph.node)
    module.train(bool(train))
    return module


def _warn(message):
    warnings.warn(message, stacklevel=3)
