"""Before/after figures: parameters, MACs per op type, file size, latency, output deviation."""
from __future__ import annotations

import math
import os
import statistics
import time

import numpy as np
import onnx

from .control_flow import flattened
from .cost import CONV_WEIGHT, MAC_OPS, concrete_shapes, count_macs, count_params, macs_by_op
from .graph import PROBE_LIMIT, Graph, _without_large_data, subgraph_weights, weight_bytes
from .groups import Analysis
from .quant import is_quant_param
from .runtime import (DEFAULT_DIM, batch_names, declared_inputs, fixed_batch, input_specs, is_float, random_inputs,
                      session, shapes_text)


def file_size(path: str) -> int:
    size = os.path.getsize(path)
    data = path + ".data"
    return size + (os.path.getsize(data) if os.path.exists(data) else 0)


def latency_ms(path: str, batch: int = 1, repeats: int = 20, warmup: int = 3, threads: int | None = None,
               shapes: dict | None = None) -> float:
    sess = session(path, threads=threads)
    feeds = random_inputs(onnx.load(path, load_external_data=False), batch=batch, seed=1, shapes=shapes)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(path: str, batch: int = 1, repeats: int = 20, threads: int | None = None,
            shapes: dict | None = None) -> dict:
    """shapes: {input: shape} (spa.calibration.user_shapes) for symbolic sizes (default 32)."""
    model = flattened(onnx.load(path))[0]  # layers inside If branches counted, both branches
    macs = macs_by_op(model, concrete_shapes(model, batch=1, shapes=shapes))
    return {"params": count_params(model), "macs": sum(macs.values()), "macs_by_op": macs,
            "file_bytes": file_size(path),
            "latency_ms": latency_ms(path, batch, repeats, threads=threads, shapes=shapes)}


# The deviation is measured on inputs no calibration saw: calibration and its held-out batches
# draw N(0, 1) from integer seeds (seed, seed + 1), these from a two-word seed no integer gives.
DEVIATION_STREAM = 0x5EA


def deviation_inputs(seed: int = 0) -> str:
    return f"N(0, 1) random inputs, seed [{DEVIATION_STREAM:#x}, {seed}], disjoint from calibration"


def max_deviation(original: str, pruned: str, batch: int = 1, seed: int = 0,
                  shapes: dict | None = None) -> float | None:
    """The largest absolute difference of any output; None where an output's size differs (a size
    that depends on the values, as a decoding Loop's that stops at an end token)."""
    feeds = random_inputs(onnx.load(original, load_external_data=False), batch=batch,
                          seed=[DEVIATION_STREAM, seed], shapes=shapes)
    a = session(original).run(None, feeds)
    b = session(pruned).run(None, feeds)
    if any(np.shape(x) != np.shape(y) for x, y in zip(a, b)):
        return None
    return float(max(np.max(np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)))
                     for x, y in zip(a, b)))


def _defaulted_sizes(model: onnx.ModelProto, batch: int, shapes: dict) -> str | None:
    """'input 1x3x32x32' where some symbolic size, other than the batch, took the default (None: none did)."""
    declared = [(name, dims) for name, dims, _ in declared_inputs(model) if dims and name not in shapes]
    leading = batch_names(dims for _, dims in declared)
    if not any(d is None or isinstance(d, str) and d not in leading for _, dims in declared for d in dims[1:]):
        return None
    return shapes_text({name: shape for name, shape, _ in input_specs(model, batch, shapes=shapes)})


