"""load -> analyze -> score -> select -> rewrite -> verify -> write, as one call."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import onnx
from onnx import external_data_helper

from . import obspa, plugins
from .calibration import Calibration, calibration_batches
from .errors import SpaError
from .graph import weight_bytes
from .groups import Analysis, Options, analyze
from .importance import GRADIENT_CRITERIA, score
from .plan import Plan
from .rewrite import rewrite
from .selection import Target, select
from .verify import validate


@dataclass
class Result:
    model: onnx.ModelProto
    plan: Plan
    analysis: Analysis
    weights: dict = field(default_factory=dict)  # compensated constants (original shapes), before slicing
    scores: dict = field(default_factory=dict)  # group id -> per-channel scores
    recovery: object | None = None  # what the recovery stage reported


def _quiet(message):
    pass


def prune(model: onnx.ModelProto, target: Target, criterion: str = "l1", aggregation: str = "mean",
          normalization: str = "mean", options: Options | None = None, seed: int = 0,
          progress=_quiet, calibration: str | Calibration = "synthetic", calibration_samples: int = 128,
          damp: float = 0.01, saliency: dict | None = None, labels=None, compensation: str | None = None,
          recover: int = 0, calibration_options: Calibration | None = None) -> Result:
    """analyze -> score -> select -> compensate -> rewrite -> recover, in memory (`save` verifies
    and writes).

    criterion "obspa": Optimal Brain Surgeon saliency from calibration inputs (spa.obspa);
    taylor / snip / grasp / crop / synflow / obd: per-weight saliencies from a frontend registered
    for them (spa.plugins; PyTorch autograd), unless `saliency` ({weight name: array}) is given;
    any other: spa.importance. `calibration`: a spa.calibration source string or a Calibration
    (`calibration_options` overrides it). compensation: "obs" (default with obspa), "reference"
    or "none" (default otherwise): OBS weight compensation of the layers that lose inputs, with
    any criterion. recover: steps of data-free distillation of the original into the pruned model
    (a spa.recovery frontend)."""
    target.check()
    compensation = compensation or ("obs" if criterion == "obspa" else "none")
    cal = _calibration(calibration_options or calibration, calibration_samples, seed)
    progress("analyzing channel coupling")
    analysis = analyze(model, options)
    needs_data = criterion == "obspa" or compensation != "none" or recover or \
        (criterion in GRADIENT_CRITERIA and criterion != "synflow" and saliency is None)
    batches = calibration_batches(model, cal, progress=progress) if needs_data else []
    measured = None
    progress(f"scoring {sum(g.prunable for g in analysis.groups)} prunable groups ({criterion})")
    if criterion == "obspa":
        scores, measured = obspa.scores(analysis, batches, damp, normalization, seed, progress)
    else:
        if criterion in GRADIENT_CRITERIA and saliency is None:
            saliency = plugins.load("spa.criteria", criterion)(
                model, criterion, batches=batches or None, calibration=cal.source, labels=labels, seed=seed,
                progress=progress)
        scores = score(analysis, criterion, aggregation, normalization, seed, saliency=saliency)
    progress("selecting channels")
    plan = select(analysis, scores, target)
    weights = obspa.compensation_stage(analysis, plan, compensation, batches, measured, damp, seed, progress)
    progress(f"rewriting: removing {len(plan.removed_atoms)} channels")
    result = Result(rewrite(plan, weights=weights), plan, analysis, weights, scores)
    if recover:
        result.recovery = plugins.load("spa.recovery", "distill")(
            model, result.model, batches, recover, seed=seed, progress=progress)
        result.model = result.recovery.model
    return result


def _calibration(source, samples: int, seed: int) -> Calibration:
    if isinstance(source, Calibration):
        return source
    return Calibration(source=source or "synthetic", samples=samples, seed=seed)


def apply_plan(model: onnx.ModelProto, plan_path: str, options: Options | None = None) -> Result:
    from .plan import load_plan
    analysis = analyze(model, options)
    plan = load_plan(analysis, plan_path)
    return Result(rewrite(plan), plan, analysis)


def save(model: onnx.ModelProto, path: str, external: set | None = None, feeds: dict | None = None) -> None:
    """Verify, then write atomically: on any failure nothing is written.

    `external`: names of tensors to keep in one external data file beside the model (the input's
    layout); models over the 2 GB protobuf limit always go external.
    """
    target_dir = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(target_dir):
        raise SpaError(f"output directory {target_dir} does not exist")
    tmp = tempfile.mkdtemp(prefix=".spa-", dir=target_dir)
    try:
        name = os.path.basename(path)
        staged = os.path.join(tmp, name)
        data_name = name + ".data"
        if weight_bytes(model) > 1_800_000_000:  # protobuf cannot hold 2 GB in one file
            onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            validate(staged, feeds, model)
        elif external:
            for tensor in model.graph.initializer:
                if tensor.name in external:
                    external_data_helper.set_external_data(tensor, location=data_name)
            onnx.save_model(model, staged)
            validate(staged, feeds, model)
        else:  # serialised once: checked, run and written from the same bytes
            data = model.SerializeToString()
            validate(data, feeds, model)
            with open(staged, "wb") as f:
                f.write(data)
        if os.path.exists(os.path.join(tmp, data_name)):
            os.replace(os.path.join(tmp, data_name), os.path.join(target_dir, data_name))
        os.replace(staged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
