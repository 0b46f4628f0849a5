"""Shape and layout ops: Transpose, Squeeze/Unsqueeze, Reshape/Flatten (with the shape vectors they
read), Expand/Tile, DepthToSpace/SpaceToDepth."""
from __future__ import annotations

import numpy as np

from ..graph import attr, fill_unknown_dim
from . import Ctx, Frozen, Link, Rule, identity, register, rule_for
from .recurrent import Recurrent


@register
class Transpose(Rule):
    ops = ("Transpose",)

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        r = c.rank(x)
        perm = list(c.attr("perm", list(range(r))[::-1]))
        size = c.dim(tensor, axis)
        if tensor == x:
            return [identity((x, axis), (y, perm.index(axis)), size)]
        return [identity((y, axis), (x, perm[axis]), size)]


@register
class SqueezeUnsqueeze(Rule):
    ops = ("Squeeze", "Unsqueeze")

    def _axes(self, c):
        axes = c.const_ints(1) if c.g.opset() >= 13 else c.attr("axes")
        x, y = c.inp(0), c.out(0)
        if c.node.op_type == "Squeeze":
            r = c.rank(x)
            if axes is None:
                shape = c.g.shapes.get(x)
                axes = [i for i, d in enumerate(shape) if d == 1]
            return sorted(a % r for a in axes)
        r = c.rank(y)
        return sorted(a % r for a in axes)

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if tensor != x and tensor != y:
            return []
        axes = self._axes(c)
        big, small = (x, y) if c.node.op_type == "Squeeze" else (y, x)
        kept = [a for a in range(c.rank(big)) if a not in axes]
        if tensor == big:
            if axis in axes:
                raise Frozen(f"{c.node.op_type} removes the channel axis")
            return [identity((big, axis), (small, kept.index(axis)), c.dim(tensor, axis))]
        return [identity((small, axis), (big, kept[axis]), c.dim(tensor, axis))]


def shape_vector_pieces(c: Ctx, slot: int):
    """Where the elements of a shape-like input come from: {position: (node, input slot, index)}
    for elements that are constants (the vector itself, or constant pieces of a Concat building
    it); positions missing are computed at run time. None when the vector cannot be traced."""
    name = c.inp(slot)
    value = c.g.static_value(name)
    if value is not None:
        return {p: (c.node, slot, p) for p in range(value.size)}
    index = c.g.producer.get(name)
    while index is not None and _vector_view(c, c.g.nodes[index]) is not None:
        view = c.g.nodes[index]
        slot_in = _vector_view(c, view)
        value = c.g.static_value(view.input[slot_in])
        if value is not None:  # a constant read through a view: its elements are rewritten there
            return {p: (view, slot_in, p) for p in range(value.size)}
        index = c.g.producer.get(view.input[slot_in])  # tf2onnx: int32 Concat -> Cast
    if index is None or c.g.nodes[index].op_type != "Concat":
        return None
    concat = c.g.nodes[index]
    pieces, pos = {}, 0
    for k, part in enumerate(concat.input):
        value = c.g.static_value(part)  # constant, or computed but the same for every input size
        length = value.size if value is not None else c.g.dim(part, 0)
        if length is None:
            return None
        if value is not None:
            pieces.update({pos + j: (concat, k, j) for j in range(length)})
        pos += length
    return pieces


def _vector_view(c: Ctx, node) -> int | None:
    """The input slot a shape vector passes through `node` unchanged from, or None: Cast, Identity,
    a Reshape to [-1], and torch's expand(-1) guard, Where(Equal(v, -1), 1, v), which keeps every
    element but -1."""
    if node.op_type in ("Cast", "Identity"):
        return 0
    if node.op_type == "Reshape":
        target = c.g.static_value(node.input[1])
        return 0 if target is not None and np.asarray(target).reshape(-1).tolist() == [-1] else None
    if node.op_type == "Where" and len(node.input) == 3:
        test = c.g.producer.get(node.input[0])
        test = c.g.nodes[test] if test is not None else None
        return 2 if test is not None and test.op_type == "Equal" and node.input[2] in test.input else None
    return None


def own_sizes(c: Ctx, slot: int, tensor: str) -> set:
    """Positions of a shape-like input whose elements are `tensor`'s own sizes at the same
    positions, read at run time: the vector, or a piece of the Concat building it, is Shape(tensor)
    or a constant-bounds Slice of it that starts where the piece sits (through Cast / Identity), as
    paddle2onnx writes `interpolate(x, size=y.shape[2:])`'s sizes. They follow a pruned `tensor`."""
    return {p for p, (source, axis) in sizes_read(c, slot).items() if source == tensor and axis == p}


