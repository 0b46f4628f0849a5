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
from .errors import CalibrationRunError, SpaError
from .runtime import feed_shapes, named_mask, sample_count
from .activations import StagedRun, fetch
from .progress import bar
from .groups import Analysis, Options
from .importance import NORMALIZATIONS, normalize, score
from .plan import Plan
from .rewrite import fill_to_constant
from .layers import Layer, find_layers
from .quant import as_float, is_integer_weight, layer_value, requantized, weight_grid
from .selection import Target
from .verify import masked_integer_copies, masked_original

MAX_COLUMNS = 8192  # wider layers: diagonal Hessian (an 8192^2 float64 H is 512 MB)
COMPENSATIONS = ("reference", "obs", "scale", "none")
MIN_ROWS, ROWS_PER_COLUMN = 4096, 8  # input rows a layer's H sees: the larger of the two


# ---------------------------------------------------------------------------------------------
# Hessians from onnxruntime runs
# ---------------------------------------------------------------------------------------------
class Hessians:
    """H per layer key (block-stacked), or only its diagonal for layers wider than max_columns;
    with reference inputs also the cross term 2 X X_ref^T / N.

    Each layer sees at most max(MIN_ROWS, ROWS_PER_COLUMN * d_in) input rows over all batches
    (a Conv gives one row per output position: a random subset estimates H as well for a
    fraction of the O(rows * d_in^2) cost); the subset is drawn before a Conv input is unfolded."""

    def __init__(self, batches: int, max_columns=MAX_COLUMNS, seed=0, keep_rows=False):
        """keep_rows: while a layer has seen fewer rows than columns, keep the rows themselves
        (float32) instead of H: what judges a weight update (`held_error`) then costs rows x
        columns per output instead of columns^2 (ResNet-50's last 3x3 convs: 784 held-out rows,
        4609 columns)."""
        self.batches = max(1, batches)
        self.max_columns = max_columns
        self.full: dict = {}
        self.diag: dict = {}
        self.cross: dict = {}
        self.rows: dict = {}  # key -> [[row arrays] per block, count]
        self.keep_rows = keep_rows
        self.rng = np.random.default_rng(seed)
        self.factors: dict = {}  # key -> `judge_of`'s factors of H per block (None: not positive definite)

    def add(self, layer: Layer, x, x_ref=None, tokens=None):
        """tokens: the batch's [batch, sequence] attention mask, if the model has one: rows of
        padding positions (mask 0) are left out (their activations are never used)."""
        key = layer.key()
        self.factors.pop(key, None)
        valid = layer.valid_rows(x, tokens)
        available = layer.row_count(x) if valid is None else np.flatnonzero(valid)
        count = available if valid is None else len(available)
        budget = -(-max(MIN_ROWS, ROWS_PER_COLUMN * layer.width(x)) // self.batches)
        pick = np.sort(self.rng.choice(available, budget, replace=False)) if count > budget else \
            (None if valid is None else available)
        blocks = layer.rows(x, pick)
        refs = layer.rows(x_ref, pick) if x_ref is not None else None
        for block, rows in enumerate(blocks):
            if rows.shape[1] > self.max_columns:
                acc = self.diag.setdefault(key, [np.zeros((layer.blocks, rows.shape[1])), 0])
                acc[0][block] += np.square(rows, dtype=np.float64).sum(axis=0)
                acc[1] += len(rows) if block == 0 else 0
                continue
            if self.keep_rows and refs is None and key not in self.full:
                self._keep(key, rows, block, layer.blocks)
                continue
            self.full.setdefault(key, obs.HessianSum(rows.shape[1], layer.blocks)).add(rows, block, count=block == 0)
            if refs is not None:
                cross = self.cross.setdefault(key, obs.HessianSum(rows.shape[1], layer.blocks))
                cross.add(rows, block, count=block == 0, other=refs[block])

    def _keep(self, key, rows, block: int, blocks: int) -> None:
        kept = self.rows.setdefault(key, [[[] for _ in range(blocks)], 0])
        kept[0][block].append(np.asarray(rows, dtype=np.float32))
        kept[1] += len(rows) if block == 0 else 0
        if kept[1] > rows.shape[1]:  # as many rows as columns: H is the smaller form now
            self.full[key] = _summed(kept[0])
            del self.rows[key]

    def of(self, layer: Layer):
        """('full', (blocks, d, d)), ('rows', ([(n, d)] per block, n)) or ('diag', (blocks, d)),
        or None when never seen."""
        key = layer.key()
        if key in self.rows:
            parts, count = self.rows[key]
            return "rows", ([np.concatenate(p) for p in parts], count)
        if key in self.full:
            return "full", self.full[key].matrix
        if key in self.diag:
            total, count = self.diag[key]
            return "diag", 2.0 * total / max(count, 1)
        return None

    def finite(self, layer: Layer) -> bool:
        """Whether the layer's H (or kept rows) holds no inf or NaN: a model whose activations
        overflow on the calibration inputs gives neither saliencies nor updates."""
        held = self.of(layer)
        if held is None:
            return True
        if held[0] == "rows":
            return all(np.isfinite(rows).all() for rows in held[1][0])
        return bool(np.isfinite(held[1]).all())

    def judge_of(self, layer: Layer):
        """`of`, for `held_error` to judge many weight updates of the layer by: a full H comes as
        ('factored', (H, [lower L with H = L L^T per block, or None where H is not positive definite])),
        the factor computed once (a judgement then multiplies by a triangle: MiniLM's 1536-column
        layers 18.4 -> 11.4 ms, docs/obspa.md)."""
        held = self.of(layer)
        if held is None or held[0] != "full":
            return held
        if layer.key() not in self.factors:
            self.factors[layer.key()] = [obs.lower_factor(h) for h in held[1]]
        return "factored", (held[1], self.factors[layer.key()])

    def cross_of(self, layer: Layer):
        key = layer.key()
        return self.cross[key].matrix if key in self.cross else None

    def count(self, layer: Layer) -> int:
        """How many input rows the layer's H (or kept rows) summed."""
        key = layer.key()
        if key in self.rows:
            return self.rows[key][1]
        return self.full[key].count if key in self.full else 0

    def pooled(self, other: "Hessians", layer: Layer):
        """('full', H) of this object's rows and `other`'s together (each H weighted by its row
        count), or None where either has no full H or kept rows for the layer."""
        mine, theirs = self.of(layer), other.of(layer)
        if mine is None or theirs is None or mine[0] != "full" or theirs[0] not in ("full", "rows"):
            return None
        n, m = self.count(layer), other.count(layer)
        if theirs[0] == "rows":
            theirs = "full", _summed([[rows] for rows in theirs[1][0]]).matrix
        return "full", (n * mine[1] + m * theirs[1].astype(mine[1].dtype)) / max(n + m, 1)


def _summed(parts: list) -> obs.HessianSum:
    """The HessianSum of kept rows: [row arrays] per block."""
    total = obs.HessianSum(parts[0][0].shape[1], len(parts))
    for b, arrays in enumerate(parts):
        for rows in arrays:
            total.add(rows, b, count=b == 0)
    return total


def held_error(mats: np.ndarray, new: np.ndarray, held, columns=None) -> float:
    """||W X - W' X||^2 / N summed over blocks, from a held-out ('full', H), ('rows', X) or
    ('factored', (H, L)) (`Hessians.judge_of`).
    columns: the only columns where W' may differ from W (the product reads those alone: the
    uncompensated layer, W with the removed columns zeroed, costs |Q| / d of a full judgement)."""
    kind, value = held
    if kind == "factored":
        H, factors = value
        if columns is not None or any(f is None for f in factors):
            return held_error(mats, new, ("full", H), columns)
        return sum(obs.factored_error(mats[k], new[k], factors[k]) for k in range(len(factors)))
    if columns is not None:
        columns = np.asarray(columns)
        mats, new = mats[:, :, columns], new[:, :, columns]
        value = ([r[:, columns] for r in value[0]], value[1]) if kind == "rows" else value[:, columns[:, None], columns]
    if kind == "rows":
        rows, count = value
        return sum(float(np.sum(np.square(np.asarray(mats[k] - new[k], dtype=np.float32) @ rows[k].T)))
                   for k in range(len(rows))) / max(count, 1)
    return sum(obs.layer_error(mats[k], new[k], value[k]) for k in range(len(value)))


def judges(held) -> bool:
    """Whether held-out inputs can judge a layer's update (not for a diagonal-only layer)."""
    return held is not None and held[0] in ("full", "rows", "factored")


def token_mask_input(model: onnx.ModelProto) -> str | None:
    """The [batch, sequence] integer/bool graph input named like an attention mask, if any."""
    ints = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)
    for vi in model.graph.input:
        t = vi.type.tensor_type
        if named_mask(vi.name) and t.elem_type in ints and len(t.shape.dim) == 2:
            return vi.name
    return None


