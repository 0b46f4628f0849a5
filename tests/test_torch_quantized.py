"""Quantized models in torch (frontends.torch_quant_ops): the converter runs dynamic, QDQ and QOperator
int8 models as onnxruntime does, trains their integer weights as the float values they stand for, and
recovery writes them back on their grid."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")

from test_quantized import _dynamic, _qoperator, _Reader, branchy_net, float_net, mlp_net  # noqa: E402

from spa.frontends.torch_onnx import from_onnx  # noqa: E402
from spa.frontends.torch_recover import recover, synthetic_batches  # noqa: E402
from spa.graph import Graph  # noqa: E402
from spa.pipeline import prune  # noqa: E402
from spa.quant import as_float, is_integer_weight  # noqa: E402
from spa.runtime import random_inputs, run  # noqa: E402
from spa.selection import Target  # noqa: E402

torch.set_num_threads(1)


def _qdq(folder, model):
    onnx.save(model, str(folder / "float.onnx"))
    quantization.quantize_static(str(folder / "float.onnx"), str(folder / "qdq.onnx"), _Reader(),
                                 quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                 activation_type=quantization.QuantType.QInt8,
                                 weight_type=quantization.QuantType.QInt8)
    return onnx.load(str(folder / "qdq.onnx"))


QUANTIZED = {
    "dynamic-mlp": lambda d: _dynamic(d, mlp_net()),
    "dynamic-cnn-per-channel": lambda d: _dynamic(d, float_net(), per_channel=True),
    "qdq": lambda d: _qdq(d, float_net()),
    "qoperator-int8": lambda d: _qoperator(d, float_net(), quantization.QuantType.QInt8),
    "qoperator-uint8-branchy": lambda d: _qoperator(d, branchy_net(), quantization.QuantType.QUInt8),
}


@pytest.fixture(scope="module", params=sorted(QUANTIZED))
def quantized(request, tmp_path_factory):
    return QUANTIZED[request.param](tmp_path_factory.mktemp(request.param))


def _integers(model) -> dict:
    g = Graph.indexed(model)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if is_integer_weight(g, t.name)}


def test_from_onnx_runs_quantized_models_as_onnxruntime_does(quantized):
    feeds = random_inputs(quantized, batch=2, seed=1, default_dim=5)
    expected = run(quantized, feeds)[0]
    module = from_onnx(quantized, verify=False)
    with torch.no_grad():
        got = module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_integer_weights_are_float_parameters_stored_back_as_the_same_integers(quantized):
    integers = _integers(quantized)
    assert integers
    module = from_onnx(quantized, verify=False)
    parameters, stored = module.onnx_parameters(), module.stored_values()
    g = Graph.indexed(quantized)
    for name, q in integers.items():
        assert parameters[name].dtype == torch.float32
        np.testing.assert_allclose(parameters[name].detach().numpy(), as_float(g, name, q), rtol=1e-6, atol=1e-9)
        assert stored[name].dtype == q.dtype and np.array_equal(stored[name], q), name


def test_gradients_reach_integer_weights_through_the_rounding(quantized):
    feeds = random_inputs(quantized, batch=2, seed=2, default_dim=5)
    module = from_onnx(quantized, verify=False)
    module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).pow(2).sum().backward()
    parameters = module.onnx_parameters()
    weights = [n for n, q in _integers(quantized).items() if q.dtype != np.int32]  # (not the int32 biases)
    assert all(parameters[n].grad is not None and parameters[n].grad.abs().sum() > 0 for n in weights)


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_recovery_of_a_pruned_quantized_model_lowers_its_loss_on_the_integer_grid(quantized):
    pruned = prune(quantized, Target(ratio=0.5), criterion="l1").model
    result = recover(quantized, pruned, synthetic_batches(quantized, batch_size=32, dims={"tokens": 5}), 60,
                     lr=3e-3, threads=1)
    assert result.improved and result.loss_after < result.loss_before
    before, after = _weights(pruned), _weights(result.model)
    integers = _integers(pruned)
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and after[name].shape == value.shape, name
        if name not in integers and value.dtype != np.float32:  # scales are float: zero points stay
            assert np.array_equal(after[name], value), name
    assert any(not np.array_equal(after[n], before[n]) for n in integers)


def test_recovery_keeps_the_zeros_of_a_sparse_integer_model_at_their_zero_points(tmp_path):
    """QOperator uint8 weights have zero points other than 0: a 2:4 pattern is weights at their zero
    point, and distillation with keep_zeros leaves them there."""
    from spa.sparsity import parse_pattern, sparsify

    model = _qoperator(tmp_path, branchy_net(), quantization.QuantType.QUInt8)
    sparse, _ = sparsify(model, parse_pattern("2:4"), "l1")
    result = recover(model, sparse, synthetic_batches(model, batch_size=32), 40, lr=3e-3, threads=1, keep_zeros=True)
    assert result.improved
    g_before, g_after = Graph.indexed(sparse), Graph.indexed(result.model)
    moved = 0
    for name, q in _integers(sparse).items():
        before, after = as_float(g_before, name, q), as_float(g_after, name, g_after.consts[name])
        assert np.all(after[before == 0] == 0), name
        moved += int(np.any(after != before))
    assert moved


def test_quantizers_of_types_torch_has_no_form_for_are_named():
    """int4 (and float8) weights have no torch dtype: the converter, and so recovery, names them."""
    from onnx import TensorProto, helper

    from spa.errors import SpaError
    from spa.frontends.torch_onnx import unsupported_ops

    w = helper.make_tensor("w", TensorProto.INT4, [4, 2], [1, -2, 3, 0, 1, 1, -1, 2])
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"]), helper.make_node("MatMul", ["x", "wf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [w, numpy_helper.from_array(np.array(0.1, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert unsupported_ops(model) == ["DequantizeLinear of int4"]
    with pytest.raises(SpaError, match="DequantizeLinear of int4"):
        from_onnx(model)


def test_a_pruned_int8_model_is_written_for_pytorch_and_says_how_it_rounds(tmp_path, capsys):
    """`-o small.pt2` from an int8 model: a fake-quantized torch module, checked against the pruned ONNX
    within ROUNDING_RTOL (onnxruntime's integer kernels round at other boundaries), and the line says so."""
    from spa.cli import main

    onnx.save(_dynamic(tmp_path, mlp_net()), str(tmp_path / "int8.onnx"))
    out = tmp_path / "small.pt2"
    assert main(["prune", str(tmp_path / "int8.onnx"), "-o", str(out), "--ratio", "0.5", "--criterion", "l1"]) == 0
    assert "an int8 model: the torch module quantizes in float" in capsys.readouterr().err
    module = torch.export.load(str(out)).module()
    assert any(p.numel() for p in module.parameters())


def test_a_dynamically_quantized_lstm_quantizes_its_inputs_and_states_as_onnxruntime_does(tmp_path):
    """quantize_dynamic turns an LSTM into com.microsoft DynamicQuantizeLSTM, whose products read the input
    sequence and every step's hidden state quantized to uint8: emulated, the torch module follows
    onnxruntime over a long sequence (left in float, a chaotic LSTM drifts away from it)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    hidden, features, steps = 16, 8, 60
    weights = {"W": rng.normal(size=(1, 4 * hidden, features)) * 0.8,
               "R": rng.normal(size=(1, 4 * hidden, hidden)) * 0.8, "B": rng.normal(size=(1, 8 * hidden)) * 0.1}
    lstm = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=hidden)
    graph = helper.make_graph([lstm], "lstm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = _dynamic(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op_type for n in model.graph.node] == ["DynamicQuantizeLSTM"]
    x = rng.normal(size=(steps, 1, features)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    with torch.no_grad():
        got = from_onnx(model, verify=False)(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() < 1e-3


def test_an_int8_model_whose_torch_copy_drifts_too_far_is_refused_with_the_reason(tmp_path, monkeypatch):
    """Where onnxruntime's integer rounding and the torch copy's part by more than ROUNDING_RTOL, the
    check refuses with why, and names what still works."""
    from spa.errors import SpaError
    from spa.frontends import torch_onnx

    model = _dynamic(tmp_path, mlp_net())
    monkeypatch.setattr(torch_onnx, "ROUNDING_RTOL", 0.0)
    monkeypatch.setattr(torch_onnx, "verify_module", lambda *a, **k: (_ for _ in ()).throw(SpaError("verify: drift")))
    with pytest.raises(SpaError, match="an int8 model, whose torch copy quantizes in float.*obspa, still work"):
        from_onnx(model)


def test_a_quantizer_whose_output_type_is_left_unset_is_supported():
    """QuantizeLinear's output_dtype written as 0 (unset: the zero point's type) is no unsupported type."""
    from onnx import TensorProto, helper

    from spa.frontends.torch_onnx import unsupported_ops

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], output_dtype=0),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                               numpy_helper.from_array(np.array(3, np.uint8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert unsupported_ops(model) == []
    x = np.linspace(-1, 1, 4, dtype=np.float32)[None]
    np.testing.assert_allclose(from_onnx(model, verify=False)(torch.from_numpy(x)).detach().numpy(),
                               run(model, {"x": x})[0], atol=1e-7)
