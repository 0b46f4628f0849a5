"""load -> analyze -> score -> select -> rewrite -> verify -> write, as one call."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import onnx
from onnx import external_data_helper

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


def prune(model: onnx.ModelProto, target: Target, criterion: str = "l1", aggregation: str = "mean",
          normalization: str = "mean", options: Options | None = None, seed: int = 0,
          progress=lambda message: None, calibration: str = "synthetic", calibration_samples: int = 128,
          damp: float = 0.01, saliency: dict | None = None, labels=None) -> Result:
    """Prune a ModelProto in memory (not yet verified: `save` verifies before writing).

    criterion "obspa": Optimal Brain Surgeon saliency from calibration inputs (spa.calibration
    source string), then the remaining consumer weights are compensated (spa.obspa).
    criterion taylor / snip / grasp / crop / synflow / obd: per-weight saliencies from PyTorch
    autograd on the calibration inputs (spa.frontends.torch_criteria; `labels`: class labels or
    a file) unless `saliency` ({weight name: array}, criterion "saliency" too) is given."""
    target.check()
    if criterion in GRADIENT_CRITERIA and saliency is None:
        return _gradient_prune(model, target, criterion, aggregation=aggregation, normalization=normalization,
                               options=options, seed=seed, progress=progress, calibration=calibration,
                               samples=calibration_samples, labels=labels)
    if criterion == "obspa":
        from .obspa import obspa
        result = obspa(model, target, calibration, calibration_samples, damp=damp, normalization=normalization,
                       options=options, seed=seed, progress=progress)
        return Result(result.model, result.plan, result.analysis)
    progress("analyzing channel coupling")
    analysis = analyze(model, options)
    progress(f"scoring {sum(g.prunable for g in analysis.groups)} prunable groups ({criterion})")
    scores = score(analysis, criterion, aggregation, normalization, seed, saliency=saliency)
    progress("selecting channels")
    plan = select(analysis, scores, target)
    progress(f"rewriting: removing {len(plan.removed_atoms)} channels")
    return Result(rewrite(plan), plan, analysis)


def _gradient_prune(model, target, criterion, **kw) -> Result:
    kw["progress"](f"{criterion}: importing PyTorch")
    try:
        from spa.frontends.torch_criteria import prune as gradient_prune
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "torch":
            raise
        raise SpaError(f"criterion {criterion} needs PyTorch (pip install spa[torch])") from None
    return gradient_prune(model, target, criterion, **kw)


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
