"""Choose which channels go: uniform per group, global ranking, or to a parameter / MAC budget."""
from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .cost import count_macs, count_params
from .errors import SpaError
from .graph import subgraph_weights
from .groups import Analysis
from .plan import Plan
from .quant import integer_conv_weights


@dataclass
class Target:
    ratio: float | None = None  # fraction of each group's (or, global, of all) channels removed
    global_ranking: bool = False
    keep_params: float | None = None  # fraction of parameters kept
    keep_macs: float | None = None  # fraction of MACs kept
    latency: float | None = None  # fraction of the measured onnxruntime latency kept
    max_group_ratio: float = 0.9  # never remove more than this fraction of one group
    round_to: int | str = 1  # or "auto": the multiple the latency tables favour
    round_from: int = 1  # groups narrower than this many channels keep exact widths
    # > 1: groups an int8 conv reads are rounded at any width (its kernels want channels in 4s), and those an int8
    # depthwise conv reads keep multiples of this as well
    integer_rounding: int = 1
    ignore: list = field(default_factory=list)
    ratios: dict = field(default_factory=dict)  # {glob: ratio} for the groups of matching layers (first wins)
    batch: int = 1  # latency targets and round_to "auto": measured at this batch size
    threads: int | None = None  # and with this many onnxruntime threads (None: its default)

    def check(self):
        for name, flag in (("ratio", "ratio"), ("keep_params", "target-params"), ("keep_macs", "target-macs"),
                           ("latency", "target-latency")):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise SpaError(f"{flag} must be between 0 and 1 (exclusive), got {value}")
        budget = self.keep_params is not None or self.keep_macs is not None  # both: both are met
        given = sum(v is not None for v in (self.ratio, self.latency)) + budget
        if given > 1 or (given == 0 and not self.ratios):
            raise SpaError("give exactly one target: a ratio, a parameter and/or MAC fraction, or a latency fraction")
        for pattern, value in self.ratios.items():
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise SpaError(f"ratio for '{pattern}' must be in [0, 1), got {value!r}")
        if self.ratios and (given and self.ratio is None or self.global_ranking):
            raise SpaError("per-layer ratios (--ratio-for) set each group's share and work with --ratio or alone, "
                           "not with --global or a parameter, MAC or latency target")
        if not 0 < self.max_group_ratio <= 1:
            raise SpaError("max group ratio must be in (0, 1]")
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise SpaError(f"round-to must be a positive integer or auto, got {self.round_to!r}")
        if not isinstance(self.integer_rounding, int) or self.integer_rounding < 1:
            raise SpaError(f"the integer rounding must be a positive integer, got {self.integer_rounding!r}")
        if self.batch < 1 or (self.threads is not None and self.threads < 1):
            raise SpaError("latency batch and threads must be positive integers")

    @property
    def measures_latency(self) -> bool:
        return self.latency is not None or self.round_to == "auto"


def _tensors_by_name(analysis: Analysis) -> dict:
    """Node and initializer names -> the tensors they read or write (or are)."""
    g = analysis.graph
    names = {}
    for i, node in enumerate(g.nodes):
        names.setdefault(g.node_name(i), set()).update(x for x in list(node.input) + list(node.output) if x)
    for t in g.consts:
        names.setdefault(t, set()).add(t)
    return names


def _matching_tensors(names: dict, pattern: str, flag: str) -> set:
    matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        raise SpaError(f"{flag} '{pattern}' matches no node or initializer")
    return set().union(*(names[n] for n in matched))


def _outputs_by_name(analysis: Analysis) -> dict:
    """Node names -> their outputs; initializer names -> the outputs of the nodes reading them."""
    g = analysis.graph
    names = {}
    for i, node in enumerate(g.nodes):
        outputs = {x for x in node.output if x}
        names.setdefault(g.node_name(i), set()).update(outputs)
        for x in node.input:
            if x in g.consts:
                names.setdefault(x, set()).update(outputs)
    return names


