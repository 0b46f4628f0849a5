"""Keras 3 test models for the TensorFlow frontend: tiny, seeded, with random (non-trivial) weights.

KERAS_ZOO: name -> builder(); build(name, seed=0) -> keras.Model with every weight randomised
(biases, BN statistics and scales included, so no exporter can drop a zero bias or a unit scale
and the equivalence tests see real numbers). APPLICATIONS: keras.applications models built with
weights=None at a small input size and few classes (their minimum input is 32x32).
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras  # noqa: E402
from keras import layers  # noqa: E402


def sequential_cnn():
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        layers.Conv2D(8, 3, padding="same", name="conv1"),
        layers.BatchNormalization(name="bn1"),
        layers.ReLU(),
        layers.MaxPooling2D(),
        layers.Conv2D(12, 3, padding="same", activation="relu", name="conv2"),
        layers.Flatten(),
        layers.Dense(16, activation="relu", name="fc1"),
        layers.Dense(5, name="fc2"),
    ], name="sequential_cnn")


def _basic_block(x, filters, stride, name):
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_c1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_c2")(y)
    y = layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        x = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_down")(x)
        x = layers.BatchNormalization(name=f"{name}_down_bn")(x)
    return layers.Activation("relu")(layers.Add()([x, y]))


def resnet_functional():
    inp = keras.Input((16, 16, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU()(x)
    x = _basic_block(x, 8, 1, "b1")
    x = _basic_block(x, 16, 2, "b2")
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(5, name="head")(x)
    return keras.Model(inp, out, name="resnet_functional")


def mixed_layers():
    """Depthwise, separable, dilated, grouped, transposed conv, Group/LayerNorm, squeeze-excite, concat."""
    inp = keras.Input((16, 16, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    x = layers.Activation("swish")(x)
    d = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    d = layers.BatchNormalization(name="dw_bn")(d)
    s = layers.GlobalAveragePooling2D(keepdims=True)(d)
    s = layers.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = layers.Conv2D(8, 1, activation="sigmoid", name="se_expand")(s)
    d = layers.Multiply()([d, s])
    p = layers.SeparableConv2D(12, 3, padding="same", name="sep")(x)
    g = layers.Conv2D(8, 3, padding="same", dilation_rate=2, name="dilated")(x)
    g = layers.Conv2D(8, 3, padding="same", groups=2, name="grouped")(g)
    x = layers.Concatenate(name="cat")([d, p, g])
    x = layers.GroupNormalization(groups=4, name="gn")(x)
    x = layers.Conv2D(16, 1, name="mix")(x)
    x = layers.Conv2DTranspose(8, 2, strides=2, name="up")(x)
    x = layers.LayerNormalization(name="ln")(x)
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="down")(x)
    x = layers.GlobalMaxPooling2D()(x)
    out = layers.Dense(5, name="head")(x)
    return keras.Model(inp, out, name="mixed_layers")


def conv1d_net():
    inp = keras.Input((40, 2), name="signal")
    x = layers.Conv1D(8, 5, padding="same", activation="relu", name="c1")(inp)
    x = layers.MaxPooling1D()(x)
    x = layers.Conv1D(12, 3, padding="same", name="c2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling1D()(x)
    out = layers.Dense(4, name="head")(x)
    return keras.Model(inp, out, name="conv1d_net")


def text_lstm():
    inp = keras.Input((7,), dtype="int32", name="tokens")
    x = layers.Embedding(20, 8, name="embed")(inp)
    x = layers.LSTM(12, return_sequences=True, name="lstm")(x)
    x = layers.Dense(10, activation="relu", name="fc")(x)
    out = layers.Dense(3, name="head")(x)
    return keras.Model(inp, out, name="text_lstm")


KERAS_ZOO = {f.__name__: f for f in (sequential_cnn, resnet_functional, mixed_layers, conv1d_net,
                                     text_lstm)}

APPLICATIONS = {
    "ResNet50": "resnet50.ResNet50",
    "MobileNetV2": "mobilenet_v2.MobileNetV2",
    "EfficientNetB0": "efficientnet.EfficientNetB0",
    "DenseNet121": "densenet.DenseNet121",
    "ConvNeXtTiny": "convnext.ConvNeXtTiny",
}


def _small_resnet50(input_shape, classes):
    """ResNet50's own code (stem, v1 bottleneck blocks, projection shortcuts), 2 narrow stages."""
    from keras.src.applications import resnet

    def stacks(x):
        x = resnet.stack_residual_blocks_v1(x, 8, 2, stride1=1, name="conv2")
        return resnet.stack_residual_blocks_v1(x, 16, 1, name="conv3")

    return resnet.ResNet(stacks, False, True, weights=None, input_shape=input_shape, classes=classes,
                         name="resnet50_small")


