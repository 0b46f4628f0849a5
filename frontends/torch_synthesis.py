"""Data-free calibration inputs synthesised from a model's BatchNorm statistics (DeepInversion).

A BatchNormalization node stores the running mean and variance of its input under the training
data. Inputs optimised so that every BN node's batch statistics match its running statistics
(Yin et al. 2020, "Dreaming to Distill", DeepInversion; ZeroQ's "distilled data") make every
layer see activations with the statistics of real data, which is what OBSPA's Hessians
H = 2XX^T/N need.

    from spa.calibration import calibration_batches
    from spa.frontends.torch_synthesis import bn_inversion, bn_match_error

    start = calibration_batches(model, "synthetic", 256, 64, seed)   # shapes, integer inputs
    batches = bn_inversion(model, start, steps=200, lr=0.1)           # float inputs optimised

The model runs as a torch module (:func:`spa.frontends.torch.from_onnx`) on a copy of the graph
that also returns every BN node's input; every BN normalises with its running statistics
(DeepInversion's eval mode, whatever the node's training_mode), so a layer whose input
statistics are off passes the error on to the next. The loss, summed over the batches (each
batch is matched on its own: Adam's per-element steps make that the same as optimising the
batches one by one) and over the BN nodes, is DeepInversion's

    ||mean_b - running_mean||_2 + ||std_b - running_std||_2        (over the channel axis)

with per-channel statistics over the batch and all other axes (std = sqrt(var + epsilon) on both
sides), plus optional image priors on the float inputs: ``tv`` times the mean absolute difference
of neighbours along the spatial axes (axes 2 and up), ``l2`` times the mean square. Both default
to 0: on the digits ResNet and the MNIST-1D CNN neither changed the pruned accuracy beyond noise
(docs/synthesis.md has the measurements). Only float inputs are optimised; integer and boolean
inputs pass through unchanged. The result is deterministic for given feeds and settings (no
random augmentation is used; ``seed`` seeds torch's generator for any stochastic op).

Measured (docs/synthesis.md; OBSPA, 256 samples, test accuracy at keep_macs 0.5 / 0.33):
digits ResNet synthetic 0.87 / 0.67, inverted 0.989 / 0.987, real 0.989 / 0.980; MNIST-1D CNN
synthetic 0.88 / 0.72, inverted 0.976 / 0.967, real 0.975 / 0.969. Accuracy saturates from
25-50 steps; 200 is the default.
"""
from __future__ import annotations

import time

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from spa.errors import SpaError
from spa.graph import as_model, constant_node_value
from spa.progress import bar

__all__ = ["bn_inversion", "bn_match_error", "bn_nodes"]

NO_BN = ("bn-inversion needs BatchNormalization statistics; eval exports fold BN into Conv: "
         "export with BN kept, or use synthetic")


