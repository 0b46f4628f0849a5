"""Speed benchmark: SPA vs Torch-Pruning pruning time, and onnxruntime latency after pruning.

    python benchmarks/bench_speed.py            # full run (~4-6 min on 2 cores)
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

Part 2 - onnxruntime (CPUExecutionProvider, default threads) latency of original vs SPA-pruned
  (ratio 0.5) full-size ResNet-50 and MobileNetV2 at batch 1 and 8. Original and pruned
  sessions are measured in alternating blocks so that load drift from other processes hits
  both; the median of all per-run wall times is reported (the same estimator as
  spa.report.latency_ms). Also reported: MACs (spa.cost, batch 1), speed-up, MAC reduction and
  speed-up / MAC reduction (1.0 = latency falls exactly as MACs do).

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
def spa_run(onnx_path: str, out_path: str, ratio: float) -> dict:
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
    plan = select(analysis, scores, Target(ratio=ratio))
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
    import torch_pruning as tp

    model = copy.deepcopy(torch_model)
    gc.collect()
    t = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=[model.fc])
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
def paired_latency(paths: list[str], batch: int, min_repeats: int, budget_s: float,
                   max_repeats: int, block: int = 5, warmup: int = 3) -> list[dict]:
    """Median per-run latency (ms) of each model, measured in alternating blocks."""
    import onnx

    from spa.runtime import random_inputs, session

    sessions, feeds = [], []
    for p in paths:
        sessions.append(session(p))
        feeds.append(random_inputs(onnx.load(p, load_external_data=False), batch=batch, seed=1))
    for sess, feed in zip(sessions, feeds):
        for _ in range(warmup):
            sess.run(None, feed)
    times = [[] for _ in paths]
    start = time.perf_counter()
    while True:
        for k, (sess, feed) in enumerate(zip(sessions, feeds)):
            for _ in range(block):
                s = time.perf_counter()
                sess.run(None, feed)
                times[k].append((time.perf_counter() - s) * 1000)
        n = len(times[0])
        if n >= max_repeats or (n >= min_repeats and time.perf_counter() - start >= budget_s):
            break
    out = []
    for ts in times:
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out.append({"median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2],
                    "min_ms": min(ts), "repeats": len(ts)})
    return out


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

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 2]})
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
    labels = [f"{r['model']}\nbatch {r['batch']}" for r in rows]
    xs = range(len(rows))
    w = 0.38
    ax2.bar([x - w / 2 for x in xs], [r["original"]["median_ms"] for r in rows], w,
            label="original", color="#8c8c8c")
    ax2.bar([x + w / 2 for x in xs], [r["pruned"]["median_ms"] for r in rows], w,
            label="SPA-pruned (0.5)", color="#4c72b0")
    for x, r in zip(xs, rows):
        ax2.text(x + w / 2, r["pruned"]["median_ms"],
                 f"{r['speedup']:.2f}x\n(MACs {r['mac_reduction']:.2f}x,\neff {r['speedup_over_mac']:.2f})",
                 ha="center", va="bottom", fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xticks(list(xs), labels)
    ax2.set_ylabel("onnxruntime CPU latency, ms (median, log)")
    ax2.set_title("Latency original vs pruned (speed-up; MAC reduction; speed-up/MAC)")
    ax2.legend(fontsize=8)
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
    lat_cfg = dict(min_repeats=5, budget_s=5.0, max_repeats=200) if args.quick else \
        dict(min_repeats=20, budget_s=40.0, max_repeats=400)
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

        # optional: the TP-pruned model through the same ONNX latency path (full run only)
        tp_onnx = None
        if tp_ok and not args.quick:
            log("exporting the Torch-Pruning result to ONNX (for MACs / latency cross-check)")
            tp_onnx = zoo.export(tp_last["model"], os.path.join(tmp, "resnet50_tp.onnx"))

        # ---------------- part 2: latency ----------------
        log("pruning MobileNetV2 with SPA (for latency)")
        mb = spa_run(paths["mobilenetv2"], os.path.join(tmp, "mobilenetv2_spa.onnx"), args.ratio)
        res["mobilenetv2_spa_prune_s"] = mb["times"]
        pruned_paths = {"resnet50": spa_out, "mobilenetv2": os.path.join(tmp, "mobilenetv2_spa.onnx")}
        del mb, spa_last
        gc.collect()
        lat = []
        for name in ("resnet50", "mobilenetv2"):
            a, b = macs_and_params(paths[name]), macs_and_params(pruned_paths[name])
            for batch in (1, 8):
                extra = [tp_onnx] if (tp_onnx and name == "resnet50") else []
                log(f"latency {name} batch {batch}: original vs pruned"
                    f"{' vs TP-pruned' if extra else ''} (>= {lat_cfg['min_repeats']} runs, "
                    f"~{lat_cfg['budget_s']:.0f} s)")
                m = paired_latency([paths[name], pruned_paths[name]] + extra, batch, **lat_cfg)
                row = {"model": name, "batch": batch, "original": m[0], "pruned": m[1],
                       "macs_original": a["macs"], "macs_pruned": b["macs"],
                       "params_original": a["params"], "params_pruned": b["params"]}
                row["speedup"] = m[0]["median_ms"] / m[1]["median_ms"]
                row["mac_reduction"] = a["macs"] / b["macs"]
                row["speedup_over_mac"] = row["speedup"] / row["mac_reduction"]
                if extra:
                    t = macs_and_params(tp_onnx)
                    row["tp_pruned"] = dict(m[2], macs=t["macs"], params=t["params"],
                                            speedup=m[0]["median_ms"] / m[2]["median_ms"])
                lat.append(row)
                log(f"  {m[0]['median_ms']:.1f} ms -> {m[1]['median_ms']:.1f} ms "
                    f"({row['speedup']:.2f}x, MACs {row['mac_reduction']:.2f}x, "
                    f"eff {row['speedup_over_mac']:.2f}, {m[0]['repeats']} runs each)")
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
              f"{args.ratio}), median ms ==")
        lrows = []
        for r in lat:
            lrows.append([r["model"], r["batch"], f"{r['original']['median_ms']:.2f}",
                          f"{r['pruned']['median_ms']:.2f}", f"{r['speedup']:.2f}x",
                          f"{r['mac_reduction']:.2f}x", f"{r['speedup_over_mac']:.2f}",
                          r["original"]["repeats"]])
        print(table(["model", "batch", "orig ms", "pruned ms", "speed-up", "MAC red.",
                     "speed-up/MAC", "runs"], lrows))
        for r in lat:
            if "tp_pruned" in r:
                t = r["tp_pruned"]
                print(f"  TP-pruned ResNet-50 (exported), batch {r['batch']}: "
                      f"{t['median_ms']:.2f} ms ({t['speedup']:.2f}x), MACs {t['macs']:,}, "
                      f"params {t['params']:,}")
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
