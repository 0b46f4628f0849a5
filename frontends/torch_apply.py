"""Narrow a user's own torch module in place to match a SPA plan (``spa prune --plan-out``).

The plan names ONNX weights; the weight map written by :func:`spa.frontends.torch.export` (in
the ONNX file's metadata) says which module tensors and axes each came from. Removals are
collected per module tensor axis, applied with the module type's rules (size attributes, conv
groups, gate blocks of recurrent layers, q/k/v blocks of nn.MultiheadAttention, head counts of
HF transformers attention), and whatever cannot be fixed is reported by name, never silently.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from spa.errors import SpaError

__all__ = ["PlanReport", "apply_plan"]


@dataclass
class PlanReport:
    narrowed: dict = field(default_factory=dict)     # tensor name -> (old shape, new shape)
    attributes: dict = field(default_factory=dict)   # "module.attr" -> (old, new)
    unverified: list = field(default_factory=list)   # narrowed tensors of custom modules
    unfixable: list = field(default_factory=list)    # what the module still needs by hand
    max_error: float | None = None                   # vs the pruned ONNX, when verified

    @property
    def ok(self) -> bool:
        return not self.unfixable

    def __str__(self):
        lines = [f"narrowed {len(self.narrowed)} tensors, updated {len(self.attributes)} attributes"]
        lines += [f"  unverified: {m}" for m in self.unverified]
        lines += [f"  NOT FIXED: {m}" for m in self.unfixable]
        if self.max_error is not None:
            lines.append(f"  max relative error vs pruned ONNX: {self.max_error:.3g}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# plan -> removals per module tensor axis
# ------------------------------------------------------------------------------------------------
def _plan_entries(plan) -> list[dict]:
    if hasattr(plan, "weight_entries"):
        return plan.weight_entries()
    if isinstance(plan, (str, bytes)) or hasattr(plan, "__fspath__"):
        try:
            with open(plan) as f:
                plan = json.load(f)
        except (OSError, ValueError) as exc:
            raise SpaError(f"{plan} is not a SPA plan ({type(exc).__name__})") from None
    try:
        return list(plan["weights"])
    except (KeyError, TypeError):
        raise SpaError("plan has no 'weights' list (expected the JSON of spa prune --plan-out)") from None


def _removed_in_source(entry, index_map):
    try:
        removed = np.asarray(entry["removed"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise SpaError(f"plan entry for '{entry.get('name')}' has no 'removed' index list") from None
    if index_map is None:
        return removed, None
    if isinstance(index_map, int):
        return removed + index_map, (index_map, None)
    index_map = np.asarray(index_map, dtype=np.int64)
    mapped = index_map[removed]
    return mapped[mapped >= 0], index_map[index_map >= 0]


class _Removals:
    """tensor name -> axis -> set of removed indices, checked for consistency between sources."""

    def __init__(self):
        self.removed: dict[str, dict[int, set]] = {}
        self.sources: dict[tuple, list] = {}
        self.full: dict[tuple, set] = {}  # (tensor, axis) -> ONNX weights covering all of it

    def add(self, tensor, axis, removed, onnx_name):
        self.removed.setdefault(tensor, {}).setdefault(axis, set()).update(int(i) for i in removed)
        self.sources.setdefault((tensor, axis), []).append((onnx_name, set(int(i) for i in removed)))

    def conflicts(self) -> list[str]:
        """Two ONNX weights mapped onto the same full axis (e.g. a tied table and its transposed
        copy) must agree; block-wise sources (packed q/k/v) cover different indices."""
        out = []
        for (tensor, axis), sources in self.sources.items():
            full = [s for s in sources if s[0] in self.full.get((tensor, axis), set())]
            for name, removed in full[1:]:
                if removed != full[0][1]:
                    out.append(f"'{tensor}' axis {axis}: ONNX weights '{full[0][0]}' and '{name}' "
                               f"remove different indices")
        return out


def _collect(entries, weight_map, state, report) -> _Removals:
    removals = _Removals()
    for entry in entries:
        name, axis = entry["name"], int(entry["axis"])
        info = weight_map.get(name) if weight_map else None
        if info is None:
            if name in state:  # no map: ONNX names are the module's own tensor names
                info = {"axes": {str(axis): [[name, axis, None]]}}
            else:
                report.unfixable.append(f"plan narrows ONNX weight '{name}' (axis {axis}), which the "
                                        f"weight map does not trace to a module tensor")
                continue
        targets = info.get("axes", {}).get(str(axis))
        if not targets:
            report.unfixable.append(f"plan narrows ONNX weight '{name}' axis {axis} "
                                    f"({info.get('how')} from '{info.get('source')}'), which no "
                                    f"module tensor axis follows")
            continue
        for tensor, tensor_axis, index_map in targets:
            if tensor not in state:
                report.unfixable.append(f"weight map names '{tensor}', which the module does not have")
                continue
            removed, _ = _removed_in_source(entry, index_map)
            removals.add(tensor, int(tensor_axis), removed, name)
            if index_map is None:
                removals.full.setdefault((tensor, int(tensor_axis)), set()).add(name)
    return removals


# ------------------------------------------------------------------------------------------------
# narrowing tensors
# ------------------------------------------------------------------------------------------------
class _Narrower:
    def __init__(self, module, removals: _Removals, report: PlanReport):
        self.module = module
        self.removals = removals
        self.report = report
        self.done: set[str] = set()
        self.old_shapes: dict[str, tuple] = {}
        self.aliases: dict[int, list] = {}
        for mname, m in module.named_modules(remove_duplicate=False):
            for pname, p in list(m._parameters.items()) + list(m._buffers.items()):
                if p is not None:
                    self.aliases.setdefault(id(p), []).append((m, pname))

    def removed(self, tensor, axis) -> set:
        return self.removals.removed.get(tensor, {}).get(axis, set())

    def narrow(self, owner: nn.Module, prefix: str, pname: str, axis_removed: dict) -> None:
        """Replace owner.pname by its slice keeping everything not removed (on every axis)."""
        old = getattr(owner, pname)
        full = f"{prefix}{pname}"
        if old is None or not any(axis_removed.values()):
            return
        new = old.detach()
        for axis, removed in sorted(axis_removed.items()):
            if not removed:
                continue
            if max(removed) >= new.shape[axis]:
                raise SpaError(f"plan removes index {max(removed)} of '{full}' axis {axis}, "
                               f"which has {new.shape[axis]}")
            kept = [i for i in range(new.shape[axis]) if i not in removed]
            new = new.index_select(axis, torch.tensor(kept, dtype=torch.long, device=new.device))
        new = new.clone()
        for m, attr in self.aliases.get(id(old), [(owner, pname)]):
            if isinstance(old, nn.Parameter):
                value = new if isinstance(new, nn.Parameter) else nn.Parameter(new, old.requires_grad)
                new = value
                setattr(m, attr, value)
            else:
                m._buffers[attr] = new
        self.old_shapes[full] = tuple(old.shape)
        self.report.narrowed[full] = (tuple(old.shape), tuple(new.shape))
        self.done.add(full)

    def own(self, prefix, m, names=None) -> dict:
        """{param: {axis: removed}} of module m's own tensors (names given or all)."""
        names = names or [n for n, t in list(m._parameters.items()) + list(m._buffers.items())
                          if t is not None]
        return {n: self.removals.removed.get(f"{prefix}{n}", {}) for n in names}

    def set_attr(self, m, prefix, attr, value):
        old = getattr(m, attr, None)
        if old != value:
            setattr(m, attr, value)
            self.report.attributes[f"{prefix}{attr}"] = (old, value)


