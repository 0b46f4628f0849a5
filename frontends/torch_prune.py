"""torch.nn.utils.prune's mask API, plus N:M and k-of-n patterns and a step that makes masks physical.

    from spa.frontends.torch import prune

    prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)  # torch's own function
    prune.n_m(model.fc, "weight", n=2, m=4)             # at most 2 non-zeros in every 4 inputs
    prune.k_of_n(model.conv2, "weight", amount=0.5, granularity="kernel")
    model, report = prune.make_physical(model, (x,))     # zeroed channels -> a narrower model

Everything torch.nn.utils.prune has is re-exported unchanged (same masks, same iterative
composition through its PruningContainer). ``NMSparse`` and ``KOfN`` are BasePruningMethod
subclasses, so they compose with torch's methods and work with ``remove`` and ``is_pruned``.
``make_physical`` is what masks alone never give: channels that the masks zero exactly are removed
through SPA's channel-coupling analysis (residual adds, BN, grouped convs, flatten -> linear), the
result is checked against the masked module, and masked channels that cannot go are reported.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn as nn
from torch.nn.utils.prune import (BasePruningMethod, CustomFromMask, Identity, L1Unstructured,
                                  LnStructured, PruningContainer, RandomStructured,
                                  RandomUnstructured, custom_from_mask, global_unstructured,
                                  identity, is_pruned, l1_unstructured, ln_structured,
                                  random_structured, random_unstructured, remove)

from spa.groups import analyze
from spa.plan import Plan

from .torch_apply import apply_plan
from .torch_export import as_args, export

__all__ = ["BasePruningMethod", "PruningContainer", "Identity", "RandomUnstructured",
           "L1Unstructured", "RandomStructured", "LnStructured", "CustomFromMask", "identity",
           "random_unstructured", "l1_unstructured", "random_structured", "ln_structured",
           "global_unstructured", "custom_from_mask", "remove", "is_pruned",
           "NMSparse", "KOfN", "n_m", "k_of_n", "make_physical", "PhysicalReport"]

GRANULARITIES = ("weight", "kernel", "filter")


# ------------------------------------------------------------------------------------------------
# new pruning methods
# ------------------------------------------------------------------------------------------------
def _keep_count(n: int, amount: float) -> int:
    """k = round((1 - amount) * n), at least one."""
    return max(1, round((1.0 - amount) * n))


def _top_k_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 mask with ones at the k largest scores of every row of a 2-D ``scores``."""
    return torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=1).indices, 1.0)


class NMSparse(BasePruningMethod):
    """At most ``n`` non-zeros in every ``m`` consecutive weights along the contracted ``axis``
    (Linear [out, in]: along in; Conv [O, I/g, kh, kw]: along I at each (o, kh, kw), TensorRT's
    convention), keeping the largest magnitudes of the already-masked tensor."""

    PRUNING_TYPE = "global"  # the container hands over the whole tensor and its current mask

    def __init__(self, n: int = 2, m: int = 4, axis: int = 1):
        if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or n > m:
            raise ValueError(f"n:m sparsity needs integers 1 <= n <= m, got n={n!r}, m={m!r}")
        self.n, self.m, self.axis = n, m, axis

    def compute_mask(self, t, default_mask):
        if t.dim() < 2:
            raise ValueError(f"n:m sparsity needs a weight with an input axis, got shape {tuple(t.shape)}")
        if t.shape[self.axis] % self.m:
            raise ValueError(f"n:m sparsity: the input axis ({self.axis}) of a weight of shape "
                             f"{tuple(t.shape)} has {t.shape[self.axis]} entries, "
                             f"not a multiple of m={self.m}")
        scores = (t * default_mask).abs().movedim(self.axis, -1)
        blocks = _top_k_rows(scores.reshape(-1, self.m), self.n)
        return default_mask * blocks.reshape(scores.shape).movedim(-1, self.axis)


