"""The prune flags: parsed into the values the pipeline takes (a Calibration, a Target) and
refused, in one line, wherever they would have no effect: an option either takes effect or is
refused (the commands in spa.cli, spa.api.prune)."""
from __future__ import annotations

import math
import os

from .errors import SpaError


DEFAULT_GRANULARITY = ("channels", "heads")


def default_criterion(args, ruled_out: str | None = None) -> None:
    """--criterion not given: obspa, which the quality benchmarks favour, or l1 where obspa cannot
    serve (`ruled_out` says why: an output that keeps slices of the model's own weights; or
    --aggregation, which combines per-weight scores). `spa.cli._prune` announces it once the flags
    have passed."""
    args.criterion_defaulted = args.criterion is None
    if args.criterion is not None:
        return
    if ruled_out is None and args.aggregation is not None:
        ruled_out = "--aggregation combines per-weight scores, and obspa scores whole channels"
    args.criterion = "l1" if ruled_out else "obspa"
    args.criterion_note = l1_instead(ruled_out) if ruled_out else DEFAULT_CRITERION_NOTE


def l1_instead(why, default: str = "obspa") -> str:
    return f"criterion l1 (the default where {default} cannot serve: {why})"


DEFAULT_CRITERION_NOTE = ("criterion obspa (the default: OBS channel selection and weight compensation, without data; "
                          "--criterion l1 for plain weight magnitude)")
# obspa's plans give every group its own width; onnxruntime's fast convolutions (NCHWc) take blocks of
# 8 (AVX2) or 16 (AVX-512) channels. Measured (README): ResNet-18 at --ratio 0.5 on AVX-512 3.2x faster
# unrounded, 4.4x rounded to 8, 6.0x to 16; but 16 cost the OCR recognizer 0.2 exact lines on its shifted
# set, 8 nothing measurable. Groups narrower than two blocks keep exact widths (rounding would leave them
# whole or at 8 channels); from 64 instead of 16, a PP-LCNet left at 13 and 26 of its 16 and 32 channels ran
# at 0.85x the original's speed (docs/latency.md, "Narrow groups")
DEFAULT_ROUND_TO, DEFAULT_ROUND_FROM = 8, 16
# ... and 16 in groups an int8 depthwise conv reads, at any width where an int8 conv reads them: onnxruntime's int8
# kernels take depthwise convs of multiples of 16 channels only on x86, other convs of input channels in 4s
# (spa.quant.integer_conv_weights); a real-size QDQ MobileNetV2 at --ratio 0.3 ran 0.98x the original's speed with
# multiples of 8, 1.26x with 16 (docs/latency.md, "Quantized models")
DEFAULT_INTEGER_ROUNDING = 16


def rounding(args) -> tuple:
    """(round_to, round_from) of the target: --round-to as given; without it, widths that are
    multiples of 8 in groups of 16 channels or more, whatever the criterion (a plain --ratio 0.2
    leaves widths such as 205 of 256, or 13 of 16, which onnxruntime runs outside its fast layout:
    l1 made a PP-LCNet classifier 2.4x slower than the original, rounded 1.24x faster); exact widths with
    --target-latency, whose tables pick the widths."""
    if args.round_to is not None:
        return args.round_to, 1
    if args.target_latency is None:
        return DEFAULT_ROUND_TO, DEFAULT_ROUND_FROM
    return 1, 1


DEFAULT_ROUND_NOTE = (f"widths rounded to multiples of {DEFAULT_ROUND_TO} channels in groups of {DEFAULT_ROUND_FROM} "
                      "or more (the default: onnxruntime runs multiples of 8 faster; --round-to 1 keeps exact "
                      "widths; 16 is faster still on AVX-512 CPUs)")


def check_command_flags(args):
    """analyze, profile and apply-plan: options that their shared definitions give them where they
    would do nothing (apply-plan's --input-shape sizes the verification)."""
    if args.input_shape is not None and args.command != "apply-plan" and not shapes_a_conversion(args):
        why = {"analyze": "the channel analysis needs no input sizes",
               "profile": "profile times the model at its declared input sizes (a default for symbolic ones)"}
        raise SpaError(f"--input-shape has no effect on {args.model}: it shapes the conversion of a TorchScript "
                       f"input, which this is not, and {why[args.command]}")
    if args.command == "profile":
        given = {g.strip() for g in args.granularity.split(",") if g.strip()}
        if given != set(DEFAULT_GRANULARITY):
            raise SpaError("--granularity has no effect on profile, which times every Conv, Gemm and MatMul layer "
                           "along each axis a plan could change")
        if args.top is not None and args.top < 1:
            raise SpaError(f"--top must be a positive integer, got {args.top}")
    if args.command == "apply-plan":
        if args.plan_out:
            raise SpaError(f"--plan-out has no effect with apply-plan: it would write the plan it replays "
                           f"({args.plan}) again")
        check_measured(args)


