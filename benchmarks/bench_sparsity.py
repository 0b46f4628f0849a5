"""Fine-grained sparsity benchmark: learnt k-out-of-n masks (DPP) vs magnitude masks + fine-tuning.

    python benchmarks/bench_sparsity.py            # digits-mlp, mnist1d-conv, digits-resnet
    python benchmarks/bench_sparsity.py --quick    # fewer epochs, digits-mlp and mnist1d-conv
    python benchmarks/bench_sparsity.py --models digits-mlp

Digits section. The models, data and dense training of benchmarks/bench_quality.py (imported:
MODELS, train, torch_accuracy). Each dense model is then pruned at 50 / 75 / 90 % with a
k-out-of-n structure at weight granularity (every Conv/Linear output channel keeps exactly k of
its n weights; spa.frontends.torch.dpp), two ways, each trained for the same E epochs from the
dense weights with the same data order:
  dpp        spa.frontends.torch.dpp.attach (magnitude prior), masks sampled every step,
             temperature annealed exponentially t0 -> t1, then finalize (top-k of the logits);
  magnitude  the same structure, the top-|w| of each unit fixed once, then fine-tuning with the
             mask re-applied after every step.
Both: Adam, weights lr 1e-3 cosine-annealed to 0, batch 64 (DPP's logits: their own lr).
Reported: test accuracy of dense, dpp and magnitude, the sparsity reached (exact zeros), DPP's
final mask diagnostics. Goal checked (not forced): dpp >= magnitude at 75 %.

Writes benchmarks/results/sparsity.json and sparsity.png (--quick: sparsity_quick.*) and prints
a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import MODELS, SEED, machine_info, torch_accuracy, train  # noqa: E402
from common import RESULTS, ROOT, log  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from spa.frontends.torch import dpp  # noqa: E402

AMOUNTS = (0.5, 0.75, 0.9)
GOAL_AMOUNT = 0.75
DIGITS_MODELS = ("digits-mlp", "mnist1d-conv", "digits-resnet")
QUICK_MODELS = ("digits-mlp", "mnist1d-conv")
SPARSE_EPOCHS = {"digits-mlp": 10, "mnist1d-conv": 3, "digits-resnet": 3}  # --quick: a third (at least 1)
SPARSE_TRAINING = {"lr": 1e-3, "logit_lr": 5e-2, "batch_size": 64, "t0": 1.0, "t1": 0.03, "prior_scale": 3.0,
                   "sampling_fraction": 0.7, "granularity": "weight", "optimizer": "Adam",
                   "schedule": "weights: cosine to 0, logits: constant"}


# ------------------------------------------------------------------------------------------
# sparse training
# ------------------------------------------------------------------------------------------
def batches(data: dict, epochs: int, batch_size: int, seed: int):
    """The same data order for every method: (x, y) minibatches over ``epochs`` epochs."""
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            yield x[order[s:s + batch_size]], y[order[s:s + batch_size]]


def sparse_fit(model: nn.Module, data: dict, epochs: int, param_groups, after_step, desc: str) -> None:
    """Adam over ``param_groups`` (the first group's lr cosine-annealed to 0, the others' constant),
    ``after_step(step)`` after every optimizer step."""
    cfg = SPARSE_TRAINING
    steps = training_steps(data, epochs)
    torch.manual_seed(SEED + 1)
    opt = torch.optim.Adam(param_groups, lr=cfg["lr"])
    cosine = lambda i: 0.5 * (1 + math.cos(math.pi * i / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [cosine] + [lambda i: 1.0] * (len(param_groups) - 1))
    model.train()
    for step, (x, y) in enumerate(tqdm(batches(data, epochs, cfg["batch_size"], SEED + 1), total=steps,
                                       desc=desc, leave=False)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        after_step(step)
    model.eval()


def training_steps(data: dict, epochs: int) -> int:
    return epochs * -(-len(data["x"]) // SPARSE_TRAINING["batch_size"])


def train_dpp(model: nn.Module, data: dict, amount: float, epochs: int) -> dict:
    """DPP for the first ``sampling_fraction`` of the steps, then the masks frozen at their top-k.
    Returns the mask diagnostics over the sampling phase."""
    cfg = SPARSE_TRAINING
    pruning = dpp.attach(model, amount, cfg["granularity"], prior_scale=cfg["prior_scale"])
    logits = {id(p) for p in pruning.parameters()}
    weights = [p for p in model.parameters() if id(p) not in logits]
    sampling_steps = round(cfg["sampling_fraction"] * training_steps(data, epochs))
    temperature = pruning.schedule(cfg["t0"], cfg["t1"], sampling_steps)
    diagnostics = {}

    def after_step(step):
        temperature.step()
        if step + 1 == sampling_steps:
            diagnostics.update(pruning.diagnostics())
            pruning.freeze()

    groups = [{"params": weights}, {"params": pruning.parameters(), "lr": cfg["logit_lr"]}]
    sparse_fit(model, data, epochs, groups, after_step, f"dpp {amount:.0%}")
    pruning.finalize(model)
    return diagnostics


def train_magnitude(model: nn.Module, data: dict, amount: float, epochs: int) -> None:
    """The top-|w| k-out-of-n mask (DPP's magnitude-prior hard mask, fixed), then fine-tuning."""
    dpp.attach(model, amount, SPARSE_TRAINING["granularity"]).finalize(model)
    masked = [(m.weight, m.weight != 0) for m in model.modules() if isinstance(m, dpp.LAYERS)]

    @torch.no_grad()
    def reapply_masks(step):
        for weight, mask in masked:
            weight.mul_(mask)

    sparse_fit(model, data, epochs, [{"params": list(model.parameters())}], reapply_masks, f"magnitude {amount:.0%}")


def sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, dpp.LAYERS)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# ------------------------------------------------------------------------------------------
# digits section
# ------------------------------------------------------------------------------------------
def dense_model(name: str, quick: bool) -> tuple[nn.Module, dict, dict]:
    spec = MODELS[name]
    data = spec["data"]()
    torch.manual_seed(SEED)
    model = spec["build"]()
    epochs = max(3, spec["epochs"] // 3) if quick else spec["epochs"]
    start = time.perf_counter()
    train(model, data, epochs, spec["lr"], cosine=True)
    info = {"data": data["source"], "train_epochs": epochs, "train_seconds": time.perf_counter() - start,
            "accuracy_dense": torch_accuracy(model, data)}
    return model, data, info


def sparse_run(method: str, dense: nn.Module, data: dict, amount: float, epochs: int) -> dict:
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    diagnostics = train_dpp(model, data, amount, epochs) if method == "dpp" else train_magnitude(
        model, data, amount, epochs)
    rec = {"accuracy": torch_accuracy(model, data), "sparsity": sparsity(model),
           "seconds": time.perf_counter() - start}
    if diagnostics:
        rec["final_diagnostics"] = {k: round(sum(d[k] for d in diagnostics.values()) / len(diagnostics), 4)
                                    for k in ("entropy", "confidence", "diversity")}
    return rec


def digits_section(names, quick: bool) -> dict:
    models = {}
    for name in names:
        epochs = max(1, SPARSE_EPOCHS[name] // 3) if quick else SPARSE_EPOCHS[name]
        dense, data, info = dense_model(name, quick)
        log(f"{name}: dense accuracy {info['accuracy_dense']:.4f} ({info['train_seconds']:.0f}s)")
        results = {}
        for amount in AMOUNTS:
            results[f"{amount:g}"] = {m: sparse_run(m, dense, data, amount, epochs) for m in ("dpp", "magnitude")}
            r = results[f"{amount:g}"]
            log(f"{name} {amount:.0%}: dpp {r['dpp']['accuracy']:.4f}, magnitude {r['magnitude']['accuracy']:.4f} "
                f"(sparsity {r['dpp']['sparsity']:.3f})")
        models[name] = {"info": dict(info, sparse_epochs=epochs), "results": results}
    return {"models": models, "goal": digits_goal(models), "training": dict(SPARSE_TRAINING, epochs=SPARSE_EPOCHS)}


def digits_goal(models: dict) -> dict:
    key = f"{GOAL_AMOUNT:g}"
    per_model = {name: {"dpp": m["results"][key]["dpp"]["accuracy"],
                        "magnitude": m["results"][key]["magnitude"]["accuracy"]}
                 for name, m in models.items() if key in m["results"]}
    return {"check": f"dpp >= magnitude + equal fine-tuning at {GOAL_AMOUNT:.0%} k-out-of-n",
            "per_model": {n: dict(v, met=v["dpp"] >= v["magnitude"]) for n, v in per_model.items()},
            "met": all(v["dpp"] >= v["magnitude"] for v in per_model.values())}


def digits_markdown(section: dict) -> str:
    lines = ["| model | sparsity | dense | DPP | magnitude + FT |", "|---|---|---|---|---|"]
    for name, m in section["models"].items():
        for amount, r in m["results"].items():
            lines.append(f"| {name} | {float(amount):.0%} | {m['info']['accuracy_dense']:.4f} | "
                         f"{r['dpp']['accuracy']:.4f} | {r['magnitude']['accuracy']:.4f} |")
    goal = section["goal"]
    lines.append(f"\nGoal ({goal['check']}): {'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)


def digits_plot(section: dict, ax) -> None:
    for name, m in section["models"].items():
        amounts = [float(a) for a in m["results"]]
        for method, style in (("dpp", "-"), ("magnitude", "--")):
            line, = ax.plot(amounts, [r[method]["accuracy"] for r in m["results"].values()], style, marker="o",
                            ms=3, label=f"{name} {method}")
        ax.axhline(m["info"]["accuracy_dense"], color=line.get_color(), lw=0.6, ls=":")
    ax.set_xlabel("fraction of weights pruned (k-out-of-n per output channel)")
    ax.set_ylabel("test accuracy")
    ax.set_title("DPP vs magnitude + equal fine-tuning (dotted: dense)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def plot(sections: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotters = {"digits": digits_plot}
    shown = [s for s in sections if s in plotters]
    fig, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 4.5), squeeze=False)
    for ax, name in zip(axes[0], shown):
        plotters[name](sections[name], ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, digits-mlp and mnist1d-conv only")
    parser.add_argument("--models", help="comma list of " + ", ".join(DIGITS_MODELS))
    parser.add_argument("--out", help="JSON path (default benchmarks/results/sparsity.json, --quick: "
                        "sparsity_quick.json); the plot goes beside it")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(RESULTS, "sparsity_quick.json" if args.quick else "sparsity.json")
    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else DIGITS_MODELS)
    if set(names) - set(DIGITS_MODELS):
        parser.error(f"unknown models {sorted(set(names) - set(DIGITS_MODELS))}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared 2-core machine
    started, info = time.perf_counter(), machine_info()
    log(f"sparsity benchmark ({'quick' if args.quick else 'full'}): {', '.join(names)}; "
        f"load average {info['loadavg_start'][0]:.1f}")
    sections = {"digits": digits_section(names, args.quick)}
    table = digits_markdown(sections["digits"])
    result = {"benchmark": "sparsity", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "quick": args.quick, "machine": info, "seed": SEED, "amounts": list(AMOUNTS), **sections,
              "markdown": table, "loadavg_end": list(os.getloadavg()),
              "wall_seconds": time.perf_counter() - started}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(sections, png)
    print()
    print(table)
    log(f"wrote {os.path.relpath(args.out, ROOT)} and {os.path.relpath(png, ROOT)} ({result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