class KOfN(BasePruningMethod):
    """Each unit keeps k = round((1 - amount) * n) of its n parts, by magnitude of the
    already-masked tensor: ``weight``: every output row keeps k of its n weights; ``kernel``:
    every output filter keeps k of its n input kernels (kh x kw slices, L2 norm); ``filter``: k
    of the n output filters are kept (L2 norm)."""

    PRUNING_TYPE = "global"

    def __init__(self, amount: float, granularity: str = "weight"):
        if not 0.0 <= amount < 1.0:
            raise ValueError(f"amount (the fraction pruned) must be in [0, 1), got {amount!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.amount, self.granularity = amount, granularity

    def compute_mask(self, t, default_mask):
        if t.dim() < 2:
            raise ValueError(f"k-of-n needs a weight with output and input axes, got shape {tuple(t.shape)}")
        masked = t * default_mask
        scores, unit_shape = self._scores(masked)
        keep = _top_k_rows(scores, _keep_count(scores.shape[1], self.amount))
        return default_mask * keep.reshape(unit_shape)

    def _scores(self, masked):
        """(units x parts scores, the shape a units x parts mask broadcasts to over the weight)."""
        out, ones = masked.shape[0], (1,) * (masked.dim() - 2)
        if self.granularity == "weight":
            return masked.abs().reshape(out, -1), masked.shape
        if self.granularity == "kernel":
            return masked.reshape(out, masked.shape[1], -1).norm(dim=2), (out, masked.shape[1]) + ones
        return masked.reshape(1, out, -1).norm(dim=2), (out, 1) + ones


def _contracted_axis(module: nn.Module) -> int:
    return 0 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 1


def n_m(module: nn.Module, name: str, n: int = 2, m: int = 4, importance_scores=None) -> nn.Module:
    """Prune ``module.name`` to n:m sparsity along its input axis (torch.nn.utils.prune style:
    adds ``name_mask`` and ``name_orig``; composes with earlier pruning). Returns ``module``."""
    NMSparse.apply(module, name, n=n, m=m, axis=_contracted_axis(module),
                   importance_scores=importance_scores)
    return module


def k_of_n(module: nn.Module, name: str, amount: float, granularity: str = "weight",
           importance_scores=None) -> nn.Module:
    """Keep k = round((1 - amount) * n) of every unit's n parts of ``module.name`` (see
    :class:`KOfN`). Returns ``module``."""
    KOfN.apply(module, name, amount=amount, granularity=granularity,
               importance_scores=importance_scores)
    return module


# ------------------------------------------------------------------------------------------------
# masks -> a physically narrower module
# ------------------------------------------------------------------------------------------------
@dataclass
class PhysicalReport:
    params_before: int
    params_after: int
    narrowed: dict = field(default_factory=dict)       # module tensor -> {axis: channels removed}
    not_removable: list = field(default_factory=list)  # masked channels kept, and why (also warned)
    max_deviation: float = 0.0  # exact=False: largest output change against the masked module

    def __str__(self):
        lines = [f"parameters {self.params_before:,} -> {self.params_after:,}"]
        lines += [f"  {name}: " + ", ".join(f"axis {a} -{k}" for a, k in axes.items())
                  for name, axes in self.narrowed.items()]
        lines += [f"  kept: {why}" for why in self.not_removable]
        if self.max_deviation:
            lines.append(f"  outputs moved by up to {self.max_deviation:.4g} (live biases / BN shifts dropped)")
        return "\n".join(lines)


def make_physical(module: nn.Module, example_inputs, *, atol: float = 1e-5, exporter: str = "dynamo",
                  exact: bool = True) -> tuple[nn.Module, PhysicalReport]:
    """Make every pruning mask of ``module`` permanent (``remove``) and remove, in place, the
    channels the masks zero exactly; returns ``(module, report)``.

    A channel of a coupled group (SPA's analysis of the exported module) goes when every
    consumer's input slice of it is zero, or when every weight, bias and folded BatchNorm shift
    producing it is zero. The narrowed module is compared with the masked one on
    ``example_inputs`` (eval mode, ``atol``); a group whose removal changes the outputs is kept
    whole. Masked channels that stay (a live bias or BN shift, a graph output, a consumer that
    still reads them) are in ``report.not_removable`` and warned about.

    ``exact=False``: also remove channels whose every producing weight is masked although a bias
    or BatchNorm shift still makes them a constant (structured filter pruning as Torch-Pruning
    does it, e.g. after DPP at filter granularity); the outputs then move, and the largest change
    on ``example_inputs`` is reported (``report.max_deviation``) and warned about."""
    args = as_args(example_inputs)
    _make_masks_permanent(module)
    params_before = _param_count(module)
    was_training = module.training
    narrowing = _Narrowing(module.eval(), args, atol, exporter)
    removable, notes = _removable_channels(narrowing, exact)
    groups = narrowing.verified(removable, notes) if exact else list(removable)
    narrowing.apply(module, [a for gid in groups for a in removable[gid]])
    deviation = 0.0 if exact else narrowing.deviation(module)
    module.train(was_training)
    if notes:
        warnings.warn("make_physical: masked channels not physically removable: " + "; ".join(notes),
                      stacklevel=2)
    if deviation > atol:  # below it, what exact mode's verification calls equal
        warnings.warn(f"make_physical(exact=False): channels with live biases / BN shifts removed; outputs moved by "
                      f"up to {deviation:.4g} on example_inputs", stacklevel=2)
    narrowed = {name: {axis: old - new for axis, (old, new) in enumerate(zip(*shapes)) if old != new}
                for name, shapes in module.spa_report.narrowed.items()}
    return module, PhysicalReport(params_before, _param_count(module), narrowed, notes, deviation)


def _make_masks_permanent(module: nn.Module) -> None:
    for m in module.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, BasePruningMethod):
                remove(m, hook._tensor_name)


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _outputs(module: nn.Module, args) -> list:
    with torch.no_grad():
        out = module(*args)
    if isinstance(out, dict):
        out = list(out.values())
    return list(out) if isinstance(out, (tuple, list)) else [out]


