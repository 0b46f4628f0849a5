"""Pruning-quality benchmark: test accuracy after pruning trained models, SPA vs Torch-Pruning.

    python benchmarks/bench_quality.py            # full run (~7.5 min on 2 busy cores)
    python benchmarks/bench_quality.py --quick    # 2x only, shorter training (~3 min)
    python benchmarks/bench_quality.py --no-minilm

Models, trained here on real data (CPU, seeded, a held-out test split):
  * digits-resnet: a ResNet-style CNN (BN, residual blocks, a strided block with a 1x1
    shortcut) on scikit-learn's digits (8x8, 1797 images, 25% held out);
  * digits-mlp: an MLP 64-256-256-10 on the same data;
  * mnist1d-conv: a 1-D conv net (BN, strided convs, flatten into a hidden Linear) on mnist1d
    (generated offline by mnist1d.data.make_dataset; 4000 train / 1000 test).
Each trained torch model is exported once to ONNX (spa.frontends.torch.export, dynamo, BN kept
as inference-mode BatchNormalization nodes) and every SPA method prunes that file; Torch-Pruning
prunes a deep copy of the same torch module.

For each MAC reduction (1.5x, 2x, 3x: keep 2/3, 1/2, 1/3 of the MACs), no fine-tuning:
  SPA  l1, random               spa.pipeline.prune(model, Target(keep_macs=F), criterion)
       taylor                   spa.frontends.torch_criteria.prune(..., "taylor") on the real
                                calibration samples with their labels
       obspa-none / -synthetic / -bn / -real
                                spa.obspa.obspa(model, Target(keep_macs=F), calibration=
                                "none" | "synthetic" | "bn" | <npz of 256 real training
                                samples keyed by the input name>), 256 samples each
                                (bn: only for models with BatchNormalization)
  TP   tp-magnitude             MagnitudePruner + MagnitudeImportance(p=1), uniform ratio per layer
       tp-magnitude-global      the same with global_pruning=True
       tp-taylor                MetaPruner + TaylorImportance, gradients of the cross-entropy on
                                the real calibration samples, uniform ratio
       tp-taylor-global         the same with global_pruning=True
  TP takes a channel ratio, not a MAC target: the ratio is searched (bisection on the MAC count
  of the pruned module) until its MACs are within 2% of the target (else the closest of 15
  tries: channel rounding can step over the band). max_pruning_ratio = 0.9
  (SPA's max_group_ratio) and the classifier's output layer is ignored (SPA freezes graph
  outputs). Achieved MACs are reported for every method (SPA: spa.cost on the pruned ONNX;
  TP: the same Conv/Linear formula by forward hooks, checked equal on the originals).
Then every pruned model gets the same short fine-tune (2 epochs, Adam, lr 1e-3 cosine-annealed
to 0, batch 64, the same data order; --quick: 1 epoch; the unpruned model gets it too, as a
reference):
SPA models are re-imported with spa.frontends.torch.from_onnx (trainable, BN in train mode),
TP models are the pruned torch modules.

Also: pruning time per method (seconds, the pruning call alone: SPA in memory before the
verified write, TP pruner construction + step (+ the gradient pass for Taylor) for the final
ratio, the ratio search reported separately), and MiniLM (benchmarks/bench_quality_minilm.py:
sentence-embedding cosine similarity after pruning MLP channels and heads).

Goal checked (not forced): at 2x MAC reduction without fine-tuning, OBSPA without real data
(calibration none / synthetic / bn, each checked) loses at most half the accuracy L1 loses, and beats
Torch-Pruning's magnitude pruner on the same model.

Writes benchmarks/results/quality.json, quality.png and quality_minilm.json (--quick:
quality_quick.*) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model, git, log, version  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REDUCTIONS = (1.5, 2.0, 3.0)
SPA_METHODS = ("l1", "random", "taylor", "obspa-none", "obspa-synthetic", "obspa-bn", "obspa-real")
DATA_FREE_OBSPA = ("obspa-none", "obspa-synthetic", "obspa-bn")
TP_METHODS = ("tp-magnitude", "tp-magnitude-global", "tp-taylor", "tp-taylor-global")
CALIBRATION_SAMPLES = 256  # real calibration samples (and synthetic ones, for the same count)
SEED = 0
MAC_TOLERANCE = 0.02  # TP ratio search: achieved MACs within 2% of the target
FINE_TUNE = {"epochs": 2, "lr": 1e-3, "batch_size": 64, "optimizer": "Adam", "schedule": "cosine to 0"}


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def digits_data(flat: bool) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, d.target, test_size=0.25, random_state=SEED, stratify=d.target)
    mean, std = x_train.mean(), x_train.std()  # inputs ~ N(0, 1) overall
    shape = (-1, 64) if flat else (-1, 1, 8, 8)
    return {"x": ((x_train - mean) / std).reshape(shape), "y": y_train.astype(np.int64),
            "x_test": ((x_test - mean) / std).reshape(shape), "y_test": y_test.astype(np.int64),
            "source": "sklearn.datasets.load_digits, 25% stratified test split (random_state 0)"}


def mnist1d_data() -> dict:
    from mnist1d.data import get_dataset_args, make_dataset  # never get_dataset: it downloads

    d = make_dataset(get_dataset_args())  # seeded (42), generated offline, already standardised
    as_input = lambda a: a.astype(np.float32)[:, None, :]  # noqa: E731
    return {"x": as_input(d["x"]), "y": d["y"].astype(np.int64),
            "x_test": as_input(d["x_test"]), "y_test": d["y_test"].astype(np.int64),
            "source": "mnist1d.data.make_dataset(get_dataset_args()), its 80/20 split"}


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.layer3 = Block(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class DigitsMLP(nn.Module):
    def __init__(self, hidden=256):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Mnist1dConv(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv1d(1, w, 5, 1, 2, bias=False), nn.BatchNorm1d(w), nn.ReLU(),
            nn.Conv1d(w, 2 * w, 3, 2, 1, bias=False), nn.BatchNorm1d(2 * w), nn.ReLU(),
            nn.Conv1d(2 * w, 2 * w, 3, 1, 1, bias=False), nn.BatchNorm1d(2 * w), nn.ReLU(),
            nn.Conv1d(2 * w, 2 * w, 3, 2, 1, bias=False), nn.BatchNorm1d(2 * w), nn.ReLU())
        self.hidden = nn.Linear(2 * w * 10, 128)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(F.relu(self.hidden(self.features(x).flatten(1))))


MODELS = {  # the first one listed also warms every method up (untimed) before the timed runs
    "digits-mlp": {"build": DigitsMLP, "data": lambda: digits_data(flat=True), "epochs": 30, "lr": 1e-3},
    "digits-resnet": {"build": DigitsResNet, "data": lambda: digits_data(flat=False), "epochs": 15, "lr": 3e-3},
    "mnist1d-conv": {"build": Mnist1dConv, "data": mnist1d_data, "epochs": 20, "lr": 3e-3},
}


# ------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------
def train(model: nn.Module, data: dict, epochs: int, lr: float, batch_size: int = 64, seed: int = SEED,
          cosine: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = order[s:s + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if sched:
                sched.step()
    return model.eval()


@torch.no_grad()
def torch_accuracy(model: nn.Module, data: dict) -> float:
    model.eval()
    logits = torch.cat([model(torch.from_numpy(data["x_test"][s:s + 500]))
                        for s in range(0, len(data["x_test"]), 500)])
    return float((logits.argmax(1).numpy() == data["y_test"]).mean())


def onnx_accuracy(model, data: dict) -> float:
    from spa.runtime import session

    sess = session(model, quiet=True)
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: data["x_test"]})[0]
    return float((logits.argmax(1) == data["y_test"]).mean())


# ------------------------------------------------------------------------------------------
# MACs
# ------------------------------------------------------------------------------------------
def onnx_macs(model) -> int:
    from spa.cost import concrete_shapes, macs_by_op

    return int(sum(macs_by_op(model, concrete_shapes(model)).values()))


def torch_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Conv/Linear MACs at batch 1, the formula of spa.cost (output elements x weight fan-in)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += output[:1].numel() * (module.weight[0].numel() if isinstance(module, nn.modules.conv._ConvNd)
                                       else module.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    with torch.no_grad():
        model.eval()(example[:1])
    for h in handles:
        h.remove()
    return int(total)


# ------------------------------------------------------------------------------------------
# SPA methods
# ------------------------------------------------------------------------------------------
def spa_prune(method: str, model, keep: float, calib_path: str, calib_labels: np.ndarray):
    from spa.obspa import obspa
    from spa.pipeline import prune
    from spa.selection import Target

    target = Target(keep_macs=keep)
    if method in ("l1", "random"):
        return prune(model, target, criterion=method, seed=SEED).model
    if method == "taylor":
        from spa.frontends.torch_criteria import prune as gradient_prune
        return gradient_prune(model, target, criterion="taylor", calibration=calib_path, labels=calib_labels,
                              samples=CALIBRATION_SAMPLES, batch_size=64, seed=SEED).model
    source = {"obspa-none": "none", "obspa-synthetic": "synthetic", "obspa-bn": "bn", "obspa-real": calib_path}[method]
    return obspa(model, target, calibration=source, samples=CALIBRATION_SAMPLES, batch_size=64, seed=SEED).model


def reimport(path: str) -> nn.Module:
    from spa.frontends.torch import from_onnx

    return from_onnx(path, verify=True)


# ------------------------------------------------------------------------------------------
# Torch-Pruning
# ------------------------------------------------------------------------------------------
def tp_prune_at(model: nn.Module, example, method: str, ratio: float, calib) -> nn.Module:
    import torch_pruning as tp

    work = copy.deepcopy(model).eval()
    taylor = method.startswith("tp-taylor")
    imp = tp.importance.TaylorImportance() if taylor else tp.importance.MagnitudeImportance(p=1)
    cls = tp.pruner.MetaPruner if taylor else tp.pruner.MagnitudePruner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = cls(work, example, importance=imp, pruning_ratio=ratio, global_pruning=method.endswith("global"),
                     max_pruning_ratio=0.9, ignored_layers=[work.fc])
        if taylor:
            work.zero_grad()
            F.cross_entropy(work(torch.from_numpy(calib[0])), torch.from_numpy(calib[1])).backward()
        pruner.step()
    work.zero_grad(set_to_none=True)
    return work.eval()


def tp_search(model, example, method, keep, calib, base_macs):
    """Bisection on the channel ratio until the pruned MACs are within MAC_TOLERANCE of the target.
    Returns (pruned module, ratio, achieved keep fraction, search seconds, #tries)."""
    lo, hi = 0.0, 0.9
    ratio = 1 - keep ** 0.5  # channel ratio r removes about 1 - (1 - r)^2 of a conv's MACs
    best, tries, start = None, 0, time.perf_counter()
    for tries in range(1, 16):
        pruned = tp_prune_at(model, example, method, ratio, calib)
        achieved = torch_macs(pruned, example) / base_macs
        if best is None or abs(achieved - keep) < abs(best[2] - keep):
            best = (pruned, ratio, achieved)
        if abs(achieved - keep) <= MAC_TOLERANCE * keep:
            break
        lo, hi = (ratio, hi) if achieved > keep else (lo, ratio)
        ratio = (lo + hi) / 2
    return best[0], best[1], best[2], time.perf_counter() - start, tries


# ------------------------------------------------------------------------------------------
# one model
# ------------------------------------------------------------------------------------------
def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def error_record(exc: BaseException) -> dict:
    tb = traceback.extract_tb(exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "where": [f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(ROOT) else f.filename}:"
                      f"{f.lineno} {f.name}" for f in tb[-4:]]}


