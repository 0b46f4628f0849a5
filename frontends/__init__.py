"""Framework frontends (torch, tensorflow, jax) live here; imported as spa.frontends.

``to_onnx(path)`` converts a framework file to a temporary ONNX file for the CLI, picking the
frontend by suffix in ``FRONTENDS`` (suffix -> "module:function"; the function takes
(path, out_path) and returns out_path). Frontends are imported lazily: the core never imports a
framework.

``from_onnx_file(onnx_path, out_path, ...)`` goes the other way for ``spa prune ... -o small.pt2``
(``FRAMEWORK_OUTPUTS``: .pt2, .pt, .keras, .h5), and ``check_output`` refuses an output suffix that
cannot be written from the input (``REFUSED_OUTPUTS``: .pth, .tflite; Keras from a non-Keras input)
before any work.
"""
from __future__ import annotations

import atexit
import importlib
import inspect
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
    "<hf-dir>": "spa.frontends.huggingface:to_onnx",  # a save_pretrained directory (has config.json)
}
FRAMEWORK_OF = {"spa.frontends.torch": "PyTorch (pip install torch)",
                "spa.frontends.tensorflow": "TensorFlow (pip install tensorflow-cpu tf2onnx)",
                "spa.frontends.huggingface": "PyTorch and transformers (pip install torch transformers)"}


def frontend_for(path: str) -> str | None:
    """The "module:function" converting ``path``, or None when it is not a framework file."""
    key = os.path.splitext(str(path).rstrip("/\\"))[1].lower()
    if os.path.isdir(path):  # Hugging Face (config.json) or else a TensorFlow SavedModel
        key = "<hf-dir>" if os.path.isfile(os.path.join(path, "config.json")) else "<dir>"
    return FRONTENDS.get(key) if key else None


def to_onnx(path: str, input_shapes=None) -> str:
    """Convert a framework file to ONNX in a temporary directory (removed at exit); returns the
    .onnx path. ``input_shapes`` (one shape, or {input name: shape}: --input-shape) reaches the
    frontends whose converter takes it (TorchScript, which stores no input shape). Raises SpaError
    with one line if the framework is missing or conversion fails."""
    target = frontend_for(path)
    if target is None:
        raise SpaError(f"{path}: no frontend for this file type (known: {', '.join(sorted(FRONTENDS))})")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f))
                                       for f in ("config.json", "saved_model.pb", "saved_model.pbtxt")):
        raise SpaError(f"{path} is a directory with neither config.json (a Hugging Face save_pretrained "
                       f"directory) nor saved_model.pb (a TensorFlow SavedModel)")
    module_name, function = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        need = FRAMEWORK_OF.get(module_name, exc.name or module_name)
        raise SpaError(f"reading {os.path.basename(path)} needs {need}: {exc}") from None
    workdir = tempfile.mkdtemp(prefix="spa-frontend-")
    atexit.register(shutil.rmtree, workdir, True)
    base = os.path.splitext(os.path.basename(str(path).rstrip("/\\")))[0] or "model"
    convert = getattr(module, function)
    if input_shapes is not None and "input_shapes" in inspect.signature(convert).parameters:
        return convert(str(path), os.path.join(workdir, base + ".onnx"), input_shapes=input_shapes)
    return convert(str(path), os.path.join(workdir, base + ".onnx"))


# ------------------------------------------------------------------------------------------------
# the other direction: -o small.pt2 / small.pt / small.keras / small.h5
# ------------------------------------------------------------------------------------------------
# -o suffix -> "module:function" writing the verified pruned ONNX as a framework file. The function
# takes (onnx_path, out_path, *, source, plan, input_shapes), checks the file against the pruned
# ONNX on a random input before writing it (nothing written on failure) and returns a dict for the
# CLI's line ({"format", "max_error", ...}). Any other suffix is written as ONNX.
FRAMEWORK_OUTPUTS: dict[str, str] = {
    ".pt2": "spa.frontends.torch_outputs:write_exported_program",  # torch.export.save
    ".pt": "spa.frontends.torch_outputs:write_torchscript",        # torch.jit.save of a trace
    ".keras": "spa.frontends.tensorflow_outputs:write_keras",       # the Keras input, narrowed
    ".h5": "spa.frontends.tensorflow_outputs:write_keras",
}
KERAS_INPUTS = (".keras", ".h5")
# framework suffixes refused as outputs, and why
REFUSED_OUTPUTS: dict[str, str] = {
    ".pth": "a .pth file is what torch.save writes (a state_dict or a pickled module, read by torch.load), "
            "so SPA does not write TorchScript under that name: use -o small.pt (TorchScript, torch.jit.load) "
            "or -o small.pt2 (torch.export.load)",
    ".tflite": "SPA has no ONNX -> TFLite converter: write .onnx, or .keras from a Keras input and convert "
               "that with tf.lite.TFLiteConverter",
}
_OUTPUT_FRAMEWORKS = {"spa.frontends.torch_outputs": "PyTorch (pip install torch)",
                      "spa.frontends.tensorflow_outputs": "TensorFlow (pip install tensorflow-cpu tf2onnx)"}