class _Narrowing:
    """The masked module exported and analysed, and the outputs its narrowed copies must keep."""

    def __init__(self, module: nn.Module, args, atol: float, exporter: str):
        self.module, self.args, self.atol = module, args, atol
        self.reference = _outputs(module, args)
        with tempfile.TemporaryDirectory() as tmp:
            exported = export(module, args, os.path.join(tmp, "masked.onnx"), exporter=exporter)
            self.analysis = analyze(onnx.load(exported.path))
        self.weight_map = exported.weight_map

    def source(self, member) -> str:
        """The module tensor an ONNX weight came from."""
        return self.weight_map.get(member.tensor, {}).get("source", member.tensor)

    def apply(self, module: nn.Module, atoms) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return apply_plan(module, Plan(self.analysis, atoms), weight_map=self.weight_map, verify=False)

    def deviation(self, narrowed: nn.Module) -> float:
        got = _outputs(narrowed, self.args)
        return max((float((g - r).abs().max()) for g, r in zip(got, self.reference) if g.numel()), default=0.0)

    def keeps_outputs(self, atoms) -> bool:
        try:
            got = _outputs(self.apply(copy.deepcopy(self.module), atoms), self.args)
        except Exception:  # a narrowed module that no longer runs is not the masked module
            return False
        return len(got) == len(self.reference) and all(
            g.shape == r.shape and torch.allclose(g, r, rtol=0.0, atol=self.atol)
            for g, r in zip(got, self.reference))

    def verified(self, removable: dict, notes: list) -> list:
        """The groups whose removals keep the outputs; the others are noted and kept whole."""
        atoms_of = lambda gids: [a for g in gids for a in removable[g]]  # noqa: E731
        if not removable or self.keeps_outputs(atoms_of(removable)):
            return list(removable)
        kept = [gid for gid in removable if self.keeps_outputs(atoms_of([gid]))]
        for gid in set(removable) - set(kept):
            layers = sorted({self.source(m) for m in self.analysis.groups[gid].members if m.is_const})
            notes.append(f"zero channels of {', '.join(layers)}: removing them changes the outputs "
                         f"(something between producer and consumer turns zero into non-zero)")
        if kept and not self.keeps_outputs(atoms_of(kept)):
            notes.append("the verified groups change the outputs together; nothing removed")
            return []
        return kept


# which channels the masks zero exactly -----------------------------------------------------------
def _zero_indices(analysis, member) -> np.ndarray:
    """Per index along the member's axis: is its whole slice of the constant zero."""
    array = np.moveaxis(np.asarray(analysis.graph.consts[member.tensor]), member.axis, 0)
    return ~np.any(array.reshape(array.shape[0], -1) != 0, axis=1)


def _removable_channels(narrowing: _Narrowing, exact: bool = True) -> tuple[dict, list]:
    """{group id: removable atoms} and a note for each group with masked channels that stay
    (exact=False: channels every producing weight masks go too, whatever their constants)."""
    analysis = narrowing.analysis
    removable, notes = {}, []
    for group in analysis.groups:
        consts = [m for m in group.members if m.is_const]
        consumers = [m for m in group.members if m.pair in analysis.contracted_pairs]
        producers = [m for m in consts if m not in consumers]
        zero_index = {m.pair: _zero_indices(analysis, m) for m in consts}
        zero = {m.pair: set(m.atoms.tolist()) - set(m.atoms[~zero_index[m.pair]].tolist()) for m in consts}
        weights = [m for m in consts if analysis.graph.rank(m.tensor) >= 2]  # not biases, BN vectors
        masked = set().union(set(), *(m.atoms[zero_index[m.pair]].tolist() for m in weights))
        producing = producers if exact else [m for m in producers if m in weights]
        going = (_all_zero(consumers, zero) | _all_zero(producing, zero)) - set(group.frozen)
        if going == set(group.atoms.tolist()):
            going.discard(min(going))  # a layer keeps at least one channel (a zero one: still exact)
        if going:
            removable[group.id] = sorted(going)
        if masked - going:
            notes.append(_why_kept(narrowing, group, sorted(masked - going), consts, weights, zero_index))
    return removable, notes


def _all_zero(members, zero) -> set:
    """Atoms zero in every member; none if some member is not a constant (or there is none)."""
    if not members or not all(m.is_const for m in members):
        return set()
    return set.intersection(*(zero[m.pair] for m in members))


def _why_kept(narrowing, group, atoms, consts, weights, zero_index) -> str:
    of_atoms = {m.pair: np.isin(m.atoms, atoms) for m in consts}
    first = next(m for m in weights if np.any(zero_index[m.pair] & of_atoms[m.pair]))
    index = np.flatnonzero(zero_index[first.pair] & of_atoms[first.pair]).tolist()
    live_in = sorted({narrowing.source(m) for m in consts if np.any(~zero_index[m.pair] & of_atoms[m.pair])})
    frozen = sorted({group.frozen[a] for a in atoms if a in group.frozen})
    why = "; ".join(frozen) if frozen else f"not zero in {', '.join(live_in)}"
    return f"channels {index} of {narrowing.source(first)} axis {first.axis} are zero (masked) but {why}"
