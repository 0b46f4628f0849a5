"""`spa sparsify MODEL -o OUT --pattern unstructured|N:M|k-of-n`: fine-grained sparsity (spa.sparsity),
verified and written like every SPA output; a bad request is one `spa: error:` line (exit 2)."""
from __future__ import annotations

import json

from .errors import SpaError
from .flags import TEXT_IMAGES, recover_arg

CALIBRATION_FLAGS = (("--calibration", "calibration"), ("--calibration-samples", "calibration_samples"),
                     ("--tokenizer", "tokenizer"), ("--charset", "charset"), ("--text-images", "text_images"),
                     ("--turns", "turns"),
                     ("--input-shape", "input_shape"))  # --input-shape also sizes the verification


def add_parser(sub) -> None:
    """The sparsify subcommand of spa.cli's parser."""
    sp = sub.add_parser("sparsify", help="zero weights in a fine-grained pattern (2:4, k-of-n, unstructured); "
                                         "shapes stay")
    sp.add_argument("model", help="input .onnx file (or a framework file a frontend converts)")
    sp.add_argument("-o", "--output", help="where to write the sparsified ONNX model")
    sp.add_argument("--pattern", default="2:4", metavar="unstructured|N:M|k-of-n",
                    help="N:M: at most N non-zeros in every M weights along the input channels (default 2:4); "
                         "k-of-n: keep 1 - --amount of each row, kernel set or filter set; unstructured: zero the "
                         "--amount smallest weights of each layer")
    sp.add_argument("--granularity", choices=("weight", "kernel", "filter"),
                    help="what k-of-n keeps k of: weights of an output row (default), input kernels of a filter, "
                         "filters of a layer (zeroed, not removed)")
    sp.add_argument("--amount", type=float, metavar="A", help="fraction zeroed, in [0, 1) (unstructured, k-of-n)")
    sp.add_argument("--criterion", choices=("l1", "obs"),
                    help="obs (default): choose and compensate with OBS updates on calibration inputs "
                         "(SparseGPT-style; l1 instead, announced, where the model does not fit in memory whole "
                         "or does not run on generated calibration inputs); l1: keep the largest |w|")
    sp.add_argument("--calibration", metavar="SOURCE", help="calibration inputs for --criterion obs (as spa prune)")
    sp.add_argument("--calibration-samples", type=int, metavar="N",
                    help="calibration inputs drawn (--criterion obs; default 128, and 1024 generated token sequences "
                         "for a token model; fewer where a pass would cost too much, announced)")
    sp.add_argument("--tokenizer", metavar="PATH",
                    help="as spa prune: tokenises a .txt --calibration, shapes generated token ids like its sentences "
                         "(default: a tokenizer.json beside the model, announced; 'none': without one)")
    sp.add_argument("--charset", metavar="PATH",
                    help="as spa prune: a text recognizer's dictionary; three quarters of each generated image "
                         "batch are text lines of its characters (default: the dictionary in a PaddleOCR export's "
                         "metadata, announced; 'none': noise images only)")
    sp.add_argument("--text-images", choices=TEXT_IMAGES,
                    help="as spa prune: generated image batches are partly text lines (a recognizer's input), "
                         "pages of lines (a detector's), document pages (a layout model's) or tables (a table "
                         "structure recognizer's)")
    sp.add_argument("--turns", type=int, choices=(1, 2, 4),
                    help="as spa prune: generated text images turned by multiples of 360/N degrees in turn (default: "
                         "as many as an orientation classifier's class scores follow, announced; else 1)")
    sp.add_argument("--input-shape", action="append", metavar="[NAME=]1x3x224x224",
                    help="input sizes: of generated calibration inputs (--criterion obs) and of the inputs the "
                         "output is verified on (symbolic sizes otherwise 32)")
    sp.add_argument("--recover", type=recover_arg, metavar="N|TIME",
                    help="then N steps (or TIME: 90s, 20m, 1.5h) of distillation from the original on the "
                         "calibration inputs (PyTorch), every zero kept; kept only if the held-out loss falls")
    sp.add_argument("--recover-lr", type=float, metavar="LR",
                    help="--recover's peak Adam learning rate, run once as given (default: as spa prune --recover)")
    sp.add_argument("--low-rank", type=int, metavar="R", default=0,
                    help="with obs, also a dense rank-R term beside each float MatMul, Gemm and Conv, fitted to what "
                         "the pattern costs the layer and written as a branch added to its output (the zeros stay "
                         "exact; R (rows + columns) more weights a layer): MiniLM 2:4, no data, rank 32: 0.874 -> "
                         "0.948 mean cosine for 12.5 %% more of its layers' dense weights")
    sp.add_argument("--storage", choices=("dense", "sparse"), default="dense",
                    help="dense (default) or sparse: weights that get smaller as COO are stored so (onnxruntime "
                         "densifies them at load)")
    sp.add_argument("--report", action="store_true",
                    help="print the per-layer sparsity and sizes, zlib-compressed sizes included")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.add_argument("--overwrite", action="store_true", help="allow -o to be the input model itself")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    sp.add_argument("--verbose", action="store_true",
                    help="let TensorFlow, absl and onnxruntime log (hidden by default)")