def group_ratios(analysis: Analysis, ratios: dict, prunable=None) -> dict:
    """Group id -> ratio for the groups of the channels that matching layers produce (a node name,
    or a weight name standing for the nodes reading it; Torch-Pruning's pruning_ratio_dict). The
    first matching pattern wins; a pattern matching nothing is an error, and so, given the ids of
    the `prunable` groups, is one that sets the share of none of them."""
    names, chosen = _outputs_by_name(analysis), {}
    for pattern, ratio in ratios.items():
        tensors = _matching_tensors(names, pattern, "--ratio-for")
        matched = [g.id for g in analysis.groups if any(m.tensor in tensors and not m.is_const for m in g.members)]
        if prunable is not None and not any(g in prunable for g in matched):
            raise SpaError(f"--ratio-for '{pattern}' sets no group's share: the channels those layers produce are "
                           "frozen or kept (see spa analyze)")
        if prunable is not None and not any(g in prunable and g not in chosen for g in matched):
            raise SpaError(f"--ratio-for '{pattern}' sets no group's share: an earlier --ratio-for sets every group "
                           "it matches (the first matching GLOB wins)")
        for gid in matched:
            chosen.setdefault(gid, float(ratio))
    return chosen


def ignored_atoms(analysis: Analysis, patterns) -> set:
    """Channels touching ignored nodes or initializers; an unmatched pattern is an error."""
    names = _tensors_by_name(analysis)
    atoms = set()
    for pattern in patterns:
        tensors = _matching_tensors(names, pattern, "--ignore")
        for member in analysis.members.values():
            if member.tensor in tensors:
                atoms.update(int(a) for a in member.atoms)
    return atoms


def nothing_prunable(analysis: Analysis) -> SpaError:
    """The error for a model with no channel a target could remove."""
    inside = subgraph_weights(analysis.model)
    if not analysis.groups and inside:
        return SpaError(f"nothing prunable: no channel groups; the model keeps {sum(inside.values())} weights inside "
                        f"control-flow bodies ({', '.join(inside)}), which SPA does not prune")
    nodes = analysis.model.graph.node
    classical = sorted({n.op_type for n in nodes if n.domain == "ai.onnx.ml"})
    weights = {t.name for t in analysis.model.graph.initializer if len(t.dims) >= 2}
    readers = {(n.domain, n.op_type) for n in nodes if weights.intersection(n.input)}  # of a weight matrix
    if not analysis.groups and classical and all(domain == "ai.onnx.ml" for domain, _ in readers):
        return SpaError(f"nothing prunable: no channel groups; this is a classical machine-learning model "
                        f"(ai.onnx.ml {', '.join(classical)}), with no neural-network layers to narrow")
    custom = sorted(f"{domain}::{op}" for domain, op in readers if domain not in STANDARD_DOMAINS)
    if custom and len(custom) == len(readers) and not any(g.has_params for g in analysis.groups):
        return SpaError(f"nothing prunable: no channel group holds a weight; the weights are read by custom-domain ops "
                        f"that SPA has no rule for ({', '.join(custom)}){_custom_hint(custom)}")
    if not analysis.groups:
        return SpaError("nothing prunable: no channel groups (no rule links any weight's channels to the rest of "
                        "the model; `spa analyze` lists the weights and the ops that read them)")
    hint = _hidden_hint(analysis)
    return SpaError(f"nothing prunable: every channel group is frozen (see `spa analyze`){hint}")


STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
QONNX_DOMAINS = ("onnx.brevitas", "qonnx.custom_op.general", "finn.custom_op.general")


def _custom_hint(custom: list) -> str:
    """What to export instead, where the custom ops are a known quantisation format's."""
    if any(op.split("::")[0] in QONNX_DOMAINS for op in custom):
        return ("; this is a QONNX export (Brevitas or FINN quantisation, whose Quant ops onnxruntime cannot run): "
                "export the float model, or quantise with QuantizeLinear/DequantizeLinear, which SPA prunes")
    return ""


def _hidden_hint(analysis: Analysis) -> str:
    """Where --granularity hidden (pruning through normalisation statistics, approximate) would find
    prunable groups that the default does not: the clause that says so ('' otherwise)."""
    from dataclasses import replace

    from .groups import analyze

    if analysis.options.approximate:
        return ""
    wider = analyze(analysis.graph, replace(analysis.options, granularity=(*analysis.options.granularity, "hidden"),
                                            approximate_nodes=set()))
    groups = [g for g in wider.groups if g.prunable and g.kind == "hidden"]
    if not groups:
        return ""
    channels = sum(len(g.prunable_atoms) for g in groups)
    return (f"; {len(groups)} group{'s' * (len(groups) > 1)} of {channels} channels would prune through "
            "normalisation statistics with --granularity channels,hidden (approximate)")


