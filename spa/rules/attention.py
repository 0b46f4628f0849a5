"""Fused attention ops, whose heads live inside one node: com.microsoft Attention (onnxruntime's
transformer optimizer: the q, k and v projections packed in one weight; QAttention, its dynamically
quantized form), ONNX Attention and RotaryEmbedding (opset 23). A head is one unit: its
query, key and value columns and its output channels go together, and the head count follows."""
from __future__ import annotations

import numpy as np

from . import Frozen, Link, Rule, attr, identity, register
from .quantized import integer_weight


def _head_links(pair, heads_of: dict, tags: dict | None = None) -> list:
    """Links that make each head one unit across `heads_of` ({pair: head of each position}), entered
    from `pair`: every position of a head joins the head's first position in the first pair reached
    that holds it. A pair is reached once it shares a head with a reached one, so a tensor holding two
    families of heads (q | k | v packed in one, query slots beside key/value heads) links both. `tags`
    names a head's unit where it is not "head" ({head: "slot"})."""
    tags = tags or {}
    anchors, links, pending = {}, [], [p for p in heads_of if p != pair]
    reached = pair
    while reached is not None:
        heads = np.asarray(heads_of[reached])
        for head in np.unique(heads):
            positions = np.flatnonzero(heads == head)
            source = anchors.setdefault(int(head), (reached, int(positions[0])))
            links.append(Link(source[0], reached, np.full(len(positions), source[1]), positions,
                              unit=tags.get(int(head), "head")))
        reached = next((p for p in pending if any(int(h) in anchors for h in np.unique(heads_of[p]))), None)
        if reached is not None:
            pending.remove(reached)
    # cross-pair links first: a pair reached later is marked by them before its own links are read
    return sorted(links, key=lambda link: link.src == link.dst and link.src != pair)


