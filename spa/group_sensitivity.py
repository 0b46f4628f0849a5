"""Per-group sensitivity (`spa sensitivity`, `spa.sensitivity(...)`) and the per-group ratios it
feeds (`spa prune --ratios-from sensitivity.json --ratio R`).

A trial prunes one prunable group alone at one ratio (every other group untouched) through the
normal pipeline (`Target(ratios={pattern: r})`, criterion l1, where the pattern is a layer name that
sets the share of that group and of no other prunable group) and measures the pruned model:

- by default, the relative L2 deviation of its outputs from the original's on held-out N(0, 1)
  inputs (seed [0x5ea, 0], the stream `spa prune --report` measures deviation on, disjoint from
  calibration): ``sqrt(sum |y' - y|^2) / sqrt(sum |y|^2)`` over the float outputs; lower is better;
- with an eval source (``--eval FILE.npz`` or a callable, see spa.evaluate): that metric, higher is
  better (a callable may say otherwise: ``greater_is_better=False`` in the Python API).

The *loss* of a trial is how much worse the metric got (deviation: the deviation itself; a metric
where higher is better: before - after). A group's sensitivity is its mean loss over the ratios;
the table lists the most sensitive group first.

Trials run as Ray tasks when ``ray`` is importable (a local cluster over every core, or
``address=`` / ``--address`` to join one), else one after another (announced).

--ratios-from: the budget is the parameters that uniform R keeps. Each group's loss curve is the
measured points, starting from (0, 0), made non-decreasing, tilted by a tiny slope (so that equal
losses give equal ratios) and extended past the largest measured ratio along its last segment up to
--max-group-ratio. One loss threshold t, the same for every group, gives each group the largest
ratio whose loss is at most t (equalising the measured metric increase); t is the smallest for which
the plan keeps no more parameters than uniform R would, found by bisection. So sensitive groups
lose fewer channels and insensitive ones more, and the budget is met to within about one channel per
group. Groups are matched by a stable key (the group's first weight and axis) and their channel
counts; a file measured on another model is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np
import onnx

from .errors import SpaError
from .runtime import batch_size
from .selection import share_of
from .trials import check_address, run_trials

FORMAT = "spa-sensitivity/1"
DEFAULT_RATIOS = (0.1, 0.3, 0.5)
DEVIATION_SAMPLES = 16
DEVIATION = "relative output deviation"
TILT = 1e-6  # the slope (times the largest loss) that breaks ties between flat loss curves


def _quiet(message):
    pass


# ---------------------------------------------------------------------------------------------
# groups and the patterns that set exactly one of them
# ---------------------------------------------------------------------------------------------
def group_key(group) -> str:
    """The group's first weight and axis: stable across analyses of the same model."""
    member = next((m for m in group.members if m.is_const), group.members[0])
    return f"{member.tensor}:{member.axis}"