def sizes_read(c: Ctx, slot: int) -> dict:
    """{position: (tensor, axis)} of the elements of a shape-like input read at run time off a
    tensor's Shape (the vector, or a piece of the Concat building it, is Shape(tensor) or a
    constant-bounds Slice of it, through Cast / Identity): such a size follows that axis when it is
    pruned."""
    name = c.g.behind_casts(c.inp(slot))
    index = c.g.producer.get(name)
    parts = list(c.g.nodes[index].input) if index is not None and c.g.nodes[index].op_type == "Concat" else [name]
    read, pos = {}, 0
    for part in parts:
        length = c.g.dim(part, 0)
        if length is None:
            break
        source = _shape_source(c, part)
        if source is not None:
            read.update({pos + j: (source[0], source[1] + j) for j in range(length)})
        pos += length
    return read


def size_follows(c: Ctx, slot: int, tensor: str, axis: int) -> list | None:
    """[`tensor`'s axis linked to the axis its size is read off] where the shape vector at input
    `slot` (right-aligned to `tensor`) reads that size at run time from a tensor's Shape (`sizes_read`,
    the sizes equal): pruned together, the size follows. None otherwise."""
    position = axis - (c.rank(tensor) - (c.dim(c.inp(slot), 0) or 0))
    source = sizes_read(c, slot).get(position)
    if source is None or c.dim(*source) != c.dim(tensor, axis):
        return None
    return [identity((tensor, axis), source, c.dim(tensor, axis))]


def _shape_source(c: Ctx, name: str) -> tuple | None:
    """(tensor, axis of its first element) where `name` is Shape(tensor), a step-1 Slice of it with
    constant bounds, or one element of it picked by a constant Gather (torch's `x.shape[1]`, made a
    vector by Unsqueeze); None otherwise."""
    name = c.g.behind_casts(name)
    node = c.g.nodes[c.g.producer[name]] if name in c.g.producer else None
    if node is not None and node.op_type == "Unsqueeze" and c.g.rank(node.input[0]) == 0:
        name = c.g.behind_casts(node.input[0])
        node = c.g.nodes[c.g.producer[name]] if name in c.g.producer else None
    if node is not None and node.op_type == "Gather":
        index = c.const(node.input[1])
        if index is None or index.size != 1 or attr(node, "axis", 0) != 0:
            return None
        source = _shape_source(c, node.input[0])
        length = c.g.dim(node.input[0], 0)
        position = int(index.reshape(-1)[0])
        if source is None or (position < 0 and length is None):
            return None
        return source[0], source[1] + (position + length if position < 0 else position)
    offset = 0
    if node is not None and node.op_type == "Slice":
        bounds = c.g.slice_bounds(node)
        if bounds is None or len(bounds[0]) != 1 or bounds[3] not in (None, [1]):
            return None
        offset = bounds[0][0]
        name = c.g.behind_casts(node.input[0])
        node = c.g.nodes[c.g.producer[name]] if name in c.g.producer else None
    if node is None or node.op_type != "Shape" or offset < 0:
        return None
    start = attr(node, "start", 0)
    return (node.input[0], start + offset) if start >= 0 else None


INFERRED = "inferred"


def fold_factor(c: Ctx, slot: int, position: int):
    """(node, input slot) of the constant head count H in a shape element computed as
    batch * H (e.g. Concat([.., Unsqueeze(Mul(batch, H)), ..])), INFERRED for a -1 element, or
    None; position counts from the end."""
    value = c.const(c.inp(slot))
    if value is not None:  # a constant vector ([S, -1, d]: torch exports with a static sequence)
        value = np.asarray(value).reshape(-1)
        return INFERRED if -value.size <= position < 0 and int(value[position]) == -1 else None
    index = c.g.producer.get(c.inp(slot))
    if index is None or c.g.nodes[index].op_type != "Concat":
        return None
    concat, ends, pos = c.g.nodes[index], [], 0
    for part in concat.input:
        length = c.g.dim(part, 0)
        if length is None:
            return None
        pos += length
        ends.append(pos)
    position += pos
    part = next((p for p, end in zip(concat.input, ends) if position < end), None)
    if part is None or c.g.dim(part, 0) != 1:
        return None
    if c.const(part) is not None and int(c.const(part).reshape(-1)[0]) == -1:
        return INFERRED
    while part in c.g.producer:
        node = c.g.nodes[c.g.producer[part]]
        if node.op_type in ("Unsqueeze", "Reshape", "Squeeze", "Cast", "Identity"):
            part = node.input[0]
            continue
        if node.op_type != "Mul":
            return None
        for k, name in enumerate(node.input[:2]):
            value = c.const(name)
            if value is not None and value.size == 1 and not c.g.is_static(node.input[1 - k]):
                return node, k
        return None
    return None


