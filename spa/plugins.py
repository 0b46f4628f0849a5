"""Pipeline stages that live in the framework frontends, found by name through Python entry points
(pyproject.toml: `[project.entry-points."spa.criteria"]`, `"spa.calibration"`, `"spa.recovery"`),
so that the core never imports a framework and a frontend (ours or anyone's) adds a stage by
declaring it.

- spa.criteria: `saliency(model, criterion, batches=..., labels=..., seed=..., progress=...)` ->
  {weight name: per-element saliency}; the core lifts it to channel groups.
- spa.calibration: `synthesise(model, batches, seed=..., progress=...)` -> batches: calibration
  inputs made from the model itself, starting from synthetic ones.
- spa.recovery: `recover(original, pruned, batches, steps, seed=..., progress=..., holdout=..., lr=...,
  seconds=...)` -> an object with `.model` (the pruned ModelProto after recovery); `batches`: a list of
  feeds or `step -> feeds`, `holdout`: feeds to judge the recovery on (None: its own choice), `lr`: the
  peak learning rate (None: its own choice), `seconds`: a time budget instead of steps (steps 0); `lr`
  and `seconds` are passed only when given.
"""
from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points

from .errors import SpaError

KINDS = {"spa.criteria": "criterion", "spa.calibration": "calibration", "spa.recovery": "recovery"}
FRAMEWORKS = {"torch": "PyTorch (pip install spa[torch])", "tensorflow": "TensorFlow (pip install spa[tensorflow])",
              "jax": "JAX (pip install spa[jax])"}


@lru_cache(maxsize=None)
def _declared(group: str) -> dict:
    return {ep.name: ep for ep in entry_points(group=group)}


def names(group: str) -> list:
    return sorted(_declared(group))


def load(group: str, name: str):
    """The callable registered as `name` in `group`; SpaError with one line if it is not
    registered or its framework is missing."""
    entry = _declared(group).get(name)
    if entry is None:
        raise SpaError(f"no {KINDS[group]} '{name}' is installed "
                       f"(known: {', '.join(names(group)) or 'none'})")
    try:
        return entry.load()
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        need = FRAMEWORKS.get(missing, missing or str(exc))
        raise SpaError(f"{KINDS[group]} {name} needs {need}") from None
