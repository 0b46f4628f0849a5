"""`spa analyze | prune | apply-plan`: bad input gives one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

from .errors import SpaError


class Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str):
        if not self.quiet:
            print(f"[spa {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def parser() -> argparse.ArgumentParser:
    from .importance import AGGREGATIONS, NORMALIZATIONS, available

    p = argparse.ArgumentParser(prog="spa", description="Structurally Prune Anything: make ONNX models smaller.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("model", help="input .onnx file (or .pt2, .pt, .keras, .h5, .tflite, a SavedModel directory: converted by a frontend)")
        sp.add_argument("--granularity", default="channels,heads",
                        help="comma list of what may be pruned: channels, heads (exact; default), "
                             "head-dim (instead of heads), hidden (through LayerNorm/RMSNorm: approximate)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    a = sub.add_parser("analyze", help="list channel groups, what is prunable and what froze the rest")
    common(a)
    a.add_argument("--json", action="store_true", help="machine-readable output")

    def output(sp):
        sp.add_argument("-o", "--output", required=True, help="where to write the pruned model")
        sp.add_argument("--overwrite", action="store_true", help="allow writing over the input file")
        sp.add_argument("--report", action="store_true", help="print before/after parameters, MACs, size, latency")
        sp.add_argument("--json", action="store_true", help="print the report as JSON")
        sp.add_argument("--batch", type=int, default=1,
                        help="batch size for latency: --report, --target-latency, --round-to auto (default 1)")
        sp.add_argument("--threads", type=int, metavar="T",
                        help="onnxruntime intra-op threads for latency (default: onnxruntime's, all cores)")
        sp.add_argument("--repeats", type=int, default=20, help="latency runs; the median is reported")
        sp.add_argument("--plan-out", help="write the pruning plan (JSON) here")

    pr = sub.add_parser("prune", help="prune a model to a target")
    common(pr)
    output(pr)
    target = pr.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="fraction of channels to remove (per group, or overall with --global)")
    target.add_argument("--target-params", type=float, metavar="F", help="keep this fraction of parameters")
    target.add_argument("--target-flops", "--target-macs", type=float, metavar="F", help="keep this fraction of MACs")
    target.add_argument("--target-latency", type=float, metavar="F",
                        help="keep this fraction of the onnxruntime latency measured on this machine (--batch, "
                             "--threads): per-layer latency tables (spa profile) and a knapsack over widths, "
                             "then the pruned model is timed")
    pr.add_argument("--global", dest="global_ranking", action="store_true", help="rank channels across groups")
    pr.add_argument("--criterion", default="l1", choices=available() + ["obspa"],
                    help="obspa: Optimal Brain Surgeon saliency + weight compensation from calibration inputs")
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
                         "unknown sizes otherwise default to 224 (images), 256 (signals), 4..128 tokens, 16")
    pr.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (or its directory) for a .txt --calibration")
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
    pr.add_argument("--labels", metavar="FILE",
                    help="taylor, snip, grasp, crop, obd (PyTorch autograd on --calibration inputs): class labels "
                         "(.npy / .npz / .txt), in calibration sample order; default: a 'labels' array in the "
                         "calibration .npz, else the model's own predictions")
    pr.add_argument("--aggregation", default="mean", choices=AGGREGATIONS)
    pr.add_argument("--normalization", choices=NORMALIZATIONS,
                    help="per-group score normalisation for ranking across groups (default: mean; none with obspa)")
    pr.add_argument("--recover", type=int, default=0, metavar="N",
                    help="after pruning, N steps of data-free distillation of the original into the pruned model "
                         "on the calibration inputs (PyTorch; never kept when it does not lower the held-out loss)")
    pr.add_argument("--allocation", choices=("measured", "global", "uniform"),
                    help="how the budget spreads over groups: uniform (--ratio from every group; default except "
                         "obspa), global (one ranking across groups; --ratio keeps the parameters uniform would), "
                         "measured (obspa's default: tries both on held-out calibration batches, keeps the better)")
    pr.add_argument("--max-group-ratio", type=float, default=0.9, help="never remove more of one group")
    pr.add_argument("--round-to", type=_round_to, default=1, metavar="N|auto",
                    help="keep a multiple of N channels per group; auto: the multiple the latency tables measure "
                         "fastest (default 1)")
    pr.add_argument("--ignore", action="append", default=[], metavar="NAME",
                    help="node or initializer name (glob) whose channels are kept; repeatable")
    pr.add_argument("--seed", type=int, default=0)

    pf = sub.add_parser("profile", help="per-layer onnxruntime latency and the fast channel counts of each layer")
    common(pf)
    pf.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    pf.add_argument("--threads", type=int, metavar="T", help="onnxruntime intra-op threads (default: its own)")
    pf.add_argument("--top", type=int, default=15, help="layers listed, heaviest first (default 15)")
    pf.add_argument("--plot", metavar="FILE.png", help="plot latency against width for the heaviest layers")
    pf.add_argument("--json", action="store_true", help="machine-readable output")

    ap = sub.add_parser("apply-plan", help="replay a plan written by --plan-out")
    common(ap)
    ap.add_argument("plan", help="plan JSON")
    output(ap)
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
        return run(args)
    except SpaError as exc:
        print(f"spa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spa: interrupted", file=sys.stderr)
        return 130


def run(args) -> int:
    from .graph import load_model
    from .groups import Options, analyze

    say = Progress(args.quiet)
    if args.quiet:
        from . import progress
        progress.show(False)
    if args.command == "prune":
        args.calibration_options = calibration_options(args)
    options = Options(granularity=tuple(g.strip() for g in args.granularity.split(",") if g.strip()))
    args.model = _framework_to_onnx(args.model, say)
    say(f"loading {args.model}")
    model = load_model(args.model)
    if args.command == "analyze":
        from .report import describe, format_analysis
        say("analyzing channel coupling")
        summary = describe(analyze(model, options))
        print(json.dumps(summary, indent=1) if args.json else format_analysis(summary))
        return 0
    if args.command == "profile":
        _check_latency_flags(args)
        return _profile(args, analyze(model, options), say)
    _check_latency_flags(args)
    if os.path.abspath(args.model) == os.path.abspath(args.output) and not args.overwrite:
        raise SpaError("refusing to overwrite the input model (pass --overwrite)")
    if args.command == "prune":
        result = _prune(args, model, options, say)
    else:
        from .pipeline import apply_plan
        say(f"replaying {args.plan}")
        result = apply_plan(model, args.plan, options)
    plan = result.plan.to_json(os.path.basename(args.model))
    pruned, latency_check = result.model, result.latency
    # The input's weights are on disk: drop the original (and the analysis that references it)
    # before verification loads the pruned model, so big models are not held three times.
    del result, model
    gc.collect()
    return _finish(args, pruned, plan, say, latency_check)


def _check_latency_flags(args):
    if args.batch < 1:
        raise SpaError(f"--batch must be a positive integer, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        raise SpaError(f"--threads must be a positive integer, got {args.threads}")


def _profile(args, analysis, say):
    from .latency import profile
    from .report import format_profile, plot_profile

    if args.top < 1:
        raise SpaError(f"--top must be a positive integer, got {args.top}")
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
    print(json.dumps(result, indent=1, default=str) if args.json else format_profile(result, args.top))
    return 0


def _framework_to_onnx(path, say):
    """A framework file (.pt2, TorchScript .pt, ...) is converted by its frontend first; the
    frontend (and its framework) is imported only then."""
    from spa.frontends import frontend_for, to_onnx

    if path.endswith(".onnx") or frontend_for(path) is None:
        return path
    say(f"converting {path} to ONNX")
    return to_onnx(path)


def _prune(args, model, options, say):
    from .pipeline import prune
    from .selection import Target

    target = Target(ratio=args.ratio, global_ranking=args.global_ranking, keep_params=args.target_params,
                    keep_macs=args.target_flops, latency=args.target_latency, max_group_ratio=args.max_group_ratio,
                    round_to=args.round_to, ignore=args.ignore, batch=args.batch, threads=args.threads)
    return prune(model, target, args.criterion, args.aggregation, args.normalization, options,
                 args.seed, progress=say, calibration=args.calibration_options,
                 damp=0.01 if args.damp is None else args.damp, labels=args.labels,
                 allocation=args.allocation, recover=args.recover, compensation=args.compensation)


_CALIBRATION_FLAGS = {"input_shape": "--input-shape", "tokenizer": "--tokenizer", "max_length": "--max-length",
                      "image_size": "--image-size", "image_mean": "--image-mean", "image_std": "--image-std",
                      "image_layout": "--image-layout", "image_resize": "--image-resize"}
_NO_CALIBRATION = ("l1", "l2", "fpgm", "bn-scale", "random")


def check_flags(args):
    """Options that would do nothing with the chosen criterion are refused, never ignored."""
    uses_data = args.criterion not in _NO_CALIBRATION or args.compensation not in (None, "none") or args.recover
    given = [flag for field, flag in _CALIBRATION_FLAGS.items() if getattr(args, field) is not None]
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
    return Calibration(source=args.calibration or "auto", samples=args.calibration_samples, seed=args.seed,
                       shapes=bare if bare is not None else shapes or None, tokenizer=args.tokenizer,
                       max_length=length, image_size=size,
                       mean=_floats(args.image_mean, "--image-mean"), std=_floats(args.image_std, "--image-std"),
                       layout=layout, resize=resize)


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


def _finish(args, pruned, plan, say, latency_check=None):
    from .graph import external_tensor_names
    from .pipeline import save

    say(f"verifying and writing {args.output}")
    save(pruned, args.output, external=external_tensor_names(args.model))
    if args.plan_out:
        with open(args.plan_out, "w") as f:
            json.dump(plan, f, indent=1)
        say(f"plan written to {args.plan_out}")
    if args.report or args.json:
        from .report import compare, format_comparison
        say("measuring before/after")
        report = compare(args.model, args.output, batch=args.batch, repeats=args.repeats, threads=args.threads)
        if latency_check is not None:
            report["latency_target"] = latency_check
        print(json.dumps(report, indent=1) if args.json else format_comparison(report))
        if report["after"]["latency_ms"] > report["before"]["latency_ms"]:
            warn(f"the pruned model measured slower than the original ({report['after']['latency_ms']:.3g} vs "
                 f"{report['before']['latency_ms']:.3g} ms at batch {args.batch})")
    else:
        removed = sum(g["removed"] for g in plan["groups"])
        print(f"wrote {args.output}: removed {removed} channels in {len(plan['groups'])} groups")
    if latency_check is not None:
        _latency_lines(latency_check, show=not args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
