"""Speed benchmark: SPA vs Torch-Pruning pruning time, and onnxruntime latency after pruning.

    python benchmarks/bench_speed.py            # full run (~6-8 min on 2 cores)
    python benchmarks/bench_speed.py --quick    # smaller run (~1-2 min)

Part 1 - pruning time, full-size ResNet-50 (224x224), ratio 0.5, same torch model for both:
  * SPA on the ONNX export of that model (export time reported, not counted):
    analyze -> score (L1, mean over the group, mean-normalised) + select -> rewrite -> verified
    atomic write (spa.pipeline.save: full checker, strict shape inference, onnxruntime run).
    Each run writes a new file: the previous run's output is deleted before it, untimed
    (replacing an existing 100 MB file costs ~50 ms of kernel time freeing it).
    Each stage is timed by calling the stage functions of spa.pipeline.prune one by one.
  * Torch-Pruning: MagnitudePruner(...) construction (builds its DependencyGraph with a traced
    forward) + one pruner.step(), on a fresh deep copy of the torch model (copy not counted).
    MagnitudeImportance(p=1) reduces with the group mean and normalises by the mean, like SPA's
    defaults, and both prune 50% of every channel group (residual groups included), the final
    classifier output excepted, so the two should give the same layer widths.
  Runs alternate SPA / TP; one untimed warm-up each, then the median of N timed runs.

Part 2 - onnxruntime (CPUExecutionProvider) latency of original vs SPA-pruned (ratio 0.5)
  full-size ResNet-50 and MobileNetV2 at batch 1 and 8, with 1 intra-op thread and with the
  default (all usable cores). Rounds alternate the models so that load drift hits all of them,
  and only one session is alive at a time; speed-ups are the median of per-round ratios (see
  isolated_latency), the ratio of pooled medians is reported too. Also measured: the
  Torch-Pruning results exported the same way (full run only) and MobileNetV2 pruned with
  --round-to 16 (the CPU's NCHWc block). Reported:
  MACs (spa.cost, batch 1), speed-up, MAC reduction and speed-up / MAC reduction (1.0 = latency
  falls exactly as MACs do), and a single-thread profile of MobileNetV2 by layer kind.

Writes benchmarks/results/speed.json and benchmarks/results/speed.png.
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import T0, cpu_model, git, log, version  # noqa: E402
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "results")




# ------------------------------------------------------------------------------------------
# machine info
# ------------------------------------------------------------------------------------------




def machine_info() -> dict:
    import onnxruntime as ort
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": "default (all usable cores)",
        "onnxruntime_providers": ["CPUExecutionProvider"],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: version(d) for d in (
            "torch", "onnx", "onnxruntime", "onnxscript", "numpy", "scipy", "torch-pruning",
            "matplotlib")},
        "onnxruntime_build": ort.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ------------------------------------------------------------------------------------------
# part 1: pruning time
# ------------------------------------------------------------------------------------------
def spa_run(onnx_path: str, out_path: str, ratio: float, round_to: int = 1) -> dict:
    """One SPA pipeline run, stage by stage (== spa.pipeline.prune + save)."""
    from spa.graph import load_model
    from spa.groups import analyze
    from spa.importance import score
    from spa.pipeline import save
    from spa.rewrite import rewrite
    from spa.selection import Target, select

    gc.collect()
    t = {}
    s = time.perf_counter()
    model = load_model(onnx_path)
    t["load"] = time.perf_counter() - s
    s = time.perf_counter()
    analysis = analyze(model)
    t["analyze"] = time.perf_counter() - s
    s = time.perf_counter()
    scores = score(analysis, "l1", "mean", "mean")
    plan = select(analysis, scores, Target(ratio=ratio, round_to=round_to))
    t["score_select"] = time.perf_counter() - s
    s = time.perf_counter()
    pruned = rewrite(plan)
    t["rewrite"] = time.perf_counter() - s
    s = time.perf_counter()
    save(pruned, out_path)
    t["verify_write"] = time.perf_counter() - s
    t["total"] = t["analyze"] + t["score_select"] + t["rewrite"] + t["verify_write"]
    return {"times": t, "analysis": analysis, "model": pruned}


def tp_run(torch_model, example, ratio: float) -> dict:
    import torch
    import torch.nn as nn
    import torch_pruning as tp

    model = copy.deepcopy(torch_model)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]  # keeps its outputs
    gc.collect()
    t = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=[classifier])
        t["graph_build"] = time.perf_counter() - s
        s = time.perf_counter()
        pruner.step()
        t["step"] = time.perf_counter() - s
    t["total"] = t["graph_build"] + t["step"]
    with torch.no_grad():
        model(example)  # the pruned model still runs (not timed)
    return {"times": t, "model": model}


def torch_params(model) -> dict:
    import torch.nn as nn

    total = sum(p.numel() for p in model.parameters())
    bn_gamma = sum(m.weight.numel() for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None)
    # BN folded into the preceding conv (as the eval export does): gamma disappears, beta becomes
    # the conv bias, so the ONNX parameter count is the torch count minus the BN gammas.
    return {"torch": int(total), "bn_folded": int(total - bn_gamma)}


def torch_weight_shapes(model) -> collections.Counter:
    import torch.nn as nn

    return collections.Counter(tuple(m.weight.shape) for m in model.modules()
                               if isinstance(m, (nn.Conv2d, nn.Linear)))


def onnx_weight_shapes(model) -> collections.Counter:
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes = collections.Counter()
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            shape = inits[node.input[1]]
            if node.op_type == "MatMul":
                shape = shape[::-1]
            shapes[shape] += 1
    return shapes


def median_times(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# ------------------------------------------------------------------------------------------
# part 2: latency
# ------------------------------------------------------------------------------------------
def isolated_latency(paths: list[str], batch: int, threads: int | None, rounds: int,
                     round_s: float, warmup: int = 1) -> list[dict]:
    """Latency of each model, one live session at a time, in rounds that alternate the models.

    Within a round each model gets a fresh session, a warm-up and `round_s` seconds of runs.
    Only one session exists at a time: an idle session's spinning thread pool would otherwise
    take a core from the one being timed (on 2 vCPUs that alone moved medians by 2x).
    Speed-ups are paired: the median over rounds of (first model's round median / this model's
    round median). On this shared VM the machine runs for seconds at a time in a slow or a fast
    state (1.5x apart, whatever the model); models timed next to each other see the same state,
    while pooled medians depend on how many rounds each model happened to get in each.
    """
    import onnx

    from spa.runtime import random_inputs, session

    feeds = [random_inputs(onnx.load(p, load_external_data=False), batch=batch, seed=1) for p in paths]
    times = [[] for _ in paths]
    round_medians = [[] for _ in paths]
    for _ in range(rounds):
        for k, (path, feed) in enumerate(zip(paths, feeds)):
            sess = session(path, threads=threads)
            for _ in range(warmup):
                sess.run(None, feed)
            ts, start = [], time.perf_counter()
            while len(ts) < 2 or time.perf_counter() - start < round_s:
                s = time.perf_counter()
                sess.run(None, feed)
                ts.append((time.perf_counter() - s) * 1000)
            del sess
            times[k] += ts
            round_medians[k].append(statistics.median(ts))
    out = []
    for ts, rm in zip(times, round_medians):
        q = statistics.quantiles(ts, n=4)
        paired = statistics.median(a / b for a, b in zip(round_medians[0], rm))
        out.append({"ms": statistics.median(rm), "paired_speedup": paired,
                    "median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2],
                    "min_ms": min(ts), "round_medians_ms": rm, "repeats": len(ts)})
    return out


def op_kind_breakdown(original: str, pruned: str, batch: int = 1, runs: int = 30) -> dict:
    """Single-thread onnxruntime profile of both models, their runs interleaved: kernel time and
    MACs per kind of layer (first conv, depthwise, pointwise, other conv, everything else), to
    show where latency follows MACs and where it does not."""
    import json as _json

    import numpy as np
    import onnx
    import onnxruntime as ort

    from spa.runtime import random_inputs

    def start(path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # no thread pool: two live sessions do not interfere
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "spa-bench-profile")
        sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return sess, random_inputs(onnx.load(path, load_external_data=False), batch=batch, seed=1)

    def by_kind(sess):
        trace = sess.end_profiling()
        with open(trace) as f:
            events = _json.load(f)
        os.remove(trace)
        per_node: dict = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_node.setdefault(e["name"], (e["args"], []))[1].append(e["dur"])
        kinds: dict = {}
        for args, durs in per_node.values():
            kind, macs = args["op_name"], 0
            if kind == "Conv":
                w = next(iter(args["input_type_shape"][1].values()))
                x = next(iter(args["input_type_shape"][0].values()))
                y = next(iter(args["output_type_shape"][0].values()))
                macs = int(np.prod(y)) * int(np.prod(w[1:]))
                kind = ("conv first" if x[1] <= 4 else "conv depthwise" if w[1] == 1
                        else "conv pointwise" if int(np.prod(w[2:])) == 1 else "conv other")
            entry = kinds.setdefault(kind, {"ms": 0.0, "macs": 0})
            entry["ms"] += statistics.median(durs[2:] or durs) / 1000
            entry["macs"] += macs
        return kinds

    sessions = [start(original), start(pruned)]
    for _ in range(runs):
        for sess, feed in sessions:
            sess.run(None, feed)
    a, b = (by_kind(sess) for sess, _ in sessions)
    return {k: {"original_ms": a[k]["ms"], "pruned_ms": b.get(k, {}).get("ms", 0.0),
                "macs_original": a[k]["macs"], "macs_pruned": b.get(k, {}).get("macs", 0)}
            for k in a}


def macs_and_params(path: str) -> dict:
    import onnx

    from spa.cost import concrete_shapes, count_params, macs_by_op

    model = onnx.load(path)
    return {"macs": int(sum(macs_by_op(model, concrete_shapes(model, batch=1)).values())),
            "params": int(count_params(model))}


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------
def table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    lines = []
    for i, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                               for k, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 5.5), gridspec_kw={"width_ratios": [1, 3]})
    p = res["pruning_time"]
    spa_t = p["spa"]["median_s"]
    tp_t = p["torch_pruning"]["median_s"] if "torch_pruning" in p else \
        {"graph_build": 0.0, "step": 0.0, "total": 0.0}
    bottom = 0.0
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2"]
    for (key, label), c in zip([("analyze", "analyze"), ("score_select", "score+select"),
                                ("rewrite", "rewrite"), ("verify_write", "verify+write")], colors):
        ax1.bar(0, spa_t[key], bottom=bottom, color=c, label=f"SPA {label}")
        bottom += spa_t[key]
    ax1.bar(1, tp_t["graph_build"], color="#dd8452", label="TP DependencyGraph build")
    ax1.bar(1, tp_t["step"], bottom=tp_t["graph_build"], color="#937860", label="TP pruner.step()")
    ax1.text(0, spa_t["total"], f"{spa_t['total']:.2f} s", ha="center", va="bottom")
    ax1.text(1, tp_t["total"], f"{tp_t['total']:.2f} s", ha="center", va="bottom")
    ax1.set_xticks([0, 1], ["SPA (ONNX)", "Torch-Pruning"])
    ax1.set_ylabel("seconds (median)")
    ratio = f"SPA/TP = {p['spa_over_tp']:.2f}" if "spa_over_tp" in p else "TP unavailable"
    ax1.set_title(f"Prune ResNet-50 @ ratio {p['ratio']} ({ratio})")
    ax1.legend(fontsize=7, loc="upper left")
    ax1.set_ylim(0, max(spa_t["total"], tp_t["total"]) * 1.6)

    rows = res["latency"]
    labels = [f"{r['model']}\nb{r['batch']}, {r['threads']} thr" for r in rows]
    xs = list(range(len(rows)))
    series = [("SPA-pruned (0.5)", "#4c72b0", lambda r: r)]
    extra_labels = sorted({k for r in rows for k in r["extra"]})
    series += [(k, c, (lambda r, k=k: r["extra"].get(k))) for k, c in zip(extra_labels, ["#55a868", "#c44e52"])]
    w = 0.8 / len(series)
    for j, (label, color, get) in enumerate(series):
        pts = [(x, get(r), r) for x, r in zip(xs, rows) if get(r)]
        offset = (j - (len(series) - 1) / 2) * w
        ax2.bar([x + offset for x, _, _ in pts], [v["speedup_over_mac"] for _, v, _ in pts], w,
                label=label, color=color)
        for x, v, r in pts:
            ms = v["ms"] if "ms" in v else r["pruned"]["ms"]
            ax2.text(x + offset, v["speedup_over_mac"], f"{v['speedup_over_mac']:.2f}\n{ms:.3g} ms",
                     ha="center", va="bottom", fontsize=6)
    ax2.axhline(0.8, color="k", ls="--", lw=1, label="goal 0.8")
    ax2.set_ylim(0, 1.25)
    ax2.set_xticks(xs, labels, fontsize=7)
    ax2.set_ylabel("speed-up / MAC reduction (1.0 = latency falls as MACs do)")
    ax2.set_title("onnxruntime CPU latency after pruning, relative to the MAC reduction")
    ax2.legend(fontsize=7, loc="upper right")
    m = res["machine"]
    fig.suptitle(f"SPA speed benchmark - {m['cpu_model']}, {m['usable_cores']} cores, "
                 f"{res['date'][:10]}{' (quick)' if res['quick'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (~1-2 min)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=None, help="timed pruning runs per tool")
    ap.add_argument("--out", default=RESULTS, help="directory for speed.json / speed.png")
    ap.add_argument("--keep-models", default=None, help="copy the ONNX files here")
    args = ap.parse_args(argv)

    runs = args.runs or (1 if args.quick else 5)
    lat_cfg = dict(rounds=3, round_s=0.4) if args.quick else dict(rounds=10, round_s=0.75)
    tmp = tempfile.mkdtemp(prefix="spa-bench-")
    os.makedirs(args.out, exist_ok=True)
    res = {"benchmark": "bench_speed", "date": _dt.datetime.now().astimezone().isoformat(
        timespec="seconds"), "quick": args.quick, "ratio": args.ratio}
    try:
        log("importing torch, onnx, onnxruntime, spa, models.zoo")
        import torch

        from models import zoo

        res["machine"] = machine_info()
        res["loadavg_start"] = loadavg()
        log(f"machine: {res['machine']['cpu_model']}, {res['machine']['usable_cores']} cores, "
            f"loadavg {res['loadavg_start']}")
        try:
            import torch_pruning as tp  # noqa: F401
            tp_ok, tp_error = True, None
        except Exception as exc:  # pragma: no cover - reported, not fatal
            tp_ok, tp_error = False, f"{type(exc).__name__}: {exc}"
        try:
            import torchvision  # noqa: F401
            tv = True
        except Exception:
            tv = False
        res["torch_pruning_import"] = {"ok": tp_ok, "error": tp_error,
                                       "torchvision_importable": tv}
        log(f"torch_pruning imported: {tp_ok} (torchvision importable: {tv})")

        # ---------------- build + export ----------------
        models, paths, export_s = {}, {}, {}
        for name in ("resnet50", "mobilenetv2"):
            log(f"building full-size {name}")
            models[name] = zoo.build(name, full=True)
            log(f"exporting {name} to ONNX (torchscript, eval)")
            s = time.perf_counter()
            paths[name] = zoo.export(models[name], os.path.join(tmp, f"{name}.onnx"))
            export_s[name] = time.perf_counter() - s
            log(f"  export took {export_s[name]:.2f} s")
        res["export_s"] = export_s

        # ---------------- part 1: pruning time ----------------
        example = torch.randn(1, 3, 224, 224)
        rn = models["resnet50"]
        spa_out = os.path.join(tmp, "resnet50_spa.onnx")
        spa_runs, tp_runs = [], []
        spa_last = tp_last = None
        for i in range(runs + 1):
            tag = "warm-up" if i == 0 else f"run {i}/{runs}"
            log(f"pruning time ResNet-50, SPA {tag}")
            if os.path.exists(spa_out):  # every run writes a new file, as a user's run does
                os.remove(spa_out)
            r = spa_run(paths["resnet50"], spa_out, args.ratio)
            spa_runs.append(r["times"])
            log("  SPA " + ", ".join(f"{k} {v:.2f}s" for k, v in r["times"].items()))
            spa_last = r
            if tp_ok:
                log(f"pruning time ResNet-50, Torch-Pruning {tag}")
                q = tp_run(rn, example, args.ratio)
                tp_runs.append(q["times"])
                log("  TP  " + ", ".join(f"{k} {v:.2f}s" for k, v in q["times"].items()))
                tp_last = q
        spa_med = median_times(spa_runs[1:])
        analysis = spa_last["analysis"]
        frozen = [{"group": g.id, "channels": int(len(g.atoms)), "reasons": g.reasons()}
                  for g in analysis.groups if g.has_params and not g.prunable]
        spa_shapes = onnx_weight_shapes(spa_last["model"])
        pt = {"model": "resnet50 (full, 224x224)", "ratio": args.ratio, "timed_runs": runs,
              "spa": {"median_s": spa_med, "warmup_s": spa_runs[0], "runs_s": spa_runs[1:],
                      "params_before": int(macs_and_params(paths["resnet50"])["params"]),
                      "params_after": None, "groups": len(analysis.groups),
                      "prunable_groups": sum(g.prunable for g in analysis.groups),
                      "frozen_groups_with_params": frozen}}
        pt["spa"]["params_after"] = macs_and_params(spa_out)["params"]
        if tp_ok:
            tp_med = median_times(tp_runs[1:])
            before = torch_params(rn)
            after = torch_params(tp_last["model"])
            tp_shapes = torch_weight_shapes(tp_last["model"])
            pt["torch_pruning"] = {"median_s": tp_med, "warmup_s": tp_runs[0], "runs_s": tp_runs[1:],
                                   "params_before": before, "params_after": after}
            pt["spa_over_tp"] = spa_med["total"] / tp_med["total"]
            pt["spa_with_load_over_tp"] = (spa_med["total"] + spa_med["load"]) / tp_med["total"]
            pt["same_layer_widths"] = spa_shapes == tp_shapes
            if spa_shapes != tp_shapes:
                pt["layer_width_diff"] = {"spa_only": [list(k) for k in (spa_shapes - tp_shapes)],
                                          "tp_only": [list(k) for k in (tp_shapes - spa_shapes)]}
        res["pruning_time"] = pt

        # optional: the TP-pruned models through the same ONNX latency path (full run only)
        tp_onnx = {}
        if tp_ok and not args.quick:
            log("exporting the Torch-Pruning results to ONNX (for MACs / latency cross-check)")
            tp_onnx["resnet50"] = zoo.export(tp_last["model"], os.path.join(tmp, "resnet50_tp.onnx"))
            tp_mb = tp_run(models["mobilenetv2"], example, args.ratio)["model"]
            tp_onnx["mobilenetv2"] = zoo.export(tp_mb, os.path.join(tmp, "mobilenetv2_tp.onnx"))
            del tp_mb

        # ---------------- part 2: latency ----------------
        log("pruning MobileNetV2 with SPA (for latency), also with --round-to 16")
        pruned_paths = {"resnet50": spa_out, "mobilenetv2": os.path.join(tmp, "mobilenetv2_spa.onnx")}
        mb = spa_run(paths["mobilenetv2"], pruned_paths["mobilenetv2"], args.ratio)
        res["mobilenetv2_spa_prune_s"] = mb["times"]
        r16 = os.path.join(tmp, "mobilenetv2_spa_r16.onnx")
        spa_run(paths["mobilenetv2"], r16, args.ratio, round_to=16)
        extras = {name: [("TP-pruned", tp_onnx[name])] if name in tp_onnx else [] for name in paths}
        extras["mobilenetv2"].append(("SPA round-to 16", r16))
        del mb, spa_last
        gc.collect()
        lat = []
        for name in ("resnet50", "mobilenetv2"):
            variants = [paths[name], pruned_paths[name]] + [p for _, p in extras[name]]
            costs = [macs_and_params(p) for p in variants]
            for threads in (1, None):
                for batch in (1, 8):
                    log(f"latency {name} batch {batch}, {threads or 'default'} thread(s): original vs "
                        f"pruned{''.join(' vs ' + label for label, _ in extras[name])} "
                        f"({lat_cfg['rounds']} alternating rounds of ~{lat_cfg['round_s']} s)")
                    m = isolated_latency(variants, batch, threads, **lat_cfg)
                    row = {"model": name, "batch": batch, "threads": threads or "default",
                           "original": m[0], "pruned": m[1],
                           "macs_original": costs[0]["macs"], "macs_pruned": costs[1]["macs"],
                           "params_original": costs[0]["params"], "params_pruned": costs[1]["params"]}
                    row["speedup"] = m[1]["paired_speedup"]
                    row["mac_reduction"] = costs[0]["macs"] / costs[1]["macs"]
                    row["speedup_over_mac"] = row["speedup"] / row["mac_reduction"]
                    row["speedup_over_mac_pooled_median"] = \
                        m[0]["median_ms"] / m[1]["median_ms"] / row["mac_reduction"]
                    row["extra"] = {}
                    for (label, _), t, c in zip(extras[name], m[2:], costs[2:]):
                        speedup = t["paired_speedup"]
                        row["extra"][label] = dict(t, macs=c["macs"], params=c["params"], speedup=speedup,
                                                   mac_reduction=costs[0]["macs"] / c["macs"],
                                                   speedup_over_mac=speedup * c["macs"] / costs[0]["macs"],
                                                   speedup_over_mac_pooled_median=m[0]["median_ms"] / t["median_ms"]
                                                   * c["macs"] / costs[0]["macs"])
                    lat.append(row)
                    log(f"  {m[0]['ms']:.1f} ms -> {m[1]['ms']:.1f} ms "
                        f"({row['speedup']:.2f}x, MACs {row['mac_reduction']:.2f}x, "
                        f"eff {row['speedup_over_mac']:.2f})"
                        + "".join(f"; {k} {v['ms']:.1f} ms eff {v['speedup_over_mac']:.2f}"
                                  for k, v in row["extra"].items()))
        log("per-layer-kind profile, MobileNetV2 batch 1, 1 thread")
        res["mobilenetv2_kinds"] = {
            "pruned": op_kind_breakdown(paths["mobilenetv2"], pruned_paths["mobilenetv2"]),
            "round_to_16": op_kind_breakdown(paths["mobilenetv2"], r16)}
        res["latency"] = lat
        res["loadavg_end"] = loadavg()
        res["wall_s"] = time.perf_counter() - T0

        # ---------------- report ----------------
        print()
        print(f"== Pruning time: full ResNet-50, ratio {args.ratio}, median of {runs} "
              f"(after 1 warm-up) ==")
        s = pt["spa"]["median_s"]
        rows = [["SPA analyze", f"{s['analyze']:.3f}"], ["SPA score+select", f"{s['score_select']:.3f}"],
                ["SPA rewrite", f"{s['rewrite']:.3f}"],
                ["SPA verify+write", f"{s['verify_write']:.3f}"],
                ["SPA total", f"{s['total']:.3f}"],
                ["(SPA load, not counted)", f"{s['load']:.3f}"],
                ["(ONNX export, not counted)", f"{export_s['resnet50']:.3f}"]]
        if tp_ok:
            t = pt["torch_pruning"]["median_s"]
            rows += [["TP DependencyGraph build (pruner init)", f"{t['graph_build']:.3f}"],
                     ["TP pruner.step()", f"{t['step']:.3f}"], ["TP total", f"{t['total']:.3f}"],
                     ["SPA / TP", f"{pt['spa_over_tp']:.2f}"],
                     ["SPA(+load) / TP", f"{pt['spa_with_load_over_tp']:.2f}"]]
        print(table(["stage", "seconds"], rows))
        print()
        prow = [["SPA (ONNX, BN folded)", f"{pt['spa']['params_before']:,}",
                 f"{pt['spa']['params_after']:,}"]]
        if tp_ok:
            tb, ta = pt["torch_pruning"]["params_before"], pt["torch_pruning"]["params_after"]
            prow += [["TP (torch, with BN)", f"{tb['torch']:,}", f"{ta['torch']:,}"],
                     ["TP (BN-folded equivalent)", f"{tb['bn_folded']:,}", f"{ta['bn_folded']:,}"]]
        print(table(["parameters", "before", "after"], prow))
        if tp_ok:
            print(f"identical Conv/Linear weight shapes (SPA ONNX vs TP torch): "
                  f"{pt['same_layer_widths']}")
        print(f"SPA groups: {pt['spa']['groups']} ({pt['spa']['prunable_groups']} prunable); "
              f"frozen groups with weights: "
              + ("; ".join(f"#{f['group']} ({f['channels']} ch): {f['reasons']}"
                           for f in frozen) or "none"))
        print()
        print("== onnxruntime CPU latency, original vs SPA-pruned (ratio "
              f"{args.ratio}), ms = median of round medians, speed-up paired by round; "
              "goal speed-up/MAC >= 0.8 ==")
        lrows = []
        for r in lat:
            lrows.append([r["model"], r["batch"], r["threads"], f"{r['original']['ms']:.2f}",
                          f"{r['pruned']['ms']:.2f}", f"{r['speedup']:.2f}x",
                          f"{r['mac_reduction']:.2f}x", f"{r['speedup_over_mac']:.2f}",
                          f"{r['speedup_over_mac_pooled_median']:.2f}", r["original"]["repeats"]])
            for label, v in r["extra"].items():
                lrows.append([f"  {label}", r["batch"], r["threads"], "", f"{v['ms']:.2f}",
                              f"{v['speedup']:.2f}x", f"{v['mac_reduction']:.2f}x",
                              f"{v['speedup_over_mac']:.2f}", f"{v['speedup_over_mac_pooled_median']:.2f}",
                              v["repeats"]])
        print(table(["model", "batch", "threads", "orig ms", "pruned ms", "speed-up", "MAC red.",
                     "speed-up/MAC", "(pooled median)", "runs"], lrows))
        print("\nMobileNetV2 batch 1, 1 thread, by layer kind (kernel ms; time and MAC reduction):")
        krows = []
        for variant, kinds in res["mobilenetv2_kinds"].items():
            for kind, v in kinds.items():
                if v["pruned_ms"] > 0:
                    krows.append([variant, kind, f"{v['original_ms']:.2f}", f"{v['pruned_ms']:.2f}",
                                  f"{v['original_ms'] / v['pruned_ms']:.2f}x",
                                  f"{v['macs_original'] / v['macs_pruned']:.2f}x" if v["macs_pruned"] else ""])
        print(table(["variant", "kind", "orig ms", "pruned ms", "time red.", "MAC red."], krows))
        print(f"\nloadavg start {res['loadavg_start']}, end {res['loadavg_end']}; "
              f"wall {res['wall_s']:.0f} s")

        jpath = os.path.join(args.out, "speed.json")
        with open(jpath + ".tmp", "w") as f:
            json.dump(res, f, indent=2, default=str)
        os.replace(jpath + ".tmp", jpath)
        ppath = os.path.join(args.out, "speed.png")
        try:
            plot(res, ppath)
        except ImportError as exc:
            log(f"no plot ({exc}); pip install matplotlib")
            ppath = None
        log(f"wrote {jpath}" + (f" and {ppath}" if ppath else ""))
        if args.keep_models:
            os.makedirs(args.keep_models, exist_ok=True)
            for f in os.listdir(tmp):
                if f.endswith(".onnx"):
                    shutil.copy(os.path.join(tmp, f), args.keep_models)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
