"""Saved torch models -> ONNX, for ``spa prune model.pt2`` and TorchScript ``.pt`` files."""
from __future__ import annotations

import json
import os
import zipfile

import torch

from spa.errors import SpaError

from .torch_export import _quiet, export


def convert_file(path: str, out_path: str, input_shapes=None) -> str:
    """``.pt2``: the ExportedProgram's own example inputs give the shapes. TorchScript: the shapes
    come from ``input_shapes`` (--input-shape: one shape, or {forward argument name: shape}), else
    from an ``input_shapes`` extra file saved with it; SPA does not guess them."""
    if not os.path.isfile(path):
        raise SpaError(f"{path} does not exist")
    if path.endswith(".pt2"):
        return _from_exported_program(path, out_path)
    return _from_torchscript(path, out_path, input_shapes)


def _from_exported_program(path, out_path):
    try:
        with _quiet():
            program = torch.export.load(path)
    except Exception as exc:
        raise SpaError(f"{path} is not a torch.export archive ({type(exc).__name__})") from None
    try:
        with _quiet():
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
            onnx_program.save(out_path, external_data=False)
    except Exception as exc:
        raise SpaError(f"cannot convert {path} to ONNX: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return out_path


def _from_torchscript(path, out_path, input_shapes=None):
    try:
        extra = {"input_shapes": ""}
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise SpaError(f"{path} is not a TorchScript archive ({type(exc).__name__}); "
                       f"save the model with torch.jit.save or torch.export.save (.pt2)") from None
    module.eval()
    if input_shapes is not None:
        inputs = _given_inputs(module, input_shapes, path)
    else:
        inputs = _declared_inputs(extra["input_shapes"], path) or _no_shape(module, path)
    try:
        with torch.no_grad():
            module(*inputs)
    except Exception as exc:  # noqa: BLE001 - a wrong shape is bad input
        shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
        last = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else ""
        if not last.startswith(type(exc).__name__):  # TorchScript errors end with "RuntimeError: ..."
            last = f"{type(exc).__name__}: {last}"
        raise SpaError(f"{os.path.basename(path)} does not run on input shape {shapes} (--input-shape): "
                       f"{last[:200]}") from None
    export(module, inputs, out_path, exporter="torchscript")
    return out_path


def _forward_arguments(module) -> list[str]:
    try:
        return [a.name for a in module.forward.schema.arguments[1:]]
    except (AttributeError, RuntimeError):
        return []


def _given_inputs(module, input_shapes, path):
    if isinstance(input_shapes, dict):
        names = _forward_arguments(module)
        unknown = sorted(set(input_shapes) - set(names))
        if unknown or not names:
            raise SpaError(f"--input-shape names {', '.join(unknown) or ', '.join(input_shapes)}, which "
                           f"{os.path.basename(path)}'s forward does not take "
                           f"(its arguments: {', '.join(names) or 'unknown'})")
        missing = [n for n in names[:len(input_shapes)] if n not in input_shapes]
        if missing:
            raise SpaError(f"--input-shape gives no shape for {os.path.basename(path)}'s forward "
                           f"argument {missing[0]}")
        shapes = [input_shapes[n] for n in names[:len(input_shapes)]]
    else:
        shapes = [input_shapes]
    return tuple(torch.randn(*shape) for shape in shapes)


def _no_shape(module, path):
    """TorchScript files carry no input shapes and SPA does not guess: refuse, suggesting one
    from the first weight."""
    first = next(iter(module.parameters()), None)
    example = "1x3x224x224"
    if first is not None and first.dim() >= 3:  # conv weight [out, in, k...]
        example = "x".join(map(str, (1, first.shape[1]) + (224,) * (first.dim() - 2)))
    elif first is not None and first.dim() == 2:
        example = f"1x{first.shape[1]}"
    raise SpaError(f"{os.path.basename(path)}: TorchScript stores no input shape; pass --input-shape "
                   f"{example} (or save it with torch.jit.save(m, path, _extra_files="
                   f"{{'input_shapes': '[[{example.replace('x', ', ')}]]'}}))")


def _declared_inputs(text, path):
    if not text:
        return None
    try:
        shapes = json.loads(text)
        return tuple(torch.randn(*shape) for shape in shapes)
    except (ValueError, TypeError):
        raise SpaError(f"{path}: extra file input_shapes must be JSON like [[1, 3, 224, 224]]") from None


def is_torchscript(path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