def _small_efficientnet(input_shape, classes):
    """EfficientNet's own code: MBConv with squeeze-excite, swish, expansion, strided depthwise."""
    from keras.src.applications import efficientnet
    blocks = [dict(kernel_size=3, repeats=1, filters_in=32, filters_out=16, expand_ratio=1,
                   id_skip=True, strides=1, se_ratio=0.25),
              dict(kernel_size=3, repeats=2, filters_in=16, filters_out=24, expand_ratio=6,
                   id_skip=True, strides=2, se_ratio=0.25)]
    return efficientnet.EfficientNet(
        0.25, 1.0, 32, blocks_args=blocks, weights=None, input_shape=input_shape, classes=classes,
        name="efficientnet_small")


def _src(module):
    """keras.applications' implementation module: its generic builders are not re-exported."""
    import importlib
    return importlib.import_module(f"keras.src.applications.{module}")


SMALL_APPLICATIONS = {
    "ResNet50": _small_resnet50,
    "MobileNetV2": lambda shape, classes: keras.applications.MobileNetV2(
        input_shape=shape, alpha=0.35, weights=None, classes=classes),
    "EfficientNetB0": _small_efficientnet,
    "DenseNet121": lambda shape, classes: _src("densenet").DenseNet(
        [1, 1, 1, 1], weights=None, input_shape=shape, classes=classes, name="densenet_small"),
    "ConvNeXtTiny": lambda shape, classes: _src("convnext").ConvNeXt(
        [1, 1, 1, 1], [8, 16, 24, 32], include_preprocessing=False, weights=None,
        input_shape=shape, classes=classes, name="convnext_small"),
}


def small_application(name: str, input_shape=(32, 32, 3), classes: int = 4, seed: int = 0):
    """The keras.applications architecture `name` built by its own Keras code at a small width
    and depth (the full-size ones take 10-70 s each to export: see docs/frontends_tensorflow.md)."""
    keras.utils.set_random_seed(seed)
    return randomize(SMALL_APPLICATIONS[name](input_shape, classes), seed)


def randomize(model: keras.Model, seed: int = 0) -> keras.Model:
    """Seeded random weights everywhere; variances stay positive, scales stay near 1."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        shape, name = tuple(var.shape), var.path.rsplit("/", 1)[-1]
        if name in ("moving_variance", "variance"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("gamma", "moving_mean", "mean") and len(shape) == 1:
            value = rng.uniform(0.5, 1.5, shape) if name == "gamma" else rng.normal(0, 0.1, shape)
        elif var.dtype not in ("float32", "float64"):
            continue
        else:
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            value = rng.normal(0, 1 / np.sqrt(max(fan_in, 1)), shape)
        var.assign(value.astype(var.dtype))
    return model


def build(name: str, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    if name in APPLICATIONS:
        return randomize(application(name), seed)
    return randomize(KERAS_ZOO[name](), seed)


def application(name: str, input_shape=(32, 32, 3), classes: int = 4) -> keras.Model:
    module, cls = APPLICATIONS[name].split(".")
    builder = getattr(getattr(keras.applications, module), cls)
    kwargs = dict(weights=None, input_shape=input_shape, classes=classes)
    if name.startswith("ConvNeXt"):
        kwargs["include_preprocessing"] = False
    return builder(**kwargs)


def example_input(model: keras.Model, batch: int = 2, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    if "int" in str(model.inputs[0].dtype):
        return rng.integers(0, 20, shape).astype("int32")
    return rng.normal(size=shape).astype("float32")
