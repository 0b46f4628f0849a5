"""from_onnx: any ONNX graph as a trainable tf.Module (TensorFlow ops, weights as tf.Variables)."""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from spa.errors import SpaError

from .tensorflow_export import VERIFY_RTOL, _load, _tf
from .tensorflow_ops import OPS, _as_tensor, _Node, register_elementwise


def from_onnx(path, *, verify=True, rtol=VERIFY_RTOL):
    """A tf.Module running the ONNX graph with TensorFlow ops; its float weights are tf.Variables
    (trainable, except BatchNormalization running statistics). Layout stays ONNX's (NCHW): each
    convolution and pooling transposes to NHWC and back, as TensorFlow's CPU kernels need.
    Unknown ops raise SpaError naming them. verify: compare with onnxruntime on random inputs."""
    proto = _load(path)
    module = OnnxModule(proto)
    if verify:
        compare_module_onnx(module, proto, rtol=rtol)
    return module


def _module_class():
    tf = _tf()
    register_elementwise()

    class OnnxModuleImpl(tf.Module):
        """Runs one ONNX graph; call with the graph inputs (numpy or tensors) in order."""

        def __init__(self, proto, name=None):
            super().__init__(name=name or "onnx_module")
            graph = proto.graph
            self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
            unknown = sorted({n.op_type for n in graph.node if n.op_type not in OPS or
                              n.domain not in ("", "ai.onnx")})
            if unknown:
                raise SpaError(f"from_onnx: no TensorFlow translation for op(s) {', '.join(unknown)}")
            frozen = _bn_statistics(graph)
            self.variables_list = []
            self._index = {}
            self._constants = {}
            for init in graph.initializer:
                value = numpy_helper.to_array(init)
                if value.dtype.kind == "f":
                    self._index[init.name] = len(self.variables_list)
                    self.variables_list.append(tf.Variable(value, trainable=init.name not in frozen,
                                                           name=_tf_name(init.name)))
                else:
                    self._constants[init.name] = value
            inits = {i.name for i in graph.initializer}
            self.input_names = [i.name for i in graph.input if i.name not in inits]
            self.output_names = [o.name for o in graph.output]
            self._nodes = list(graph.node)

        def __call__(self, *inputs):
            if len(inputs) != len(self.input_names):
                raise SpaError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                               f"got {len(inputs)}")
            env = {"": None}
            env.update(self._constants)
            env.update({name: self.variables_list[i] for name, i in self._index.items()})
            env.update({name: tf.convert_to_tensor(x) for name, x in zip(self.input_names, inputs)})
            for node in self._nodes:
                args = [env[name] if name else None for name in node.input]
                outs = OPS[node.op_type](_Node(node, self.opset), *args)
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                for name, value in zip(node.output, outs):
                    if name:
                        env[name] = value
            results = [_as_tensor(env[name]) for name in self.output_names]
            return results[0] if len(results) == 1 else tuple(results)

    return OnnxModuleImpl


_MODULE_CLASS = None


def OnnxModule(proto, name=None):  # noqa: N802 - a class built lazily (TensorFlow imports late)
    global _MODULE_CLASS
    if _MODULE_CLASS is None:
        _MODULE_CLASS = _module_class()
    return _MODULE_CLASS(proto, name)


def _tf_name(name):
    cleaned = "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in name)
    return cleaned.lstrip("_.-") or "w"


def _bn_statistics(graph):
    return {name for n in graph.node if n.op_type == "BatchNormalization" for name in n.input[3:5]}


def compare_module_onnx(module, onnx_model, *, rtol=VERIFY_RTOL, batch=2, seed=0):
    from spa.runtime import random_inputs, run
    proto = _load(onnx_model)
    feeds = random_inputs(proto, batch=batch, seed=seed)
    expected = run(proto, feeds)
    got = module(*[feeds[n] for n in module.input_names])
    got = [np.asarray(g) for g in (got if isinstance(got, tuple) else [got])]
    for name, e, g in zip(module.output_names, expected, got):
        if e.shape != g.shape:
            raise SpaError(f"from_onnx: output '{name}' has shape {g.shape}, onnxruntime gives {e.shape}")
        if e.size == 0:
            continue
        scale = max(float(np.abs(e).max()), 1e-12)
        error = float(np.abs(e.astype(np.float64) - g.astype(np.float64)).max()) / scale
        if error > rtol:
            raise SpaError(f"from_onnx: output '{name}' differs from onnxruntime by {error:.2e} "
                           f"(relative), more than {rtol:g}")
