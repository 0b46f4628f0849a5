"""Latency on the user's runtime: every layer timed alone on onnxruntime at the widths a plan can
give it, cached per machine, and a model of the whole network that predicts a plan's latency.

A layer (Conv, Gemm, MatMul with a constant weight) is timed along each prunable axis with the
other at full width; the two are combined as a product, t(in, out) = t(in, OUT) t(IN, out) /
t(IN, OUT), exact when time goes as in x out, as a GEMM's does. Everything else (pools, adds,
activations onnxruntime did not fuse into a layer, attention's activation products) scales with
the activation elements the plan keeps. The cached tables give each layer's curve relative to its
full width; the absolute figures are timed in the same run as the whole model (the machine's
speed drifts between runs), and the prediction for "nothing removed" is the measurement itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .cost import concrete_shapes
from .graph import attr
from .progress import bar
from .runtime import random_inputs, session

TIMED_OPS = ("Conv", "Gemm", "MatMul")
GRID_POINTS = 8  # candidate widths per group: 4 to 8 of them, power-of-two steps
AUTO_MULTIPLES = (1, 2, 4, 8, 16, 32)
FAST_TOLERANCE = 0.03  # a width is slow when a wider one runs within 3% of its time


def _quiet(message):
    pass


@dataclass(frozen=True)
class Layer:
    """One weighted layer as it is timed alone."""

    node: int
    name: str
    op: str
    x_shape: tuple  # the input activation, batch included
    w_shape: tuple
    attrs: tuple  # (name, value) pairs that change the timing
    depthwise: bool
    has_bias: bool
    in_axis: int  # weight axes of the contracted and the produced channels
    out_axis: int
    in_pair: tuple | None  # (weight, axis) where the analysis tracks channels on that axis
    out_pair: tuple | None

    @property
    def full(self) -> tuple:
        return self.w_shape[self.in_axis], self.w_shape[self.out_axis]

    def key(self, d_in: int, d_out: int) -> str:
        attrs = ",".join(f"{k}={v}" for k, v in self.attrs)
        return f"{self.op}|x{list(self.x_shape)}|w{list(self.w_shape)}|{attrs}|b{int(self.has_bias)}|{d_in}x{d_out}"

    def build(self, d_in: int, d_out: int) -> tuple[onnx.ModelProto, dict]:
        """The layer alone at these widths (for depthwise convs d_out is the channel count)."""
        rng = np.random.default_rng(0)
        attrs = dict(self.attrs)
        if self.op == "Conv":
            channels = d_out if self.depthwise else d_in * attrs.get("group", 1)
            x = (self.x_shape[0], channels) + tuple(self.x_shape[2:])
            w = (d_out, 1 if self.depthwise else d_in) + tuple(self.w_shape[2:])
            if self.depthwise:
                attrs["group"] = d_out
        elif self.op == "Gemm":
            x = (self.x_shape[0], d_in)
            w = (d_out, d_in) if attrs.get("transB") else (d_in, d_out)
        else:
            x = tuple(self.x_shape[:-1]) + (d_in,)
            w = (d_in, d_out)
        inits = [numpy_helper.from_array((0.1 * rng.standard_normal(w)).astype(np.float32), "W")]
        inputs = ["X", "W"]
        if self.has_bias:
            inits.append(numpy_helper.from_array(np.zeros(d_out, np.float32), "B"))
            inputs.append("B")
        node = helper.make_node(self.op, inputs, ["Y"], **attrs)
        graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x)],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        return model, {"X": rng.standard_normal(x).astype(np.float32)}


def timed_layers(analysis, shapes: dict) -> list:
    """Every Conv / Gemm / MatMul whose weight is a constant and whose input shape is known."""
    g = analysis.graph
    layers = []
    for i, node in enumerate(g.nodes):
        if node.op_type not in TIMED_OPS or len(node.input) < 2 or node.input[1] not in g.consts:
            continue
        x_shape, w_shape = shapes.get(node.input[0]), tuple(g.consts.shape(node.input[1]))
        if x_shape is None or not all(isinstance(d, int) and d > 0 for d in x_shape):
            continue
        layer = _layer(analysis, i, node, tuple(x_shape), w_shape)
        if layer is not None:
            layers.append(layer)
    return layers


def _layer(analysis, index, node, x_shape, w_shape):
    w = node.input[1]
    has_bias = len(node.input) > 2 and bool(node.input[2])
    members = analysis.members
    pair = lambda axis: (w, axis) if (w, axis) in members else None  # noqa: E731
    if node.op_type == "Conv":
        group = attr(node, "group", 1)
        depthwise = group > 1 and w_shape[1] == 1 and group == x_shape[1] == w_shape[0]
        if group > 1 and not depthwise:
            return None  # grouped convs keep their group count: timed with the rest
        attrs = [("group", 1)] if not depthwise else []
        attrs += [(k, tuple(attr(node, k))) for k in ("strides", "pads", "dilations") if attr(node, k) is not None]
        if attr(node, "auto_pad") is not None:
            auto_pad = attr(node, "auto_pad")
            attrs.append(("auto_pad", auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad))
        return Layer(index, node.name, "Conv", x_shape, w_shape, tuple(attrs), depthwise, has_bias, 1, 0,
                     None if depthwise else pair(1), pair(0))
    if len(w_shape) != 2:
        return None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or len(x_shape) != 2:
            return None
        trans_b = attr(node, "transB", 0)
        bias = has_bias and node.input[2] in analysis.graph.consts and len(analysis.graph.consts.shape(node.input[2])) == 1
        axes = (1, 0) if trans_b else (0, 1)
        return Layer(index, node.name, "Gemm", x_shape, w_shape, (("transB", trans_b),), False, bias, *axes,
                     pair(axes[0]), pair(axes[1]))
    return Layer(index, node.name, "MatMul", x_shape, w_shape, (), False, False, 0, 1, pair(0), pair(1))


# -- timing ------------------------------------------------------------------------------------

class OrtTimer:
    """Median onnxruntime run time (ms) of a model, with `threads` intra-op threads."""

    def __init__(self, threads: int | None = None, min_runs: int = 5, min_seconds: float = 0.02,
                 max_runs: int = 200):
        self.threads, self.min_runs, self.min_seconds, self.max_runs = threads, min_runs, min_seconds, max_runs

    def __call__(self, model, feeds) -> float:
        sess = session(model, threads=self.threads, quiet=True)
        for _ in range(2):
            sess.run(None, feeds)
        times, start = [], time.perf_counter()
        while len(times) < self.min_runs or (time.perf_counter() - start < self.min_seconds
                                             and len(times) < self.max_runs):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)


def machine(threads: int | None) -> dict:
    """What a latency table is valid for: a different CPU, runtime or thread count measures anew."""
    from platform import machine as arch
    cpu = arch()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "threads": threads or "default"}


def cache_dir() -> str:
    """$SPA_CACHE_DIR, else the user's cache directory (platformdirs)."""
    if os.environ.get("SPA_CACHE_DIR"):
        return os.environ["SPA_CACHE_DIR"]
    import platformdirs
    return platformdirs.user_cache_dir("spa")


