"""Control flow: the selector If that spa.control_flow.flattened leaves where it moved an If's branches out."""
from __future__ import annotations

from ..control_flow import branches
from ..graph import _subgraphs
from . import Frozen, Rule, identity, register


@register
class Selector(Rule):
    """An If whose branches only pass tensors of the enclosing graph on (Identity, or the name itself):
    output k is then-source k or else-source k, channel for channel, so the three share every axis.
    A Loop whose body spa.control_flow.flattened copied out as its first iteration: `_loop_links`.
    Any other If, Loop or Scan stays a boundary: its bodies are not analysed."""

    ops = ("If", "Loop", "Scan")

    def propagate(self, c, tensor, axis):
        loop = next((f for f in c.g.folding if f.kind == "Loop" and f.name == c.node.name), None) \
            if c.node.op_type == "Loop" else None
        if loop is not None:
            return _loop_links(c, loop.stepped[1:], tensor, axis)
        sources = _passed(c.node)
        if sources is None:
            raise Frozen(f"control flow ({c.node.op_type}) is a boundary")
        rows = [(out, *row) for out, row in zip(c.node.output, zip(*sources)) if tensor in (out, *row)]
        if not rows:
            raise Frozen("the condition of an If")
        size = c.dim(tensor, axis)
        return [identity((tensor, axis), (t, axis), size) for row in rows for t in dict.fromkeys(row)
                if t and t != tensor]


def _passed(node) -> list | None:
    """[then sources, else sources], the enclosing graph's tensors each branch output passes on, for a
    selector If; None for any other control-flow node."""
    pair = branches(node)
    if not pair:
        return None
    found = []
    for branch in pair:
        if any(n.op_type != "Identity" or _subgraphs(n) for n in branch.node) or len(branch.output) != len(node.output):
            return None
        made = {n.output[0]: n.input[0] for n in branch.node}
        local = {t.name for t in branch.initializer}
        sources = [made.get(o.name, o.name) for o in branch.output]
        if any(s in local or s in made for s in sources):
            return None
        found.append(sources)
    return found


def _loop_links(c, stepped: tuple, tensor, axis) -> list:
    """A flattened Loop: its loop-carried value k (initial value, final value and, in the first-iteration copy,
    what the body hands the next iteration: `stepped`[k]) shares every axis, which the recurrence needs; scan
    output j's axis a+1 is the copy's scan value j's axis a (its axis 0 counts iterations). What its body reads
    of the enclosing graph the copy reads too: no link here."""
    node = c.node
    carried = len(node.input) - 2
    size = c.dim(tensor, axis)
    if tensor in node.input[:2] and tensor not in node.input[2:]:
        raise Frozen("the trip count or condition of a Loop")
    if tensor in node.output[carried:] and axis == 0:
        raise Frozen("the iterations axis of a Loop's scan output")
    links = []  # one tensor may start several loop-carried values (tf2onnx starts h and c from one zeros)
    for k, given in enumerate(node.input[2:]):
        if tensor in (given, node.output[k], stepped[k]):
            links += [(t, axis) for t in (given, node.output[k], stepped[k]) if t and t != tensor]
    for out, value in zip(node.output[carried:], stepped[carried:]):
        links += [(value, axis - 1)] if tensor == out else [(out, axis + 1)] if tensor == value else []
    return [identity((tensor, axis), pair, size) for pair in dict.fromkeys(links)]
