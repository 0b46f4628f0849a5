"""Evaluation: one metric measured on the original model and on pruned ones (`--eval FILE.npz`,
`spa.prune(..., eval=...)`).

Sources:

- an ``.npz`` file (``numpy.savez``): the model's inputs, arrays named after its inputs (a
  single-input model may name its array ``x`` or ``inputs``, or hold just one array besides the
  labels), the first axis the sample axis; and optionally ``labels`` (or ``y``): integer class
  indices. Files written by ``numpy.savez`` (uncompressed) are memory-mapped and read batch by
  batch, so they may be larger than memory; ``savez_compressed`` members are loaded whole.
- a Python callable ``fn(run) -> float``: ``run(feeds)`` runs the model with onnxruntime and
  returns its outputs (a list, in graph order); ``feeds`` is {input name: array}, or a bare array
  for a single-input model. The metric is named after the function (``fn.__name__``); higher or
  lower being better is the caller's to read.

The metric of a file, on the scored output (the first, or the one named by `output`):

- with labels: top-1 accuracy. The class axis is the last, or axis 1 where the labels have the
  output's shape without axis 1 (NCHW segmentation); labels [N] for an output [N, C], labels
  [N, T] for a sequence output [N, T, C] (compared per position). Negative labels (-100) are
  ignored positions. An integer output of the labels' shape holds the predicted classes itself.
- without labels: top-1 agreement with the original model's predictions (the argmax over the
  last axis), named so: the original scores 1 by definition.

Batches of `batch_size` samples (32), or the batch the model's inputs fix (a last partial batch
is padded and the padding's outputs dropped).

Use: ``Baseline(original, source)`` checks the source against the original model and measures
it there (a bad file fails before any pruning); ``baseline.compare(pruned)`` gives
{"metric", "before", "after", "difference", "samples", "source", ...}. Lower level:
``load(source, model)`` -> `Evaluation`, ``evaluate(model_or_path, evaluation, reference=None)``
-> {"metric", "value", "samples"}.

A bad file (missing, not an .npz, arrays that do not match the model's inputs by name, rank,
static size or dtype, labels that are not integers, of the wrong length or shape, or beyond the
output's classes) raises a one-line SpaError.
"""
from __future__ import annotations

import dataclasses
import math
import os
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import SpaError, first_line
from .runtime import batch_names, batch_size, declared_inputs, session

LABEL_KEYS = ("labels", "y")
SINGLE_INPUT_KEYS = ("x", "inputs")
DEFAULT_BATCH = 32
ACCURACY = "accuracy"
AGREEMENT = "top-1 agreement with the original"


def _quiet(message):
    pass


@dataclass
class Evaluation:
    """A metric source checked against a model: the file's inputs and labels, or a callable.

    `inputs`: {input name: array, the first axis the samples} (memory-mapped where the file
    allows); `labels`: class indices or None; `anchored`: the labels are a reference model's own
    predictions (top-1 agreement); `output`: the scored output's name (None: the first);
    `dtypes`: {input name: the numpy dtype the model takes}."""
    source: str
    inputs: dict | None = None
    labels: np.ndarray | None = None
    output: str | None = None
    batch_size: int = DEFAULT_BATCH
    static_batch: int | None = None
    dtypes: dict | None = None
    fn: Callable | None = None
    anchored: bool = False

    @property
    def samples(self) -> int | None:
        return None if self.inputs is None else batch_size(self.inputs)

    @property
    def metric(self) -> str:
        if self.fn is not None:
            name = getattr(self.fn, "__name__", "") or "metric"
            return "metric" if name == "<lambda>" else name
        return AGREEMENT if self.anchored or self.labels is None else ACCURACY

    def anchored_to(self, reference, progress=_quiet) -> "Evaluation":
        """This evaluation with labels: its own, or the `reference` model's top-1 predictions."""
        if self.fn is not None or self.labels is not None:
            return self
        predictions = np.concatenate([_top1(out, None, self)[0] for out in _outputs(reference, self, progress)])
        return dataclasses.replace(self, labels=predictions, anchored=True)


def load(source, model, output: str | None = None, batch_size: int | None = None) -> Evaluation:
    """An Evaluation of `source` (an .npz path, a callable fn(run) -> float, or an Evaluation),
    its inputs checked against `model` (a ModelProto or an .onnx path)."""
    if isinstance(source, Evaluation):
        return source
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise SpaError(f"eval batch size must be a positive integer, got {batch_size!r}")
    if callable(source):
        if output is not None:
            raise SpaError("an eval output name has no effect with an eval function (it runs the model itself)")
        return Evaluation(source=getattr(source, "__qualname__", None) or repr(source), fn=source)
    if not isinstance(source, (str, os.PathLike)):
        raise SpaError(f"eval must be an .npz path or a function fn(run) -> float, got {type(source).__name__}")
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    return _from_file(os.fspath(source), model, output, batch_size or DEFAULT_BATCH)


