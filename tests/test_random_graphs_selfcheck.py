"""Self-check of the random CNN generator in tests/random_graphs.py."""
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.random_graphs import (
    INPUT_NAME,
    build_from_blocks,
    cnn_models,
    cnn_specs,
    run_model,
    spec_from_model,
)

FAST = settings(max_examples=30, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def _check_valid(m: onnx.ModelProto, batch: int = 2):
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == [INPUT_NAME]
    assert 1 <= len(m.graph.output) <= 2
    outs = run_model(m, batch=batch)
    for out, vi in zip(outs, m.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in vi.type.tensor_type.shape.dim]
        assert list(out.shape) == dims, vi.name
        assert out.dtype == np.float32
        assert np.isfinite(out).all(), vi.name
    return outs


@FAST
@given(cnn_models())
def test_drawn_models_are_valid_and_run(m):
    _check_valid(m)


@settings(max_examples=10, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(cnn_specs(heads=("none", "gap_gemm"), max_blocks=4))
def test_specs_rebuild_identically(spec):
    m = spec.build()
    assert spec_from_model(m) == spec
    assert m.SerializeToString() == build_from_blocks(
        spec.blocks, spec.seed, opset=spec.opset, size=spec.size).SerializeToString()
    _check_valid(m)


ALL_KINDS = [
    {"op": "conv", "out": 8, "k": 3, "stride": 1, "bias": False},
    {"op": "bn"},
    {"op": "act", "kind": "hardswish"},
    {"op": "tap"},
    {"op": "dwconv", "k": 3, "stride": 2, "bias": True},
    {"op": "gconv", "group": 4, "out": 12, "k": 1, "stride": 1, "bias": True},
    {"op": "act", "kind": "clip"},
    {"op": "residual", "branches": [
        [{"op": "conv", "out": 6, "k": 1, "stride": 1, "bias": True},
         {"op": "act", "kind": "leaky_relu", "alpha": 0.1},
         {"op": "conv", "out": 12, "k": 3, "stride": 1, "bias": False}],
        []]},
    {"op": "se", "hidden": 3},
    {"op": "concat", "branches": [
        [], [{"op": "conv", "out": 5, "k": 3, "stride": 1}],
        [{"op": "pool", "kind": "max", "k": 3, "stride": 1}]]},  # 12 + 5 + 12 = 29
    {"op": "split", "sizes": [10, 9, 10], "order": [2, 0], "branches": [
        [{"op": "act", "kind": "sigmoid"}], None, [{"op": "dwconv", "k": 3, "stride": 1}]]},
    {"op": "slice", "start": 2, "end": 20, "enc": "int64max"},
    {"op": "pool", "kind": "avg", "k": 2, "stride": 2},
    {"op": "slice", "start": 1, "end": 15, "enc": "negative"},
    {"op": "residual", "branches": [
        [{"op": "conv", "out": 7, "k": 3, "stride": 2}],
        [{"op": "act", "kind": "relu"}, {"op": "conv", "out": 7, "k": 1, "stride": 2}]]},
]

HEADS = [
    {"op": "head", "kind": "gap_gemm", "classes": 5, "transB": True, "bias": True},
    {"op": "head", "kind": "flatten_gemm", "classes": 4, "transB": False, "bias": False},
    {"op": "head", "kind": "reshape_matmul", "classes": 3, "batch_dim": 0},
    {"op": "head", "kind": "reshape_matmul", "classes": 3, "batch_dim": -1},
]


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("head", HEADS + [None], ids=lambda h: h and h["kind"])
def test_every_block_kind(opset, head):
    blocks = ALL_KINDS + ([head] if head else [])
    m = build_from_blocks(blocks, seed=1, opset=opset, size=16)
    outs = _check_valid(m, batch=3)
    assert outs[0].shape == (3, 8, 16, 16)
    ops = {n.op_type for n in m.graph.node}
    expected = {"Conv", "BatchNormalization", "Clip", "LeakyRelu", "Sigmoid", "Relu", "Add",
                "Mul", "GlobalAveragePool", "Concat", "MaxPool", "AveragePool", "Split",
                "Slice"}
    assert expected <= ops
    assert ("HardSwish" in ops) == (opset >= 14)


def test_invalid_blocks_are_rejected():
    with pytest.raises(ValueError):
        build_from_blocks([{"op": "gconv", "group": 2, "out": 4, "k": 1, "stride": 1}])  # C=3
    with pytest.raises(ValueError):
        build_from_blocks([{"op": "split", "sizes": [1, 1], "branches": [[], []],
                            "order": [0, 1]}])
    with pytest.raises(ValueError):
        build_from_blocks([{"op": "tap"}])
