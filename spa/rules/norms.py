"""Normalization layers: BatchNormalization / InstanceNormalization, GroupNormalization,
LayerNormalization / RMSNormalization."""
from __future__ import annotations

import numpy as np

from . import Frozen, Link, Rule, identity, register, same_axis_everywhere


@register
class BatchNormRule(Rule):
    ops = ("BatchNormalization", "InstanceNormalization")

    def propagate(self, c, tensor, axis):
        ins, outs = c.slots(tensor)
        if (ins and ins[0] == 0) or (outs and outs[0] == 0):
            if axis != 1:
                raise Frozen(f"{c.node.op_type}: channel on axis {axis}, not 1")
        elif axis != 0:
            raise Frozen(f"{c.node.op_type}: parameter '{tensor}' axis {axis}")
        size = c.dim(tensor, axis)
        pairs = [(c.inp(0), 1), (c.out(0), 1)]
        pairs += [(t, 0) for t in list(c.node.input)[1:] + list(c.node.output)[1:] if t]
        return [identity((tensor, axis), p, size) for p in pairs if p != (tensor, axis)]


@register
class GroupNormRule(Rule):
    """Channels move in whole normalisation groups; the group count shrinks."""

    ops = ("GroupNormalization",)

    def propagate(self, c, tensor, axis):
        x, scale, bias, y = c.inp(0), c.inp(1), c.inp(2), c.out(0)
        channels = c.dim(x, 1)
        if channels is None:
            raise Frozen("GroupNormalization: channel count unknown")
        per = channels // c.attr("num_groups")
        group_of = np.arange(channels) // per
        per_channel_params = c.dim(scale, 0) == channels
        pair = (tensor, axis)
        if tensor in (x, y) and axis == 1:
            every = np.arange(channels)
            links = [identity(pair, (t, 1), channels) for t in (x, y) if t != tensor]
            links.append(Link(pair, pair, every, group_of * per))  # a group goes as a whole
            param_idx = every if per_channel_params else group_of
            links += [Link(pair, (t, 0), every, param_idx) for t in (scale, bias) if t]
            return links
        if tensor in (scale, bias) and axis == 0:
            n = c.dim(tensor, 0)
            return [Link(pair, (x, 1), np.arange(n), np.arange(n) * (1 if per_channel_params else per))]
        raise Frozen(f"GroupNormalization: channel on axis {axis}")

    def rewrite(self, c, plan):
        channels = c.g.dim(c.inp(0), 1)
        per = channels // c.attr("num_groups")
        plan.set_attr(c.node, "num_groups", plan.new_dim(c.inp(0), 1) // per)


@register
class LayerNormRule(Rule):
    """Statistics over the normalised axes: pruning them is approximate, allowed only on request."""

    ops = ("LayerNormalization", "RMSNormalization")

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        r = c.rank(x)
        first = c.norm_axis(c.attr("axis", -1), x)
        ins, _ = c.slots(tensor)
        is_param = bool(ins) and ins[0] > 0
        data_axis = axis + (r - c.rank(tensor)) if is_param else axis
        if data_axis < first:
            return [] if is_param else same_axis_everywhere(c, tensor, axis, [x, y])
        if not c.options.approximate:
            raise Frozen(f"{c.node.op_type} normalises over the channel axis (pruning it changes "
                         "the statistics; allow with --granularity hidden)")
        c.options.approximate_nodes.add(c.g.node_name(c.index))
        size = c.dim(tensor, axis)
        pairs = [(x, data_axis), (y, data_axis)]
        for t in list(c.node.input)[1:]:
            a = data_axis - (r - c.rank(t)) if t else -1
            if a >= 0 and c.dim(t, a) == size:
                pairs.append((t, a))
        return [identity((tensor, axis), p, size, unit="approximate") for p in pairs if p != (tensor, axis)]


@register
class SimplifiedLayerNormRule(LayerNormRule):
    """onnxruntime's RMS normalisation in the ONNX domain (SimplifiedLayerNormalization, x and
    scale, the LLaMA norm its optimizer and onnxruntime-genai write)."""

    ops = ("SimplifiedLayerNormalization",)


@register
class SkipLayerNormRule(Rule):
    """com.microsoft SkipLayerNormalization (input, skip, gamma, [beta], [bias]) and its RMS form
    SkipSimplifiedLayerNormalization (input, skip, gamma, [bias]): LayerNorm over the last axis of
    input + skip + bias. Outputs: the normalised sum, mean and inverse deviation (last axis 1) and the
    sum itself. The last axis is the hidden size: approximate, as for LayerNormalization."""

    domain = "com.microsoft"
    ops = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")

    def propagate(self, c, tensor, axis):
        x = c.inp(0)
        r = c.rank(x)
        data = [c.inp(0), c.inp(1), c.out(0), c.out(3)]
        params = [t for t in list(c.node.input)[2:] if t]
        last = c.dim(x, r - 1)
        if tensor in params:
            data_axis = r - 1 if axis == c.rank(tensor) - 1 else -1
        else:
            data_axis = axis + r - c.rank(tensor)
        if data_axis < 0:
            raise Frozen(f"{c.node.op_type}: channel on axis {axis} of '{tensor}'")
        pairs = []
        for t in data + [c.out(1), c.out(2)]:
            a = data_axis - (r - c.rank(t)) if t else -1
            size = c.dim(t, a) if a >= 0 else 1
            if size is None:
                raise Frozen(f"{c.node.op_type}: size of '{t}' axis {a} unknown")
            if size == c.dim(tensor, axis):
                pairs.append((t, a))
        if data_axis < r - 1:
            return [identity((tensor, axis), p, c.dim(tensor, axis)) for p in pairs if p != (tensor, axis)]
        if not c.options.approximate:
            raise Frozen(f"{c.node.op_type} normalises over the channel axis (pruning it changes "
                         "the statistics; allow with --granularity hidden)")
        c.options.approximate_nodes.add(c.g.node_name(c.index))
        pairs += [(t, c.rank(t) - 1) for t in params if c.dim(t, c.rank(t) - 1) == last]
        return [identity((tensor, axis), p, last, unit="approximate") for p in pairs if p != (tensor, axis)]


@register
class EmbedLayerNormRule(Rule):
    """com.microsoft EmbedLayerNormalization (BERT's embeddings fused by onnxruntime's optimizer):
    LayerNorm(word[ids] + position[positions] + segment[segment ids]) with gamma and beta, and the
    sum before the norm as an optional third output. Its channels are the hidden size (the last
    axis of the tables and outputs): approximate, as for LayerNormalization."""

    domain = "com.microsoft"
    ops = ("EmbedLayerNormalization",)

    def propagate(self, c, tensor, axis):
        pairs = [(t, c.rank(t) - 1) for t in [c.out(0), c.out(2)] + [c.inp(k) for k in range(2, 7)] if t]
        if (tensor, axis) not in pairs:
            raise Frozen(f"EmbedLayerNormalization: channel on axis {axis} of '{tensor}'")
        if not c.options.approximate:
            raise Frozen("EmbedLayerNormalization normalises over the channel axis (pruning it changes "
                         "the statistics; allow with --granularity hidden)")
        c.options.approximate_nodes.add(c.g.node_name(c.index))
        size = c.dim(tensor, axis)
        return [identity((tensor, axis), p, size, unit="approximate") for p in pairs if p != (tensor, axis)]