class Tables:
    """Layer timings by Layer.key, persisted in one JSON file per machine key."""

    def __init__(self, threads: int | None = None, timer=None, directory: str | None = None):
        self.machine = machine(threads)
        self.timer = timer or OrtTimer(threads)
        digest = hashlib.sha1(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()[:12]
        self.path = os.path.join(directory or cache_dir(), f"latency-{digest}.json")
        self.times = self._load()
        self.measured = 0  # table entries timed (not read from the cache) by this object
        self._overhead = None

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return {k: float(v) for k, v in data["times"].items()} if data.get("machine") == self.machine else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # no cache, or one that is unreadable: measure again

    def save(self):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"machine": self.machine, "times": self.times}, f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs the next run its measurements

    def overhead(self) -> float:
        """Time of a run that does nothing: subtracted from every layer timing."""
        if self._overhead is None:
            key = "overhead"
            if key not in self.times:
                x = helper.make_tensor_value_info("X", TensorProto.FLOAT, (1,))
                y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, (1,))
                model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])], "noop", [x], [y]),
                                          opset_imports=[helper.make_opsetid("", 13)])
                model.ir_version = 8
                self.times[key] = self.timer(model, {"X": np.zeros(1, np.float32)})
            self._overhead = self.times[key]
        return self._overhead

    def missing(self, requests) -> list:
        return [(layer, d_in, d_out) for layer, d_in, d_out in dict.fromkeys(requests)
                if layer.key(d_in, d_out) not in self.times]

    def measure(self, requests, progress_label: str = "latency tables"):
        """Time what the cache lacks. A layer's widths are timed in one sequence between two
        timings of its full width, stored with them: the machine's speed drifts over minutes, and
        a table is read relative to its full width."""
        todo = self.missing(requests)
        if not todo:
            return
        self.overhead()
        by_layer = {}
        for layer, d_in, d_out in todo:
            by_layer.setdefault(layer.key(*layer.full), (layer, []))[1].append((d_in, d_out))
        with bar(total=len(todo) + 2 * len(by_layer), desc=progress_label) as progress:
            for layer, widths in by_layer.values():
                first = self._time(layer, *layer.full)
                for d_in, d_out in widths:
                    self.times[layer.key(d_in, d_out)] = self._time(layer, d_in, d_out)
                    self.measured += 1
                    progress.update()
                self.times[layer.key(*layer.full)] = (first + self._time(layer, *layer.full)) / 2
                progress.update(2)
        self.save()

    def _time(self, layer, d_in, d_out) -> float:
        model, feeds = layer.build(d_in, d_out)
        return self.timer(model, feeds)

    def __call__(self, layer: Layer, d_in: int, d_out: int) -> float:
        key = layer.key(d_in, d_out)
        if key not in self.times:
            self.measure([(layer, d_in, d_out)])
        return max(self.times[key] - self.overhead(), 1e-6)


