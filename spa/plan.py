"""A pruning plan: which channels go. Serialisable to the documented JSON schema and replayable.

JSON schema (version 1):
{
  "spa_plan": 1,
  "model": "<file name the plan was made for>",
  "groups":  [{"id": int, "kind": "channels" | "heads" | "head-dim" | "hidden", "size": int, "removed": int,
               "members": [[tensor, axis], ...]}],
  "weights": [{"name": str, "axis": int, "group": int, "kept": [int], "removed": [int]}]
}
`weights` has one entry per sliced weight tensor axis (initializer or Constant output); indices are
into the original tensor. `spa apply-plan` re-analyses the model and replays the removals.
"""
from __future__ import annotations

import json

import numpy as np

from .errors import SpaError
from .groups import Analysis


class Plan:
    def __init__(self, analysis: Analysis, removed_atoms):
        self.analysis = analysis
        self.removed_atoms = np.array(sorted(int(a) for a in removed_atoms), dtype=np.int64)
        atoms = max(len(analysis.atom_group), int(self.removed_atoms[-1]) + 1 if len(self.removed_atoms) else 0)
        self._atom_removed = np.zeros(atoms, dtype=bool)
        self._atom_removed[self.removed_atoms] = True
        self._removed = {}
        # set by spa.selection: channels a ratio asked for, channels --round-to restored, groups it kept whole
        self.selection = {"asked": None, "restored": 0, "whole": 0}

    def _removed_mask(self, tensor, axis):
        member = self.analysis.members.get((tensor, axis))
        return None if member is None else self._atom_removed[member.atoms]

    def removed(self, tensor, axis):
        pair = (tensor, axis)
        if pair not in self._removed:
            mask = self._removed_mask(tensor, axis)
            self._removed[pair] = np.zeros(0, dtype=np.int64) if mask is None else np.flatnonzero(mask)
        return self._removed[pair]

    def changed(self, tensor, axis) -> bool:
        return len(self.removed(tensor, axis)) > 0

    def size(self, tensor, axis) -> int:
        """Channels on the axis: its static size, or the channel count of a virtual axis (heads
        folded into a symbolic size)."""
        member = self.analysis.members.get((tensor, axis))
        return member.size if member is not None else self.analysis.graph.dim(tensor, axis)

    def kept(self, tensor, axis):
        mask = self._removed_mask(tensor, axis)
        return np.arange(self.size(tensor, axis)) if mask is None else np.flatnonzero(~mask)

    def new_dim(self, tensor, axis) -> int:
        return int(self.size(tensor, axis) - len(self.removed(tensor, axis)))

    def removed_by_group(self):
        counts = {}
        for atom in self.removed_atoms:
            gid = self.analysis.atom_group[int(atom)]
            counts[gid] = counts.get(gid, 0) + 1
        return counts

    def weight_entries(self):
        entries = []
        for member in self.analysis.members.values():
            if not member.is_const:
                continue
            removed = self.removed(member.tensor, member.axis)
            if len(removed) == 0:
                continue
            gid = self.analysis.atom_group[int(member.atoms[0])]
            entries.append({"name": member.tensor, "axis": member.axis, "group": gid,
                            "kept": self.kept(member.tensor, member.axis).tolist(),
                            "removed": removed.tolist()})
        return entries

    def to_json(self, model_name: str = "") -> dict:
        by_group = self.removed_by_group()
        groups = [{"id": g.id, "kind": g.kind, "size": len(g.atoms), "removed": by_group.get(g.id, 0),
                   "members": [[m.tensor, m.axis] for m in g.members]}
                  for g in self.analysis.groups if by_group.get(g.id)]
        return {"spa_plan": 1, "model": model_name, "groups": groups, "weights": self.weight_entries()}

    def save(self, path: str, model_name: str = ""):
        with open(path, "w") as f:
            json.dump(self.to_json(model_name), f, indent=1)


def load_plan(analysis: Analysis, path: str) -> Plan:
    """Replay a plan file on a freshly analysed model; every weight entry must match exactly."""
    try:
        with open(path) as f:
            data = json.load(f)
        entries = data["weights"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpaError(f"{path} is not a SPA plan ({type(exc).__name__})") from None
    atoms = set()
    for entry in entries:
        member = analysis.members.get((entry["name"], int(entry["axis"])))
        if member is None:
            raise SpaError(f"plan names weight '{entry['name']}' axis {entry['axis']}, which this model does not have")
        removed = np.asarray(entry["removed"], dtype=np.int64)
        if len(removed) and (removed.min() < 0 or removed.max() >= member.size):
            raise SpaError(f"plan indices out of range for '{entry['name']}'")
        atoms.update(int(a) for a in np.unique(member.atoms[removed]))
    plan = Plan(analysis, atoms)
    for entry in entries:
        got = plan.removed(entry["name"], int(entry["axis"]))
        if sorted(entry["removed"]) != got.tolist():
            raise SpaError(f"plan is inconsistent with the model's channel coupling at '{entry['name']}'")
    return plan