def share_of(ratio: float, count: int) -> int:
    """How many of `count` channels `ratio` removes: floor(ratio x count), but for the float product falling an
    ulp short of a whole number (0.29 x 100 = 28.999999999999996 removed 28 channels)."""
    return int(math.floor(ratio * count + 1e-9))


def group_cap(target: Target, group) -> int:
    """The most channels of `group` a plan may remove: max_group_ratio of them, and never all."""
    return min(share_of(target.max_group_ratio, len(group.atoms)), len(group.atoms) - 1)


class Selector:
    def __init__(self, analysis: Analysis, scores: dict, target: Target, progress=lambda message: None):
        target.check()
        self.analysis = analysis
        self.target = target
        self.scores = scores
        self.progress = progress
        self.record = {"asked": None, "restored": 0, "whole": 0}  # what Plan.selection reports
        blocked = ignored_atoms(analysis, target.ignore)
        self.candidates = {}  # group id -> (atoms, scores) of prunable channels, ascending score
        allowed = analysis.options.granularity
        for group in analysis.groups:
            if group.id not in scores or not group.has_params or group.kind not in allowed:
                continue
            atoms = group.atoms
            keep = ~np.isin(atoms, np.fromiter(set(group.frozen) | blocked, dtype=np.int64))
            if keep.sum() < 2:
                continue
            order = np.argsort(scores[group.id][keep], kind="stable")
            self.candidates[group.id] = (atoms[keep][order], scores[group.id][keep][order])
        if not self.candidates:
            raise nothing_prunable(analysis)
        self.integer_groups = {gid: m for gid, m in integer_groups(analysis, target).items() if gid in self.candidates}

    def _limit(self, group_id):
        return group_cap(self.target, self.analysis.groups[group_id])

    def greedy(self, gid, order, limit=None):
        """Accept a group's channels in `order` while every member of the group keeps an index and
        the group stays within its limit. Members never span groups, so groups are independent."""
        group = self.analysis.groups[gid]
        counts = np.stack([np.bincount(np.searchsorted(group.atoms, m.atoms), minlength=len(group.atoms))
                           for m in group.members])  # indices each channel takes from each member
        remaining = np.array([m.size for m in group.members])
        limit = self._limit(gid) if limit is None else min(limit, self._limit(gid))
        taken = counts[:, np.searchsorted(group.atoms, order)]
        # fast path: the longest prefix of `order` that leaves every member an index
        fits = np.all(np.cumsum(taken, axis=1) < remaining[:, None], axis=0)
        prefix = int(np.argmin(fits)) if not fits.all() else len(order)
        accepted = [int(a) for a in order[:min(prefix, limit)]]
        remaining = remaining - taken[:, :len(accepted)].sum(axis=1)
        for k in range(len(accepted), len(order)):
            if len(accepted) >= limit:
                break
            if np.any(remaining <= taken[:, k]):
                continue
            remaining -= taken[:, k]
            accepted.append(int(order[k]))
        return accepted

    def uniform(self, ratio):
        per_group = group_ratios(self.analysis, self.target.ratios, prunable=set(self.candidates))
        accepted = []
        self.record["asked"] = 0
        for gid, (atoms, _) in self.candidates.items():
            count = share_of(per_group.get(gid, ratio or 0.0), len(atoms))
            self.record["asked"] += count
            accepted += [(gid, a) for a in self.greedy(gid, atoms, count)]
        return accepted

    def global_order(self):
        """Every group's acceptable channels, merged by score (ties keep group order)."""
        entries = []
        for gid, (atoms, group_scores) in self.candidates.items():
            score_of = dict(zip(atoms.tolist(), group_scores.tolist()))
            entries += [(score_of[a], gid, a) for a in self.greedy(gid, atoms)]
        entries.sort(key=lambda e: e[0])
        return [(gid, a) for _, gid, a in entries]

    def round(self, accepted):
        """Keep a multiple of round_to channels per group by restoring the best removed ones (channels:
        a group whose channels go in blocks counts the blocks' channels). Groups of whole attention
        heads are left as they are: each head is head-size channels wide, so any head count keeps the
        projections at a multiple of the head size; nor are groups narrower than round_from channels.
        Groups an int8 conv reads are rounded at any width, where the target's integer rounding is set (an
        int8 depthwise conv's to a multiple of it too)."""
        if self.multiple == 1 and not self.integer_groups:
            return accepted
        by_group = {}
        for gid, atom in accepted:
            by_group.setdefault(gid, []).append(atom)
        result = []
        self.record.update(restored=0, whole=0)
        for gid, atoms in by_group.items():
            group = self.analysis.groups[gid]
            total = group.channels()  # a block of a MatMulNBits' input is block-size channels
            n = self.multiple_of(gid)
            narrow = total < self.target.round_from and gid not in self.integer_groups
            if n == 1 or group.kind == "heads" or narrow:
                result += [(gid, a) for a in atoms]
                continue
            keep_removed = len(atoms)
            while keep_removed > 0 and (total - group.channels(atoms[:keep_removed])) % n:
                keep_removed -= 1
            result += [(gid, a) for a in atoms[:keep_removed]]
            self.record["restored"] += len(atoms) - keep_removed
            self.record["whole"] += int(keep_removed == 0)
        return result

    def to_budget(self, order, budgets):
        """The shortest (rounded) prefix of `order` that keeps at most `fraction` of every
        (measure, fraction) in `budgets`. The limit has a relative slack of 1e-9: a fraction that is
        itself a plan's measure over the whole (`--ratio` as a budget) times the whole comes out below
        that plan's measure in one case in twenty, which cost magika a rounding step (40 channels of 64
        at --ratio 0.5)."""
        limits = [(measure, fraction * measure([]) * (1 + 1e-9)) for measure, fraction in budgets]
        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            accepted = self.round(order[:mid])
            if all(measure(accepted) <= limit for measure, limit in limits):
                hi = mid
            else:
                lo = mid + 1
        return self.round(order[:lo])

    def latency_model(self):
        from .latency import model_for
        return model_for(self.analysis, self.target.batch, self.target.threads, self.progress)

    def multiple_of(self, gid) -> int:
        """The multiple group `gid` keeps: the target's, and the integer depthwise one's where it applies."""
        return math.lcm(self.multiple, self.integer_groups.get(gid, 1))

    @property
    def multiple(self) -> int:
        if self.target.round_to != "auto":
            return self.target.round_to
        if "_multiple" not in self.__dict__:
            from .latency import auto_multiple
            self._multiple = auto_multiple(self.latency_model())
            self.progress(f"round-to auto: keeping multiples of {self._multiple} channels (the widths the "
                          "latency tables measured fastest)")
        return self._multiple

    def select(self) -> Plan:
        t = self.target
        if t.latency is not None:
            accepted = self.to_latency(t.latency)
        elif (t.ratio is not None or t.ratios) and not t.global_ranking:
            accepted = self.round(self.uniform(t.ratio))
        elif t.ratio is not None:
            order = self.global_order()
            total = sum(len(a) for a, _ in self.candidates.values())
            self.record["asked"] = share_of(t.ratio, total)
            accepted = self.round(order[:self.record["asked"]])
        else:
            order = self.global_order()
            budgets = [(self.params_of, t.keep_params)] if t.keep_params is not None else []
            if t.keep_macs is not None:
                self.shapes = self.analysis.concrete_shapes
                budgets.append((self.macs_of, t.keep_macs))
            accepted = self.to_budget(order, budgets)
        if not accepted and self.record["whole"]:
            raise SpaError(f"the target removes no channel: widths rounded to multiples of {self.multiple} keep every "
                           f"group whole (each would lose fewer than {self.multiple} channels); --round-to 1 keeps "
                           "exact widths")
        if not accepted:
            raise SpaError("the target removes no channel (groups too small for this ratio)")
        plan = Plan(self.analysis, [a for _, a in accepted])
        plan.selection = dict(self.record)
        return plan

    def params_of(self, accepted):
        return count_params(self.analysis.graph, Plan(self.analysis, [a for _, a in accepted]))

    def macs_of(self, accepted):
        plan = Plan(self.analysis, [a for _, a in accepted])
        return count_macs(self.analysis.graph, self.shapes, plan)


    def latency_options(self, model, gid) -> list:
        """(atoms removed, value lost, {pair: indices removed}) for each candidate width of a
        group, widest first: multiples of a power-of-two step (4 to 8 of them). The value lost is
        -log(share of the group's importance kept): concave, so that no group is cut to a sliver
        for its latency (a linear sum of scores cut the first layers of a MobileNetV2 from 8 and
        16 channels to 1 and 2: 0.53 accuracy at 0.74 latency against 0.70 at 0.68 this way)."""
        from .latency import grid_step

        atoms, group_scores = self.candidates[gid]
        group = self.analysis.groups[gid]
        size = len(group.atoms)
        step = grid_step(size, self.multiple)
        keeps = [size] + [k for k in range((size - 1) // step * step, 0, -step) if size - k <= self._limit(gid)]
        score_of = dict(zip(atoms.tolist(), group_scores.tolist()))
        total = float(np.sum(np.maximum(group_scores, 0))) or 1.0
        members = [m for m in group.members if m.pair in model.pairs]
        options, seen = [], set()
        for keep in keeps:
            accepted = self.greedy(gid, atoms, size - keep)
            if len(accepted) in seen:
                continue
            seen.add(len(accepted))
            removed = np.array(accepted, dtype=np.int64)
            kept_share = max(1.0 - sum(max(score_of[a], 0.0) for a in accepted) / total, 1e-6)
            options.append((accepted, -float(np.log(kept_share)),
                            {m.pair: int(np.isin(m.atoms, removed).sum()) for m in members}))
        return options

    def to_latency(self, keep: float) -> list:
        """Maximise the log-importance kept under the latency budget: a multiple-choice knapsack over
        the groups' candidate widths (HALP), re-linearised around each solution because a layer's
        time depends on two groups at once; the best plan whose full prediction meets the budget."""
        model = self.latency_model()
        options = {gid: self.latency_options(model, gid) for gid in self.candidates}
        model.tables.measure(model.requests(o[2] for opts in options.values() for o in opts))
        budget = keep * model.whole_ms
        gids = list(options)
        state, slack, best, previous = {}, 0.0, None, None
        for _ in range(LATENCY_ROUNDS):
            costs = [[model.delta(state, o[2]) for o in options[g]] for g in gids]
            values = [[-o[1] for o in options[g]] for g in gids]
            picks = multiple_choice_knapsack(values, costs, budget - model.predict(state) - slack)
            if picks is None:
                picks = [int(np.argmin(c)) for c in costs]
            state = {p: n for g, j in zip(gids, picks) for p, n in options[g][j][2].items() if n}
            predicted = model.predict(state)
            lost = sum(options[g][j][1] for g, j in zip(gids, picks))
            if predicted <= budget and (best is None or lost < best[0]):
                best = (lost, picks)
            if picks == previous:
                break
            slack = max(0.0, slack + predicted - budget) if predicted > budget else slack / 2
            previous = picks
        if best is None:
            raise SpaError(f"target-latency {keep:g} cannot be met: the fastest plan within --max-group-ratio "
                           f"is predicted at {predicted / model.whole_ms:.2f} of the measured "
                           f"{model.whole_ms:.3g} ms")
        return [(g, a) for g, j in zip(gids, best[1]) for a in options[g][j][0]]


LATENCY_ROUNDS = 8


@contextlib.contextmanager
def _c_stdout_silenced():
    """HiGHS prints a debug line ("HighsMipSolverData::transformNewIntegerFeasibleSolution") with C
    printf whatever scipy's disp option says; it must not reach the user's terminal."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def multiple_choice_knapsack(values, costs, budget: float):
    """One option index per item maximising the total value with total cost <= budget, or None
    when no choice fits: a 0/1 integer programme solved exactly by scipy's HiGHS (on the
    ResNet-50 instance, 37 groups x 8 widths: 0.11 s, and 4% more value than a dynamic programme
    over 2000 budget steps found, docs/latency.md)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(v) for v in values]
    value = np.concatenate([np.asarray(v, dtype=np.float64) for v in values])
    cost = np.concatenate([np.asarray(c, dtype=np.float64) for c in costs])
    one_each = np.zeros((len(sizes), len(value)))
    for i, start in enumerate(np.cumsum([0] + sizes[:-1])):
        one_each[i, start:start + sizes[i]] = 1
    with _c_stdout_silenced():
        result = milp(-value, integrality=np.ones(len(value)), bounds=Bounds(0, 1),
                      constraints=[LinearConstraint(cost[None], -np.inf, budget),
                                   LinearConstraint(one_each, 1, 1)])
    if result.status != 0 or result.x is None:
        return None
    chosen = result.x.round().astype(bool)
    return [int(np.flatnonzero(chosen[start:start + n])[0]) for start, n in zip(np.cumsum([0] + sizes[:-1]), sizes)]