def check_counts(args):
    """Counts and seeds given out of range: refused before any work."""
    for flag, field, least in (("--batch", "batch", 1), ("--threads", "threads", 1), ("--repeats", "repeats", 1),
                               ("--calibration-samples", "calibration_samples", 1), ("--seed", "seed", 0)):
        value = getattr(args, field, None)
        if value is not None and not least <= value < 2 ** 32:
            raise SpaError(f"{flag} must be {'a positive integer' if least else 'an integer >= 0'} below 2^32, "
                           f"got {value}")


def check_output_flags(args):
    """-o is required unless --dry-run, which writes nothing and measures no written model."""
    dry = getattr(args, "dry_run", False)
    if not dry and not args.output:
        raise SpaError("-o/--output is required (or --dry-run to see what would be removed)")
    given = [flag for flag, value in (("-o", args.output), ("--report", args.report), ("--plan-out", args.plan_out),
                                      ("--overwrite", args.overwrite)) if value]
    if dry and given:
        raise SpaError(f"{given[0]} has no effect with --dry-run, which writes nothing")


def prune_target(args):
    """The target flags (--ratio, --target-*, --ratio-for, ...) as a spa.selection.Target."""
    from .selection import Target

    multiple, smallest = rounding(args)
    return Target(ratio=args.ratio, global_ranking=args.global_ranking, keep_params=args.target_params,
                  keep_macs=args.target_flops, latency=args.target_latency,
                  max_group_ratio=0.9 if args.max_group_ratio is None else args.max_group_ratio,
                  round_to=multiple, round_from=smallest, ignore=args.ignore,
                  integer_rounding=DEFAULT_INTEGER_ROUNDING if smallest > 1 else 1,
                  ratios=ratios_for(args.ratio_for),
                  batch=args.batch or 1, threads=args.threads)


def check_whole_sessions(args, model):
    """--report / --json time the original and the pruned model in whole onnxruntime sessions:
    refused up front for a streamed model whose session would not fit in memory."""
    from .verify import runs_whole

    wants = [flag for flag in ("report", "json") if getattr(args, flag, False)]
    if args.command in ("prune", "apply-plan") and wants and not runs_whole(model):
        raise SpaError(f"--{'/--'.join(wants)} would time the original and the pruned model in whole onnxruntime "
                       "sessions, which do not fit in the memory available for this model; without it the pruned "
                       "model is still verified (piece by piece)")


def check_model_flags(args, model, options):
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


# --text-images' values: spa.calibration.text_lines.MODES, written here so that the CLI parser starts without
# importing spa.calibration (tests/test_text_lines.py holds them equal)
TEXT_IMAGES = ("lines", "pages", "documents", "tables")

# calibration-only flags (--input-shape also sizes verification and reports: never refused as one)
_CALIBRATION_FLAGS = {"tokenizer": "--tokenizer", "charset": "--charset", "text_images": "--text-images",
                      "turns": "--turns", "max_length": "--max-length",
                      "image_size": "--image-size", "image_mean": "--image-mean", "image_std": "--image-std",
                      "image_layout": "--image-layout", "image_resize": "--image-resize"}


NO_CALIBRATION = ("l1", "l2", "fpgm", "bn-scale", "random", "synflow")


def calibration_flags(args) -> list:
    """The calibration flags given."""
    given = [flag for field, flag in _CALIBRATION_FLAGS.items() if getattr(args, field) is not None]
    return given + [flag for flag, value in (("--calibration", args.calibration),
                                             ("--calibration-samples", args.calibration_samples)) if value is not None]


def recover_arg(text: str) -> int | str:
    """--recover's value: steps (an int) or a time ("20m"), checked by spa.pipeline.check_recovery."""
    try:
        return int(text)
    except ValueError:
        return text


def check_recover_lr(args) -> None:
    """--recover a number of steps >= 0 or a time; --recover-lr only with it, and a positive number."""
    from .pipeline import check_recovery

    check_recovery(args.recover or 0, args.recover_lr, lr_name="--recover-lr", recover_name="--recover",
                   without="--recover")


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
    uses_data = args.criterion not in NO_CALIBRATION or args.compensation not in (None, "none") or args.recover
    given = calibration_flags(args)
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
    check_recover_lr(args)
    if getattr(args, "ratios_from", None) is not None:
        from .group_sensitivity import check_prune_flags
        check_prune_flags(args)
    _check_global(args)


def check_effects(args):
    """After the values are parsed: options that this combination never uses are refused."""
    uses_data = args.criterion not in NO_CALIBRATION or args.compensation not in (None, "none") or args.recover
    if uses_data:
        _check_calibration_source(args)
    _check_ranking(args)
    _check_seed(args, uses_data)
    check_measured(args)


