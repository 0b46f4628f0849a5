"""TensorFlow / Keras frontend: Keras, tf.Module, SavedModel and TFLite -> ONNX (tf2onnx), plans back
onto Keras, and any ONNX graph as a trainable tf.Module.

    from spa.frontends.tensorflow import export, apply_plan, from_onnx

    exported = export(keras_model, "model.onnx")           # + weight map in the ONNX metadata
    # spa prune model.onnx -o small.onnx --ratio 0.5 --plan-out plan.json
    small = apply_plan(keras_model, "plan.json", pruned_onnx="small.onnx")  # new keras.Model, verified
    module = from_onnx("small.onnx")                        # any ONNX -> tf.Module, verified

This module shares its name with the `tensorflow` package; its imports are absolute, so
`import tensorflow` anywhere in it is the real TensorFlow.
"""
from __future__ import annotations

from .tensorflow_apply import apply_plan, compare_keras_onnx
from .tensorflow_export import (FILE_SUFFIXES, WEIGHT_MAP_KEY, Exported, export, handles,
                                keras_input_signature, keras_weight_map, read_weight_map, to_onnx)
from .tensorflow_onnx import OnnxModule, compare_module_onnx, from_onnx
from .tensorflow_ops import OPS

__all__ = ["export", "Exported", "apply_plan", "from_onnx", "OnnxModule", "to_onnx", "handles",
           "FILE_SUFFIXES", "WEIGHT_MAP_KEY", "read_weight_map", "keras_weight_map",
           "keras_input_signature", "compare_keras_onnx", "compare_module_onnx", "supported_ops"]


def supported_ops() -> list:
    """ONNX op types from_onnx translates."""
    return sorted(OPS)
