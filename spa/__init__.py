"""SPA: Structurally Prune Anything. Prune ONNX models physically: analyze, score, select, rewrite.

    import spa
    small = spa.prune("model.onnx", ratio=0.5)   # keywords = the CLI flags
    small.save("small.onnx"); print(small.stats)
"""
from .api import Pruned, analyze, prune, sensitivity, sparsify, sweep
from .errors import SpaError
from .groups import Analysis, Group, Options

__all__ = ["SpaError", "Analysis", "Group", "Options", "Pruned", "analyze", "prune", "sensitivity", "sparsify",
           "sweep"]
