"""What the three ``apply_plan`` functions (torch, Keras, JAX) share: one keyword shape,

    apply_plan(model, plan, *, pruned=None, weight_map=None, example_inputs=None, verify=None,
               rtol=1e-4) -> the narrowed model

and the deprecated keyword names each frontend used before (a DeprecationWarning, same effect)."""
from __future__ import annotations

import warnings

# frontend -> {old keyword: new keyword}
DEPRECATED = {
    "torch": {"onnx_path": "pruned"},
    "keras": {"pruned_onnx": "pruned", "onnx_model": "weight_map"},
    "jax": {},  # the pruned model was the third positional argument: see spa.frontends.jax.apply_plan
}


def renamed_keywords(frontend: str, old: dict, new: dict) -> dict:
    """``new`` (keyword -> value) updated from the deprecated keywords in ``old``; unknown keywords
    are a TypeError, as for any function."""
    renames = DEPRECATED[frontend]
    for key, value in old.items():
        target = renames.get(key)
        if target is None:
            raise TypeError(f"apply_plan() got an unexpected keyword argument '{key}'")
        warnings.warn(f"apply_plan({key}=...) is deprecated: use {target}=", DeprecationWarning, stacklevel=3)
        if new.get(target) is not None:
            raise TypeError(f"apply_plan(): pass {target}= or {key}=, not both")
        new[target] = value
    return new
