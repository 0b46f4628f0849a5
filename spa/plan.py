"""A pruning plan: which channels go. Serialisable to the documented JSON schema and replayable.

JSON schema (version 1):
{
  "spa_plan": 1,
  "model": "<file name the plan was made for>",
  "groups":  [{"id": int, "kind": "channels" | "heads" | "head-dim" | "hidden", "size": int, "removed": int,
               "members": [[tensor, axis], ...], "channels_removed": int, "unit": str}],
  "weights": [{"name": str, "axis": int, "group": int, "kept": [int], "removed": [int]}],
  "weights_changed": null | "<what updated the kept weights: obspa compensation, --recover distillation>"
}
`size` and `removed` count the group's units (channels, heads); a group whose channels go in blocks
(a MatMulNBits' input) counts blocks there and says how many channels went in `channels_removed`; a
group of query-head slots (the same query head of every key/value group) has "unit": "query-head slots".
`weights` has one entry per sliced weight tensor axis (initializer or Constant output); indices are
into the original tensor. `spa apply-plan` re-analyses the model and replays the removals (the
kept weights as they are: where `weights_changed` says a prune updated them, it warns).
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
        self.weights_changed = None  # set by spa.pipeline: what updated the kept weights (a plan carries none)

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
        return {gid: len(atoms) for gid, atoms in self.removed_atoms_by_group().items()}

    def removed_atoms_by_group(self) -> dict:
        atoms = {}
        for atom in self.removed_atoms:
            atoms.setdefault(self.analysis.atom_group[int(atom)], []).append(int(atom))
        return atoms

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

    def group_entries(self) -> list:
        """The plan file's "groups": each group that loses channels, with how many."""
        by_group = self.removed_atoms_by_group()
        return [{"id": g.id, "kind": g.kind, "size": len(g.atoms), "removed": len(by_group[g.id]),
                 "members": [[m.tensor, m.axis] for m in g.members]}
                | ({"channels_removed": g.channels(by_group[g.id])} if "block" in g.units else {})
                | ({"unit": "query-head slots"} if "slot" in g.units else {})
                for g in self.analysis.groups if g.id in by_group]

    def to_json(self, model_name: str = "") -> dict:
        return {"spa_plan": 1, "model": model_name, "granularity": list(self.analysis.options.granularity),
                "groups": self.group_entries(), "weights": self.weight_entries(),
                "weights_changed": self.weights_changed}

    def save(self, path: str, model_name: str = ""):
        with open(path, "w") as f:
            json.dump(self.to_json(model_name), f, indent=1)


def load_plan(analysis: Analysis, entries: list) -> Plan:
    """Replay a plan file's weight entries (`read_plan`) on a freshly analysed model; every entry
    must match exactly, and no group may lose every channel or a channel the analysis keeps."""
    atoms = set()
    for entry in entries:
        name, axis = entry["name"], entry["axis"]
        member = analysis.members.get((name, axis))
        if member is None or not member.is_const:
            raise SpaError(f"plan names weight '{name}' axis {axis}, which this model does not have")
        removed = entry["removed"]
        if len(set(removed)) != len(removed):
            raise SpaError(f"plan removes a channel of '{name}' axis {axis} twice")
        if removed and (min(removed) < 0 or max(removed) >= member.size):
            raise SpaError(f"plan indices out of range for '{name}' (axis {axis} has {member.size} channels)")
        if entry.get("kept") is not None:
            kept = entry["kept"]
            if len(set(kept)) != len(kept) or set(kept) & set(removed) or \
                    set(kept) | set(removed) != set(range(member.size)):
                raise SpaError(f"plan entry for '{name}' axis {axis}: 'kept' and 'removed' must split its "
                               f"{member.size} channels between them")
        atoms.update(int(a) for a in np.unique(member.atoms[np.asarray(removed, dtype=np.int64)]))
    for group in analysis.groups:
        gone = [a for a in group.atoms if int(a) in atoms]
        if not gone:
            continue
        frozen = [a for a in gone if a in group.frozen]
        if frozen:
            raise SpaError(f"plan removes channels of group {group.id} that this model keeps: "
                           f"{group.frozen[frozen[0]]}")
        if len(gone) == len(group.atoms):
            raise SpaError(f"plan removes all {len(group.atoms)} channels of group {group.id} "
                           f"({group.members[0].tensor}); a layer without channels would ignore its input")
    plan = Plan(analysis, atoms)
    for entry in entries:
        got = plan.removed(entry["name"], entry["axis"])
        if sorted(entry["removed"]) != got.tolist():
            raise SpaError(f"plan is inconsistent with the model's channel coupling at '{entry['name']}'")
    return plan


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unreplayed_updates(path: str, changed: str | None) -> list:
    """[the warning] where the plan file says its prune changed the kept weights (`changed`:
    compensation, distillation), which a plan does not carry; else []."""
    if not changed:
        return []
    return [f"{path} was made with {changed}, whose weight updates a plan does not carry: the planned channels are "
            "removed and the other weights are the model's own (spa prune with the plan's flags writes the "
            "updated model)"]


def read_plan(path: str) -> tuple[list, tuple | None, str | None]:
    """(the plan file's weight entries, each checked for its fields and their types; the
    granularity it was made with, None where not recorded: plans before 2026-12-02; what its
    prune changed in the kept weights, `weights_changed`, None for nothing); anything else is one
    SpaError ("... is not a SPA plan (...)")."""
    def refuse(why):
        raise SpaError(f"{path} is not a SPA plan ({why})")

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as exc:
        raise SpaError(f"{path}: the plan cannot be read ({exc.strerror or type(exc).__name__})") from None
    except RecursionError:
        refuse("JSON nested too deeply")
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        refuse(f"not JSON: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}")
    if not isinstance(data, dict):
        refuse(f"a JSON object expected, got {type(data).__name__}")
    if "spa_plan" in data and data["spa_plan"] != 1:
        refuse(f"version {data['spa_plan']!r}; this SPA reads version 1")
    entries = data.get("weights")
    if not isinstance(entries, list):
        refuse("no 'weights' list" if entries is None else f"'weights' is a {type(entries).__name__}, not a list")
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            refuse(f"weights[{k}] is a {type(entry).__name__}, not an object")
        for key, check, what in (("name", lambda v: isinstance(v, str), "a string"),
                                 ("axis", lambda v: _int(v) and v >= 0, "an integer >= 0"),
                                 ("removed", lambda v: isinstance(v, list) and all(_int(i) for i in v),
                                  "a list of integers")):
            if key not in entry or entry[key] is None:
                refuse(f"weights[{k}] has no '{key}'")
            if not check(entry[key]):
                refuse(f"weights[{k}].{key} must be {what}, got {json.dumps(entry[key])[:60]}")
        kept = entry.get("kept")
        if kept is not None and not (isinstance(kept, list) and all(_int(i) for i in kept)):
            refuse(f"weights[{k}].kept must be a list of integers, got {json.dumps(kept)[:60]}")
        if entry.get("group") is not None and not _int(entry["group"]):
            refuse(f"weights[{k}].group must be an integer, got {json.dumps(entry['group'])[:60]}")
    units = data.get("granularity")
    if units is not None and not (isinstance(units, list) and units and all(isinstance(u, str) for u in units)):
        refuse(f"granularity must be a list of unit names, got {json.dumps(units)[:60]}")
    changed = data.get("weights_changed")
    if changed is not None and not isinstance(changed, str):
        refuse(f"weights_changed must be a string, got {json.dumps(changed)[:60]}")
    return entries, None if units is None else tuple(units), changed