def _query_units(c, heads: int, kv_heads: int) -> tuple:
    """(unit of each query head, unit of each key/value head, tags) for grouped-query attention: a
    query head's unit is its key/value head's, or, where the node is in `options.query_slots` (a cache
    holds the key/value heads), its slot, the key/value heads then units after the slots."""
    share = heads // kv_heads
    if c.g.node_name(c.index) in c.options.query_slots:
        return np.arange(heads) % share, share + np.arange(kv_heads), {s: "slot" for s in range(share)}
    return np.arange(heads) // share, np.arange(kv_heads), {}


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
    W, BIAS, PAST, ATTENTION_BIAS = 1, 2, 4, 5
    COLUMN_PARAMS = ()  # per-column weight scales and zero points (QAttention)

    def sources(self, c):
        w = c.inp(self.W)
        return [(w, 1)] if w in c.g.consts and c.rank(w) == 2 else []

    def contracted(self, c):
        return (c.index, self.W)

    def _sizes(self, c):
        w = c.inp(self.W)
        if w not in c.g.consts or c.rank(w) != 2:
            raise Frozen(f"{c.node.op_type}: weights '{w}' are computed or not 2-D")
        if c.inp(self.PAST) or c.out(1) or c.attr("past_present_share_buffer", 0):
            raise Frozen(f"{c.node.op_type} with a key/value cache (past / present)")
        heads, total = c.attr("num_heads"), c.dim(w, 1)
        q, k, v = c.attr("qkv_hidden_sizes") or [total // 3] * 3
        if q != k or q + k + v != total or q % heads or v % heads:
            raise Frozen(f"{c.node.op_type}: q, k, v sizes {q}, {k}, {v} do not split into {heads} heads")
        return heads, q, v

    def _heads_of(self, c, heads, q, v):
        """{pair: head of each position} for the weight columns, bias, output and attention bias."""
        qk_heads, v_heads = np.arange(q) // (q // heads), np.arange(v) // (v // heads)
        columns = np.concatenate([qk_heads, qk_heads, v_heads])
        y = c.out(0)
        heads_of = {(c.inp(self.W), 1): columns, (y, c.rank(y) - 1): v_heads}
        for slot in (self.BIAS, *self.COLUMN_PARAMS):
            if c.inp(slot) and c.rank(c.inp(slot)) == 1 and c.dim(c.inp(slot), 0) == len(columns):
                heads_of[(c.inp(slot), 0)] = columns
        bias = c.inp(self.ATTENTION_BIAS) if self.ATTENTION_BIAS is not None else None
        if bias and c.rank(bias) == 4 and c.dim(bias, 1) == heads:
            heads_of[(bias, 1)] = np.arange(heads)
        return heads_of

    def propagate(self, c, tensor, axis):
        heads, q, v = self._sizes(c)
        x, w, y = c.inp(0), c.inp(self.W), c.out(0)
        pair, last = (tensor, axis), c.rank(x) - 1
        if pair in ((x, last), (w, 0)):
            other = (w, 0) if tensor == x else (x, last)
            return [identity(pair, other, c.dim(tensor, axis), contracted=self.contracted(c))]
        if tensor in (x, y) and axis < last:  # batch and sequence
            return [identity(pair, (x if tensor == y else y, axis), c.dim(tensor, axis))]
        heads_of = self._heads_of(c, heads, q, v)
        if pair not in heads_of:
            raise Frozen(f"{c.node.op_type}: channel on axis {axis} of '{tensor}'")
        if "head-dim" in c.options.granularity:
            raise Frozen(f"{c.node.op_type}: only whole heads are pruned here (head-dim granularity is not "
                         "supported)")
        return _head_links(pair, heads_of)

    def rewrite(self, c, plan):
        w = c.inp(self.W)
        if not plan.changed(w, 1):
            return
        heads, q, v = self._sizes(c)
        columns = plan.kept(w, 1)
        kept_heads = int(np.sum(columns >= 2 * q)) // (v // heads)
        plan.set_attr(c.node, "num_heads", kept_heads)
        if c.attr("qkv_hidden_sizes"):
            plan.set_attr(c.node, "qkv_hidden_sizes",
                          [kept_heads * q // heads] * 2 + [kept_heads * v // heads])


@register
class QuantizedAttentionRule(PackedAttentionRule):
    """com.microsoft QAttention (input, weight, bias, input_scale, weight_scale, [mask_index],
    [input_zero_point], [weight_zero_point], [past]): Attention on a DynamicQuantizeLinear's integers
    with an integer packed weight, as onnxruntime's quantize_dynamic writes an optimized BERT. Heads
    as for Attention, a per-column weight scale and zero point sliced with their columns; the input's
    channels are the integer weight's rows (the oracle sets them to the zero point)."""

    ops = ("QAttention",)
    W, BIAS, PAST, ATTENTION_BIAS = 1, 2, 8, None
    COLUMN_PARAMS = (4, 7)

    def contracted(self, c):
        return integer_weight(c, self.W)


@register
class AttentionRule(Rule):
    """ONNX Attention (opset 23; what torch.onnx writes for scaled_dot_product_attention from opset
    23): Q, K, V either [B, heads, S, head size] or [B, S, heads x head size] (q_num_heads and
    kv_num_heads then say how many). With key/value heads shared by several query heads (kv_num_heads
    < q_num_heads), query head h reads key/value head h // (q_num_heads / kv_num_heads): a key/value
    head goes with the query heads it serves. In the 4-D form the head size prunes too (head-dim
    granularity): Q's and K's positions are contracted here (the scale, when implicit, is set to the
    original 1 / sqrt(head size)), V's pass to Y. Past and present keys and values follow the heads;
    where the graph's inputs and outputs hold them (a decoder's cache), the query heads prune as slots
    (`held_heads`), as in GroupQueryAttention."""

    ops = ("Attention",)
    Q, K, V, MASK, PAST_K, PAST_V = range(6)

    def held_heads(self, c):
        try:
            heads, kv_heads = self._heads(c)
            rank = c.rank(c.inp(self.Q))
        except Frozen:
            return None
        if heads == kv_heads or not (c.inp(self.PAST_K) or c.out(1)):
            return None
        return (c.out(0), 2 if rank == 3 else 1)

    def input_sizes(self, node, shape):
        """An empty cache: past key and value [B, kv heads, 0, head size]."""
        q, k, v = (shape(t) if t else None for t in node.input[:3])
        past = [node.input[i] if len(node.input) > i and node.input[i] else None for i in (self.PAST_K, self.PAST_V)]
        if not any(past) or not q or not k or not v:
            return {}
        kv_heads = k[1] if len(q) == 4 else attr(node, "kv_num_heads", 0)
        if not kv_heads:
            return {}
        sizes = (k[3], v[3]) if len(q) == 4 else (k[2] and k[2] // kv_heads, v[2] and v[2] // kv_heads)
        return {t: {1: kv_heads, 2: 0, 3: size} for t, size in zip(past, sizes) if t and size}

    def _heads(self, c):
        q, k = c.inp(self.Q), c.inp(self.K)
        if c.rank(q) == 4:
            heads, kv_heads = c.dim(q, 1), c.dim(k, 1)
        else:
            heads, kv_heads = c.attr("q_num_heads"), c.attr("kv_num_heads")
        if not heads or not kv_heads or heads % kv_heads:
            raise Frozen(f"Attention: {heads} query heads do not share {kv_heads} key/value heads evenly")
        return heads, kv_heads

    def _head_axes(self, c, heads, kv_heads):
        """{pair: unit of each head} of the tensors with a head axis (axis 1)."""
        query, kv, _ = _query_units(c, heads, kv_heads)
        query_side = [c.inp(self.Q), c.out(0), c.out(3)]
        kv_side = [c.inp(self.K), c.inp(self.V), c.inp(self.PAST_K), c.inp(self.PAST_V), c.out(1), c.out(2)]
        if c.rank(c.inp(self.Q)) == 3:
            query_side, kv_side = [c.out(3)], [c.inp(self.PAST_K), c.inp(self.PAST_V), c.out(1), c.out(2)]
        axes = {(t, 1): query for t in query_side if t}
        axes |= {(t, 1): kv for t in kv_side if t}
        mask = c.inp(self.MASK)
        if mask and c.rank(mask) == 4 and c.dim(mask, 1) == heads:
            axes[(mask, 1)] = query
        return axes

    def propagate(self, c, tensor, axis):
        heads, kv_heads = self._heads(c)
        pair = (tensor, axis)
        if c.rank(c.inp(self.Q)) == 3:
            return self._packed(c, pair, heads, kv_heads)
        head_axes = self._head_axes(c, heads, kv_heads)
        if pair in head_axes:
            if "head-dim" in c.options.granularity:
                raise Frozen("Attention: heads carry channels where head-dim granularity prunes head sizes")
            return _head_links(pair, head_axes, _query_units(c, heads, kv_heads)[2]) if heads != kv_heads else \
                [identity(pair, p, heads) for p in head_axes if p != pair]
        keys = [(t, 3) for t in (c.inp(self.Q), c.inp(self.K), c.inp(self.PAST_K), c.out(1)) if t]
        values = [(t, 3) for t in (c.inp(self.V), c.out(0), c.inp(self.PAST_V), c.out(2)) if t]
        if pair in keys:  # q . k sums over them here: the oracle zeroes Q's slices
            contracted = (c.index, self.Q)
            return [identity(pair, p, c.dim(tensor, axis), contracted=contracted if c.inp(self.Q) in (tensor, p[0])
                             else None) for p in keys if p != pair]
        if pair in values:
            return [identity(pair, p, c.dim(tensor, axis)) for p in values if p != pair]
        raise Frozen(f"Attention: channel on axis {axis} of '{tensor}' (batch or sequence)")

    def _packed(self, c, pair, heads, kv_heads):
        """[B, S, heads x head size]: whole key/value groups inside the last axis."""
        q, k, v, y = c.inp(self.Q), c.inp(self.K), c.inp(self.V), c.out(0)
        query, kv, tags = _query_units(c, heads, kv_heads)
        size_qk, size_v = c.dim(q, 2) // heads, c.dim(v, 2) // kv_heads
        groups = {(q, 2): np.repeat(query, size_qk), (k, 2): np.repeat(kv, size_qk), (v, 2): np.repeat(kv, size_v),
                  (y, 2): np.repeat(query, size_v)}
        groups |= self._head_axes(c, heads, kv_heads)
        if pair not in groups:
            raise Frozen(f"Attention: channel on axis {pair[1]} of '{pair[0]}' (batch or sequence)")
        if "head-dim" in c.options.granularity:
            raise Frozen("Attention: only whole heads are pruned in its [B, S, heads x head size] form")
        return _head_links(pair, groups, tags)

    def rewrite(self, c, plan):
        q, k = c.inp(self.Q), c.inp(self.K)
        if c.rank(q) == 3:
            heads, kv_heads = self._heads(c)
            if plan.changed(q, 2):
                plan.set_attr(c.node, "q_num_heads", plan.new_dim(q, 2) // (c.g.dim(q, 2) // heads))
                plan.set_attr(c.node, "kv_num_heads", plan.new_dim(k, 2) // (c.g.dim(k, 2) // kv_heads))
            return
        for name, tensor in (("q_num_heads", q), ("kv_num_heads", k)):
            if c.attr(name) is not None and plan.changed(tensor, 1):
                plan.set_attr(c.node, name, plan.new_dim(tensor, 1))
        if plan.changed(q, 3) and c.attr("scale") is None:
            plan.set_attr(c.node, "scale", float(1.0 / np.sqrt(c.g.dim(q, 3))))


@register
class RotaryEmbeddingRule(Rule):
    """ONNX RotaryEmbedding (opset 23): X [B, heads, S, head size], or [B, S, heads x head size] with
    num_heads, rotated per head by position. Heads pass through whole (num_heads, where set, follows);
    a head's positions are rotated in pairs, so the head size is frozen."""

    ops = ("RotaryEmbedding",)

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if tensor not in (x, y):
            raise Frozen(f"RotaryEmbedding: channels on its cos/sin cache or positions ('{tensor}')")
        other, rank = (y if tensor == x else x), c.rank(x)
        if axis < rank - 1:  # batch, sequence and (4-D) heads
            return [identity((tensor, axis), (other, axis), c.dim(tensor, axis))]
        size = self._head_size(c) if rank == 3 else None
        if not size:
            raise Frozen("RotaryEmbedding rotates a head's positions in pairs (the head size stays)")
        if "head-dim" in c.options.granularity:
            raise Frozen("RotaryEmbedding: only whole heads pass its [B, S, heads x head size] form")
        head = np.arange(c.dim(x, 2)) // size
        return _head_links((tensor, axis), {(x, 2): head, (y, 2): head})

    def _head_size(self, c):
        """A head's width in the [B, S, heads x head size] form: from num_heads (or None)."""
        heads = c.attr("num_heads", 0)
        return c.dim(c.inp(0), 2) // heads if heads else None

    def rewrite(self, c, plan):
        x = c.inp(0)
        if c.rank(x) == 3 and plan.changed(x, 2) and c.attr("num_heads"):
            plan.set_attr(c.node, "num_heads", plan.new_dim(x, 2) // (c.g.dim(x, 2) // c.attr("num_heads")))
        elif c.rank(x) == 4 and plan.changed(x, 1) and c.attr("num_heads"):
            plan.set_attr(c.node, "num_heads", plan.new_dim(x, 1))


@register
class MicrosoftRotaryEmbeddingRule(RotaryEmbeddingRule):
    """com.microsoft RotaryEmbedding (input, position_ids, cos_cache, sin_cache; onnxruntime-genai
    and onnxruntime's optimizer): the same map as ONNX's. Without num_heads (onnxruntime-genai's
    float16 CPU decoders), a full rotary's head size is twice the cos cache's width, as onnxruntime
    reads it; num_heads then stays unset."""

    domain = "com.microsoft"
    COS = 2

    def _head_size(self, c):
        cos = c.inp(self.COS)
        if c.attr("num_heads", 0) or c.attr("rotary_embedding_dim", 0) or not cos or c.rank(cos) != 2:
            return super()._head_size(c)  # a partial rotary's head size is not the cache's
        return 2 * c.dim(cos, 1) if c.dim(cos, 1) else None


@register
class MultiHeadAttentionRule(Rule):
    """com.microsoft MultiHeadAttention (query, key, value, [bias], [key_padding_mask],
    [attention_bias], [past_key], [past_value], ...), in its form with separate [B, S, heads x head
    size] query, key and value (what onnxruntime's optimizer writes for cross- and self-attention
    after the projections): whole heads, with their slices of the packed bias (q | k | v) and of an
    attention bias; num_heads follows. Packed or 4-D inputs and a key/value cache are frozen."""

    domain = "com.microsoft"
    ops = ("MultiHeadAttention",)

    def propagate(self, c, tensor, axis):
        q, k, v, y = c.inp(0), c.inp(1), c.inp(2), c.out(0)
        if not k or not v or any(c.rank(t) != 3 for t in (q, k, v)):
            raise Frozen("MultiHeadAttention with packed or 4-D query, key or value")
        if c.inp(6) or c.inp(7) or c.out(1) or c.out(2):
            raise Frozen("MultiHeadAttention with a key/value cache (past / present)")
        heads = c.attr("num_heads")
        size_qk, size_v = c.dim(q, 2) // heads, c.dim(v, 2) // heads
        qk, vs = np.arange(c.dim(q, 2)) // size_qk, np.arange(c.dim(v, 2)) // size_v
        heads_of = {(q, 2): qk, (k, 2): qk, (v, 2): vs, (y, 2): vs}
        bias, mask = c.inp(3), c.inp(5)
        if bias:
            heads_of[(bias, 0)] = np.concatenate([qk, qk, vs])
        if mask and c.rank(mask) == 4 and c.dim(mask, 1) == heads:
            heads_of[(mask, 1)] = np.arange(heads)
        pair = (tensor, axis)
        if pair not in heads_of:
            raise Frozen(f"MultiHeadAttention: channel on axis {axis} of '{tensor}' (batch or sequence)")
        if "head-dim" in c.options.granularity:
            raise Frozen("MultiHeadAttention: only whole heads are pruned here (head-dim granularity is not "
                         "supported)")
        return _head_links(pair, heads_of)

    def rewrite(self, c, plan):
        q = c.inp(0)
        if plan.changed(q, 2):
            plan.set_attr(c.node, "num_heads", plan.new_dim(q, 2) // (c.g.dim(q, 2) // c.attr("num_heads")))


@register
class GroupQueryAttentionRule(Rule):
    """com.microsoft GroupQueryAttention (query, [key], [value], [past_key], [past_value], seqlens_k,
    total_sequence_length, [cos_cache], [sin_cache], [position_ids], [attention_bias], [head_sink], ...;
    the attention of onnxruntime-genai's decoders): query [B, S, heads x d], with q | k | v packed in it
    where key and value are absent; query head h reads key/value head h // (num_heads / kv_num_heads). A
    key/value head goes with the query heads it serves, its cache (past, present) too; num_heads and
    kv_num_heads follow. Where the graph's inputs and outputs hold the cache, the query heads prune as
    slots (`held_heads`): the same query head of every key/value group at once, so each group keeps as
    many. A quantized cache and the head size are frozen."""

    domain = "com.microsoft"
    ops = ("GroupQueryAttention",)
    KEY, VALUE, PAST_K, PAST_V, BIAS, SINK, K_SCALE, V_SCALE = 1, 2, 3, 4, 10, 11, 12, 13

    def _sizes(self, c):
        heads, kv_heads, y = c.attr("num_heads", 0), c.attr("kv_num_heads", 0), c.out(0)
        if not heads or not kv_heads or heads % kv_heads or c.rank(c.inp(0)) != 3 or c.dim(y, 2) % heads:
            raise Frozen(f"GroupQueryAttention: {heads} query heads do not share {kv_heads} key/value heads evenly")
        if c.inp(self.K_SCALE) or c.inp(self.V_SCALE) or c.attr("kv_cache_bit_width", 0):
            raise Frozen("GroupQueryAttention with a quantized key/value cache")
        return heads, kv_heads, c.dim(y, 2) // heads

    def held_heads(self, c):
        heads, kv_heads = c.attr("num_heads", 0), c.attr("kv_num_heads", 0)
        return (c.out(0), 2) if heads != kv_heads and (c.inp(self.PAST_K) or c.out(1)) else None

    def input_sizes(self, node, shape):
        """An empty cache ([B, kv heads, 0, head size]: a prompt's first run, any batch); a sliding
        window's ring buffer (`sliding_window_cache`) at its capacity, the window."""
        heads, kv_heads = attr(node, "num_heads", 0), attr(node, "kv_num_heads", 0)
        query = shape(node.input[0])
        packed = len(node.input) <= self.KEY or not node.input[self.KEY]
        width = query[-1] if query else None
        if not heads or not width:
            return {}
        size = width // (heads + 2 * kv_heads) if packed else width // heads
        caches = [t for t in node.input[self.PAST_K:self.PAST_V + 1] if t]
        window = attr(node, "local_window_size", -1) if attr(node, "sliding_window_cache", 0) else 0
        return {cache: {1: kv_heads, 2: max(window, 0), 3: size} for cache in caches}

    def _heads_of(self, c, heads, kv_heads, size):
        """{pair: unit of each position}: query heads are units 0.. (their key/value head, or their slot
        where the cache is held), key/value heads come after them."""
        query, kv, tags = _query_units(c, heads, kv_heads)
        q, y = c.inp(0), c.out(0)
        heads_of = {(y, 2): np.repeat(query, size)}
        if c.inp(self.KEY):
            heads_of |= {(q, 2): np.repeat(query, size), (c.inp(self.KEY), 2): np.repeat(kv, size),
                         (c.inp(self.VALUE), 2): np.repeat(kv, size)}
        else:
            heads_of[(q, 2)] = np.concatenate([np.repeat(query, size), np.repeat(kv, size), np.repeat(kv, size)])
        for cache in (c.inp(self.PAST_K), c.inp(self.PAST_V), c.out(1), c.out(2)):
            if cache:
                heads_of[(cache, 1)] = kv
        if c.out(3):
            heads_of[(c.out(3), 1)] = query
        bias, sink = c.inp(self.BIAS), c.inp(self.SINK)
        if bias and c.rank(bias) == 4 and c.dim(bias, 1) == heads:
            heads_of[(bias, 1)] = query
        if sink and c.rank(sink) == 1 and c.dim(sink, 0) == heads:
            heads_of[(sink, 0)] = query
        return heads_of, tags

    def propagate(self, c, tensor, axis):
        heads, kv_heads, size = self._sizes(c)
        q, y = c.inp(0), c.out(0)
        if tensor in (q, y) and axis < 2:  # batch and sequence
            return [identity((tensor, axis), (y if tensor == q else q, axis), c.dim(tensor, axis))]
        heads_of, tags = self._heads_of(c, heads, kv_heads, size)
        if (tensor, axis) not in heads_of:
            raise Frozen(f"GroupQueryAttention: channel on axis {axis} of '{tensor}'")
        if "head-dim" in c.options.granularity:
            raise Frozen("GroupQueryAttention: only whole heads are pruned here (head-dim granularity is not "
                         "supported)")
        return _head_links((tensor, axis), heads_of, tags)

    def rewrite(self, c, plan):
        q, y = c.inp(0), c.out(0)
        if not plan.changed(q, 2):
            return
        heads, kv_heads, size = self._sizes(c)
        kept_heads = plan.new_dim(y, 2) // size
        packed = plan.new_dim(q, 2) if not c.inp(self.KEY) else None
        kept_kv = (packed - kept_heads * size) // (2 * size) if packed else plan.new_dim(c.inp(self.KEY), 2) // size
        plan.set_attr(c.node, "num_heads", kept_heads)
        plan.set_attr(c.node, "kv_num_heads", kept_kv)
