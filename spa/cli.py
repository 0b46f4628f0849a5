"""`spa analyze | prune | apply-plan`: bad input gives one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings

from .errors import CalibrationRunError, SpaError, SpaWarning, first_line
from .flags import (DEFAULT_GRANULARITY, DEFAULT_ROUND_NOTE, TEXT_IMAGES, calibration_flags, calibration_options,
                    check_command_flags, check_counts, check_model_flags, check_output_flags, check_whole_sessions,
                    default_criterion, l1_instead, parse_input_shapes, prune_target, recover_arg, rounding)


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
    pr.add_argument("--criterion", choices=available() + ["obspa"],
                    help="how channels are scored (default obspa; l1 where obspa cannot serve, e.g. Keras or "
                         "Hugging Face directory outputs: announced); obspa: Optimal Brain Surgeon saliency + weight "
                         "compensation from calibration inputs (generated where none are given)")
    pr.add_argument("--calibration", metavar="SOURCE",
                    help="obspa inputs: auto (default: inverted where the model keeps BatchNorm, else synthetic), "
                         "synthetic, none, bn, inverted (optimised against the model's BN statistics or outputs; "
                         "needs PyTorch), a .npz / .npy / directory path, "
                         "ood:noise-uniform | ood:noise-gaussian | ood:PATH")
    pr.add_argument("--calibration-samples", type=int, metavar="N",
                    help="calibration samples (default 128; fewer for models whose forward pass is expensive, "
                         "announced)")
    pr.add_argument("--input-shape", action="append", metavar="[NAME=]1x3x48x320",
                    help="shape of an input (repeatable; a bare shape for a single-input model): of generated "
                         "calibration inputs (unknown sizes otherwise 224 for images, 48x320 for a text recognizer's, "
                         "256 for signals, 4..128 tokens, 16) and of the inputs the output is verified and --report "
                         "measured on (otherwise 32; a batch of 1 given leaves --batch to set it), with every "
                         "criterion. Also: " + _INPUT_SHAPE_HELP)
    pr.add_argument("--tokenizer", metavar="PATH",
                    help="tokenizer.json (or its directory): tokenises a .txt --calibration; with generated "
                         "calibration, synthetic token sequences are framed like its sentences and drawn from its "
                         "frequent words. Default: a tokenizer.json beside the model (in its folder, as optimum "
                         "exports write it), where the model takes token ids, announced; 'none': without one")
    pr.add_argument("--charset", metavar="PATH",
                    help="a text recognizer's dictionary (one character a line, or a PaddleOCR inference.yml): with "
                         "generated calibration, half of each image batch is text lines of its characters drawn with "
                         "Pillow's font. Default: the dictionary a PaddleOCR export keeps in its metadata "
                         "('character'), or the inference.yml beside the model (pages for a text detector, lines "
                         "for a recognizer), announced; 'none': noise images only")
    pr.add_argument("--text-images", choices=TEXT_IMAGES,
                    help="with generated calibration, half of each image batch is text drawn with Pillow's font: "
                         "lines (a text recognizer's input; the default where there is a dictionary) or pages "
                         "of lines (a text detector's); in the --charset characters, else Latin ones; documents: "
                         "every image a document page (a title, paragraphs, tables, figures; a layout model's, the "
                         "default where its class labels name parts of a document); tables: every image one table "
                         "(a table structure recognizer's, the default where its labels are HTML table tokens)")
    pr.add_argument("--turns", type=int, choices=(1, 2, 4),
                    help="with generated calibration, turn the text images by multiples of 360/N degrees in turn: "
                         "2 (0 and 180: a text line's direction classifier), 4 (0, 90, 180, 270: a page's "
                         "orientation classifier). Default: as many as an output of 2 or 4 class scores follows on "
                         "generated text images (an orientation classifier's), announced; else 1 (upright)")
    pr.add_argument("--max-length", metavar="N", help="longest calibration token sequence (default 128)")
    pr.add_argument("--image-size", metavar="HxW", help="calibration images are resized to this (default: the model's)")
    pr.add_argument("--image-mean", metavar="a,b,c",
                    help="calibration image mean after scaling to [0, 1] (default ImageNet's; a text recognizer's "
                         "generated text lines: PaddleOCR's 0.5; the NormalizeImage of an inference.yml taken from "
                         "beside the model)")
    pr.add_argument("--image-std", metavar="a,b,c",
                    help="calibration image std (default ImageNet's; a text recognizer's text lines: 0.5)")
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
    pr.add_argument("--recover", type=recover_arg, default=0, metavar="N|TIME",
                    help="after pruning, N steps (or TIME: 90s, 20m, 1.5h, the learning-rate schedule spread over "
                         "it) of data-free distillation of the original into the pruned model "
                         "on fresh synthetic inputs every step (synthetic calibration), on a text file's sentences "
                         "every other step and fresh synthetic ones between, or on the calibration inputs "
                         "(PyTorch; a run at the default lr that does not lower the held-out loss is tried once "
                         "more at a hundredth of it, and never kept when neither does; default 0)")
    pr.add_argument("--recover-lr", type=float, metavar="LR",
                    help="--recover's peak Adam learning rate, run once as given (default: 1e-3 for a model with "
                         "BatchNormalization, else 1e-4, and the second try; a pretrained model can need far lower, "
                         "the PP-OCRv4 recognizer 1e-5)")
    pr.add_argument("--allocation", choices=("measured", "global", "uniform"),
                    help="how the budget spreads over groups: uniform (--ratio from every group; default except "
                         "obspa), global (one ranking across groups; --ratio keeps the parameters uniform would), "
                         "measured (obspa's default: tries both on held-out calibration batches, keeps the better)")
    pr.add_argument("--max-group-ratio", type=float,
                    help="never remove more than this fraction of one group (default 0.9)")
    pr.add_argument("--round-to", type=_round_to, metavar="N|auto",
                    help="keep a multiple of N channels per group (whole-head groups are left as they are); auto: "
                         "the multiple the latency tables measure fastest (default: 8 in groups of 16 channels or "
                         "more, 16 where an int8 depthwise conv reads them, whatever the criterion; 1 with "
                         "--target-latency, whose tables pick the widths)")
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
    ap.add_argument("--input-shape", action="append", metavar="[NAME=]1x3x224x224",
                    help="sizes of the inputs the output is verified on (symbolic sizes otherwise 32). Also: " +
                         _INPUT_SHAPE_HELP)

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
    from . import progress
    try:
        with warnings.catch_warnings(), progress.showing(not args.quiet):
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
    check_counts(args)
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
        check_output_flags(args)
    if args.command == "prune":
        default_criterion(args, _keeps_own_weights(args))
        args.calibration_options = calibration_options(args, args.model)
    else:
        check_command_flags(args)
    if args.command in ("prune", "apply-plan"):
        _pretrained_output(args, say)
        _framework_output(args)
        from .paths import check_outputs  # every written path, before any work
        check_outputs(args, getattr(args, "framework_out", None) or args.output,
                      directory_output=bool(getattr(args, "pretrained_out", None)))
    options = Options(granularity=tuple(g.strip() for g in args.granularity.split(",") if g.strip()))
    args.source = args.model
    args.model = _framework_to_onnx(args.model, say, _input_shapes(args))
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
    check_whole_sessions(args, model)
    if args.command == "profile":
        return _profile(args, analyze(model, options), say)
    _check_data_files(args, model)
    args.eval_baseline = _eval_baseline(args, args.model, say)
    if args.command == "prune":
        result = _prune(args, model, options, say)
    else:
        from .pipeline import apply_plan
        say(f"replaying {args.plan}")
        named = args.granularity != ",".join(DEFAULT_GRANULARITY)
        result = apply_plan(model, args.plan, options if named else None)
    plan = result.plan.to_json(os.path.basename(args.source.rstrip("/\\")))
    pruned, latency_check = result.model, result.latency
    args.run_shapes = _input_shapes(args) or result.input_shapes
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

    found = outcome(model, result.model, plan, result.analysis.graph if result.analysis.graph.model is model else None,
                    args.run_shapes)
    notes = list(result.warnings)
    if args.command == "prune":
        target = prune_target(args)
        notes += missed_target(target, found, limits(result.analysis, target, result.plan))
    notes += granularity_notes(result.analysis)
    return found, notes


def granularity_notes(analysis) -> list:
    """A warning for each --granularity unit beyond the default (head-dim, hidden) that this model
    has no prunable group of: sweeps over models keep the flag, and no one is left thinking it acted."""
    kinds = {g.kind for g in analysis.groups if g.prunable}
    return [f"--granularity {unit}: this model has no prunable {unit} group, so it changes nothing"
            for unit in analysis.options.granularity if unit not in DEFAULT_GRANULARITY and unit not in kinds]


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
    if not _writes_hf_directory(args):
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
    from .pipeline import generated_sizes_it_runs

    analysis.input_shapes = generated_sizes_it_runs(analysis.model, say)  # a model that runs from some size only
    try:
        result = profile(analysis, args.batch, args.threads, progress=say)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise SpaError(f"onnxruntime could not run the model on generated inputs to time it: {first_line(exc, 300)}") \
            from None
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


def calibration_sizes(given, ran_at) -> str:
    """The note where verification (and the summary) take the sizes the calibration ran at (or, with
    none, would): the user gave none, and the 32 symbolic sizes default to may not run."""
    if given or not ran_at:
        return ""
    from .runtime import shapes_text
    return f" (at the input sizes calibration takes, {shapes_text(ran_at)}; --input-shape sets others)"


def _input_shapes(args):
    """--input-shape as spa.frontends and verification take it (None, one shape or {name: shape})."""
    return parse_input_shapes(getattr(args, "input_shape", None))


def _writes_hf_directory(args) -> bool:
    """A Hugging Face directory (config.json) in and -o naming no file format (.onnx, .pt2, ...)."""
    import spa.frontends as frontends

    if not args.output or not os.path.isfile(os.path.join(args.model, "config.json")):
        return False
    suffix = frontends.file_suffix(args.output)
    return not (suffix == ".onnx" or suffix in getattr(frontends, "FRAMEWORK_OUTPUTS", {}) or
                suffix in getattr(frontends, "REFUSED_OUTPUTS", {}))


def _keeps_own_weights(args) -> str | None:
    """Why -o cannot take weights changed in the pruned ONNX (a Keras file or a Hugging Face directory
    is written as slices of the input's own weights), or None."""
    import spa.frontends as frontends

    if not args.output:
        return None
    writer = getattr(frontends, "FRAMEWORK_OUTPUTS", {}).get(frontends.file_suffix(args.output), "")
    if writer.startswith("spa.frontends.tensorflow"):
        return f"-o {args.output} keeps slices of the Keras model's own weights"
    if _writes_hf_directory(args):
        return f"-o {args.output}: a Hugging Face directory keeps slices of the model's own weights"
    return None


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
                             input_shapes=_input_shapes(args) or getattr(args, "run_shapes", None))
    shapes = written.get("input_shapes")
    shown = f" for input {', '.join('x'.join(map(str, s)) for s in shapes.values())}" if shapes else ""
    say(f"{args.framework_out}: {written['format']}{shown}, reloaded and checked against the pruned ONNX "
        f"(max relative error {written['max_error']:.2g})" + "".join(f"; {n}" for n in written.get("notes", ())))