# -- the model of the whole network -------------------------------------------------------------

class LatencyModel:
    """Predicted latency (ms) of the analysed model when channels are removed.

    A state is {(tensor, axis): indices removed}; Plans and group options both map to one.
    """

    def __init__(self, analysis, batch: int = 1, threads: int | None = None, tables: Tables | None = None,
                 whole_ms: float | None = None, progress=_quiet):
        self.analysis = analysis
        self.batch, self.threads = batch, threads
        self.tables = tables or Tables(threads)
        self.progress = progress
        model = analysis.model
        self.shapes = concrete_shapes(model, batch=batch, shapes=analysis.input_shapes)
        self.layers = timed_layers(analysis, self.shapes)
        self._activations()
        if whole_ms is None:
            progress(f"measuring the original model's latency (batch {batch}, {_threads(threads)})")
            whole_ms = measure_model(model, batch, threads, shapes=analysis.input_shapes)
        self.whole_ms = whole_ms
        self.tables.measure([(layer, *layer.full) for layer in self.layers])
        self.now = self._time_full_widths()
        layer_sum = sum(self._layer_ms(layer, {}) for layer in self.layers)
        # timed alone, layers pay for layout conversions they share in the network: scale down
        # where they add up to more than the whole
        self.scale = min(1.0, 0.95 * whole_ms / layer_sum) if layer_sum else 1.0
        self.other_ms = whole_ms - self.scale * layer_sum
        self.savings = 1.0  # measured / predicted time saved (calibrate)

    def calibrate(self, state: dict, measured_ms: float):
        """Scale every predicted saving so that this state (a plan timed as a whole model)
        predicts what was measured: timed alone, layers do not shrink exactly as they do in the
        network, and the knapsack favours the layers whose tables are most optimistic."""
        saved = self.whole_ms - self.raw(state)
        if saved > 0:
            self.savings = min(max((self.whole_ms - measured_ms) / saved, 0.2), 2.0)

    def _activations(self):
        """Output elements of every untimed node, and the member axes they carry."""
        g, timed = self.analysis.graph, {layer.node for layer in self.layers}
        by_tensor = {}
        for member in self.analysis.members.values():
            if not member.is_const:
                by_tensor.setdefault(member.tensor, []).append(member)
        self.outputs = []
        for i, node in enumerate(g.nodes):
            if i in timed:
                continue
            for out in node.output:
                shape = self.shapes.get(out)
                if out and shape and all(isinstance(d, int) for d in shape):
                    self.outputs.append((float(np.prod(shape, dtype=np.float64)),
                                         [(m.tensor, m.axis, m.size) for m in by_tensor.get(out, [])]))
        self.elements = sum(n for n, _ in self.outputs) or 1.0
        self.layers_by_pair, self.outputs_by_pair = {}, {}
        for k, layer in enumerate(self.layers):
            for pair in {layer.in_pair, layer.out_pair} - {None}:
                self.layers_by_pair.setdefault(pair, []).append(k)
        for k, (_, members) in enumerate(self.outputs):
            for tensor, axis, _ in members:
                self.outputs_by_pair.setdefault((tensor, axis), []).append(k)

    @property
    def pairs(self) -> set:
        """The (tensor, axis) pairs whose widths the prediction reads."""
        return set(self.layers_by_pair) | set(self.outputs_by_pair)

    def widths(self, layer: Layer, state: dict) -> tuple:
        full_in, full_out = layer.full
        d_in = full_in - state.get(layer.in_pair, 0) if layer.in_pair else full_in
        d_out = full_out - state.get(layer.out_pair, 0) if layer.out_pair else full_out
        return d_in, d_out

    def _time_full_widths(self) -> dict:
        """Every layer at its full width, timed now (not from the cache)."""
        overhead = self.tables.overhead()
        layers = {layer.key(*layer.full): layer for layer in self.layers}
        return {key: max(self.tables._time(layer, *layer.full) - overhead, 1e-6)
                for key, layer in bar(list(layers.items()), "latency: layers now")}

    def _layer_ms(self, layer: Layer, state: dict) -> float:
        full_in, full_out = layer.full
        d_in, d_out = self.widths(layer, state)
        whole = self.tables(layer, full_in, full_out)
        t_in = self.tables(layer, d_in, full_out) / whole if d_in != full_in else 1.0
        t_out = self.tables(layer, full_in, d_out) / whole if d_out != full_out else 1.0
        return self.now[layer.key(full_in, full_out)] * t_in * t_out

    def layer_ms(self, layer: Layer, state: dict) -> float:
        return self.scale * self._layer_ms(layer, state)

    def kept_fraction(self, state: dict, outputs=None) -> float:
        """Share of the untimed nodes' output elements (of `outputs`, or all) the state keeps."""
        kept = 0.0
        for k in range(len(self.outputs)) if outputs is None else outputs:
            n, members = self.outputs[k]
            for tensor, axis, size in members:
                n *= 1 - state.get((tensor, axis), 0) / size
            kept += n
        return kept / self.elements

    def other(self, state: dict, outputs=None) -> float:
        return self.other_ms * self.kept_fraction(state, outputs)

    def raw(self, state: dict) -> float:
        return sum(self.layer_ms(layer, state) for layer in self.layers) + self.other(state)

    def predict(self, state: dict) -> float:
        return self.whole_ms - self.savings * (self.whole_ms - self.raw(state))

    def delta(self, state: dict, removal: dict) -> float:
        """Predicted change when the pairs in `removal` take its counts and the rest stay as in `state`."""
        layers = {k for p in removal for k in self.layers_by_pair.get(p, ())}
        outputs = {k for p in removal for k in self.outputs_by_pair.get(p, ())}
        new = {**state, **removal}
        change = sum(self.layer_ms(self.layers[k], new) - self.layer_ms(self.layers[k], state) for k in layers)
        return self.savings * (change + self.other(new, outputs) - self.other(state, outputs))

    def state_of(self, plan) -> dict:
        pairs = [p for layer in self.layers for p in (layer.in_pair, layer.out_pair) if p]
        pairs += [(t, a) for _, members in self.outputs for t, a, _ in members]
        return {p: len(plan.removed(*p)) for p in set(pairs) if len(plan.removed(*p))}

    def requests(self, states) -> list:
        """(layer, d_in, d_out) timings that predicting these states reads."""
        out = []
        for state in states:
            for layer in self.layers:
                full_in, full_out = layer.full
                d_in, d_out = self.widths(layer, state)
                out += [(layer, d_in, full_out), (layer, full_in, d_out)]
        return out


