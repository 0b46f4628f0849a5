"""torch -> ONNX with a weight map: which module parameter each ONNX weight came from, and how.

The map is kept in the file (metadata_props key ``spa.torch.weight_map``, JSON) so later steps
(``apply_plan``) can find it from the ONNX file alone. Format, per ONNX weight name::

    {"source": "layer1.0.conv1.weight",            # main module tensor (parameter or buffer)
     "how": "same" | "renamed" | "transposed" | "reshaped" | "slice" | "bn_folded"
            | "bn_folded_bias" | "recurrent" | "bn_constant",
     "axes": {"0": [[tensor, tensor_axis, index_map], ...], ...}}

``axes`` says, for each axis of the ONNX weight, which module tensors' axes follow it; the index
map is null (index i -> i), an int offset (i -> i + offset) or a list (i -> list[i], -1 = not in
that tensor). A BN-folded conv weight's output axis lists the conv weight and the BN module's
weight, bias and running statistics; a recurrent W/R/B lists the gate rows of weight_ih_l<k> etc.
in torch's gate order.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from spa.errors import SpaError

METADATA_KEY = "spa.torch.weight_map"
EXPORTERS = ("dynamo", "torchscript")

__all__ = ["Exported", "export", "weight_map_of", "build_weight_map", "METADATA_KEY"]


@dataclass
class Exported:
    path: str
    weight_map: dict
    input_names: list
    output_names: list
    exporter: str
    training: bool
    unmapped: list = field(default_factory=list)  # float ONNX weights not traced to the module


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
             "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _io_names(n: int, base: str) -> list[str]:
    return [base] if n == 1 else [f"{base}{i}" for i in range(n)]


def _optimize_keep_bn(ir_model) -> None:
    """onnxscript's optimizer without its BatchNormalization-fusion rules (BN stays a node)."""
    from onnxscript import optimizer, rewriter
    from onnxscript.rewriter import _fuse_batchnorm

    bn_rules = {id(r) for r in _fuse_batchnorm.rules}
    saved = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if id(r) not in bn_rules)
    try:
        optimizer.optimize_ir(ir_model)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def _export_torchscript(model, args, path, names_in, names_out, training, dynamic, opset):
    model.train(training)
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    if isinstance(dynamic, dict):  # {name: {axis: label}}
        dyn = dynamic
    else:
        dyn = {n: {0: "batch"} for n in names_in + names_out} if dynamic else None
    kw = {} if opset is None else {"opset_version": opset}
    torch.onnx.export(model, args, str(path), dynamo=False, input_names=names_in,
                      output_names=names_out, dynamic_axes=dyn, training=mode,
                      do_constant_folding=True, **kw)
    return onnx.load(str(path))


_REGISTRY_CACHE: dict = {}


@contextlib.contextmanager
def _cached_torchlib_registry():
    """torch.onnx's dynamo path rebuilds its aten->ONNX registry from torchlib on every call
    (about half of a small model's export time): memoise it while exporting. Private API: if it
    moved, export runs uncached."""
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
    except Exception:
        yield
        return

    def from_torchlib(klass, *a, **kw):
        key = (a, tuple(sorted(kw.items())))
        if key not in _REGISTRY_CACHE:
            _REGISTRY_CACHE[key] = original.__func__(klass, *a, **kw)
        return _REGISTRY_CACHE[key]

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


def _var_positional(model) -> bool:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


@contextlib.contextmanager
def _distinct_initializers():
    """onnxscript's optimizer merges initializers with equal values. In a freshly initialised
    model that makes unrelated layers share one tensor (every conv bias of zeros, every BN's ones),
    which couples their channels in the analysis and hides module tensors from the weight map."""
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as common_passes
    except ImportError:
        yield
        return

    class KeepInitializers(ir.passes.InPlacePass):
        def call(self, model):
            return ir.passes.PassResult(model, modified=False)

    saved = common_passes.DeduplicateInitializersPass
    common_passes.DeduplicateInitializersPass = KeepInitializers
    try:
        yield
    finally:
        common_passes.DeduplicateInitializersPass = saved


