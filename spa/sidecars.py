"""Files beside a model that describe it, and what a prune changes in them: onnxruntime-genai's
genai_config.json states the decoder's head counts, which pruning query heads changes."""
from __future__ import annotations

import json
import os

import onnx

from .graph import attr

GENAI_CONFIG = "genai_config.json"


def stale_genai_heads(model_path: str, pruned: onnx.ModelProto) -> str | None:
    """A warning where the genai_config.json beside `model_path` states head counts that the pruned
    model's GroupQueryAttention no longer has; None where it agrees, or there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), GENAI_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            decoder = json.load(f)["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    nodes = [n for n in pruned.graph.node if n.op_type == "GroupQueryAttention"]
    if not nodes or not isinstance(decoder, dict):
        return None
    changed = [f"{key} {decoder[key]} -> {attr(nodes[0], name)}"
               for key, name in (("num_attention_heads", "num_heads"), ("num_key_value_heads", "kv_num_heads"))
               if key in decoder and decoder[key] != attr(nodes[0], name)]
    if not changed:
        return None
    return (f"{path} states the original head counts ({', '.join(changed)} in the pruned model): set them in the "
            f"{GENAI_CONFIG} you deploy with the pruned model (onnxruntime-genai 0.18 generated with it unchanged on "
            "the CPU)")
