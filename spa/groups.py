"""Find coupled channels: mask propagation through the rule registry, then connected components.

Every tensor axis that carries channels gets a block of integer ids, one per index. Rules link
ids (removed together); the connected components of those links are the *channels* (atoms) that
can be removed, and pairs (tensor, axis) joined by links form a *group*.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import onnx

from .errors import SpaError
from .control_flow import flattened
from .graph import Graph
from .rules import Ctx, Frozen, FreezeIndices, Link, rule_for


GRANULARITIES = ("channels", "heads", "head-dim", "hidden")


@dataclass
class Options:
    """Analysis switches.

    granularity: which units may be pruned. "channels" (conv filters, MLP intermediate
    channels, recurrent hidden units) and "heads" (whole attention heads, with the KV heads their
    queries share) are exact and the default; "head-dim" prunes the same position in every head
    instead of whole heads; "hidden" prunes through LayerNorm/RMSNorm statistics (approximate).
    """

    granularity: tuple = ("channels", "heads")
    approximate_nodes: set = field(default_factory=set)
    # set by analyze: grouped-query nodes (`Rule.held_heads`: a repeat's Reshape of an Expand, a
    # GroupQueryAttention) whose key/value heads are held (a cache in the graph inputs); their query
    # heads prune as slots, the j-th of every group together
    query_slots: frozenset = frozenset()

    def __post_init__(self):
        unknown = set(self.granularity) - set(GRANULARITIES)
        if unknown:
            raise SpaError(f"unknown granularity {', '.join(sorted(unknown))} (known: {', '.join(GRANULARITIES)})")
        if "heads" in self.granularity and "head-dim" in self.granularity:
            raise SpaError("choose heads or head-dim, not both")

    @property
    def approximate(self) -> bool:
        return "hidden" in self.granularity


@dataclass
class Member:
    """One tensor axis that carries a group's channels."""

    tensor: str
    axis: int
    size: int
    base: int
    is_const: bool
    linked_by: str  # node that first put channels on this axis ('' for a source)
    atoms: np.ndarray | None = None  # channel (atom) id of each index

    @property
    def pair(self):
        return (self.tensor, self.axis)

    @property
    def ids(self):
        return np.arange(self.base, self.base + self.size)


@dataclass
class Group:
    id: int
    members: list
    atoms: np.ndarray  # sorted channel ids
    frozen: dict  # channel id -> reason
    has_params: bool
    units: set = field(default_factory=set)  # tags from the links: head, slot, head-dim, approximate, block

    @property
    def kind(self) -> str:
        """The granularity this group's channels belong to."""
        if "approximate" in self.units:
            return "hidden"
        if "head" in self.units or "slot" in self.units:  # a slot: the same query head of every group
            return "heads"
        if "head-dim" in self.units:
            return "head-dim"
        return "channels"

    def channels(self, atoms=None) -> int:
        """Channels among `atoms` (default all of this group's): one an atom, or where channels go in
        blocks (unit "block": MatMulNBits' input blocks), those the atoms cover in the narrowest member
        with more indices than atoms (a block's activation; a fused gate-and-up weight holds each
        channel twice)."""
        atoms = self.atoms if atoms is None else np.asarray(atoms)
        wide = [m for m in self.members if m.size > len(self.atoms)]
        if "block" not in self.units or self.kind != "channels" or not wide:
            return len(atoms)
        return int(np.isin(min(wide, key=lambda m: m.size).atoms, atoms).sum())

    @property
    def prunable_atoms(self):
        return np.array([a for a in self.atoms if a not in self.frozen], dtype=np.int64)

    @property
    def prunable(self):
        return self.has_params and len(self.prunable_atoms) > 1

    def reasons(self):
        return sorted(set(self.frozen.values()))


@dataclass
class Analysis:
    graph: Graph
    options: Options
    members: dict  # pair -> Member
    groups: list
    contracted: list  # (node index, input slot, axis): consumer slices the oracle zeroes
    atom_group: dict  # channel id -> group id
    input_shapes: dict | None = None  # {input: shape} to count MACs at (symbolic sizes default to 32)

    @property
    def model(self):
        return self.graph.model

    @cached_property
    def concrete_shapes(self) -> dict:
        """spa.cost.concrete_shapes of the model (batch 1) at `input_shapes`, computed once: the selector,
        the budget and the allocation's checks all read them (shape inference of MiniLM: 0.1 s a time).
        Read only."""
        from .cost import concrete_shapes

        return concrete_shapes(self.model, shapes=self.input_shapes)

    @cached_property
    def contracted_pairs(self) -> set:
        """(tensor, axis) pairs read as contracted consumer inputs (a layer's in-channels)."""
        return {(self.graph.nodes[i].input[s], a) for i, s, a in self.contracted}