def integer_groups(analysis: Analysis, target: Target) -> dict:
    """{prunable group: the multiple it keeps besides the target's (1, or the target's integer rounding where an
    int8 depthwise conv reads it)} of the groups int8 convs read, where the target rounds them apart."""
    if target.integer_rounding == 1:
        return {}
    members, found = analysis.members, {}
    for weight, depthwise in integer_conv_weights(analysis.graph).items():
        for axis in (0,) if depthwise else (0, 1):
            if (weight, axis) in members:
                gid = analysis.atom_group[int(members[(weight, axis)].atoms[0])]
                found[gid] = max(found.get(gid, 1), target.integer_rounding if depthwise else 1)
    return {gid: multiple for gid, multiple in found.items() if analysis.groups[gid].prunable}


def integer_rounding_note(analysis: Analysis, target: Target) -> str | None:
    """What the integer rounding does to this model's groups, in words (None where nothing)."""
    found = integer_groups(analysis, target)
    depthwise = sum(multiple > 1 for multiple in found.values())
    narrow = sum(analysis.groups[gid].channels() < target.round_from for gid in found)
    said = [f"{depthwise} group(s) read by int8 depthwise convs keep multiples of {target.integer_rounding} "
            "channels (onnxruntime's int8 depthwise kernel takes no other width)"] * bool(depthwise) + \
        [f"{narrow} group(s) of fewer than {target.round_from} channels read by int8 convs are rounded too "
         "(onnxruntime's int8 conv kernels take input channels in 4s)"] * bool(narrow)
    return "; ".join(said) or None


