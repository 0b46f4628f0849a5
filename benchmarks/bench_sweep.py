"""spa sweep benchmark: a 24-trial sweep on a trained digits model, serially and as Ray tasks.

    python benchmarks/bench_sweep.py [--model digits-resnet]

The model is trained and exported by bench_quality.prepare_model (quick training), its held-out
test split written as the --eval file. The grid: criteria l1, l2, obspa x targets ratio=0.3,
macs=0.5, params=0.5 x round-to 1, 8, x calibration synthetic, none for obspa: 24 trials, the metric
test accuracy. The sweep runs once serially (Ray hidden) and once on a local Ray over every core
(started before the sweep and timed apart, as is a warm-up sweep of one trial per core in which
each worker imports spa); both tables must be identical. "speedup_cold" compares the serial sweep
plus those warm-up trials with Ray's start, warm-up and sweep. Writes
benchmarks/results/sweep.json and sweep.png (metric vs MACs, the Pareto front). Other jobs share
the machine: the load average at start is recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import MODELS, machine_info, prepare_model  # noqa: E402
from common import RESULTS, log  # noqa: E402

from spa import grid_sweep  # noqa: E402
from spa.evaluate import Baseline  # noqa: E402
from spa.group_sensitivity import Evaluated  # noqa: E402

GRID = {"criteria": "l1,l2,obspa", "targets": "ratio=0.3,macs=0.5,params=0.5", "calibration": "synthetic,none",
        "round_to": "1,8"}


@contextlib.contextmanager
def ray_hidden():
    """`import ray` fails inside: spa.trials runs serially."""
    saved = sys.modules.get("ray")
    sys.modules["ray"] = None
    try:
        yield
    finally:
        if saved is None:
            del sys.modules["ray"]
        else:
            sys.modules["ray"] = saved


def timed(fn, *args) -> tuple:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def serial_vs_ray(run_all, warm_up, same) -> dict:
    """run_all() once with Ray hidden (spa.trials' serial fallback), then once on a local Ray over
    every core, started and warmed up (warm_up(): each worker imports spa and onnxruntime) apart;
    the timings, speedups and whether same(serial, on_ray) holds."""
    with ray_hidden():
        serial, serial_s = timed(run_all)
    log(f"serial: {serial_s:.1f}s; starting a local Ray")
    import ray
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - start
    _, warm_s = timed(warm_up)
    on_ray, ray_s = timed(run_all)
    ray.shutdown()
    out = {"serial": serial, "on_ray": on_ray, "serial_seconds": serial_s, "ray_start_seconds": ray_init_s,
           "ray_warm_up_seconds": warm_s, "ray_seconds": ray_s, "speedup": serial_s / ray_s,
           "speedup_cold": (serial_s + warm_s) / (ray_s + ray_init_s + warm_s), "identical": same(serial, on_ray)}
    log(f"Ray: {ray_init_s:.1f}s start, {warm_s:.1f}s warm-up, {ray_s:.1f}s the trials; {out['speedup']:.2f}x faster "
        f"(cold: {out['speedup_cold']:.2f}x); identical results: {out['identical']}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-resnet", choices=[m for m in MODELS if m.startswith("digits")])
    args = parser.parse_args(argv)
    info = machine_info()
    log(f"sweep benchmark on {args.model}; load average {info['loadavg_start'][0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="spa-sweep-") as workdir:
        ctx = prepare_model(args.model, MODELS[args.model], quick=True, workdir=workdir)
        model = ctx["onnx_model"]
        eval_path = os.path.join(workdir, "test.npz")
        np.savez(eval_path, **{model.graph.input[0].name: ctx["data"]["x_test"], "labels": ctx["data"]["y_test"]})
        metric = Evaluated(Baseline(model, eval_path))
        points = grid_sweep.grid(**GRID)
        log(f"{len(points)} trials; serial")
        compared = serial_vs_ray(lambda: grid_sweep.run(model, points, metric, name="digits", note=log),
                                 lambda: grid_sweep.run(model, points[:os.cpu_count()], metric, name="digits"),
                                 lambda a, b: a["trials"] == b["trials"])
    on_ray = compared.pop("on_ray")
    compared.pop("serial")
    print(grid_sweep.format_table(on_ray))
    os.makedirs(RESULTS, exist_ok=True)
    grid_sweep.plot(on_ray, os.path.join(RESULTS, "sweep.png"))
    record = {"benchmark": "sweep", "date": _dt.datetime.now().isoformat(timespec="seconds"), "model": args.model,
              "model_info": ctx["info"], "grid": GRID, "trials": len(points), "cores": os.cpu_count(), **compared,
              "result": on_ray, "machine": info, "loadavg_end": list(os.getloadavg())}
    with open(os.path.join(RESULTS, "sweep.json"), "w") as f:
        json.dump(record, f, indent=1, default=float)
    return 0 if compared["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
