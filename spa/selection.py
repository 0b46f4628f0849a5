"""Choose which channels go: uniform per group, global ranking, or to a parameter / MAC budget."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from .cost import count_params, macs_by_op
from .errors import SpaError
from .groups import Analysis
from .plan import Plan


@dataclass
class Target:
    ratio: float | None = None  # fraction of each group's (or, global, of all) channels removed
    global_ranking: bool = False
    keep_params: float | None = None  # fraction of parameters kept
    keep_macs: float | None = None  # fraction of MACs kept
    max_group_ratio: float = 0.9  # never remove more than this fraction of one group
    round_to: int = 1
    ignore: list = field(default_factory=list)

    def check(self):
        for name in ("ratio", "keep_params", "keep_macs"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise SpaError(f"{name.replace('_', '-')} must be between 0 and 1 (exclusive), got {value}")
        if sum(v is not None for v in (self.ratio, self.keep_params, self.keep_macs)) != 1:
            raise SpaError("give exactly one target: a ratio, a parameter fraction or a MAC fraction")
        if not 0 < self.max_group_ratio <= 1:
            raise SpaError("max group ratio must be in (0, 1]")
        if self.round_to < 1:
            raise SpaError("round-to must be a positive integer")


def ignored_atoms(analysis: Analysis, patterns) -> set:
    """Channels touching ignored nodes or initializers; an unmatched pattern is an error."""
    g = analysis.graph
    names = {}
    for i, node in enumerate(g.nodes):
        names.setdefault(g.node_name(i), set()).update(x for x in list(node.input) + list(node.output) if x)
    for t in g.consts:
        names.setdefault(t, set()).add(t)
    atoms = set()
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise SpaError(f"--ignore '{pattern}' matches no node or initializer")
        tensors = set().union(*(names[n] for n in matched))
        for member in analysis.members.values():
            if member.tensor in tensors:
                atoms.update(int(a) for a in member.atoms)
    return atoms


class Selector:
    def __init__(self, analysis: Analysis, scores: dict, target: Target):
        target.check()
        self.analysis = analysis
        self.target = target
        self.scores = scores
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
            raise SpaError("nothing prunable: every channel group is frozen (see `spa analyze`)")

    def _limit(self, group_id):
        group = self.analysis.groups[group_id]
        return min(int(math.floor(self.target.max_group_ratio * len(group.atoms))), len(group.atoms) - 1)

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
        accepted = []
        for gid, (atoms, _) in self.candidates.items():
            count = int(math.floor(ratio * len(atoms)))
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
        """Keep a multiple of round_to channels per group by restoring the best removed ones."""
        n = self.target.round_to
        if n == 1:
            return accepted
        by_group = {}
        for gid, atom in accepted:
            by_group.setdefault(gid, []).append(atom)
        result = []
        for gid, atoms in by_group.items():
            total = len(self.analysis.groups[gid].atoms)
            keep_removed = len(atoms)
            while keep_removed > 0 and (total - keep_removed) % n:
                keep_removed -= 1
            result += [(gid, a) for a in atoms[:keep_removed]]
        return result

    def to_budget(self, order, measure, keep_fraction):
        full = measure([])
        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if measure(self.round(order[:mid])) <= keep_fraction * full:
                hi = mid
            else:
                lo = mid + 1
        return self.round(order[:lo])

    def select(self) -> Plan:
        t = self.target
        if t.ratio is not None and not t.global_ranking:
            accepted = self.round(self.uniform(t.ratio))
        elif t.ratio is not None:
            order = self.global_order()
            total = sum(len(a) for a, _ in self.candidates.values())
            accepted = self.round(order[:int(math.floor(t.ratio * total))])
        else:
            order = self.global_order()
            if t.keep_params is not None:
                accepted = self.to_budget(order, self.params_of, t.keep_params)
            else:
                self.shapes = self._shapes()
                accepted = self.to_budget(order, self.macs_of, t.keep_macs)
        if not accepted:
            raise SpaError("the target removes no channel (groups too small for this ratio)")
        return Plan(self.analysis, [a for _, a in accepted])

    def params_of(self, accepted):
        return count_params(self.analysis.graph, Plan(self.analysis, [a for _, a in accepted]))

    def _shapes(self):
        from .cost import concrete_shapes
        return concrete_shapes(self.analysis.model)

    def macs_of(self, accepted):
        plan = Plan(self.analysis, [a for _, a in accepted])
        return sum(macs_by_op(self.analysis.graph, self.shapes, plan).values())


def select(analysis: Analysis, scores: dict, target: Target) -> Plan:
    return Selector(analysis, scores, target).select()