def compare(original: str, pruned: str, batch: int = 1, repeats: int = 20, threads: int | None = None,
            seed: int = 0, shapes=None) -> dict:
    """Before/after figures at `batch`, or at the batch the model's inputs fix (`batch_fixed`),
    symbolic sizes at the user's `shapes` (one shape or {input: shape}) or 32."""
    from .calibration import user_shapes

    light = onnx.load(original, load_external_data=False)
    fixed = fixed_batch(light)
    batch = fixed or batch
    shapes = user_shapes(light, shapes)
    before, after = measure(original, batch, repeats, threads, shapes), measure(pruned, batch, repeats, threads, shapes)
    keys = ("params", "macs", "file_bytes", "latency_ms")
    return {
        "batch": batch,
        "batch_fixed": fixed is not None,
        "repeats": repeats,  # latency: the median of this many runs
        "threads": threads,  # onnxruntime intra-op threads (None: its default)
        "before": before,
        "after": after,
        "ratio": {k: (before[k] / after[k] if after[k] else float("inf")) for k in keys},
        "max_output_deviation": max_deviation(original, pruned, batch, seed, shapes),
        "deviation_inputs": deviation_inputs(seed),
        "default_sizes": _defaulted_sizes(light, batch, shapes),  # symbolic sizes measured at 32
    }


def format_comparison(report: dict) -> str:
    b, a, r = report["before"], report["after"], report["ratio"]
    rows = [("parameters", f"{b['params']:,}", f"{a['params']:,}", f"{r['params']:.2f}x"),
            ("MACs", f"{b['macs']:,}", f"{a['macs']:,}", f"{r['macs']:.2f}x")]
    for op in sorted(set(b["macs_by_op"]) | set(a["macs_by_op"])):
        before, after = b["macs_by_op"].get(op, 0), a["macs_by_op"].get(op, 0)
        rows.append((f"  {op}", f"{before:,}", f"{after:,}", f"{before / after:.2f}x" if after else "-"))
    rows += [("file size (bytes)", f"{b['file_bytes']:,}", f"{a['file_bytes']:,}", f"{r['file_bytes']:.2f}x"),
             (f"latency ms (batch {report['batch']}{', fixed by the model' if report.get('batch_fixed') else ''})",
              f"{b['latency_ms']:.3f}", f"{a['latency_ms']:.3f}",
              f"{r['latency_ms']:.2f}x")]
    if report.get("eval"):
        from .evaluate import table_row
        rows.append(table_row(report["eval"]))  # its last column: the difference after - before
    widths = [max(len(row[k]) for row in rows + [("", "before", "after", "ratio")]) for k in range(4)]
    lines = ["  ".join(h.ljust(w) if k == 0 else h.rjust(w) for k, (h, w) in enumerate(zip(row, widths)))
             for row in [("", "before", "after", "ratio")] + rows]
    if "removed" in report:
        lines.append(removed_text(report["removed"]))
    if report.get("default_sizes"):
        lines.append(f"measured at {report['default_sizes']}: symbolic sizes not given are {DEFAULT_DIM} "
                     "(--input-shape sets the sizes the model is used at)")
    deviation = report["max_output_deviation"]
    lines.append(f"max output deviation vs original ({report.get('deviation_inputs', 'random inputs')}; "
                 "informational): " + (f"{deviation:.4g}" if deviation is not None else
                                       "not compared, an output's size differs (it depends on the values)"))
    return "\n".join(lines)


def outcome(original: onnx.ModelProto, pruned: onnx.ModelProto, plan: dict,
            original_graph: Graph | None = None, shapes=None) -> dict:
    """What a prune achieved: parameters and MACs (batch 1) before, after and ratio (after / before),
    channels and heads removed with their group counts (from the plan's JSON), and the layers whose
    width changed: {name: (before, after)} for output channels (`widths`) and input channels
    (`input_widths`). `original_graph`: Graph(original), if the caller has it (the analysis's);
    `shapes`: the user's input sizes (one shape or {input: shape}; other symbolic sizes 32)."""
    from .calibration import user_shapes

    shapes = user_shapes(original, shapes)
    # layers inside If branches count where the analysis saw them: both branches, flattened
    original, pruned = flattened(original)[0], flattened(pruned)[0]
    g_before, g_after = original_graph or Graph(original), Graph(pruned)
    before, after = layer_widths(g_before), layer_widths(g_after)
    changed = [name for name in after if name in before and before[name] != after[name]]
    return {"params": _change(count_params(g_before), count_params(g_after)),
            "macs": _change(_total_macs(original, shapes), _total_macs(pruned, shapes)),
            **removed_by_kind(plan),
            "widths": {n: (before[n][1], after[n][1]) for n in changed},
            "input_widths": {n: (before[n][0], after[n][0]) for n in changed}}


