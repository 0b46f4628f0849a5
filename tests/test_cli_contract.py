"""Never silent: every option of every subcommand either changes the outcome of a run or is refused
with one line (exit 2) where it would change nothing.

CONTRACT names, for each option the parser defines, a run with it and one without it whose
outcomes must differ, the runs where it is refused, and the explicit-default runs that are
accepted and equal. A new option without an entry fails `test_every_option_has_a_contract`.

The outcome of a run: exit code, stdout, stderr, the bytes of the -o file, the --plan-out JSON and
whether a --plot file was written. Timings are dropped from JSON and masked in timed text, so the
options that only change how latency is measured (--batch, --threads, --repeats) are checked
through what the JSON records.
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from builder import Builder
from spa.cli import main, parser
from spa.runtime import run
from test_attention import encoder
from test_cli import small_model
from test_cli_honest import conv_chain, only_at

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, for the TorchScript input

# ------------------------------------------------------------------------------------------------
# runs and their outcomes
# ------------------------------------------------------------------------------------------------
TIMINGS = {"latency_ms", "seconds", "model_ms", "layers_ms", "other_ms", "ms", "share", "widths", "fast", "timed",
           "original_ms", "pruned_ms", "measured", "predicted", "cache"}
SCRATCH = ("O", "PLAN", "PNG")  # written by runs: removed before each


def _stable(value):
    """JSON without timings; lists of named rows in name order (profile sorts them by time)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        items = [_stable(v) for v in value]
        if items and all(isinstance(v, dict) and "name" in v for v in items):
            items.sort(key=lambda v: v["name"])
        return items
    return value


@dataclass(frozen=True)
class Outcome:
    rc: int
    stdout: str
    stderr: str
    output: str | None  # digest of the -o file
    plan: str | None  # the --plan-out JSON
    plot: bool
    report: dict | None = field(default=None, compare=False)  # stdout as JSON, timings dropped