def _prune(args, model, options, say):
    check_model_flags(args, model, options)
    if getattr(args, "criterion_defaulted", False):
        _default_for_model(args, model)
        say(args.criterion_note)
    if args.round_to is None and rounding(args)[0] != 1:
        say(DEFAULT_ROUND_NOTE)
    if getattr(args, "ratios_from", None) is not None:  # per-group ratios from spa sensitivity
        from .group_sensitivity import apply
        apply(args, model, options, say)
    try:
        return _pipeline(args, model, options, say)
    except CalibrationRunError as exc:  # the default criterion on inputs the model does not take: l1 needs none
        if not getattr(args, "criterion_defaulted", False) or calibration_flags(args) or args.recover or \
                args.compensation not in (None, "none"):
            raise
        args.criterion = "l1"
        warnings.warn(l1_instead(exc), SpaWarning)
        return _pipeline(args, model, options, say)


def _pipeline(args, model, options, say):
    from .pipeline import prune

    return prune(model, prune_target(args), args.criterion, args.aggregation or "mean", args.normalization, options,
                 args.seed or 0, progress=say, calibration=args.calibration_options,
                 damp=0.01 if args.damp is None else args.damp, labels=args.labels,
                 allocation=args.allocation, recover=args.recover, compensation=args.compensation,
                 staged=args.staged, recover_lr=args.recover_lr)