def command(args, say) -> int:
    """Check every flag, sparsify, verify and write, then print the summary (or the report)."""
    from .cli import _check_data_files, _framework_to_onnx, calibration_sizes, warn
    from .frontends import frontend_for
    from .graph import external_tensor_names, load_model
    from .paths import check_outputs
    from .flags import check_recover_lr, parse_input_shapes
    from .pipeline import save
    from .sparsity import format_sparsity, format_summary, parse_pattern, sparsify

    if not args.output:
        raise SpaError("-o/--output is required")
    if frontend_for(args.output) is not None:
        raise SpaError(f"-o {args.output}: spa sparsify writes ONNX; give -o an .onnx name")
    pattern = parse_pattern(args.pattern, args.amount, args.granularity)
    if isinstance(args.recover, int) and args.recover < 1:
        raise SpaError(f"--recover needs a positive number of steps or a time such as 20m, got {args.recover}")
    check_recover_lr(args)
    calibration = calibration_of(args)
    check_outputs(args, args.output)
    args.source = args.model
    args.model = _framework_to_onnx(args.model, say)
    say(f"loading {args.source}")
    model = load_model(args.model)
    _check_data_files(args, model)
    sparse, report = sparsify(model, pattern, args.criterion, calibration=calibration, storage=args.storage,
                              compressed=args.report or args.json, recover=args.recover or 0,
                              recover_lr=args.recover_lr, low_rank=args.low_rank, progress=say)
    for skipped in report["skipped"]:
        warn(f"{skipped['name']} not sparsified: {skipped['reason']}")
    if args.storage == "sparse" and not report["stored_sparse"]:
        warn("--storage sparse: no weight is smaller stored sparse at this sparsity; every weight stays dense")
    shapes = parse_input_shapes(args.input_shape)
    say(f"verifying and writing {args.output}{calibration_sizes(shapes, report.get('calibration_shapes'))}")
    save(sparse, args.output, external=external_tensor_names(args.model), original=args.model,
         shapes=shapes or report.get("calibration_shapes"))
    if args.json:
        print(json.dumps(report, indent=1))
    elif args.report:
        print(format_sparsity([dict(r, zeros=r["zeros_after"]) for r in report["layers"]]))
        print(format_summary(report))
    else:
        print(f"wrote {args.output}: {format_summary(report)}")
    return 0


def calibration_of(args):
    """--calibration, --calibration-samples, --tokenizer, --charset, --text-images and --input-shape as a Calibration
    (None: the default, 'auto', where no tokenizer.json sits beside the model); refused with criterion
    l1 and no --recover, which read no inputs (but for --input-shape, which also sizes the verification)."""
    from .calibration import TEXT_LINE_SOURCES, Calibration, looking_beside, source_kind
    from .flags import charset_flag, parse_input_shapes, tokenizer_flag

    given = [flag for flag, field in CALIBRATION_FLAGS if getattr(args, field) is not None]
    if args.criterion == "l1" and not args.recover:
        parse_input_shapes(args.input_shape)  # a malformed one is refused all the same
        given = [flag for flag in given if flag != "--input-shape"]
        if given:
            raise SpaError(f"{given[0]} has no effect with criterion {args.criterion}, which uses no calibration "
                           "inputs (use --criterion obs or --recover)")
        return None
    tokenizer, none = tokenizer_flag(args.tokenizer)
    if none and given == ["--tokenizer"]:
        return None
    if not given:
        found = looking_beside(Calibration(), args.model)
        return found if found.found_beside else None
    kind = source_kind(args.calibration)
    if args.calibration_samples is not None and kind == "none":
        raise SpaError("--calibration-samples has no effect with --calibration none, which gives no inputs")
    if args.tokenizer is not None and kind not in ("generated", "text"):
        raise SpaError(f"--tokenizer has no effect with --calibration {args.calibration}: it tokenises a .txt "
                       "calibration file or shapes generated token ids")
    for flag, value in (("--charset", args.charset), ("--text-images", args.text_images), ("--turns", args.turns)):
        if value is not None and (args.calibration or "auto").strip() not in TEXT_LINE_SOURCES:
            raise SpaError(f"{flag} has no effect with --calibration {args.calibration}: it shapes the images "
                           "synthetic and inverted calibration generate as text lines or pages")
    options = Calibration(source=args.calibration or "auto", samples=args.calibration_samples,
                          tokenizer=tokenizer, charset=charset_flag(args.charset), text_images=args.text_images,
                          turns=args.turns, shapes=parse_input_shapes(args.input_shape)).check()
    return options if none else looking_beside(options, args.model)
