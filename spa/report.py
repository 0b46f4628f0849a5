"""Before/after figures: parameters, MACs per op type, file size, latency, output deviation."""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import onnx

from .cost import concrete_shapes, count_params, macs_by_op
from .groups import Analysis
from .runtime import random_inputs, session


def file_size(path: str) -> int:
    size = os.path.getsize(path)
    data = path + ".data"
    return size + (os.path.getsize(data) if os.path.exists(data) else 0)


def latency_ms(path: str, batch: int = 1, repeats: int = 20, warmup: int = 3, threads: int | None = None) -> float:
    sess = session(path, threads=threads)
    feeds = random_inputs(onnx.load(path, load_external_data=False), batch=batch, seed=1)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(path: str, batch: int = 1, repeats: int = 20, threads: int | None = None) -> dict:
    model = onnx.load(path)
    macs = macs_by_op(model, concrete_shapes(model, batch=1))
    return {"params": count_params(model), "macs": sum(macs.values()), "macs_by_op": macs,
            "file_bytes": file_size(path), "latency_ms": latency_ms(path, batch, repeats, threads=threads)}


def max_deviation(original: str, pruned: str, batch: int = 1, seed: int = 0) -> float:
    feeds = random_inputs(onnx.load(original, load_external_data=False), batch=batch, seed=seed)
    a = session(original).run(None, feeds)
    b = session(pruned).run(None, feeds)
    return float(max(np.max(np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)))
                     for x, y in zip(a, b)))


def compare(original: str, pruned: str, batch: int = 1, repeats: int = 20, threads: int | None = None) -> dict:
    before, after = measure(original, batch, repeats, threads), measure(pruned, batch, repeats, threads)
    keys = ("params", "macs", "file_bytes", "latency_ms")
    return {
        "batch": batch,
        "before": before,
        "after": after,
        "ratio": {k: (before[k] / after[k] if after[k] else float("inf")) for k in keys},
        "max_output_deviation": max_deviation(original, pruned, batch),
    }


def format_comparison(report: dict) -> str:
    b, a, r = report["before"], report["after"], report["ratio"]
    rows = [("parameters", f"{b['params']:,}", f"{a['params']:,}", f"{r['params']:.2f}x"),
            ("MACs", f"{b['macs']:,}", f"{a['macs']:,}", f"{r['macs']:.2f}x")]
    for op in sorted(set(b["macs_by_op"]) | set(a["macs_by_op"])):
        before, after = b["macs_by_op"].get(op, 0), a["macs_by_op"].get(op, 0)
        rows.append((f"  {op}", f"{before:,}", f"{after:,}", f"{before / after:.2f}x" if after else "-"))
    rows += [("file size (bytes)", f"{b['file_bytes']:,}", f"{a['file_bytes']:,}", f"{r['file_bytes']:.2f}x"),
             (f"latency ms (batch {report['batch']})", f"{b['latency_ms']:.3f}", f"{a['latency_ms']:.3f}",
              f"{r['latency_ms']:.2f}x")]
    widths = [max(len(row[k]) for row in rows + [("", "before", "after", "ratio")]) for k in range(4)]
    lines = ["  ".join(h.ljust(w) if k == 0 else h.rjust(w) for k, (h, w) in enumerate(zip(row, widths)))
             for row in [("", "before", "after", "ratio")] + rows]
    lines.append(f"max output deviation vs original (random inputs, informational): "
                 f"{report['max_output_deviation']:.4g}")
    return "\n".join(lines)


def describe(analysis: Analysis) -> dict:
    """Every group: members, size, prunable or not, and what froze it."""
    groups = []
    for g in analysis.groups:
        groups.append({
            "id": g.id,
            "channels": int(len(g.atoms)),
            "prunable_channels": int(len(g.prunable_atoms)) if g.has_params else 0,
            "prunable": bool(g.prunable),
            "kind": g.kind,
            "selected": g.kind in analysis.options.granularity,
            "members": [{"tensor": m.tensor, "axis": m.axis, "size": m.size, "weight": m.is_const,
                         "linked_by": m.linked_by} for m in g.members],
            "frozen_by": g.reasons(),
        })
    return {"groups": groups,
            "prunable_groups": sum(1 for g in groups if g["prunable"]),
            "ungrouped_weights": ungrouped_weights(analysis),
            "approximate_nodes": sorted(analysis.options.approximate_nodes)}


def ungrouped_weights(analysis: Analysis) -> list:
    """Float constants of rank >= 2 in no channel group, with their readers: no rule linked their
    channels to anything (e.g. an embedding read only by a Loop), so they are kept whole."""
    g = analysis.graph
    grouped = {m.tensor for m in analysis.members.values() if m.is_const}
    found = []
    for name in g.consts:
        shape = g.consts.shape(name)
        if len(shape) < 2 or name in grouped or not np.issubdtype(g.consts.dtype(name), np.floating):
            continue
        readers = [f"{g.nodes[i].op_type} '{g.node_name(i)}'" for i, _ in g.consumers.get(name, [])]
        found.append({"tensor": name, "shape": [int(d) for d in shape], "read_by": readers})
    return found


def format_analysis(summary: dict) -> str:
    lines = [f"{len(summary['groups'])} channel groups, {summary['prunable_groups']} prunable"]
    for g in summary["groups"]:
        weights = [m["tensor"] for m in g["members"] if m["weight"]]
        state = (f"prunable {g['prunable_channels']}/{g['channels']} {g['kind']}" if g["prunable"]
                 else f"frozen ({g['channels']} {g['kind']})")
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