def bn_nodes(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(input name, running mean, running variance, epsilon) of every top-level
    BatchNormalization node whose statistics are constants."""
    values = {t.name: t for t in model.graph.initializer}
    consts = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = constant_node_value(node)
            if value is not None:
                consts[node.output[0]] = value

    def const(name):
        if name in values:
            return numpy_helper.to_array(values[name])
        return consts.get(name)

    found = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) < 5:
            continue
        mean, var = const(node.input[3]), const(node.input[4])
        if mean is None or var is None:
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        found.append((node.input[0], np.asarray(mean, np.float64).reshape(-1),
                      np.asarray(var, np.float64).reshape(-1), float(eps)))
    return found


class _Matcher:
    """The model as a torch module that also returns every BN node's input, and the targets."""

    def __init__(self, model: onnx.ModelProto):
        from .torch_onnx import from_onnx

        model = as_model(model)
        nodes = bn_nodes(model)
        if not nodes:
            raise SpaError(NO_BN)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        outputs = [o.name for o in copy.graph.output]
        self.names = list(dict.fromkeys(n for n, *_ in nodes))
        copy.graph.output.extend(helper.ValueInfoProto(name=n) for n in self.names if n not in outputs)
        self.module = from_onnx(copy, verify=False, train=False)
        self.module.eval()  # BN with running statistics, no dropout, no running-stat updates
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.dtype = self.module.float_dtype()
        all_outputs = [o.name for o in copy.graph.output]
        self.slots = [all_outputs.index(n) for n, *_ in nodes]
        self.targets = [(torch.tensor(m, dtype=self.dtype),
                         torch.tensor(np.sqrt(np.maximum(v, 0) + e), dtype=self.dtype), e)
                        for _, m, v, e in nodes]

    def bn_inputs(self, feeds: dict) -> list[torch.Tensor]:
        args = [feeds[n] for n in self.module.input_names]
        out = self.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return [out[s] for s in self.slots]

    def layer_errors(self, feeds: dict) -> list[torch.Tensor]:
        """Per BN node: ||mean_b - running_mean|| + ||std_b - running_std||."""
        errors = []
        for x, (mean, std, eps) in zip(self.bn_inputs(feeds), self.targets):
            if x.dim() < 2:
                raise SpaError(f"BatchNormalization input of rank {x.dim()}: no channel axis")
            dims = [d for d in range(x.dim()) if d != 1]
            var_b, mean_b = torch.var_mean(x.to(self.dtype), dim=dims, correction=0)
            std_b = torch.sqrt(var_b + eps)
            errors.append(torch.linalg.vector_norm(mean_b - mean) + torch.linalg.vector_norm(std_b - std))
        return errors


def _torch_feeds(matcher: _Matcher, feed: dict, grad: bool) -> tuple[dict, list[str]]:
    out, floats = {}, []
    for name in matcher.module.input_names:
        if name not in feed:
            raise SpaError(f"bn-inversion: feeds lack the model input '{name}'")
        value = np.asarray(feed[name])
        if np.issubdtype(value.dtype, np.floating):
            tensor = torch.tensor(value, dtype=matcher.dtype, requires_grad=grad)
            floats.append(name)
        else:
            tensor = torch.from_numpy(np.array(value, copy=True))
        out[name] = tensor
    return out, floats


def _priors(x: torch.Tensor, tv: float, l2: float) -> torch.Tensor:
    loss = x.new_zeros(())
    if tv and x.dim() > 2:
        for d in range(2, x.dim()):
            if x.shape[d] > 1:
                loss = loss + tv * (x.narrow(d, 1, x.shape[d] - 1) - x.narrow(d, 0, x.shape[d] - 1)).abs().mean()
    if l2:
        loss = loss + l2 * x.pow(2).mean()
    return loss


def bn_match_error(model: onnx.ModelProto, feeds: list[dict]) -> list[float]:
    """Per BN node (graph order), ||mean_b - running_mean||_2 + ||std_b - running_std||_2 over
    the channel axis, averaged over the batches: how far the inputs are from what the model saw
    in training. Raises SpaError for a model without BatchNormalization statistics."""
    matcher = _Matcher(model)
    total = np.zeros(len(matcher.targets))
    with torch.no_grad():
        for feed in feeds:
            tensors, _ = _torch_feeds(matcher, feed, grad=False)
            total += [float(e) for e in matcher.layer_errors(tensors)]
    return list(total / max(len(feeds), 1))


def bn_inversion(model: onnx.ModelProto, feeds: list[dict], steps: int = 200, lr: float = 0.1,
                 seed: int = 0, progress=None, *, tv: float = 0.0, l2: float = 0.0) -> list[dict]:
    """Optimise the float inputs of ``feeds`` (e.g. ``calibration_batches(model, "synthetic",
    ...)``) with Adam for ``steps`` steps so that every BatchNormalization node's batch statistics
    match its running statistics. Returns new batches of the same shapes and dtypes; integer
    inputs are unchanged. ``tv``/``l2``: weights of a total-variation / L2 prior on the inputs.
    ``progress(message)`` gets a start and an end line. Raises SpaError (one line) for a model
    without BatchNormalization statistics or without float inputs."""
    if steps < 0 or not lr > 0:
        raise SpaError(f"bn-inversion: steps must be >= 0 and lr > 0, got {steps}, {lr}")
    report = progress or (lambda message: None)
    matcher = _Matcher(model)
    batches, variables = [], []
    for feed in feeds:
        tensors, floats = _torch_feeds(matcher, feed, grad=True)
        batches.append((tensors, floats))
        variables += [tensors[n] for n in floats]
    if feeds and not variables:
        raise SpaError("bn-inversion: the model has no float input to optimise")
    if not feeds:
        return []

    def loss_of(tensors, floats):
        loss = torch.stack(matcher.layer_errors(tensors)).sum()
        for n in floats:
            loss = loss + _priors(tensors[n], tv, l2)
        return loss

    with torch.no_grad():
        start = sum(float(torch.stack(matcher.layer_errors(t)).sum()) for t, _ in batches) / len(batches)
    samples = sum(len(next(iter(f.values()))) for f in feeds)
    report(f"bn-inversion: matching {len(matcher.targets)} BatchNorm layers, {samples} samples in "
           f"{len(feeds)} batches, {steps} Adam steps (lr {lr:g})")
    began = time.perf_counter()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        optimizer = torch.optim.Adam(variables, lr=lr)
        steps_bar = bar(range(steps), "bn-inversion")
        for _ in steps_bar:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for tensors, floats in batches:
                loss = loss_of(tensors, floats)
                if loss.requires_grad:  # no BN input depends on a float input: nothing to move
                    loss.backward()
                total += loss.item()
            optimizer.step()
            steps_bar.set_postfix(loss=f"{total / len(batches):.4g}", refresh=False)
        steps_bar.close()
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        end = sum(float(torch.stack(matcher.layer_errors(t)).sum()) for t, _ in batches) / len(batches)
    report(f"bn-inversion: BN statistics error {start:.4g} -> {end:.4g} per batch "
           f"({time.perf_counter() - began:.1f} s)")
    result = []
    for feed, (tensors, floats) in zip(feeds, batches):
        out = {}
        for name, value in feed.items():
            if name in floats:
                value = np.ascontiguousarray(tensors[name].detach().cpu().numpy().astype(np.asarray(value).dtype))
            else:
                value = np.array(value, copy=True)
            out[name] = value
        result.append(out)
    return result