def select(analysis: Analysis, scores: dict, target: Target, progress=lambda message: None) -> Plan:
    return Selector(analysis, scores, target, progress).select()


def _unit_word(group) -> str:
    """What one of a group's atoms is, in words."""
    if group.kind == "heads":
        return "heads"
    return "channel blocks" if "block" in group.units else "channels"


def limits(analysis: Analysis, target: Target, plan: Plan) -> dict:
    """What held a plan back: the prunable channels and how many went (and how many a ratio asked
    for), groups at --max-group-ratio (or down to one channel), frozen groups, groups --ignore
    keeps, and what --round-to gave back (for spa.report.missed_target)."""
    blocked = ignored_atoms(analysis, target.ignore) if target.ignore else set()
    removed = plan.removed_by_group()
    groups = [g for g in analysis.groups if g.has_params and g.kind in analysis.options.granularity]
    free = {g.id: len(set(g.prunable_atoms.tolist()) - blocked) for g in groups if g.prunable}
    open_groups = [g for g in groups if free.get(g.id, 0) >= 2]
    at_limit = sum(1 for g in open_groups if removed.get(g.id, 0) >= group_cap(target, g))
    units = [u for u in ("channels", "channel blocks", "heads") if u in {_unit_word(g) for g in open_groups}]
    rounded_apart = {gid for gid, multiple in integer_groups(analysis, target).items() if multiple > 1}
    return {"prunable_channels": sum(free[g.id] for g in open_groups), "units": " and ".join(units),
            "removed_channels": int(len(plan.removed_atoms)), "asked_channels": plan.selection["asked"],
            "at_limit": at_limit, "frozen_groups": sum(1 for g in groups if not g.prunable),
            "ignored_groups": sum(1 for g in groups if g.prunable and free[g.id] < 2),
            "rounded_back": plan.selection["restored"], "rounded_whole": plan.selection["whole"],
            "integer_depthwise_groups": sum(g.id in rounded_apart for g in open_groups)}
