"""The equivalence oracle shared by the tests: pruned model == original with consumer slices zeroed."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx

from spa.groups import Options
from spa.pipeline import prune, save
from spa.selection import Target
from spa.runtime import random_inputs, run
from spa.verify import masked_original


def check_exact(model: onnx.ModelProto, target: Target | None = None, options: Options | None = None,
                criterion="l1", batch=2, atol=1e-4, rtol=1e-4, dims=None, expect_removed=True, fused=True,
                oracle=masked_original, **kw):
    """Prune, verify validity, compare with the oracle; returns the prune Result. fused False: both
    run without onnxruntime's graph optimisations (QDQ models: the oracle's masks break the
    int8 fusions the pruned model gets, and fused int8 kernels round differently across CPUs).
    `oracle(plan) -> model`: the masked original (a test that adds to it says why)."""
    target = target or Target(ratio=0.5)
    result = prune(model, target, criterion=criterion, options=options, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pruned.onnx")
        feeds = random_inputs(model, batch=batch, seed=3, dims=dims)
        save(result.model, path, feeds=feeds)
        got = _run(path, feeds, fused)
    expected = _run(oracle(result.plan), feeds, fused)
    for name, e, g in zip([o.name for o in model.graph.output], expected, got):
        assert e.shape == g.shape, f"output {name}: shape {g.shape} != {e.shape}"
        np.testing.assert_allclose(g, e, atol=atol * max(1.0, float(np.abs(e).max())), rtol=rtol,
                                   err_msg=f"output {name} differs from the oracle")
    if expect_removed:
        assert len(result.plan.removed_atoms) > 0, "nothing was pruned"
        assert _numel(result.model) < _numel(model), "parameter count did not shrink"
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    return result


def _run(source, feeds, fused: bool) -> list:
    if fused:
        return run(source, feeds)
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _numel(model):
    from spa.cost import count_params
    return count_params(model)


def compensated_and_not(model: onnx.ModelProto, dims=None, ratio=0.5) -> tuple:
    """OBSPA at `ratio` with compensation "obs" and "none": ({compensation: Result}, the progress
    lines, {compensation: mean squared output error to the original on fresh inputs})."""
    said, results = [], {}
    for compensation in ("obs", "none"):
        results[compensation] = prune(model, Target(ratio=ratio), criterion="obspa", compensation=compensation,
                                      progress=said.append)
    feeds = random_inputs(model, batch=64, seed=11, dims=dims)
    reference = run(model, feeds)[0]
    errors = {k: float(np.mean((run(r.model, feeds)[0] - reference) ** 2)) for k, r in results.items()}
    return results, said, errors
