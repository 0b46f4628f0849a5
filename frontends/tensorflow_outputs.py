"""Pruned ONNX -> a Keras file: ``spa prune model.keras ... -o small.keras`` (or ``.h5``).

There is no ONNX -> Keras converter here: the Keras model is rebuilt from the *input* Keras file.
The input is loaded, narrowed by :func:`apply_plan` (layers re-created from their configs with the
kept slices of the original weights), compared with the pruned ONNX in onnxruntime, saved under a
temporary name beside the target, loaded back and compared again on another random input; only
then is it renamed to the target. On any failure nothing is written. Weights that a method changed
in the pruned ONNX (obspa, --compensation, --recover) are not carried back: the CLI refuses those
combinations before pruning (see spa.frontends.check_output).
"""
from __future__ import annotations

import os

from spa.errors import SpaError
from spa.paths import staging_folder

from . import KERAS_INPUTS
from .tensorflow_apply import apply_plan, compare_keras_onnx
from .tensorflow_export import VERIFY_RTOL, _keras

__all__ = ["write_keras", "KERAS_INPUTS"]


def write_keras(onnx_path, out_path, *, source=None, plan=None, rtol: float = VERIFY_RTOL, **_) -> dict:
    """Narrow the Keras model in ``source`` (.keras/.h5) to ``plan`` and write it to ``out_path``
    (.keras, or legacy .h5), checked against the pruned ONNX at ``onnx_path``."""
    name = os.path.basename(out_path)
    if source is None or not str(source).lower().endswith(KERAS_INPUTS):
        raise SpaError(f"cannot write {name}: a Keras model is written only from a Keras input (.keras/.h5)")
    if plan is None:
        raise SpaError(f"cannot write {name}: no plan to apply to {os.path.basename(source)}")
    keras = _keras()
    try:
        model = keras.models.load_model(source, compile=False)
    except Exception as exc:  # noqa: BLE001 - any load failure is bad input
        raise SpaError(f"cannot load Keras model {source}: {type(exc).__name__}") from None
    small = apply_plan(model, plan, pruned=onnx_path, rtol=rtol)  # compared with the pruned ONNX
    with staging_folder(out_path) as tmp:
        staged = os.path.join(tmp, name)
        try:
            small.save(staged)
            loaded = keras.models.load_model(staged, compile=False)
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise SpaError(f"cannot write {name}: {type(exc).__name__}: {first[:200]}") from None
        error = compare_keras_onnx(loaded, onnx_path, rtol=rtol, seed=1)
        os.replace(staged, out_path)
    return {"format": "Keras " + ("HDF5 (legacy)" if name.lower().endswith(".h5") else "model"),
            "max_error": error, "parameters": int(small.count_params())}