def fine_tune(module: nn.Module, data: dict, epochs: int) -> float:
    train(module, data, epochs, FINE_TUNE["lr"], FINE_TUNE["batch_size"], seed=SEED + 1, cosine=True)
    return torch_accuracy(module, data)


def run_spa_method(method, onnx_model, keep, ctx, workdir) -> dict:
    from spa.pipeline import save

    pruned, seconds = timed(spa_prune, method, onnx_model, keep, ctx["calib_path"], ctx["calib"][1])
    path = os.path.join(workdir, f"{ctx['name']}-{method}-{keep:.3f}.onnx")
    save(pruned, path)  # verified write
    rec = {"prune_seconds": seconds, "macs": onnx_macs(pruned),
           "params": sum(int(np.prod(t.dims)) for t in pruned.graph.initializer if t.data_type == 1),
           "accuracy": onnx_accuracy(pruned, ctx["data"])}
    module = reimport(path)
    rec["accuracy_ft"] = fine_tune(module, ctx["data"], ctx["ft_epochs"])
    return rec


def run_tp_method(method, keep, ctx) -> dict:
    pruned, ratio, achieved, search_s, tries = tp_search(ctx["torch_model"], ctx["example"], method, keep,
                                                         ctx["calib"], ctx["torch_macs"])
    _, seconds = timed(tp_prune_at, ctx["torch_model"], ctx["example"], method, ratio, ctx["calib"])
    rec = {"prune_seconds": seconds, "ratio": ratio, "search_seconds": search_s, "search_tries": tries,
           "macs": round(achieved * ctx["onnx_macs"]), "macs_torch": torch_macs(pruned, ctx["example"]),
           "params": sum(p.numel() for p in pruned.parameters()),
           "accuracy": torch_accuracy(pruned, ctx["data"])}
    rec["accuracy_ft"] = fine_tune(pruned, ctx["data"], ctx["ft_epochs"])
    return rec


