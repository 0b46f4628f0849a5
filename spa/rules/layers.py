"""Layers with weights: Conv, ConvTranspose, Gemm, MatMul (the weight's output axis creates
channels, its input axis contracts them)."""
from __future__ import annotations

import numpy as np

from . import Frozen, Link, Rule, identity, register


def in_group_positions(n, per_group):
    """Map channel j of a grouped tensor to its position inside its group."""
    return np.arange(n) % per_group


def shrink_depthwise_group(c, plan, groups, in_per_group):
    """A depthwise conv has one group per input channel: the group count follows the channels."""
    if groups > 1 and in_per_group == 1:
        plan.set_attr(c.node, "group", plan.new_dim(c.inp(0), 1))


@register
class ConvRule(Rule):
    ops = ("Conv",)
    X, W, B = 0, 1, 2  # input slots of data, weight and bias

    def contracted(self, c):
        """(node, input slot) where the input channels are contracted: the weight."""
        return (c.index, self.W)

    def out_params(self, c, c_out) -> list:
        """Pairs sliced with the output channel besides y, w and the bias."""
        return []

    def _geometry(self, c):
        x, w = c.inp(self.X), c.inp(self.W)
        groups = c.attr("group", 1)
        c_out, cin_g = c.dim(w, 0), c.dim(w, 1)
        c_in = c.dim(x, 1)
        if None in (c_out, cin_g):
            raise Frozen(f"{c.node.op_type} weight '{w}' shape unknown")
        if c_in is None:
            c_in = cin_g * groups
        return groups, c_in, c_out, cin_g

    def sources(self, c):
        return [(c.out(0), 1)]

    def propagate(self, c, tensor, axis):
        x, w, b, y = c.inp(self.X), c.inp(self.W), c.inp(self.B), c.out(0)
        groups, c_in, c_out, cin_g = self._geometry(c)
        depthwise = groups > 1 and cin_g == 1
        mult = c_out // groups
        pair = (tensor, axis)
        if tensor == x and axis == 1:
            if depthwise:
                # input channel g feeds exactly the `mult` outputs of group g
                return [Link(pair, (y, 1), np.repeat(np.arange(c_in), mult), np.arange(c_out))]
            return [Link(pair, (w, 1), np.arange(c_in), in_group_positions(c_in, cin_g),
                         contracted=self.contracted(c))]
        if (tensor == w and axis == 1) and not depthwise:
            return [Link(pair, (x, 1), in_group_positions(c_in, cin_g), np.arange(c_in),
                         contracted=self.contracted(c))]
        outs = [p for p in [(y, 1), (w, 0), (b, 0)] if p[0]] + self.out_params(c, c_out)
        if pair in outs:
            links = [identity(pair, p, c_out) for p in outs if p != pair]
            if depthwise:
                links.append(Link(pair, (x, 1), np.arange(c_out), np.arange(c_out) // mult))
            elif groups > 1:  # equal channels per group: same in-group position in every group
                links.append(Link(pair, pair, np.arange(c_out), in_group_positions(c_out, mult)))
            return links
        raise Frozen(f"{c.node.op_type}: channel on axis {axis} of '{tensor}' (not a channel axis)")

    def rewrite(self, c, plan):
        groups, _, _, cin_g = self._geometry(c)
        shrink_depthwise_group(c, plan, groups, cin_g)


@register
class FusedConvRule(ConvRule):
    """com.microsoft FusedConv (onnxruntime's Conv with its element-wise activation folded in, and an
    optional sum input Z added before it, as a saved optimized session writes CNNs): Conv's channel
    map, Z sliced with the output channel."""

    domain = "com.microsoft"
    ops = ("FusedConv",)

    def out_params(self, c, c_out):
        return [(c.inp(3), 1)] if c.inp(3) else []


@register
class ConvTransposeRule(Rule):
    """Weight is [C_in, C_out/group, k...]: axes swapped relative to Conv."""

    ops = ("ConvTranspose",)

    def _geometry(self, c):
        w = c.inp(1)
        groups = c.attr("group", 1)
        c_in, cout_g = c.dim(w, 0), c.dim(w, 1)
        if None in (c_in, cout_g):
            raise Frozen(f"ConvTranspose weight '{w}' shape unknown")
        return groups, c_in, cout_g * groups, c_in // groups, cout_g

    def sources(self, c):
        return [(c.out(0), 1)]

    def propagate(self, c, tensor, axis):
        x, w, b, y = c.inp(0), c.inp(1), c.inp(2), c.out(0)
        groups, c_in, c_out, cin_g, cout_g = self._geometry(c)
        depthwise = groups > 1 and cin_g == 1
        pair = (tensor, axis)
        if (tensor == x and axis == 1) or (tensor == w and axis == 0):
            links = [identity(pair, p, c_in, contracted=(c.index, 1) if p[0] == w else None)
                     for p in [(x, 1), (w, 0)] if p != pair]
            if depthwise:
                links.append(Link(pair, (y, 1), np.repeat(np.arange(c_in), cout_g), np.arange(c_out)))
            elif groups > 1:
                links.append(Link(pair, pair, np.arange(c_in), in_group_positions(c_in, cin_g)))
            return links
        if (tensor == y and axis == 1) or (tensor == b and axis == 0):
            links = [identity(pair, p, c_out) for p in [(y, 1), (b, 0)] if p[0] and p != pair]
            if depthwise:  # x's channel is the weight's axis 0: both, or x may be marked here without it
                links += [Link(pair, (x, 1), np.arange(c_out), np.arange(c_out) // cout_g),
                          Link(pair, (w, 0), np.arange(c_out), np.arange(c_out) // cout_g, contracted=(c.index, 1))]
            else:
                links.append(Link(pair, (w, 1), np.arange(c_out), in_group_positions(c_out, cout_g)))
            return links
        if tensor == w and axis == 1 and not depthwise:
            return [Link(pair, (y, 1), in_group_positions(c_out, cout_g), np.arange(c_out))]
        raise Frozen(f"ConvTranspose: channel on axis {axis} of '{tensor}' (not a channel axis)")

    def rewrite(self, c, plan):
        groups, _, _, cin_g, _ = self._geometry(c)
        shrink_depthwise_group(c, plan, groups, cin_g)


@register
class GemmRule(Rule):
    ops = ("Gemm",)
    A, B, C = 0, 1, 2  # input slots

    def contracted(self, c):
        return (c.index, self.B)

    def n_params(self, c) -> list:
        """Pairs sliced with the output column N besides B, Y and the bias."""
        return []

    def _axes(self, c):
        ka = 0 if c.attr("transA", 0) else 1
        kb, nb = (1, 0) if c.attr("transB", 0) else (0, 1)
        return ka, 1 - ka, kb, nb

    def sources(self, c):
        a, b = c.inp(self.A), c.inp(self.B)
        return [(c.out(0), 1)] if c.g.is_static(b) and not c.g.is_static(a) else []

    def propagate(self, c, tensor, axis):
        a, b, bias, y = c.inp(self.A), c.inp(self.B), c.inp(self.C), c.out(0)
        ka, ma, kb, nb = self._axes(c)
        pair = (tensor, axis)
        if (tensor, axis) in ((a, ka), (b, kb)):
            other = (b, kb) if tensor == a else (a, ka)
            return [identity(pair, other, c.dim(tensor, axis), contracted=self.contracted(c))]
        n_pairs = [(b, nb), (y, 1)] + self.n_params(c)
        if pair in n_pairs or (tensor == bias and axis == c.rank(bias) - 1):
            return self._with_bias(c, pair, n_pairs, 1)
        if (tensor, axis) in ((a, ma), (y, 0)) or (tensor == bias and axis == c.rank(bias) - 2):
            return self._with_bias(c, pair, [(a, ma), (y, 0)], 0)
        raise Frozen(f"Gemm: channel on axis {axis} of '{tensor}'")

    def _with_bias(self, c, pair, pairs, y_axis):
        bias = c.inp(self.C)
        if bias:
            a = c.rank(bias) - (2 - y_axis)
            if a >= 0 and c.dim(bias, a) not in (1, None):
                pairs.append((bias, a))
        size = c.dim(*pair)
        return [identity(pair, p, size) for p in pairs if p != pair]


@register
class FusedGemmRule(GemmRule):
    """com.microsoft FusedGemm (onnxruntime's Gemm with its element-wise activation folded in)."""

    domain = "com.microsoft"
    ops = ("FusedGemm",)


@register
class MatMulRule(Rule):
    """[..., M, K] x [..., K, N]: K contracted, M and N pass through, batch axes broadcast."""

    ops = ("MatMul",)
    A, B = 0, 1  # input slots

    def contracted(self, c, slot):
        return (c.index, slot)

    def params(self, c) -> dict:
        """{pair: role} of tensors sliced with an M or N channel besides a, b and y."""
        return {}

    def sources(self, c):
        a, b = c.inp(self.A), c.inp(self.B)
        static_a, static_b = c.g.is_static(a), c.g.is_static(b)
        if static_b and not static_a and c.rank(b) >= 2:
            return [(c.out(0), c.rank(c.out(0)) - 1)]
        if static_a and not static_b and c.rank(a) >= 2:
            return [(c.out(0), c.rank(c.out(0)) - 2)]
        return []

    def transposed(self, c) -> tuple:
        """Whether A and B enter transposed (their last two axes swapped)."""
        return False, False

    def propagate(self, c, tensor, axis):
        a, b, y = c.inp(self.A), c.inp(self.B), c.out(0)
        ra, rb, ry = c.rank(a), c.rank(b), c.rank(y)
        if ra < 2 or rb < 2:
            raise Frozen(f"{c.node.op_type} with a 1-D operand")
        pair = (tensor, axis)
        ta, tb = self.transposed(c)
        roles = {  # axis -> role for each operand and the output
            (a, ra - 1 - ta): "k", (b, rb - 2 + tb): "k", (a, ra - 2 + ta): "m", (y, ry - 2): "m",
            (b, rb - 1 - tb): "n", (y, ry - 1): "n",
        } | self.params(c)
        role = roles.get(pair)
        size = c.dim(tensor, axis)
        if role == "k":
            other = (b, rb - 2) if tensor == a else (a, ra - 1)
            slot = self.B if c.g.is_static(b) or not c.g.is_static(a) else self.A
            return [identity(pair, other, size, contracted=self.contracted(c, slot))]
        if role is not None:
            return [identity(pair, p, size) for p, r in roles.items() if r == role and p != pair]
        # a batch axis: aligned from the right across the operands and the output
        offset = axis - c.rank(tensor)
        links = []
        for t in (a, b, y):
            ax = c.rank(t) + offset
            if t != tensor and ax >= 0 and c.dim(t, ax) not in (1,):
                links.append(identity(pair, (t, ax), size))
        return links


@register
class FusedMatMulRule(MatMulRule):
    """com.microsoft FusedMatMul (onnxruntime's MatMul with the transposes of its operands' last two
    axes and a scale folded in: alpha * A' x B'). Transposed batch axes (transBatchA/B) are frozen."""

    domain = "com.microsoft"
    ops = ("FusedMatMul",)

    def transposed(self, c):
        if c.attr("transBatchA", 0) or c.attr("transBatchB", 0):
            raise Frozen("FusedMatMul with transposed batch axes (transBatchA/B)")
        return bool(c.attr("transA", 0)), bool(c.attr("transB", 0))


def einsum_labels(equation, ranks) -> tuple:
    """(one label string per operand, the output's) of an Einsum equation, with each ellipsis spelled
    out as labels of its own (numpy broadcasting: aligned from the right) and an implicit output
    (no "->") made explicit: the ellipsis, then the labels used once, in alphabetical order."""
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise Frozen(f"Einsum '{equation}': {len(terms)} terms for {len(ranks)} operands")
    widest = max([r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t], default=0)
    ellipsis = "".join(chr(0x100 + k) for k in range(widest))  # labels no equation uses

    def spelled(term, rank):
        return term.replace("...", ellipsis[widest - (rank - len(term.replace("...", ""))):]) if "..." in term else term

    terms = [spelled(t, r) for t, r in zip(terms, ranks)]
    if not arrow:
        counts = "".join(terms)
        out = ellipsis + "".join(sorted(x for x in set(counts) if counts.count(x) == 1 and x not in ellipsis))
    else:
        out = out.replace("...", ellipsis)
    if any(len(set(t)) != len(t) for t in terms + [out]):
        raise Frozen(f"Einsum '{equation}' repeats a label within a term (a diagonal)")
    return terms, out


@register
class EinsumRule(Rule):
    """Einsum: a channel is a label. Kept in the output, it passes to every operand that has it
    (broadcast size-1 axes aside); summed over, it is contracted here (the oracle zeroes the slice of
    a constant operand where there is one, else of the first operand that has it). A label only a
    constant operand and the output have creates channels (a weight's output axis, as for MatMul)."""

    ops = ("Einsum",)

    def _terms(self, c):
        operands = list(c.node.input)
        return operands, *einsum_labels(c.attr("equation"), [c.rank(x) for x in operands])

    def sources(self, c):
        operands, terms, out = self._terms(c)
        static = [c.g.is_static(x) for x in operands]
        if all(static):
            return []
        dynamic = "".join(t for t, s in zip(terms, static) if not s)
        return [(c.out(0), out.index(label)) for t, s in zip(terms, static) if s
                for label in t if label in out and label not in dynamic]

    def propagate(self, c, tensor, axis):
        operands, terms, out = self._terms(c)
        y = c.out(0)
        labels = {terms[k][axis] for k, x in enumerate(operands) if x == tensor}
        if tensor == y:
            labels.add(out[axis])
        if len(labels) != 1:
            raise Frozen("Einsum reads one tensor under different labels on this axis")
        label, pair, size = labels.pop(), (tensor, axis), c.dim(tensor, axis)
        pairs = [(x, t.index(label)) for x, t in zip(operands, terms) if label in t]
        pairs = [p for p in pairs if c.dim(*p) != 1 or size == 1]
        if label in out:
            return [identity(pair, p, size) for p in pairs + [(y, out.index(label))] if p != pair]
        weights = [k for k, (x, t) in enumerate(zip(operands, terms)) if label in t and c.g.is_static(x)]
        slot = (weights or [k for k, t in enumerate(terms) if label in t])[0]
        contracted = (c.index, slot)
        others = [identity(pair, p, size, contracted=contracted) for p in pairs if p != pair]
        return others or [identity(pair, pair, size, contracted=contracted)]