def analyze(model: onnx.ModelProto | Graph, options: Options | None = None) -> Analysis:
    from .shared_tensors import split_shared_tensors

    graph = model if isinstance(model, Graph) else _graph(model)
    options = options or Options()
    propagation = Propagation(graph, options)
    analysis = propagation.run()
    if split_shared_tensors(propagation):  # a shared mask's readers get their own copies: again
        analysis = Propagation(graph, options).run()
    held = _held_query_heads(analysis)
    if held and "heads" in options.granularity:
        analysis = Propagation(graph, replace(options, query_slots=options.query_slots | held)).run()
        note = (f"{len(held)} grouped-query attention{'s' if len(held) > 1 else ''} read key/value heads that the "
                "graph's inputs or outputs hold (a cache): their query heads prune as slots, the same query head of "
                "every key/value group together")
        if note not in graph.notes:
            graph.notes.append(note)
    return analysis


def _graph(model: onnx.ModelProto) -> Graph:
    """The analysis's view of `model`: where an If holds layers, of a copy with its branches flattened into
    the enclosing graph (spa.control_flow.flattened), which the rewrite folds back."""
    flat, found = flattened(model)
    graph = Graph(flat)
    if found:
        graph.folding = tuple(found)
    ifs, loops = sum(f.kind == "If" for f in found), sum(f.kind == "Loop" for f in found)
    if ifs:
        graph.notes.append(f"{ifs} If{'s' if ifs > 1 else ''} hold{'s' if ifs == 1 else ''} layers: both branches "
                           "are analysed as one graph, a weight they share prunes alike in both, and calibration runs "
                           "both branches")
    if loops:
        graph.notes.append(f"{loops} Loop{'s' if loops > 1 else ''} hold{'s' if loops == 1 else ''} layers: the body "
                           "is analysed as its first iteration, what it hands the next iteration keeping the channels "
                           "it was given; the layers inside are calibrated on every iteration's inputs, and MACs "
                           "count one iteration")
    return graph


def _held_query_heads(analysis: Analysis) -> frozenset:
    """Nodes whose grouped-query head group (`Rule.held_heads`) is frozen by graph inputs or outputs
    alone (the key/value cache of a decoder exported for generation): key/value heads cannot go, but
    the query heads sharing them can, as slots."""
    g, held = analysis.graph, set()
    for index, node in enumerate(g.nodes):
        if g.node_name(index) in analysis.options.query_slots:
            continue
        pair = rule_for(node).held_heads(Ctx(g, index, analysis.options))
        member = analysis.members.get(pair) if pair is not None else None
        group = analysis.groups[analysis.atom_group[int(member.atoms[0])]] if member is not None else None
        if group is not None and group.kind == "heads" and group.frozen and all(
                reason.startswith("graph ") for reason in group.reasons()):
            held.add(g.node_name(index))
    return frozenset(held)


