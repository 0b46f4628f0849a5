"""float16, bfloat16 and float64 models prune like float32 ones: same groups, weights kept in
their type, pruned == the oracle within the type's precision.

onnxruntime's CPU provider has float16 kernels for these ops, float64 ones for MatMul/Gemm but
not Conv or pooling, and bfloat16 ones for none: a model it cannot run is executed (for
verification, the oracle, calibration) on its float32 copy, inputs cast in and outputs cast back
(spa.runtime.Float32Session); the written model keeps its type and passes the full checker."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder import Builder
from oracle import check_exact
from spa.obspa import set_weights
from spa.pipeline import prune, save
from spa.runtime import float32_surrogate, random_inputs, run, session
from spa.selection import Target
from spa.verify import masked_original

N = "batch"
DTYPES = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16, "float64": TensorProto.DOUBLE}
# relative to the output's magnitude: half precision outputs differ in their last bits when the
# pruned model sums fewer terms (float16: 11 significant bits, bfloat16: 8)
TOLERANCE = {"float16": 1e-2, "bfloat16": 2e-2, "float64": 1e-5}


def converted(model: onnx.ModelProto, elem_type: int) -> onnx.ModelProto:
    """The float32 model with every float initializer and value type in `elem_type`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    inits = [numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name)
             if t.data_type == TensorProto.FLOAT else t for t in copy.graph.initializer]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(inits)
    for vi in list(copy.graph.input) + list(copy.graph.output) + list(copy.graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = elem_type
    onnx.checker.check_model(copy, full_check=True)
    return copy


def conv_net():
    """Conv-BN-Relu, Conv, GlobalAveragePool, Flatten, MatMul, Gemm. Opset 22: the first whose
    Conv, BatchNormalization and pooling accept bfloat16."""
    b = Builder(opset=22)
    x = b.input([N, 3, 8, 8])
    y = b.op("Relu", [b.bn(b.conv(x, 3, 8), 8)])
    y = b.op("Relu", [b.conv(y, 8, 6)])
    y = b.op("MatMul", [b.op("Flatten", [b.op("GlobalAveragePool", [y])]), b.weight(6, 7)])
    b.output(b.gemm(b.op("Relu", [y]), 7, 5))
    return b.model()


def mlp():
    b = Builder(opset=22)
    x = b.input([N, 6])
    y = b.op("Relu", [b.op("Add", [b.op("MatMul", [x, b.weight(6, 10)]), b.weight(10)])])
    b.output(b.gemm(b.op("Tanh", [y]), 10, 4, transB=1))
    return b.model()


def _types(model):
    return {t.data_type for t in model.graph.initializer if t.data_type != TensorProto.INT64}


@pytest.mark.parametrize("build", [conv_net, mlp])
@pytest.mark.parametrize("name", list(DTYPES))
def test_l1_prunes_every_float_type_exactly(name, build):
    model = converted(build(), DTYPES[name])
    result = check_exact(model, atol=TOLERANCE[name], rtol=TOLERANCE[name])
    assert _types(result.model) == {DTYPES[name]}
    assert [o.type.tensor_type.elem_type for o in result.model.graph.output] == [DTYPES[name]]
    onnx.checker.check_model(result.model, full_check=True)
    # same channels as the float32 model: scores are computed in float64 whatever the type
    reference = prune(build(), Target(ratio=0.5))
    if name != "float64":  # rounding may swap near-ties in half precision
        return
    np.testing.assert_array_equal(result.plan.removed_atoms, reference.plan.removed_atoms)


@pytest.mark.parametrize("name", list(DTYPES))
def test_obspa_keeps_the_type_and_matches_the_compensated_oracle(name, tmp_path):
    model = converted(conv_net(), DTYPES[name])
    result = prune(model, Target(ratio=0.5), criterion="obspa", calibration="synthetic")
    feeds = random_inputs(model, batch=2, seed=3)
    assert {np.asarray(v).dtype for v in feeds.values()} == {np.dtype(helper.tensor_dtype_to_np_dtype(DTYPES[name]))}
    save(result.model, str(tmp_path / "pruned.onnx"), feeds=feeds)
    assert _types(result.model) == {DTYPES[name]}
    assert result.weights and all(np.asarray(v).dtype == helper.tensor_dtype_to_np_dtype(DTYPES[name])
                                  for v in result.weights.values())
    got = run(str(tmp_path / "pruned.onnx"), feeds)[0].astype(np.float64)
    oracle = run(set_weights(masked_original(result.plan), result.weights), feeds)[0].astype(np.float64)
    assert got.dtype == oracle.dtype
    tol = TOLERANCE[name] * max(1.0, float(np.abs(oracle).max()))
    np.testing.assert_allclose(got, oracle, atol=tol, rtol=TOLERANCE[name])


def test_which_models_run_on_a_float32_copy():
    """float16 and a float64 MLP run natively; float64 Conv and any bfloat16 on the float32 copy,
    with inputs and outputs in the model's own type."""
    for name, build, surrogate in [("float16", conv_net, False), ("float64", mlp, False),
                                   ("float64", conv_net, True), ("bfloat16", mlp, True)]:
        model = converted(build(), DTYPES[name])
        sess = session(model)
        assert getattr(sess, "surrogate", False) == surrogate, (name, build.__name__)
        feeds = random_inputs(model, batch=2)
        [out] = sess.run(None, feeds)
        assert out.dtype == helper.tensor_dtype_to_np_dtype(DTYPES[name])
        if surrogate:
            copy = float32_surrogate(model)
            assert not {t.data_type for t in copy.graph.initializer} & set(DTYPES.values())
            [ref] = run(copy, {k: v.astype(np.float32) for k, v in feeds.items()})
            np.testing.assert_array_equal(out, ref.astype(out.dtype))


def test_unrunnable_model_still_raises():
    """The float32 copy stands in only for missing kernels, never for a broken model."""
    model = converted(mlp(), TensorProto.DOUBLE)
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(Exception):
        session(model)


def test_bfloat16_obspa_with_inverted_calibration(tmp_path):
    """The default calibration of a BatchNorm model (inverted, PyTorch) optimises inputs on the
    float32 copy and hands back bfloat16 batches."""
    pytest.importorskip("torch")
    model = converted(conv_net(), TensorProto.BFLOAT16)
    result = prune(model, Target(ratio=0.5), criterion="obspa", calibration_samples=16)
    save(result.model, str(tmp_path / "pruned.onnx"))
    assert _types(result.model) == {TensorProto.BFLOAT16}


def test_cli_announces_verification_on_a_float32_copy(tmp_path, capsys):
    from spa.cli import main

    source, out = tmp_path / "f64.onnx", tmp_path / "small.onnx"
    onnx.save(converted(conv_net(), TensorProto.DOUBLE), source)
    assert main(["prune", str(source), "-o", str(out), "--ratio", "0.5", "-q"]) == 0
    err = capsys.readouterr().err
    assert "spa: warning: verified on a float32 copy" in err
    assert onnx.load(out).graph.input[0].type.tensor_type.elem_type == TensorProto.DOUBLE
