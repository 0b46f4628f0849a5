"""The ``bn`` source: Gaussian inputs whose per-channel mean and variance reproduce the first
BatchNormalization's running statistics (read directly, or through one Conv: `_conv_moments`); and
`statistics_mismatch`, how far some inputs leave every BatchNormalization from those statistics.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import SpaError
from ..graph import Graph

if TYPE_CHECKING:
    from .feeds import _Plan


def from_batchnorm(plan: _Plan, rng) -> list:
    from scipy.optimize import nnls

    floats = [i for i in plan.inputs if i.is_float and i.role != "ids"]
    if len(floats) != 1 or len(floats[0].dims) < 3:
        raise SpaError("bn calibration needs one float input of shape [N, C, ...]")
    name = floats[0].name
    g = Graph(plan.model)
    bn = next((n for n in g.nodes if n.op_type == "BatchNormalization"), None)
    if bn is None:
        raise SpaError("bn calibration: the model has no BatchNormalization (eval exports fold it "
                       "into Conv; export with BatchNorm kept, or use --calibration synthetic)")
    stats = [g.const(x) for x in bn.input[3:5]]
    if any(s is None for s in stats):
        raise SpaError("bn calibration: the first BatchNormalization's running statistics are not constants")
    mu, var = (np.asarray(s, dtype=np.float64).reshape(-1) for s in stats)
    if bn.input[0] == name:
        channels = len(mu)
        mean, variance = mu, var
    else:
        conv = g.nodes[g.producer[bn.input[0]]] if bn.input[0] in g.producer else None
        if conv is None or conv.op_type != "Conv" or conv.input[0] != name or g.const(conv.input[1]) is None:
            raise SpaError("bn calibration: the first BatchNormalization must read the input directly "
                           "or through one Conv with constant weights")
        from ..graph import attr
        channels = np.shape(g.const(conv.input[1]))[1] * attr(conv, "group", 1)
        A, B, bias = _conv_moments(g, conv, channels)
        mean = np.linalg.lstsq(A, mu - bias, rcond=None)[0]
        variance = nnls(B, var)[0]
    declared = plan.known(floats[0], 1)
    if isinstance(declared, int) and declared != channels:
        raise SpaError(f"bn calibration: input '{name}' has {declared} channels, the BatchNormalization "
                       f"statistics imply {channels}")
    if declared is None:
        plan.fixed[(name, 1)] = channels
    scale = np.sqrt(np.maximum(variance, 1e-4))

    def draw(shape):
        view = (1, -1) + (1,) * (len(shape) - 2)
        return mean.reshape(view) + scale.reshape(view) * rng.standard_normal(shape)
    return plan.generated(rng, override={name: draw})


def statistics_mismatch(model, batches) -> float | None:
    """How far `batches` leave the model's BatchNormalization inputs from the running statistics the
    layers keep (what the training data gave them): per channel, over every sample and position,
    |mean - running mean| / running sd + |log(variance / running variance)| / 2, averaged over the
    channels and then the layers; 0 for inputs like the training data's. None where no
    BatchNormalization keeps constant statistics."""
    from ..activations import fetch
    from ..graph import Consts, attr

    consts = Consts(model)  # the statistics alone: a Graph's shape inference can take seconds
    layers = [(node.input[0], [np.asarray(consts[x], dtype=np.float64).reshape(-1) for x in node.input[3:5]],
               attr(node, "epsilon", 1e-5)) for node in model.graph.node
              if node.op_type == "BatchNormalization" and len(node.input) == 5
              and all(x in consts for x in node.input[3:5])]
    if not layers:
        return None
    sums = {}
    for got in fetch(model, [layer[0] for layer in layers], batches, desc=None):
        for name, value in got.items():
            for sample in np.asarray(value):  # one at a time: a float64 copy of a whole batch can be large
                x = np.asarray(sample, dtype=np.float64).reshape(len(sample), -1)
                n, s, ss = sums.get(name, (0, 0.0, 0.0))
                sums[name] = (n + x.shape[1], s + x.sum(axis=1), ss + (x ** 2).sum(axis=1))
    per_layer = []
    for name, (mean, var), eps in layers:
        n, s, ss = sums[name]
        seen_mean = s / n
        seen_var = np.maximum(ss / n - seen_mean ** 2, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            distance = np.abs(seen_mean - mean) / np.sqrt(var + eps) + \
                np.abs(np.log((seen_var + eps) / (var + eps))) / 2
        distance = distance[np.isfinite(distance)]
        if distance.size:
            per_layer.append(float(distance.mean()))
    return float(np.mean(per_layer)) if per_layer else None


def _conv_moments(g, conv, channels):
    """Per (out, in) channel sums of w and w^2 (group structure expanded), and the bias."""
    from ..graph import attr
    w = np.asarray(g.const(conv.input[1]), dtype=np.float64)
    groups = attr(conv, "group", 1)
    c_out, cin_g = w.shape[:2]
    flat = w.reshape(c_out, cin_g, -1)
    A, B = np.zeros((c_out, channels)), np.zeros((c_out, channels))
    per_out = c_out // groups
    for o in range(c_out):
        cols = (o // per_out) * cin_g + np.arange(cin_g)
        A[o, cols] = flat[o].sum(axis=1)
        B[o, cols] = (flat[o] ** 2).sum(axis=1)
    bias = g.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    return A, B, np.zeros(c_out) if bias is None else np.asarray(bias, dtype=np.float64)
