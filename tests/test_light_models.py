"""The architecture-only models shipped with the onnx package: prune, stay valid, pass the oracle."""
import pytest

from light_models import SLOW_LIGHT_MODELS, light_model_paths, materialize
from oracle import check_exact
from spa.selection import Target

PATHS = light_model_paths(include_slow=True)


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_light_model_prunes_exactly(path):
    model = materialize(path, seed=0, check=False, calibrate=path.stem not in SLOW_LIGHT_MODELS)
    check_exact(model, Target(ratio=0.3), batch=1)


def test_light_resnet50_prunes_with_its_fills_and_stays_small(tmp_path):
    """The raw file, weights still ConstantOfShape fills: every conv group prunes, the pruned file
    verifies, matches the oracle on the logits (the softmax of uniform logits says nothing) and
    keeps the fills (shrunk shape vectors), not their values."""
    import os

    import numpy as np
    import onnx

    path = next((p for p in PATHS if p.stem == "light_resnet50"), None)
    if path is None or not path.exists():
        pytest.skip("onnx's light models are not installed")
    from spa import analyze
    from spa.graph import load_model
    from spa.pipeline import prune, save
    from spa.runtime import random_inputs, run
    from spa.verify import masked_original

    model = load_model(str(path))
    analysis = analyze(model)
    assert sum(g.prunable for g in analysis.groups) == 37  # all but the classifier's output
    result = prune(model, Target(ratio=0.3))
    assert len(result.plan.removed_atoms) > 3000
    out = tmp_path / "pruned.onnx"
    feeds = random_inputs(model, batch=1, seed=3)
    save(result.model, str(out), feeds=feeds)  # checker, onnxruntime, one run
    assert os.path.getsize(out) < os.path.getsize(path)
    assert max(t.ByteSize() for t in result.model.graph.initializer) < 1024
    assert sum(n.op_type == "ConstantOfShape" for n in result.model.graph.node) == \
        sum(n.op_type == "ConstantOfShape" for n in model.graph.node)
    logits = next(n.output[0] for n in model.graph.node if n.op_type == "Gemm")

    def with_logits(m):
        m.graph.output.append(onnx.helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, None))
        return m

    got = run(with_logits(onnx.load(out)), feeds)[-1]
    expected = run(with_logits(masked_original(result.plan)), feeds)[-1]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