def ft_epochs_for(quick: bool) -> int:
    return 1 if quick else FINE_TUNE["epochs"]


def prepare_model(name: str, spec: dict, quick: bool, workdir: str) -> dict:
    import onnx
    from spa.frontends.torch import export

    data = spec["data"]()
    torch.manual_seed(SEED)
    model = spec["build"]()
    epochs = max(3, spec["epochs"] // 3) if quick else spec["epochs"]
    _, train_s = timed(train, model, data, epochs, spec["lr"], cosine=True)
    example = torch.from_numpy(data["x"][:2])
    path = os.path.join(workdir, f"{name}.onnx")
    _, export_s = timed(export, model, (example,), path, exporter="dynamo", training=True)
    onnx_model = onnx.load(path)
    rng = np.random.default_rng(SEED)
    pick = rng.choice(len(data["x"]), CALIBRATION_SAMPLES, replace=False)
    calib = (data["x"][pick], data["y"][pick])
    input_name = onnx_model.graph.input[0].name
    calib_path = os.path.join(workdir, f"{name}-calibration.npz")
    np.savez(calib_path, **{input_name: calib[0]})
    ctx = {"name": name, "data": data, "torch_model": model, "onnx_model": onnx_model, "example": example,
           "calib": calib, "calib_path": calib_path, "onnx_macs": onnx_macs(onnx_model),
           "torch_macs": torch_macs(model, example), "ft_epochs": ft_epochs_for(quick)}
    ctx["info"] = {
        "data": data["source"], "train_samples": len(data["x"]), "test_samples": len(data["x_test"]),
        "train_epochs": epochs, "train_lr": spec["lr"], "train_seconds": train_s, "export_seconds": export_s,
        "macs": ctx["onnx_macs"], "macs_torch_hooks": ctx["torch_macs"],
        "params": sum(p.numel() for p in model.parameters()),
        "accuracy_torch": torch_accuracy(model, data), "accuracy_onnx": onnx_accuracy(onnx_model, data),
        # the same fine-tune on the unpruned model: how much the fine-tune alone moves accuracy
        "accuracy_original_ft": fine_tune(copy.deepcopy(model), data, ft_epochs_for(quick)),
        "calibration_samples": CALIBRATION_SAMPLES, "calibration_file_keys": [input_name]}
    return ctx


def applicable(method: str, ctx) -> str | None:
    """Why the method does not apply to this model (None: it does)."""
    if method == "obspa-bn" and not any(n.op_type == "BatchNormalization" for n in ctx["onnx_model"].graph.node):
        return "no BatchNormalization in the model (calibration 'bn' needs one)"
    return None


def warm_up(ctx, methods) -> float:
    """One untimed pruning per method (imports, first onnxruntime sessions, allocator warm-up)."""
    start = time.perf_counter()
    for method in methods:
        if applicable(method, ctx):
            continue
        try:
            if method.startswith("tp-"):
                tp_prune_at(ctx["torch_model"], ctx["example"], method, 0.3, ctx["calib"])
            else:
                spa_prune(method, ctx["onnx_model"], 0.5, ctx["calib_path"], ctx["calib"][1])
        except Exception:
            pass  # the timed run records the error
    return time.perf_counter() - start


def run_model(name: str, spec: dict, quick: bool, workdir: str, methods, reductions, warm: bool = False) -> dict:
    ctx = prepare_model(name, spec, quick, workdir)
    info = ctx["info"]
    if warm:
        info["warm_up_seconds"] = warm_up(ctx, methods)
    log(f"{name}: trained {info['train_epochs']} epochs in {info['train_seconds']:.1f}s, test accuracy "
        f"{info['accuracy_torch']:.4f} (onnx {info['accuracy_onnx']:.4f}, fine-tuned unpruned "
        f"{info['accuracy_original_ft']:.4f}), {info['macs']:,} MACs "
        f"(hooks {info['macs_torch_hooks']:,}), {info['params']:,} params")
    out = {"info": info, "results": {}}
    for reduction in reductions:
        keep = 1 / reduction
        row = out["results"].setdefault(f"{reduction:g}x", {})
        for method in methods:
            if applicable(method, ctx):
                row[method] = {"skipped": applicable(method, ctx)}
                continue
            try:
                rec = (run_tp_method(method, keep, ctx) if method.startswith("tp-")
                       else run_spa_method(method, ctx["onnx_model"], keep, ctx, workdir))
                rec["keep_macs_achieved"] = rec["macs"] / ctx["onnx_macs"]
                rec["reduction_achieved"] = ctx["onnx_macs"] / rec["macs"]
                log(f"{name} {reduction:g}x {method:20s} acc {rec['accuracy']:.4f} -> FT {rec['accuracy_ft']:.4f}"
                    f"  MACs kept {rec['keep_macs_achieved']:.3f}  prune {rec['prune_seconds']:.2f}s")
            except Exception as exc:  # recorded, reported, the run goes on
                rec = error_record(exc)
                log(f"{name} {reduction:g}x {method}: FAILED {rec['error']} at {rec['where'][-1]}")
            row[method] = rec
    return out


# ------------------------------------------------------------------------------------------
# summary: goal, timing, table, plot
# ------------------------------------------------------------------------------------------
def goal_check(models: dict) -> dict:
    """At 2x, no fine-tune: OBSPA without real data loses <= half of L1's loss and beats TP magnitude."""
    out = {}
    for name, m in models.items():
        base = m["info"]["accuracy_onnx"]
        row = m["results"].get("2x", {})
        acc = {k: v.get("accuracy") for k, v in row.items()}
        if acc.get("l1") is None:
            continue
        l1_loss = base - acc["l1"]
        per = {}
        for method in DATA_FREE_OBSPA:
            if "skipped" in row.get(method, {}):
                continue
            if acc.get(method) is None:
                per[method] = {"error": row.get(method, {}).get("error", "not run")}
                continue
            loss = base - acc[method]
            half = loss <= 0.5 * l1_loss
            beats = {tp: acc[method] > acc[tp] for tp in ("tp-magnitude", "tp-magnitude-global")
                     if acc.get(tp) is not None}
            per[method] = {"loss": loss, "l1_loss": l1_loss, "loss_over_l1_loss": loss / l1_loss if l1_loss else None,
                           "at_most_half_of_l1": half, "beats_tp": beats,
                           "met": half and bool(beats) and all(beats.values())}
        out[name] = per
    return out


def timing_summary(models: dict) -> dict:
    out = {}
    for name, m in models.items():
        per = {}
        for row in m["results"].values():
            for method, rec in row.items():
                if "prune_seconds" in rec:
                    per.setdefault(method, []).append(rec["prune_seconds"])
        out[name] = {k: float(np.median(v)) for k, v in per.items()}
    return out


def markdown(models: dict, goal: dict, timing: dict, methods, reductions) -> str:
    lines = ["| model | method | " + " | ".join(f"{r:g}x" for r in reductions) + " | prune s |",
             "|---|---|" + "---|" * len(reductions) + "---|"]
    for name, m in models.items():
        info = m["info"]
        lines.append(f"| {name} | original (unpruned) | " + " | ".join(
            f"{info['accuracy_onnx']:.3f} / {info['accuracy_original_ft']:.3f}" for _ in reductions) + " | |")
        for method in methods:
            cells = []
            for r in reductions:
                rec = m["results"].get(f"{r:g}x", {}).get(method, {})
                if "accuracy" in rec:
                    cells.append(f"{rec['accuracy']:.3f} / {rec['accuracy_ft']:.3f}")
                elif "skipped" in rec:
                    cells.append("n/a")
                else:
                    cells.append("error")
            t = timing.get(name, {}).get(method)
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + f" | {'' if t is None else f'{t:.2f}'} |")
    lines.append("")
    lines.append("Cells: test accuracy without fine-tuning / after the short fine-tune (the original row: "
                 "the same fine-tune on the unpruned model). Prune s: median seconds of the pruning call "
                 "over the reductions.")
    lines.append("")
    lines.append("| model | OBSPA | accuracy loss at 2x | L1 loss | ratio (goal <= 0.5) | vs TP magnitude (uniform / global) | goal |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, per in goal.items():
        for method, g in per.items():
            if "error" in g:
                lines.append(f"| {name} | {method} | error | | | | |")
                continue
            acc = {k: v.get("accuracy") for k, v in models[name]["results"]["2x"].items()}
            vs = " / ".join(f"{acc[method]:.3f} vs {acc[t]:.3f}" for t in ("tp-magnitude", "tp-magnitude-global")
                            if acc.get(t) is not None)
            ratio = "n/a (L1 lost nothing)" if g["loss_over_l1_loss"] is None else f"{g['loss_over_l1_loss']:.2f}"
            lines.append(f"| {name} | {method} | {g['loss']:.3f} | {g['l1_loss']:.3f} | {ratio} | {vs} | "
                         f"{'met' if g['met'] else 'not met'} |")
    lines.append("")
    for method in DATA_FREE_OBSPA:
        checked = [per[method] for per in goal.values() if method in per and "met" in per[method]]
        if checked:
            lines.append(f"Goal with {method}: met on {sum(g['met'] for g in checked)} of {len(checked)} models.")
    return "\n".join(lines)


STYLE = {"l1": ("tab:blue", "-"), "random": ("tab:gray", ":"), "taylor": ("tab:cyan", "-"),
         "obspa-none": ("tab:orange", "--"), "obspa-synthetic": ("tab:red", "-"), "obspa-bn": ("gold", "-"),
         "obspa-real": ("tab:purple", "-"),
         "tp-magnitude": ("tab:green", "-."), "tp-magnitude-global": ("tab:olive", "-."),
         "tp-taylor": ("tab:brown", "-."), "tp-taylor-global": ("tab:pink", "-.")}


def plot(models: dict, methods, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.4 * len(models) + 0.8), squeeze=False)
    handles = {}
    for row, (name, m) in enumerate(models.items()):
        base = m["info"]["accuracy_onnx"]
        for col, key in enumerate(("accuracy", "accuracy_ft")):
            ax = axes[row][col]
            lowest = base
            for method in methods:
                pts = [(1.0, base)] + [(rec["reduction_achieved"], rec[key]) for rec in
                                       (res.get(method, {}) for res in m["results"].values()) if key in rec]
                if len(pts) > 1:
                    xs, ys = zip(*sorted(pts))
                    lowest = min(lowest, *ys)
                    color, ls = STYLE.get(method, (None, "-"))
                    handles[method], = ax.plot(xs, ys, ls, marker="o", ms=3, color=color, label=method)
            ax.axhline(base, color="black", lw=0.6)
            if col == 1:
                ax.axhline(m["info"]["accuracy_original_ft"], color="black", lw=0.6, ls=":")
                ax.set_ylim(max(0.0, lowest - 0.02), 1.002)  # fine-tuned: zoomed in
            else:
                ax.set_ylim(0, 1.02)
            ax.set_title(f"{name}: {'no fine-tune' if col == 0 else 'after the short fine-tune (zoomed)'}",
                         fontsize=10)
            ax.set_xlabel("MAC reduction (achieved)")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    fig.legend([handles[k] for k in methods if k in handles], [k for k in methods if k in handles],
               loc="upper center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / (3.4 * len(models) + 0.8)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {d: version(d) for d in ("torch", "onnx", "onnxruntime", "numpy", "scipy", "scikit-learn",
                                                  "mnist1d", "torch-pruning", "transformers", "matplotlib")},
            "git_commit": git("rev-parse", "--short", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "loadavg_start": list(os.getloadavg())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, 2x only, fewer methods, MiniLM 50%% only")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    parser.add_argument("--out", help="JSON path (default benchmarks/results/quality.json, --quick: "
                        "quality_quick.json); the plot and the MiniLM JSON go beside it")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(RESULTS, "quality_quick.json" if args.quick else "quality.json")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared 2-core machine
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}")
    reductions = (2.0,) if args.quick else REDUCTIONS
    methods = SPA_METHODS + TP_METHODS
    started = time.perf_counter()
    info = machine_info()
    log(f"quality benchmark ({'quick' if args.quick else 'full'}): {', '.join(names)}; reductions "
        f"{', '.join(f'{r:g}x' for r in reductions)}; load average {info['loadavg_start'][0]:.1f}")
    models = {}
    with tempfile.TemporaryDirectory(prefix="spa-quality-") as workdir:
        for k, name in enumerate(names):
            models[name] = run_model(name, MODELS[name], args.quick, workdir, methods, reductions, warm=k == 0)
    goal = goal_check(models)
    timing = timing_summary(models)
    minilm = None
    if not args.no_minilm:
        from bench_quality_minilm import run as run_minilm
        minilm = run_minilm(quick=args.quick)
        with open(os.path.splitext(args.out)[0] + "_minilm.json", "w") as f:
            json.dump(dict(minilm, date=_dt.datetime.now().isoformat(timespec="seconds"), machine=info), f,
                      indent=1, default=float)
    table = markdown(models, goal, timing, methods, reductions)
    result = {"benchmark": "quality", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "quick": args.quick, "machine": info, "seed": SEED, "reductions": list(reductions),
              "methods": list(methods), "calibration_samples": CALIBRATION_SAMPLES, "fine_tune": dict(
                  FINE_TUNE, epochs=1 if args.quick else FINE_TUNE["epochs"]),
              "tp_mac_tolerance": MAC_TOLERANCE, "models": models, "goal_2x_no_finetune": goal,
              "prune_seconds_median": timing, "minilm": minilm, "markdown": table,
              "loadavg_end": list(os.getloadavg()), "wall_seconds": time.perf_counter() - started}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(models, methods, png)
    print()
    print(table)
    if minilm:
        from bench_quality_minilm import markdown as minilm_markdown
        print()
        print(minilm_markdown(minilm))
    log(f"wrote {os.path.relpath(args.out, ROOT)} and {os.path.relpath(png, ROOT)} "
        f"({result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
