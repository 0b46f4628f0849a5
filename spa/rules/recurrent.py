"""Recurrent layers: LSTM, GRU, RNN, pruned per hidden unit across the gate blocks."""
from __future__ import annotations

import numpy as np
import onnx

from ..graph import attr
from . import Ctx, Frozen, Link, Rule, identity, register


@register
class Recurrent(Rule):
    """LSTM/GRU/RNN: hidden unit j owns row j of every gate block in W, R, B and P, column j of R,
    and the last axis of Y, Y_h, Y_c and the initial states (both directions share j)."""

    ops = ("LSTM", "GRU", "RNN")
    GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
    W_INPUT, R_HIDDEN = 2, 2  # W's input-size axis (contracted with X's last), R's hidden-input axis
    MASKED_INPUT = 1  # the slot whose input-size slices the oracle zeroes: W's

    def _hidden_axes(self, c):
        """(tensor, axis, hidden index of each position, contracted input slot or None)."""
        h = c.attr("hidden_size")
        g = self.GATES[c.node.op_type]
        every = np.arange(h)
        rows = np.tile(every, g)
        # an all-zero initial state is the op's default: the rewrite drops it instead of linking
        # it (torch builds one zeros [layers * directions, B, hidden] for every layer of a stacked
        # RNN and slices it per layer, which would tie the layers' hidden sizes together)
        states = [(c.inp(k), 2, every, None) for k in (5, 6) if not _zero_state(c, c.inp(k))]
        spec = [(c.inp(1), 1, rows, None), (c.inp(2), 1, rows, None), (c.inp(2), 2, every, 2),
                (c.inp(3), 1, np.tile(every, 2 * g), None), *states,
                (c.inp(7), 1, np.tile(every, 3), None),
                (c.out(0), 3, every, None), (c.out(1), 2, every, None), (c.out(2), 2, every, None)]
        return [s for s in spec if s[0]]

    def sources(self, c):
        return [(c.inp(1), 1)]

    def propagate(self, c, tensor, axis):
        x, w = c.inp(0), c.inp(1)
        pair = (tensor, axis)
        if pair in ((x, 2), (w, self.W_INPUT)):  # input size: contracted by W
            other = (w, self.W_INPUT) if tensor == x else (x, 2)
            return [identity(pair, other, c.dim(tensor, axis), contracted=(c.index, self.MASKED_INPUT))]
        spec = {(t, a): (hidden, slot) for t, a, hidden, slot in self._hidden_axes(c)}
        if pair not in spec:
            raise Frozen(f"{c.node.op_type}: channel on axis {axis} of '{tensor}'")
        hidden, _ = spec[pair]
        first = np.full(c.attr("hidden_size"), -1)
        for k in range(len(hidden) - 1, -1, -1):
            first[hidden[k]] = k
        links = [Link(pair, pair, first[hidden], np.arange(len(hidden)))]  # gate rows of unit j together
        for other, (other_hidden, slot) in spec.items():
            if other != pair:
                links.append(Link(pair, other, first[other_hidden], np.arange(len(other_hidden)),
                                  contracted=(c.index, slot) if slot is not None else None))
        return links

    def rewrite(self, c, plan):
        if plan.changed(c.inp(2), self.R_HIDDEN):
            plan.set_attr(c.node, "hidden_size", plan.new_dim(c.inp(2), self.R_HIDDEN))
            for k in (5, 6):
                if _zero_state(c, c.inp(k)):
                    plan.node(c.node).input[k] = ""  # omitted: zeros of the new hidden size


@register
class DynamicQuantizeLSTMRule(Recurrent):
    """com.microsoft DynamicQuantizeLSTM (X, W, R, B, sequence_lens, initial_h, initial_c, P, W_scale,
    W_zero_point, R_scale, R_zero_point; what onnxruntime's quantize_dynamic makes of an LSTM): the
    LSTM rule on int8 weights stored transposed, W [directions, input, 4 x hidden] and R [directions,
    hidden, 4 x hidden]; a per-row scale or zero point ([directions, 4 x hidden]) goes with its gate
    rows, a per-direction one stays. The op quantizes its hidden state over all units at each step:
    zeroing a removed unit's readers alone leaves it in that range, so the oracle (tests) zeroes the
    unit's own gate rows as well."""

    domain = "com.microsoft"
    ops = ("DynamicQuantizeLSTM",)
    W_INPUT, R_HIDDEN = 1, 1
    MASKED_INPUT = 0  # X: the op quantizes it over all its channels, so X's slices are the ones zeroed
    W_SCALE, W_ZERO, R_SCALE, R_ZERO = 8, 9, 10, 11

    def _hidden_axes(self, c):
        h = c.attr("hidden_size")
        every = np.arange(h)
        rows = np.tile(every, 4)
        states = [(c.inp(k), 2, every, None) for k in (5, 6) if not _zero_state(c, c.inp(k))]
        per_row = [(c.inp(k), 1, rows, None) for k in (self.W_SCALE, self.W_ZERO, self.R_SCALE, self.R_ZERO)
                   if c.inp(k) and c.rank(c.inp(k)) == 2]
        spec = [(c.inp(1), 2, rows, None), (c.inp(2), 2, rows, None), (c.inp(2), self.R_HIDDEN, every, 2),
                (c.inp(3), 1, np.tile(every, 8), None), *states, (c.inp(7), 1, np.tile(every, 3), None),
                *per_row, (c.out(0), 3, every, None), (c.out(1), 2, every, None), (c.out(2), 2, every, None)]
        return [s for s in spec if s[0]]

    def sources(self, c):
        return [(c.inp(1), 2)]


ZERO_VIEWS = ("Slice", "Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Expand", "Tile")


def _zero_state(c: Ctx, name, depth=0) -> bool:
    """Whether tensor `name` is all zeros whatever the inputs: a zero constant or a zero-filled
    ConstantOfShape, seen through views (Slice, Expand, Reshape, ...) of their data input."""
    if not name or depth > 8 or name in c.g.graph_inputs:
        return False
    value = c.const(name)
    if value is not None:
        return value.size > 0 and not np.any(value)
    index = c.g.producer.get(name)
    if index is None:
        return False
    node = c.g.nodes[index]
    if node.op_type == "ConstantOfShape":
        fill = attr(node, "value")
        return fill is None or not np.any(onnx.numpy_helper.to_array(fill))
    return node.op_type in ZERO_VIEWS and _zero_state(c, node.input[0], depth + 1)