def outcome(paths, argv) -> Outcome:
    for name in SCRATCH:
        if os.path.isdir(paths[name]):
            shutil.rmtree(paths[name])
        elif os.path.exists(paths[name]):
            os.remove(paths[name])
    argv = [a.format(**paths) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as done:  # --help, --version and argparse's own errors
            rc = done.code
    stdout, stderr = out.getvalue(), re.sub(r"\[spa +[\d.]+s\]", "[spa]", err.getvalue())
    report = None
    try:
        report = _stable(json.loads(stdout))
        stdout = json.dumps(report, sort_keys=True)
    except ValueError:
        if "profile" in argv or "--report" in argv or "--target-latency" in argv:
            stdout = re.sub(r"\d+(\.\d+)?", "#", stdout)
    if "--target-latency" in argv:
        stderr = re.sub(r"\d+(\.\d+)?", "#", stderr)
    target = argv[argv.index("-o") + 1] if "-o" in argv else None
    digest = hashlib.sha256(open(target, "rb").read()).hexdigest() if target and os.path.isfile(target) else None
    plan = open(paths["PLAN"]).read() if os.path.exists(paths["PLAN"]) else None
    return Outcome(rc, stdout, stderr, digest, plan, os.path.exists(paths["PNG"]), report)


@dataclass
class Case:
    """`given` (argv with the option) and `without` (argv without it) must differ in outcome;
    `also`: more such pairs; `refused`: (argv, part of the one error line) where it would do
    nothing; `same`: (argv, argv) pairs that are equal: an explicit default value, accepted."""
    given: list | None = None
    without: list | None = None
    also: list = field(default_factory=list)
    refused: list = field(default_factory=list)
    same: list = field(default_factory=list)
    check: object = None  # check(outcome with, outcome without): what the option must have done
    prepare: str | None = None  # a fixture step before each run ("copy": restore the input copy)


SWITCHES = {"-q", "--quiet", "--json", "--report", "--dry-run", "--global", "--overwrite", "--verbose", "--help"}


def _without(argv, *flags):
    """argv without these options (and their values)."""
    out, skip = [], False
    for a in argv:
        if skip or a in flags:
            skip = a in flags and a not in SWITCHES
            continue
        out.append(a)
    return out


def _json(key, value):
    def check(given, without):
        assert given.report[key] == value and without.report[key] != value, (given.report[key], without.report[key])
    return check


def _layers(count):
    def check(given, without):
        assert len(given.report["layers"]) == count < len(without.report["layers"])
    return check


def _verbose(argv):
    """--verbose leaves onnxruntime's and TensorFlow's logging as it is; without it both are hushed."""
    def check(paths):
        import unittest.mock

        import onnxruntime
        severities, saved = {}, os.environ.get("TF_CPP_MIN_LOG_LEVEL")
        for verbose in (False, True):
            calls = []
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
            with unittest.mock.patch.object(onnxruntime, "set_default_logger_severity", calls.append):
                got = outcome(paths, argv + (["--verbose"] if verbose else []))
            assert got.rc == 0, got.stderr
            severities[verbose] = (calls, os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
        if saved is not None:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = saved
        assert severities == {False: ([3], "3"), True: ([], None)}
    return check


# ------------------------------------------------------------------------------------------------
# the contract
# ------------------------------------------------------------------------------------------------
A = ["analyze", "{M}", "-q"]
A_ENC = ["analyze", "{ENC}", "-q"]
P = ["prune", "{M}", "-o", "{O}", "--ratio", "0.5", "-q"]
P0 = _without(P, "--ratio")  # no target: refused
L1 = P + ["--criterion", "l1"]  # the default is obspa
P95 = P0 + ["--ratio", "0.95"]
EXACT = P + ["--round-to", "1"]  # exact widths: the default rounding keeps {M}'s 16 channels at 8 or 16
TP = P0 + ["--target-params", "0.5"]
SMALL = ["prune", "{SMALL}", "-o", "{O}", "-q", "--target-params", "0.5"]
J = P + ["--json"]
R = P + ["--criterion", "random"]
OB = P + ["--criterion", "obspa", "--calibration-samples", "32"]
NONE = P + ["--criterion", "obspa", "--calibration", "none"]
DRY = ["prune", "{M}", "--ratio", "0.5", "-q", "--dry-run", "--criterion", "l1"]
ENC = ["prune", "{ENC}", "-o", "{O}", "--ratio", "0.5", "-q"]
DYN = ["prune", "{DYN}", "-o", "{O}", "--ratio", "0.5", "-q", "--criterion", "obspa", "--calibration-samples", "16"]
IMG = DYN[:-1] + ["4", "--calibration", "{IMAGES}"]
ONLY8 = ["prune", "{ONLY8}", "-o", "{O}", "--ratio", "0.5", "-q", "--criterion", "l1"]  # runs at 8x8 only
TALL = DYN[:-1] + ["4", "--calibration", "{TALL}", "--image-size", "8x8"]
SQUARE = ["prune", "{SQUARE}", "-o", "{O}", "--ratio", "0.5", "-q", "--criterion", "obspa",
          "--calibration", "{IMAGES}", "--calibration-samples", "4"]
TXT = ["prune", "{TXT}", "-o", "{O}", "--ratio", "0.5", "-q", "--criterion", "obspa", "--calibration-samples", "16"]
TXT_BESIDE = ["prune", "{TXT_BESIDE}"] + TXT[2:]
REC = ["prune", "{REC}"] + OB[2:]  # a text recognizer's dictionary in its metadata
TAYLOR = P + ["--criterion", "taylor", "--calibration", "{NPZ}"]
TS = ["prune", "{TS}", "-o", "{O}", "--ratio", "0.5", "-q"]
TWO = ["prune", "{TWO}", "-o", "{O}", "--ratio", "0.5", "-q", "--eval", "{VAL2}"]
F = ["profile", "{M}", "-q", "--json"]
AP = ["apply-plan", "{M}", "{PLAN0}", "-o", "{O}", "-q"]
AJ = AP + ["--json"]
TWO_AP = ["apply-plan", "{TWO}", "{PLAN_TWO}", "-o", "{O}", "-q", "--eval", "{VAL2}"]
S = ["sensitivity", "{M}", "-q"]
S1 = S + ["--ratios", "0.5"]
S_ENC = ["sensitivity", "{ENC}", "-q", "--ratios", "0.5"]
S_TWO = ["sensitivity", "{TWO}", "-q", "--ratios", "0.5", "--eval", "{VAL2}"]
SP0 = ["sparsify", "{M}", "-o", "{O}", "-q"]  # criterion obs, the default
SP = SP0 + ["--criterion", "l1"]
SPU = SP + ["--pattern", "unstructured", "--amount", "0.5"]
SPK = SP + ["--pattern", "k-of-n", "--amount", "0.5"]
SPO = SP0 + ["--criterion", "obs", "--calibration-samples", "16"]
SP_ONLY8 = ["sparsify", "{ONLY8}", "-o", "{O}", "-q"]
SP_REC = ["sparsify", "{REC}"] + SPO[2:]
AP_ONLY8 = ["apply-plan", "{ONLY8}", "{PLAN_ONLY8}", "-o", "{O}", "-q"]
SP_DYN = ["sparsify", "{DYN}", "-o", "{O}", "-q", "--criterion", "obs", "--calibration-samples", "4"]
SP_TXT = ["sparsify", "{TXT}", "-o", "{O}", "-q", "--criterion", "obs", "--calibration-samples", "16"]
SP_BESIDE = ["sparsify", "{TXT_BESIDE}"] + SP_TXT[2:]
SW = ["sweep", "{M}", "-q", "--targets", "ratio=0.5"]
SW2 = _without(SW, "--targets") + ["--targets", "ratio=0.5,macs=0.5"]  # a grid of 2 points
SW_TWO = ["sweep", "{TWO}", "-q", "--targets", "ratio=0.5", "--eval", "{VAL2}"]
NOT_TIMED = "has no effect: nothing is timed without"
ONNX_SHAPE = "--input-shape has no effect on"


def _address(argv):
    """--address joins a Ray cluster: refused without Ray; with it, ray.init is asked to join (here a
    cluster that is not there, so one error line)."""
    def check(paths):
        import unittest.mock

        given = argv + ["--address", "127.0.0.1:1"]
        if not _installed("ray"):
            got = outcome(paths, given)
            assert got.rc == 2 and "--address needs Ray (pip install 'spa[ray]')" in got.stderr, got.stderr
            return
        import ray

        def refuse(**kwargs):
            assert kwargs["address"] == "127.0.0.1:1"
            raise ConnectionError("no cluster")
        with unittest.mock.patch.object(ray, "init", refuse), unittest.mock.patch.object(ray, "is_initialized",
                                                                                          lambda: False):
            got = outcome(paths, given)
        assert got.rc == 2 and "cannot join the Ray cluster at 127.0.0.1:1" in got.stderr, got.stderr
    return check


def _common(base):
    """--help, --quiet, --verbose: the same contract in every subcommand."""
    return {"--help": Case(base + ["--help"], base),
            "--quiet": Case(base, _without(base, "-q")),
            "--verbose": Case(check=_verbose(base))}


def _output(base, json_base, copy, plain):
    """The options every writing subcommand shares (spa.cli's output())."""
    timers = "--report, --json, --target-latency or --round-to auto" if base[0] == "prune" else "--report or --json"
    return {
        "--output": Case(base, _without(base, "-o")),
        "--overwrite": Case(copy + ["--overwrite"], copy, prepare="copy"),
        "--report": Case(base + ["--report"], base),
        "--json": Case(json_base, base),
        "--batch": Case(json_base + ["--batch", "2"], json_base, check=_json("batch", 2),
                        refused=[(base + ["--batch", "2"], f"--batch {NOT_TIMED} {timers}")]),
        "--threads": Case(json_base + ["--threads", "1"], json_base, check=_json("threads", 1),
                          refused=[(base + ["--threads", "1"], f"--threads {NOT_TIMED} {timers}")]),
        "--repeats": Case(json_base + ["--repeats", "3"], json_base, check=_json("repeats", 3),
                          refused=[(base + ["--repeats", "3"], "--repeats has no effect without --report or --json")]),
        "--eval": Case(base + ["--eval", "{VAL}"], base),
        "--eval-output": Case(plain + ["--eval-output", "{TWO_SECOND}"], plain,
                              refused=[(base + ["--eval-output", "x"], "--eval-output has no effect without --eval")]),
    }


CONTRACT = {
    "spa": {
        "--help": Case(["--help"], []),
        "--version": Case(["--version"], []),
    },
    "analyze": {
        **_common(A),
        "--granularity": Case(A_ENC + ["--granularity", "channels"], A_ENC,
                              also=[(A + ["--granularity", "channels,hidden"], A)],  # a warning
                              refused=[(A + ["--granularity", "foo"], "unknown granularity foo")]),
        "--json": Case(A + ["--json"], A),
        "--sparsity": Case(A + ["--sparsity"], A, also=[(A + ["--json", "--sparsity"], A + ["--json"])]),
        "--input-shape": Case(["analyze", "{TS}", "-q", "--input-shape", "1x3x8x8"], ["analyze", "{TS}", "-q"],
                              refused=[(A + ["--input-shape", "1x3x8x8"], ONNX_SHAPE)]),
    },
    "prune": {
        **_common(P),
        **_output(P, J, ["prune", "{COPY}", "-o", "{COPY}", "--ratio", "0.5", "-q"], TWO),
        "--plan-out": Case(P + ["--plan-out", "{PLAN}"], P),
        "--granularity": Case(ENC + ["--granularity", "channels"], ENC,
                              also=[(P + ["--granularity", "channels,hidden"], P)],  # a warning
                              refused=[(P + ["--granularity", "heads,head-dim"], "choose heads or head-dim")]),
        "--dry-run": Case(DRY, P, refused=[(P + ["--dry-run"], "-o has no effect with --dry-run"),
                                           (DRY + ["--recover", "2"], "--recover has no effect with --dry-run"),
                                           (DRY + ["--compensation", "obs"],
                                            "--compensation has no effect with --dry-run"),
                                           (DRY + ["--json", "--repeats", "3"],
                                            "--repeats has no effect with --dry-run")]),
        "--ratio": Case(P, P0),
        "--target-params": Case(TP, P0),
        "--target-flops": Case(P0 + ["--target-flops", "0.5"], P0),
        "--target-latency": Case(P0 + ["--target-latency", "0.8"], P0),
        "--global": Case(L1 + ["--global"], L1,  # obspa's measured allocation may pick the global plan itself
                         refused=[(TP + ["--global"], "--global has no effect with --target-params")]),
        "--ratio-for": Case(P + ["--ratio-for", "{CONV0}=0"], P, refused=[
            (P + ["--ratio-for", "{GEMM}=0.2"], "--ratio-for '{GEMM}' sets no group's share: the channels those "
                                                "layers produce are frozen"),  # the graph output's
            (P + ["--ratio-for", "Conv_*=0.2", "--ratio-for", "{CONV0}=0"],
             "an earlier --ratio-for sets every group")]),
        "--ratios-from": Case(P + ["--ratios-from", "{SENS}"], P, refused=[
            (TP + ["--ratios-from", "{SENS}"], "--ratios-from needs --ratio R"),
            (P + ["--ratios-from", "{SENS_SMALL}"], "does not match this model")]),
        "--criterion": Case(P + ["--criterion", "l2"], P),
        "--calibration": Case(OB + ["--calibration", "ood:noise-uniform"], OB, refused=[
            (L1 + ["--calibration", "synthetic"], "--calibration has no effect with criterion l1"),
            (P + ["--criterion", "synflow", "--calibration", "synthetic"], "with criterion synflow")]),
        "--calibration-samples": Case(OB, _without(OB, "--calibration-samples"), refused=[
            (L1 + ["--calibration-samples", "8"], "--calibration-samples has no effect with criterion l1"),
            (NONE + ["--calibration-samples", "8"], "--calibration-samples has no effect with --calibration none")]),
        "--input-shape": Case(TS + ["--input-shape", "1x3x8x8"], TS,
                              also=[(DYN + ["--input-shape", "1x3x8x8"], DYN),  # calibration at 8x8, not 224x224
                                    # verification at the sizes the model takes (l1 runs no calibration to take
                                    # them from: test_cli_honest)
                                    (ONLY8 + ["--input-shape", "1x3x8x8"], ONLY8)]),
        "--tokenizer": Case(TXT + ["--calibration", "{SENTENCES}", "--tokenizer", "{TOKENIZER}"],
                            TXT + ["--calibration", "{SENTENCES}"],
                            also=[(TXT + ["--tokenizer", "{TOKENIZER}"], TXT),  # synthetic sentences like its own
                                  (TXT_BESIDE + ["--tokenizer", "none"], TXT_BESIDE)],  # the one beside it left out
                            refused=[(OB + ["--tokenizer", "{TOKENIZER}"], "has no effect: the model has no token-id"),
                                     (OB + ["--calibration", "{NPZ}", "--tokenizer", "{TOKENIZER}"],
                                      "--tokenizer has no effect with --calibration")]),
        "--charset": Case(OB + ["--charset", "{KEYS}"], OB, also=[(REC + ["--charset", "none"], REC)], refused=[
            (L1 + ["--charset", "{KEYS}"], "--charset has no effect with criterion l1"),
            (OB + ["--calibration", "{NPZ}", "--charset", "{KEYS}"], "--charset has no effect with --calibration")]),
        "--text-images": Case(OB + ["--text-images", "pages"], OB, also=[(OB + ["--text-images", "lines"], OB)],
                              refused=[
            (L1 + ["--text-images", "pages"], "--text-images has no effect with criterion l1"),
            (OB + ["--calibration", "{NPZ}", "--text-images", "pages"],
             "--text-images has no effect with --calibration"),
            (TXT + ["--text-images", "pages"], "has no effect: the model has no image input")]),
        "--turns": Case(OB + ["--text-images", "documents", "--turns", "4"], OB + ["--text-images", "documents"],
                        refused=[
            (L1 + ["--turns", "2"], "--turns has no effect with criterion l1"),
            (OB + ["--calibration", "{NPZ}", "--turns", "2"], "--turns has no effect with --calibration"),
            (OB + ["--turns", "2"], "turns 2 have no effect"),
            (OB + ["--text-images", "lines", "--turns", "4"], "text lines turn by 180 degrees only")]),
        "--max-length": Case(TXT + ["--max-length", "8"], TXT, refused=[
            (OB + ["--max-length", "8"], "--max-length has no effect: the model has no token-id input"),
            (OB + ["--calibration", "{NPZ}", "--max-length", "8"], "--max-length has no effect with --calibration")]),
        "--image-size": Case(IMG + ["--image-size", "8x8"], IMG, refused=[
            (OB + ["--image-size", "8x8"], "--image-size has no effect with --calibration auto")]),
        "--image-mean": Case(IMG + ["--image-mean", "0.5"], IMG, also=[  # text lines normalised as asked
            (OB + ["--charset", "{KEYS}", "--image-mean", "0.2"], OB + ["--charset", "{KEYS}"])], refused=[
            (OB + ["--calibration", "{NPZ}", "--image-mean", "0.5"], "--image-mean has no effect with --calibration")]),
        "--image-std": Case(IMG + ["--image-std", "0.5"], IMG, refused=[
            (OB + ["--image-std", "0.5"], "(--image-mean / --image-std) have no effect with calibration"),
            (OB + ["--calibration", "bn", "--image-std", "0.5"], "--image-std has no effect with --calibration bn")]),
        "--image-layout": Case(SQUARE + ["--image-layout", "nhwc"], SQUARE, refused=[
            (OB + ["--image-layout", "nchw"], "--image-layout has no effect with --calibration auto")]),
        "--image-resize": Case(TALL + ["--image-resize", "pad"], TALL, refused=[
            (OB + ["--image-resize", "pad"], "--image-resize has no effect with --calibration auto")]),
        "--damp": Case(OB + ["--damp", "0.5"], OB, refused=[
            (L1 + ["--damp", "0.1"], "--damp has no effect with criterion l1"),
            (NONE + ["--damp", "0.1"], "--damp has no effect with --calibration none")]),
        "--compensation": Case(OB + ["--compensation", "none"], OB, refused=[
            (NONE + ["--compensation", "obs"], "--compensation has no effect with --calibration none"),
            (DRY + ["--compensation", "obs"], "--compensation has no effect with --dry-run")]),
        "--staged": Case(OB + ["--staged"], OB,  # generated calibration: not staged by default
                         same=[(OB + ["--no-staged"], OB), (OB + ["--calibration", "{NPZ}", "--staged"],
                                                            OB + ["--calibration", "{NPZ}"])],
                         refused=[(L1 + ["--staged"], "choose how obs compensation is fitted; compensation is 'none'"),
                                  (L1 + ["--compensation", "obs", "--no-staged"], "needs the Hessians criterion obspa"),
                                  (NONE + ["--staged"], "--staged has no effect with --calibration none"),
                                  (DRY + ["--staged"], "--staged has no effect with --dry-run")]),
        "--labels": Case(TAYLOR + ["--labels", "{LABELS}"], TAYLOR, refused=[
            (L1 + ["--labels", "{LABELS}"], "--labels has no effect with criterion l1")]),
        "--aggregation": Case(P + ["--aggregation", "max"], P,
                              also=[(SMALL + ["--normalization", "none", "--aggregation", "sum"],
                                     SMALL + ["--normalization", "none"])],  # groups of 3 and 6 weights
                              refused=[(P + ["--aggregation", "sum"], "--aggregation sum ranks channels as mean does"),
                                       (TP + ["--normalization", "none", "--aggregation", "sum"],
                                        "a factor that is the same in every group"),  # 3 weights in each
                                       (P + ["--criterion", "fpgm", "--aggregation", "max"],
                                        "--aggregation has no effect: criterion fpgm scores one weight"),
                                       (OB + ["--aggregation", "max"],
                                        "--aggregation has no effect with criterion obspa"),
                                       (R + ["--aggregation", "max"],
                                        "--aggregation has no effect with criterion random")]),
        "--normalization": Case(TP + ["--round-to", "1", "--normalization", "none"], TP + ["--round-to", "1"], refused=[
            (P + ["--normalization", "max"], "--normalization has no effect with --ratio and allocation uniform"),
            (P0 + ["--target-latency", "0.7", "--normalization", "max"],
             "--normalization max has no effect with --target-latency"),
            (R + ["--global", "--normalization", "max"], "--normalization has no effect with criterion random")]),
        "--recover": Case(P + ["--recover", "3"], P, also=[(P + ["--recover", "5s"], P)], refused=[
            (P + ["--recover", "-3"], "--recover needs a number of steps >= 0"),
            (P + ["--recover", "soon"], "--recover needs a number of steps >= 0 or a time such as 90s, 20m or 1.5h"),
            (DRY + ["--recover", "3"], "--recover has no effect with --dry-run")]),
        "--recover-lr": Case(P + ["--recover", "3", "--recover-lr", "0.01"], P + ["--recover", "3"], refused=[
            (P + ["--recover-lr", "0.01"], "--recover-lr has no effect without --recover"),
            (P + ["--recover", "3", "--recover-lr", "0"], "--recover-lr must be a positive number")]),
        "--allocation": Case(EXACT + ["--allocation", "global"], EXACT, refused=[
            (TP + ["--allocation", "uniform"], "--allocation uniform has no effect with --target-params"),
            (TP + ["--criterion", "l1", "--allocation", "global"], "--allocation global has no effect with --target-params"),
            (L1 + ["--allocation", "measured"], "--allocation measured compares OBS-compensated plans"),
            (P0 + ["--target-latency", "0.7", "--criterion", "obspa", "--allocation", "measured"],
             "--allocation measured has no effect with --target-latency")]),
        "--max-group-ratio": Case(P95 + ["--max-group-ratio", "0.5"], P95, refused=[
            (L1 + ["--max-group-ratio", "0.6"], "--max-group-ratio 0.6 has no effect with a uniform --ratio 0.5")]),
        "--round-to": Case(P + ["--round-to", "3"], P, same=[(P + ["--round-to", "1"], P)],
                           refused=[(P + ["--round-to", "0"], "round-to must be a positive integer")]),
        "--ignore": Case(P + ["--ignore", "{CONV0}"], P,
                         refused=[(P + ["--ignore", "nope*"], "'nope*' matches no node")]),
        "--seed": Case(R + ["--seed", "1"], R, also=[(J + ["--seed", "1"], J)],  # the report's deviation inputs
                       refused=[(L1 + ["--seed", "1"], "--seed has no effect: criterion l1 is deterministic"),
                                (NONE + ["--seed", "1"], "--seed has no effect: criterion obspa")]),
    },
    "profile": {
        **_common(F),
        "--granularity": Case(same=[(F + ["--granularity", "channels,heads"], F)], refused=[
            (F + ["--granularity", "channels"], "--granularity has no effect on profile")]),
        "--batch": Case(F + ["--batch", "2"], F, check=_json("batch", 2)),
        "--threads": Case(F + ["--threads", "1"], F, check=_json("threads", 1)),
        "--top": Case(F + ["--top", "1"], F, check=_layers(1),
                      also=[(_without(F, "--json") + ["--top", "1"], _without(F, "--json"))],
                      refused=[(F + ["--top", "0"], "--top must be a positive integer")]),
        "--plot": Case(F + ["--plot", "{PNG}"], F),
        "--json": Case(F, _without(F, "--json")),
        "--input-shape": Case(["profile", "{TS}", "-q", "--json", "--input-shape", "1x3x8x8"],
                              ["profile", "{TS}", "-q", "--json"],
                              refused=[(F + ["--input-shape", "1x3x8x8"], ONNX_SHAPE)]),
    },
    "sensitivity": {
        **_common(S1),
        "--granularity": Case(S_ENC + ["--granularity", "channels"], S_ENC,
                              also=[(S1 + ["--granularity", "channels,hidden"], S1)],  # a warning
                              refused=[(S1 + ["--granularity", "foo"], "unknown granularity foo")]),
        "--ratios": Case(S1, S, refused=[(S + ["--ratios", "0.5,1.5"], "ratios must be fractions in (0, 1)")]),
        "--eval": Case(S1 + ["--eval", "{VAL}"], S1),
        "--eval-output": Case(S_TWO + ["--eval-output", "{TWO_SECOND}"], S_TWO, refused=[
            (S1 + ["--eval-output", "x"], "--eval-output has no effect without --eval")]),
        "--json": Case(S1 + ["--json"], S1),
        "--plot": Case(S1 + ["--plot", "{PNG}"], S1),
        "--output": Case(S1 + ["-o", "{O}"], S1),
        "--address": Case(check=_address(S1)),
    },
    "sweep": {
        **_common(SW),
        "--criteria": Case(SW + ["--criteria", "l2"], SW, same=[(SW + ["--criteria", "l1"], SW)],
                           refused=[(SW + ["--criteria", "l1,l1"], "l1 given twice")]),
        "--targets": Case(SW, _without(SW, "--targets"),
                          refused=[(_without(SW, "--targets") + ["--targets", "latency=0.5"], "KIND one of ratio")]),
        "--calibration": Case(SW + ["--criteria", "obspa", "--calibration", "none"], SW + ["--criteria", "obspa"],
                              refused=[(SW + ["--calibration", "synthetic"], "--calibration has no effect")]),
        "--round-to": Case(SW + ["--round-to", "4"], SW, same=[(SW + ["--round-to", "1"], SW)],
                           refused=[(SW + ["--round-to", "auto"], "expected positive integers")]),
        "--random": Case(SW2 + ["--random", "1"], SW2,
                         refused=[(SW2 + ["--random", "2"], "--random 2: the grid has 2 points")]),
        "--seed": Case(SW2 + ["--random", "1", "--seed", "1"], SW2 + ["--random", "1"],
                       same=[(SW2 + ["--random", "1", "--seed", "0"], SW2 + ["--random", "1"])],
                       refused=[(SW + ["--seed", "1"], "--seed has no effect without --random")]),
        "--eval": Case(SW + ["--eval", "{VAL}"], SW),
        "--eval-output": Case(SW_TWO + ["--eval-output", "{TWO_SECOND}"], SW_TWO, refused=[
            (SW + ["--eval-output", "x"], "--eval-output has no effect without --eval")]),
        "--latency": Case(SW + ["--latency"], SW),
        "--address": Case(check=_address(SW)),
        "--output": Case(SW + ["-o", "{O}"], SW),
        "--plot": Case(SW + ["--plot", "{PNG}"], SW),
        "--json": Case(SW + ["--json"], SW),
    },
    "sparsify": {
        **_common(SP),
        "--output": Case(SP, _without(SP, "-o")),
        "--overwrite": Case(["sparsify", "{COPY}", "-o", "{COPY}", "-q", "--overwrite"],
                            ["sparsify", "{COPY}", "-o", "{COPY}", "-q"], prepare="copy"),
        "--pattern": Case(SP + ["--pattern", "1:4"], SP, also=[(SPU, _without(SPU, "--pattern"))],
                          refused=[(SP + ["--pattern", "4:2"], "N:M needs 1 <= N <= M"),
                                   (SP + ["--pattern", "3:5"], "no layer can take pattern 3:5")]),
        "--granularity": Case(SPK + ["--granularity", "filter"], SPK, also=[(SPK + ["--granularity", "kernel"], SPK)],
                              same=[(SPK + ["--granularity", "weight"], SPK)],
                              refused=[(SP + ["--granularity", "kernel"], "granularity kernel has no effect with N:M"),
                                       (SPU + ["--granularity", "filter"], "granularity filter applies to k-of-n")]),
        "--amount": Case(SPU, _without(SPU, "--amount"), also=[(SPK, _without(SPK, "--amount"))],
                         refused=[(SP + ["--amount", "0.5"], "an amount has no effect with N:M"),
                                  (_without(SPU, "--amount") + ["--amount", "1.5"], "amount must be in [0, 1)")]),
        "--criterion": Case(SP, SP0, same=[(SP0 + ["--criterion", "obs"], SP0)]),
        "--calibration": Case(SPO + ["--calibration", "ood:noise-uniform"], SPO, refused=[
            (SP + ["--calibration", "synthetic"], "--calibration has no effect with criterion l1")],
            also=[(SP + ["--recover", "2", "--calibration", "ood:noise-uniform"], SP + ["--recover", "2"])]),
        "--calibration-samples": Case(SPO, _without(SPO, "--calibration-samples"), refused=[
            (SP + ["--calibration-samples", "8"], "--calibration-samples has no effect with criterion l1"),
            (SPO + ["--calibration", "none"], "--calibration-samples has no effect with --calibration none")]),
        "--tokenizer": Case(SP_TXT + ["--tokenizer", "{TOKENIZER}"], SP_TXT,
                            also=[(SP_BESIDE + ["--tokenizer", "none"], SP_BESIDE)],
                            refused=[(SP + ["--tokenizer", "{TOKENIZER}"], "--tokenizer has no effect with criterion l1"),
                                     (SPO + ["--tokenizer", "{TOKENIZER}"], "has no effect: the model has no token-id"),
                                     (SP_TXT + ["--calibration", "{NPZ}", "--tokenizer", "{TOKENIZER}"],
                                      "--tokenizer has no effect with --calibration")]),
        "--charset": Case(SPO + ["--charset", "{KEYS}"], SPO, also=[(SP_REC + ["--charset", "none"], SP_REC)], refused=[
            (SP + ["--charset", "{KEYS}"], "--charset has no effect with criterion l1"),
            (SPO + ["--calibration", "{NPZ}", "--charset", "{KEYS}"], "--charset has no effect with --calibration")]),
        "--text-images": Case(SPO + ["--text-images", "pages"], SPO, refused=[
            (SP + ["--text-images", "pages"], "--text-images has no effect with criterion l1"),
            (SPO + ["--calibration", "{NPZ}", "--text-images", "lines"],
             "--text-images has no effect with --calibration")]),
        "--turns": Case(SPO + ["--text-images", "pages", "--turns", "2"], SPO + ["--text-images", "pages"], refused=[
            (SP + ["--turns", "2"], "--turns has no effect with criterion l1"),
            (SPO + ["--calibration", "{NPZ}", "--turns", "2"], "--turns has no effect with --calibration")]),
        "--input-shape": Case(SP_DYN + ["--input-shape", "1x3x8x8"], SP_DYN,
                              also=[(SP_ONLY8 + ["--input-shape", "1x3x8x8"], SP_ONLY8)]),  # verified at 8x8
        "--recover": Case(SP + ["--recover", "2"], SP, also=[(SPO + ["--recover", "2"], SPO)],
                          refused=[(SP + ["--recover", "0"], "--recover needs a positive number of steps"),
                                   (SP + ["--recover", "0s"], "--recover needs a number of steps >= 0 or a time")]),
        "--recover-lr": Case(SP + ["--recover", "2", "--recover-lr", "0.01"], SP + ["--recover", "2"], refused=[
            (SP + ["--recover-lr", "0.01"], "--recover-lr has no effect without --recover"),
            (SP + ["--recover", "2", "--recover-lr", "nan"], "--recover-lr must be a positive number")]),
        "--low-rank": Case(SPO + ["--low-rank", "2"], SPO, same=[(SPO + ["--low-rank", "0"], SPO)], refused=[
            (SP + ["--low-rank", "2"], "--low-rank fits its term on calibration inputs"),
            (SPO + ["--low-rank", "-1"], "--low-rank needs a rank of at least 1")]),
        "--storage": Case(SPU + ["--storage", "sparse"], SPU, same=[(SPU + ["--storage", "dense"], SPU)],
                          also=[(SP + ["--storage", "sparse"], SP)]),  # 2:4 float32: a warning, nothing smaller
        "--report": Case(SP + ["--report"], SP),
        "--json": Case(SP + ["--json"], SP),
    },
    "apply-plan": {
        **_common(AP),
        **_output(AP, AJ, ["apply-plan", "{COPY}", "{PLAN0}", "-o", "{COPY}", "-q"], TWO_AP),
        # a plan records its granularity and replays with it; a plan from before that needs the option
        "--granularity": Case(["apply-plan", "{ENC}", "{PLAN_HEAD_DIM_V0}", "-o", "{O}", "-q", "--granularity",
                               "channels,head-dim"], ["apply-plan", "{ENC}", "{PLAN_HEAD_DIM_V0}", "-o", "{O}", "-q"],
                              same=[(["apply-plan", "{ENC}", "{PLAN_HEAD_DIM}", "-o", "{O}", "-q", "--granularity",
                                      "channels,head-dim"], ["apply-plan", "{ENC}", "{PLAN_HEAD_DIM}", "-o", "{O}", "-q"])],
                              refused=[(AP + ["--granularity", "channels,hidden"],
                                        "granularity channels,hidden: the plan {PLAN0} was made with channels,heads")]),
        "--plan-out": Case(refused=[(AP + ["--plan-out", "{PLAN}"], "--plan-out has no effect with apply-plan")]),
        "--input-shape": Case(["apply-plan", "{TS}", "{PLAN_TS}", "-o", "{O}", "-q", "--input-shape", "1x3x8x8"],
                              ["apply-plan", "{TS}", "{PLAN_TS}", "-o", "{O}", "-q"],
                              also=[(AP_ONLY8 + ["--input-shape", "1x3x8x8"], AP_ONLY8)]),  # verified at 8x8
    },
}


def _key(action) -> str:
    return next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])


