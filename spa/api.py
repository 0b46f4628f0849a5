"""The Python one-liners: `spa.prune("model.onnx", ratio=0.5)` and `spa.analyze("model.onnx")`.

Keywords are the CLI flags' names (`--target-params` -> `target_params`, `--global` ->
`global_ranking`), checked by the same code, so an option the CLI refuses is refused here too.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import onnx

from .errors import SpaError, SpaWarning
from .groups import Analysis, Options
from .plan import Plan

ALIASES = {"target_macs": "target_flops", "global": "global_ranking"}
NOT_KEYWORDS = {"command", "model", "output", "overwrite", "quiet", "json", "report", "plan_out", "repeats",
                "dry_run", "verbose", "plan"}


@dataclass
class Pruned:
    """What `prune` returns: the pruned model (verified when saved), its plan and its figures."""
    model: onnx.ModelProto
    plan: Plan
    stats: dict  # spa.report.outcome: parameters and MACs before/after, channels and heads removed, widths;
    # "eval" with eval=: spa.evaluate.Baseline.compare
    latency: dict | None = None  # latency targets: predicted and measured fractions
    source: str | None = None  # the input file, whose external data names the output keeps
    input_shapes: tuple | dict | None = None  # the sizes the saved model is verified at: input_shape= as given,
    # else the calibration's (spa.calibration.shared_shapes)

    def save(self, path: str) -> str:
        """Verify (checker, shape inference, an onnxruntime run) and write; nothing is written on failure."""
        from .pipeline import save_result

        return save_result(self.model, path, self.source, self.input_shapes)


def analyze(model, options: Options | None = None, *, granularity: str | None = None) -> Analysis:
    """Channel groups of `model` (an .onnx path, a framework file the frontends convert, a
    ModelProto or a spa Graph): what is prunable, and which operator froze the rest."""
    from .groups import analyze as analyze_model

    if granularity is not None:
        if options is not None:
            raise SpaError("give options or granularity, not both")
        options = _options(granularity)
    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        model = _load(model, _say(False))[0]
    return analyze_model(model, options)


def prune(model, ratio: float | None = None, *, progress: bool = False, **flags) -> Pruned:
    """Prune `model` (an .onnx path, a framework file, or a ModelProto) to one target:
    `ratio`, `target_params`, `target_flops` (`target_macs`), `target_latency`, or per-layer
    `ratios={"layer1.*": 0.2}`; any other `spa prune` flag by its name (criterion="l1",
    round_to=1, ignore=["head*"], calibration="data.npz", ...), with its defaults (criterion obspa,
    widths rounded as `spa prune --help` says). `eval="val.npz"` (the model's
    inputs and `labels`; see spa.evaluate) or `eval=fn` (fn(run) -> float, run(feeds) -> the
    model's outputs) measures a metric on the original and the pruned model: `.stats["eval"]`
    {"metric", "before", "after", "difference", "samples", "source"}. Returns a `Pruned`:
    `.model`, `.plan`, `.stats`, `.save(path)`."""
    from . import cli
    from .flags import calibration_options, check_counts, default_criterion
    from . import progress as bars
    from .report import outcome

    args = _prune_args(dict(flags, ratio=ratio))
    say = _say(progress)
    with bars.showing(progress):
        check_counts(args)
        default_criterion(args)
        args.calibration_options = calibration_options(args, model if isinstance(model, (str, os.PathLike)) else None)
        shapes = cli._input_shapes(args)
        original, source = _load(model, say, shapes)
        args.model = source or "model.onnx"
        baseline = cli._eval_baseline(args, source or original, say,
                                      warning=lambda message: warnings.warn(message, stacklevel=4))
        result = cli._prune(args, original, _options(args.granularity), say)
        shapes = shapes or result.input_shapes
        stats = outcome(original, result.model, result.plan.to_json(args.model), shapes=shapes)
        if baseline is not None:
            stats["eval"] = baseline.compare(result.model)
    return Pruned(result.model, result.plan, stats, result.latency, source, shapes)


def sensitivity(model, ratios=(0.1, 0.3, 0.5), eval=None, *, granularity: str | None = None,
                eval_output: str | None = None, address: str | None = None, greater_is_better: bool = True,
                progress: bool = False) -> dict:
    """Prune each prunable group of `model` alone at each of `ratios` and measure the result
    (spa.group_sensitivity): `eval` an .npz path or fn(run) -> float (higher is better unless
    greater_is_better=False), default the relative output deviation on held-out random inputs.
    Trials run as Ray tasks when ray is installed (`address`: join that cluster), else serially.
    Returns the JSON-able result of `spa sensitivity`: "groups" (most sensitive first: "key",
    "layers", "channels", "trials" [{"ratio", "value", "loss", ...}], "sensitivity", "rank"),
    "metric", "ratios", ...; `spa.prune(model, ratio=R, ratios_from=result)` turns it into
    per-group ratios."""
    from . import progress as bars
    from . import group_sensitivity as sens
    from .evaluate import Baseline

    if not greater_is_better and not callable(eval):
        raise SpaError("greater_is_better applies to an eval function only (deviation is lower-better, an eval "
                       "file's accuracy higher-better)")
    say = _say(progress)
    with bars.showing(progress):
        original, source = _load(model, say)
        options = _options(granularity or "channels,heads")
        metric = None
        if eval is not None:
            metric = sens.Evaluated(Baseline(source or original, eval, output=eval_output, progress=say),
                                    greater_is_better)
        elif eval_output is not None:
            raise SpaError("eval_output has no effect without eval")
        name = os.path.basename(os.fspath(source).rstrip("/\\")) if source else "model.onnx"
        return sens.measure(original, ratios, options, metric, address, name, say,
                            note=lambda message: warnings.warn(message, SpaWarning, stacklevel=4))


def sweep(model, criteria="l1", targets="ratio=0.5", *, calibration=None, round_to=1, random: int | None = None,
          seed: int | None = None, eval=None, eval_output: str | None = None, greater_is_better: bool = True,
          latency: bool = False, address: str | None = None, progress: bool = False) -> dict:
    """Prune `model` at every point of criteria x targets x calibration x round_to (each a comma
    string or a sequence; targets "ratio=R", "params=F", "macs=F"), or at `random` points of that
    grid drawn with `seed`, and measure each (spa.sweep): parameters, MACs and bytes kept, the
    metric (`eval` as in spa.sensitivity, default the relative output deviation) and, with
    `latency`, the one-thread latency. Trials run as Ray tasks when ray is installed (`address`:
    join that cluster), else serially. Returns the JSON-able result of `spa sweep`: "trials"
    [{"criterion", "target", "calibration", "round_to", "params_kept", "macs_kept", "bytes",
    "value", "rank", "pareto"} or {..., "error"}], "metric", "original", "executor"."""
    from . import progress as bars
    from . import grid_sweep as sweeping

    if not greater_is_better and not callable(eval):
        raise SpaError("greater_is_better applies to an eval function only")
    points = sweeping.pick(sweeping.grid(criteria, targets, calibration, round_to), random, seed)
    sweeping.check_address(address)
    say = _say(progress)
    with bars.showing(progress):
        original, source = _load(model, say)
        metric = sweeping.metric_of(source or original, eval, eval_output, say, greater_is_better)
        name = os.path.basename(os.fspath(source).rstrip("/\\")) if source else "model.onnx"
        return sweeping.run(original, points, metric, latency, address, name=name, say=say,
                            note=lambda message: warnings.warn(message, SpaWarning, stacklevel=4))


def sparsify(model, pattern="2:4", *, amount: float | None = None, granularity: str = "weight",
             criterion: str | None = None, calibration=None, storage: str = "dense", compressed: bool = False,
             recover: int | str = 0, recover_lr: float | None = None, low_rank: int = 0, progress: bool = False):
    """Zero weights of `model` (an .onnx path, a framework file or a ModelProto) in a fine-grained
    `pattern` (spa.sparsity): "N:M" (default 2:4), "k-of-n" or "unstructured" with `amount` (the
    fraction zeroed) and, for k-of-n, `granularity` weight | kernel | filter; criterion "obs"
    (the default: OBS updates on `calibration`, a spa.calibration.Calibration or source string;
    l1 instead, announced, where spa.sparsity.default_criterion says) or "l1";
    storage "sparse" stores weights as COO where smaller; compressed: the report gives zlib sizes
    too (report["zipped_bytes"]); recover: steps of distillation from the original on the
    calibration inputs (or a time: "20m"), zeros kept (PyTorch), at peak learning rate `recover_lr`
    (None: the default); low_rank: with obs, a dense rank-`low_rank` term beside each float layer,
    written as a branch of its own (spa.low_rank). Returns a `spa.sparsity.Sparsified`:
    `.model`, `.report`, `.save(path)`."""
    from . import progress as bars
    from .calibration import Calibration, looking_beside
    from .sparsity import Pattern, Sparsified, parse_pattern
    from .sparsity import sparsify as sparsify_model

    if isinstance(pattern, Pattern) and (amount is not None or granularity != "weight"):
        raise SpaError("a Pattern carries its amount and granularity: give them there, not as keywords")
    if not isinstance(pattern, Pattern):
        pattern = parse_pattern(pattern, amount, granularity)
    if isinstance(model, (str, os.PathLike)) and (calibration is None or isinstance(calibration, (str, Calibration))):
        given = calibration if isinstance(calibration, Calibration) else Calibration(source=calibration or "auto")
        found = looking_beside(given, model)
        calibration = found if found.found_beside else calibration
    say = _say(progress)
    with bars.showing(progress):
        original, source = _load(model, say)
        sparse, report = sparsify_model(original, pattern, criterion, calibration=calibration, storage=storage,
                                        compressed=compressed, recover=recover, recover_lr=recover_lr,
                                        low_rank=low_rank, progress=say)
    return Sparsified(sparse, report, source, getattr(calibration, "shapes", None) or report.get("calibration_shapes"))


def _prune_args(flags: dict):
    """The CLI's namespace for `spa prune` with its defaults, updated from the keywords."""
    from .cli import parser

    args = parser().parse_args(["prune", "model.onnx", "-o", "pruned.onnx"])
    known = set(vars(args)) - NOT_KEYWORDS
    ratios = flags.pop("ratios", None)
    for key, value in flags.items():
        name = ALIASES.get(key, key)
        if name not in known:
            raise SpaError(f"prune() got an unknown option '{key}' (known: {', '.join(sorted(known | {'ratios'}))})")
        if value is not None:
            setattr(args, name, value)
    if ratios:
        args.ratio_for = list(args.ratio_for) + [f"{glob}={r}" for glob, r in ratios.items()]
    for name in ("ignore", "input_shape"):
        if isinstance(getattr(args, name), str):
            setattr(args, name, [getattr(args, name)])
    return args


def _load(model, say, input_shapes=None) -> tuple[onnx.ModelProto, str | None]:
    """(ModelProto, its path or None): a path is converted by its frontend first where it needs one."""
    from .cli import _framework_to_onnx
    from .graph import inline_functions, inlined_note, load_model

    if isinstance(model, onnx.ModelProto):
        if not model.functions:
            return model, None
        copy = onnx.ModelProto()  # the caller's model is left as it is
        copy.CopyFrom(model)
        inlined = inline_functions(copy)
        if inlined:
            say(f"the model: {inlined_note(inlined)}")
        return (copy if inlined else model), None
    if not isinstance(model, (str, os.PathLike)):
        raise SpaError(f"expected a model path or an onnx.ModelProto, got {type(model).__name__}")
    path = _framework_to_onnx(os.fspath(model), say, input_shapes)
    return load_model(path), path


def _options(granularity) -> Options:
    if isinstance(granularity, str):
        granularity = granularity.split(",")
    return Options(granularity=tuple(g.strip() for g in granularity if g.strip()))


def _say(show: bool):
    from .cli import Progress

    return Progress(quiet=not show)


@contextlib.contextmanager
def _bars(show: bool, bars):
    previous = bars._show
    bars.show(show)
    try:
        yield
    finally:
        bars.show(previous)