def evaluate(model_or_path, evaluation: Evaluation, reference=None, progress=_quiet) -> dict:
    """{"metric", "value", "samples"} of `model_or_path` (ModelProto or path); an evaluation
    without labels needs the `reference` model (agreement with its top-1), or anchor it once
    with Evaluation.anchored_to(reference)."""
    if evaluation.fn is not None:
        return {"metric": evaluation.metric, "value": _call(evaluation, model_or_path), "samples": None}
    if evaluation.labels is None:
        if reference is None:
            raise SpaError(f"eval file {evaluation.source} has no labels: give the reference model whose top-1 "
                           "predictions the agreement is measured against")
        evaluation = evaluation.anchored_to(reference, progress)
    correct = counted = 0
    start = 0
    for out in _outputs(model_or_path, evaluation, progress):
        labels = evaluation.labels[start:start + len(out)]
        start += len(out)
        predictions, labels = _top1(out, labels, evaluation)
        kept = labels >= 0
        correct += int(np.count_nonzero((predictions == labels) & kept))
        counted += int(np.count_nonzero(kept))
    result = {"metric": evaluation.metric, "value": correct / counted if counted else float("nan"),
              "samples": evaluation.samples}
    if evaluation.labels.ndim > 1:
        result["positions"] = counted
    return result


class Baseline:
    """The metric on the original model, measured once (checking the source first), and the
    same metric on any pruned model: compare(pruned) -> {"metric", "before", "after",
    "difference", "samples", "source"} (and "positions" for per-position accuracy). Holds no
    reference to the original model."""

    def __init__(self, original, source, output: str | None = None, batch_size: int | None = None,
                 progress=_quiet):
        self.progress = progress or _quiet
        evaluation = load(source, original, output, batch_size)
        self.progress(f"evaluating the original model on {_what(evaluation)}")
        if evaluation.fn is None and evaluation.labels is None:
            self.evaluation = evaluation.anchored_to(original, self.progress)
            self.before = {"metric": AGREEMENT, "value": 1.0, "samples": evaluation.samples}
            if self.evaluation.labels.ndim > 1:
                self.before["positions"] = int(self.evaluation.labels.size)
        else:
            self.evaluation = evaluation
            self.before = evaluate(original, evaluation, progress=self.progress)
        _check_value(self.before["value"], self.evaluation)

    def compare(self, pruned) -> dict:
        self.progress(f"evaluating the pruned model on {_what(self.evaluation)}")
        after = evaluate(pruned, self.evaluation, progress=self.progress)
        _check_value(after["value"], self.evaluation)
        result = {"metric": after["metric"], "before": self.before["value"], "after": after["value"],
                  "difference": after["value"] - self.before["value"], "samples": after["samples"],
                  "source": self.evaluation.source}
        if "positions" in after:
            result["positions"] = after["positions"]
        return result


def shares_data(eval_source, calibration) -> bool:
    """Whether the eval file is also the calibration data (a path, or ood:PATH)."""
    if not isinstance(eval_source, (str, os.PathLike)) or not isinstance(calibration, str):
        return False
    path = calibration[4:] if calibration.startswith("ood:") else calibration
    try:
        return os.path.samefile(os.fspath(eval_source), path)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# what the report shows
# ---------------------------------------------------------------------------------------------
def number(value: float, metric: str) -> str:
    if metric in (ACCURACY, AGREEMENT):
        return f"{value:.3f}"
    return f"{value:.4g}"


def table_row(result: dict) -> tuple:
    """(label, before, after, difference) for spa.report.format_comparison."""
    metric = result["metric"]
    if metric in (ACCURACY, AGREEMENT):
        count = f"{result['samples']} samples" + (f", {result['positions']} positions" if "positions" in result else "")
        label = f"{metric}{' per position' if 'positions' in result else ''} ({count} from {result['source']})"
    else:
        label = f"{metric} (eval function)"
    return (label, number(result["before"], metric), number(result["after"], metric),
            f"{result['difference']:+.3f}" if metric in (ACCURACY, AGREEMENT) else f"{result['difference']:+.4g}")