def rewrite_shape_vector(c: Ctx, plan, slot: int, out: str):
    """Write the new sizes of `out`'s pruned axes into the shape vector at input `slot` (right
    aligned); elements computed at run time follow the new sizes by themselves, but those that are
    the same at every input size become constants: `out`'s new size there. Such an element may be
    computed from a pruned channel count in a way that does not follow `out` (a head's size as C / 4,
    C read off the input, when whole heads go; C read off another tensor: `pinned_read`)."""
    pieces = shape_vector_pieces(c, slot) or {}
    length = c.g.dim(c.inp(slot), 0) or 0
    edits = {}
    for a in range(c.g.rank(out)):
        position = a - (c.g.rank(out) - length)
        if position not in pieces:
            continue
        node, k, j = pieces[position]
        if not plan.changed(out, a) and node.input[k] in c.g.consts:
            continue
        key = (id(node), k)
        if key not in edits:
            value = np.asarray(c.g.static_value(node.input[k]))  # keeps int32 (tf2onnx Cast)
            edits[key] = (node, k, value.astype(np.int32 if value.dtype == np.int32 else np.int64))
        values = edits[key][2].reshape(-1)
        if values[j] == c.g.dim(out, a):  # 0 (copy), -1 (infer) and 1 (broadcast) stay
            values[j] = plan.new_dim(out, a)
    for node, k, values in edits.values():
        plan.set_input(node, k, values)


def pinned_read(c: Ctx, concat, k: int) -> tuple | None:
    """(tensor, axis) where input k of `concat` is one size read at run time off that tensor's Shape
    (torch's `x.shape[1]`) whose value is the same at every input size: a channel count. A Concat
    read only as Reshape targets then takes it as a constant in the pruned model, the Reshape's own
    new size (`rewrite_shape_vector`), so the read need not follow the tensor it was read off
    (YOLO11's attention: `(v @ attn).view(B, C, H, W)`, C read off the residual stream)."""
    if concat.op_type != "Concat" or c.g.dim(concat.input[k], 0) != 1 or c.g.static_value(concat.input[k]) is None:
        return None
    uses = c.g.consumers.get(concat.output[0], [])
    if not uses or any(c.g.nodes[i].op_type != "Reshape" or slot != 1 for i, slot in uses):
        return None
    read = _shape_source(c, concat.input[k])
    return read if read is not None and isinstance(c.g.dim(*read), int) else None


def constant_size_at(c: Ctx, slot: int, out: str, axis: int) -> bool:
    pieces = shape_vector_pieces(c, slot)
    length = c.g.dim(c.inp(slot), 0)
    return pieces is not None and length is not None and axis - (c.g.rank(out) - length) in pieces