def collect(model: onnx.ModelProto, layers, parts, desc: str):
    """One onnxruntime pass (one session) over the batches of every (batches, Hessians) part,
    feeding each layer's Hessian of that part; a batch in several parts (the same feeds) runs
    once and feeds them all (the progress bar moves per layer: a batch's accumulation can take
    seconds on a big model)."""
    mask = token_mask_input(model)
    first = {}
    for layer in layers:  # layers reading one input with one layout share a Hessian
        first.setdefault(layer.key(), layer)
    unique = list(first.values())
    every: dict = {}  # id of a batch's feeds -> (feeds, the Hessians it feeds)
    for batches, hessians in parts:
        for feeds in batches:
            every.setdefault(id(feeds), (feeds, []))[1].append(hessians)
    with bar(desc=desc, total=len(every) * len(unique)) as moved:
        values = fetch(model, [a for l in layers for a in (l.activation, *l.also_reads)],
                       [feeds for feeds, _ in every.values()], None)
        for (feeds, fed), found in zip(every.values(), values):
            for layer in unique:
                for hessians in fed:
                    for activation in (layer.activation, *layer.also_reads):  # a shared weight: all its readers
                        hessians.add(layer, found[activation], tokens=feeds.get(mask))
                moved.update(1)


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------
def _index_atoms(analysis, layer):
    return analysis.members[layer.in_pair].atoms


