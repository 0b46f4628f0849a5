"""PyTorch frontend: export with a weight map, narrow a module to a SPA plan, ONNX -> torch.

    from spa.frontends.torch import export, apply_plan, from_onnx

    exported = export(model, (x,), "model.onnx")                    # + weight map in metadata
    # spa prune model.onnx -o small.onnx --ratio 0.5 --plan-out plan.json
    apply_plan(model, "plan.json", pruned="small.onnx")  # model narrowed in place (and returned)
    model.spa_report                                     # what was narrowed, what could not be
    module = from_onnx("small.onnx")                                 # or: any ONNX -> nn.Module
"""
from __future__ import annotations

from . import torch_dpp as dpp
from . import torch_prune as prune
from .torch_apply import PlanReport, apply_plan
from .torch_export import METADATA_KEY, Exported, export, weight_map_of
from .torch_onnx import OnnxModule, from_onnx, supported_ops

__all__ = ["export", "Exported", "weight_map_of", "METADATA_KEY", "apply_plan", "PlanReport",
           "from_onnx", "OnnxModule", "supported_ops", "to_onnx", "dpp", "prune"]


def to_onnx(path: str, out_path: str, input_shapes=None) -> str:
    """A saved torch model -> ONNX at ``out_path``: ``.pt2`` (torch.export.save'd
    ExportedProgram, shapes from its example inputs) or a TorchScript ``.pt``/``.pth`` archive
    (torch.jit.save; shapes from ``input_shapes`` or an ``input_shapes`` extra file, never guessed)."""
    from .torch_files import convert_file

    return convert_file(path, out_path, input_shapes)
