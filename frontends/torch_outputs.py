"""Pruned ONNX -> a PyTorch file: ``spa prune ... -o small.pt2`` (torch.export ExportedProgram) and
``-o small.pt`` (TorchScript).

The pruned ONNX (already verified and written by the CLI) is converted by :func:`from_onnx`,
its shape arithmetic is fixed at one input shape (see :func:`specialize`), and the module is
exported with ``torch.export.export`` or traced with ``torch.jit.trace``. The file is written to a
temporary name beside the target, loaded back (``torch.export.load`` / ``torch.jit.load``) and
run against onnxruntime on the pruned ONNX with a second random input of that shape; only when it
matches (relative error ``rtol`` of the output's magnitude) is it renamed to the target. On any
failure nothing is written.

The written program is specialised to that input shape: ``--input-shape``, else the sizes the
pruned ONNX declares with batch 1 for a symbolic batch axis (other symbolic sizes: the first size
onnxruntime runs among 32, 8, 16, 7, 4, 1). torch.export guards reject other shapes; a TorchScript
trace may accept some (it records tensor sizes where the graph computes with them) but is only
checked at that shape.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import torch

from spa.errors import SpaError
from spa.paths import staging_folder

from .torch_export import _quiet
from .torch_onnx import _NON_WEIGHT_SLOTS, OnnxModule, _onnx_semantics, from_onnx, run_graph, verify_module
from .torch_quant_ops import ROUNDING_RTOL, rounds_activations

__all__ = ["write_exported_program", "write_torchscript", "specialize", "example_feeds"]

_TRIAL_DIMS = (32, 8, 16, 7, 4, 1)
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli"}
_DATA_SIZED_OPS = {"NonZero", "Unique", "Compress", "NonMaxSuppression", "StringSplit"}


def write_exported_program(onnx_path, out_path, *, input_shapes=None, rtol: float = 1e-4, **_) -> dict:
    """The pruned ONNX at ``onnx_path`` as a ``torch.export.save``d ExportedProgram at ``out_path``
    (load it with ``torch.export.load(path).module()``). Returns what the CLI prints."""
    def build(module, args):
        return torch.export.export(module, args, strict=False)

    return _write(onnx_path, out_path, input_shapes, rtol, "torch.export ExportedProgram", build,
                  torch.export.save, lambda p: torch.export.load(p).module())


def write_torchscript(onnx_path, out_path, *, input_shapes=None, rtol: float = 1e-4, **_) -> dict:
    """The pruned ONNX at ``onnx_path`` as a TorchScript archive at ``out_path`` (``torch.jit.trace``
    of the converted module; load it with ``torch.jit.load``). Returns what the CLI prints."""
    def build(module, args):
        return torch.jit.trace(module, args, check_trace=False, strict=False)

    return _write(onnx_path, out_path, input_shapes, rtol, "TorchScript", build, torch.jit.save,
                  lambda p: torch.jit.load(p, map_location="cpu"))


def _write(onnx_path, out_path, input_shapes, rtol, kind, build, save, load) -> dict:
    name = os.path.basename(out_path)
    model = onnx.load(os.fspath(onnx_path))
    notes = []
    if rounds_activations(model) and rtol < ROUNDING_RTOL:
        rtol = ROUNDING_RTOL
        notes.append(f"an int8 model: the torch module quantizes in float, with straight-through rounding for "
                     f"training, and onnxruntime's integer kernels round at other boundaries (checked within "
                     f"{rtol:g} of the largest output)")
    feeds = example_feeds(model, input_shapes, seed=0)
    check = example_feeds(model, {k: v.shape for k, v in feeds.items()}, seed=1)
    module = from_onnx(model, inputs=feeds, rtol=rtol)
    args = _arguments(module, feeds)
    specialize(module, args)
    module.mimic_onnx = True  # BN per node's training_mode, no dropout: what the pruned ONNX computes
    module.train(False)
    with staging_folder(out_path) as tmp:
        staged = os.path.join(tmp, name)
        try:
            with _quiet(), torch.no_grad():
                save(build(module, args), staged)
        except SpaError as exc:
            raise SpaError(f"cannot write {name} as {kind}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - tracer/exporter failures are one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise SpaError(f"cannot write {name} as {kind}: {type(exc).__name__}: {first[:200]}") from None
        try:
            with _quiet():
                loaded = load(staged)
        except Exception as exc:  # noqa: BLE001
            raise SpaError(f"{name}: the written {kind} does not load back ({type(exc).__name__})") from None
        error = verify_module(loaded, model, check, rtol, what=f"{name} ({kind}, reloaded)")
        os.replace(staged, out_path)
    return {"format": kind, "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
            "max_error": error, "notes": notes}


def _arguments(module: OnnxModule, feeds: dict) -> tuple:
    dtype = module.float_dtype()
    args = [torch.from_numpy(np.array(feeds[n])) for n in module.input_names]
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in args)


# ------------------------------------------------------------------------------------------------
# the example input
# ------------------------------------------------------------------------------------------------
def example_feeds(model: onnx.ModelProto, input_shapes=None, seed: int = 0) -> dict:
    """Random inputs (name -> array) at the shape the file is specialised to: ``input_shapes`` (one
    shape for a single-input model, or {input name: shape}), else the declared sizes with batch 1
    and the first other size onnxruntime runs with."""
    from spa.runtime import declared_inputs, random_inputs, session

    declared = declared_inputs(model)
    given = _given_shapes(declared, input_shapes)
    rng = np.random.default_rng(seed)
    if given is not None:
        feeds = {name: _random(rng, given[name], dtype) for name, _, dtype in declared}
        return feeds
    failure = None
    for default_dim in _TRIAL_DIMS:
        feeds = random_inputs(model, batch=1, seed=seed, default_dim=default_dim)
        try:
            session(model.SerializeToString(), quiet=True).run(None, feeds)
            return feeds
        except Exception as exc:  # noqa: BLE001 - try the next size
            failure = exc
    raise SpaError(f"onnxruntime runs the pruned model at none of the sizes tried "
                   f"({type(failure).__name__}); pass --input-shape")


def _given_shapes(declared, input_shapes):
    if input_shapes is None:
        return None
    if isinstance(input_shapes, dict):
        shapes = {str(k): tuple(int(d) for d in v) for k, v in input_shapes.items()}
        unknown = sorted(set(shapes) - {name for name, _, _ in declared})
        if unknown:
            raise SpaError(f"--input-shape names {', '.join(unknown)}, which the model does not have "
                           f"(inputs: {', '.join(n for n, _, _ in declared)})")
        missing = [name for name, dims, _ in declared if name not in shapes
                   and not all(isinstance(d, int) for d in dims[1:])]
        if missing:
            raise SpaError(f"--input-shape gives no shape for input '{missing[0]}', whose size is not fixed")
        shapes.update({name: tuple(d if isinstance(d, int) else 1 for d in dims)  # a free batch: 1
                       for name, dims, _ in declared if name not in shapes})
    else:
        if len(declared) != 1:
            raise SpaError(f"the model has {len(declared)} inputs: name each --input-shape "
                           f"(NAME=1x3x224x224; inputs: {', '.join(n for n, _, _ in declared)})")
        shapes = {declared[0][0]: tuple(int(d) for d in input_shapes)}
    for name, dims, _ in declared:
        shape = shapes[name]
        if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
            shown = "x".join(str(d) if isinstance(d, int) else (d or "?") for d in dims)
            raise SpaError(f"--input-shape {'x'.join(map(str, shape))} does not fit input '{name}' "
                           f"(declared {shown})")
    return shapes


def _random(rng, shape, dtype):
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    return rng.integers(0, 2, size=shape).astype(dtype)


# ------------------------------------------------------------------------------------------------
# fixing shape arithmetic at one input shape
# ------------------------------------------------------------------------------------------------
def specialize(module: OnnxModule, args: tuple) -> OnnxModule:
    """Fix ``module``'s shape arithmetic at the shapes of ``args``, in place.

    One eager run records every tensor that depends on no input's values and no weight (Shape/Size
    of anything, and nodes computing only on such tensors and constants, floats included: YOLOv8's
    anchor grid is a float Range up to a Shape's size); those nodes are replaced by their recorded
    values. What remains computes on data, so torch.export and
    torch.jit.trace see shapes as constants instead of data-dependent values. The module then
    runs only at these input shapes."""
    env = module.fill_constants(dict(zip(module.input_names, args)))
    with torch.no_grad(), _onnx_semantics(module):
        run_graph(module, module._nodes, env)
    static = set(module._consts)
    sized_by_data: set = set()  # tensors whose shape depends on input values (NonZero, ...)
    kept = []
    for info in module._nodes:
        inputs = [i for i in info.inputs if i]
        outputs = [o for o in info.outputs if o]
        values = [env.get(o) for o in outputs]
        if info.op in ("Shape", "Size"):
            known = bool(inputs) and inputs[0] not in sized_by_data
        else:
            known = all(i in static for i in inputs)
        folds = (known and outputs and not info.graphs and info.op not in _RANDOM_OPS
                 and all(isinstance(v, torch.Tensor) and not v.is_complex() for v in values))
        if folds:
            for name, value in zip(outputs, values):
                module._consts[name] = value.detach().clone()
                static.add(name)
            continue
        kept.append(info)
        if (info.op in _DATA_SIZED_OPS or info.graphs or any(i in sized_by_data for i in inputs)
                or any((info.op, k) in _NON_WEIGHT_SLOTS and i and i not in static
                       for k, i in enumerate(info.inputs))):
            sized_by_data.update(outputs)
    module._nodes = kept
    return module