def parser_options() -> dict:
    """{command: {option: the strings that spell it}} ("spa": the top-level options)."""
    top = parser()
    options = {"spa": {_key(a): set(a.option_strings) for a in top._actions if a.option_strings}}
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        options[name] = {_key(a): set(a.option_strings) for a in sub._actions if a.option_strings}
    return options


OPTION_STRINGS = parser_options()


def test_every_option_has_a_contract():
    defined = parser_options()
    missing = [f"{c} {o}" for c, opts in defined.items() for o in sorted(set(opts) - set(CONTRACT.get(c, {})))]
    stale = [f"{c} {o}" for c, opts in CONTRACT.items() for o in sorted(set(opts) - set(defined.get(c, {})))]
    assert not missing, f"options without a contract (add them to CONTRACT): {missing}"
    assert not stale, f"contracts for options the parser no longer has: {stale}"


# ------------------------------------------------------------------------------------------------
# the files the runs read
# ------------------------------------------------------------------------------------------------
def _text_model():
    """input_ids -> embedding -> MLP (16 prunable channels) -> 5 outputs per token."""
    b = Builder()
    ids = b.input(["batch", "sequence"], "input_ids", TensorProto.INT64)
    x = b.op("Gather", [b.weight(37, 8), ids])
    h = b.op("Relu", [b.op("Add", [b.op("MatMul", [x, b.weight(8, 16)]), b.weight(16)])])
    b.output(b.op("MatMul", [h, b.weight(16, 5)]))
    return b.model()


