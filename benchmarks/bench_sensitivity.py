"""spa sensitivity benchmark: every prunable group of a full-size ResNet-50 at 4 ratios, serially
and as Ray tasks on a local Ray over every core.

    python benchmarks/bench_sensitivity.py [--ratios 0.1,0.3,0.5,0.7]

The model: models/zoo's full-size ResNet-50 (25.5M parameters, eval export, BatchNorm folded),
input 1x3x224x224. Metric: the default, relative output deviation on 16 held-out N(0, 1) inputs.
The measurement runs once with Ray hidden (spa.trials' serial fallback) and once on a local Ray
started before it and timed apart, after a warm-up of one trial per core in which each worker
imports spa and onnxruntime; the two tables must be identical. "speedup" compares the two
measurements, "speedup_cold" also counts Ray's start and warm-up. Writes
benchmarks/results/sensitivity.json and sensitivity.png. Other jobs share the machine: the load
average at start and end is recorded.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import machine_info  # noqa: E402
from bench_sweep import serial_vs_ray  # noqa: E402
from common import RESULTS, ROOT, log  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from spa import group_sensitivity  # noqa: E402
from spa.graph import load_model  # noqa: E402


def resnet50(workdir: str, full: bool = True):
    from models import zoo
    path = os.path.join(workdir, "resnet50.onnx")
    zoo.export(zoo.build("resnet50", full=full), path, example_inputs=zoo.example_inputs("resnet50", full=full))
    return load_model(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.3,0.5,0.7")
    parser.add_argument("--small", action="store_true", help="the zoo's reduced ResNet-50 (a smoke test; not saved)")
    args = parser.parse_args(argv)
    ratios = tuple(float(r) for r in args.ratios.split(","))
    info = machine_info()
    log(f"sensitivity benchmark on ResNet-50; load average {info['loadavg_start'][0]:.2f}")
    from spa.groups import analyze
    with tempfile.TemporaryDirectory(prefix="spa-sensitivity-") as workdir:
        model = resnet50(workdir, full=not args.small)
    analysis = analyze(model)

    def measure(some_ratios):
        return group_sensitivity.measure(model, some_ratios, name="resnet50.onnx", say=log, note=log, analysis=analysis)

    compared = serial_vs_ray(lambda: measure(ratios), lambda: measure(ratios[:1]),
                             lambda a, b: a["groups"] == b["groups"])
    serial, on_ray = compared.pop("serial"), compared.pop("on_ray")
    trials = sum(1 for g in serial["groups"] for t in g["trials"] if t.get("removed_channels", 1))
    print(group_sensitivity.format_table(on_ray))
    if args.small:
        return 0 if compared["identical"] else 1
    os.makedirs(RESULTS, exist_ok=True)
    group_sensitivity.plot(on_ray, os.path.join(RESULTS, "sensitivity.png"))
    record = {"benchmark": "sensitivity", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "model": "resnet50 (models/zoo, full size, 224x224)", "ratios": list(ratios),
              "groups": len(serial["groups"]), "trials": trials, "cores": os.cpu_count(), **compared,
              "executors": [serial["executor"], on_ray["executor"]], "result": on_ray, "machine": info,
              "loadavg_end": list(os.getloadavg())}
    with open(os.path.join(RESULTS, "sensitivity.json"), "w") as f:
        json.dump(record, f, indent=1, default=float)
    return 0 if compared["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