def _change(before: int, after: int) -> dict:
    return {"before": int(before), "after": int(after), "ratio": after / before if before else 1.0}


def _total_macs(model: onnx.ModelProto, shapes: dict) -> int:
    # a model too big to run for its shapes is measured on a copy without weight bytes: concrete_shapes
    # copies its model, and the CLI holds the original and the pruned model already
    shaped = _without_large_data(model) if weight_bytes(model) > PROBE_LIMIT else model
    return count_macs(model, concrete_shapes(shaped, batch=1, shapes=shapes))


def removed_by_kind(plan: dict) -> dict:
    """Channels and attention heads a plan's JSON removes, and in how many groups each."""
    slots = [g for g in plan["groups"] if g.get("unit") == "query-head slots" and g["removed"]]
    heads = [g for g in plan["groups"] if g.get("kind") == "heads" and g["removed"] and g not in slots]
    channels = [g for g in plan["groups"] if g.get("kind") != "heads" and g["removed"]]
    return {"channels_removed": sum(g.get("channels_removed", g["removed"]) for g in channels),
            "channel_groups": len(channels),
            "heads_removed": sum(g["removed"] for g in heads), "head_groups": len(heads),
            "slots_removed": sum(g["removed"] for g in slots), "slot_groups": len(slots)}


def layer_widths(graph: Graph) -> dict:
    """{layer name: (input channels, output channels)} of the Conv, ConvTranspose, Gemm, MatMul (and
    their quantized forms) and recurrent layers whose weight is a constant."""
    widths = {}
    for node in graph.nodes:
        slot = 3 if node.op_type in ("QLinearConv", "QLinearMatMul", "QGemm") else 1  # the weight
        if node.op_type in MAC_OPS and len(node.input) > slot and node.input[slot] in graph.consts:
            shape = graph.consts.shape(node.input[slot])
            if len(shape) >= 2:
                widths[node.name or node.output[0]] = _in_out(node, shape)
    return widths