def file_suffix(path) -> str:
    """A file name's extension, lower case (a trailing slash ignored)."""
    return os.path.splitext(str(path).rstrip("/\\"))[1].lower()


def check_output(out_path, source, *, changes_weights: bool = False) -> str | None:
    """Refuse, with one line and before any work, an output that cannot be written from ``source``
    (the input file as given). Returns the "module:function" writing ``out_path``, or None when it
    is written as ONNX (.onnx and any suffix that is no framework's)."""
    name, suffix = os.path.basename(str(out_path)), file_suffix(out_path)
    if suffix in REFUSED_OUTPUTS:
        raise SpaError(f"-o {name}: {REFUSED_OUTPUTS[suffix]}")
    target = FRAMEWORK_OUTPUTS.get(suffix)
    if target is None:
        return None
    if target.startswith("spa.frontends.tensorflow"):
        if file_suffix(source) not in KERAS_INPUTS or os.path.isdir(str(source)):
            raise SpaError(f"-o {name}: a Keras model can only be written when the input is a Keras file "
                           f"(.keras/.h5), which SPA narrows with apply_plan; there is no ONNX -> Keras "
                           f"converter for {os.path.basename(str(source).rstrip('/'))}. Write .onnx, .pt2 or .pt "
                           f"instead (or load the pruned ONNX as a tf.Module: spa.frontends.tensorflow.from_onnx)")
        if changes_weights:
            raise SpaError(f"-o {name}: the Keras model keeps slices of its own weights, so weights changed "
                           f"in the pruned ONNX (--criterion obspa, --compensation, --recover) cannot be "
                           f"carried back; write .onnx, .pt2 or .pt, or prune without them")
    _load_writer(target, name)
    return target


def from_onnx_file(onnx_path, out_path, *, source=None, plan=None, input_shapes=None) -> dict:
    """Write the pruned ONNX at ``onnx_path`` as the framework file ``out_path`` names by its suffix
    (``FRAMEWORK_OUTPUTS``). ``source``: the input file as given (a Keras output is that model
    narrowed to ``plan``); ``input_shapes``: the shape a torch output is specialised to (one shape,
    or {input name: shape}; default: the pruned ONNX's, batch 1, where spa.frontends.torch_outputs finds one
    that runs; the CLI passes the sizes the model was verified at). The file is checked to match the
    pruned ONNX numerically on a random input before it is written; on failure nothing is written
    (SpaError). Returns {"format", "max_error", ...}."""
    name = os.path.basename(str(out_path))
    target = check_output(out_path, source if source is not None else onnx_path)
    if target is None:
        raise SpaError(f"{name}: not a framework output (known: {', '.join(sorted(FRAMEWORK_OUTPUTS))})")
    write = _load_writer(target, name)
    return write(str(onnx_path), str(out_path), source=source, plan=plan, input_shapes=input_shapes)


def uses_input_shape(source, output=None) -> bool:
    """Whether --input-shape shapes a conversion: a TorchScript input (which stores no input shape)
    or a torch output (specialised to one input shape)."""
    torchscript_in = file_suffix(source) in (".pt", ".pth") and not os.path.isdir(str(source))
    torch_out = output is not None and FRAMEWORK_OUTPUTS.get(file_suffix(output), "").startswith("spa.frontends.torch")
    return torchscript_in or torch_out


def _load_writer(target, name):
    module_name, function = target.split(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except ImportError as exc:
        need = _OUTPUT_FRAMEWORKS.get(module_name, exc.name or module_name)
        raise SpaError(f"writing {name} needs {need}: {exc}") from None