def _two_outputs():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input(["batch", 3, 8, 8]), 3, 8)])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [b.conv(x, 8, 16)])])])
    b.output(b.gemm(x, 16, 4))
    b.output(b.gemm(x, 16, 3))
    return b.model()


def _images(folder, height, width):
    from PIL import Image

    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return folder


def _installed(module) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _setup(paths, argv):
    assert outcome(paths, argv).rc == 0, argv


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """The files the runs name ({M}, {TS}, ...); those that need torch, tokenizers or Pillow only
    where it is installed (the cases naming them are skipped otherwise)."""
    d = tmp_path_factory.mktemp("contract")
    p = {"O": str(d / "o.onnx"), "PLAN": str(d / "plan.json"), "PNG": str(d / "plot.png")}
    models = {"M": conv_chain((8, 16)), "SMALL": small_model(), "ENC": encoder(), "TXT": _text_model(),
              "TWO": _two_outputs(),
              "DYN": conv_chain((8, 16), shape=("batch", 3, "h", "w")),
              "SQUARE": conv_chain((8, 16), shape=("batch", 3, 8, 3)),  # 3 on both axes: NCHW or NHWC
              "ONLY8": only_at(8)}
    for name, model in models.items():
        p[name] = str(d / f"{name.lower()}.onnx")
        onnx.save(model, p[name])
    p["COPY"] = str(d / "copy.onnx")
    p["CONV0"] = next(n.name for n in models["M"].graph.node if n.op_type == "Conv")
    p["GEMM"] = next(n.name for n in models["M"].graph.node if n.op_type == "Gemm")
    p["TWO_SECOND"] = models["TWO"].graph.output[1].name
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(d / "val.npz", x=x, labels=run(p["M"], {"input": x})[0].argmax(-1))
    np.savez(d / "val2.npz", x=x, labels=np.arange(16) % 3)
    np.savez(d / "calibration.npz", input=x)
    np.save(d / "labels.npy", np.arange(16) % 4)
    p.update(VAL=str(d / "val.npz"), VAL2=str(d / "val2.npz"), NPZ=str(d / "calibration.npz"),
             LABELS=str(d / "labels.npy"), SENTENCES=str(d / "sentences.txt"))
    (d / "sentences.txt").write_text("the cat sat on a mat\na big red dog\nthe dog ran far far away\nyes no\n")
    if _installed("PIL"):
        p.update(IMAGES=_images(str(d / "images"), 6, 10), TALL=_images(str(d / "tall"), 10, 6))
        p["KEYS"], p["REC"] = str(d / "keys.txt"), str(d / "rec.onnx")
        (d / "keys.txt").write_text("a\nb\nK\n7\n-\n", encoding="utf-8")
        recognizer = conv_chain((8, 16))
        onnx.helper.set_model_props(recognizer, {"character": "a\nb\nK\n7\n-"})
        onnx.save(recognizer, p["REC"])
    if _installed("tokenizers"):
        from test_calibration import _tokenizer
        p["TOKENIZER"] = str(_tokenizer(d / "tokenizer"))
        p["TXT_BESIDE"] = str(_tokenizer(d / "export") / "model.onnx")  # a tokenizer.json beside the model
        onnx.save(models["TXT"], p["TXT_BESIDE"])
    plans = [("PLAN0", P), ("PLAN_TWO", _without(TWO, "--eval")),
             ("PLAN_HEAD_DIM", ENC + ["--granularity", "channels,head-dim"]),
             ("PLAN_ONLY8", ONLY8 + ["--input-shape", "1x3x8x8"])]
    if _installed("torch"):
        import torch
        module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                     torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                     torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
        p["TS"] = str(d / "scripted.pt")
        torch.jit.save(torch.jit.script(module), p["TS"])
        plans.append(("PLAN_TS", TS + ["--input-shape", "1x3x8x8"]))
    for name, argv in plans:
        _setup(p, argv + ["--plan-out", "{PLAN}"])
        p[name] = str(d / f"{name.lower()}.json")
        shutil.copy(p["PLAN"], p[name])
    legacy = json.loads(open(p["PLAN_HEAD_DIM"]).read())
    del legacy["granularity"]
    p["PLAN_HEAD_DIM_V0"] = str(d / "plan_head_dim_v0.json")
    with open(p["PLAN_HEAD_DIM_V0"], "w") as f:
        json.dump(legacy, f)
    for name, model in (("SENS", "{M}"), ("SENS_SMALL", "{SMALL}")):  # spa sensitivity results
        _setup(p, ["sensitivity", model, "-q", "-o", "{PLAN}"])
        p[name] = str(d / f"{name.lower()}.json")
        shutil.copy(p["PLAN"], p[name])
    return p


