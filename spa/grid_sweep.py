"""`spa sweep` / `spa.sweep(...)`: prune one model at every point of a grid (criteria x targets x
calibration sources x --round-to multiples), or at N random points of it, and measure each result.

A trial is one `spa.pipeline.prune` (seed 0) and, without verification, the pruned model's
parameters, MACs (batch 1) and serialized size as fractions of the original's, the metric (the
--eval accuracy, else the relative output deviation of spa.group_sensitivity.Deviation) and, with
--latency, its onnxruntime latency (batch 1, one thread). A calibration source is a point of the
grid only for the criteria that read calibration inputs; the others run once per target and
multiple. Trials run through spa.trials (Ray tasks, or serially), so a failed trial is reported and
the sweep still finishes.

The table lists the trials best metric first; `*` marks the Pareto front of metric against MACs
kept: no other trial keeps no more MACs with a metric at least as good (and one of them better).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .errors import SpaError
from .trials import check_address, run_trials

FORMAT = "spa-sweep/1"
TARGET_FIELDS = {"ratio": "ratio", "params": "keep_params", "macs": "keep_macs"}
LATENCY_SECONDS = 0.3  # --latency: timed runs per model, at least


def _quiet(message):
    pass


@dataclass(frozen=True)
class Point:
    criterion: str
    target: str  # KIND=VALUE: ratio=0.3, params=0.7, macs=0.5
    calibration: str | None  # None: the criterion reads no calibration inputs
    round_to: int

    def __str__(self):
        return f"{self.criterion} {self.target} round-to {self.round_to}" + \
            (f" calibration {self.calibration}" if self.calibration else "")


# ---------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------
def _items(values, flag: str) -> list[str]:
    """A comma list (or a sequence) as its distinct non-empty items; a repeat is refused."""
    items = [str(v).strip() for v in (values.split(",") if isinstance(values, str) else values)]
    if not items or not all(items):
        raise SpaError(f"{flag} {values!r}: expected a comma-separated list")
    repeated = next((v for i, v in enumerate(items) if v in items[:i]), None)
    if repeated is not None:
        raise SpaError(f"{flag}: {repeated} given twice (it would run the same trials twice)")
    return items


def _target(text: str) -> str:
    kind, sep, value = text.partition("=")
    try:
        fraction = float(value)
    except ValueError:
        fraction = None
    if not sep or kind.strip() not in TARGET_FIELDS or fraction is None:
        raise SpaError(f"--targets {text!r}: expected KIND=F with KIND one of {', '.join(TARGET_FIELDS)} "
                       "(e.g. ratio=0.3, params=0.7, macs=0.5)")
    if not 0 < fraction < 1:
        raise SpaError(f"--targets {text}: the fraction must be between 0 and 1 (exclusive)")
    return f"{kind.strip()}={fraction:g}"


def _round_to(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise SpaError(f"--round-to {text!r}: expected positive integers (auto needs latency tables: use spa prune)")
    return int(text)


def grid(criteria="l1", targets="ratio=0.5", calibration=None, round_to="1") -> list[Point]:
    """Every point: criteria x targets x round-to multiples, x calibration sources for the
    criteria that read calibration inputs."""
    from .flags import NO_CALIBRATION
    from .importance import available

    criteria = _items(criteria, "--criteria")
    unknown = next((c for c in criteria if c not in available() + ["obspa"]), None)
    if unknown:
        raise SpaError(f"--criteria: unknown criterion {unknown} (known: {', '.join(available() + ['obspa'])})")
    targets = [_target(t) for t in _items(targets, "--targets")]
    if len(set(targets)) < len(targets):
        raise SpaError("--targets: a target given twice (it would run the same trials twice)")
    multiples = [_round_to(r) for r in _items(str(round_to) if isinstance(round_to, int) else round_to,
                                              "--round-to")]
    sources = _items(calibration, "--calibration") if calibration is not None else None
    readers = [c for c in criteria if c not in NO_CALIBRATION]
    if sources is not None and not readers:
        raise SpaError(f"--calibration has no effect: criteria {', '.join(criteria)} read no calibration inputs "
                       "(obspa and the gradient criteria do)")
    return [Point(c, t, source, r) for c in criteria for t in targets for r in multiples
            for source in ((sources or ["auto"]) if c in readers else [None])]


def pick(points: list, random: int | None, seed: int | None) -> list:
    """`random` points of the grid drawn with `seed` (in grid order), or all of them."""
    if random is None:
        if seed is not None:
            raise SpaError("--seed has no effect without --random (it seeds which grid points are drawn)")
        return points
    if random < 1 or random >= len(points):
        raise SpaError(f"--random {random}: the grid has {len(points)} points; draw from 1 to {len(points) - 1} "
                       "(or drop --random to run them all)")
    chosen = np.random.default_rng(seed or 0).choice(len(points), random, replace=False)
    return [points[i] for i in sorted(chosen)]


# ---------------------------------------------------------------------------------------------
# a trial
# ---------------------------------------------------------------------------------------------
def figures(model: onnx.ModelProto, latency: bool, shapes: dict | None = None) -> dict:
    """Parameters, MACs (batch 1, at input `shapes` where given), serialized bytes and, with `latency`, the
    one-thread latency; layers inside If branches counted, both branches (as spa.report counts them)."""
    from .control_flow import flattened
    from .cost import concrete_shapes, count_macs, count_params
    from .latency import measure_model

    counted = flattened(model)[0]
    found = {"params": int(count_params(counted)),
             "macs": count_macs(counted, concrete_shapes(counted, batch=1, shapes=shapes)),
             "bytes": int(model.ByteSize())}
    if latency:
        found["latency_ms"] = float(measure_model(model, batch=1, threads=1, seconds=LATENCY_SECONDS, shapes=shapes))
    return found


def _trial(shared: dict, point: Point) -> dict:
    """Prune at one grid point; measure the result. Runs in a Ray worker or in this process."""
    from .groups import Options
    from .pipeline import prune
    from .selection import Target

    model = shared["model"]
    if isinstance(model, bytes):
        model = shared["model"] = onnx.load_from_string(model)
    kind, value = point.target.split("=")
    target = Target(**{TARGET_FIELDS[kind]: float(value)}, round_to=point.round_to)
    result = prune(model, target, point.criterion, calibration=point.calibration,
                   options=Options(granularity=shared["granularity"]))
    found = figures(result.model, shared["latency"], shared["shapes"])
    original = shared["original"]
    return {**found, "params_kept": found["params"] / original["params"],
            "macs_kept": found["macs"] / original["macs"] if original["macs"] else 1.0,
            "value": float(shared["metric"](result.model))}


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------
def run(model: onnx.ModelProto, points: list, metric=None, latency: bool = False, address: str | None = None,
        granularity=("channels", "heads"), name: str = "model.onnx", say=_quiet, note=_quiet) -> dict:
    """Every trial of `points` on `model`; `metric` a spa.group_sensitivity Deviation (default)
    or Evaluated. The JSON-able result of `spa sweep`."""
    from .group_sensitivity import Deviation
    from .pipeline import generated_sizes_it_runs

    shapes = generated_sizes_it_runs(model, say)  # a model that runs from some size only
    metric = metric or Deviation(model, shapes=shapes)
    original = figures(model, latency, shapes)
    say(f"{len(points)} trials, metric {metric.info['metric']}")
    shared = {"model": model.SerializeToString(), "metric": metric, "granularity": tuple(granularity),
              "latency": latency, "original": original, "shapes": shapes}
    results, executor = run_trials(_trial, shared, points, address, note, say)
    trials = [{**asdict(p), **r} for p, r in zip(points, results)]
    if all("error" in t for t in trials):
        raise SpaError(f"every trial failed; the first: {trials[0]['error']}")
    _rank(trials, metric.better == "higher")
    if latency and executor == "ray":
        note("--latency: trials are timed with one thread each while other trials run on the same cores; "
             "compare latencies within this sweep")
    return {"format": FORMAT, "model": name, "metric": metric.info, "original": original, "executor": executor,
            "trials": trials}


def _rank(trials: list, higher: bool) -> None:
    """Each trial that ran: "rank" (best metric first, then fewer MACs) and "pareto"."""
    done = [t for t in trials if "error" not in t]

    def quality(t):
        return t["value"] if higher else -t["value"]
    for rank, t in enumerate(sorted(done, key=lambda t: (-quality(t), t["macs"])), 1):
        t["rank"] = rank
    for t in done:
        t["pareto"] = not any(o["macs"] <= t["macs"] and quality(o) >= quality(t) and
                              (o["macs"] < t["macs"] or quality(o) > quality(t)) for o in done)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    m, original = result["metric"], result["original"]
    timed = "latency_ms" in original
    head = ["rank", "pareto", "criterion", "target", "calibration", "round-to", "params", "MACs", "bytes"] + \
        (["ms"] if timed else []) + [m["metric"]]
    done = sorted((t for t in result["trials"] if "error" not in t), key=lambda t: t["rank"])
    rows = [[str(t["rank"]), "*" if t["pareto"] else "", t["criterion"], t["target"], t["calibration"] or "-",
             str(t["round_to"]), f"{t['params_kept']:.1%}", f"{t['macs_kept']:.1%}", f"{t['bytes']:,}"] +
            ([f"{t['latency_ms']:.3f}"] if timed else []) + [f"{t['value']:.4g}"] for t in done]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = [f"{len(result['trials'])} trials on {result['model']} ({result['executor']}); metric: {m['metric']} "
             f"({m['better']} is better; {m['source']}; original {m['before']:.4g}); original {original['params']:,} "
             f"parameters, {original['macs']:,} MACs, {original['bytes']:,} bytes"
             + (f", {original['latency_ms']:.3f} ms" if timed else "") + "; * = Pareto front of metric vs MACs"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"failed: {Point(t['criterion'], t['target'], t['calibration'], t['round_to'])}: {t['error']}"
              for t in result["trials"] if "error" in t]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """The metric against the MACs kept, every trial a point, the Pareto front a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["metric"]
    done = [t for t in result["trials"] if "error" not in t]
    front = sorted((t for t in done if t["pareto"]), key=lambda t: t["macs_kept"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for criterion in dict.fromkeys(t["criterion"] for t in done):
        mine = [t for t in done if t["criterion"] == criterion]
        ax.scatter([t["macs_kept"] for t in mine], [t["value"] for t in mine], label=criterion, alpha=0.7)
    ax.plot([t["macs_kept"] for t in front], [t["value"] for t in front], color="tab:red", linewidth=2,
            marker="o", markerfacecolor="none", markersize=11, label="Pareto front")
    ax.set_xlabel("fraction of the MACs kept")
    ax.set_ylabel(f"{m['metric']} ({m['better']} is better)")
    ax.set_title(f"spa sweep, {result['model']}: {len(done)} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    """The sweep subcommand of spa.cli's parser."""
    sw = sub.add_parser("sweep", help="prune at every point of a grid of criteria x targets x calibration x "
                                      "round-to, measure each; a Pareto table and plot")
    sw.add_argument("model", help="input .onnx file (or a framework file a frontend converts)")
    sw.add_argument("--criteria", default="l1", metavar="C,C,...", help="criteria tried (default l1)")
    sw.add_argument("--targets", required=True, metavar="KIND=F,...",
                    help="targets tried: ratio=R (remove R of every group), params=F / macs=F (keep F of them)")
    sw.add_argument("--calibration", metavar="SOURCE,...",
                    help="calibration sources tried by the criteria that read them (obspa, gradient criteria; "
                         "default auto); as spa prune --calibration")
    sw.add_argument("--round-to", default="1", metavar="N,N,...",
                    help="multiples of channels kept per group, tried (default 1)")
    sw.add_argument("--random", type=int, metavar="N", help="run N grid points drawn at random instead of all")
    sw.add_argument("--seed", type=int, help="seed of --random's draw (default 0)")
    sw.add_argument("--eval", metavar="FILE.npz",
                    help="the metric: top-1 accuracy (or agreement) on this .npz, as in spa prune --eval (default: "
                         "relative output deviation from the original on held-out random inputs)")
    sw.add_argument("--eval-output", metavar="NAME", help="the output --eval scores (default: the first)")
    sw.add_argument("--latency", action="store_true", help="also time every pruned model (batch 1, one thread)")
    sw.add_argument("--address", metavar="HOST:PORT",
                    help="run the trials on this Ray cluster (default: a local one when ray is installed, else "
                         "serially)")
    sw.add_argument("-o", "--output", metavar="FILE.json", help="write the result (JSON)")
    sw.add_argument("--plot", metavar="FILE.png", help="plot the metric against the MACs kept, Pareto front marked")
    sw.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    sw.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    sw.add_argument("--verbose", action="store_true",
                    help="let TensorFlow, absl and onnxruntime log (hidden by default)")


def check_outputs(output: str | None, plot_path: str | None) -> None:
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SpaError("--plot needs matplotlib (pip install matplotlib)") from None
    for flag, path in (("-o", output), ("--plot", plot_path)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise SpaError(f"{flag} {path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")


def metric_of(model, eval_source, eval_output, say, greater_is_better: bool = True):
    """The Evaluated metric of `eval_source` (checked against the model now), or None (deviation)."""
    from .evaluate import Baseline
    from .group_sensitivity import Evaluated

    if eval_source is None:
        if eval_output is not None:
            raise SpaError("--eval-output has no effect without --eval")
        return None
    return Evaluated(Baseline(model, eval_source, output=eval_output, progress=say), greater_is_better)


def command(args, say) -> int:
    """spa sweep MODEL --targets ... [--criteria ...] [...]: every flag checked before any work."""
    from .cli import _framework_to_onnx
    from .graph import load_model

    points = pick(grid(args.criteria, args.targets, args.calibration, args.round_to), args.random, args.seed)
    check_address(args.address)
    check_outputs(args.output, args.plot)
    path = _framework_to_onnx(args.model, say)
    say(f"loading {args.model}")
    model = load_model(path)
    metric = metric_of(model, args.eval, args.eval_output, say)
    result = run(model, points, metric, args.latency, args.address, name=os.path.basename(args.model.rstrip("/\\")),
                 say=say, note=lambda message: print(f"spa: {message}", file=sys.stderr, flush=True))
    if args.output:
        from .paths import write_text
        write_text(args.output, json.dumps(result, indent=1) + "\n", "-o")
        say(f"sweep written to {args.output}")
    if args.plot:
        plot(result, args.plot)
        say(f"plot written to {args.plot}")
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