def _escape(name: str) -> str:
    """A glob matching exactly `name`."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def prunable_groups(analysis) -> tuple[list, list]:
    """([{id, key, pattern, kind, channels, prunable_channels, layers}], [groups no layer name
    isolates]): the groups a selection may prune, each with a layer name (escaped as a glob) whose
    --ratio-for pattern sets that group's share and no other prunable group's."""
    from .selection import _outputs_by_name

    g = analysis.graph
    names = _outputs_by_name(analysis)
    owners = defaultdict(set)
    for group in analysis.groups:
        for m in group.members:
            if not m.is_const:
                owners[m.tensor].add(group.id)
    open_groups = [gr for gr in analysis.groups
                   if gr.has_params and gr.kind in analysis.options.granularity and len(gr.prunable_atoms) >= 2]
    ids = {gr.id for gr in open_groups}
    found, isolated = [], []
    for group in open_groups:
        produced = [g.node_name(g.producer[m.tensor]) for m in group.members
                    if not m.is_const and m.tensor in g.producer]
        weights = [m.tensor for m in group.members if m.is_const]
        layers = [g.node_name(i) for i in sorted({i for w in weights for i, _ in g.consumers.get(w, [])})]
        pattern = None
        for name in dict.fromkeys(produced + weights):
            matched = set().union(*(owners[t] for t in names.get(name, ()))) & ids
            if matched == {group.id}:
                pattern = _escape(name)
                break
        entry = {"id": group.id, "key": group_key(group), "pattern": pattern, "kind": group.kind,
                 "channels": group.channels(), "prunable_channels": int(len(group.prunable_atoms)),
                 "layers": layers or list(dict.fromkeys(produced))}
        (found if pattern is not None else isolated).append(entry)
    return found, isolated


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
class Deviation:
    """Relative L2 deviation of the float outputs from the original's on held-out random inputs."""
    better = "lower"

    def __init__(self, model: onnx.ModelProto, seed: int = 0, shapes: dict | None = None):
        from .report import DEVIATION_STREAM
        from .runtime import fixed_batch, is_float, random_inputs, session

        self.feeds = random_inputs(model, batch=fixed_batch(model) or DEVIATION_SAMPLES,
                                   seed=[DEVIATION_STREAM, seed], shapes=shapes)
        outputs = session(model, quiet=True).run(None, self.feeds)
        self.keep = [i for i, o in enumerate(outputs) if is_float(np.asarray(o).dtype)]
        if not self.keep:
            raise SpaError("the model has no float output to measure a deviation on: give --eval FILE.npz")
        self.reference = [np.asarray(outputs[i], dtype=np.float64) for i in self.keep]
        self.norm = math.sqrt(sum(float(np.sum(r * r)) for r in self.reference)) or 1.0
        self.info = {"metric": DEVIATION, "better": "lower", "before": 0.0,
                     "source": f"{batch_size(self.feeds)} N(0, 1) random inputs, seed "
                               f"[{DEVIATION_STREAM:#x}, {seed}], disjoint from calibration"}

    def __call__(self, pruned: onnx.ModelProto) -> float:
        from .runtime import session

        outputs = session(pruned, quiet=True).run(None, self.feeds)
        diff = sum(float(np.sum((np.asarray(outputs[i], dtype=np.float64) - r) ** 2))
                   for i, r in zip(self.keep, self.reference))
        return math.sqrt(diff) / self.norm

    def loss(self, value: float) -> float:
        return value


class Evaluated:
    """The user's metric (spa.evaluate.Baseline): higher is better unless told otherwise."""

    def __init__(self, baseline, greater_is_better: bool = True):
        self.baseline = baseline
        baseline.progress = _quiet  # a line per trial would drown the table
        self.better = "higher" if greater_is_better else "lower"
        self.info = {"metric": baseline.before["metric"], "better": self.better,
                     "before": baseline.before["value"], "source": baseline.evaluation.source}

    def __call__(self, pruned: onnx.ModelProto) -> float:
        return self.baseline.compare(pruned)["after"]

    def loss(self, value: float) -> float:
        before = self.info["before"]
        return before - value if self.better == "higher" else value - before


# ---------------------------------------------------------------------------------------------
# trials and the executor
# ---------------------------------------------------------------------------------------------
def _trial(shared: dict, item: tuple) -> dict:
    """Prune one group alone at one ratio; measure it. Runs in a Ray worker or in this process."""
    from .cost import count_params
    from .groups import Options
    from .pipeline import prune
    from .selection import Target

    pattern, ratio = item
    model = shared["model"]
    if isinstance(model, bytes):
        model = shared["model"] = onnx.load_from_string(model)
    result = prune(model, Target(ratios={pattern: ratio}), "l1", options=Options(granularity=shared["granularity"]))
    value = shared["metric"](result.model)
    graph = result.analysis.graph
    return {"removed_channels": int(len(result.plan.removed_atoms)),
            "params_removed": int(count_params(graph) - count_params(graph, result.plan)), "value": float(value)}


# ---------------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------------
def check_ratios(ratios) -> tuple:
    if isinstance(ratios, str):
        try:
            ratios = [float(r) for r in ratios.split(",") if r.strip()]
        except ValueError:
            raise SpaError(f"--ratios {ratios!r}: expected comma-separated fractions like 0.1,0.3,0.5") from None
    try:
        ratios = tuple(sorted({float(r) for r in ratios}))
    except (TypeError, ValueError):
        raise SpaError(f"ratios must be fractions in (0, 1), got {ratios!r}") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise SpaError(f"ratios must be fractions in (0, 1), got {', '.join(f'{r:g}' for r in ratios) or 'none'}")
    return ratios


