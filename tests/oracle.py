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
                criterion="l1", batch=2, atol=1e-4, rtol=1e-4, dims=None, expect_removed=True, **kw):
    """Prune, verify validity, compare with the oracle; returns the prune Result."""
    target = target or Target(ratio=0.5)
    result = prune(model, target, criterion=criterion, options=options, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pruned.onnx")
        feeds = random_inputs(model, batch=batch, seed=3, dims=dims)
        save(result.model, path, feeds=feeds)
        got = run(path, feeds)
    expected = run(masked_original(result.plan), feeds)
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


def _numel(model):
    from spa.cost import count_params
    return count_params(model)
