"""onnxruntime-genai decoders: what `spa prune` makes of the files its model builder writes, timed in
onnxruntime-genai itself (the runtime those files are for), original and pruned side by side.

    python benchmarks/bench_genai.py                 # LLaMA-shaped, 16 layers x 1024, int4 (~150 MB)
    python benchmarks/bench_genai.py --size small    # 2 layers x 256, for a quick look

The model: transformers' LlamaForCausalLM from a LlamaConfig with random weights (torch.manual_seed(0);
no pretrained decoder ships in a pip package, so this measures size and speed, not quality), saved
with a word-level tokenizer, then `python -m onnxruntime_genai.models.builder -p int4 -e cpu`:
GroupQueryAttention over a key/value cache held in the graph's inputs and outputs, MatMulNBits
(4-bit blocks of 32), SkipSimplifiedLayerNormalization. Each pruned model.onnx goes into a copy of the
builder's folder (genai_config.json, tokenizer) and is loaded by `onnxruntime_genai.Model`.

Rows: the original; `spa prune --criterion l1 --ratio R` (every group alike: the MLP channels, in
whole blocks, and the query-head slots); the default criterion (OBSPA, no data) at 0.25, timed too.
Speed: prefill of a 64-token prompt and the mean time per generated token over 64 greedy tokens, the
best of 3 generations, models alternating (original, each pruned one, original again), onnxruntime-genai's
default threads. Results in benchmarks/results/genai.json and genai.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import RESULTS, cpu_model, git, log, version

SIZES = {"default": dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=16,
                         intermediate_size=2816, vocab_size=8192, max_position_embeddings=2048),
         "small": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
                       intermediate_size=704, vocab_size=1024, max_position_embeddings=512)}
PROMPT, NEW, REPEATS = 64, 64, 3


def build(root: str, size: str) -> str:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = SIZES[size]
    torch.manual_seed(0)
    hf = os.path.join(root, "hf")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(hf)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config["vocab_size"])}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t1", eos_token="t2",
                                         unk_token="t0").save_pretrained(hf)
    out = os.path.join(root, "original")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, "-p", "int4",
                    "-e", "cpu", "-c", os.path.join(root, "cache")], check=True, capture_output=True)
    return out


def pruned(root: str, original: str, name: str, flags: list) -> dict:
    folder = os.path.join(root, name)
    shutil.copytree(original, folder, ignore=shutil.ignore_patterns("model.onnx*"))
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "spa", "prune", os.path.join(original, "model.onnx"), "-o",
                          os.path.join(folder, "model.onnx"), *flags], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"spa prune {' '.join(flags)} failed:\n{run.stderr[-2000:]}")
    wrote = [line for line in run.stdout.splitlines() if line.startswith("wrote")]
    return {"name": name, "flags": flags, "folder": folder, "prune_seconds": round(time.perf_counter() - start, 1),
            "summary": wrote[-1].split(": ", 1)[-1] if wrote else ""}


def generation_speed(folder: str) -> tuple:
    """(prefill seconds, seconds per generated token), the best of REPEATS greedy generations."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    prefill = step = float("inf")
    for _ in range(REPEATS):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=PROMPT + NEW, min_length=PROMPT + NEW, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.arange(3, 3 + PROMPT, dtype=np.int32)[None])
        middle = time.perf_counter()
        tokens = 0
        while not generator.is_done():
            generator.generate_next_token()
            tokens += 1
        prefill = min(prefill, middle - start)
        step = min(step, (time.perf_counter() - middle) / max(tokens, 1))
    return prefill, step


def model_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith("model.onnx"))


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("megabytes", "prefill_ms", "ms_per_token"),
                              ("model.onnx + data (MB)", f"prefill, {PROMPT} tokens (ms)", "per generated token (ms)")):
        ax.bar(names, [r[key] for r in rows], color=["grey"] + ["tab:blue"] * (len(rows) - 1))
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle("onnxruntime-genai int4 LLaMA-shaped decoder (random weights), pruned by spa", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spa-genai-") as root:
        log(f"building the {args.size} decoder with onnxruntime-genai {version('onnxruntime-genai')}'s builder")
        original = build(root, args.size)
        variants = [pruned(root, original, f"l1 {r}", ["--ratio", str(r), "--criterion", "l1"]) for r in (0.25, 0.5)]
        variants.append(pruned(root, original, "default 0.25", ["--ratio", "0.25"]))
        for v in variants:
            log(f"{v['name']}: {v['summary']} ({v['prune_seconds']} s)")
        folders = [("original", original)] + [(v["name"], v["folder"]) for v in variants] + [("original", original)]
        timings: dict = {}
        for name, folder in folders:
            prefill, step = generation_speed(folder)
            best = timings.get(name, (float("inf"), float("inf")))
            timings[name] = (min(best[0], prefill), min(best[1], step))
            log(f"{name}: prefill {prefill * 1e3:.1f} ms, {step * 1e3:.2f} ms per token")
        rows = []
        for name, folder in folders[:-1]:
            prefill, step = timings[name]
            extra = next((v for v in variants if v["name"] == name), {})
            rows.append({"name": name, "megabytes": round(model_bytes(folder) / 1e6, 1),
                         "prefill_ms": round(prefill * 1e3, 1), "ms_per_token": round(step * 1e3, 2),
                         **{k: extra[k] for k in ("flags", "prune_seconds", "summary") if k in extra}})
        base = rows[0]
        for row in rows[1:]:
            row["prefill_speedup"] = round(base["prefill_ms"] / row["prefill_ms"], 2)
            row["decode_speedup"] = round(base["ms_per_token"] / row["ms_per_token"], 2)
    result = {"size": args.size, "config": SIZES[args.size], "prompt": PROMPT, "new_tokens": NEW, "rows": rows,
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "onnxruntime_genai": version("onnxruntime-genai"),
              "onnxruntime": version("onnxruntime"), "commit": git("rev-parse", "--short", "HEAD"),
              "date": time.strftime("%Y-%m-%d")}
    os.makedirs(RESULTS, exist_ok=True)
    suffix = "" if args.size == "default" else f"_{args.size}"
    with open(os.path.join(RESULTS, f"genai{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(RESULTS, f"genai{suffix}.png"))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
