"""Gradient-based pruning criteria on any ONNX model, through PyTorch autograd.

    from spa.frontends.torch_criteria import prune, saliency
    result = prune(model, Target(ratio=0.5), criterion="taylor", calibration="data.npz")
    scores = saliency("model.onnx", "grasp", batches=[{"input": x}], labels=y)

The ONNX graph runs as a torch module (``spa.frontends.torch.from_onnx``, BatchNormalization as
each node's ``training_mode`` says, no dropout). :func:`saliency` returns one score per weight
element, {ONNX weight name: float64 array shaped like the weight}; the core lifts them to channel
groups (``spa.importance.score(..., saliency=...)``: sum over each channel's slice of every
member weight, then the usual aggregation and normalisation). Higher = keep, for every criterion.
g = dL/dw is the mean over the calibration batches of each batch's mean-loss gradient.

- ``taylor``: |w * g| (first-order Taylor estimate of the loss change when w is zeroed).
- ``snip``: |w * g| on the first batch only (connection sensitivity, Lee et al. 2019; meant for an
  untrained model).
- ``grasp``: w * (H g), H the Hessian of L (double backward). Wang et al. 2020 score a weight by
  S(-w) = -w * (H g), the change of the gradient norm when it is removed, and remove the largest
  S; we return -S, so higher = keep. The only signed criterion: channel sums keep the sign, and
  the ``mean``/``max`` normalisations divide by the mean/max magnitude.
- ``crop``: |w * (H g)| (gradient-flow preservation, Rachwan et al. 2022 / Lubana & Dick 2021:
  keep the gradient norm unchanged rather than raise it), the absolute value per element, then
  summed per channel like every criterion.
- ``synflow``: data-free (Tanaka et al. 2020). Every weight and BatchNorm statistic replaced by
  its absolute value, BatchNorm on running statistics, one all-ones sample (integer inputs:
  the synthetic ones of spa.calibration), float64 where the graph allows it;
  R = sum of every output, score |w * dR/dw| with w the absolute weights. ``prune(...,
  rounds=k)`` repeats this k times, removing the channels chosen so far (zeroing their slices)
  with the kept fraction growing geometrically to the target (the paper's iterative schedule).
- ``obd``: 0.5 * w^2 * F, F the empirical Fisher diagonal (mean of g^2 over single samples) as the
  diagonal of H (Optimal Brain Damage, LeCun et al. 1990).

The loss L (every criterion but synflow): ``loss(outputs, batch) -> scalar tensor`` when given
(``outputs``: the module's output tensor, or tuple of them; ``batch``: {input name: tensor}, plus
"labels" when known); else cross-entropy of the first output [N, classes] against the labels
(``labels=`` an array or a .npy/.npz/.txt file, or a "labels" array inside the calibration
.npz), aligned with the calibration samples in order; else, for a classifier (first output of
rank 2 with more than one column), cross-entropy against the original model's own predictions
(pseudo-labels); else 0.5 * ||f(x)||^2 summed over the float outputs, mean over the batch.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from spa.calibration import calibration_batches
from spa.errors import SpaError
from spa.runtime import batch_size, sample_count
from spa.graph import as_model
from spa.importance import GRADIENT_CRITERIA

from .torch_onnx import from_onnx

__all__ = ["saliency", "prune", "CRITERIA", "load_labels"]

CRITERIA = GRADIENT_CRITERIA
_DATA_FREE = ("synflow",)


def _quiet(message):
    pass


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def saliency(model_or_path, criterion: str = "taylor", batches: list | None = None,
             calibration: str = "synthetic", loss=None, labels=None, samples: int = 64,
             batch_size: int = 16, seed: int = 0, dtype=None, verify: bool = True,
             progress=_quiet) -> dict:
    """{ONNX weight name: per-element saliency (float64, the weight's shape)}; higher = keep.

    ``batches``: feeds {input name: array} to use instead of ``calibration`` (a spa.calibration
    source: synthetic, bn, ood:..., a .npz/.npy/directory path). ``dtype``: torch dtype of the
    computation (float32; synflow tries float64 first)."""
    if criterion not in CRITERIA:
        raise SpaError(f"unknown gradient criterion '{criterion}' (known: {', '.join(CRITERIA)})")
    model = as_model(model_or_path)
    progress(f"{criterion}: building the torch module")
    module = from_onnx(model, verify=verify)
    module.eval()
    if criterion == "synflow":
        return _synflow(model, module, dtype, progress)
    module.mimic_onnx = True  # BN follows each node's training_mode, no running-stat updates
    if dtype is not None:
        module.to(_torch_dtype(dtype))
    if batches is None:
        batches = calibration_batches(model, calibration, samples, batch_size, seed)
    if labels is None:
        labels = _labels_in_calibration(calibration)
    if not batches:
        raise SpaError(f"criterion {criterion} needs calibration inputs (calibration '{calibration}' gives none)")
    if criterion == "snip":
        batches = batches[:1]
    data = _Data(module, batches, labels, loss)
    params = module.onnx_parameters()
    if criterion in ("taylor", "snip"):
        g = _mean_gradient(data, params, progress)
        return {n: np.abs(_np(params[n] * g[n])) for n in params}
    if criterion == "obd":
        fisher = _fisher_diagonal(data, params, progress)
        return {n: 0.5 * _np(params[n]) ** 2 * _np(fisher[n]) for n in params}
    g = _mean_gradient(data, params, progress)
    hg = _hessian_gradient(data, params, g, progress)
    signed = {n: _np(params[n] * hg[n]) for n in params}
    return signed if criterion == "grasp" else {n: np.abs(s) for n, s in signed.items()}


def prune(model, target, criterion: str = "taylor", aggregation: str = "mean", normalization: str = "mean",
          options=None, seed: int = 0, progress=_quiet, calibration: str = "synthetic", samples: int = 128,
          labels=None, loss=None, batches: list | None = None, batch_size: int = 16, rounds: int = 1,
          dtype=None, verify: bool = True):
    """Score with a gradient criterion, select to ``target`` (spa.selection.Target), rewrite:
    the same :class:`spa.pipeline.Result` as ``spa.pipeline.prune`` (``spa.pipeline.save``
    verifies and writes it). ``rounds`` > 1: iterative scoring (meant for synflow)."""
    from spa.pipeline import prune as core_prune

    model = as_model(model)
    target.check()
    if rounds < 1:
        raise SpaError("rounds must be at least 1")
    kwargs = dict(batches=batches, calibration=calibration, loss=loss, labels=labels, samples=samples,
                  batch_size=batch_size, seed=seed, dtype=dtype, verify=verify, progress=progress)
    if rounds == 1:
        scores = saliency(model, criterion, **kwargs)
    else:
        scores = _iterative(model, target, criterion, rounds, options, aggregation, normalization, kwargs)
    return core_prune(model, target, criterion, aggregation, normalization, options, seed,
                      progress=progress, saliency=scores)


def load_labels(labels) -> np.ndarray:
    """Class labels from an array or a .npy / .npz ("labels" or its only array) / .txt / .csv file."""
    if isinstance(labels, (str, os.PathLike)):
        labels = _read_labels(str(labels))
    array = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer) \
            and not (np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array))):
        raise SpaError(f"labels must be a non-empty 1-D array of class indices, got {array.dtype} {array.shape}")
    if array.min() < 0:
        raise SpaError("labels must be non-negative class indices")
    return array.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# inputs, labels, loss
# ----------------------------------------------------------------------------------------------
def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "float64": torch.float64}[str(dtype)]
    except KeyError:
        raise SpaError(f"dtype must be float32 or float64, got {dtype}") from None


def _read_labels(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise SpaError(f"labels file {path}: no such file")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                if "labels" in archive.files:
                    return archive["labels"]
                if len(archive.files) == 1:
                    return archive[archive.files[0]]
            raise SpaError(f"labels file {path} has no 'labels' array")
        if path.endswith((".txt", ".csv")):
            return np.loadtxt(path, delimiter="," if path.endswith(".csv") else None, ndmin=1)
        return np.load(path, allow_pickle=False)
    except SpaError:
        raise
    except Exception as exc:
        raise SpaError(f"labels file {path} cannot be read ({type(exc).__name__})") from None


def _labels_in_calibration(source) -> np.ndarray | None:
    if not isinstance(source, str) or not source.endswith(".npz") or not os.path.isfile(source):
        return None
    with np.load(source, allow_pickle=False) as archive:
        return load_labels(archive["labels"]) if "labels" in archive.files else None


class _Data:
    """Calibration batches as torch tensors, with labels (given or pseudo) and the loss."""

    def __init__(self, module, batches, labels, loss):
        self.module = module
        self.dtype = module.float_dtype()
        self.batches = [self._tensors(b) for b in batches]
        self.user_loss = loss
        if labels is not None:
            self._attach(load_labels(labels))
        elif loss is None and self._is_classifier():
            with torch.no_grad():
                for b in self.batches:
                    b["labels"] = _first(self.forward(b)).argmax(dim=1)

    def _tensors(self, feeds: dict) -> dict:
        missing = [n for n in self.module.input_names if n not in feeds]
        if missing:
            raise SpaError(f"calibration batch has no input {', '.join(missing)}")
        out = {}
        for name in self.module.input_names:
            t = torch.from_numpy(np.array(feeds[name]))
            out[name] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def _attach(self, labels: np.ndarray):
        total = sample_count(self.batches)
        if len(labels) < total:
            raise SpaError(f"{len(labels)} labels for {total} calibration samples")
        start = 0
        for b in self.batches:
            n = batch_size(b)
            b["labels"] = torch.from_numpy(labels[start:start + n])
            start += n
        with torch.no_grad():
            classes = _first(self.forward(self.batches[0])).shape
        if len(classes) != 2 or labels[:total].max() >= classes[1]:
            raise SpaError(f"labels need a first output [N, classes] with every label below the class "
                           f"count; the first output has shape {tuple(classes)}")

    def _is_classifier(self) -> bool:
        with torch.no_grad():
            out = _first(self.forward(self.batches[0]))
        return out.is_floating_point() and out.ndim == 2 and out.shape[1] > 1

    def forward(self, batch):
        return self.module(*(batch[n] for n in self.module.input_names))

    def loss(self, batch):
        outputs = self.forward(batch)
        if self.user_loss is not None:
            value = self.user_loss(outputs, batch)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise SpaError("loss(outputs, batch) must return a scalar tensor")
            return value.reshape(())
        if "labels" in batch:
            return F.cross_entropy(_first(outputs), batch["labels"])
        floats = [o for o in _all(outputs) if o.is_floating_point()]
        return sum(0.5 * (o ** 2).sum() / len(o) for o in floats)

    def samples(self):
        """Every sample as a batch of one (for the empirical Fisher)."""
        for b in self.batches:
            for k in range(batch_size(b)):
                yield {n: t[k:k + 1] for n, t in b.items()}


def _first(outputs):
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def _all(outputs):
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _np(tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float64).numpy()


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
def _grad(value, params: dict, create_graph=False) -> dict:
    names = list(params)
    grads = torch.autograd.grad(value, [params[n] for n in names], allow_unused=True, create_graph=create_graph)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}


def _mean_gradient(data: _Data, params: dict, progress) -> dict:
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for k, batch in enumerate(data.batches):
        progress(f"gradient: batch {k + 1}/{len(data.batches)}")
        for n, g in _grad(data.loss(batch), params).items():
            total[n] += g
    return {n: t / len(data.batches) for n, t in total.items()}


def _fisher_diagonal(data: _Data, params: dict, progress) -> dict:
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for count, sample in enumerate(data.samples(), 1):
        if count % 16 == 1:
            progress(f"empirical Fisher: sample {count}")
        for n, g in _grad(data.loss(sample), params).items():
            total[n] += g.detach() ** 2
    return {n: t / max(count, 1) for n, t in total.items()}


def _hessian_gradient(data: _Data, params: dict, g: dict, progress) -> dict:
    """H g with g held fixed: the gradient of g . dL/dw, batch by batch (double backward)."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for k, batch in enumerate(data.batches):
        progress(f"Hessian-gradient product: batch {k + 1}/{len(data.batches)}")
        grads = _grad(data.loss(batch), params, create_graph=True)
        dot = sum((grads[n] * g[n].detach()).sum() for n in params if grads[n].requires_grad)
        if not isinstance(dot, torch.Tensor):
            continue  # the loss is linear in every weight: H g = 0
        for n, hg in _grad(dot, params).items():
            total[n] += hg.detach()
    return {n: t / len(data.batches) for n, t in total.items()}


# ----------------------------------------------------------------------------------------------
# SynFlow
# ----------------------------------------------------------------------------------------------
def _synflow(model, module, dtype, progress) -> dict:
    for attempt in ([_torch_dtype(dtype)] if dtype is not None else [torch.float64, torch.float32]):
        try:
            return _synflow_in(model, module, attempt, progress)
        except SpaError as exc:
            if attempt == torch.float32 or dtype is not None:
                raise
            progress(f"synflow: float64 failed ({exc}); retrying in float32")


def _synflow_in(model, module, dtype, progress) -> dict:
    progress(f"synflow: all-ones input, absolute weights ({str(dtype).replace('torch.', '')})")
    linear = copy.deepcopy(module).to(dtype)
    linear.mimic_onnx = False  # eval BatchNorm on running statistics, as the paper does
    linear.eval()
    with torch.no_grad():
        for tensor in list(linear.parameters()) + list(linear.buffers()):
            if tensor.is_floating_point():
                tensor.abs_()
    feeds = calibration_batches(model, "synthetic", samples=1, batch_size=1)[0]
    inputs = []
    for name in linear.input_names:
        t = torch.from_numpy(np.array(feeds[name]))
        inputs.append(torch.ones_like(t, dtype=dtype) if t.is_floating_point() else t)
    outputs = _all(linear(*inputs))
    flow = sum(o.sum() for o in outputs if o.is_floating_point())
    params = linear.onnx_parameters()
    grads = _grad(flow, params)
    return {n: np.abs(_np(params[n] * grads[n])) for n in params}


# ----------------------------------------------------------------------------------------------
# iterative pruning (SynFlow's schedule)
# ----------------------------------------------------------------------------------------------
def _iterative(model, target, criterion, rounds, options, aggregation, normalization, kwargs) -> dict:
    """Score, remove (zero) the channels a geometric fraction of the target would remove, score
    again; the last round's saliencies (removed channels at zero) go to the final selection."""
    from spa.groups import analyze
    from spa.importance import score
    from spa.selection import select

    analysis = analyze(model, options)
    current = model
    for r in range(1, rounds):
        kwargs["progress"](f"round {r}/{rounds}")
        scores = score(analysis, criterion, aggregation, normalization, saliency=saliency(current, criterion, **kwargs))
        plan = select(analysis, scores, _partial_target(target, r / rounds))
        current = _zeroed(model, analysis, set(int(a) for a in plan.removed_atoms))
    kwargs["progress"](f"round {rounds}/{rounds}")
    return saliency(current, criterion, **kwargs)


def _partial_target(target, fraction: float):
    partial = copy.copy(target)
    if target.ratio is not None:
        partial.ratio = 1 - (1 - target.ratio) ** fraction
    elif target.keep_params is not None:
        partial.keep_params = target.keep_params ** fraction
    else:
        partial.keep_macs = target.keep_macs ** fraction
    return partial


def _zeroed(model, analysis, removed: set) -> onnx.ModelProto:
    """A copy of ``model`` whose constant weights are zero on every removed channel's slices."""
    from onnx import numpy_helper

    statistics = {n.input[k] for n in model.graph.node if n.op_type == "BatchNormalization"
                  for k in (3, 4) if len(n.input) > k}
    zeroed = {}
    for group in analysis.groups:
        for m in group.members:
            if not m.is_const or m.atoms is None or m.tensor in statistics:
                continue
            hit = np.flatnonzero(np.isin(m.atoms, list(removed)))
            if hit.size == 0:
                continue
            w = zeroed.get(m.tensor)
            if w is None:
                w = np.array(analysis.graph.consts[m.tensor], copy=True)
            index = [slice(None)] * w.ndim
            index[m.axis] = hit
            w[tuple(index)] = 0
            zeroed[m.tensor] = w
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in zeroed:
            t.CopyFrom(numpy_helper.from_array(zeroed[t.name].astype(numpy_helper.to_array(t).dtype), t.name))
    return out