def measure(model: onnx.ModelProto, ratios=DEFAULT_RATIOS, options=None, metric=None, address: str | None = None,
            name: str = "model.onnx", say=_quiet, note=_quiet, analysis=None) -> dict:
    """The sensitivity of every prunable group of `model` (see the module's doc); `metric`: a
    Deviation (default) or an Evaluated."""
    from .cost import count_params
    from .groups import Options, analyze
    from .selection import nothing_prunable

    ratios = check_ratios(ratios)
    options = options or Options()
    if analysis is None:
        say("analyzing channel coupling")
        analysis = analyze(model, options)
    groups, isolated = prunable_groups(analysis)
    for entry in isolated:
        note(f"group {entry['id']} ({', '.join(entry['layers'][:3])}) not measured: no layer name sets its share "
             "alone (its layers also produce another group's channels); --ratios-from leaves it at --ratio")
    if not groups:
        raise nothing_prunable(analysis)
    if metric is None:
        from .pipeline import generated_sizes_it_runs

        metric = Deviation(model, shapes=generated_sizes_it_runs(model, say))  # a model that runs from some size
    items, where = [], []
    for gi, entry in enumerate(groups):
        entry["trials"] = []
        for ratio in ratios:
            if share_of(ratio, entry["prunable_channels"]) == 0:  # removes no channel: nothing to run
                entry["trials"].append({"ratio": ratio, "removed_channels": 0, "params_removed": 0,
                                        "value": metric.info["before"]})
                continue
            entry["trials"].append(None)
            items.append((entry["pattern"], ratio))
            where.append((gi, len(entry["trials"]) - 1))
    say(f"{len(groups)} prunable groups x {len(ratios)} ratios: {len(items)} trials, metric {metric.info['metric']}")
    shared = {"model": model.SerializeToString(), "metric": metric, "granularity": tuple(options.granularity)}
    results, executor = run_trials(_trial, shared, items, address, note, say) if items else ([], "none")
    failed = next((r["error"] for r in results if "error" in r), None)
    if failed:
        raise SpaError(f"a sensitivity trial failed: {failed}")
    for (gi, ti), (_, ratio), result in zip(where, items, results):
        groups[gi]["trials"][ti] = {"ratio": ratio, **result}
    for entry in groups:
        for trial in entry["trials"]:
            trial["loss"] = float(metric.loss(trial["value"]))
        entry["sensitivity"] = float(np.mean([t["loss"] for t in entry["trials"]]))
    groups.sort(key=lambda e: (-e["sensitivity"], -e["trials"][-1]["loss"], e["id"]))
    for rank, entry in enumerate(groups, 1):
        entry["rank"] = rank
    return {"format": FORMAT, "model": name, "params": int(count_params(analysis.graph)),
            "granularity": list(options.granularity), "ratios": list(ratios), "metric": metric.info,
            "criterion": "l1", "executor": executor, "groups": groups,
            "not_measured": [{k: e[k] for k in ("id", "key", "kind", "channels", "layers")} for e in isolated]}


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    m = result["metric"]
    lines = [f"sensitivity of {len(result['groups'])} prunable groups to pruning each alone (criterion l1); "
             f"metric: {m['metric']} ({m['better']} is better; {m['source']}; original {m['before']:.4g})"]
    head = ["rank", "group", "channels", "layers"] + [f"r={r:g}" for r in result["ratios"]]
    rows = []
    for e in result["groups"]:
        layers = ", ".join(e["layers"][:3]) + (" ..." if len(e["layers"]) > 3 else "")
        rows.append([str(e["rank"]), str(e["id"]), str(e["channels"]), layers[:48]] +
                    [f"{t['value']:.4g}" for t in e["trials"]])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if result["groups"]:
        top = result["groups"][0]
        lines.append(f"most sensitive: group {top['id']} ({', '.join(top['layers'][:3])}); "
                     "--ratios-from FILE in spa prune gives sensitive groups smaller ratios")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """The metric against the ratio, one line per group; the most sensitive highlighted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["metric"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for e in reversed(result["groups"]):
        xs = [0.0] + [t["ratio"] for t in e["trials"]]
        ys = [m["before"]] + [t["value"] for t in e["trials"]]
        label = f"group {e['id']}: {', '.join(e['layers'][:2])[:40]}"
        if e["rank"] == 1:
            ax.plot(xs, ys, marker="o", color="tab:red", linewidth=2.5, zorder=3, label=label + " (most sensitive)")
        else:
            ax.plot(xs, ys, marker=".", linewidth=1, alpha=0.6, label=label if e["rank"] <= 8 else None)
    ax.set_xlabel("fraction of the group's channels removed (the group alone)")
    ax.set_ylabel(f"{m['metric']} ({m['better']} is better)")
    ax.set_title(f"per-group sensitivity, {result['model']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# --ratios-from
# ---------------------------------------------------------------------------------------------
def load(source) -> dict:
    """A sensitivity result: a dict (spa.sensitivity's) or the path of its JSON."""
    if isinstance(source, dict):
        data = source
    else:
        try:
            with open(source) as f:
                data = json.load(f)
        except OSError as exc:
            raise SpaError(f"--ratios-from {source}: {exc.strerror or exc}") from None
        except ValueError:
            raise SpaError(f"--ratios-from {source}: not JSON (write one with spa sensitivity -o FILE.json)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("groups"), list):
        raise SpaError(f"--ratios-from {source if not isinstance(source, dict) else 'dict'}: not a spa sensitivity "
                       f"result (format {FORMAT})")
    return data


def _curve(trials: list, cap: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(losses, ratios) of a group's curve: from (0, 0), non-decreasing, tilted, extended to cap."""
    rs = [0.0] + [float(t["ratio"]) for t in trials if float(t["ratio"]) <= cap]
    ls = np.maximum.accumulate([0.0] + [max(float(t["loss"]), 0.0) for t in trials if float(t["ratio"]) <= cap])
    ls = ls + TILT * scale * np.asarray(rs)
    if rs[-1] < cap:
        slope = (ls[-1] - ls[-2]) / (rs[-1] - rs[-2]) if len(rs) > 1 else TILT * scale
        rs, ls = rs + [cap], np.append(ls, ls[-1] + max(slope, TILT * scale) * (cap - rs[-1]))
    return np.asarray(ls, dtype=np.float64), np.asarray(rs, dtype=np.float64)


def ratios_from(analysis, data: dict, target, say=_quiet, source: str = "") -> dict:
    """{pattern: ratio} for every measured group (see the module's doc): the plan keeps no more
    parameters than uniform `target.ratio` would, and sensitive groups lose less."""
    from .cost import count_params
    from .selection import Selector

    shown = f"--ratios-from {source}" if source else "ratios_from"
    groups, _ = prunable_groups(analysis)
    here = {e["key"]: e for e in groups}
    measured = {e.get("key"): e for e in data["groups"] if isinstance(e, dict)}
    if list(data.get("granularity") or []) != list(analysis.options.granularity):
        raise SpaError(f"{shown}: measured with --granularity {','.join(data.get('granularity') or [])}, this run "
                       f"prunes {','.join(analysis.options.granularity)}")
    missing = [k for k in measured if k not in here]
    bad = [k for k, e in measured.items() if k in here and (e.get("channels") != here[k]["channels"])]
    unmeasured = [k for k in here if k not in measured]
    if missing or bad or unmeasured:
        what = (f"its group {missing[0]} is not a prunable group of this model" if missing else
                f"group {bad[0]} has {measured[bad[0]].get('channels')} channels there, "
                f"{here[bad[0]]['channels']} here" if bad else f"it has no entry for group {unmeasured[0]}")
        raise SpaError(f"{shown} does not match this model: {what} (measured on {data.get('model', '?')}; run spa "
                       "sensitivity on this model)")
    R, cap = float(target.ratio), min(float(target.max_group_ratio), 0.99)
    scale = max([max(float(t["loss"]), 0.0) for e in measured.values() for t in e["trials"]] + [0.0]) or 1.0
    curves = {k: _curve(measured[k]["trials"], cap, scale) for k in here}
    base = dataclasses.replace(target, round_to=1 if target.round_to == "auto" else target.round_to)
    zeros = {g.id: np.zeros(len(g.atoms)) for g in analysis.groups}
    full = count_params(analysis.graph)

    def kept(ratios: dict) -> int:
        t = dataclasses.replace(base, ratio=R, ratios=ratios)
        plan = Selector(analysis, zeros, t).select()
        return count_params(analysis.graph, plan)

    def at(threshold: float) -> dict:
        return {here[k]["pattern"]: float(np.interp(threshold, *curves[k])) for k in here}

    budget = kept({})  # uniform R (with the groups no pattern isolates)
    lo, hi = 0.0, max(float(c[0][-1]) for c in curves.values())
    if kept(at(hi)) > budget:
        raise SpaError(f"{shown}: --max-group-ratio {cap:g} leaves no way to meet the parameter budget of --ratio "
                       f"{R:g}")
    for _ in range(50):
        mid = (lo + hi) / 2
        if kept(at(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    chosen = at(hi)
    beyond = [k for k in here if chosen[here[k]["pattern"]] > max(float(t["ratio"]) for t in measured[k]["trials"])
              + 1e-9]
    say(f"ratios from {source or 'the sensitivity result'}: loss threshold {hi:.4g} ({data['metric']['metric']}); "
        f"parameters kept {kept(chosen) / full:.1%} (uniform {R:g}: {budget / full:.1%}); ratios "
        + ", ".join(f"{here[k]['layers'][0] if here[k]['layers'] else k} {chosen[here[k]['pattern']]:.2f}"
                    for k in sorted(here, key=lambda k: chosen[here[k]['pattern']])))
    if beyond:
        say(f"ratios from: {len(beyond)} of {len(here)} groups go past the largest measured ratio (loss "
            "extrapolated along the last measured segment)")
    return chosen


def check_prune_flags(args):
    """spa prune --ratios-from: the flags it works with, before any work."""
    if args.ratio is None or args.global_ranking:
        raise SpaError("--ratios-from needs --ratio R (its parameter budget is what removing R of every group "
                       "keeps), without --global")
    if args.ratio_for:
        raise SpaError("--ratios-from sets every group's ratio: --ratio-for would override it (give one or the other)")
    if args.allocation not in (None, "uniform"):
        raise SpaError(f"--allocation {args.allocation} has no effect with --ratios-from, which sets every group's "
                       "share")
    load(args.ratios_from)


def apply(args, model, options, say=_quiet):
    """spa prune --ratios-from: args.ratio_for set from the file."""
    from .groups import analyze

    data = load(args.ratios_from)  # its flags were checked with the others (spa.flags.check_flags)
    from .flags import prune_target
    chosen = ratios_from(analyze(model, options), data, prune_target(args), say,
                         args.ratios_from if isinstance(args.ratios_from, str) else "")
    args.ratio_for = [f"{pattern}={ratio!r}" for pattern, ratio in chosen.items()]


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def command(args, say) -> int:
    """spa sensitivity MODEL [--eval FILE.npz] [--ratios 0.1,0.3,0.5] [--json] [--plot F.png] [-o F.json]."""
    from .cli import _framework_to_onnx, granularity_notes, warn
    from .graph import load_model
    from .groups import Options, analyze

    ratios = check_ratios(args.ratios)
    if args.eval_output is not None and args.eval is None:
        raise SpaError("--eval-output has no effect without --eval")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SpaError("--plot needs matplotlib (pip install matplotlib)") from None
    check_address(args.address)
    options = Options(granularity=tuple(x.strip() for x in args.granularity.split(",") if x.strip()))
    for flag, path in (("-o", args.output), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise SpaError(f"{flag} {path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")
    source = args.model
    path = _framework_to_onnx(source, say)
    say(f"loading {source}")
    model = load_model(path)
    metric = None
    if args.eval is not None:
        from .evaluate import Baseline
        metric = Evaluated(Baseline(model, args.eval, output=args.eval_output, progress=say))
    say("analyzing channel coupling")
    analysis = analyze(model, options)
    result = measure(model, ratios, options, metric, args.address, os.path.basename(source.rstrip("/\\")), say,
                     note=lambda message: print(f"spa: {message}", file=sys.stderr, flush=True), analysis=analysis)
    text = json.dumps(result, indent=1)
    if args.output:
        from .paths import write_text
        write_text(args.output, text + "\n", "-o")
        say(f"sensitivity written to {args.output} (spa prune --ratios-from {args.output} --ratio R)")
    if args.plot:
        plot(result, args.plot)
        say(f"plot written to {args.plot}")
    print(text if args.json else format_table(result))
    for note in granularity_notes(analysis):
        warn(note)
    return 0
