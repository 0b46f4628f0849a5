"""OBSPA: Optimal Brain Surgeon pruning of coupled channel groups, data-free, on the ONNX graph.

Removing channel c of a group is the same as zeroing input slice c of every consumer that
contracts it (a Conv's in-channel, a Gemm/MatMul's K row, an output projection's head columns).
So per consumer *layer* with a constant weight W (d_out x d_in) and inputs X:

1. calibration inputs (spa.calibration) run through the model in onnxruntime; every layer's
   input is read as an extra graph output and H = 2 X X^T / N is summed batch by batch (Conv
   inputs unfolded by im2col, grouped Conv: one H per group block, MatMul inputs [..., K] as rows);
2. a channel's saliency is the OBS loss increase of removing its columns Q from the layer,
   1/2 tr(W_Q (Hinv_QQ)^-1 W_Q^T), summed over the consumers of its group (no producer term: a
   producer's rows are independent, removing them costs only what its consumers lose);
3. the ordinary selector (any Target) picks the channels to remove from these scores;
4. every consumer that loses columns is compensated with the exact least-squares update
   dW = -W_Q (Hinv_QQ)^-1 Hinv_Q:, front to back: layers are processed in levels (a layer's level
   is the number of compensated layers on its longest input path), and the inputs of each level
   are re-computed by one onnxruntime pass over the model with the removed slices masked and the
   earlier levels' weights already compensated;
5. the graph is rewritten with the compensated weights.

compensation="reference" instead fits each compensated layer to the *original* model's outputs
of that layer from the inputs it now sees (`obs.refit`), which also undoes drift from earlier
levels; it wins with enough calibration samples (tiny ResNet-18, 512 samples: relative output
error 0.40 vs 0.49) but overfits layers with few rows per column (the classifier after global
pooling: 64 samples gave 0.95 vs 0.54), so plain OBS is the default.

Where a consumer has a bias (Conv/Gemm input C, or a MatMul followed by an Add of a constant
vector), the bias is one more always-on input column: saliency and compensation then include the
best bias correction for the removed channels' mean. Consumers whose weight is shared with other
nodes are scored but not compensated; layers wider than `max_columns` use the diagonal of H
(no compensation). A compensation that is not finite is dropped for that layer (with a message).
Consumers OBS does not model (ConvTranspose, LSTM/GRU weights, batched MatMul weights, weights
computed from constants) add nothing; a group read by none of the modelled layers is scored by
the l2 norm of its weights. Conv inputs add at most max(4096, 8 d_in) random rows (output
positions) per batch to H. `aggregation` does not apply: saliencies of consumers add up; the
group's sums are then normalised (`normalization`, "mean" by default) for global ranking.
With calibration "none" H = I: the score is the squared norm of the consumer columns and nothing
is compensated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import obs
from .calibration import calibration_batches
from .errors import SpaError
from .graph import attr
from .groups import Analysis, Options, analyze
from .importance import NORMALIZATIONS, normalize, score
from .plan import Plan
from .rewrite import rewrite
from .runtime import session
from .selection import Target, select
from .verify import masked_original

MAX_COLUMNS = 8192
COMPENSATIONS = ("reference", "obs", "none")
ROWS_PER_BATCH, ROWS_PER_COLUMN = 4096, 8  # most rows one batch adds to a layer's H: the larger  # wider layers: diagonal Hessian (an 8192^2 float64 H is 512 MB)


@dataclass
class Layer:
    """A consumer with a constant weight that contracts a group's channels."""

    node: int
    weight: str
    in_axis: int  # the weight's contracted axis
    activation: str
    kind: str  # "conv", "dense" (W = weight rows x K) or "dense_t" (W = weight transposed)
    blocks: int = 1
    kernel: tuple = ()
    conv: dict = field(default_factory=dict)
    bias: str | None = None
    scale: float = 1.0  # Gemm alpha
    bias_scale: float = 1.0  # Gemm beta
    rows_from_left: bool = False  # MatMul weight on the left: activation [..., K, N]
    compensable: bool = True

    @property
    def per_index(self) -> int:
        return int(np.prod(self.kernel)) if self.kernel else 1

    def key(self):
        """Layers reading the same tensor the same way share one Hessian."""
        conv = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(self.conv.items()))
        return (self.activation, self.kind == "conv", self.blocks, self.kernel, conv, self.rows_from_left,
                self.bias is not None)

    # weights as per-block matrices -----------------------------------------------------------
    def matrices(self, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """(blocks, d_out per block, d_in per block [+1 bias column])."""
        w = np.asarray(w, dtype=np.float64)
        if self.kind == "conv":
            mats = w.reshape(self.blocks, w.shape[0] // self.blocks, -1)
        elif self.kind == "dense_t":
            mats = w.T[None]
        else:
            mats = w[None]
        mats = mats * self.scale
        if self.bias is None:
            return mats
        column = np.asarray(b, dtype=np.float64).reshape(self.blocks, -1, 1) * self.bias_scale
        return np.concatenate([mats, column], axis=2)

    def from_matrices(self, mats: np.ndarray, w_shape, w_dtype, b_shape, b_dtype):
        if self.bias is not None:
            bias = (mats[:, :, -1].reshape(b_shape) / self.bias_scale).astype(b_dtype)
            mats = mats[:, :, :-1]
        else:
            bias = None
        mats = mats / self.scale
        if self.kind == "conv":
            w = mats.reshape(w_shape)
        elif self.kind == "dense_t":
            w = mats[0].T
        else:
            w = mats[0]
        return np.ascontiguousarray(w.astype(w_dtype)), bias

    def columns(self, index) -> np.ndarray:
        """Columns (within a block) of the weight's contracted indices."""
        index = np.asarray(index, dtype=np.int64)
        return (index[:, None] * self.per_index + np.arange(self.per_index)).reshape(-1)

    # inputs as rows ------------------------------------------------------------------------------
    def rows(self, x: np.ndarray):
        """One (n, d_in per block [+1]) array per block."""
        x = np.asarray(x)
        if self.kind == "conv":
            flat = obs.unfold(x, self.kernel, **self.conv)
        elif self.rows_from_left:
            flat = np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
        elif self.conv.get("trans_a"):
            flat = x.T
        else:
            flat = x.reshape(-1, x.shape[-1])
        parts = np.split(flat, self.blocks, axis=1)
        if self.bias is not None:
            ones = np.ones((len(flat), 1), dtype=flat.dtype)
            parts = [np.concatenate([p, ones], axis=1) for p in parts]
        return parts


# ---------------------------------------------------------------------------------------------
# finding layers
# ---------------------------------------------------------------------------------------------
def find_layers(analysis: Analysis) -> list:
    g = analysis.graph
    layers = []
    for node_index, slot, axis in analysis.contracted:
        node = g.nodes[node_index]
        weight = node.input[slot]
        if weight not in g.consts or (weight, axis) not in analysis.members:
            continue  # activation x activation (attention) or a computed weight
        layer = _layer(g, node_index, node, slot, axis, weight)
        if layer is not None:
            layer.compensable = len(g.consumers.get(weight, [])) == 1 and layer.compensable
            layers.append(layer)
    return layers


def _layer(g, index, node, slot, axis, weight):
    shape = g.consts.shape(weight)
    if node.op_type == "Conv":
        groups = attr(node, "group", 1)
        kernel = tuple(shape[2:])
        conv = {"strides": attr(node, "strides"), "pads": attr(node, "pads"),
                "dilations": attr(node, "dilations"), "auto_pad": attr(node, "auto_pad", "NOTSET")}
        layer = Layer(index, weight, 1, node.input[0], "conv", groups, kernel, conv)
        return _with_bias(g, layer, node.input[2] if len(node.input) > 2 else "", shape[0])
    if len(shape) != 2:
        return None
    if node.op_type == "Gemm":
        trans_b = attr(node, "transB", 0)
        layer = Layer(index, weight, axis, node.input[0], "dense" if trans_b else "dense_t",
                      conv={"trans_a": attr(node, "transA", 0)}, scale=attr(node, "alpha", 1.0),
                      bias_scale=attr(node, "beta", 1.0) or 1.0)
        n_out = shape[0] if trans_b else shape[1]
        return _with_bias(g, layer, node.input[2] if len(node.input) > 2 else "", n_out)
    if node.op_type == "MatMul" and slot == 1:
        layer = Layer(index, weight, 0, node.input[0], "dense_t")
        return _with_bias(g, layer, _added_bias(g, node), shape[1])
    if node.op_type == "MatMul" and slot == 0:
        return Layer(index, weight, 1, node.input[1], "dense", rows_from_left=True)
    return None


def _added_bias(g, node) -> str:
    """A MatMul whose only reader is an Add of a constant vector: that vector is its bias."""
    readers = g.consumers.get(node.output[0], [])
    if len(readers) != 1:
        return ""
    add = g.nodes[readers[0][0]]
    if add.op_type != "Add":
        return ""
    other = add.input[1 - readers[0][1]]
    return other if other in g.consts else ""


def _with_bias(g, layer, bias, n_out):
    if bias and bias in g.consts and len(g.consumers.get(bias, [])) == 1:
        shape = g.consts.shape(bias)
        if int(np.prod(shape)) == n_out and all(d == 1 for d in shape[:-1]):
            layer.bias = bias
    return layer


# ---------------------------------------------------------------------------------------------
# Hessians from onnxruntime runs
# ---------------------------------------------------------------------------------------------
class Hessians:
    """H per layer key (block-stacked), or only its diagonal for layers wider than max_columns;
    with reference inputs also the cross term 2 X X_ref^T / N."""

    def __init__(self, max_columns=MAX_COLUMNS, seed=0):
        self.max_columns = max_columns
        self.full: dict = {}
        self.diag: dict = {}
        self.cross: dict = {}
        self.rng = np.random.default_rng(seed)

    def add(self, layer: Layer, x, x_ref=None):
        key = layer.key()
        blocks = layer.rows(x)
        refs = layer.rows(x_ref) if x_ref is not None else None
        # Conv inputs give one row per output position: a random subset of them estimates H as
        # well for a fraction of the O(rows * d_in^2) cost
        cap = max(ROWS_PER_BATCH, ROWS_PER_COLUMN * blocks[0].shape[1])
        if len(blocks[0]) > cap:
            pick = np.sort(self.rng.choice(len(blocks[0]), cap, replace=False))
            blocks = [b[pick] for b in blocks]
            refs = None if refs is None else [r[pick] for r in refs]
        for block, rows in enumerate(blocks):
            if rows.shape[1] > self.max_columns:
                acc = self.diag.setdefault(key, [np.zeros((layer.blocks, rows.shape[1])), 0])
                acc[0][block] += np.square(rows, dtype=np.float64).sum(axis=0)
                acc[1] += len(rows) if block == 0 else 0
                continue
            self.full.setdefault(key, obs.HessianSum(rows.shape[1], layer.blocks)).add(rows, block, count=block == 0)
            if refs is not None:
                cross = self.cross.setdefault(key, obs.HessianSum(rows.shape[1], layer.blocks))
                cross.add(rows, block, count=block == 0, other=refs[block])

    def of(self, layer: Layer):
        """('full', (blocks, d, d)) or ('diag', (blocks, d)) or None when never seen."""
        key = layer.key()
        if key in self.full:
            return "full", self.full[key].matrix
        if key in self.diag:
            total, count = self.diag[key]
            return "diag", 2.0 * total / max(count, 1)
        return None

    def cross_of(self, layer: Layer):
        key = layer.key()
        return self.cross[key].matrix if key in self.cross else None


def prefix(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of the model computing only `names` (its outputs): the nodes they depend on."""
    from .graph import outer_scope_inputs
    producer = {o: k for k, n in enumerate(model.graph.node) for o in n.output if o}
    needed, stack = set(), [producer[n] for n in names if n in producer]
    while stack:
        k = stack.pop()
        if k in needed:
            continue
        needed.add(k)
        node = model.graph.node[k]
        stack.extend(producer[x] for x in set(node.input) | outer_scope_inputs(node) if x in producer)
    part = onnx.ModelProto()
    part.ir_version = model.ir_version
    part.opset_import.extend(model.opset_import)
    part.functions.extend(model.functions)
    graph = part.graph
    graph.node.extend(n for k, n in enumerate(model.graph.node) if k in needed)
    used = {x for n in graph.node for x in set(n.input) | outer_scope_inputs(n)}
    graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    graph.input.extend(model.graph.input)
    graph.output.extend(helper.ValueInfoProto(name=n) for n in names)
    return part


def collect(model: onnx.ModelProto, layers, batches, hessians: Hessians, progress, what: str,
            reference: onnx.ModelProto | None = None):
    """One onnxruntime pass over the calibration batches, feeding every layer's Hessian (and,
    with a reference model, the cross term between the two models' inputs of the layer)."""
    names = list(dict.fromkeys(l.activation for l in layers))
    inputs = {i.name for i in model.graph.input}
    fetched = [n for n in names if n not in inputs]
    runs = [session(prefix(m, fetched), quiet=True) for m in ([model] if reference is None else [model, reference])]
    progress(f"{what}: {sum(len(next(iter(f.values()))) for f in batches)} calibration samples")
    for feeds in batches:
        values = []
        for sess in runs:
            got = dict(zip(fetched, sess.run(fetched, feeds))) if fetched else {}
            got.update({n: feeds[n] for n in names if n in inputs})
            values.append(got)
        seen = set()
        for layer in layers:
            if layer.key() not in seen:
                seen.add(layer.key())
                x_ref = values[1][layer.activation] if reference is not None else None
                hessians.add(layer, values[0][layer.activation], x_ref)


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------
def _index_atoms(analysis, layer):
    return analysis.members[(layer.weight, layer.in_axis)].atoms


def layer_saliency(analysis, layer: Layer, hessian, damp) -> dict:
    """{atom: dL} for removing each channel (all its indices in every block) from this layer."""
    g = analysis.graph
    bias = g.consts[layer.bias] if layer.bias else None
    mats = layer.matrices(g.consts[layer.weight], bias)
    atoms = _index_atoms(analysis, layer)
    unique = np.unique(atoms)
    sets = [layer.columns(np.nonzero(atoms == a)[0]) for a in unique]
    total = np.zeros(len(unique))
    for b in range(layer.blocks):
        if hessian is None:  # calibration "none"
            total += obs.saliency(mats[b], np.eye(mats.shape[2]), sets)
        elif hessian[0] == "diag":
            d = hessian[1][b]
            total += np.array([0.5 * np.sum(mats[b][:, q] ** 2 * d[q]) for q in sets])
        else:
            total += obs.saliency(mats[b], obs.inverse(hessian[1][b], damp), sets)
    return dict(zip(unique.tolist(), total))


def group_scores(analysis, layers, hessians, damp, normalization="mean", calibrated=True) -> dict:
    """{group id: saliency per channel aligned with group.atoms}; groups no layer reads fall
    back to the l2 norm of their weights."""
    by_group: dict = {}
    for layer in layers:
        gid = analysis.atom_group[int(_index_atoms(analysis, layer)[0])]
        by_group.setdefault(gid, []).append(layer)
    fallback = None
    scores = {}
    for group in analysis.groups:
        if not group.has_params:
            continue
        if group.id not in by_group:
            fallback = fallback or score(analysis, "l2", "mean", normalization)
            scores[group.id] = fallback[group.id]
            continue
        total = np.zeros(len(group.atoms))
        for layer in by_group[group.id]:
            hessian = hessians.of(layer) if calibrated else None
            for atom, dl in layer_saliency(analysis, layer, hessian, damp).items():
                total[np.searchsorted(group.atoms, atom)] += dl
        scores[group.id] = normalize(total, normalization)
    return scores


# ---------------------------------------------------------------------------------------------
# compensation
# ---------------------------------------------------------------------------------------------
def levels(analysis, layers) -> dict:
    """node index -> level: how many compensated layers lie on its longest input path."""
    g = analysis.graph
    changed = {l.node for l in layers}
    depth: dict = {}
    level = {}
    for i, node in enumerate(g.nodes):
        d = max((depth.get(x, 0) for x in node.input if x), default=0)
        if i in changed:
            level[i] = d
            d += 1
        for out in node.output:
            depth[out] = d
    return level


def set_weights(model: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """Replace constant values (initializers or Constant nodes) in place."""
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in weights:
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(weights[node.output[0]])))
    return model


def compensate_layer(analysis, plan, layer, hessian, damp, weights, cross=None) -> bool:
    g = analysis.graph
    removed = plan.removed(layer.weight, layer.in_axis)
    w = weights.get(layer.weight, g.consts[layer.weight])
    b = weights.get(layer.bias, g.consts[layer.bias]) if layer.bias else None
    if hessian is None or hessian[0] != "full":
        return False
    mats = layer.matrices(w, b)
    Q = layer.columns(removed)
    new = np.stack([obs.refit(mats[k], hessian[1][k], None if cross is None else cross[k], Q, damp)
                    for k in range(layer.blocks)])
    if not np.all(np.isfinite(new)):
        return False
    w_new, b_new = layer.from_matrices(new, np.shape(w), np.asarray(w).dtype,
                                       None if b is None else np.shape(b), None if b is None else np.asarray(b).dtype)
    if not np.all(np.isfinite(w_new)) or (b_new is not None and not np.all(np.isfinite(b_new))):
        return False
    weights[layer.weight] = w_new
    if layer.bias:
        weights[layer.bias] = b_new
    return True


def compensate(analysis, plan, layers, batches, damp, progress, max_columns=MAX_COLUMNS,
               reference: bool = False, first: Hessians | None = None) -> dict:
    """Compensated weights {name: full-size value}, level by level with re-computed inputs.

    reference: fit each layer to the original model's outputs of that layer (least squares from
    the inputs it now sees to the outputs it gave before pruning), which also corrects the drift
    the earlier levels left; False: plain OBS on the current inputs (drift left as it is).
    first: the original model's Hessians, which level 0 (nothing upstream changed) reuses."""
    todo = [l for l in layers if l.compensable and len(plan.removed(l.weight, l.in_axis))]
    if not todo or not batches:
        return {}
    level_of = levels(analysis, todo)
    weights: dict = {}
    masked = masked_original(plan)
    count = max(level_of.values()) + 1
    for level in range(count):
        current = [l for l in todo if level_of[l.node] == level]
        if not current:
            continue
        if level == 0 and first is not None and all(first.of(l) for l in current):
            hessians = first  # inputs of level 0 are the original ones (and cross = H)
            progress(f"compensating level 1/{count} ({len(current)} layers)")
        else:
            hessians = Hessians(max_columns)
            model = set_weights(_copy(masked), weights)
            collect(model, current, batches, hessians, progress,
                    f"compensating level {level + 1}/{count} ({len(current)} layers)",
                    analysis.model if reference else None)
        for layer in current:
            if not compensate_layer(analysis, plan, layer, hessians.of(layer), damp, weights,
                                    hessians.cross_of(layer) if reference else None):
                progress(f"warning: layer '{analysis.graph.node_name(layer.node)}' left uncompensated")
    return weights


def _copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------
@dataclass
class ObspaResult:
    model: onnx.ModelProto
    plan: Plan
    analysis: Analysis
    weights: dict  # compensated constants (original shapes), before slicing
    scores: dict


def obspa(model: onnx.ModelProto, target: Target, calibration: str = "synthetic", samples: int = 128,
          batch_size: int = 16, damp: float = obs.DEFAULT_DAMP, normalization: str = "mean",
          options: Options | None = None, seed: int = 0, compensation: str = "obs",
          max_columns: int = MAX_COLUMNS, dims: dict | None = None, progress=lambda message: None,
          analysis: Analysis | None = None) -> ObspaResult:
    """Analyze -> calibrate -> Hessians -> group saliencies -> select -> compensate -> rewrite."""
    target.check()
    if normalization not in NORMALIZATIONS:
        raise SpaError(f"unknown normalization '{normalization}' (known: {', '.join(NORMALIZATIONS)})")
    if compensation not in COMPENSATIONS:
        raise SpaError(f"unknown compensation '{compensation}' (known: {', '.join(COMPENSATIONS)})")
    if not 0 <= damp < 1e6:
        raise SpaError(f"damping must be non-negative, got {damp}")
    batches = calibration_batches(model, calibration, samples, batch_size, seed, dims)
    if analysis is None:
        progress("analyzing channel coupling")
        analysis = analyze(model, options)
    layers = _scored_layers(analysis)
    hessians = Hessians(max_columns, seed)
    if batches and layers:
        collect(model, layers, batches, hessians, progress, f"Hessians of {len(layers)} layers")
    progress(f"OBS saliency of {sum(g.prunable for g in analysis.groups)} prunable groups ({calibration})")
    scores = group_scores(analysis, layers, hessians, damp, normalization, calibrated=bool(batches))
    progress("selecting channels")
    plan = select(analysis, scores, target)
    weights = {} if compensation == "none" else \
        compensate(analysis, plan, layers, batches, damp, progress, max_columns, compensation == "reference",
                   first=hessians)
    del hessians
    progress(f"rewriting: removing {len(plan.removed_atoms)} channels")
    return ObspaResult(rewrite(plan, weights=weights), plan, analysis, weights, scores)


def _scored_layers(analysis) -> list:
    """Layers that read channels of groups the selector may prune."""
    allowed = analysis.options.granularity
    wanted = {g.id for g in analysis.groups if g.prunable and g.kind in allowed}
    return [l for l in find_layers(analysis)
            if analysis.atom_group[int(_index_atoms(analysis, l)[0])] in wanted]