def _check_calibration_source(args):
    """Calibration options that the chosen source never reads."""
    from .calibration import TEXT_LINE_SOURCES, source_kind

    source = (args.calibration or "auto").strip()
    kind = source_kind(source)
    drawn = kind != "none" or bool(args.recover)  # --recover distils on synthetic inputs where there are none
    if kind == "none":
        for flag, value in (("--damp", args.damp), ("--compensation", args.compensation), ("--staged", args.staged)):
            if value is not None:
                raise SpaError(f"{flag} has no effect with --calibration none, which gives no inputs: every Hessian "
                               "is the identity and nothing is compensated")
    used = {"--calibration-samples": drawn, "--max-length": drawn and kind not in ("arrays", "images"),
            "--tokenizer": kind in ("text", "generated", None)}
    used.update({flag: kind in ("images", None) for flag in _CALIBRATION_FLAGS.values() if flag.startswith("--image-")})
    used["--charset"] = used["--text-images"] = used["--turns"] = kind is None or source in TEXT_LINE_SOURCES
    # a text recognizer's generated text lines take them too (spa.calibration refuses them for other models)
    used.update({flag: used[flag] or source in TEXT_LINE_SOURCES for flag in ("--image-mean", "--image-std")})
    reads = {"none": "which gives no inputs", "generated": "whose inputs are generated",
             "images": "a directory of images", "text": "a text file", "arrays": "whose arrays give the shapes"}
    what = {"--tokenizer": "it tokenises a .txt calibration file or shapes generated token ids",
            "--charset": "it shapes the images synthetic and inverted calibration generate as text lines",
            "--text-images": "it shapes the images synthetic and inverted calibration generate as text",
            "--turns": "it turns the text images synthetic and inverted calibration generate",
            "--max-length": "it bounds token sequences",
            "--calibration-samples": "it counts calibration inputs"}
    for field, flag in [("calibration_samples", "--calibration-samples")] + list(_CALIBRATION_FLAGS.items()):
        if getattr(args, field) is not None and not used[flag]:
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
    timed = reported or getattr(args, "target_latency", None) is not None or getattr(args, "round_to", None) == "auto"
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


def shapes_a_conversion(args) -> bool:
    """--input-shape also shapes a TorchScript input's conversion or a -o .pt2/.pt output."""
    from spa.frontends import uses_input_shape

    return uses_input_shape(args.model, getattr(args, "output", None))


def calibration_options(args, model_path=None):
    """The prune flags as a spa.calibration.Calibration; a malformed value is a SpaError. Without
    --tokenizer, the tokenizer.json beside `model_path` (used where the model takes token ids,
    announced); --tokenizer none: no tokenizer."""
    from .calibration import Calibration, looking_beside

    check_flags(args)
    shapes = parse_input_shapes(args.input_shape)
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
    tokenizer, no_tokenizer = tokenizer_flag(args.tokenizer)
    if args.labels is not None and not os.path.isfile(args.labels):
        raise SpaError(f"--labels {args.labels}: no such file")
    mean, std = _floats(args.image_mean, "--image-mean"), _floats(args.image_std, "--image-std")
    check_effects(args)
    options = Calibration(source=args.calibration or "auto", samples=args.calibration_samples, seed=args.seed or 0,
                          shapes=shapes, tokenizer=tokenizer, charset=charset_flag(args.charset),
                          text_images=args.text_images, turns=args.turns, max_length=length, image_size=size,
                          mean=mean, std=std, layout=layout, resize=resize)
    return options if no_tokenizer else looking_beside(options, model_path)


def tokenizer_flag(value) -> tuple[str | None, bool]:
    """--tokenizer's value as (an existing path or None, whether it was 'none': no tokenizer, and
    none looked for beside the model)."""
    if value is None:
        return None, False
    if value.strip().lower() == "none":
        return None, True
    if not os.path.exists(value):
        raise SpaError(f"--tokenizer {value}: no such file or directory")
    return value, False


def charset_flag(value) -> str | None:
    """--charset's value: an existing file, 'none', or None (the model's own dictionary, if any)."""
    if value is None or value.strip().lower() == "none":
        return None if value is None else "none"
    if not os.path.isfile(value):
        raise SpaError(f"--charset {value}: no such file (a dictionary, one character a line)")
    return value


def parse_input_shapes(texts):
    """--input-shape values ("1x3x224x224" or "NAME=1x3x224x224", repeatable) -> None, one shape
    (a tuple, for a single-input model) or {input name: shape}; a malformed value is a SpaError."""
    if not texts:
        return None
    named, bare = {}, None
    for text in texts:
        name, sep, dims = str(text).rpartition("=")
        shape = _sizes(dims, "x", "--input-shape", text)
        if not sep:
            bare = shape
        elif not name.strip():
            raise SpaError(f"--input-shape {text!r}: the input name before '=' is empty")
        elif name.strip() in named:
            raise SpaError(f"--input-shape given twice for input '{name.strip()}'")
        else:
            named[name.strip()] = shape
    if bare is not None and (named or len(texts) > 1):
        raise SpaError("--input-shape without an input name only for a single-input model, given once")
    return bare if bare is not None else named


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
