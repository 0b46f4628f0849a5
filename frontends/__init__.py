"""Framework frontends (torch, tensorflow, jax) live here; imported as spa.frontends.

``to_onnx(path)`` converts a framework file to a temporary ONNX file for the CLI, picking the
frontend by suffix in ``FRONTENDS`` (suffix -> "module:function"; the function takes
(path, out_path) and returns out_path). Frontends are imported lazily: the core never imports a
framework.
"""
from __future__ import annotations

import atexit
import importlib
import os
import shutil
import tempfile

from spa.errors import SpaError

FRONTENDS: dict[str, str] = {
    ".pt2": "spa.frontends.torch:to_onnx",   # torch.export.save'd ExportedProgram
    ".pt": "spa.frontends.torch:to_onnx",    # TorchScript (torch.jit.save)
    ".pth": "spa.frontends.torch:to_onnx",
    ".keras": "spa.frontends.tensorflow:to_onnx",
    ".h5": "spa.frontends.tensorflow:to_onnx",
    ".tflite": "spa.frontends.tensorflow:to_onnx",
    "<dir>": "spa.frontends.tensorflow:to_onnx",  # a SavedModel directory
}
FRAMEWORK_OF = {"spa.frontends.torch": "PyTorch (pip install torch)",
                "spa.frontends.tensorflow": "TensorFlow (pip install tensorflow-cpu tf2onnx)"}


def frontend_for(path: str) -> str | None:
    """The "module:function" converting ``path``, or None when it is not a framework file."""
    key = os.path.splitext(str(path).rstrip("/\\"))[1].lower()
    if os.path.isdir(path):
        key = FRONTENDS.get("<dir>") and "<dir>"  # e.g. a SavedModel directory
    return FRONTENDS.get(key) if key else None


def to_onnx(path: str) -> str:
    """Convert a framework file to ONNX in a temporary directory (removed at exit); returns the
    .onnx path. Raises SpaError with one line if the framework is missing or conversion fails."""
    target = frontend_for(path)
    if target is None:
        raise SpaError(f"{path}: no frontend for this file type (known: {', '.join(sorted(FRONTENDS))})")
    module_name, function = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        need = FRAMEWORK_OF.get(module_name, exc.name or module_name)
        raise SpaError(f"reading {os.path.basename(path)} needs {need}: {exc}") from None
    workdir = tempfile.mkdtemp(prefix="spa-frontend-")
    atexit.register(shutil.rmtree, workdir, True)
    base = os.path.splitext(os.path.basename(str(path).rstrip("/\\")))[0] or "model"
    return getattr(module, function)(str(path), os.path.join(workdir, base + ".onnx"))

