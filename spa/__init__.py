"""SPA: Structurally Prune Anything. Prune ONNX models physically: analyze, score, select, rewrite."""
from .errors import SpaError
from .groups import Analysis, Group, Options, analyze

__all__ = ["SpaError", "Analysis", "Group", "Options", "analyze"]