def _default_for_model(args, model) -> None:
    """The default criterion where obspa cannot serve: l1 for a model whose weights stream from external data and
    would not fit in memory whole (obspa runs the whole model in one onnxruntime session), or whose generated
    calibration inputs would be the same in every sample (integer inputs that index no embedding table are zeros):
    identical samples tell OBS nothing about which channels matter (magika on 2000 files at --ratio 0.2 / 0.3 / 0.5,
    top-1 agreement: l1 0.902 / 0.873 / 0.742, obspa from zeros 0.891 / 0.850 / 0.710; docs/obspa.md). Explicit
    --criterion obspa, or calibration flags, still use obspa."""
    from .calibration import zeros_in_every_sample
    from .flags import check_flags
    from .verify import runs_whole

    if args.criterion != "obspa":
        return
    if not runs_whole(model):
        why, instead = "the model does not fit in memory whole, and obspa runs it", "runs one onnxruntime session " \
            "of the whole model"
    elif not calibration_flags(args) and (zeros := zeros_in_every_sample(model)):
        names = ", ".join(f"'{name}'" for name in zeros)
        why = (f"generated calibration inputs would be the same in every sample: integer input{'s' * (len(zeros) > 1)} "
               f"{names} index{'es' * (len(zeros) == 1)} no embedding table SPA can find, so they would be zeros, and "
               "identical samples tell OBS nothing about which channels matter; --calibration FILE gives it real "
               "inputs")
        instead = "calibrates on zeros"
    else:
        return
    args.criterion, args.criterion_note = "l1", l1_instead(why)
    try:
        check_flags(args)
    except SpaError as exc:
        raise SpaError(f"{exc} (the default criterion is l1 here: {why}; --criterion obspa {instead})") from None


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
    from .sidecars import stale_genai_heads

    say(f"verifying and writing {'the pruned ONNX' if getattr(args, 'framework_out', None) else args.output}"
        f"{calibration_sizes(_input_shapes(args), args.run_shapes)}")
    save(pruned, args.output, external=external_tensor_names(args.model), original=args.model,
         shapes=args.run_shapes)
    stale = stale_genai_heads(args.model, pruned)
    if stale:
        warn(stale)
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
                         threads=args.threads, seed=getattr(args, "seed", None) or 0, shapes=args.run_shapes)
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