@obs.one_blas_thread  # the whole layer: switching BLAS threads per factorisation cost 1.7x (docs/obspa.md)
def layer_saliency(analysis, layer: Layer, hessian, damp) -> dict:
    """{atom: dL} for removing each channel (all its indices in every block) from this layer."""
    g = analysis.graph
    bias = as_float(g, layer.bias, g.consts[layer.bias]) if layer.bias else None
    mats = layer.matrices(layer_value(g, layer.weight), bias)
    atoms = _index_atoms(analysis, layer)
    unique = np.unique(atoms)
    sets = [layer.columns(np.nonzero(atoms == a)[0]) for a in unique]
    total = np.zeros(len(unique))
    for b in range(layer.blocks):
        if hessian is None:  # calibration "none": H = I, given by its blocks (a 65536-column layer's eye is 32 GB)
            total += obs.saliency(mats[b], obs.identity_blocks, sets)
        elif hessian[0] == "diag":
            d = hessian[1][b]
            total += np.array([0.5 * np.sum(mats[b][:, q] ** 2 * d[q]) for q in sets])
        else:
            total += obs.saliency(mats[b], obs.inverse_blocks(hessian[1][b], damp), sets)
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
    for group in bar(analysis.groups, "OBS saliency"):
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
def set_weights(model: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """Replace constant values (initializers or Constant nodes) in place."""
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in weights:
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(weights[node.output[0]])))
        elif node.op_type == "ConstantOfShape" and node.output and node.output[0] in weights:
            fill_to_constant(node, weights[node.output[0]])
    return model


DAMPING_PATH = (1.0, 10.0, 100.0)  # multiples of the damping tried when held-out inputs can judge them