def reshape_map(shape_from, shape_to, axis, split_policy="outer", channels=None):
    """Map channel `axis` of shape_from onto one axis of shape_to through a row-major reshape.

    Returns (axis_to, src_idx, dst_idx, unit, virtual_size) or raises Frozen; unit tags splits
    ("head" when whole outer blocks go, "head-dim" when the same inner position goes in every
    block); virtual_size is set when the channels fold into a symbolic axis. Trailing dims the reshape leaves
    alone (equal, even symbolic, e.g. sequence x head-dim) are set aside first; of the rest, only
    the dims from the channel axis inwards need to be static.
    """
    common = 0
    while (common < min(len(shape_from) - axis - 1, len(shape_to) - 1)
           and shape_from[-1 - common] == shape_to[-1 - common]
           and not (isinstance(shape_from[-1 - common], str) and shape_from[-1 - common] == "?")):
        common += 1
    if common:
        return reshape_map(shape_from[:-common], shape_to[:-common], axis, split_policy, channels)
    tails = _symbolic_tails(shape_from, shape_to, axis)
    if tails is not None:  # [B, C, H, W] -> [B, heads, C/heads, H*W]: the H*W block is left alone
        return reshape_map(shape_from[:tails[0]], shape_to[:tails[1]], axis, split_policy, channels)
    if channels is not None and not isinstance(shape_from[axis], int):  # a virtual axis
        if axis == len(shape_from) - 1 and shape_to and shape_to[-1] == channels:
            return len(shape_to) - 1, np.arange(channels), np.arange(channels), None, None
        unfolded = _unfold_virtual(shape_from, shape_to, axis, channels)
        if unfolded is not None:
            return unfolded, np.arange(channels), np.arange(channels), None, None
        if _merges_virtual(shape_from, shape_to, axis, channels):
            d = shape_from[-1]  # head h takes channels h*d .. h*d + d - 1
            return len(shape_to) - 1, np.repeat(np.arange(channels), d), np.arange(channels * d), "head", None
        raise Frozen("Reshape of an axis with heads merged into a symbolic size")
    channels = shape_from[axis]
    if (axis == len(shape_from) - 1 and isinstance(channels, int) and shape_to
            and not isinstance(shape_to[-1], int)
            and any(not isinstance(d, int) for d in shape_from[:axis])):
        # [B, H] -> [B*H]: the channels fold into a symbolic size; the merged axis is virtual
        return len(shape_to) - 1, np.arange(channels), np.arange(channels), None, channels
    inner_dims = shape_from[axis + 1:]
    if not all(isinstance(d, int) for d in inner_dims) or not isinstance(channels, int):
        raise Frozen("Reshape around the channel axis with symbolic sizes")
    inner = int(np.prod(inner_dims, dtype=np.int64))
    suffix = 1
    for b in range(len(shape_to) - 1, -1, -1):
        d = shape_to[b]
        if not isinstance(d, int):
            break
        inner_to, suffix = suffix, suffix * d
        if inner % inner_to == 0 and d % (channels * (inner // inner_to)) == 0:
            # axis b starts inside the channel's inner block (k = inner / inner_to positions per
            # channel) and holds outer * channels * k: position (o, c, j) comes from channel c.
            # The outer factor need not be whole dims: [B, L, C] -> [B, L/k, k*C] (byte models)
            k = inner // inner_to
            outer = d // (channels * k)
            pos = (np.arange(outer)[:, None, None] * channels * k + np.arange(channels)[None, :, None] * k
                   + np.arange(k)[None, None, :])
            src = np.broadcast_to(np.arange(channels)[None, :, None], pos.shape)
            return b, src.ravel(), pos.ravel(), None, None
        if inner_to == inner and b > 0 and isinstance(shape_to[b - 1], int) \
                and shape_to[b - 1] * d == channels and d > 1 and shape_to[b - 1] > 1:
            if split_policy == "outer":  # whole outer blocks (attention heads)
                return b - 1, np.arange(channels), np.arange(channels) // d, "head", None
            return b, np.arange(channels), np.arange(channels) % d, "head-dim", None
        if inner_to == inner and _folds_into(shape_from[:axis], shape_to[:b]) \
                and d > 1 and channels % d == 0 and channels // d > 1:
            # [S, B, H*d] -> [S, B*H, d]: the heads fold into the symbolic batch (virtual axis)
            if split_policy == "outer":
                return b - 1, np.arange(channels), np.arange(channels) // d, "head", channels // d
            return b, np.arange(channels), np.arange(channels) % d, "head-dim", None
        if inner_to == inner and b > 0 and d > 1 and channels % d == 0 and channels // d > 1:
            # the outer factor merges with outer dims ([N, H, W, A*V] -> [N, H*W*A, V], SSD heads;
            # [B, L/k, k*C] -> [B, L, C]): axis b index is c % d whatever axis b - 1 holds, so the
            # same position of every block goes together
            return b, np.arange(channels), np.arange(channels) % d, None, None
        if inner_to > inner and inner_to % inner == 0 and channels % (inner_to // inner) == 0 \
                and d % (channels // (inner_to // inner)) == 0:
            # the channel axis splits as (C/s, s) and s merges into the inner dims ([N, 8, H, W]
            # -> [N, 4, 2H, W]): axis b index o * C/s + c // s holds s channels, removed together
            s = inner_to // inner
            blocks = channels // s
            pos = np.arange(d // blocks)[:, None] * blocks + (np.arange(channels) // s)[None, :]
            src = np.broadcast_to(np.arange(channels)[None, :], pos.shape)
            return b, src.ravel(), pos.ravel(), None, None
    raise Frozen("Reshape regroups the channel axis in a way with no channel-wise map")


def _symbolic_tails(shape_from, shape_to, axis) -> tuple | None:
    """(i, j) where shape_from[i:] (after the channel axis, from its first symbolic dim on) holds as
    many elements as shape_to[j:] for every value of the symbols ('h', 'w' and 'w*h'): row-major,
    those trailing blocks are the same elements in the same order, and the rest maps on its own."""
    i = next((k for k in range(axis + 1, len(shape_from)) if not isinstance(shape_from[k], int)), None)
    known = {d for d in (*shape_from, *shape_to) if isinstance(d, str)}
    product = _symbolic_product(shape_from[i:], known) if i is not None else None
    if product is None:
        return None
    for j in range(len(shape_to) - 1, 0, -1):
        if _symbolic_product(shape_to[j:], known) == product:
            return i, j
    return None


def _symbolic_product(dims, known: set) -> tuple | None:
    """(integer factor, sorted symbolic factors) of the product of `dims`, or None where a dim is
    unknown ('?')."""
    factor, names = 1, []
    for d in dims:
        if d == "?":
            return None
        for part in [d] if isinstance(d, int) else _factors(d, known - {d}):
            if isinstance(part, int) or part.isdigit():
                factor *= int(part)
            else:
                names.append(part)
    return (factor, tuple(sorted(names))) if names else None


def _factors(name: str, known: set) -> list:
    """A symbolic size as the factors it is named after: a product is named '<a>*<b>' or
    '(<a>)*(<b>)' after its factors, which the other shape may hold as dims of their own ('w*h'
    against 'h' and 'w'; torch writes long expressions for sizes after strided convs); a name
    without brackets or operators splits at each '*'; anything else is one factor."""
    for a in sorted(known, key=lambda k: (-len(k), k)):
        if name == f"({a})":
            return _factors(a, known - {a})
        for written in (f"({a})", a):
            if name.startswith(written + "*"):
                return [*_factors(a, known - {a}), *_factors(name[len(written) + 1:], known)]
    if any(ch in name for ch in "()+-/ "):
        return [name]
    return name.split("*")


def _folds_into(dims_from, dims_to) -> bool:
    """dims_to equals dims_from except that its last dim, symbolic, absorbs one symbolic dim of
    dims_from (and the channel axis's outer factor)."""
    if not dims_to or isinstance(dims_to[-1], int) or "?" in dims_from or "?" in dims_to:
        return False
    rest_to, rest_from = list(dims_to[:-1]), list(dims_from)
    if dims_to[-1] in rest_from:
        return False
    for d in rest_to:
        if d not in rest_from:
            return False
        rest_from.remove(d)
    # the absorbed dim is a factor of the product's name ("4*batch", "batch*H"); not so for
    # [B, floor(L/2), 2*C] -> [B, L, C] (a sequence merged into the channels, split back)
    return len(rest_from) == 1 and not isinstance(rest_from[0], int) and rest_from[0] in dims_to[-1]


def _unfold_virtual(shape_from, shape_to, axis, channels):
    """[B*H] -> [B, H]: the axis of shape_to that takes back the heads of a virtual axis."""
    if axis != len(shape_from) - 1 or "?" in shape_to:
        return None
    ints = [b for b, d in enumerate(shape_to) if isinstance(d, int) and d != 1]
    if len(ints) == 1 and shape_to[ints[0]] == channels \
            and _folds_into(list(shape_to[:ints[0]]) + list(shape_to[ints[0] + 1:]), shape_from):
        return ints[0]
    return None


def _query_slots(c: Ctx, tensor, axis, src_shape, dst_shape, dst) -> list:
    """A grouped-query repeat [B, kv, r, S, d] -> [B, kv*r, S, d] whose key/value heads are held: query
    head g*r + j is slot j of group g, and slot j goes in every group at once (the repeat's r shrinks,
    each remaining query head still reads its own key/value head). The key/value axis is frozen here."""
    x = c.inp(0)
    if tensor == x and axis == 1:
        raise Frozen("key/value heads held by the graph's inputs or outputs (a cache): the query heads that "
                     "share them prune as slots")
    y = c.out(0)
    if c.node.op_type == "Reshape" and not constant_size_at(c, 1, y, 1) \
            and fold_factor(c, 1, 1 - c.rank(y)) in (None, INFERRED):
        raise Frozen("grouped-query repeat whose merged head count the target shape computes at run time")
    policy = "inner" if tensor != x else "outer"
    b, src_idx, dst_idx, _, virtual = reshape_map(src_shape, dst_shape, axis, policy, c.dim(tensor, axis))
    if virtual is not None or (dst == x and b != 2) or (tensor == x and axis != 2):
        raise Frozen("grouped-query repeat with an unexpected layout")
    return [Link((tensor, axis), (dst, b), src_idx, dst_idx, unit="slot")]


def _merges_virtual(shape_from, shape_to, axis, channels) -> bool:
    """[B*H, d] -> [B, H*d]: heads folded into a symbolic axis merge back with the head size beside
    it (guided diffusion's QKVAttention: [B*H, d, T] -> [B, H*d, T] once T is set aside)."""
    d = shape_from[-1]
    return (axis == len(shape_from) - 2 and len(shape_to) == len(shape_from) and "?" not in shape_to
            and isinstance(d, int) and shape_to[-1] == channels * d
            and _folds_into(list(shape_to[:-1]), list(shape_from[:-1])))


LAYOUT_OPS = ("Unsqueeze", "Squeeze", "Transpose", "Identity")


RECURRENT_OPS = (*Recurrent.ops, "DynamicQuantizeLSTM")  # the latter: com.microsoft, int8 weights


def _is_direction_axis(c: Ctx, tensor, axis, depth=0) -> bool:
    """True when `axis` of `tensor` is a recurrent op's direction axis (Y: [sequence, directions,
    batch, hidden]), seen through Transposes."""
    index = c.g.producer.get(tensor)
    if index is None or depth > 4:
        return False
    node = c.g.nodes[index]
    if node.op_type in RECURRENT_OPS:
        return tensor == node.output[0] and axis == 1
    perm = attr(node, "perm") if node.op_type == "Transpose" else None
    return perm is not None and _is_direction_axis(c, node.input[0], perm[axis], depth + 1)


def _is_selected(c: Ctx, tensor, axis, depth=0) -> bool:
    """True when every use of `axis` of `tensor` (through layout ops) picks single indices of it:
    Gathers with constant indices or a Split along it."""
    uses = c.g.consumers.get(tensor, [])
    if not uses or depth > 8:
        return False
    for i, slot in uses:
        node = c.g.nodes[i]
        inner = Ctx(c.g, i, c.options, c.virtual)
        if slot != 0:
            return False
        if node.op_type == "Gather" and inner.norm_axis(inner.attr("axis", 0), tensor) == axis \
                and inner.const(inner.inp(1)) is not None:
            continue
        if node.op_type == "Split" and inner.norm_axis(inner.attr("axis", 0), tensor) == axis:
            continue
        if node.op_type not in LAYOUT_OPS:
            return False
        try:
            links = rule_for(node).propagate(inner, tensor, axis)
        except Frozen:
            return False
        if len(links) != 1 or not _is_selected(c, links[0].dst[0], links[0].dst[1], depth + 1):
            return False
    return True


def _whole_shape_source(c: Ctx):
    """T when a Reshape's target is Shape(T) read whole (jax2onnx's GroupNorm un-grouping)."""
    index = c.g.producer.get(c.inp(1))
    if index is None or c.g.nodes[index].op_type != "Shape":
        return None
    shape = c.g.nodes[index]
    if attr(shape, "start", 0) != 0 or attr(shape, "end") is not None:
        return None
    source = shape.input[0]
    return source if c.g.shapes.get(source) == c.g.shapes.get(c.out(0)) else None


def _unknown_shape_reason(c: Ctx) -> str:
    """Why a Reshape's shapes are unknown, when running the model tells: at input sizes other
    than the exported ones a Reshape fails, i.e. the exporter baked an input size into the graph
    (which also defeats shape inference)."""
    failure = _other_sizes_failure(c.g)
    if failure is None:
        return "Reshape with unknown input or output shape"
    return (f"Reshape with unknown input or output shape: the model does not run at other input sizes "
            f"({failure}): the exporter baked one input size into the graph (torch.onnx.export(dynamo=False) "
            "does this for nn.MultiheadAttention with dynamic_axes); re-export with static input shapes or with "
            "dynamo=True")


def _other_sizes_failure(g) -> str | None:
    """onnxruntime's Reshape error when the model runs at the shape probe's sizes, else None (cached;
    not run above graph.PROBE_LIMIT)."""
    import re

    from ..graph import PROBE_LIMIT, _probe_feeds, weight_bytes
    from ..runtime import session

    if "_other_sizes_failure" not in g.__dict__:
        g._other_sizes_failure = None
        if weight_bytes(g.model) >= PROBE_LIMIT:  # as infer_shapes: models this large are not run
            return None
        try:
            session(g.model, quiet=True).run(None, _probe_feeds(g.model, 0))
        except Exception as exc:
            text = str(exc)
            node = re.search(r"running Reshape node\. Name:'([^']*)'", text)
            sizes = re.search(r"Input shape:\{([^}]*)\}, requested shape:\{([^}]*)\}", text)
            if node and sizes:
                g._other_sizes_failure = (f"Reshape '{node.group(1)}' cannot reshape [{sizes.group(1)}] to the "
                                          f"constant [{sizes.group(2)}]")
    return g._other_sizes_failure


@register
class Reshape(Rule):
    ops = ("Reshape", "Flatten")

    def held_heads(self, c):
        """A grouped-query repeat: [B, kv, r, S, d] = Expand of [B, kv, 1, S, d], reshaped to [B, kv*r, S, d]."""
        source = c.g.producer.get(c.inp(0))
        if c.node.op_type == "Reshape" and source is not None and c.g.nodes[source].op_type == "Expand" \
                and c.g.rank(c.inp(0)) == (c.g.rank(c.out(0)) or 0) + 1:
            return (c.out(0), 1)
        return None

    def _is_shuffle(self, c, split_axes):
        """A split whose two halves a Transpose then swaps is a channel shuffle."""
        for i, _ in c.g.consumers.get(c.out(0), []):
            node = c.g.nodes[i]
            if node.op_type == "Transpose":
                perm = list(attr(node, "perm", []))
                if sorted(a for a, p in enumerate(perm) if a != p) == sorted(split_axes):
                    return True
        return False

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if tensor not in (x, y):
            raise Frozen("Reshape shape input carries channels")
        sx, sy = c.g.shapes.get(x), c.g.shapes.get(y)
        if sx is None or sy is None:
            raise Frozen(_unknown_shape_reason(c))
        if c.node.op_type == "Reshape" and set(range(axis + 1)) <= own_sizes(c, 1, x):
            # the target's leading sizes up to the channel axis are x's own, read at run time
            # (paddle2onnx's flatten(2): Concat(Shape(x)[:2], [-1])): the axis passes as it is
            return [identity((tensor, axis), (y if tensor == x else x, axis), c.dim(tensor, axis))]
        shape_of = _whole_shape_source(c) if c.node.op_type == "Reshape" else None
        if c.node.op_type == "Reshape" and shape_of is None and shape_vector_pieces(c, 1) is None:
            raise Frozen("Reshape with a computed target shape")
        sx, sy = fill_unknown_dim(sx, sy), fill_unknown_dim(sy, sx)
        src_shape, dst_shape, dst = (sx, sy, y) if tensor == x else (sy, sx, x)
        if c.g.node_name(c.index) in c.options.query_slots:
            return _query_slots(c, tensor, axis, src_shape, dst_shape, dst)
        # A split of the channel axis prunes whole heads (outer blocks), or the same position in
        # every block for head-dim granularity and for channel shuffles (unit None: plain channels).
        channels = c.dim(tensor, axis)
        b, src_idx, dst_idx, unit, virtual = reshape_map(src_shape, dst_shape, axis, "outer", channels)
        if virtual is not None and tensor == x and c.node.op_type == "Reshape" \
                and fold_factor(c, 1, b - c.rank(y)) is None:
            raise Frozen("heads fold into a size computed at run time without a head-count constant")
        # A split whose outer axis is then taken apart index by index (packed q/k/v picked by
        # Gathers) stacks tensors: the same inner position goes in every one of them. So do a
        # recurrent op's directions (one hidden size for both), merged by Transpose and Reshape.
        plain = unit == "head" and virtual is None and (
            tensor == x and (self._is_shuffle(c, (b, b + 1)) or _is_selected(c, y, b))
            or tensor == y and _is_direction_axis(c, x, b))
        if plain or (unit == "head" and "head-dim" in c.options.granularity):
            b, src_idx, dst_idx, unit, virtual = reshape_map(src_shape, dst_shape, axis, "inner", channels)
        links = [Link((tensor, axis), (dst, b), src_idx, dst_idx, unit=None if plain else unit,
                      dst_size=virtual)]
        if shape_of is not None:  # y takes shape_of's run-time shape: their axes shrink together
            y_axis = axis if tensor == y else b
            links.append(identity((y, y_axis), (shape_of, y_axis), c.dim(y, y_axis)))
        return links

    def reads(self, c):
        if c.node.op_type != "Reshape":
            return []
        pieces = (shape_vector_pieces(c, 1) or {}).values()
        return [read[0] for read in (pinned_read(c, node, k) for node, k, _ in pieces) if read]

    def rewrite(self, c, plan):
        if c.node.op_type == "Reshape":
            y = c.out(0)
            rewrite_shape_vector(c, plan, 1, y)
            slots = c.g.node_name(c.index) in c.options.query_slots
            for axis in range(c.g.rank(y)):
                # a static size is rewritten here only for query slots (the kv of kv * r is a held size);
                # elsewhere a size read from a shape follows the pruned tensor by itself
                static = c.g.dim(y, axis) is not None
                if not plan.changed(y, axis) or (static and (not slots or constant_size_at(c, 1, y, axis))):
                    continue
                factor = fold_factor(c, 1, axis - c.g.rank(y))
                if factor in (None, INFERRED):
                    continue
                node, k = factor
                old = c.const(node.input[k])
                # a virtual axis (batch * H): the new H; a static size computed as size * r (a
                # grouped-query repeat's kv * r, the kv size read from a shape): r scaled with it
                new = plan.new_dim(y, axis) if c.g.dim(y, axis) is None else \
                    int(old.reshape(-1)[0]) * plan.new_dim(y, axis) // c.g.dim(y, axis)
                plan.set_input(node, k, np.array(new, dtype=old.dtype).reshape(old.shape))


@register
class Expand(Rule):
    ops = ("Expand", "Tile")

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if tensor not in (x, y):
            return []
        ry, rx = c.rank(y), c.rank(x)
        if c.node.op_type == "Tile":
            reps = c.const_ints(1)
            if reps[axis] != 1 and tensor == y and c.dim(x, axis) == 1 and constant_size_at(c, 1, y, axis):
                return []  # a size-1 axis repeated is a broadcast (onnxruntime-genai's mask over heads)
            if reps[axis] != 1:
                raise Frozen("Tile repeats the channel axis")
            other = y if tensor == x else x
            return [identity((tensor, axis), (other, axis), c.dim(tensor, axis))]
        if tensor == x:
            return [identity((x, axis), (y, axis + ry - rx), c.dim(x, axis))]
        ax = axis - (ry - rx)
        if ax < 0 or c.dim(x, ax) == 1:  # broadcast: only the target size changes
            if constant_size_at(c, 1, y, axis):
                return []
            follows = size_follows(c, 1, y, axis)  # a size read off the Shape of a tensor pruned alike
            if follows:
                return follows
            raise Frozen("Expand broadcasts the channel axis to a size computed at run time")
        return [identity((y, axis), (x, ax), c.dim(y, axis))]

    def rewrite(self, c, plan):
        rewrite_shape_vector(c, plan, 1, c.out(0))  # a Tile's repeats of a size-1 axis: its new size


@register
class DepthToSpace(Rule):
    """PixelShuffle: input channel c*b*b + k (CRD) or k*C + c (DCR) becomes output channel c."""

    ops = ("DepthToSpace", "SpaceToDepth")

    def propagate(self, c, tensor, axis):
        x, y = c.inp(0), c.out(0)
        if axis != 1:
            raise Frozen(f"{c.node.op_type} maps only axis 1 (channels) to blocks; these units run along axis {axis} "
                         f"of '{tensor}', a spatial axis it rearranges, so no slice of them stays a slice")
        b2 = c.attr("blocksize") ** 2
        deep, shallow = (x, y) if c.node.op_type == "DepthToSpace" else (y, x)
        n = c.dim(deep, 1)
        few = n // b2
        crd = c.node.op_type == "DepthToSpace" and c.attr("mode", "DCR") == "CRD"
        deep_to_shallow = np.arange(n) // b2 if crd else np.arange(n) % few
        if tensor == deep:
            return [Link((deep, 1), (shallow, 1), np.arange(n), deep_to_shallow)]
        return [Link((shallow, 1), (deep, 1), deep_to_shallow, np.arange(n))]