def _export_dynamo(model, args, path, names_in, names_out, training, dynamic, opset):
    # torchlib cannot lower a training-mode BN (it feeds weight/bias in as running statistics):
    # a training export traces BN modules in eval mode (BN nodes with running statistics) and the
    # rest in train mode (Dropout nodes kept).
    model.train(training)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    batch = torch.export.Dim("batch")
    if isinstance(dynamic, dict):  # {name: {axis: label}}: ranges inferred by torch.export
        dyn = tuple({axis: torch.export.Dim.DYNAMIC for axis in dynamic.get(n, {})} for n in names_in)
    else:
        dyn = tuple({0: batch} if a.dim() else {} for a in args) if dynamic else None
    if dyn is not None and _var_positional(model):  # forward(self, *args): one entry for args
        dyn = (dyn,)
    kw = {} if opset is None else {"opset_version": opset}
    with _cached_torchlib_registry(), _distinct_initializers():
        prog = torch.onnx.export(model, args, dynamo=True, input_names=names_in,
                                 output_names=names_out, dynamic_shapes=dyn, optimize=not training,
                                 verbose=False, **kw)
        if training:
            _optimize_keep_bn(prog.model)
    prog.save(str(path), external_data=False)
    return onnx.load(str(path))


def as_args(example_inputs) -> tuple:
    """Example inputs as the positional arguments of a call: one tensor, or a sequence of them."""
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def export(module: nn.Module, example_inputs, path, *, exporter: str = "dynamo",
           training: bool = False, dynamic_batch: bool = True, opset: int | None = None,
           input_names=None, output_names=None, dynamic_axes: dict | None = None) -> Exported:
    """Export ``module`` to ONNX at ``path`` and record where every ONNX weight came from.

    ``training=False``: eval export; exporters may fold BN into convs and pre-transpose Linear
    weights (the weight map says so). ``training=True``: BatchNormalization and Dropout stay nodes
    (torchscript: training-mode BN with batch statistics; dynamo: BN with running statistics).
    ``dynamic_batch``: axis 0 of every input and output is symbolic. ``dynamic_axes``
    ({input or output name: {axis: label}}, e.g. ``{"input_ids": {0: "batch", 1: "sequence"}}``)
    replaces it: exactly the axes it lists are symbolic (e.g. a transformer's batch and sequence).
    The module is not modified.
    """
    if exporter not in EXPORTERS:
        raise SpaError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    args = as_args(example_inputs)
    if dynamic_batch:  # batch 1 would be specialised by the tracers
        args = tuple(torch.cat([a, a]) if a.dim() and a.shape[0] == 1 else a for a in args)
    work = copy.deepcopy(module)
    with torch.no_grad():
        out = work.eval()(*args)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    names_in = list(input_names or _io_names(len(args), "input"))
    names_out = list(output_names or _io_names(n_out, "output"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fn = _export_torchscript if exporter == "torchscript" else _export_dynamo
    dynamic = ({n: {int(a): str(label) for a, label in axes.items()} for n, axes in dynamic_axes.items()}
               if dynamic_axes is not None else dynamic_batch)
    try:
        with _quiet():
            proto = fn(work, args, path, names_in, names_out, training, dynamic, opset)
    except SpaError:
        raise
    except Exception as exc:
        raise SpaError(f"torch.onnx.export ({exporter}) failed: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if training:
        _restore_running_stats(proto, module)
    weight_map, unmapped = build_weight_map(proto, module)
    _store_map(proto, weight_map)
    onnx.save(proto, str(path))
    return Exported(str(path), weight_map, names_in, names_out, exporter, training, unmapped)


def _restore_running_stats(proto, module):
    """Tracing a train-mode model runs its forward, which updates BN running statistics before
    they are captured: write the module's own values back (matched by name)."""
    buffers = dict(module.named_buffers())
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            for name in node.input[3:5]:
                if name in inits and name in buffers:
                    array = buffers[name].detach().cpu().numpy()
                    inits[name].CopyFrom(numpy_helper.from_array(array, name))


def _store_map(proto, weight_map):
    for prop in list(proto.metadata_props):
        if prop.key == METADATA_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(weight_map, separators=(",", ":"))


def weight_map_of(path_or_model) -> dict | None:
    """The weight map stored in an ONNX file by :func:`export` (None if there is none)."""
    proto = path_or_model if isinstance(path_or_model, onnx.ModelProto) else \
        onnx.load(str(path_or_model), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None


# ------------------------------------------------------------------------------------------------
# weight map
# ------------------------------------------------------------------------------------------------
def _onnx_weights(proto):
    """(name, array, consumer nodes) for every float initializer / Constant with > 1 element."""
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    out = [(t.name, numpy_helper.to_array(t)) for t in proto.graph.initializer]
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out.append((node.output[0], numpy_helper.to_array(a.t)))
    return [(n, a, consumers.get(n, [])) for n, a in out
            if np.issubdtype(a.dtype, np.floating) and a.size > 1], consumers


def _scope_tokens(node) -> tuple[str, set]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                scopes = [p.value]
            text = "/".join(scopes)
            break
    else:
        text = node.name
    tokens = {t for part in text.split("/") for t in part.split(".") if t}
    return text.replace("/", "."), tokens


def _scope_score(tensor_name, consumers) -> int:
    module_path = tensor_name.rsplit(".", 1)[0]
    parts = module_path.split(".")
    best = 0
    for node, _ in consumers:
        text, tokens = _scope_tokens(node)
        score = sum(p in tokens for p in parts) + (100 if module_path in text else 0)
        best = max(best, score)
    return best


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _axes_identity(name, rank, perm=None):
    perm = perm or list(range(rank))
    return {str(a): [[name, perm[a], None]] for a in range(rank)}


class _MapBuilder:
    def __init__(self, proto, module):
        self.proto = proto
        self.module = module
        self.modules = dict(module.named_modules())
        self.state = {}
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point() and t.numel() > 1:
                self.state[name] = t.detach().cpu().float().numpy()
        self.by_digest: dict[str, list] = {}
        for name, array in self.state.items():
            self.by_digest.setdefault(_digest(array), []).append(name)
        self.map: dict[str, dict] = {}

    def pick(self, names, consumers):
        return max(names, key=lambda n: _scope_score(n, consumers))

    def match_value(self, name, array, consumers) -> dict | None:
        if name in self.state and self.state[name].shape == array.shape and \
                np.array_equal(self.state[name], array):
            return {"source": name, "how": "same", "axes": _axes_identity(name, array.ndim)}
        candidates = self.by_digest.get(_digest(array), [])
        same_shape = [c for c in candidates if self.state[c].shape == array.shape]
        if same_shape:
            src = self.pick(same_shape, consumers)
            return {"source": src, "how": "renamed", "axes": _axes_identity(src, array.ndim)}
        if candidates:
            src = self.pick(candidates, consumers)
            return {"source": src, "how": "reshaped", "axes": _reshape_axes(src, self.state[src].shape,
                                                                            array.shape)}
        if array.ndim == 2:
            candidates = [c for c in self.by_digest.get(_digest(array.T), [])
                          if self.state[c].shape == array.T.shape]
            if candidates:
                src = self.pick(candidates, consumers)
                return {"source": src, "how": "transposed", "axes": _axes_identity(src, 2, [1, 0])}
        return self.match_slice(array, consumers)

    def match_slice(self, array, consumers) -> dict | None:
        """A block of a packed parameter (e.g. q/k/v of in_proj_weight), maybe transposed."""
        views = [(array, None)] + ([(array.T, [1, 0])] if array.ndim == 2 else [])
        for view, perm in views:
            rows = view.shape[0]
            for name, p in self.state.items():
                if p.ndim != view.ndim or p.shape[1:] != view.shape[1:] or p.shape[0] <= rows \
                        or p.shape[0] % rows:
                    continue
                for k in range(p.shape[0] // rows):
                    if np.array_equal(p[k * rows:(k + 1) * rows], view):
                        axes = _axes_identity(name, view.ndim, perm)
                        first = "0" if perm is None else "1"
                        axes[first] = [[name, 0, k * rows]]
                        return {"source": name, "how": "slice", "offset": k * rows,
                                "axes": axes}
        return None

    # -- folded BatchNorm --------------------------------------------------------------------
    def match_bn_fold(self, name, array, consumers) -> dict | None:
        for node, slot in consumers:
            if slot != 1 or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            out_axis = self._out_axis(node, array.ndim)
            for layer_name, layer in self._layers_like(array, node, consumers):
                w = layer.weight.detach().cpu().float().numpy()
                if w.shape != array.shape:
                    w = w.T
                for bn_name, bn in self._bns(array.shape[out_axis]):
                    scale = _bn_scale(bn)
                    shape = [1] * array.ndim
                    shape[out_axis] = -1
                    if np.allclose(w * scale.reshape(shape), array, rtol=1e-4,
                                   atol=1e-6 * max(1.0, float(np.abs(array).max()))):
                        return self._folded(name, layer_name, layer, bn_name, bn, node, out_axis,
                                            array.ndim, transposed=w.shape != tuple(
                                                layer.weight.shape))
        return None

    def _out_axis(self, node, rank):
        if node.op_type == "ConvTranspose":
            return 1
        if node.op_type == "MatMul":
            return rank - 1
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return 0 if trans_b else 1
        return 0

    def _layers_like(self, array, node, consumers):
        layers = [(n, m) for n, m in self.modules.items()
                  if isinstance(getattr(m, "weight", None), torch.Tensor)
                  and not isinstance(m, nn.modules.batchnorm._NormBase)
                  and m.weight.dim() == array.ndim
                  and (tuple(m.weight.shape) == array.shape
                       or array.ndim == 2 and tuple(m.weight.shape) == array.T.shape)]
        return sorted(layers, key=lambda item: -_scope_score(item[0] + ".weight", consumers))

    def _bns(self, channels):
        return [(n, m) for n, m in self.modules.items()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_features == channels
                and m.running_var is not None]

    def _folded(self, name, layer_name, layer, bn_name, bn, node, out_axis, rank, transposed):
        w_name = f"{layer_name}.weight"
        perm = [1, 0] if transposed else None
        axes = _axes_identity(w_name, rank, perm)
        followers = [f"{bn_name}.{p}" for p in ("weight", "bias", "running_mean", "running_var")
                     if isinstance(getattr(bn, p, None), torch.Tensor)]
        bias = [f"{layer_name}.bias"] if isinstance(getattr(layer, "bias", None), torch.Tensor) else []
        param_out_axis = perm[out_axis] if perm else out_axis
        axes[str(out_axis)] = [[w_name, param_out_axis, None]] + [[f, 0, None] for f in bias + followers]
        self.map[name] = {"source": w_name, "how": "bn_folded", "bn": bn_name, "axes": axes}
        bias_input = node.input[2] if len(node.input) > 2 and node.op_type != "MatMul" else None
        if bias_input:
            self.map[bias_input] = {"source": (bias or [f"{bn_name}.bias"])[0],
                                    "how": "bn_folded_bias", "bn": bn_name,
                                    "axes": {"0": [[f, 0, None] for f in bias + followers]}}
        return self.map[name]

    # -- recurrent ----------------------------------------------------------------------------
    def match_recurrent(self):
        gates_of = {"LSTM": (4, [0, 3, 1, 2]), "GRU": (3, [1, 0, 2]), "RNN": (1, [0])}
        for node in self.proto.graph.node:
            if node.op_type not in gates_of:
                continue
            gates, onnx_to_torch = gates_of[node.op_type]
            w_name = node.input[1]
            w = self._array(w_name)
            if w is None:
                continue
            found = self._find_rnn_layer(node, w, gates, onnx_to_torch)
            if found is None:
                continue
            prefix, layer, dirs, hidden = found
            rows = [onnx_to_torch[r // hidden] * hidden + r % hidden for r in range(gates * hidden)]
            suffixes = ["", "_reverse"][:dirs]
            ih = [f"{prefix}weight_ih_l{layer}{s}" for s in suffixes]
            hh = [f"{prefix}weight_hh_l{layer}{s}" for s in suffixes]
            self.map[w_name] = {"source": ih[0], "how": "recurrent",
                                "axes": {"1": [[p, 0, rows] for p in ih], "2": [[p, 1, None] for p in ih]}}
            if len(node.input) > 2 and node.input[2]:
                self.map[node.input[2]] = {"source": hh[0], "how": "recurrent",
                                           "axes": {"1": [[p, 0, rows] for p in hh],
                                                    "2": [[p, 1, None] for p in hh]}}
            if len(node.input) > 3 and node.input[3] and self._array(node.input[3]) is not None:
                none = [-1] * len(rows)
                targets = []
                for s in suffixes:
                    for kind, index in (("ih", rows + none), ("hh", none + rows)):
                        pname = f"{prefix}bias_{kind}_l{layer}{s}"
                        if pname in self.state:
                            targets.append([pname, 0, index])
                if targets:
                    self.map[node.input[3]] = {"source": targets[0][0], "how": "recurrent",
                                               "axes": {"1": targets}}

    def _array(self, name):
        for t in self.proto.graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        for node in self.proto.graph.node:
            if node.op_type == "Constant" and node.output[0] == name:
                return numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" \
                    else None
        return None

    def _find_rnn_layer(self, node, w, gates, onnx_to_torch):
        dirs, rows, _ = w.shape
        hidden = rows // gates
        for mod_name, m in self.modules.items():
            if not isinstance(m, nn.RNNBase) or m.hidden_size != hidden:
                continue
            prefix = f"{mod_name}." if mod_name else ""
            for layer in range(m.num_layers):
                torch_w = getattr(m, f"weight_ih_l{layer}").detach().cpu().float().numpy()
                if torch_w.shape != w.shape[1:]:
                    continue
                blocks = torch_w.reshape(gates, hidden, -1)[onnx_to_torch]
                if np.array_equal(blocks.reshape(rows, -1), w[0]):
                    return prefix, layer, dirs, hidden
        return None

    # -- BN constants -------------------------------------------------------------------------
    def match_bn_constants(self):
        for node in self.proto.graph.node:
            if node.op_type != "BatchNormalization" or len(node.input) < 5:
                continue
            stats = self.map.get(node.input[3])
            if not stats:
                continue
            bn_name = stats["source"].rsplit(".", 1)[0]
            for name in node.input[1:3]:
                if name not in self.map and self._array(name) is not None:
                    self.map[name] = {"source": None, "how": "bn_constant", "module": bn_name,
                                      "axes": {"0": [[f"{bn_name}.running_mean", 0, None]]}}

    def build(self):
        weights, _ = _onnx_weights(self.proto)
        self.match_recurrent()
        pending = []
        for name, array, consumers in weights:
            if name in self.map:
                continue
            entry = self.match_value(name, array, consumers)
            if entry is not None:
                self.map[name] = entry
            else:
                pending.append((name, array, consumers))
        unmapped = []
        for name, array, consumers in pending:
            if name not in self.map and self.match_bn_fold(name, array, consumers) is None:
                unmapped.append(name)
        self.match_bn_constants()
        unmapped = [n for n in unmapped if n not in self.map]
        return self.map, unmapped


def _bn_scale(bn) -> np.ndarray:
    var = bn.running_var.detach().cpu().double().numpy()
    scale = 1.0 / np.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().cpu().double().numpy()
    return scale.astype(np.float32)


def _reshape_axes(src, src_shape, shape):
    """Axes survive a reshape that only inserts or drops size-1 axes."""
    src_axes = [a for a, d in enumerate(src_shape) if d != 1]
    axes = [a for a, d in enumerate(shape) if d != 1]
    if [src_shape[a] for a in src_axes] != [shape[a] for a in axes]:
        return {}
    return {str(a): [[src, s, None]] for a, s in zip(axes, src_axes)}


def build_weight_map(proto: onnx.ModelProto, module: nn.Module) -> tuple[dict, list]:
    """(weight map, names of float ONNX weights it could not trace to ``module``)."""
    return _MapBuilder(proto, module).build()
