"""Helpers shared by the benchmark scripts: progress lines and facts about the machine."""
from __future__ import annotations

import importlib.metadata as _md
import os
import platform
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def interleaved_ms(runs: list, least: int, seconds: float = 0.0, most: int | None = None, warmup: int = 0) -> list:
    """Median latency (ms) of each (session, feeds), run in turn so that load on the machine hits each
    alike: `warmup` untimed runs each, then rounds until at least `least` rounds and `seconds`, at
    most `most` rounds."""
    import statistics

    for sess, feeds in runs:
        for _ in range(warmup):
            sess.run(None, feeds)
    times = [[] for _ in runs]
    started = time.perf_counter()
    while len(times[0]) < least or (time.perf_counter() - started < seconds
                                    and (most is None or len(times[0]) < most)):
        for t, (sess, feeds) in zip(times, runs):
            began = time.perf_counter()
            sess.run(None, feeds)
            t.append(time.perf_counter() - began)
    return [1e3 * statistics.median(t) for t in times]