@pytest.fixture(scope="module")
def runs(paths):
    """outcome(argv), each distinct run once."""
    done = {}

    def get(argv, prepare=None):
        if prepare == "copy":
            shutil.copy(paths["M"], paths["COPY"])
            return outcome(paths, argv)
        key = tuple(argv)
        if key not in done:
            done[key] = outcome(paths, argv)
        return done[key]
    return get


# ------------------------------------------------------------------------------------------------
# the test
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, option", [(c, o) for c, options in CONTRACT.items() for o in options])
def test_option_takes_effect_or_is_refused(paths, runs, command, option):
    case = CONTRACT[command][option]
    assert case.given or case.refused or case.check, "a contract says what the option does or where it is refused"
    argvs = [a for pair in [(case.given or [], case.without or [])] + case.also + case.same for a in pair] + \
        [argv + [message] for argv, message in case.refused]
    missing = {k for argv in argvs for a in argv for k in re.findall(r"{(\w+)}", a)} - set(paths)
    if missing or not _installed("torch") and any("taylor" in argv or "--recover" in argv for argv in argvs):
        pytest.skip(f"needs {', '.join(sorted(missing)) or 'PyTorch'} (torch, tokenizers or Pillow)")
    pairs = ([(case.given, case.without)] if case.given is not None else []) + case.also
    spelled = OPTION_STRINGS[command][option]
    for given, without in pairs:
        assert spelled & set(given) and not spelled & set(without), (option, given, without)
        a, b = runs(given, case.prepare), runs(without, case.prepare)
        assert a.rc == 0, (given, a.stderr)  # the option took effect in a run that worked
        assert a != b, f"{option} changed nothing: {' '.join(given)}"
        if case.check and (given, without) == (case.given, case.without):
            case.check(a, b)
    if case.check and case.given is None:
        case.check(paths)
    for argv, message in case.refused:
        assert spelled & set(argv), (option, argv)
        got = runs(argv)
        lines = got.stderr.strip().splitlines()
        assert got.rc == 2 and len(lines) == 1 and lines[0].startswith("spa: error: "), (argv, got.stderr)
        assert message.format(**paths) in lines[0], (argv, lines[0])
        assert got.output is None and got.plan is None, f"a refused run wrote a file: {argv}"
    for one, other in case.same:
        a, b = runs(one), runs(other)
        assert a.rc == 0 and a == b, (one, other)
