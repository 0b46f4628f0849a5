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
from .importance import score
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
          progress=lambda message: None) -> Result:
    """Prune a ModelProto in memory (not yet verified: `save` verifies before writing)."""
    target.check()
    progress("analyzing channel coupling")
    analysis = analyze(model, options)
    progress(f"scoring {sum(g.prunable for g in analysis.groups)} prunable groups ({criterion})")
    scores = score(analysis, criterion, aggregation, normalization, seed)
    progress("selecting channels")
    plan = select(analysis, scores, target)
    progress(f"rewriting: removing {len(plan.removed_atoms)} channels")
    return Result(rewrite(plan), plan, analysis)


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
        else:
            for tensor in model.graph.initializer:
                if external and tensor.name in external:
                    external_data_helper.set_external_data(tensor, location=data_name)
            onnx.save_model(model, staged)
        validate(staged, feeds)
        if os.path.exists(os.path.join(tmp, data_name)):
            os.replace(os.path.join(tmp, data_name), os.path.join(target_dir, data_name))
        os.replace(staged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