def summary_text(result: dict) -> str:
    """"accuracy 0.962 -> 0.951" for the one-line summary."""
    metric = result["metric"]
    return f"{metric} {number(result['before'], metric)} -> {number(result['after'], metric)}"


# ---------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------
def _from_file(path: str, model: onnx.ModelProto, output, batch_size) -> Evaluation:
    from .calibration import check_input_array, vocabulary_size
    from .runtime import fixed_batch

    what = f"eval file {path}"
    if not os.path.exists(path):
        raise SpaError(f"{what}: no such file")
    if os.path.isdir(path):
        raise SpaError(f"{what} is a directory; expected an .npz of the model's inputs (numpy.savez)")
    arrays = _open_npz(path, what)
    outputs = [o.name for o in model.graph.output]
    if output is not None and output not in outputs:
        raise SpaError(f"eval output '{output}' is no output of the model (outputs: {', '.join(outputs)})")
    inputs = declared_inputs(model)
    names = [n for n, _, _ in inputs]
    label_key = next((k for k in LABEL_KEYS if k in arrays and k not in names), None)
    data = {k: v for k, v in arrays.items() if k != label_key}
    if not set(names) <= set(data):
        single = [k for k in SINGLE_INPUT_KEYS if k in data] or (list(data) if len(data) == 1 else [])
        if len(names) == 1 and len(single) == 1:
            data = {names[0]: data[single[0]]}
        else:
            missing = sorted(set(names) - set(data))
            held = ", ".join(sorted(arrays)) or "no arrays"
            hint = f" (or {' / '.join(SINGLE_INPUT_KEYS)} for a single-input model)" if len(names) == 1 else ""
            raise SpaError(f"{what} has no array for input {', '.join(missing)}{hint}; it holds {held}")
    data = {n: data[n] for n in names}
    sizes: dict = {}
    batch = batch_names(d for _, d, _ in inputs)
    for name, dims, dtype in inputs:
        a = data[name]
        ids = np.issubdtype(a.dtype, np.integer) and not np.issubdtype(dtype, np.floating) and dtype != np.bool_
        check_input_array(what, name, a, dims, dtype, batch, sizes, scalar_ok=False,
                          samples_hint=" (the first axis is the sample axis)",
                          vocab=vocabulary_size(model, name) if ids else None)
    counts = {name: len(a) for name, a in data.items()}
    if len(set(counts.values())) > 1:
        raise SpaError(f"{what}: inputs have different sample counts "
                       f"({', '.join(f'{n} {c}' for n, c in counts.items())})")
    samples = next(iter(counts.values()))
    labels = None
    if label_key is not None:
        labels = _labels(arrays[label_key], samples, model, output, f"{what}: '{label_key}'")
    return Evaluation(source=path, inputs=data, labels=labels, output=output, batch_size=batch_size,
                      static_batch=fixed_batch(model), dtypes={n: t for n, _, t in inputs})