_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _in_out(node, shape) -> tuple:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    group = attrs.get("group", 1)
    if node.op_type in CONV_WEIGHT:
        return int(shape[1] * group), int(shape[0])
    if node.op_type == "ConvTranspose":
        return int(shape[0]), int(shape[1] * group)
    if node.op_type in ("Gemm", "QGemm", "FusedGemm"):
        return (int(shape[1]), int(shape[0])) if attrs.get("transB") else (int(shape[0]), int(shape[1]))
    if node.op_type in _GATES:
        return int(shape[2]), int(shape[1] // _GATES[node.op_type])
    if node.op_type == "MatMulNBits":  # weight packed as [N, blocks, bytes]
        return int(attrs["K"]), int(attrs["N"])
    if node.op_type == "FusedMatMul" and attrs.get("transB"):
        return int(shape[-1]), int(shape[-2])
    return int(shape[-2]), int(shape[-1])


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _amounts(before: int, after: int) -> str:
    """1234567 -> 617000 as "1.23M -> 0.62M": three significant digits of `before`, same unit."""
    scale, suffix = next(((v, u) for v, u in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")) if before >= v),
                         (1, ""))
    digits = 0 if scale == 1 else max(0, 2 - int(math.floor(math.log10(before / scale))))
    return f"{before / scale:.{digits}f}{suffix} -> {after / scale:.{digits}f}{suffix}"


def _times(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def removed_text(found: dict) -> str:
    """"removed 120 channels in 8 groups and 4 heads in 2 groups" (the parts that are not zero; query-head
    slots, the same query head of every key/value group, apart)."""
    parts = [f"{_plural(found[k + '_removed'], word)} in {_plural(found[g], 'group')}"
             for k, word, g in (("channels", "channel", "channel_groups"), ("heads", "head", "head_groups"),
                                ("slots", "query-head slot", "slot_groups"))
             if found.get(k + "_removed")]
    return "removed " + (" and ".join(parts) or "nothing")


def format_outcome(found: dict) -> str:
    """"parameters 1.23M -> 0.61M (0.50x), MACs 4.1G -> 1.9G (0.46x); removed 120 channels in 8 groups"
    (and "; accuracy 0.962 -> 0.951" where `found` holds an "eval": spa.evaluate.Baseline.compare)."""
    figures = [f"{what} {_amounts(found[k]['before'], found[k]['after'])} ({_times(found[k]['ratio'])})"
               for k, what in (("params", "parameters"), ("macs", "MACs")) if found[k]["before"]]
    evaluated = ""
    if found.get("eval"):
        from .evaluate import summary_text
        evaluated = summary_text(found["eval"])
    return "; ".join(filter(None, [", ".join(figures), removed_text(found), evaluated]))


def format_widths(found: dict) -> str:
    """The layers whose width changes: output and input channels, before -> after."""
    rows = [(name, f"{o[0]} -> {o[1]}", f"{i[0]} -> {i[1]}")
            for (name, o), i in zip(found["widths"].items(), found["input_widths"].values())]
    if not rows:
        return "no layer with a constant weight changes width"
    header = ("layer", "output channels", "input channels")
    widths = [max(len(row[k]) for row in rows + [header]) for k in range(3)]
    return "\n".join("  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths)))
                     for row in [header] + rows)


TARGET_TOLERANCE = 0.01  # a parameter or MAC fraction kept this much (relative) over the target misses it


def missed_target(target, found: dict, limits: dict) -> list:
    """One warning for each way the plan fell short of what was asked. `target`: the
    spa.selection.Target asked for; `found`: outcome(); `limits`: spa.selection.limits()."""
    notes = []
    if limits["rounded_whole"]:
        notes.append(f"{_rounding(target, limits)} kept {_plural(limits['rounded_whole'], 'group')} whole")
    for fraction, key, flag, what in ((target.keep_params, "params", "target-params", "parameters"),
                                      (target.keep_macs, "macs", "target-flops", "MACs")):
        kept = found[key]["ratio"]
        if fraction is not None and kept > fraction * (1 + TARGET_TOLERANCE):
            notes.append(f"{flag} {fraction:g} not reached: kept {kept:.3g} of the {what} ({1 / kept:.3g}x, not "
                         f"{1 / fraction:.3g}x; limited by {_causes(target, limits)})")
    asked, removed, total = limits["asked_channels"], limits["removed_channels"], limits["prunable_channels"]
    if asked is not None and removed < asked:
        label = f"ratio {target.ratio:g}" if target.ratio is not None else "--ratio-for"
        notes.append(f"{label} not reached: removed {removed / max(total, 1):.3g} of the prunable "
                     f"{limits['units'] or 'channels'} ({removed} of {total}, {asked} asked; limited by "
                     f"{_causes(target, limits)})")
    return notes


def _rounding(target, limits: dict) -> str:
    """The rounding as the user set it: the flag where given, else the default's rule (groups of
    round_from channels or more; a wider multiple where int8 depthwise convs read the group)."""
    if target.round_from <= 1:
        return f"--round-to {target.round_to}"
    wider = (f", {target.integer_rounding} where int8 depthwise convs read them"
             if limits["integer_depthwise_groups"] else "")
    return (f"rounding to multiples of {target.round_to} (the default, in groups of {target.round_from} channels "
            f"or more{wider})")


def _causes(target, limits: dict) -> str:
    causes = []
    if limits["at_limit"]:
        causes.append(f"--max-group-ratio {target.max_group_ratio:g}" if target.max_group_ratio < 1
                      else "one channel kept in every group")
    if limits["rounded_back"]:
        causes.append(_rounding(target, limits))
    if limits["frozen_groups"]:
        causes.append(_plural(limits["frozen_groups"], "frozen group"))
    if limits["ignored_groups"]:
        causes.append(f"{_plural(limits['ignored_groups'], 'group')} kept by --ignore")
    if not causes:
        return "the channels that can go"
    return ", ".join(causes[:-1]) + " and " + causes[-1] if len(causes) > 1 else causes[0]


def _unit(group) -> str:
    """What a group's units are: its kind, or query-head slots, with the key/value heads that a cache
    holds where one tensor carries both (GroupQueryAttention's packed q | k | v)."""
    if "slot" not in group.units:
        return group.kind
    held = any(reason.startswith("graph ") for reason in group.frozen.values())
    return "query-head slots" + (" and key/value heads" if held else "")


def describe(analysis: Analysis) -> dict:
    """Every group: members, size, prunable or not, and what froze it."""
    groups = []
    for g in analysis.groups:
        groups.append({
            "id": g.id,
            "channels": g.channels(),
            "prunable_channels": g.channels(g.prunable_atoms) if g.has_params else 0,
            "prunable": bool(g.prunable),
            "kind": g.kind,
            "unit": _unit(g),
            "blocks": int(len(g.atoms)) if "block" in g.units and g.kind == "channels" and g.prunable else None,
            "selected": g.kind in analysis.options.granularity,
            "members": [{"tensor": m.tensor, "axis": m.axis, "size": m.size, "weight": m.is_const,
                         "linked_by": m.linked_by} for m in g.members],
            "frozen_by": g.reasons() or _why_not_prunable(g),
        })
    return {"groups": groups,
            "prunable_groups": sum(1 for g in groups if g["prunable"]),
            "ungrouped_weights": ungrouped_weights(analysis),
            "control_flow_weights": subgraph_weights(analysis.model),
            "approximate_nodes": sorted(analysis.options.approximate_nodes),
            "notes": list(analysis.graph.notes)}


def _why_not_prunable(group) -> list:
    """The reason for a group no operator froze."""
    if not group.has_params:
        return ["no constant weight carries these channels (weights computed at run time from the inputs, e.g. a "
                "ConstantOfShape of a run-time shape, or none at all): there is nothing to slice"]
    if not group.prunable:
        return ["fewer than two channels could go"]
    return []


def ungrouped_weights(analysis: Analysis) -> list:
    """Float constants of rank >= 2 in no channel group, with their readers: no rule linked their
    channels to anything (e.g. an embedding read only by a Loop), so they are kept whole."""
    g = analysis.graph
    grouped = {m.tensor for m in analysis.members.values() if m.is_const}
    found = []
    for name in g.consts:
        shape = g.consts.shape(name)
        if len(shape) < 2 or name in grouped or not is_float(g.consts.dtype(name)) or is_quant_param(g, name):
            continue
        readers = [f"{g.nodes[i].op_type} '{g.node_name(i)}'" + _without_rule(g.nodes[i])
                   for i, _ in g.consumers.get(name, [])]
        found.append({"tensor": name, "shape": [int(d) for d in shape], "read_by": readers})
    return found


def _without_rule(node) -> str:
    """' (why)' for a reader that no rule covers (an unknown or custom-domain op), else ''."""
    from .rules import Boundary, rule_for

    rule = rule_for(node)
    return f" ({rule.reason})" if isinstance(rule, Boundary) else ""


def format_analysis(summary: dict) -> str:
    lines = [f"{len(summary['groups'])} channel groups, {summary['prunable_groups']} prunable"]
    for g in summary["groups"]:
        weights = [m["tensor"] for m in g["members"] if m["weight"]]
        unit = g.get("unit", g["kind"])
        state = (f"prunable {g['prunable_channels']}/{g['channels']} {unit}" if g["prunable"]
                 else f"frozen ({g['channels']} {unit})")
        if g.get("blocks"):
            state += f" in {g['blocks']} blocks (a MatMulNBits' input channels go in whole blocks)"
        if g["prunable"] and not g["selected"]:
            state += f" (not pruned: granularity '{g['kind']}' not selected)"
        lines.append(f"group {g['id']}: {state}; {len(g['members'])} tensor axes; weights: "
                     f"{', '.join(weights[:6])}{' ...' if len(weights) > 6 else ''}")
        for reason in g["frozen_by"][:5]:
            lines.append(f"    frozen by {reason}")
        if len(g["frozen_by"]) > 5:
            lines.append(f"    ... and {len(g['frozen_by']) - 5} more reasons")
    loose = summary["ungrouped_weights"]
    if loose:
        lines.append(f"{len(loose)} weight tensors in no channel group (kept whole):")
        for w in loose[:10]:
            lines.append(f"    {w['tensor']} {w['shape']} read by {', '.join(w['read_by']) or 'nothing'}")
        if len(loose) > 10:
            lines.append(f"    ... and {len(loose) - 10} more")
    lines.extend(f"note: {note}" for note in summary.get("notes", []))
    inside = summary.get("control_flow_weights") or {}
    if inside:
        lines.append(f"{sum(inside.values())} weight tensors inside control-flow bodies, not analyzed (SPA prunes the "
                     f"top-level graph): {', '.join(f'{node} {count}' for node, count in inside.items())}")
    return "\n".join(lines)


def format_profile(profile: dict, top: int = 15) -> str:
    m = profile["machine"]
    lines = [f"onnxruntime {m['onnxruntime']} on {m['cpu']} ({m['cores']} cores), {m['threads']} threads, "
             f"batch {profile['batch']}",
             f"model {profile['model_ms']:.3f} ms measured: timed layers {profile['layers_ms']:.3f} ms, "
             f"the rest {profile['other_ms']:.3f} ms",
             f"tables: {profile['timed']} widths timed now, the rest from {profile['cache']} "
             f"({profile['seconds']:.1f} s)", ""]
    rows = [(r["name"], r["op"], f"{r['in']}->{r['out']}", f"{r['ms']:.3f}", f"{r['share']:.1%}",
             ", ".join(str(w) for w in r["fast"][-8:]) or "-") for r in profile["layers"][:top]]
    header = ("layer", "op", "channels", "ms", "share", "fast output widths (widest 8)")
    widths = [max(len(str(row[k])) for row in rows + [header]) for k in range(5)]
    for row in [header] + rows:
        lines.append("  ".join(str(c).ljust(w) if k < 2 else str(c).rjust(w) for k, (c, w) in enumerate(zip(row[:5], widths)))
                     + "  " + row[5])
    if len(profile["layers"]) > top:
        lines.append(f"... {len(profile['layers']) - top} lighter layers (--top N, --json for all)")
    return "\n".join(lines)


def plot_profile(profile: dict, path: str, layers: int = 6) -> None:
    """Latency against output width for the heaviest layers, fast widths marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in profile["layers"] if r["widths"]][:layers]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        widths = sorted(r["widths"])
        line, = ax.plot(widths, [r["widths"][w] for w in widths], marker=".", label=f"{r['name'][-40:]} ({r['op']})")
        ax.plot(r["fast"], [r["widths"][w] for w in r["fast"]], "o", mfc="none", color=line.get_color())
    ax.set_xlabel("output channels kept")
    ax.set_ylabel("ms (timed alone, scaled to the network)")
    ax.set_title(f"latency vs width, batch {profile['batch']}, {profile['machine']['threads']} threads "
                 "(circles: fast widths)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
