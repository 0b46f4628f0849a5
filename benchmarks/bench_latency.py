"""Latency-aware pruning: `--target-latency 0.5` on zoo models, measured on onnxruntime (CPU).

    python benchmarks/bench_latency.py            # every model at batch 1 and 8, 1 and 2 threads
    python benchmarks/bench_latency.py --quick    # batch 1 only, two models

Part 1 - for each model and (batch, threads): prune with `Target(latency=0.5)` (L1 scores; the
  latency tables are built from an empty cache for the first configuration of each model), then
  time original and pruned again, independently of the pipeline's own check (alternating rounds,
  one session alive at a time). Reported: measured latency fraction (goal <= 0.55), predicted
  fraction and |predicted - measured| / measured (goal <= 10%), MAC and parameter fractions,
  wall time of the prune. ResNet-50, batch 1, 1 thread: time to build its tables from an empty
  cache (goal <= 60 s) and the same selection again on the warm cache.
Not here yet: accuracy at equal measured latency against uniform `--ratio` (see docs/latency.md).

Writes benchmarks/results/latency.json and benchmarks/results/latency.png.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, ROOT, cpu_model, git, log, version  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import onnx  # noqa: E402

MODELS = {  # name -> input resolution the detector / classifier is exported at
    "resnet50": 224, "mobilenetv2": 224, "efficientnet": 224, "convnext": 160, "yolo": 320, "minilm": None,
}
TARGET = 0.5


def export(name: str, workdir: str) -> str:
    path = os.path.join(workdir, f"{name}.onnx")
    if name == "minilm":
        from models.minilm import export_minilm
        return export_minilm(path)
    import torch
    from models import zoo
    size = MODELS[name]
    return zoo.export(zoo.build(name, full=True), path, example_inputs=(torch.randn(2, 3, size, size),))


def prune_at(model, batch: int, threads: int) -> dict:
    from spa import latency
    from spa.cost import concrete_shapes, count_params, macs_by_op
    from spa.pipeline import prune
    from spa.selection import Target

    start = time.perf_counter()
    result = prune(model, Target(latency=TARGET, batch=batch, threads=threads))
    seconds = time.perf_counter() - start
    check = result.latency
    original_ms, pruned_ms = latency.paired_latency(model, result.model, batch, threads, rounds=7)
    macs = lambda m: sum(macs_by_op(m, concrete_shapes(m)).values())  # noqa: E731
    return {"batch": batch, "threads": threads, "seconds": seconds,
            "predicted": check["predicted"], "measured_in_pipeline": check["measured"],
            "measured": pruned_ms / original_ms, "original_ms": original_ms, "pruned_ms": pruned_ms,
            "prediction_error": abs(check["predicted"] - pruned_ms / original_ms) / (pruned_ms / original_ms),
            "macs": macs(result.model) / macs(model), "params": count_params(result.model) / count_params(model),
            "groups_pruned": len(result.plan.to_json("m")["groups"])}


def table_timing(model) -> dict:
    """ResNet-50 at batch 1, 1 thread: the tables a selection reads, from an empty cache, then again."""
    from spa import analyze
    from spa.importance import score
    from spa.selection import Selector, Target

    out = {}
    for run in ("empty cache", "warm cache"):
        analysis = analyze(model)
        scores = score(analysis, "l1", "mean", "mean", 0)
        start = time.perf_counter()
        selector = Selector(analysis, scores, Target(latency=TARGET, threads=1))
        selector.select()
        out[run] = {"seconds": time.perf_counter() - start, "timed": selector.latency_model().tables.measured}
        log(f"  tables, {run}: {out[run]['seconds']:.1f} s, {out[run]['timed']} widths timed")
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(results["models"])
    configs = sorted({(r["batch"], r["threads"]) for m in names for r in results["models"][m]["runs"]})
    for k, (batch, threads) in enumerate(configs):
        xs = np.arange(len(names)) + (k - (len(configs) - 1) / 2) * 0.18
        measured = [next((r["measured"] for r in results["models"][m]["runs"]
                          if (r["batch"], r["threads"]) == (batch, threads)), np.nan) for m in names]
        predicted = [next((r["predicted"] for r in results["models"][m]["runs"]
                           if (r["batch"], r["threads"]) == (batch, threads)), np.nan) for m in names]
        ax.bar(xs, measured, width=0.17, label=f"batch {batch}, {threads} thread(s)")
        ax.plot(xs, predicted, "k_", markersize=10)
    ax.axhline(TARGET, color="grey", lw=0.8)
    ax.axhline(0.55, color="red", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("measured latency / original (black: predicted)")
    ax.set_title(f"--target-latency {TARGET} (red: goal 0.55)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=None, help="comma list (default: all)")
    p.add_argument("--configs", default=None, help="comma list of BATCHxTHREADS (default 1x1,1x2,8x1,8x2)")
    p.add_argument("--merge", action="store_true", help="update the saved results instead of replacing them")
    args = p.parse_args(argv)
    names = args.models.split(",") if args.models else (["resnet50", "mobilenetv2"] if args.quick else list(MODELS))
    configs = [tuple(int(v) for v in c.split("x")) for c in
               (args.configs or ("1x1,1x2" if args.quick else "1x1,1x2,8x1,8x2")).split(",")]
    out_json = os.path.join(RESULTS, "latency.json")
    results = {"models": {}}
    if args.merge and os.path.exists(out_json):
        with open(out_json) as f:
            results = json.load(f)
    results.update({"date": _dt.date.today().isoformat(), "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
                    "onnxruntime": version("onnxruntime"), "commit": git("rev-parse", "--short", "HEAD"),
                    "target": TARGET})
    with tempfile.TemporaryDirectory() as workdir:
        os.environ["SPA_CACHE_DIR"] = os.path.join(workdir, "cache")  # tables built from empty, timed
        for name in names:
            log(f"{name}: exporting")
            model = onnx.load(export(name, workdir))
            entry = results["models"].get(name, {}) if args.merge else {}
            entry.update(input=MODELS[name])
            entry["runs"] = [r for r in entry.get("runs", []) if (r["batch"], r["threads"]) not in configs]
            if name == "resnet50" and (1, 1) in configs:
                entry["tables"] = table_timing(model)
            for batch, threads in configs:
                run = prune_at(model, batch, threads)
                entry["runs"].append(run)
                log(f"  batch {batch}, {threads} thread(s): measured {run['measured']:.3f} (pipeline "
                    f"{run['measured_in_pipeline']:.3f}), predicted {run['predicted']:.3f}, error "
                    f"{run['prediction_error']:.1%}, MACs {run['macs']:.2f}, {run['seconds']:.0f} s")
            results["models"][name] = entry
            _save(results, out_json)
    plot(results, os.path.join(RESULTS, "latency.png"))
    log(f"wrote {out_json} and latency.png")
    return 0


def _save(results, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
