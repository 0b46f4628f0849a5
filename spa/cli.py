"""`spa analyze | prune | apply-plan`: bad input gives one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import warnings

from .errors import SpaError, SpaWarning


class Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str):
        if not self.quiet:
            print(f"[spa {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


_INPUT_SHAPE_HELP = ("input shape for a TorchScript .pt/.pth input, which stores none (repeatable: NAME=shape per "
                     "forward argument), and the one shape a -o .pt2/.pt output is specialised to (default: the "
                     "model's, batch 1)")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors as one line (`spa: error: ...`, exit 2), like every other refusal;
    `spa <command> --help` shows the usage."""

    def error(self, message):
        command = self.prog.split()[-1]
        where = f"{command}: " if command != "spa" else ""
        self.exit(2, f"spa: error: {where}{message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    from .importance import AGGREGATIONS, NORMALIZATIONS, available

    p = _Parser(prog="spa", description="Structurally Prune Anything: make ONNX models smaller.")
    p.add_argument("--version", action="version", version=f"spa {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("model", help="input .onnx file (or .pt2, .pt, .keras, .h5, .tflite, a SavedModel "
                                       "directory, a Hugging Face save_pretrained directory: converted by a frontend)")
        sp.add_argument("--granularity", default="channels,heads",
                        help="comma list of what may be pruned: channels, heads (exact; default), "
                             "head-dim (instead of heads), hidden (through LayerNorm/RMSNorm: approximate)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
        sp.add_argument("--verbose", action="store_true",
                        help="let TensorFlow, absl and onnxruntime log (hidden by default)")

    a = sub.add_parser("analyze", help="list channel groups, what is prunable and what froze the rest")
    common(a)
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("--sparsity", action="store_true",
                   help="also list each Conv/Gemm/MatMul weight's zeros and the N:M patterns (2:4, 1:4, 4:8) it "
                        "conforms to")
    a.add_argument("--input-shape", action="append", metavar="[NAME=]1x3x224x224", help=_INPUT_SHAPE_HELP)

    def output(sp):
        sp.add_argument("-o", "--output", help="where to write the pruned model (required unless --dry-run); for a "
                                               "Hugging Face directory, a directory unless it ends in .onnx")
        sp.add_argument("--overwrite", action="store_true",
                        help="allow writing over the input file (or into a non-empty output directory)")
        sp.add_argument("--report", action="store_true", help="print before/after parameters, MACs, size, latency")
        sp.add_argument("--json", action="store_true", help="print the report as JSON")
        sp.add_argument("--batch", type=int,
                        help="batch size for latency: --report, --target-latency, --round-to auto (default 1, "
                             "or the batch the model's inputs fix)")
        sp.add_argument("--threads", type=int, metavar="T",
                        help="onnxruntime intra-op threads for latency (default: onnxruntime's, all cores)")
        sp.add_argument("--repeats", type=int, help="latency runs of --report; the median is reported (default 20)")
        sp.add_argument("--plan-out", help="write the pruning plan (JSON) here")
        sp.add_argument("--eval", metavar="FILE.npz",
                        help="measure top-1 accuracy on the original and the pruned model: an .npz of the model's "
                             "inputs (arrays named like them; x or inputs for a single-input model) and 'labels' "
                             "(or 'y'; [N], or [N, T] per position); without labels: top-1 agreement with the "
                             "original. Shown in the summary line and --report")
        sp.add_argument("--eval-output", metavar="NAME", help="the output --eval scores (default: the first)")

    pr = sub.add_parser("prune", help="prune a model to a target")
    common(pr)
    output(pr)
    pr.add_argument("--dry-run", action="store_true",
                    help="print the layers whose width changes and the parameters and MACs kept; write nothing")
    target = pr.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, help="fraction of channels to remove (per group, or overall with --global)")
    target.add_argument("--target-params", type=float, metavar="F", help="keep this fraction of parameters")
    target.add_argument("--target-flops", "--target-macs", type=float, metavar="F", help="keep this fraction of MACs")
    target.add_argument("--target-latency", type=float, metavar="F",
                        help="keep this fraction of the onnxruntime latency measured on this machine (--batch, "
                             "--threads): per-layer latency tables (spa profile) and a knapsack over widths, "
                             "then the pruned model is timed")
    pr.add_argument("--global", dest="global_ranking", action="store_true", help="rank channels across groups")
    pr.add_argument("--ratio-for", action="append", default=[], metavar="GLOB=R",
                    help="remove the fraction R of the groups whose layers (node or initializer names) match GLOB, "
                         "instead of --ratio (repeatable; the first matching GLOB wins; 0 keeps them whole)")
    pr.add_argument("--ratios-from", metavar="FILE.json",
                    help="per-group ratios from spa sensitivity -o FILE.json: the parameters --ratio R keeps, with "
                         "sensitive groups losing less (the loss each group measured is equalised)")
    pr.add_argument("--criterion", default="l1", choices=available() + ["obspa"],
                    help="how channels are scored (default l1); obspa: Optimal Brain Surgeon saliency + weight "
                         "compensation from calibration inputs")
    pr.add_argument("--calibration", metavar="SOURCE",
                    help="obspa inputs: auto (default: inverted where the model keeps BatchNorm, else synthetic), "
                         "synthetic, none, bn, inverted (optimised against the model's BN statistics or outputs; "
                         "needs PyTorch), a .npz / .npy / directory path, "
                         "ood:noise-uniform | ood:noise-gaussian | ood:PATH")
    pr.add_argument("--calibration-samples", type=int, metavar="N",
                    help="calibration samples (default 128; fewer for models whose forward pass is expensive, "
                         "announced)")
    pr.add_argument("--input-shape", action="append", metavar="[NAME=]1x3x48x320",
                    help="calibration shape of an input (repeatable; a bare shape for a single-input model); "
                         "unknown sizes otherwise default to 224 (images), 256 (signals), 4..128 tokens, 16. "
                         "Also: " + _INPUT_SHAPE_HELP)
    pr.add_argument("--tokenizer", metavar="PATH",
                    help="tokenizer.json (or its directory): tokenises a .txt --calibration; with generated "
                         "calibration, synthetic token sequences are framed like its sentences and drawn from its "
                         "frequent words")
    pr.add_argument("--max-length", metavar="N", help="longest calibration token sequence (default 128)")
    pr.add_argument("--image-size", metavar="HxW", help="calibration images are resized to this (default: the model's)")
    pr.add_argument("--image-mean", metavar="a,b,c",
                    help="calibration image mean after scaling to [0, 1] (default ImageNet's)")
    pr.add_argument("--image-std", metavar="a,b,c", help="calibration image std (default ImageNet's)")
    pr.add_argument("--image-layout", metavar="nchw|nhwc", help="calibration image layout (default: from the model)")
    pr.add_argument("--image-resize", metavar="stretch|pad",
                    help="stretch to HxW (default) or pad: keep the aspect ratio at height H, right-pad to W")
    pr.add_argument("--damp", type=float,
                    help="OBS Hessian damping, fraction of its mean diagonal (default 0.01; with held-out inputs "
                         "10x and 100x are tried too, per layer)")
    pr.add_argument("--compensation", choices=("obs", "reference", "scale", "none"),
                    help="update the weights of layers that lose inputs from calibration inputs: obs (least squares, "
                         "the default with obspa), reference (fit the original layer outputs), scale (one factor "
                         "per kept input), none (default otherwise); works with any criterion")
    pr.add_argument("--staged", action=argparse.BooleanOptionalAction,
                    help="obs compensation: refit layer after layer on inputs re-computed through the compensated "
                         "part (--staged), or solve each from the original model's Hessians (--no-staged: no "
                         "further pass, criterion obspa); default: staged with calibration files, not with "
                         "generated inputs")
    pr.add_argument("--labels", metavar="FILE",
                    help="taylor, snip, grasp, crop, obd (PyTorch autograd on --calibration inputs): class labels "
                         "(.npy / .npz / .txt), in calibration sample order; default: a 'labels' array in the "
                         "calibration .npz, else the model's own predictions")
    pr.add_argument("--aggregation", choices=AGGREGATIONS,
                    help="how a channel's scores over the group's weights combine (default mean)")
    pr.add_argument("--normalization", choices=NORMALIZATIONS,
                    help="per-group score normalisation for ranking across groups (default: mean; none with obspa)")
    pr.add_argument("--recover", type=int, default=0, metavar="N",
                    help="after pruning, N steps of data-free distillation of the original into the pruned model "
                         "on the calibration inputs (PyTorch; never kept when it does not lower the held-out loss; "
                         "default 0)")
    pr.add_argument("--allocation", choices=("measured", "global", "uniform"),
                    help="how the budget spreads over groups: uniform (--ratio from every group; default except "
                         "obspa), global (one ranking across groups; --ratio keeps the parameters uniform would), "
                         "measured (obspa's default: tries both on held-out calibration batches, keeps the better)")
    pr.add_argument("--max-group-ratio", type=float,
                    help="never remove more than this fraction of one group (default 0.9)")
    pr.add_argument("--round-to", type=_round_to, default=1, metavar="N|auto",
                    help="keep a multiple of N channels per group; auto: the multiple the latency tables measure "
                         "fastest (default 1)")
    pr.add_argument("--ignore", action="append", default=[], metavar="NAME",
                    help="node or initializer name (glob) whose channels are kept; repeatable")
    pr.add_argument("--seed", type=int,
                    help="seed for criterion random, generated calibration inputs, --recover and --report's "
                         "deviation inputs (default 0; refused where nothing random is drawn)")

    pf = sub.add_parser("profile", help="per-layer onnxruntime latency and the fast channel counts of each layer")
    common(pf)
    pf.add_argument("--batch", type=int, help="batch size (default 1, or the batch the model's inputs fix)")
    pf.add_argument("--threads", type=int, metavar="T", help="onnxruntime intra-op threads (default: its own)")
    pf.add_argument("--top", type=int, help="layers listed, heaviest first (default 15; with --json: every layer)")
    pf.add_argument("--plot", metavar="FILE.png", help="plot latency against width for the heaviest layers")
    pf.add_argument("--json", action="store_true", help="machine-readable output")
    pf.add_argument("--input-shape", action="append", metavar="[NAME=]1x3x224x224", help=_INPUT_SHAPE_HELP)

    ap = sub.add_parser("apply-plan", help="replay a plan written by --plan-out")
    common(ap)
    ap.add_argument("plan", help="plan JSON")
    output(ap)
    ap.add_argument("--input-shape", action="append", metavar="[NAME=]1x3x224x224", help=_INPUT_SHAPE_HELP)

    se = sub.add_parser("sensitivity", help="prune each group alone at a few ratios and measure the damage "
                                            "(feeds spa prune --ratios-from)")
    common(se)
    se.add_argument("--ratios", default="0.1,0.3,0.5", metavar="R,R,...",
                    help="fractions of each group's channels removed, one trial each (default 0.1,0.3,0.5)")
    se.add_argument("--eval", metavar="FILE.npz",
                    help="the metric: top-1 accuracy (or agreement) on this .npz, as in spa prune --eval (default: "
                         "relative output deviation from the original on held-out random inputs)")
    se.add_argument("--eval-output", metavar="NAME", help="the output --eval scores (default: the first)")
    se.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    se.add_argument("--plot", metavar="FILE.png", help="plot the metric against the ratio per group")
    se.add_argument("-o", "--output", metavar="FILE.json", help="write the result (JSON) for spa prune --ratios-from")
    se.add_argument("--address", metavar="HOST:PORT",
                    help="run the trials on this Ray cluster (default: a local one when ray is installed, else "
                         "serially)")
    from .sparsify_command import add_parser
    add_parser(sub)
    from .grid_sweep import add_parser
    add_parser(sub)
    return p


def _round_to(text):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", SpaWarning)
            warnings.showwarning = _show_spa_warning
            return run(args)
    except SpaError as exc:
        print(f"spa: error: {_as_given(str(exc), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spa: interrupted", file=sys.stderr)
        return 130


def _show_spa_warning(message, category, *args, **kwargs):
    if issubclass(category, SpaWarning):
        warn(str(message))
    else:
        warnings._showwarning_orig(message, category, *args, **kwargs)


def _as_given(message: str, args) -> str:
    """A message about the temporary ONNX file a frontend wrote names the user's own file."""
    converted = getattr(args, "converted", None)
    return message.replace(converted, args.source) if converted else message


def run(args) -> int:
    from .graph import load_model
    from .groups import Options, analyze

    _quiet_frameworks(args.verbose)
    say = Progress(args.quiet)
    if args.quiet:
        from . import progress
        progress.show(False)
    _check_counts(args)
    if args.command == "sensitivity":
        from .group_sensitivity import command
        return command(args, say)
    if args.command == "sparsify":
        from .sparsify_command import command
        return command(args, say)
    if args.command == "sweep":
        from .grid_sweep import command
        return command(args, say)
    if args.command in ("prune", "apply-plan"):
        _check_output_flags(args)
    if args.command == "prune":
        args.calibration_options = calibration_options(args)
    else:
        _check_command_flags(args)
    if args.command in ("prune", "apply-plan"):
        _pretrained_output(args, say)
        _framework_output(args)
        from .paths import check_outputs  # every written path, before any work
        check_outputs(args, getattr(args, "framework_out", None) or args.output,
                      directory_output=bool(getattr(args, "pretrained_out", None)))
    options = Options(granularity=tuple(g.strip() for g in args.granularity.split(",") if g.strip()))
    args.source = args.model
    args.model = _framework_to_onnx(args.model, say, _frontend_shapes(args))
    if args.model != args.source:
        args.converted = args.model
    say(f"loading {args.source}")
    model = load_model(args.model)
    if args.command == "analyze":
        from .report import describe, format_analysis
        say("analyzing channel coupling")
        analysis = analyze(model, options)
        summary = describe(analysis)
        if args.sparsity:
            from .sparsity import format_sparsity, sparsity_report
            summary["sparsity"] = sparsity_report(model)
        print(json.dumps(summary, indent=1) if args.json else format_analysis(summary))
        if args.sparsity and not args.json:
            print(format_sparsity(summary["sparsity"]))
        for note in granularity_notes(analysis):
            warn(note)
        return 0
    _use_model_batch(args, model)
    _check_whole_sessions(args, model)
    if args.command == "profile":
        return _profile(args, analyze(model, options), say)
    _check_data_files(args, model)
    args.eval_baseline = _eval_baseline(args, args.model, say)
    if args.command == "prune":
        result = _prune(args, model, options, say)
    else:
        from .pipeline import apply_plan
        say(f"replaying {args.plan}")
        named = args.granularity != ",".join(_DEFAULT_GRANULARITY)
        result = apply_plan(model, args.plan, options if named else None)
    plan = result.plan.to_json(os.path.basename(args.source.rstrip("/\\")))
    pruned, latency_check = result.model, result.latency
    found, notes = _outcome(args, model, result, plan)
    # The input's weights are on disk: drop the original (and the analysis that references it)
    # before verification loads the pruned model, so big models are not held three times.
    del result, model
    gc.collect()
    if getattr(args, "dry_run", False):
        if args.eval_baseline is not None:
            found["eval"] = args.eval_baseline.compare(pruned)
        return _dry_run(args, found, notes, latency_check)
    return _finish(args, pruned, plan, say, latency_check, found, notes)


def _eval_baseline(args, original, say, warning=None):
    """--eval (eval= in spa.prune): the file checked against the original and measured on it before
    any pruning, so a bad file fails first; None without --eval."""
    if getattr(args, "eval", None) is None:
        if getattr(args, "eval_output", None) is not None:
            raise SpaError("--eval-output has no effect without --eval")
        return None
    from .evaluate import Baseline, shares_data

    if args.command == "prune" and shares_data(args.eval, args.calibration):
        (warning or warn)(f"--eval {args.eval} is also the --calibration data: the pruned model was fitted to it, "
                          "so its figure is optimistic (evaluate on held-out data)")
    return Baseline(original, args.eval, output=args.eval_output, progress=say)


def _outcome(args, model, result, plan) -> tuple[dict, list]:
    """(spa.report.outcome, warnings: the pipeline's and every target the plan missed)."""
    from .report import missed_target, outcome
    from .selection import limits

    found = outcome(model, result.model, plan, result.analysis.graph if result.analysis.graph.model is model else None)
    notes = list(result.warnings)
    if args.command == "prune":
        target = _target(args)
        notes += missed_target(target, found, limits(result.analysis, target, result.plan))
    notes += granularity_notes(result.analysis)
    return found, notes


_DEFAULT_GRANULARITY = ("channels", "heads")


def granularity_notes(analysis) -> list:
    """A warning for each --granularity unit beyond the default (head-dim, hidden) that this model
    has no prunable group of: sweeps over models keep the flag, and no one is left thinking it acted."""
    kinds = {g.kind for g in analysis.groups if g.prunable}
    return [f"--granularity {unit}: this model has no prunable {unit} group, so it changes nothing"
            for unit in analysis.options.granularity if unit not in _DEFAULT_GRANULARITY and unit not in kinds]


def _check_command_flags(args):
    """analyze, profile and apply-plan: options that their shared definitions give them where they
    would do nothing."""
    if args.input_shape is not None and not _shapes_a_conversion(args):
        why = {"analyze": "the channel analysis needs no input sizes",
               "profile": "profile times the model at its declared input sizes (a default for symbolic ones)",
               "apply-plan": "-o is no .pt2/.pt output to specialise either"}
        raise SpaError(f"--input-shape has no effect on {args.model}: it shapes the conversion of a TorchScript "
                       f"input, which this is not, and {why[args.command]}")
    if args.command == "profile":
        given = {g.strip() for g in args.granularity.split(",") if g.strip()}
        if given != set(_DEFAULT_GRANULARITY):
            raise SpaError("--granularity has no effect on profile, which times every Conv, Gemm and MatMul layer "
                           "along each axis a plan could change")
        if args.top is not None and args.top < 1:
            raise SpaError(f"--top must be a positive integer, got {args.top}")
    if args.command == "apply-plan":
        if args.plan_out:
            raise SpaError(f"--plan-out has no effect with apply-plan: it would write the plan it replays "
                           f"({args.plan}) again")
        check_measured(args)


def _dry_run(args, found, notes, latency_check) -> int:
    from .report import format_outcome, format_widths

    if args.json:
        print(json.dumps(found, indent=1))
    else:
        print(format_widths(found))
        print(f"dry run, nothing written: {format_outcome(found)}")
    return _closing_lines(args, notes, latency_check)


def _closing_lines(args, notes, latency_check) -> int:
    """What every prune or replay ends with, written or not: its warnings, then the latency check."""
    for note in notes:
        warn(note)
    if latency_check is not None:
        _latency_lines(latency_check, show=not args.json)
    return 0


def _pretrained_output(args, say):
    """A Hugging Face directory (config.json) in and -o naming no file format (.onnx, .pt2, .pt, ...): the
    result is written as a save_pretrained directory (spa.frontends.huggingface); the pruned ONNX goes to a
    temporary file first. With the default granularity, heads stay whole where the config cannot describe
    fewer (announced)."""
    import spa.frontends as frontends

    if not args.output or not os.path.isfile(os.path.join(args.model, "config.json")):
        return
    suffix = os.path.splitext(args.output.rstrip("/\\"))[1].lower()
    if suffix == ".onnx" or suffix in getattr(frontends, "FRAMEWORK_OUTPUTS", {}) or \
            suffix in getattr(frontends, "REFUSED_OUTPUTS", {}):
        return
    import atexit
    import shutil
    import tempfile

    from spa.frontends import huggingface

    if args.command == "prune" and (args.criterion == "obspa" or args.compensation not in (None, "none")
                                    or args.recover):
        raise SpaError(f"-o {args.output}: a Hugging Face directory keeps slices of the model's own weights, so "
                       "weights changed by obspa, --compensation or --recover cannot be carried back; write "
                       "-o NAME.onnx instead")
    huggingface.check_output(args.model, args.output, args.overwrite)
    if args.command == "prune" and args.granularity == "channels,heads":
        reloads, why = huggingface.head_pruning_reloads(args.model)
        if not reloads:
            args.granularity = "channels"
            say(f"pruning MLP channels only: {why} (-o NAME.onnx prunes heads too)")
    workdir = tempfile.mkdtemp(prefix="spa-hf-")
    atexit.register(shutil.rmtree, workdir, True)
    args.pretrained_out, args.output = args.output, os.path.join(workdir, "pruned.onnx")


def _save_pretrained(args, plan, say):
    from spa.frontends import huggingface
    from spa.frontends.torch_export import weight_map_of

    say(f"writing the Hugging Face directory {args.pretrained_out}")
    saved = huggingface.save_pruned(args.source, args.output, plan, args.pretrained_out,
                                    weight_map=weight_map_of(args.model), overwrite=args.overwrite, say=say)
    changes = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(saved["config"].items()))
    say(f"config: {changes or 'unchanged'}; reloaded with from_pretrained, max relative error "
        f"{saved['max_error']:.2g} against the pruned ONNX")


def _check_counts(args):
    """Counts and seeds given out of range: refused before any work."""
    for flag, field, least in (("--batch", "batch", 1), ("--threads", "threads", 1), ("--repeats", "repeats", 1),
                               ("--calibration-samples", "calibration_samples", 1), ("--seed", "seed", 0)):
        value = getattr(args, field, None)
        if value is not None and not least <= value < 2 ** 32:
            raise SpaError(f"{flag} must be {'a positive integer' if least else 'an integer >= 0'} below 2^32, "
                           f"got {value}")


def _check_data_files(args, model):
    """The input is loaded: -o's external data file and --plan-out against the input's data files."""
    from .graph import external_data_files, weight_bytes
    from .paths import check_data_files

    if not args.output or getattr(args, "pretrained_out", None):
        return
    if getattr(args, "framework_out", None):
        return check_data_files(args, args.framework_out, writes_data=False)
    writes = bool(external_data_files(args.model)) or weight_bytes(model) > 1_800_000_000  # as pipeline.save
    check_data_files(args, args.output, writes_data=writes)


def _check_output_flags(args):
    """-o is required unless --dry-run, which writes nothing and measures no written model."""
    dry = getattr(args, "dry_run", False)
    if not dry and not args.output:
        raise SpaError("-o/--output is required (or --dry-run to see what would be removed)")
    given = [flag for flag, value in (("-o", args.output), ("--report", args.report), ("--plan-out", args.plan_out),
                                      ("--overwrite", args.overwrite)) if value]
    if dry and given:
        raise SpaError(f"{given[0]} has no effect with --dry-run, which writes nothing")


def _use_model_batch(args, model):
    """A model whose inputs fix the batch runs at that batch, whatever --batch asks."""
    from .runtime import fixed_batch

    fixed = fixed_batch(model)
    if fixed is not None and args.batch is not None and args.batch != fixed:
        warn(f"--batch {args.batch} not used: the model's inputs fix batch {fixed}, so latency is measured at "
             f"batch {fixed}")
    args.batch = fixed or args.batch or 1


def _quiet_frameworks(verbose: bool):
    """TensorFlow, absl, tf2onnx and onnxruntime log to the terminal while a frontend converts or a
    session loads; only --verbose lets them."""
    if verbose:
        return
    import logging
    import warnings

    import onnxruntime

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("absl", "tensorflow", "tf2onnx", "keras", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(tensorflow|tf2onnx|keras|absl|onnxruntime)(\.|$)")
    onnxruntime.set_default_logger_severity(3)


def version() -> str:
    """The installed package's version, else pyproject.toml's (a source checkout)."""
    from importlib import metadata

    try:
        return metadata.version("spa")
    except metadata.PackageNotFoundError:
        import tomllib
        try:
            with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
                return tomllib.load(f)["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _profile(args, analysis, say):
    from .latency import profile
    from .report import format_profile, plot_profile

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SpaError("--plot needs matplotlib (pip install matplotlib)") from None
    result = profile(analysis, args.batch, args.threads, progress=say)
    if not result["layers"]:
        raise SpaError("no Conv, Gemm or MatMul layer with a constant weight and known input shape to profile")
    if args.plot:
        plot_profile(result, args.plot)
        say(f"plot written to {args.plot}")
    if args.json:  # every layer, or the --top heaviest
        shown = result if args.top is None else dict(result, layers=result["layers"][:args.top])
        print(json.dumps(shown, indent=1, default=str))
    else:
        print(format_profile(result, 15 if args.top is None else args.top))
    return 0


def _framework_to_onnx(path, say, input_shapes=None):
    """A framework file (.pt2, TorchScript .pt, ...) is converted by its frontend first; the
    frontend (and its framework) is imported only then."""
    from spa.frontends import frontend_for, to_onnx

    if path.endswith(".onnx") or frontend_for(path) is None:
        return path
    say(f"converting {path} to ONNX")
    return to_onnx(path, input_shapes)


def _frontend_shapes(args):
    """--input-shape as spa.frontends takes it (None, one shape or {name: shape})."""
    from spa.frontends import parse_input_shapes

    return parse_input_shapes(getattr(args, "input_shape", None))


def _framework_output(args):
    """-o small.pt2 / .pt / .keras / .h5: refused here, before any work, when that file cannot be
    written from this input (spa.frontends.check_output); else the pruned ONNX goes to a temporary
    file and _finish converts it (spa.frontends.from_onnx_file)."""
    if not args.output:
        return
    from spa.frontends import check_output

    changes_weights = args.command == "prune" and (
        args.criterion == "obspa" or args.compensation not in (None, "none") or bool(args.recover))
    if check_output(args.output, args.model, changes_weights=changes_weights) is None:
        return
    import atexit
    import shutil
    import tempfile

    workdir = tempfile.mkdtemp(prefix="spa-out-")
    atexit.register(shutil.rmtree, workdir, True)
    stem = os.path.splitext(os.path.basename(args.output))[0] or "pruned"
    args.framework_out, args.output = args.output, os.path.join(workdir, stem + ".onnx")


def _save_framework(args, plan, say):
    from spa.frontends import from_onnx_file

    say(f"converting to {args.framework_out}")
    written = from_onnx_file(args.output, args.framework_out, source=args.source, plan=plan,
                             input_shapes=_frontend_shapes(args))
    shapes = written.get("input_shapes")
    shown = f" for input {', '.join('x'.join(map(str, s)) for s in shapes.values())}" if shapes else ""
    say(f"{args.framework_out}: {written['format']}{shown}, reloaded and checked against the pruned ONNX "
        f"(max relative error {written['max_error']:.2g})")


def _target(args):
    from .selection import Target

    return Target(ratio=args.ratio, global_ranking=args.global_ranking, keep_params=args.target_params,
                  keep_macs=args.target_flops, latency=args.target_latency,
                  max_group_ratio=0.9 if args.max_group_ratio is None else args.max_group_ratio,
                  round_to=args.round_to, ignore=args.ignore, ratios=ratios_for(args.ratio_for),
                  batch=args.batch or 1, threads=args.threads)


def _check_whole_sessions(args, model):
    """--report / --json time the original and the pruned model in whole onnxruntime sessions:
    refused up front for a streamed model whose session would not fit in memory."""
    from .external_data import is_streamed
    from .verify import session_fits

    wants = [flag for flag in ("report", "json") if getattr(args, flag, False)]
    if args.command in ("prune", "apply-plan") and wants and is_streamed(model) and not session_fits(args.model):
        raise SpaError(f"--{'/--'.join(wants)} would time the original and the pruned model in whole onnxruntime "
                       "sessions, which do not fit in the memory available for this model; without it the pruned "
                       "model is still verified (piece by piece)")


def _prune(args, model, options, say):
    from .pipeline import prune

    _check_model_flags(args, model, options)
    if getattr(args, "ratios_from", None) is not None:  # per-group ratios from spa sensitivity
        from .group_sensitivity import apply
        apply(args, model, options, say)
    return prune(model, _target(args), args.criterion, args.aggregation or "mean", args.normalization, options,
                 args.seed or 0, progress=say, calibration=args.calibration_options,
                 damp=0.01 if args.damp is None else args.damp, labels=args.labels,
                 allocation=args.allocation, recover=args.recover, compensation=args.compensation,
                 staged=args.staged)


def _check_model_flags(args, model, options):
    """The prune options whose effect depends on the model: refused before any work where it has none."""
    from .calibration import generated_token_lengths, source_kind

    if args.max_length is not None and source_kind(args.calibration) in ("generated", "none") and \
            not generated_token_lengths(model):
        raise SpaError("--max-length has no effect: the model has no token-id input of free length, and "
                       f"--calibration {args.calibration or 'auto'} reads no text")
    if args.aggregation is None:
        return
    from .groups import analyze
    from .importance import aggregation_effect

    most, within, across = aggregation_effect(analyze(model, options), args.criterion)
    if most <= 1:
        raise SpaError(f"--aggregation has no effect: criterion {args.criterion} scores one weight in every prunable "
                       "group of this model, so there is nothing to combine")
    normalization = args.normalization or "mean"
    raw_across = args.global_ranking or args.target_params is not None or args.target_flops is not None or \
        args.allocation == "global"
    if args.aggregation == "sum" and not within and not (raw_across and normalization == "none" and across):
        cancels = "the latency knapsack's share of each group's scores ignores" if args.target_latency is not None \
            else "a ranking within each group ignores" if not raw_across \
            else f"--normalization {normalization} divides out" if normalization != "none" \
            else "is the same in every group of this model"
        raise SpaError(f"--aggregation sum ranks channels as mean does here: a channel's sum is its mean times the "
                       f"number of weights scoring it, a factor that {cancels} (sum differs with --normalization none "
                       "where groups with different numbers of weights are ranked together)")


_CALIBRATION_FLAGS = {"input_shape": "--input-shape", "tokenizer": "--tokenizer", "max_length": "--max-length",
                      "image_size": "--image-size", "image_mean": "--image-mean", "image_std": "--image-std",
                      "image_layout": "--image-layout", "image_resize": "--image-resize"}
_NO_CALIBRATION = ("l1", "l2", "fpgm", "bn-scale", "random", "synflow")


def check_flags(args):
    """Options that would do nothing with the chosen criterion are refused, never ignored."""
    if getattr(args, "dry_run", False) and args.recover:
        raise SpaError("--recover has no effect with --dry-run: it changes weights, not widths, and a dry run "
                       "writes nothing")
    if getattr(args, "dry_run", False) and args.compensation is not None and args.criterion != "obspa":
        raise SpaError(f"--compensation has no effect with --dry-run: it changes weights, not the channels criterion "
                       f"{args.criterion} chooses, and a dry run writes nothing")
    if getattr(args, "dry_run", False) and args.staged is not None:
        raise SpaError("--staged has no effect with --dry-run: compensation changes weights, and a dry run writes "
                       "nothing")
    uses_data = args.criterion not in _NO_CALIBRATION or args.compensation not in (None, "none") or args.recover
    given = [flag for field, flag in _CALIBRATION_FLAGS.items() if getattr(args, field) is not None
             and not (field == "input_shape" and _shapes_a_conversion(args))]
    given += [flag for flag, value in (("--calibration", args.calibration),
                                       ("--calibration-samples", args.calibration_samples)) if value is not None]
    if given and not uses_data:
        raise SpaError(f"{given[0]} has no effect with criterion {args.criterion}, which uses no calibration "
                       "inputs (use obspa, a gradient criterion, --compensation or --recover)")
    uses_obs = args.criterion == "obspa" or args.compensation not in (None, "none")
    if args.damp is not None and not uses_obs:
        raise SpaError(f"--damp has no effect with criterion {args.criterion} and no --compensation")
    if args.allocation == "measured" and args.criterion != "obspa":
        raise SpaError("--allocation measured compares OBS-compensated plans: it needs --criterion obspa")
    if args.labels is not None and args.criterion not in ("taylor", "snip", "grasp", "crop", "obd"):
        raise SpaError(f"--labels has no effect with criterion {args.criterion} (only taylor, snip, grasp, crop, obd "
                       "use labels)")
    if args.recover < 0:
        raise SpaError(f"--recover needs a number of steps >= 0, got {args.recover}")
    if getattr(args, "ratios_from", None) is not None:
        from .group_sensitivity import check_prune_flags
        check_prune_flags(args)
    _check_global(args)


def check_effects(args):
    """After the values are parsed: options that this combination never uses are refused."""
    uses_data = args.criterion not in _NO_CALIBRATION or args.compensation not in (None, "none") or args.recover
    if uses_data:
        _check_calibration_source(args)
    _check_ranking(args)
    _check_seed(args, uses_data)
    check_measured(args)


def _check_calibration_source(args):
    """Calibration options that the chosen source never reads."""
    from .calibration import source_kind

    source = (args.calibration or "auto").strip()
    kind = source_kind(source)
    drawn = kind != "none" or bool(args.recover)  # --recover distils on synthetic inputs where there are none
    shapes = args.input_shape is not None and not _shapes_a_conversion(args)
    if kind == "none":
        for flag, value in (("--damp", args.damp), ("--compensation", args.compensation), ("--staged", args.staged)):
            if value is not None:
                raise SpaError(f"{flag} has no effect with --calibration none, which gives no inputs: every Hessian "
                               "is the identity and nothing is compensated")
    used = {"--calibration-samples": drawn, "--input-shape": drawn and kind not in ("arrays", "text"),
            "--max-length": drawn and kind not in ("arrays", "images"),
            "--tokenizer": kind in ("text", "generated", None)}
    used.update({flag: kind in ("images", None) for flag in _CALIBRATION_FLAGS.values() if flag.startswith("--image-")})
    reads = {"none": "which gives no inputs", "generated": "whose inputs are generated",
             "images": "a directory of images", "text": "a text file", "arrays": "whose arrays give the shapes"}
    what = {"--tokenizer": "it tokenises a .txt calibration file or shapes generated token ids",
            "--max-length": "it bounds token sequences",
            "--input-shape": "it shapes generated inputs", "--calibration-samples": "it counts calibration inputs"}
    for field, flag in [("calibration_samples", "--calibration-samples")] + list(_CALIBRATION_FLAGS.items()):
        value = getattr(args, field) if field != "input_shape" or shapes else None
        if value is not None and not used[flag]:
            raise SpaError(f"{flag} has no effect with --calibration {source}, {reads.get(kind, '')}: "
                           f"{what.get(flag, 'it preprocesses a directory of images')}")


def _check_ranking(args):
    """--normalization, --aggregation, --allocation and --max-group-ratio where nothing they change is used."""
    across = [flag for flag, value in (("--target-params", args.target_params), ("--target-flops", args.target_flops),
                                       ("--global", args.global_ranking)) if value]
    latency = args.target_latency is not None
    allocation = args.allocation or ("measured" if args.criterion == "obspa" and args.normalization is None
                                     else "uniform")
    if (args.ratio_for or getattr(args, "ratios_from", None) is not None) and args.allocation is None:
        allocation = "uniform"  # per-layer ratios set each group's share (spa.pipeline.prune)
    if args.allocation == "uniform" and (across or latency):
        first = (across or ["--target-latency"])[0]
        raise SpaError(f"--allocation uniform has no effect with {first}, which ranks channels across groups "
                       "(a uniform share of every group is --ratio)")
    if args.allocation == "measured" and latency:
        raise SpaError("--allocation measured has no effect with --target-latency, whose knapsack spreads the budget "
                       "over groups by the latency tables")
    if args.allocation == "global" and args.criterion != "obspa" and (across or latency):
        first = (across or ["--target-latency"])[0]
        raise SpaError(f"--allocation global has no effect with {first}, which ranks channels across groups already")
    ranked_across = bool(across) or allocation in ("global", "measured")
    if args.criterion == "random":
        for flag, value in (("--aggregation", args.aggregation), ("--normalization", args.normalization)):
            if value is not None:
                raise SpaError(f"{flag} has no effect with criterion random, whose scores are random numbers")
    if args.aggregation is not None and args.criterion == "obspa":
        raise SpaError("--aggregation has no effect with criterion obspa, which adds up the saliencies of a "
                       "channel's consumers")
    if args.normalization is not None and latency and args.normalization != "standardise":
        raise SpaError(f"--normalization {args.normalization} has no effect with --target-latency: the latency "
                       "knapsack weighs the share of each group's own scores a width keeps, which rescaling does not "
                       "change (standardise shifts them)")
    if args.normalization is not None and not latency and not ranked_across:
        raise SpaError(f"--normalization has no effect with {'--ratio' if args.ratio is not None else '--ratio-for'} "
                       "and allocation uniform: every group loses its share of its own channels, ranked within the "
                       "group; normalisation matters where groups are ranked together (--global, --target-params, "
                       "--target-flops, --allocation global" + (", or obspa's measured allocation, which a "
                       "--normalization turns off" if args.criterion == "obspa" else "") + ")")
    if args.max_group_ratio is not None and not latency and not ranked_across and \
            getattr(args, "ratios_from", None) is None:  # it caps the ratios --ratios-from gives
        asked = [r for r in [args.ratio] + list(ratios_for(args.ratio_for).values()) if r is not None]
        if asked and max(asked) <= args.max_group_ratio:
            raise SpaError(f"--max-group-ratio {args.max_group_ratio:g} has no effect with a uniform "
                           f"{'--ratio' if args.ratio is not None else '--ratio-for'} {max(asked):g}: no group loses "
                           "more than that share, within the cap (it caps --global, --target-*, --allocation global "
                           "or a larger --ratio)")


def _check_seed(args, uses_data):
    drawn = (uses_data and (args.calibration or "auto").strip() != "none") or args.recover
    reported = (args.report or args.json) and not getattr(args, "dry_run", False)
    if args.seed is not None and args.criterion != "random" and not drawn and not reported:
        none = ", --calibration none draws no inputs" if uses_data else ""
        raise SpaError(f"--seed has no effect: criterion {args.criterion} is deterministic{none} and nothing else "
                       "random is drawn (it seeds criterion random, calibration inputs, --recover and --report's "
                       "deviation inputs)")


def check_measured(args):
    """--batch, --threads and --repeats set how latency is measured: refused where nothing is timed."""
    reported = (args.report or args.json) and not getattr(args, "dry_run", False)
    timed = reported or getattr(args, "target_latency", None) is not None or getattr(args, "round_to", 1) == "auto"
    timers = "--report or --json" if args.command == "apply-plan" else \
        "--report, --json, --target-latency or --round-to auto"
    for flag, value, used in (("--batch", args.batch, timed), ("--threads", args.threads, timed),
                              ("--repeats", args.repeats, reported)):
        if value is None or used:
            continue
        if getattr(args, "dry_run", False) and args.json:
            raise SpaError(f"{flag} has no effect with --dry-run, whose --json reports no latency")
        if flag == "--repeats":
            raise SpaError("--repeats has no effect without --report or --json: it sets how many runs their "
                           "latency is the median of")
        raise SpaError(f"{flag} has no effect: nothing is timed without {timers}")


def _check_global(args):
    """--global chooses between per-group and overall ratios; the other targets always rank
    channels across groups (or, for latency, allocate by the latency tables)."""
    other = [flag for flag, value in (("--target-params", args.target_params), ("--target-flops", args.target_flops),
                                      ("--target-latency", args.target_latency)) if value is not None]
    if args.global_ranking and other:
        raise SpaError(f"--global has no effect with {other[0]}, which ranks channels across groups already "
                       "(--global only changes --ratio)")


def _shapes_a_conversion(args) -> bool:
    """--input-shape also shapes a TorchScript input's conversion or a -o .pt2/.pt output."""
    from spa.frontends import uses_input_shape

    return uses_input_shape(args.model, getattr(args, "output", None))


def calibration_options(args):
    """The prune flags as a spa.calibration.Calibration; a malformed value is a SpaError."""
    from .calibration import Calibration

    check_flags(args)
    shapes, bare = {}, None
    for text in args.input_shape or []:
        name, sep, dims = text.rpartition("=")
        shape = _sizes(dims, "x", "--input-shape", text)
        if not sep:
            bare = shape
        elif not name.strip():
            raise SpaError(f"--input-shape {text!r}: the input name before '=' is empty")
        elif name.strip() in shapes:
            raise SpaError(f"--input-shape given twice for input '{name.strip()}'")
        else:
            shapes[name.strip()] = shape
    if bare is not None and (shapes or len(args.input_shape) > 1):
        raise SpaError("--input-shape without an input name only for a single-input model, given once")
    layout = args.image_layout.strip().lower() if args.image_layout is not None else None
    if layout is not None and layout not in ("nchw", "nhwc"):
        raise SpaError(f"--image-layout must be nchw or nhwc, got {args.image_layout!r}")
    resize = args.image_resize.strip().lower() if args.image_resize is not None else "stretch"
    if resize not in ("stretch", "pad"):
        raise SpaError(f"--image-resize must be stretch or pad, got {args.image_resize!r}")
    size = _sizes(args.image_size, "x", "--image-size", args.image_size) if args.image_size is not None else None
    if size is not None and len(size) != 2:
        raise SpaError(f"--image-size must be HxW, got {args.image_size!r}")
    length = _sizes(args.max_length, None, "--max-length", args.max_length)[0] if args.max_length is not None else 128
    if args.tokenizer is not None and not os.path.exists(args.tokenizer):
        raise SpaError(f"--tokenizer {args.tokenizer}: no such file or directory")
    if args.labels is not None and not os.path.isfile(args.labels):
        raise SpaError(f"--labels {args.labels}: no such file")
    mean, std = _floats(args.image_mean, "--image-mean"), _floats(args.image_std, "--image-std")
    check_effects(args)
    return Calibration(source=args.calibration or "auto", samples=args.calibration_samples, seed=args.seed or 0,
                       shapes=bare if bare is not None else shapes or None, tokenizer=args.tokenizer,
                       max_length=length, image_size=size, mean=mean, std=std, layout=layout, resize=resize)


def ratios_for(items) -> dict:
    """--ratio-for GLOB=R (repeatable) as {glob: ratio}, in the order given."""
    ratios = {}
    for text in items:
        pattern, sep, value = text.rpartition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = None
        if not sep or not pattern.strip() or ratio is None:
            raise SpaError(f"--ratio-for {text!r}: expected GLOB=R, e.g. 'layer1.*=0.2'")
        ratios[pattern.strip()] = ratio
    return ratios


def _sizes(text, sep, flag, shown):
    parts = text.strip().lower().split(sep) if sep else [text.strip()]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        example = {"--input-shape": "NAME=1x3x224x224", "--image-size": "48x320"}.get(flag, "a positive integer")
        raise SpaError(f"{flag} {shown!r}: expected positive integers like {example}")
    return sizes


def _floats(text, flag):
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SpaError(f"{flag} {text!r}: expected numbers like 0.5,0.5,0.5") from None
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values) or \
            (flag == "--image-std" and not all(v > 0 for v in values)):
        positive = " > 0" if flag == "--image-std" else ""
        raise SpaError(f"{flag} {text!r}: expected 1 or 3 finite numbers{positive}")
    return values


def warn(message: str):
    print(f"spa: warning: {message}", file=sys.stderr)


SLOWER_THAN_PREDICTED = 1.15
LATENCY_TOLERANCE = 0.1  # measured over the target by more than this (relative): not met


def _latency_lines(check: dict, show: bool = True) -> None:
    """The pipeline's last timing of the plan (spa.pipeline._meet_latency), and what is wrong with it."""
    if show:
        print(f"latency {check['original_ms']:.3g} -> {check['pruned_ms']:.3g} ms measured: {check['measured']:.3f} "
              f"of the original (target {check['target']:g}, predicted {check['predicted']:.3f}; "
              f"batch {check['batch']}, {check['threads'] or 'default'} threads)")
    if check["measured"] >= 1:
        warn(f"the pruned model measured slower than the original ({check['measured']:.2f}x its latency)")
        return
    if check["measured"] > check["target"] * (1 + LATENCY_TOLERANCE):
        warn(f"target-latency {check['target']:g} not met: the pruned model measured {check['measured']:.3f} of the "
             "original's latency")
    if check["measured"] > SLOWER_THAN_PREDICTED * check["predicted"]:
        warn(f"the pruned model measured {check['measured'] / check['predicted'] - 1:.0%} slower than predicted")


def _finish(args, pruned, plan, say, latency_check=None, found=None, notes=()):
    from .graph import external_tensor_names
    from .pipeline import save
    from .report import format_outcome, removed_by_kind

    say(f"verifying and writing {'the pruned ONNX' if getattr(args, 'framework_out', None) else args.output}")
    save(pruned, args.output, external=external_tensor_names(args.model))
    if getattr(args, "pretrained_out", None):
        _save_pretrained(args, plan, say)
    if getattr(args, "framework_out", None):
        _save_framework(args, plan, say)
    if args.plan_out:
        from .paths import write_text
        write_text(args.plan_out, json.dumps(plan, indent=1), "--plan-out")
        say(f"plan written to {args.plan_out}")
    evaluated = None
    if getattr(args, "eval_baseline", None) is not None:
        evaluated = args.eval_baseline.compare(args.output)
        if found is not None:
            found["eval"] = evaluated
    if args.report or args.json:
        from .report import compare, format_comparison
        say("measuring before/after")
        report = compare(args.model, args.output, batch=args.batch, repeats=args.repeats or 20,
                         threads=args.threads, seed=getattr(args, "seed", None) or 0)
        report["removed"] = removed_by_kind(plan)
        if evaluated is not None:
            report["eval"] = evaluated
        if latency_check is not None:
            report["latency_target"] = latency_check
        print(json.dumps(report, indent=1) if args.json else format_comparison(report))
        if report["after"]["latency_ms"] > report["before"]["latency_ms"]:
            warn(f"the pruned model measured slower than the original ({report['after']['latency_ms']:.3g} vs "
                 f"{report['before']['latency_ms']:.3g} ms at batch {report['batch']})")
    else:
        written = getattr(args, "pretrained_out", None) or getattr(args, "framework_out", None) or args.output
        print(f"wrote {written}: {format_outcome(found)}")
    return _closing_lines(args, notes, latency_check)


if __name__ == "__main__":
    sys.exit(main())