class Propagation:
    def __init__(self, graph: Graph, options: Options):
        self.g = graph
        self.options = options
        self.members: dict = {}
        self.next_id = 0
        self.edges: list = []
        self.pair_edges: list = []
        self.freezes: list = []  # (ids, reason)
        self.contracted: set = set()
        self.units: list = []  # (pair, unit tag)
        self.virtual: dict = {}  # pair -> channels of an axis that also folds in a symbolic size
        self.queue: deque = deque()

    def run(self) -> Analysis:
        for i, node in enumerate(self.g.nodes):
            ctx = Ctx(self.g, i, self.options)
            try:
                sources = rule_for(node).sources(ctx)
            except Frozen:
                sources = []
            for pair in sources:
                self.mark(pair, "")
        while self.queue:
            self.visit(self.queue.popleft())
        return self.components()

    def mark(self, pair, linked_by, virtual_size=None) -> bool:
        if pair in self.members:
            return True
        tensor, axis = pair
        size = self.g.dim(tensor, axis) or virtual_size
        if size is None:
            return False
        if virtual_size and self.g.dim(tensor, axis) is None:
            self.virtual[pair] = virtual_size
        member = Member(tensor, axis, size, self.next_id, tensor in self.g.consts, linked_by)
        self.members[pair] = member
        self.next_id += size
        self.queue.append(pair)
        if tensor in self.g.graph_outputs:
            self.freeze(pair, None, f"graph output '{tensor}' keeps its size")
        if tensor in self.g.graph_inputs:
            self.freeze(pair, None, f"graph input '{tensor}' keeps its size")
        return True

    def freeze(self, pair, indices, reason):
        member = self.members[pair]
        ids = member.ids if indices is None else member.base + np.asarray(indices)
        self.freezes.append((ids, reason))

    def adjacent(self, tensor):
        nodes = [i for i, _ in self.g.consumers.get(tensor, [])]
        if tensor in self.g.producer:
            nodes.append(self.g.producer[tensor])
        return list(dict.fromkeys(nodes))

    def visit(self, pair):
        # Rules are complete: entered from any of their tensors they link every tensor that
        # shares the channel, so the node that marked this pair need not be asked again (and
        # one-way maps such as Flatten's are not asked to invert themselves).
        tensor, axis = pair
        origin = self.members[pair].linked_by
        for i in self.adjacent(tensor):
            name = self.g.node_name(i)
            node = self.g.nodes[i]
            if name == origin and not (rule_for(node).hub_output and self.g.producer.get(tensor) == i):
                continue
            try:
                results = rule_for(node).propagate(Ctx(self.g, i, self.options, self.virtual, self.members), tensor, axis)
            except Frozen as frozen:
                self.freeze(pair, None, f"{node.op_type} '{name}': {frozen}")
                continue
            except Exception as exc:  # a rule that cannot read this node must not guess
                self.freeze(pair, None, f"{node.op_type} '{name}': rule failed ({type(exc).__name__}: {exc})")
                continue
            for result in results:
                if isinstance(result, FreezeIndices):
                    self.freeze(result.pair, result.indices, f"{node.op_type} '{name}': {result.reason}")
                else:
                    self.link(result, i, name)

    def link(self, link: Link, node_index: int, name: str):
        rank = self.g.rank(link.dst[0])
        dst = (link.dst[0], link.dst[1] % rank) if rank else link.dst
        virtual = link.dst_size
        if virtual is None and link.src in self.virtual and len(link.dst_idx):
            virtual = int(np.max(link.dst_idx)) + 1  # a virtual axis stays virtual through layout ops
        if not rank or not self.mark(dst, name, virtual):
            self.freeze(link.src, None, f"'{name}': size of '{dst[0]}' axis {dst[1]} unknown")
            return
        src_m, dst_m = self.members[link.src], self.members[dst]
        src_idx, dst_idx = np.asarray(link.src_idx), np.asarray(link.dst_idx)
        if len(src_idx) != len(dst_idx) or (len(src_idx) and (
                src_idx.max() >= src_m.size or dst_idx.max() >= dst_m.size or min(src_idx.min(), dst_idx.min()) < 0)):
            self.freeze(link.src, None, f"'{name}': inconsistent channel map to '{dst[0]}'")
            return
        self.edges.append((src_m.base + src_idx, dst_m.base + dst_idx))
        self.pair_edges.append((link.src, dst))
        if link.unit:
            self.units.append((link.src, link.unit))
        if link.contracted is not None:
            node_index, slot = link.contracted
            tensor = self.g.nodes[node_index].input[slot]
            axis = link.src[1] if link.src[0] == tensor else dst[1]
            self.contracted.add((node_index, slot, axis))

    def components(self) -> Analysis:
        n = self.next_id
        if self.edges:
            a = np.concatenate([e[0] for e in self.edges])
            b = np.concatenate([e[1] for e in self.edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        atom_of = connected_components(n, a, b)
        frozen = {}
        for ids, reason in self.freezes:
            for atom in np.unique(atom_of[ids]):
                frozen.setdefault(int(atom), reason)
        pairs = list(self.members)
        index = {p: k for k, p in enumerate(pairs)}
        pa = [index[x] for x, _ in self.pair_edges]
        pb = [index[y] for _, y in self.pair_edges]
        group_of = connected_components(len(pairs), np.array(pa, dtype=np.int64), np.array(pb, dtype=np.int64))
        by_group: dict = {}
        for p, gid in zip(pairs, group_of):
            member = self.members[p]
            member.atoms = atom_of[member.base:member.base + member.size]
            by_group.setdefault(int(gid), []).append(member)
        units: dict = {}
        for pair, unit in self.units:
            units.setdefault(int(group_of[index[pair]]), set()).add(unit)
        groups, atom_group = [], {}
        for key, members in by_group.items():
            gid = len(groups)
            atoms = np.unique(np.concatenate([m.atoms for m in members]))
            atom_list = atoms.tolist()
            group_frozen = {a: frozen[a] for a in atom_list if a in frozen}
            groups.append(Group(gid, members, atoms, group_frozen, any(m.is_const for m in members),
                                units.get(key, set())))
            atom_group.update(dict.fromkeys(atom_list, gid))
        return Analysis(self.g, self.options, self.members, groups, sorted(self.contracted), atom_group)


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (0..k-1, numbered by smallest member) of each of n nodes joined by the
    edges a[i]-b[i]: hook every root onto the smallest root it touches, then compress paths,
    until no edge joins two roots (numpy's answer to union-find; importing scipy's costs more
    than the whole analysis)."""
    labels = np.arange(n)
    while True:
        while True:  # compress: every node points at its root
            root = labels[labels]
            if np.array_equal(root, labels):
                break
            labels = root
        la, lb = labels[a], labels[b]
        if np.array_equal(la, lb):
            return np.unique(labels, return_inverse=True)[1].reshape(n)
        low = np.minimum(la, lb)
        np.minimum.at(labels, la, low)
        np.minimum.at(labels, lb, low)
