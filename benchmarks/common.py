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


def quantized(path: str, feeds: list, fmt: str, work: str, prepare: bool = True, name: str = "quantized") -> str:
    """`path` quantized by onnxruntime.quantization.quantize_static in `fmt` (QDQ or QOperator; int8
    per-channel weights, uint8 activations) on the batches `feeds` (dicts of input arrays), written as
    `work`/`name`-`fmt`.onnx: what a user's int8 file is. `prepare`: pre-processed first (BatchNormalization
    folded, the exporter's Identity-shared biases the quantizer cannot read resolved), opset 17 where older
    (DequantizeLinear's axis); the survey quantizes its toy exports as they are."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    path, work = os.path.abspath(path), os.path.abspath(work)
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, f"{name}-{fmt}.onnx")
    if prepare:
        prepared = os.path.join(work, f"prepared-{fmt}.onnx")
        quant_pre_process(path, prepared, skip_symbolic_shape=True)
        model = onnx.load(prepared)
        if model.opset_import[0].version < 13:
            onnx.save(version_converter.convert_version(model, 17), prepared)
        path = prepared
    cwd = os.getcwd()
    os.chdir(work)  # the quantizer may leave scratch files in the working directory
    try:
        quantize_static(path, out, Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        os.chdir(cwd)
    return out

