"""`spa analyze | prune | apply-plan`: bad input gives one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import gc
import json
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
        sp.add_argument("--batch", type=int, default=1, help="batch size for latency (default 1)")
        sp.add_argument("--repeats", type=int, default=20, help="latency runs; the median is reported")
        sp.add_argument("--plan-out", help="write the pruning plan (JSON) here")

    pr = sub.add_parser("prune", help="prune a model to a target")
    common(pr)
    output(pr)
    target = pr.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="fraction of channels to remove (per group, or overall with --global)")
    target.add_argument("--target-params", type=float, metavar="F", help="keep this fraction of parameters")
    target.add_argument("--target-flops", "--target-macs", type=float, metavar="F", help="keep this fraction of MACs")
    pr.add_argument("--global", dest="global_ranking", action="store_true", help="rank channels across groups")
    pr.add_argument("--criterion", default="l1", choices=available() + ["obspa"],
                    help="obspa: Optimal Brain Surgeon saliency + weight compensation from calibration inputs")
    pr.add_argument("--calibration", default="synthetic", metavar="SOURCE",
                    help="obspa inputs: synthetic (default), none, bn, a .npz / .npy / directory path, "
                         "ood:noise-uniform | ood:noise-gaussian | ood:PATH")
    pr.add_argument("--calibration-samples", type=int, default=128, metavar="N", help="obspa: calibration samples")
    pr.add_argument("--damp", type=float, default=0.01, help="obspa: Hessian damping, fraction of its mean diagonal")
    pr.add_argument("--labels", metavar="FILE",
                    help="taylor, snip, grasp, crop, obd (PyTorch autograd on --calibration inputs): class labels "
                         "(.npy / .npz / .txt), in calibration sample order; default: a 'labels' array in the "
                         "calibration .npz, else the model's own predictions")
    pr.add_argument("--aggregation", default="mean", choices=AGGREGATIONS)
    pr.add_argument("--normalization", default="mean", choices=NORMALIZATIONS)
    pr.add_argument("--max-group-ratio", type=float, default=0.9, help="never remove more of one group")
    pr.add_argument("--round-to", type=int, default=1, help="keep a multiple of N channels per group")
    pr.add_argument("--ignore", action="append", default=[], metavar="NAME",
                    help="node or initializer name (glob) whose channels are kept; repeatable")
    pr.add_argument("--seed", type=int, default=0)

    ap = sub.add_parser("apply-plan", help="replay a plan written by --plan-out")
    common(ap)
    ap.add_argument("plan", help="plan JSON")
    output(ap)
    return p


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
    if os.path.abspath(args.model) == os.path.abspath(args.output) and not args.overwrite:
        raise SpaError("refusing to overwrite the input model (pass --overwrite)")
    if args.command == "prune":
        result = _prune(args, model, options, say)
    else:
        from .pipeline import apply_plan
        say(f"replaying {args.plan}")
        result = apply_plan(model, args.plan, options)
    plan = result.plan.to_json(os.path.basename(args.model))
    pruned = result.model
    # The input's weights are on disk: drop the original (and the analysis that references it)
    # before verification loads the pruned model, so big models are not held three times.
    del result, model
    gc.collect()
    return _finish(args, pruned, plan, say)


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
                    keep_macs=args.target_flops, max_group_ratio=args.max_group_ratio,
                    round_to=args.round_to, ignore=args.ignore)
    return prune(model, target, args.criterion, args.aggregation, args.normalization, options,
                 args.seed, progress=say, calibration=args.calibration,
                 calibration_samples=args.calibration_samples, damp=args.damp, labels=args.labels)


def _finish(args, pruned, plan, say):
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
        report = compare(args.model, args.output, batch=args.batch, repeats=args.repeats)
        print(json.dumps(report, indent=1) if args.json else format_comparison(report))
    else:
        removed = sum(g["removed"] for g in plan["groups"])
        print(f"wrote {args.output}: removed {removed} channels in {len(plan['groups'])} groups")
    return 0


if __name__ == "__main__":
    sys.exit(main())