def _threads(threads):
    return f"{threads} thread{'s' if threads != 1 else ''}" if threads else "default threads"


def measure_model(model_or_path, batch: int = 1, threads: int | None = None, seconds: float = 1.0,
                  shapes: dict | None = None) -> float:
    """Median latency (ms) of the whole model at this batch (at input `shapes` where given): at least 5 runs and
    `seconds`."""
    model = onnx.load(model_or_path, load_external_data=False) if isinstance(model_or_path, str) else model_or_path
    feeds = random_inputs(model, batch=batch, seed=1, shapes=shapes)
    return OrtTimer(threads, min_runs=5, min_seconds=seconds, max_runs=1000)(model_or_path, feeds)


def paired_latency(original, pruned, batch: int = 1, threads: int | None = None, rounds: int = 5) -> tuple:
    """(original ms, pruned ms): rounds alternate the two, one session alive at a time, and the
    pruned time is the original's median times the median per-round ratio (this kind of VM runs
    for seconds in a fast or a slow state, which pooled medians mix unevenly)."""
    a, ratios = [], []
    for _ in range(rounds):
        a.append(measure_model(original, batch, threads, seconds=0.3))
        ratios.append(measure_model(pruned, batch, threads, seconds=0.3) / a[-1])
    return statistics.median(a), statistics.median(a) * statistics.median(ratios)


