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
Part 2 - accuracy at equal measured latency (batch 8, one thread) on a trained MobileNetV2 x0.5
  (scikit-learn digits upsampled to 3x64x64, 30 epochs): latency-aware targets 0.5-0.8 against
  uniform `--ratio` with `--round-to 16` (the usual fix for CPU kernels) and plain uniform
  `--ratio`; all L1, then the same 2-epoch fine-tune; the uniform curve is interpolated at the
  latency-aware points.

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
    from spa.cost import count_macs, count_params
    from spa.pipeline import prune
    from spa.selection import Target

    start = time.perf_counter()
    result = prune(model, Target(latency=TARGET, batch=batch, threads=threads))
    seconds = time.perf_counter() - start
    check = result.latency
    original_ms, pruned_ms = latency.paired_latency(model, result.model, batch, threads, rounds=7)
    return {"batch": batch, "threads": threads, "seconds": seconds,
            "predicted": check["predicted"], "measured_in_pipeline": check["measured"],
            "measured": pruned_ms / original_ms, "original_ms": original_ms, "pruned_ms": pruned_ms,
            "prediction_error": abs(check["predicted"] - pruned_ms / original_ms) / (pruned_ms / original_ms),
            "macs": count_macs(result.model) / count_macs(model),
            "params": count_params(result.model) / count_params(model),
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


ACCURACY_SETTINGS = [("latency-aware", {"latency": f, "batch": 8, "threads": 1}) for f in (0.5, 0.6, 0.7, 0.8)] + \
    [("uniform, round-to 16", {"ratio": r, "round_to": 16}) for r in (0.3, 0.4, 0.5, 0.6)] + \
    [("uniform", {"ratio": r}) for r in (0.3, 0.5)]


def accuracy_part(workdir: str) -> dict:
    import torch
    from bench_quality import digits_data, fine_tune, reimport, torch_accuracy, train
    from models import cnn, zoo
    from spa import latency
    from spa.pipeline import prune, save
    from spa.selection import Target

    data = digits_data(flat=False)
    up = lambda x: np.repeat(np.kron(x, np.ones((1, 1, 8, 8), np.float32)), 3, axis=1)  # noqa: E731
    data = dict(data, x=up(data["x"]), x_test=up(data["x_test"]))
    torch.manual_seed(0)
    net = train(cnn.MobileNetV2(num_classes=10, width_mult=0.5), data, epochs=30, lr=3e-3)
    base = torch_accuracy(net, data)
    log(f"accuracy part: MobileNetV2 x0.5 on digits 3x64x64, {base:.3f} unpruned")
    model = onnx.load(zoo.export(net, os.path.join(workdir, "mbv2-digits.onnx"),
                                 example_inputs=(torch.randn(2, 3, 64, 64),)))
    runs = []
    for method, kwargs in ACCURACY_SETTINGS:
        setting = kwargs.get("latency", kwargs.get("ratio"))
        try:
            result = prune(model, Target(**kwargs))
        except Exception as exc:  # a target the net cannot meet: recorded, not fatal
            runs.append({"method": method, "setting": setting, "error": str(exc)})
            log(f"  {method} {setting}: {exc}")
            continue
        out = os.path.join(workdir, f"acc-{len(runs)}.onnx")
        save(result.model, out)
        original_ms, pruned_ms = latency.paired_latency(model, result.model, 8, 1)
        module = reimport(out)
        runs.append({"method": method, "setting": setting, "latency": pruned_ms / original_ms,
                     "accuracy_no_finetune": torch_accuracy(module, data), "accuracy": fine_tune(module, data, 2)})
        log(f"  {method} {setting}: latency {runs[-1]['latency']:.3f}, accuracy "
            f"{runs[-1]['accuracy_no_finetune']:.3f} -> {runs[-1]['accuracy']:.3f} after 2 epochs")
    for baseline in ("uniform, round-to 16", "uniform"):
        curve = sorted((r["latency"], r["accuracy"]) for r in runs if r["method"] == baseline and "accuracy" in r)
        for r in runs:
            if r["method"] == "latency-aware" and "accuracy" in r and len(curve) > 1 \
                    and curve[0][0] <= r["latency"] <= curve[-1][0]:
                r[f"{baseline} at the same latency"] = float(np.interp(r["latency"], *zip(*curve)))
    return {"base_accuracy": base, "runs": runs}


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
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
    acc = results.get("accuracy")
    ax = axes[1]
    if acc:
        for method, marker in (("uniform", "x:"), ("uniform, round-to 16", "s-"), ("latency-aware", "o-")):
            pts = sorted((r["latency"], r["accuracy"]) for r in acc["runs"] if r["method"] == method and "accuracy" in r)
            if pts:
                ax.plot(*zip(*pts), marker, label=method)
        ax.axhline(acc["base_accuracy"], color="grey", lw=0.8, label="unpruned")
        ax.set_xscale("log")
        ax.set_xlabel("measured latency / original (batch 8, 1 thread; log scale)")
        ax.set_ylabel("test accuracy after a 2-epoch fine-tune")
        ax.set_title("MobileNetV2 x0.5 on digits: accuracy at equal latency")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=None, help="comma list (default: all; none: part 2 only)")
    p.add_argument("--configs", default=None, help="comma list of BATCHxTHREADS (default 1x1,1x2,8x1,8x2)")
    p.add_argument("--merge", action="store_true", help="update the saved results instead of replacing them")
    p.add_argument("--no-accuracy", action="store_true", help="skip part 2")
    args = p.parse_args(argv)
    names = [] if args.models == "none" else args.models.split(",") if args.models else (["resnet50", "mobilenetv2"] if args.quick else list(MODELS))
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
        if not (args.quick or args.no_accuracy):
            results["accuracy"] = accuracy_part(workdir)
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
