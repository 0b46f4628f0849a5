"""Small Flax NNX models for the JAX frontend tests (random weights, deterministic).

Public API
----------
FLAX_ZOO: dict[str, tuple[builder, input_shape]]   name -> (builder(rngs) -> nnx.Module, NHWC/ND shape)
build(name, seed=0) -> nnx.Module                  eval mode (BatchNorm uses its running statistics)
example_input(name, batch=2, seed=0) -> np.ndarray

Images are NHWC, as Flax uses. BatchNorm statistics and scales are randomised so that a wrong
channel mapping shows up numerically (the default ones/zeros would hide it).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["FLAX_ZOO", "build", "example_input"]


class ConvBNNet(nnx.Module):
    """Conv -> BatchNorm -> ReLU twice, max pool, global average pool, Linear head."""

    def __init__(self, rngs: nnx.Rngs, width=8, classes=5):
        self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=(2, 2), rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
        self.head = nnx.Linear(2 * width, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))  # keywords: jax2onnx patches it
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


class GroupNormNet(nnx.Module):
    """GroupNorm, a depthwise conv, a channel concat, average pooling and an NHWC flatten into a
    Linear head: jax2onnx's decomposed GroupNorm and its NHWC<->NCHW transposes."""

    def __init__(self, rngs: nnx.Rngs, width=8, classes=5, size=8):
        self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.depthwise = nnx.Conv(width, width, (3, 3), feature_group_count=width, rngs=rngs)
        self.norm = nnx.GroupNorm(width, num_groups=4, rngs=rngs)
        self.pointwise = nnx.Conv(width, width, (1, 1), rngs=rngs)
        self.conv2 = nnx.Conv(2 * width, width, (3, 3), strides=(2, 2), rngs=rngs)
        self.head = nnx.Linear(width * (size // 4) ** 2, classes, rngs=rngs)

    def __call__(self, x):
        a = nnx.relu(self.conv1(x))
        b = self.pointwise(nnx.silu(self.norm(self.depthwise(a))))
        x = nnx.avg_pool(jnp.concatenate([a, b], axis=-1), window_shape=(2, 2), strides=(2, 2))
        x = nnx.relu(self.conv2(x))
        return self.head(x.reshape(x.shape[0], -1))


class ResidualBlock(nnx.Module):
    def __init__(self, channels, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(channels, rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(channels, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(y)))


class ResNetTiny(nnx.Module):
    """Stem, two residual blocks sharing the stem's channels (residual adds couple them), head."""

    def __init__(self, rngs: nnx.Rngs, width=8, classes=5):
        self.stem = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.block1 = ResidualBlock(width, rngs)
        self.block2 = ResidualBlock(width, rngs)
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem(x))
        x = self.block2(self.block1(x))
        return self.head(x.mean(axis=(1, 2)))


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, features=(12, 32, 24, 4)):
        self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in zip(features, features[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.gelu(layer(x))
        return self.layers[-1](x)


class TransformerBlock(nnx.Module):
    """Pre-norm self-attention + MLP block on [batch, tokens, features]."""

    def __init__(self, rngs: nnx.Rngs, features=16, heads=4, hidden=32):
        self.norm1 = nnx.LayerNorm(features, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, features, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(features, rngs=rngs)
        self.fc1 = nnx.Linear(features, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, features, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


FLAX_ZOO = {
    "cnn_bn": (ConvBNNet, (8, 8, 3)),
    "resnet": (ResNetTiny, (8, 8, 3)),
    "groupnorm": (GroupNormNet, (8, 8, 3)),
    "mlp": (MLP, (12,)),
    "transformer": (TransformerBlock, (6, 16)),
}


def build(name: str, seed: int = 0) -> nnx.Module:
    """The model in eval mode with seeded random weights.

    Parameters are drawn with numpy into an abstract module (nnx.eval_shape): initialising with
    jax.random would compile every initialiser op by op, tens of seconds on 2 cores.
    """
    builder, _ = FLAX_ZOO[name]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: builder(nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)
    values = {path: jnp.asarray(_draw(rng, path[-1], variable.get_value().shape))
              for path, variable in nnx.to_flat_state(state)}
    module = nnx.merge(graphdef, nnx.State.from_flat_path(values))
    module.eval()
    return module


def example_input(name: str, batch: int = 2, seed: int = 0) -> np.ndarray:
    _, shape = FLAX_ZOO[name]
    return np.random.default_rng(seed + 100).standard_normal((batch, *shape)).astype(np.float32)


def _draw(rng: np.random.Generator, kind: str, shape) -> np.ndarray:
    """Distinct values everywhere (ones/zeros defaults would hide a wrong channel mapping)."""
    if kind == "kernel":
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        value = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif kind in ("scale", "var"):
        value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
        value = rng.normal(0.0, 0.2, shape)
    return value.astype(np.float32)