def _union(*sets):
    out = set()
    for s in sets:
        out |= s
    return out


# -- torch.nn layer rules --------------------------------------------------------------------------
def _conv(nw: _Narrower, prefix, m):
    """Conv weight [out, in/groups, k..]; ConvTranspose weight [in, out/groups, k..]. Depthwise
    (one input channel per group): the group count follows the channels; otherwise groups stay
    and the in-group positions are narrowed."""
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    own = nw.own(prefix, m)
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    grouped_axis = in_axis if transposed else out_axis  # the full-size axis that groups split
    per_group = (m.in_channels if transposed else m.out_channels) // m.groups
    one_per_group = m.groups > 1 and m.groups == m.in_channels
    weight = dict(own.get("weight", {}))
    if m.bias is not None:
        bias_removed = _union(own.get("bias", {}).get(0, set()), weight.get(out_axis, set()))
        weight[out_axis] = bias_removed
        nw.narrow(m, prefix, "bias", {0: bias_removed})
    nw.narrow(m, prefix, "weight", weight)
    w = m.weight
    if one_per_group:
        nw.set_attr(m, prefix, "groups", w.shape[grouped_axis] // per_group)
    if transposed:
        nw.set_attr(m, prefix, "in_channels", w.shape[0])
        nw.set_attr(m, prefix, "out_channels", w.shape[1] * m.groups)
    else:
        nw.set_attr(m, prefix, "out_channels", w.shape[0])
        nw.set_attr(m, prefix, "in_channels", w.shape[1] * m.groups)


def _linear(nw: _Narrower, prefix, m):
    own = nw.own(prefix, m)
    out_removed = _union(own.get("weight", {}).get(0, set()), own.get("bias", {}).get(0, set()))
    nw.narrow(m, prefix, "weight", {0: out_removed, 1: own.get("weight", {}).get(1, set())})
    if m.bias is not None:
        nw.narrow(m, prefix, "bias", {0: out_removed})
    nw.set_attr(m, prefix, "out_features", m.weight.shape[0])
    nw.set_attr(m, prefix, "in_features", m.weight.shape[1])


def _hf_conv1d(nw: _Narrower, prefix, m):
    """transformers' Conv1D (GPT-2): weight [in, out], bias [out], attribute nf = out."""
    own = nw.own(prefix, m)
    out_removed = _union(own.get("weight", {}).get(1, set()), own.get("bias", {}).get(0, set()))
    nw.narrow(m, prefix, "weight", {0: own.get("weight", {}).get(0, set()), 1: out_removed})
    nw.narrow(m, prefix, "bias", {0: out_removed})
    nw.set_attr(m, prefix, "nf", m.weight.shape[1])
    if hasattr(m, "nx"):
        nw.set_attr(m, prefix, "nx", m.weight.shape[0])


def _channel_norm(nw: _Narrower, prefix, m):
    """BatchNorm / InstanceNorm: all per-channel tensors follow the channel."""
    own = nw.own(prefix, m, ["weight", "bias", "running_mean", "running_var"])
    removed = _union(*(axes.get(0, set()) for axes in own.values()))
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            nw.narrow(m, prefix, name, {0: removed})
    size = next((getattr(m, n).shape[0] for n in ("weight", "running_mean")
                 if getattr(m, n, None) is not None), None)
    if size is not None:
        nw.set_attr(m, prefix, "num_features", size)
    elif removed:
        nw.report.unfixable.append(f"'{prefix[:-1]}': {type(m).__name__} without per-channel tensors "
                                   f"must be told its new channel count")


def _layer_norm(nw: _Narrower, prefix, m):
    own = nw.own(prefix, m, ["weight", "bias"])
    rank = len(m.normalized_shape)
    axes = {a: _union(*(o.get(a, set()) for o in own.values())) for a in range(rank)}
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            nw.narrow(m, prefix, name, axes)
    if m.weight is not None:
        nw.set_attr(m, prefix, "normalized_shape", tuple(m.weight.shape))
    elif any(axes.values()):
        nw.report.unfixable.append(f"'{prefix[:-1]}': LayerNorm without affine tensors: set "
                                   f"normalized_shape by hand")


def _group_norm(nw: _Narrower, prefix, m):
    own = nw.own(prefix, m, ["weight", "bias"])
    removed = _union(*(o.get(0, set()) for o in own.values()))
    old_channels, per_group = m.num_channels, m.num_channels // m.num_groups
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            nw.narrow(m, prefix, name, {0: removed})
    channels = old_channels - len(removed)
    groups_removed = {i // per_group for i in removed}
    if removed and len(removed) != len(groups_removed) * per_group:
        nw.report.unfixable.append(f"'{prefix[:-1]}': GroupNorm loses channels of a group without "
                                   f"the whole group")
    nw.set_attr(m, prefix, "num_channels", channels)
    nw.set_attr(m, prefix, "num_groups", channels // per_group)


def _embedding(nw: _Narrower, prefix, m):
    own = nw.own(prefix, m, ["weight"])
    nw.narrow(m, prefix, "weight", own["weight"])
    nw.set_attr(m, prefix, "num_embeddings", m.weight.shape[0])
    nw.set_attr(m, prefix, "embedding_dim", m.weight.shape[1])


def _mha(nw: _Narrower, prefix, m: nn.MultiheadAttention):
    """Packed q/k/v rows in in_proj_weight [3E, E]; out_proj is an nn.Linear child (own rule)."""
    e, heads = m.embed_dim, m.num_heads
    head_dim = e // heads
    own = nw.own(prefix, m)
    if m._qkv_same_embed_dim:
        rows = _union(own.get("in_proj_weight", {}).get(0, set()), own.get("in_proj_bias", {}).get(0, set()))
        cols = own.get("in_proj_weight", {}).get(1, set())
        nw.narrow(m, prefix, "in_proj_weight", {0: rows, 1: cols})
        if m.in_proj_bias is not None:
            nw.narrow(m, prefix, "in_proj_bias", {0: rows})
        blocks = [{r - k * e for r in rows if k * e <= r < (k + 1) * e} for k in range(3)]
    else:
        blocks = []
        for k, name in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            axes = own.get(name, {})
            nw.narrow(m, prefix, name, axes)
            blocks.append(axes.get(0, set()))
        cols = own.get("q_proj_weight", {}).get(1, set())
        if m.in_proj_bias is not None:
            nw.narrow(m, prefix, "in_proj_bias", {0: _union(*(
                {r + k * e for r in b} for k, b in enumerate(blocks)))})
    for name in ("bias_k", "bias_v"):
        if getattr(m, name, None) is not None:
            nw.narrow(m, prefix, name, {2: cols})
    if not any(blocks) and not cols:
        return
    sizes = {e - len(b) for b in blocks} | {e - len(cols)}
    out_proj_out = m.out_proj.weight.shape[0] - len(nw.removed(f"{prefix}out_proj.weight", 0))
    sizes.add(out_proj_out)
    if len(sizes) != 1:
        nw.report.unfixable.append(
            f"'{prefix[:-1]}': nn.MultiheadAttention needs q, k, v, its input and its output all of "
            f"one size (embed_dim), the plan gives {sorted(sizes)}: replace it by separate Linears")
        return
    new_e = sizes.pop()
    removed_q = blocks[0] if blocks[0] else cols
    whole_heads = {i // head_dim for i in removed_q}
    if len(removed_q) == len(whole_heads) * head_dim:
        new_heads = heads - len(whole_heads)
    else:
        new_heads = heads
    if new_e % new_heads:
        nw.report.unfixable.append(f"'{prefix[:-1]}': new embed_dim {new_e} is not a multiple of "
                                   f"{new_heads} heads")
        return
    nw.set_attr(m, prefix, "embed_dim", new_e)
    nw.set_attr(m, prefix, "kdim", new_e if m.kdim == e else m.kdim)
    nw.set_attr(m, prefix, "vdim", new_e if m.vdim == e else m.vdim)
    nw.set_attr(m, prefix, "num_heads", new_heads)
    nw.set_attr(m, prefix, "head_dim", new_e // new_heads)


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _recurrent(nw: _Narrower, prefix, m: nn.RNNBase):
    gates = _GATES[m.mode]
    hidden = m.hidden_size
    dirs = 2 if m.bidirectional else 1
    suffixes = ["", "_reverse"][:dirs]
    if m.proj_size:
        if any(nw.removals.removed.get(f"{prefix}{n}") for n in m._flat_weights_names):
            nw.report.unfixable.append(f"'{prefix[:-1]}': LSTM with proj_size is not supported")
        return
    new_sizes = set()
    for layer in range(m.num_layers):
        units = set()
        for s in suffixes:
            for name, axis in ((f"weight_ih_l{layer}{s}", 0), (f"weight_hh_l{layer}{s}", 0),
                               (f"weight_hh_l{layer}{s}", 1), (f"bias_ih_l{layer}{s}", 0),
                               (f"bias_hh_l{layer}{s}", 0)):
                rows = nw.removed(f"{prefix}{name}", axis)
                units |= {r % hidden for r in rows} if axis == 0 else set(rows)
        gate_rows = {g * hidden + u for g in range(gates) for u in units}
        for s in suffixes:
            nw.narrow(m, prefix, f"weight_ih_l{layer}{s}",
                      {0: gate_rows, 1: nw.removed(f"{prefix}weight_ih_l{layer}{s}", 1)})
            nw.narrow(m, prefix, f"weight_hh_l{layer}{s}", {0: gate_rows, 1: units})
            if m.bias:
                nw.narrow(m, prefix, f"bias_ih_l{layer}{s}", {0: gate_rows})
                nw.narrow(m, prefix, f"bias_hh_l{layer}{s}", {0: gate_rows})
        new_sizes.add(hidden - len(units))
    if len(new_sizes) > 1:
        nw.report.unfixable.append(
            f"'{prefix[:-1]}': {type(m).__name__} has one hidden_size for all layers; the plan keeps "
            f"{sorted(new_sizes)} units in different layers (prune its groups to equal sizes)")
        return
    nw.set_attr(m, prefix, "hidden_size", new_sizes.pop())
    nw.set_attr(m, prefix, "input_size", m.weight_ih_l0.shape[1])
    m._init_flat_weights()


_LEAF_RULES = [
    (nn.modules.conv._ConvNd, _conv),
    (nn.Linear, _linear),
    (nn.modules.batchnorm._NormBase, _channel_norm),
    (nn.LayerNorm, _layer_norm),
    (nn.GroupNorm, _group_norm),
    (nn.Embedding, _embedding),
    (nn.MultiheadAttention, _mha),
    (nn.RNNBase, _recurrent),
]


def _rule_for(m):
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
        return _hf_conv1d
    for cls, rule in _LEAF_RULES:
        if isinstance(m, cls):
            return rule
    return None


# ------------------------------------------------------------------------------------------------
# attributes of container modules: HF attention, custom modules
# ------------------------------------------------------------------------------------------------
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_QUERY = ("query", "q_proj", "q", "c_attn")
_KEY = ("key", "k_proj", "k")
_SIZE_WORDS = re.compile(r"head|dim|size|hidden|channel|feature|width|embed|intermediate|groups")


def _out_size(m):
    if type(m).__name__ == "Conv1D":
        return m.weight.shape[1]
    return m.weight.shape[0]


def _hf_attention(nw: _Narrower, prefix, m, config_votes):
    heads_attr = next((a for a in _HEADS if isinstance(getattr(m, a, None), int)), None)
    q_name = next((c for c in _QUERY if isinstance(getattr(m, c, None), nn.Module)), None)
    if q_name is None:
        return False
    q = getattr(m, q_name)
    old_q = nw.old_shapes.get(f"{prefix}{q_name}.weight")
    if old_q is None:
        return True  # nothing narrowed here
    packed = q_name == "c_attn"
    old_out = (old_q[1] if type(q).__name__ == "Conv1D" else old_q[0]) // (3 if packed else 1)
    new_out = _out_size(q) // (3 if packed else 1)
    cfg = getattr(m, "config", None)
    heads = getattr(m, heads_attr) if heads_attr else getattr(cfg, "num_attention_heads", None)
    hd_attr = next((a for a in _HEAD_DIM if isinstance(getattr(m, a, None), int)), None)
    head_dim = getattr(m, hd_attr) if hd_attr else old_out // heads
    axis = 1 if type(q).__name__ == "Conv1D" else 0
    removed = {r for r in nw.removed(f"{prefix}{q_name}.weight", axis) if r < old_out}
    whole = {r // head_dim for r in removed}
    if len(removed) == len(whole) * head_dim:
        new_heads, new_hd = heads - len(whole), head_dim
    else:
        new_heads, new_hd = heads, new_out // heads
    for a in _HEADS:
        if isinstance(getattr(m, a, None), int):
            nw.set_attr(m, prefix, a, new_heads)
    for a in _HEAD_DIM:
        if isinstance(getattr(m, a, None), int):
            nw.set_attr(m, prefix, a, new_hd)
    for a in ("all_head_size", "inner_dim", "split_size"):
        if isinstance(getattr(m, a, None), int):
            nw.set_attr(m, prefix, a, new_out)
    if packed and isinstance(getattr(m, "embed_dim", None), int) and m.embed_dim == old_out:
        nw.set_attr(m, prefix, "embed_dim", new_out)
    k_name = next((c for c in _KEY if isinstance(getattr(m, c, None), nn.Module)), None)
    kv_heads = _out_size(getattr(m, k_name)) // new_hd if k_name else new_heads
    for a in _KV_HEADS:
        if isinstance(getattr(m, a, None), int):
            nw.set_attr(m, prefix, a, kv_heads)
    if isinstance(getattr(m, "num_key_value_groups", None), int):
        nw.set_attr(m, prefix, "num_key_value_groups", new_heads // kv_heads)
    if cfg is not None:
        config_votes.setdefault((id(cfg), "num_attention_heads"), (cfg, set()))[1].add(new_heads)
        if hasattr(cfg, "num_key_value_heads"):
            config_votes.setdefault((id(cfg), "num_key_value_heads"), (cfg, set()))[1].add(kv_heads)
        if hasattr(cfg, "head_dim"):
            config_votes.setdefault((id(cfg), "head_dim"), (cfg, set()))[1].add(new_hd)
    return True


def _hf_mlp(nw: _Narrower, prefix, m, config_votes):
    for name in ("intermediate_size", "ffn_dim"):
        old = getattr(m, name, None)
        if not isinstance(old, int):
            continue
        for child_name, child in m.named_children():
            shape = nw.old_shapes.get(f"{prefix}{child_name}.weight")
            if shape is not None and isinstance(child, nn.Linear) and shape[0] == old:
                nw.set_attr(m, prefix, name, child.out_features)
                cfg = getattr(m, "config", None)
                if cfg is not None and hasattr(cfg, name):
                    config_votes.setdefault((id(cfg), name), (cfg, set()))[1].add(child.out_features)
                break


def _is_hf(m) -> bool:
    return type(m).__module__.startswith("transformers.")


def _custom_attributes(nw: _Narrower, prefix, m, changed_sizes):
    """Int attributes of a custom module whose subtree was narrowed, that its forward reads and
    whose name says size or heads: SPA cannot know what they mean there, so they are reported."""
    source = _forward_source(m)
    for attr, value in vars(m).items():
        if attr.startswith("_") or isinstance(value, bool) or not isinstance(value, int):
            continue
        if not _SIZE_WORDS.search(attr.lower()):
            continue
        if source is not None and not re.search(rf"\bself\.{attr}\b", source):
            continue  # construction-time setting only
        if "head" in attr.lower() or value in changed_sizes:
            nw.report.unfixable.append(
                f"'{prefix[:-1] or type(m).__name__}'.{attr} = {value} ({type(m).__name__}): "
                f"tensors below it were narrowed ({_describe(changed_sizes)}); SPA cannot tell how "
                f"its forward uses it: update it by hand")


def _forward_source(m) -> str | None:
    import inspect

    try:
        return inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return None


def _describe(changed):
    return ", ".join(f"{a}->{b}" for a, b in sorted(changed.items())[:4])


def _subtree_changes(nw, prefix):
    changes = {}
    for name, (old, new) in nw.report.narrowed.items():
        if name.startswith(prefix):
            for a, b in zip(old, new):
                if a != b:
                    changes[a] = b
    return changes


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def apply_plan(module: nn.Module, plan, *, pruned=None, weight_map=None, example_inputs=None,
               verify: bool | None = None, rtol: float = 1e-4, **deprecated) -> nn.Module:
    """Narrow ``module`` in place to match ``plan`` (path of a plan JSON, its dict, or a
    spa.plan.Plan) and return it (the same object).

    ``pruned``: the pruned ONNX model (path or ModelProto). ``weight_map``: from :func:`export`,
    or an ONNX path/ModelProto to read it from (default: read from ``pruned``'s metadata; without
    one, ONNX weight names must be the module's own parameter names). With ``pruned``, ``verify``
    defaults to True: the narrowed module and onnxruntime run on ``example_inputs`` (tensor or
    tuple in graph-input order; default random inputs) and a SpaError is raised if they differ
    beyond ``rtol`` (relative to the output's magnitude). Parameters stay ``nn.Parameter`` (same
    requires_grad); rebuild optimizers after this call.

    What was done is in ``module.spa_report`` (a :class:`PlanReport`: narrowed tensors, updated
    attributes, ``unfixable``, ``max_error``); anything unfixable is also warned about.
    ``onnx_path=`` is a deprecated name of ``pruned=``."""
    from ._apply import renamed_keywords
    from .torch_export import weight_map_of

    pruned = renamed_keywords("torch", deprecated, {"pruned": pruned})["pruned"]
    if weight_map is not None and not isinstance(weight_map, dict):
        weight_map = weight_map_of(weight_map)
    if weight_map is None and pruned is not None:
        weight_map = weight_map_of(pruned)
    entries = _plan_entries(plan)
    report = PlanReport()
    state = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    removals = _collect(entries, weight_map, state, report)
    report.unfixable += removals.conflicts()
    nw = _Narrower(module, removals, report)
    named = list(module.named_modules())
    for name, m in named:
        rule = _rule_for(m)
        if rule is not None:
            rule(nw, f"{name}." if name else "", m)
    _generic_tensors(nw, named)
    config_votes: dict = {}
    for name, m in named:
        prefix = f"{name}." if name else ""
        if _rule_for(m) is not None or not any(k.startswith(prefix) for k in report.narrowed):
            continue
        if _is_hf(m):
            if not _hf_attention(nw, prefix, m, config_votes):
                _hf_mlp(nw, prefix, m, config_votes)
        else:
            _custom_attributes(nw, prefix, m, _subtree_changes(nw, prefix))
    _settle_configs(config_votes, report)
    if report.unfixable or report.unverified:
        warnings.warn("apply_plan: " + "; ".join(report.unfixable + report.unverified), stacklevel=2)
    module.spa_report = report
    if verify is None:
        verify = pruned is not None
    if verify:
        if pruned is None:
            raise SpaError("apply_plan(verify=True) needs pruned= (the pruned ONNX model)")
        try:
            report.max_error = _verify(module, pruned, example_inputs, rtol)
        except SpaError as exc:
            hint = "; ".join(report.unfixable) or ("sizes hard-coded in forward (chunk, split, view "
                                                   "with constants) no longer match the pruned graph")
            raise SpaError(f"{exc} (the module was narrowed in place; likely cause: {hint})") from None
    return module


def _generic_tensors(nw: _Narrower, named):
    """Tensors of modules without a rule (custom parameters such as a layer-scale gamma)."""
    by_name = dict(named)
    for tensor, axes in nw.removals.removed.items():
        if tensor in nw.done or not any(axes.values()):
            continue
        owner_name, _, pname = tensor.rpartition(".")
        owner = by_name.get(owner_name)
        prefix = f"{owner_name}." if owner_name else ""
        nw.narrow(owner, prefix, pname, axes)
        nw.report.unverified.append(
            f"'{tensor}' of {type(owner).__name__} narrowed {nw.report.narrowed[tensor][0]} -> "
            f"{nw.report.narrowed[tensor][1]}: SPA does not know this module's forward")


def _settle_configs(votes, report):
    for (_, key), (cfg, values) in votes.items():
        if len(values) == 1:
            value = values.pop()
            old = getattr(cfg, key, None)
            if old != value:
                setattr(cfg, key, value)
                report.attributes[f"config.{key}"] = (old, value)
        else:
            report.unverified.append(f"config.{key}: layers now differ ({sorted(values)}); the "
                                     f"modules are updated, the shared config keeps its old value")


def _verify(module, pruned, example_inputs, rtol) -> float:
    import onnx

    from .torch_export import as_args
    from .torch_onnx import verify_module

    model = pruned if isinstance(pruned, onnx.ModelProto) else onnx.load(str(pruned))
    feeds = None
    if example_inputs is not None:
        args = as_args(example_inputs)
        inits = {t.name for t in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in inits]
        feeds = dict(zip(names, args))
    training_bn = any(n.op_type == "BatchNormalization" and any(
        a.name == "training_mode" and a.i for a in n.attribute) for n in model.graph.node)
    with _graph_mode(module, training_bn):
        return verify_module(module, model, feeds, rtol, what="narrowed module")


class _graph_mode:
    """A training-mode BN graph normalises with batch statistics: run BN modules in train mode
    (running statistics restored afterwards), everything else in eval mode."""

    def __init__(self, module, training_bn):
        self.module, self.training_bn = module, training_bn

    def __enter__(self):
        self.was = self.module.training
        self.saved = {k: v.clone() for k, v in self.module.state_dict().items()
                      if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        self.module.eval()
        if self.training_bn:
            for m in self.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        return self

    def __exit__(self, *exc):
        self.module.load_state_dict(self.saved, strict=False)
        self.module.train(self.was)
