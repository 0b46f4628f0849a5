"""Saved torch models -> ONNX, for ``spa prune model.pt2`` and TorchScript ``.pt`` files."""
from __future__ import annotations

import json
import os
import zipfile

import torch

from spa.errors import SpaError

from .torch_export import _quiet, export


def convert_file(path: str, out_path: str) -> str:
    if not os.path.isfile(path):
        raise SpaError(f"{path} does not exist")
    if path.endswith(".pt2"):
        return _from_exported_program(path, out_path)
    return _from_torchscript(path, out_path)


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


def _from_torchscript(path, out_path):
    try:
        extra = {"input_shapes": ""}
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise SpaError(f"{path} is not a TorchScript archive ({type(exc).__name__}); "
                       f"save the model with torch.jit.save or torch.export.save (.pt2)") from None
    module.eval()
    inputs = _declared_inputs(extra["input_shapes"], path) or _guess_inputs(module, path)
    export(module, inputs, out_path, exporter="torchscript")
    return out_path


def _declared_inputs(text, path):
    if not text:
        return None
    try:
        shapes = json.loads(text)
        return tuple(torch.randn(*shape) for shape in shapes)
    except (ValueError, TypeError):
        raise SpaError(f"{path}: extra file input_shapes must be JSON like [[1, 3, 224, 224]]") from None


def _guess_inputs(module, path):
    """TorchScript files carry no input shapes: try shapes suggested by the first weight."""
    first = next(iter(module.parameters()), None)
    candidates = []
    if first is not None and first.dim() >= 3:  # conv weight [out, in, k...]
        spatial = first.dim() - 2
        for size in (224, 64, 32, 16):
            candidates.append((2, first.shape[1]) + (size,) * spatial)
    elif first is not None and first.dim() == 2:
        candidates.append((2, first.shape[1]))
    for shape in candidates:
        x = torch.randn(*shape)
        try:
            with torch.no_grad():
                module(x)
            return (x,)
        except Exception:
            continue
    raise SpaError(f"cannot tell the input shape of {path}: save it with "
                   f"torch.jit.save(m, path, _extra_files={{'input_shapes': '[[1, 3, 224, 224]]'}})")


def is_torchscript(path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