def model_for(analysis, batch: int = 1, threads: int | None = None, progress=_quiet) -> LatencyModel:
    """One LatencyModel per analysis, batch and thread count (several selections share it)."""
    cached = analysis.__dict__.setdefault("_latency_models", {})
    if (batch, threads) not in cached:
        cached[batch, threads] = LatencyModel(analysis, batch, threads, progress=progress)
    return cached[batch, threads]


# -- fast widths ---------------------------------------------------------------------------------

def fast(times: dict) -> list:
    """Widths no wider width beats: keeping fewer channels than these buys no time."""
    widths = sorted(times)
    return [w for i, w in enumerate(widths)
            if all(times[v] > times[w] * (1 + FAST_TOLERANCE) for v in widths[i + 1:])]


def auto_multiple(model: LatencyModel, layers: int = 4) -> int:
    """The channel multiple the tables favour: the smallest m whose multiples are fast widths in
    most of the heaviest layers, measured on 16 consecutive output widths around half of each."""
    heavy = sorted((layer for layer in model.layers if layer.out_pair), key=lambda l: -model.layer_ms(l, {}))[:layers]
    if not heavy:
        return 1
    windows = []
    for layer in heavy:
        full_in, full_out = layer.full
        top = max(32, (full_out // 2) // 32 * 32)
        widths = [w for w in range(top - 15, top + 1) if 0 < w <= full_out]
        model.tables.measure([(layer, full_in, w) for w in widths], "latency: channel multiples")
        windows.append({w: model.tables(layer, full_in, w) for w in widths})
    for m in AUTO_MULTIPLES:
        good = sum(all(w in fast(times) for w in times if w % m == 0) for times in windows)
        if good >= 0.75 * len(windows):
            return m
    return AUTO_MULTIPLES[-1]


def grid_step(size: int, multiple: int = 1) -> int:
    """Power-of-two multiple of `multiple` giving about GRID_POINTS candidate widths."""
    step = multiple
    while size / step > GRID_POINTS:
        step *= 2
    return step



def profile(analysis, batch: int = 1, threads: int | None = None, progress=_quiet) -> dict:
    """Per-layer latency at the current widths and along the output widths a plan can give each
    layer (multiples of a power-of-two step), with the fast ones: what `spa profile` prints."""
    start = time.perf_counter()
    model = LatencyModel(analysis, batch, threads, progress=progress)
    grids = {}
    for layer in model.layers:
        full_in, full_out = layer.full
        if layer.out_pair is not None:
            step = grid_step(full_out)
            grids[layer.key(full_in, full_out)] = sorted({full_out} | set(range(step, full_out, step)))
    requests = [(layer, layer.full[0], w) for layer in model.layers for w in grids.get(layer.key(*layer.full), ())]
    progress(f"timing {len(model.tables.missing(requests))} layer widths not in the cache ({model.tables.path})")
    model.tables.measure(requests)
    rows = []
    for layer in model.layers:
        full_in, full_out = layer.full
        ms = model.layer_ms(layer, {})
        curve = {w: ms * model.tables(layer, full_in, w) / model.tables(layer, full_in, full_out)
                 for w in grids.get(layer.key(full_in, full_out), ())}
        rows.append({"name": layer.name or f"node {layer.node}", "op": layer.op + (" depthwise" if layer.depthwise else ""),
                     "in": full_out if layer.depthwise else full_in, "out": full_out, "ms": ms, "share": ms / model.whole_ms,
                     "widths": curve, "fast": fast(curve) if curve else []})
    rows.sort(key=lambda r: -r["ms"])
    return {"machine": model.tables.machine, "cache": model.tables.path, "batch": batch, "threads": threads,
            "model_ms": model.whole_ms, "layers_ms": sum(r["ms"] for r in rows), "other_ms": model.other_ms,
            "timed": model.tables.measured, "seconds": time.perf_counter() - start,
            "layers": rows}
