"""Criteria: score every channel of a group.

A criterion maps one weight tensor and one axis to a score per index (higher = more important):

    from spa.importance import register_criterion

    @register_criterion("abs-max")
    def abs_max(weight, axis):
        return np.abs(np.moveaxis(weight, axis, 0)).reshape(weight.shape[axis], -1).max(axis=1)

Scores are summed over the indices of each channel within a member, aggregated over the
group's weights (sum / mean / max) and normalised within the group (none / mean / max /
standardise) so that global ranking compares groups fairly.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import SpaError
from .groups import Analysis, Group
from .quant import is_quant_param, weight_value

CRITERIA: dict = {}
# Per-weight saliencies computed by a framework frontend (spa.frontends.torch_criteria, PyTorch
# autograd); the core only lifts them to groups (score(..., saliency=...)).
GRADIENT_CRITERIA = ("taylor", "snip", "grasp", "crop", "synflow", "obd")
AGGREGATIONS = ("sum", "mean", "max")
NORMALIZATIONS = ("none", "mean", "max", "standardise")


def register_criterion(name):
    def wrap(fn):
        CRITERIA[name] = fn
        return fn
    return wrap


def _rows(weight, axis):
    return np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0).reshape(weight.shape[axis], -1)


def channel_sums(values, axis):
    """Sum over every axis but `axis`, as float64. Done as two matrix-vector products: BLAS reads
    the tensor once at full speed, where numpy's sum over a short inner axis or with a dtype
    change is several times slower."""
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    shape = values.shape
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    blocks = values.reshape(outer, shape[axis] * inner)
    columns = np.ones(outer, values.dtype) @ blocks if outer != 1 else blocks[0]
    per_index = columns.reshape(shape[axis], inner)
    per_index = per_index @ np.ones(inner, values.dtype) if inner != 1 else per_index[:, 0]
    return per_index.astype(np.float64)


@register_criterion("l1")
def l1(weight, axis):
    return channel_sums(np.abs(weight), axis)


@register_criterion("l2")
def l2(weight, axis):
    return np.sqrt(channel_sums(np.square(weight), axis))


ELEMENT_TERMS = {"l1": (np.abs, lambda s: s), "l2": (np.square, np.sqrt)}


def _norms_by_weight(analysis: Analysis, criterion: str) -> dict:
    """{(weight, axis): l1/l2 per channel} for every member axis, each weight read once."""
    term, finish = ELEMENT_TERMS[criterion]
    axes = {}
    for group in analysis.groups:
        if group.has_params:
            for m in group.members:
                if m.is_const and not _is_statistic(analysis, m.tensor):
                    axes.setdefault(m.tensor, set()).add(m.axis)
    norms, scratch = {}, np.empty(0)
    consts = analysis.graph.consts
    for name, wanted in axes.items():
        fill = consts.fill(name)
        if fill is not None:  # a uniform fill (ConstantOfShape): every channel holds the same values
            shape = consts.shape(name)
            for axis in wanted:
                per_channel = float(term(np.float64(fill))) * (math.prod(shape) // max(shape[axis], 1))
                norms[(name, axis)] = finish(np.full(shape[axis], per_channel))
            continue
        weight = weight_value(analysis.graph, name)  # a quantized weight: its dequantized value
        if scratch.dtype != weight.dtype or scratch.size < weight.size:  # reused: fresh pages are slow
            scratch = np.empty(max(weight.size, scratch.size), dtype=weight.dtype)
        values = term(weight, out=scratch[:weight.size].reshape(weight.shape))
        norms.update({(name, axis): finish(channel_sums(values, axis)) for axis in wanted})
    return norms


@register_criterion("fpgm")
def fpgm(weight, axis):
    """Filter Pruning via Geometric Median: filters close to all others are redundant."""
    rows = _rows(weight, axis)
    sq = (rows ** 2).sum(axis=1)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0)
    return np.sqrt(dist2).sum(axis=1)


def _is_statistic(analysis, tensor):
    """BatchNorm running mean/var and quantization scales / zero points: their magnitude says
    nothing about importance."""
    uses = analysis.graph.consumers.get(tensor, [])
    if is_quant_param(analysis.graph, tensor):
        return True
    return bool(uses) and all(analysis.graph.nodes[i].op_type == "BatchNormalization" and slot >= 3
                              for i, slot in uses)


def _is_bn_scale(analysis, tensor):
    return any(analysis.graph.nodes[i].op_type in ("BatchNormalization", "InstanceNormalization")
               and slot == 1 for i, slot in analysis.graph.consumers.get(tensor, []))


def groups_without_bn_scale(analysis: Analysis) -> tuple[int, int]:
    """(prunable groups whose channels reach no BatchNorm scale, prunable groups): bn-scale scores
    the former by l1."""
    prunable = [g for g in analysis.groups if g.prunable and g.kind in analysis.options.granularity]
    without = [g for g in prunable if not any(m.is_const and _is_bn_scale(analysis, m.tensor) for m in g.members)]
    return len(without), len(prunable)


def check_bn_scale(analysis: Analysis) -> list:
    """A SpaError when no prunable group has a BatchNorm scale (bn-scale would be l1 in disguise);
    a warning (in the list returned) when some fall back to l1."""
    without, total = groups_without_bn_scale(analysis)
    if total and without == total:
        raise SpaError("criterion bn-scale: no prunable channel group feeds a BatchNormalization (the model has none, "
                       "or an eval-mode export folded them into the convolutions): export in training mode to keep "
                       "them, spa.frontends.torch.export(..., training=True) or torch.onnx.export(..., "
                       "training=torch.onnx.TrainingMode.TRAINING), or choose another criterion")
    if without:
        return [f"criterion bn-scale: {without} of {total} prunable groups have no BatchNorm scale and were scored "
                "by l1 instead"]
    return []


def saliency_scores(analysis: Analysis, group: Group, saliency: dict):
    """(member, per-index sums of the element saliencies) for the members that have one."""
    chosen = []
    for m in group.members:
        alias = analysis.graph.aliases.get(m.tensor)  # one consumer's copy of a shared constant
        name = alias[3] if alias and m.tensor not in saliency else m.tensor
        if not m.is_const or name not in saliency or _is_statistic(analysis, m.tensor):
            continue
        values = np.asarray(saliency[name])
        shape = analysis.graph.consts.shape(m.tensor)
        if values.shape != shape:
            raise SpaError(f"saliency of '{m.tensor}' has shape {values.shape}, the weight {shape}")
        chosen.append((m, channel_sums(values, m.axis)))
    return chosen


def member_scores(analysis: Analysis, group: Group, criterion: str, norms: dict | None = None):
    """(member, per-index scores) for the weights the criterion looks at; `norms`: precomputed
    l1/l2 values by (weight, axis)."""
    consts = [m for m in group.members if m.is_const and not _is_statistic(analysis, m.tensor)]
    if criterion == "bn-scale":
        chosen = [m for m in consts if _is_bn_scale(analysis, m.tensor)]
        return [(m, np.abs(weight_value(analysis.graph, m.tensor)).astype(np.float64)) for m in chosen] \
            or member_scores(analysis, group, "l1")
    if criterion == "fpgm":
        filters = [m for m in consts if len(analysis.graph.consts.shape(m.tensor)) >= 2
                   and m.pair not in analysis.contracted_pairs]
        return [(m, fpgm(weight_value(analysis.graph, m.tensor), m.axis)) for m in filters] \
            or member_scores(analysis, group, "l2")
    if norms is not None:
        return [(m, norms[m.pair]) for m in consts]
    fn = CRITERIA[criterion]
    return [(m, np.asarray(fn(weight_value(analysis.graph, m.tensor), m.axis), dtype=np.float64)) for m in consts]


def score(analysis: Analysis, criterion: str = "l1", aggregation: str = "mean",
          normalization: str = "mean", seed: int = 0, saliency: dict | None = None) -> dict:
    """{group id: per-channel scores aligned with group.atoms} for every group with parameters.

    `saliency`: {weight name: per-element scores, the weight's shape} from any source (criterion
    "saliency" or a GRADIENT_CRITERIA name): each channel gets the sum over its slice of every
    member weight, then the same aggregation and normalisation as the magnitude criteria."""
    if criterion in GRADIENT_CRITERIA and saliency is None:
        raise SpaError(f"criterion {criterion} needs per-weight saliencies: use "
                       f"spa.frontends.torch_criteria (PyTorch) or pass saliency=")
    if saliency is None and criterion not in CRITERIA and criterion not in ("random", "bn-scale"):
        raise SpaError(f"unknown criterion '{criterion}' (known: {', '.join(available())})")
    if aggregation not in AGGREGATIONS:
        raise SpaError(f"unknown aggregation '{aggregation}' (known: {', '.join(AGGREGATIONS)})")
    if normalization not in NORMALIZATIONS:
        raise SpaError(f"unknown normalization '{normalization}' (known: {', '.join(NORMALIZATIONS)})")
    rng = np.random.default_rng(seed)
    norms = _norms_by_weight(analysis, criterion) if saliency is None and criterion in ELEMENT_TERMS \
        and CRITERIA[criterion] in (l1, l2) else None
    scores = {}
    for group in analysis.groups:
        if not group.has_params:
            continue
        if criterion == "random":
            scores[group.id] = rng.random(len(group.atoms))
            continue
        per_member = []
        chosen = member_scores(analysis, group, criterion, norms) if saliency is None \
            else saliency_scores(analysis, group, saliency)
        for member, values in chosen:
            position = np.searchsorted(group.atoms, member.atoms)
            per_member.append(np.bincount(position, weights=values, minlength=len(group.atoms)))
        if not per_member:
            scores[group.id] = np.zeros(len(group.atoms))
            continue
        stacked = np.stack(per_member)
        present = np.stack([p != 0 for p in per_member]).sum(axis=0).clip(min=1)
        if aggregation == "sum":
            total = stacked.sum(axis=0)
        elif aggregation == "mean":
            total = stacked.sum(axis=0) / present
        else:
            total = stacked.max(axis=0)
        scores[group.id] = normalize(total, normalization)
    return scores


def aggregation_effect(analysis: Analysis, criterion: str) -> tuple[int, bool, bool]:
    """(the most weights the criterion scores in one prunable group, whether sum and mean order some
    group's channels differently, whether they scale groups differently): mean divides each
    channel's sum by the number of weights that score it non-zero, so the two differ within a group
    only where that count varies, and across groups (unnormalised) only where it differs between
    groups. Gradient criteria: the constant weights, whose saliencies may be zero anywhere."""
    most, within, counts = 0, False, set()
    for group in analysis.groups:
        if not (group.prunable and group.kind in analysis.options.granularity):
            continue
        if criterion in GRADIENT_CRITERIA:
            count = sum(1 for m in group.members if m.is_const and not _is_statistic(analysis, m.tensor))
            most, within = max(most, count), within or count > 1
            counts.add(count)
            continue
        chosen = member_scores(analysis, group, criterion)
        most = max(most, len(chosen))
        present = sum((np.bincount(np.searchsorted(group.atoms, m.atoms), weights=values,
                                   minlength=len(group.atoms)) != 0).astype(int) for m, values in chosen)
        present = np.unique(present)
        within = within or len(present) > 1
        counts.update(present.tolist())
    return most, within, within or len(counts) > 1


def score_from_saliency(analysis: Analysis, saliency: dict, aggregation: str = "mean",
                        normalization: str = "mean") -> dict:
    """Group scores from per-element saliencies {weight name: array shaped like the weight}."""
    return score(analysis, "saliency", aggregation, normalization, saliency=saliency)


def normalize(values, how):
    # magnitudes, so that signed scores (GraSP) keep their order
    if how == "mean":
        return values / (np.abs(values).mean() or 1.0)
    if how == "max":
        return values / (np.abs(values).max() or 1.0)
    if how == "standardise":
        return (values - values.mean()) / (values.std() or 1.0)
    return values


def available():
    return sorted(set(CRITERIA) | {"random", "bn-scale"} | set(GRADIENT_CRITERIA))