def _labels(a, samples: int, model, output, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.bool_:
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        hint = " (one-hot? store argmax(axis=-1))" if np.issubdtype(a.dtype, np.floating) and a.ndim > 1 else ""
        raise SpaError(f"{what} must hold integer class indices, got {a.dtype.name}{hint}")
    if a.ndim == 0 or len(a) != samples:
        raise SpaError(f"{what} holds {a.shape[0] if a.ndim else 'no'} labels for {samples} samples")
    a = a.astype(np.int64)
    if a.size and a.max() < 0:
        raise SpaError(f"{what}: every label is negative (ignored); nothing to score")
    out = next((o for o in model.graph.output if o.name == output), None) if output else \
        (model.graph.output[0] if model.graph.output else None)
    dims = out.type.tensor_type.shape.dim if out is not None else []
    if a.ndim == 1 and len(dims) == 2 and dims[1].HasField("dim_value") and a.max() >= dims[1].dim_value:
        raise SpaError(f"{what} holds class {int(a.max())}, but output '{out.name}' has {dims[1].dim_value} classes")
    return a


def _open_npz(path: str, what: str) -> dict:
    """{key: array} of an .npz: stored (numpy.savez) members memory-mapped, compressed ones loaded."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise SpaError(f"{what} is not an .npz archive (write one with numpy.savez)") from None
    arrays = {}
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            try:
                arrays[key] = _mapped(path, info) if info.compress_type == zipfile.ZIP_STORED else None
            except Exception:
                arrays[key] = None
            if arrays[key] is None:
                try:
                    with archive.open(info) as f:
                        arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
                except Exception as exc:
                    raise SpaError(f"{what}: array '{key}' cannot be read ({type(exc).__name__})") from None
    if not arrays:
        raise SpaError(f"{what} holds no arrays")
    return arrays


def _mapped(path: str, info: zipfile.ZipInfo):
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        signature, name_length, extra_length = header[:4], *struct.unpack("<HH", header[26:30])
        if signature != b"PK\x03\x04":
            return None
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError("object arrays are not read")
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def _what(evaluation: Evaluation) -> str:
    if evaluation.fn is not None:
        return f"eval function {evaluation.source}"
    return f"{evaluation.samples} samples from {evaluation.source}"


def _session(model_or_path, what: str):
    try:
        return session(os.fspath(model_or_path) if isinstance(model_or_path, os.PathLike) else model_or_path,
                       quiet=True)
    except Exception as exc:
        raise SpaError(f"{what}: onnxruntime cannot load the model ({first_line(exc, 200)})") from None


def _outputs(model_or_path, evaluation: Evaluation, progress=_quiet):
    """The scored output, batch by batch (padding of a fixed batch dropped)."""
    from . import progress as bars

    sess = _session(model_or_path, f"eval file {evaluation.source}")
    names = [o.name for o in sess.get_outputs()]
    index = names.index(evaluation.output) if evaluation.output in names else 0
    total = evaluation.samples
    step = evaluation.static_batch or evaluation.batch_size
    for start in bars.bar(range(0, total, step), desc="evaluating", total=-(-total // step)):
        feeds, real = {}, min(step, total - start)
        for name, a in evaluation.inputs.items():
            chunk = np.ascontiguousarray(a[start:start + step]).astype(evaluation.dtypes[name], copy=False)
            if evaluation.static_batch and real < step:  # pad a fixed batch with copies of its first sample
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], step - real, axis=0)])
            feeds[name] = chunk
        try:
            out = sess.run([names[index]], feeds)[0]
        except Exception as exc:
            raise SpaError(f"eval file {evaluation.source}: the model cannot run on samples "
                           f"{start}..{start + real - 1} ({first_line(exc, 200)})") from None
        out = np.asarray(out)
        if out.ndim == 0 or len(out) != step and len(out) != real:
            raise SpaError(f"eval output '{names[index]}' has shape {out.shape}, not one row per sample "
                           f"(pass --eval-output NAME)")
        yield out[:real]


def _top1(out: np.ndarray, labels, evaluation: Evaluation):
    """(predictions, labels) of one batch; labels None: the predictions over the last axis."""
    name = evaluation.output or "the first output"
    name = f"'{name}'" if evaluation.output else name
    if np.issubdtype(out.dtype, np.integer) and (labels is None or out.shape == labels.shape):
        return out.astype(np.int64), labels
    if out.ndim < 2:
        raise SpaError(f"eval: {name} has shape {list(out.shape)}: no class axis to take the top-1 of "
                       "(pass --eval-output NAME)")
    axis = out.ndim - 1
    if labels is not None and labels.shape != out.shape[:-1]:
        if out.ndim >= 3 and labels.shape == out.shape[:1] + out.shape[2:]:
            axis = 1
        else:
            shown = _dims([evaluation.samples, *labels.shape[1:]])
            raise SpaError(f"eval file {evaluation.source}: labels of shape {shown} do not fit {name} of shape "
                           f"{_dims(['N', *out.shape[1:]])} (expected {_dims(['N', *out.shape[1:-1]])})")
    if labels is not None and labels.size and labels.max() >= out.shape[axis]:
        raise SpaError(f"eval file {evaluation.source}: labels hold class {int(labels.max())}, but {name} has "
                       f"{out.shape[axis]} classes")
    return out.argmax(axis=axis), labels


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _call(evaluation: Evaluation, model_or_path) -> float:
    sess = _session(model_or_path, f"eval function {evaluation.source}")
    inputs = [i.name for i in sess.get_inputs()]

    def run(feeds):
        if not isinstance(feeds, Mapping):
            if len(inputs) != 1:
                raise SpaError(f"run(array) needs a single-input model; this one takes {', '.join(inputs)}: "
                               "pass {name: array}")
            feeds = {inputs[0]: feeds}
        return sess.run(None, {k: np.asarray(v) for k, v in feeds.items()})

    value = evaluation.fn(run)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SpaError(f"eval function {evaluation.source} returned {value!r}, not a number") from None


def _check_value(value: float, evaluation: Evaluation):
    if evaluation.fn is not None and not math.isfinite(value):
        raise SpaError(f"eval function {evaluation.source} returned {value}, not a finite number")
