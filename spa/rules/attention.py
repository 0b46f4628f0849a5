"""Fused attention ops, whose heads live inside one node: com.microsoft Attention (onnxruntime's
transformer optimizer: the q, k and v projections packed in one weight). A head is one unit: its
query, key and value columns and its output channels go together, and the head count follows."""
from __future__ import annotations

import numpy as np

from . import Frozen, Link, Rule, identity, register


def _head_links(pair, heads_of: dict) -> list:
    """Links that make each head one unit across `heads_of` ({pair: head index of each position}):
    every position of `pair` joins the first position of its head, and every position of the other
    pairs joins the first position of `pair` in the same head."""
    mine = heads_of[pair]
    first = np.full(int(mine.max()) + 1, -1)
    first[mine[::-1]] = np.arange(len(mine))[::-1]
    links = [Link(pair, pair, np.arange(len(mine)), first[mine], unit="head")]
    for other, heads in heads_of.items():
        if other != pair:
            links.append(Link(pair, other, first[heads], np.arange(len(heads)), unit="head"))
    return links


@register
class PackedAttentionRule(Rule):
    """com.microsoft Attention (input, weights, [bias], [mask_index], [past], [attention_bias], ...):
    y = attention of x W + b split as q | k | v (sizes `qkv_hidden_sizes`, else thirds) into
    `num_heads` heads. Heads are pruned whole: their columns of the weight and bias, their output
    channels and their slice of an attention bias; num_heads (and qkv_hidden_sizes) follow, the head
    size and so the default scale stay. The input's channels are the weight's rows (contracted).
    A key/value cache (past, present) is frozen."""

    domain = "com.microsoft"
    ops = ("Attention",)

    def sources(self, c):
        w = c.inp(1)
        return [(w, 1)] if w in c.g.consts and c.rank(w) == 2 else []

    def _sizes(self, c):
        w = c.inp(1)
        if w not in c.g.consts or c.rank(w) != 2:
            raise Frozen(f"Attention: weights '{w}' are computed or not 2-D")
        if c.inp(4) or c.out(1) or c.attr("past_present_share_buffer", 0):
            raise Frozen("Attention with a key/value cache (past / present)")
        heads, total = c.attr("num_heads"), c.dim(w, 1)
        q, k, v = c.attr("qkv_hidden_sizes") or [total // 3] * 3
        if q != k or q + k + v != total or q % heads or v % heads:
            raise Frozen(f"Attention: q, k, v sizes {q}, {k}, {v} do not split into {heads} heads")
        return heads, q, v

    def _heads_of(self, c, heads, q, v):
        """{pair: head of each position} for the weight columns, bias, output and attention bias."""
        qk_heads, v_heads = np.arange(q) // (q // heads), np.arange(v) // (v // heads)
        columns = np.concatenate([qk_heads, qk_heads, v_heads])
        y = c.out(0)
        heads_of = {(c.inp(1), 1): columns, (y, c.rank(y) - 1): v_heads}
        if c.inp(2):
            heads_of[(c.inp(2), 0)] = columns
        bias = c.inp(5)
        if bias and c.rank(bias) == 4 and c.dim(bias, 1) == heads:
            heads_of[(bias, 1)] = np.arange(heads)
        return heads_of

    def propagate(self, c, tensor, axis):
        heads, q, v = self._sizes(c)
        x, w, y = c.inp(0), c.inp(1), c.out(0)
        pair, last = (tensor, axis), c.rank(x) - 1
        if pair in ((x, last), (w, 0)):
            other = (w, 0) if tensor == x else (x, last)
            return [identity(pair, other, c.dim(tensor, axis), contracted=(c.index, 1))]
        if tensor in (x, y) and axis < last:  # batch and sequence
            return [identity(pair, (x if tensor == y else y, axis), c.dim(tensor, axis))]
        heads_of = self._heads_of(c, heads, q, v)
        if pair not in heads_of:
            raise Frozen(f"Attention: channel on axis {axis} of '{tensor}'")
        if "head-dim" in c.options.granularity:
            raise Frozen("Attention: only whole heads are pruned here (head-dim granularity is not supported)")
        return _head_links(pair, heads_of)

    def rewrite(self, c, plan):
        w = c.inp(1)
        if not plan.changed(w, 1):
            return
        heads, q, v = self._sizes(c)
        columns = plan.kept(w, 1)
        kept_heads = int(np.sum(columns >= 2 * q)) // (v // heads)
        plan.set_attr(c.node, "num_heads", kept_heads)
        if c.attr("qkv_hidden_sizes"):
            plan.set_attr(c.node, "qkv_hidden_sizes",
                          [kept_heads * q // heads] * 2 + [kept_heads * v // heads])