def until_worse(scored) -> list:
    """The (error, ...) items of `scored` (lazily: a generator computes no more than needed) up to
    and including the first whose error is not below the one before: a damping path stops there."""
    tried = []
    for item in scored:
        tried.append(item)
        if len(tried) > 1 and tried[-1][0] >= tried[-2][0]:
            break
    return tried


def _compensated(layer, mats, hessian, cross, Q, damps, how):
    """(damping, the layer's compensated matrices at it) for each damping of `damps`, lazily."""
    if how == "scale":
        width = mats.shape[2] - (layer.bias is not None)
        channels = np.repeat(np.arange(width // layer.per_index), layer.per_index)
        for damp in damps:
            yield damp, np.stack([obs.rescale(mats[k], hessian[k], Q, channels, layer.bias is not None, damp)
                                  for k in range(layer.blocks)])
        return
    per_block = [obs.refits(mats[k], hessian[k], None if cross is None else cross[k], Q, damps)
                 for k in range(layer.blocks)]
    for damp, fits in zip(damps, zip(*per_block)):
        yield damp, np.stack(fits)


@obs.one_blas_thread  # the whole update: switching BLAS threads per factorisation cost 1.7x (docs/obspa.md)
def compensate_layer(analysis, plan, layer, hessian, damp, weights, cross=None, how="obs", held=None,
                     chosen: dict | None = None) -> str:
    """Compensate one layer into `weights`. With `held` (the Hessian of held-out inputs, which no
    fit saw) the damping is chosen along DAMPING_PATH and the uncompensated layer competes too:
    whatever reproduces the layer's outputs best on the held-out inputs wins, so compensation
    never makes the held-out error larger. The path stops at the first damping that does worse
    than the one before (the held-out error along it had one minimum in 375 of 375 layers of four
    models). `chosen`: a dict that receives the judged damping ("damping": None where the
    uncompensated layer won; `refit_on_all` fits at it again). Returns "compensated", "kept" (the
    uncompensated layer won) or "failed"."""
    g = analysis.graph
    removed = plan.removed(*layer.in_pair)
    w = as_float(g, layer.weight, weights.get(layer.weight, g.consts[layer.weight]))
    b = as_float(g, layer.bias, weights.get(layer.bias, g.consts[layer.bias])) if layer.bias else None
    if hessian is None or hessian[0] != "full":
        return "failed"
    mats = layer.matrices(w, b)
    Q = layer.columns(removed)
    judge = judges(held) and cross is None
    damps = [damp * factor for factor in (DAMPING_PATH if judge else (1.0,))]
    fits = ((d, new) for d, new in _compensated(layer, mats, hessian[1], cross, Q, damps, how)
            if np.all(np.isfinite(new)))
    if not judge:
        options = [new for _, new in fits]
    else:
        if held[0] == "full":  # layer_error multiplies in float32: cast H once, not per candidate
            held = ("full", np.asarray(held[1], dtype=np.float32))
        tried = until_worse((held_error(mats, new, held), d, new) for d, new in fits)  # (error, damping, matrices)
        plain = mats.copy()
        plain[:, :, Q] = 0.0
        tried.append((held_error(mats, plain, held, columns=Q), None, plain))
        _, damping, best = min(tried, key=lambda t: t[0])
        if chosen is not None:
            chosen["damping"] = damping
        if damping is None:
            return "kept"
        options = [best]
    if not options:
        return "failed"
    if is_integer_weight(g, layer.weight):
        options = [on_weight_grid(g, layer, options[0], hessian[1], Q, damp)]
    w_new, b_new = layer.from_matrices(options[0], np.shape(w), np.asarray(w).dtype,
                                       None if b is None else np.shape(b), None if b is None else np.asarray(b).dtype)
    if not np.all(np.isfinite(w_new)) or (b_new is not None and not np.all(np.isfinite(b_new))):
        return "failed"
    weights[layer.weight] = requantized(g, layer.weight, w_new) if is_integer_weight(g, layer.weight) else w_new
    if layer.bias:
        weights[layer.bias] = requantized(g, layer.bias, b_new) if is_integer_weight(g, layer.bias) else b_new
    return "compensated"


def on_weight_grid(g, layer, mats: np.ndarray, hessians: np.ndarray, removed_columns, damp,
                   keep_zeros: bool = False) -> np.ndarray:
    """An integer layer's compensated matrices rounded onto its weight's grid, GPTQ-style over the
    kept columns (obs.on_grid): plain rounding loses every update under half a step (per-tensor
    int8 steps are coarse). Rows are output channels, which a per-channel scale runs along. A bias
    column (float) stays as compensated. `keep_zeros`: every weight at exactly 0 stays there (a
    sparsity pattern's)."""
    scale, zero, low, high = weight_grid(g, layer.weight)
    mats = np.array(mats, dtype=np.float64)
    kept = np.setdiff1d(np.arange(mats.shape[2] - (layer.bias is not None)), removed_columns)
    rows = mats.shape[1]
    for k in range(layer.blocks):
        block = slice(k * rows, (k + 1) * rows)
        H = hessians[k][np.ix_(kept, kept)]
        zeros = mats[k][:, kept] == 0 if keep_zeros else None
        mats[k][:, kept] = obs.on_grid(mats[k][:, kept], H, _grid_part(scale, block, kept),
                                       _grid_part(zero, block, kept), low, high, damp, zeros=zeros)
    return mats


def _grid_part(param: np.ndarray, rows: slice, kept: np.ndarray) -> np.ndarray:
    """The rows (and, where it has one per weight, the kept columns) of a grid's scale or zero point."""
    if param.ndim == 2:
        return param[rows][:, kept]
    return param[rows] if param.size > 1 else param


def refit_on_all(analysis, plan, layer, fit: Hessians, held: Hessians, chosen: dict, before: dict,
                 how: str = "obs") -> dict | None:
    """The layer's weights (and bias) fitted once more at the damping its held-out inputs chose
    (`compensate_layer(chosen=)`), on the fit and held-out rows together (`Hessians.pooled`), from its
    weights `before` compensation; None where nothing was chosen or the fit fails. Rows no fit saw
    are worth having once the judgement is made (MiniLM with 128 real sentences at --ratio 0.25:
    0.946 -> 0.949, docs/obspa.md); the never-larger held-out error is the judgement's, before it."""
    if chosen.get("damping") is None:
        return None
    pooled = fit.pooled(held, layer)
    if pooled is None:
        return None
    own = dict(before)
    return own if compensate_layer(analysis, plan, layer, pooled, chosen["damping"], own, how=how) == "compensated" \
        else None


def compensate(analysis, plan, layers, batches, damp, progress, max_columns=MAX_COLUMNS,
               how: str = "obs", first: Hessians | None = None, seed: int = 0, held: list = (),
               first_held: Hessians | None = None) -> dict:
    """Compensated weights {name: full-size value}, stage by stage with re-computed inputs.

    The pruned model (the original with removed slices masked) runs as a StagedRun cut at the
    compensated layers: each stage's layer inputs come from the already compensated part, the
    stage's layers are compensated on them, and the next stage sees their new outputs; all of it
    costs one forward pass over the calibration batches (and the `held` batches, whose inputs
    judge each layer's compensation: compensate_layer).
    how "reference": fit each layer to the original model's outputs of that layer (least squares
    from the inputs it now sees to the outputs it gave before pruning), which also corrects the
    drift the earlier stages left; "obs": plain OBS on the current inputs (drift left as it is);
    "scale": one factor per kept input channel.
    first / first_held: the original model's Hessians, which stage 0 (nothing upstream changed)
    reuses."""
    # a weight several layers share (`also_reads`): a stage sees one reader's inputs (first order: pipeline._compensate)
    todo = [l for l in layers if l.compensable and not l.also_reads and len(plan.removed(*l.in_pair))]
    if not todo or not batches:
        return {}
    g = analysis.graph
    by_output = {g.nodes[l.node].output[0]: l for l in todo}
    wanted = {name: [l.activation] for name, l in by_output.items()}
    weights: dict = {}
    mask = token_mask_input(analysis.model)
    every = list(batches) + list(held)
    run = StagedRun(masked_original(plan), by_output, every, "compensating")
    progress(f"compensating {len(todo)} layers in {run.count} stages")
    reference = how == "reference"
    references = StagedRun(analysis.model, by_output, every, None).stages({}, wanted) if reference else None
    outcome: dict = {}
    read = {}  # what the masked model reads: the new weights, integer ones through their masked copies
    for stage, names, values in run.stages(read, wanted):
        refs = next(references)[2] if reference else None
        current = [by_output[n] for n in names]
        reuse = stage == 0 and first is not None and not reference and all(first.of(l) for l in current)
        hessians = first if reuse else Hessians(len(batches), max_columns, seed)
        held_hessians = first_held if reuse and first_held is not None else \
            Hessians(len(held), max_columns, seed, keep_rows=True)
        for layer in {l.key(): l for l in current}.values():
            for b, x in enumerate(values[layer.activation]):
                if b < len(batches) and not reuse:
                    hessians.add(layer, x, refs[layer.activation][b] if reference else None, every[b].get(mask))
                elif b >= len(batches) and not (reuse and first_held is not None):
                    held_hessians.add(layer, x, tokens=every[b].get(mask))
        for layer in current:
            before, chosen = {k: weights[k] for k in (layer.weight, layer.bias) if k in weights}, {}
            result = compensate_layer(analysis, plan, layer, hessians.of(layer), damp, weights,
                                      hessians.cross_of(layer) if reference else None, how,
                                      held_hessians.of(layer) if held else None, chosen)
            weights.update(refit_on_all(analysis, plan, layer, hessians, held_hessians, chosen, before, how) or {})
            outcome[result] = outcome.get(result, 0) + 1
            if result == "failed":
                progress(f"warning: layer '{g.node_name(layer.node)}' left uncompensated (no finite update)")
        read.update(weights)
        read.update(masked_integer_copies(analysis, plan, weights))
    if outcome.get("kept"):
        progress(f"{outcome['kept']} of {len(todo)} layers kept uncompensated: the update did not reproduce "
                 "their outputs better on held-out inputs")
    return weights


# ---------------------------------------------------------------------------------------------
# the criterion and the compensation stage of spa.pipeline
# ---------------------------------------------------------------------------------------------
@dataclass
class Measured:
    """What the OBS criterion measured on the original model; the compensation stage reuses it."""
    layers: list
    hessians: Hessians
    batches: list
    damp: float
    seed: int = 0
    held_hessians: Hessians | None = None  # of batches no Hessian above saw: they judge compensations
    # first_order_weights' per-layer (update, judged damping), shared by the plans compared
    first_order: dict = field(default_factory=dict)
    wider: tuple | None = None  # (batches, Hessians) of more batches from the same pass, for `rescored`

    @property
    def compensable(self) -> list:
        """Names of the weights and biases compensation may give new values."""
        return [name for layer in self.layers if layer.compensable for name in (layer.weight, layer.bias) if name]


def check_damp(damp: float) -> None:
    if not 0 <= damp < 1e6:
        raise SpaError(f"damping must be non-negative, got {damp}")


def scores(analysis: Analysis, batches: list, damp: float = obs.DEFAULT_DAMP, normalization: str = "mean",
           seed: int = 0, progress=lambda message: None, held: list = (), wider: list = ()):
    """(group scores, Measured): OBS saliency of every prunable group's channels from the
    Hessians of its consumer layers on the calibration batches ([]: H = I); the Hessians of the
    `held` batches (kept apart) judge compensations later. `wider`: batches that hold `batches`
    and more, whose Hessians the same pass collects for `rescored` (the batches in both run once)."""
    check_damp(damp)
    if normalization not in NORMALIZATIONS:
        raise SpaError(f"unknown normalization '{normalization}' (known: {', '.join(NORMALIZATIONS)})")
    layers = scored_layers(analysis)
    quantized = sum(layer.weight not in analysis.graph.consts for layer in layers)
    if quantized:
        progress(f"{quantized} of {len(layers)} layers read weights quantized in blocks or along their input "
                 "channels (DequantizeLinear): scored on the dequantized values, never compensated")
    integer = sum(is_integer_weight(analysis.graph, layer.weight) for layer in layers)
    if integer:
        progress(f"{integer} of {len(layers)} layers have integer weights (QDQ, QOperator, dynamically quantized or "
                 "MatMulNBits): scored on the dequantized values, compensated, and rounded back onto their integer "
                 "grid (GPTQ-style)")
    hessians = Hessians(len(batches), MAX_COLUMNS, seed)
    held_hessians = Hessians(len(held), MAX_COLUMNS, seed, keep_rows=True) if held else None
    wider_hessians = Hessians(len(wider), MAX_COLUMNS, seed) if wider else None  # its own draws: as if run alone
    if batches and layers:
        besides = [f"the first {sample_count(batches)} also apart"] * bool(wider) \
            + ["and the held-out ones"] * bool(held)
        progress(f"Hessians of {len(layers)} layers from {sample_count(wider or batches)} calibration samples"
                 + (f" ({', '.join(besides)})" if besides else ""))
    if (batches or held) and layers:
        parts = [(batches, hessians)] + ([(list(held), held_hessians)] if held else []) \
            + ([(wider, wider_hessians)] if wider else [])
        with np.errstate(over="ignore", invalid="ignore"):  # check_finite names the layer instead
            collect(analysis.model, layers, parts, "Hessians")
        check_finite(analysis.graph, layers, [h for _, h in parts], batches or list(held))
    progress(f"OBS saliency of {sum(g.prunable for g in analysis.groups)} prunable groups")
    found = group_scores(analysis, layers, hessians, damp, normalization, calibrated=bool(batches))
    return found, Measured(layers, hessians, batches, damp, seed, held_hessians,
                           wider=(wider, wider_hessians) if wider else None)


def check_finite(graph, layers: list, hessians: list, batches: list) -> None:
    """A CalibrationRunError where some layer's inputs overflowed (the default criterion then falls
    back to l1, which needs no inputs): the onnx backend's light_resnet50, whose weights are uniform
    fills, reaches inf by its last stage on generated images."""
    bad = next((layer for layer in layers if not all(h.finite(layer) for h in hessians)), None)
    if bad is not None:
        node = graph.nodes[bad.node]
        raise CalibrationRunError(f"the model's activations are not finite on its calibration inputs "
                                  f"({feed_shapes(batches[0])}): the input of {node.op_type} '{node.name}' holds "
                                  "inf or NaN, so OBS has no Hessian there")


def rescored(analysis: Analysis, measured: Measured, normalization: str = "mean", progress=lambda message: None):
    """(group scores, Measured) of the `wider` batches `scores` collected beside `measured`'s own,
    with the same held-out Hessians."""
    batches, hessians = measured.wider
    progress(f"OBS saliency of {sum(g.prunable for g in analysis.groups)} prunable groups "
             f"from all {sample_count(batches)} calibration samples")
    found = group_scores(analysis, measured.layers, hessians, measured.damp, normalization, calibrated=True)
    return found, Measured(measured.layers, hessians, batches, measured.damp, measured.seed, measured.held_hessians)


def compensation_stage(analysis: Analysis, plan: Plan, how: str, batches: list, measured: Measured | None = None,
                       damp: float = obs.DEFAULT_DAMP, seed: int = 0, progress=lambda message: None,
                       held: list = ()) -> dict:
    """Compensated weights for the plan ({} for how="none"): "obs" (least squares on the inputs
    each layer now sees) or "reference" (fit to the original model's layer outputs)."""
    if how not in COMPENSATIONS:
        raise SpaError(f"unknown compensation '{how}' (known: {', '.join(COMPENSATIONS)})")
    if how == "none":
        return {}
    check_damp(damp)
    layers = measured.layers if measured else scored_layers(analysis)
    return compensate(analysis, plan, layers, batches, damp, progress, MAX_COLUMNS, how,
                      first=measured.hessians if measured else None, seed=seed,
                      held=held, first_held=measured.held_hessians if measured else None)


def first_order(analysis: Analysis, plan: Plan, measured: Measured, damp: float = obs.DEFAULT_DAMP,
                cache: dict | None = None) -> onnx.ModelProto:
    """The masked original with `first_order_weights`."""
    return set_weights(masked_original(plan), first_order_weights(analysis, plan, measured, damp, cache))


def first_order_weights(analysis: Analysis, plan: Plan, measured: Measured, damp: float = obs.DEFAULT_DAMP,
                        cache: dict | None = None, pooled: bool = False) -> dict:
    """Every consumer's weights compensated from the original model's Hessians (no staged pass:
    cheap, for comparing plans). `cache`: a dict shared by the plans compared, so that a layer
    losing the same input channels in two plans is compensated once. `pooled`: the final weights of
    the chosen plan, each layer fitted once more at the damping its held-out inputs chose, on the fit
    and held-out rows together (`refit_on_all`); plans still being compared must not see them."""
    held_hessians = measured.held_hessians
    pooled = pooled and held_hessians is not None
    weights: dict = {}
    for layer in bar(measured.layers, "first-order compensation"):
        removed = plan.removed(*layer.in_pair)
        if not layer.compensable or not len(removed):
            continue
        key = _first_order_key(layer, removed)
        reusable = cache is not None and layer.weight not in weights  # it starts from the original weight
        before = {k: weights[k] for k in (layer.weight, layer.bias) if k in weights}
        if reusable and key in cache:
            own, chosen = cache[key]
        else:
            own, chosen = dict(before), {}
            held = held_hessians.judge_of(layer) if held_hessians else None
            compensate_layer(analysis, plan, layer, measured.hessians.of(layer), damp, own, held=held, chosen=chosen)
            if reusable:
                cache[key] = own, chosen
        if pooled:
            own = refit_on_all(analysis, plan, layer, measured.hessians, held_hessians, chosen, before) or own
        weights.update(own)
    return weights


def _first_order_key(layer, removed) -> tuple:
    return *layer.in_pair, np.asarray(removed).tobytes()


def retain_first_order(measured: Measured, plans: list) -> None:
    """Drop the cached first-order updates that none of `plans` uses: the allocation keeps only the
    plans that can still win (a 1.1B LLaMA's updates are ~1.4 GB a candidate)."""
    wanted = {_first_order_key(layer, plan.removed(*layer.in_pair))
              for plan in plans for layer in measured.layers}
    for key in set(measured.first_order) - wanted:
        del measured.first_order[key]


def obspa(model: onnx.ModelProto, target: Target, calibration: str = "auto", samples: int = 128,
          batch_size: int = 16, damp: float = obs.DEFAULT_DAMP, normalization: str | None = None,
          options: Options | None = None, seed: int = 0, compensation: str = "obs", dims: dict | None = None,
          progress=lambda message: None, allocation: str | None = None, staged: bool | None = None):
    """spa.pipeline.prune with criterion "obspa": analyze -> calibrate -> Hessians -> group
    saliencies -> select -> compensate -> rewrite. Returns its Result (with .weights, .scores)."""
    from .calibration import Calibration
    from .pipeline import prune

    source = Calibration(source=calibration, samples=samples, batch_size=batch_size, seed=seed, dims=dims)
    return prune(model, target, "obspa", normalization=normalization, options=options, seed=seed,
                 progress=progress, calibration=source, damp=damp, compensation=compensation, allocation=allocation,
                 staged=staged)


def scored_layers(analysis) -> list:
    """Layers that read channels of groups the selector may prune."""
    allowed = analysis.options.granularity
    wanted = {g.id for g in analysis.groups if g.prunable and g.kind in allowed}
    return [l for l in find_layers(analysis)
            if analysis.atom_group[int(_index_atoms(analysis, l)[0])] in wanted]
