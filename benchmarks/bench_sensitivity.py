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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import machine_info  # noqa: E402
from bench_sweep import ray_hidden  # noqa: E402
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


def timed(model, ratios, analysis) -> tuple[dict, float]:
    start = time.perf_counter()
    result = group_sensitivity.measure(model, ratios, name="resnet50.onnx", say=log, note=log, analysis=analysis)
    return result, time.perf_counter() - start


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
    with ray_hidden():
        serial, serial_s = timed(model, ratios, analysis)
    trials = sum(1 for g in serial["groups"] for t in g["trials"] if t.get("removed_channels", 1))
    log(f"serial: {trials} trials in {serial_s:.1f}s; starting a local Ray")
    import ray
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - start
    start = time.perf_counter()
    timed(model, ratios[:1], analysis)  # warm-up: every worker imports spa and onnxruntime
    warm_s = time.perf_counter() - start
    on_ray, ray_s = timed(model, ratios, analysis)
    ray.shutdown()
    identical = serial["groups"] == on_ray["groups"]
    log(f"Ray: {ray_init_s:.1f}s start, {warm_s:.1f}s warm-up, {ray_s:.1f}s the measurement; "
        f"{serial_s / ray_s:.2f}x faster (cold: {(serial_s + warm_s) / (ray_s + ray_init_s + warm_s):.2f}x); "
        f"identical results: {identical}")
    print(group_sensitivity.format_table(on_ray))
    if args.small:
        return 0 if identical else 1
    os.makedirs(RESULTS, exist_ok=True)
    group_sensitivity.plot(on_ray, os.path.join(RESULTS, "sensitivity.png"))
    record = {"benchmark": "sensitivity", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "model": "resnet50 (models/zoo, full size, 224x224)", "ratios": list(ratios),
              "groups": len(serial["groups"]), "trials": trials, "cores": os.cpu_count(),
              "serial_seconds": serial_s, "ray_start_seconds": ray_init_s, "ray_warm_up_seconds": warm_s,
              "ray_seconds": ray_s, "speedup": serial_s / ray_s,
              "speedup_cold": (serial_s + warm_s) / (ray_s + ray_init_s + warm_s), "identical": identical,
              "executors": [serial["executor"], on_ray["executor"]], "result": on_ray, "machine": info,
              "loadavg_end": list(os.getloadavg())}
    with open(os.path.join(RESULTS, "sensitivity.json"), "w") as f:
        json.dump(record, f, indent=1, default=float)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
