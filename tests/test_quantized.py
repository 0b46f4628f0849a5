"""Quantized models (onnxruntime.quantization, QuantFormat.QDQ and QOperator, per-channel weights)
prune with their quantization parameters sliced, scored on the dequantized weights, and match the
oracle: the quantized original with the consumers' weight slices zeroed (QOperator: set to their
zero point), bit-exactly for QOperator."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder import Builder, four_bit_mlp
from oracle import check_exact, compensated_and_not
from spa import analyze
from spa.cli import main
from spa.graph import Graph, attr
from spa.importance import member_scores
from spa.pipeline import prune, save
from spa.quant import integer_conv_weights
from spa.runtime import random_inputs, run
from spa.selection import Target

quantization = pytest.importorskip("onnxruntime.quantization")
N = "batch"


def float_net():
    """Conv-Relu, depthwise Conv, Conv, residual Add, GlobalAveragePool, Flatten, Gemm."""
    b = Builder(opset=17)
    x = b.input([N, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8)])
    y = b.op("Relu", [b.conv(y, 8, 8, group=8)])
    z = b.op("Add", [b.conv(y, 8, 8, k=1), y])
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [z])])]), 8, 5))
    return b.model()


class _Reader(quantization.CalibrationDataReader):
    def __init__(self, batches=4):
        rng = np.random.default_rng(0)
        self.batches = iter([{"input": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
                             for _ in range(batches)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    """(float model, its QDQ quantization: int8 per-channel weights, int8 per-tensor activations)."""
    folder = tmp_path_factory.mktemp("qdq")
    model = float_net()
    onnx.save(model, str(folder / "float.onnx"))
    quantization.quantize_static(str(folder / "float.onnx"), str(folder / "qdq.onnx"), _Reader(),
                                 quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                 activation_type=quantization.QuantType.QInt8,
                                 weight_type=quantization.QuantType.QInt8)
    quantized = onnx.load(str(folder / "qdq.onnx"))
    assert {n.op_type for n in quantized.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    return model, quantized


def _inits(model):
    return {t.name: t for t in model.graph.initializer}


def test_qdq_model_has_prunable_groups_with_sliced_parameters(qdq):
    _, model = qdq
    analysis = analyze(model)
    prunable = [g for g in analysis.groups if g.prunable]
    assert prunable, [g.reasons() for g in analysis.groups]
    members = {m.tensor for g in prunable for m in g.members}
    scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    per_channel = {s for s in scales if len(_inits(model)[s].dims) == 1}
    per_tensor = scales - per_channel
    assert per_channel & members  # sliced with their weight's output channel
    assert not per_tensor & members  # activation scales: untouched


def test_qdq_l1_prunes_exactly_and_slices_scales(qdq):
    _, model = qdq
    result = check_exact(model, atol=1e-4, rtol=1e-4, fused=False)
    before, after = _inits(model), _inits(result.model)
    for name, t in after.items():
        assert t.data_type == before[name].data_type, name  # int8 stays int8, int32 bias stays int32
    dq = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in after
          and len(after[n.input[0]].dims) > 1]
    sliced = 0
    for node in dq:
        weight, scale = after[node.input[0]], after[node.input[1]]
        axis = [a.i for a in node.attribute if a.name == "axis"] or [1]
        if len(scale.dims) == 1:
            assert scale.dims[0] == weight.dims[axis[0]]
            assert after[node.input[2]].dims == scale.dims
            sliced += scale.dims[0] < before[node.input[1]].dims[0]
    assert sliced
    onnx.checker.check_model(result.model, full_check=True)


def test_quantized_weights_count_as_parameters(qdq):
    """A quantized layer's int8 weight is as many parameters as its float original (before: only float
    tensors counted, so a QDQ model's --target-params budgeted its biases and scales)."""
    from spa.cost import count_params

    float_model, model = qdq
    names = {n.input[1] for n in model.graph.node if n.op_type in ("DequantizeLinear", "QuantizeLinear")}
    scales = sum(int(np.prod(_inits(model)[name].dims)) for name in names if name in _inits(model))
    assert count_params(model) == count_params(float_model) + scales


def test_four_bit_weights_prune_exactly_and_stay_packed():
    """INT4 weights (two to a byte in the file, one to a byte in numpy) are written packed: before, the
    pruned file held twice the bytes its dims need and onnxruntime refused it."""
    from spa.cost import count_params

    model = four_bit_mlp()
    assert count_params(model) == 64 * 128 + 128 * 32 + 128 + 2
    result = check_exact(model, atol=1e-4, rtol=1e-4, fused=False)
    after = _inits(result.model)
    assert after["w1"].data_type == TensorProto.INT4 and list(after["w1"].dims) == [64, 64]
    assert len(after["w1"].raw_data) == 64 * 64 // 2
    onnx.checker.check_model(result.model, full_check=True)


def test_qdq_scores_read_the_dequantized_weights(qdq):
    """l1 of an int8 weight is the l1 of (q - zero point) * scale, close to the float weight's;
    scales and zero points are never scored."""
    float_model, model = qdq
    floats = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    for member in scored_like_the_floats(model, floats):
        assert member.tensor.endswith("_quantized") or member.tensor in floats, member.tensor


def scored_like_the_floats(model, floats) -> list:
    """The scored members of `model`'s groups, after checking that the l1 score of every weight
    with a float original is (within 5%) the float weight's l1; at least three such weights."""
    analysis = analyze(model)
    members, checked = [], 0
    for group in analysis.groups:
        for member, values in member_scores(analysis, group, "l1") if group.has_params else []:
            members.append(member)
            original = member.tensor.removesuffix("_quantized")
            if original in floats and floats[original].ndim > 1:
                w = np.moveaxis(floats[original], member.axis, 0).reshape(values.shape[0], -1)
                np.testing.assert_allclose(values, np.abs(w).sum(axis=1), rtol=0.05)
                checked += 1
    assert checked >= 3
    return members


def test_qdq_obspa_plans_prune_exactly(qdq, tmp_path):
    _, model = qdq
    result = check_exact(model, criterion="obspa", calibration="synthetic", atol=1e-4, rtol=1e-4,
                         compensation="none", fused=False)
    assert not result.weights


def test_obspa_compensates_qdq_layers_on_their_integer_grid(qdq):
    """OBSPA reads a QDQ layer as its integer weight (and int32 bias) behind the DequantizeLinear,
    compensates it in float and rounds the update back onto the weight's per-channel grid (GPTQ-style):
    the weights stay integers, and the outputs move less from the original's than without compensation."""
    _, model = qdq
    results, said, errors = compensated_and_not(model)
    assert any("integer weights (QDQ, QOperator, dynamically quantized" in m and "integer grid" in m
               for m in said), said
    compensated = results["obs"]
    before = _inits(model)
    assert any(before[name].data_type == TensorProto.INT32 for name in compensated.weights)  # a bias
    for name, value in compensated.weights.items():
        assert value.dtype == numpy_helper.to_array(before[name]).dtype  # integers, on the grid
    assert errors["obs"] < errors["none"], errors


def test_qdq_weights_quantized_along_their_input_channels_are_scored_not_compensated():
    """A per-axis scale along the contracted axis has no one step per output row: the layer is scored,
    its integer weight left as it was (sliced only)."""
    b = Builder(opset=21)
    x = b.input([N, 6])
    hidden = b.op("Relu", [b.op("MatMul", [x, b.weight(6, 8)])])
    q = b.const(np.random.default_rng(0).integers(-100, 100, (8, 3)).astype(np.int8))
    w = b.op("DequantizeLinear", [q, b.const(np.full(8, 0.02, np.float32)), b.const(np.zeros(8, np.int8))], axis=0)
    b.output(b.op("MatMul", [hidden, w]))
    results, said, _ = compensated_and_not(b.model())
    assert q not in results["obs"].weights
    assert any("quantized in blocks or along their input channels" in m for m in said), said


def test_qdq_pruned_model_stays_close_to_the_float_model(qdq, tmp_path):
    """Sanity: the pruned QDQ model runs; with nothing removed it is the quantized model."""
    _, model = qdq
    result = prune(model, Target(ratio=0.25))
    save(result.model, str(tmp_path / "p.onnx"))
    feeds = random_inputs(model, batch=2, seed=1)
    assert run(str(tmp_path / "p.onnx"), feeds)[0].shape == run(model, feeds)[0].shape


def _dq_matmul(block_size=0, axis=1, opset=21):
    """x [N, 6] -> MatMul(DequantizeLinear(int8 [6, 8])) -> Relu -> MatMul(float [8, 3])."""
    rng = np.random.default_rng(0)
    q = rng.integers(-100, 100, (6, 8)).astype(np.int8)
    if block_size:
        shape = [6 // block_size, 8] if axis == 0 else [6, 8 // block_size]
    else:
        shape = [8] if axis == 1 else [6]
    scale = (rng.random(shape) * 0.02 + 0.01).astype(np.float32)
    zero = np.zeros(shape, np.int8)
    attrs = {"axis": axis} | ({"block_size": block_size} if block_size else {})
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], **attrs),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z"),
             numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def test_per_axis_scale_on_another_axis_is_untouched():
    """Per-column scales (axis 1) of a weight whose input rows (axis 0) are pruned: untouched; its
    output columns (axis 1) are pruned with the scale."""
    model = _dq_matmul(axis=1)
    result = check_exact(model)
    assert list(_inits(result.model)["s"].dims) == list(_inits(result.model)["q"].dims[1:])


def test_blocked_quantization():
    """block_size along K (axis 0): the output channels (axis 1) prune with the scale's axis 1."""
    model = _dq_matmul(block_size=2, axis=0)
    result = check_exact(model)
    inits = _inits(result.model)
    assert inits["s"].dims[1] == inits["q"].dims[1] < 8


def test_blocked_quantization_along_the_channel_axis_is_frozen():
    model = _dq_matmul(block_size=2, axis=1)
    reasons = [r for g in analyze(model).groups for r in g.reasons()]
    assert any("blocked quantization along the channel axis" in r for r in reasons), reasons


def branchy_net():
    """LeakyRelu, grouped Conv, Concat, swish (Mul by Sigmoid), AveragePool, two MatMul heads: the
    QOperator quantizer turns them into QLinearLeakyRelu, QLinearConcat, QLinearSigmoid, QLinearMul,
    QLinearAveragePool and QLinearMatMul."""
    b = Builder(opset=17)
    x = b.input([N, 3, 8, 8])
    a = b.op("LeakyRelu", [b.conv(x, 3, 8)], alpha=0.1)
    c = b.op("Relu", [b.conv(a, 8, 8, group=4)])
    y = b.conv(b.op("Concat", [a, c], axis=1), 16, 8, k=1)
    y = b.op("Mul", [y, b.op("Sigmoid", [y])])
    y = b.op("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
    y = b.op("Relu", [b.op("MatMul", [y, b.weight(8, 6)])])
    b.output(b.op("MatMul", [y, b.weight(6, 5)]))
    return b.model()


QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat",
                 "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearAveragePool"}


def _qoperator(folder, model, types):
    onnx.save(model, str(folder / "float.onnx"))
    quantization.quantize_static(str(folder / "float.onnx"), str(folder / "qop.onnx"), _Reader(),
                                 quant_format=quantization.QuantFormat.QOperator, per_channel=True,
                                 activation_type=types, weight_type=types)
    return onnx.load(str(folder / "qop.onnx"))


@pytest.fixture(scope="module", params=[("float_net", "QInt8"), ("branchy_net", "QInt8"), ("branchy_net", "QUInt8")])
def qop(request, tmp_path_factory):
    """(float model, its QOperator quantization: per-channel weights, per-tensor activations);
    uint8 weights have non-zero zero points."""
    net, types = request.param
    model = globals()[net]()
    return model, _qoperator(tmp_path_factory.mktemp("qop"), model, getattr(quantization.QuantType, types))


def test_qoperator_nets_use_the_mapped_ops(qop):
    _, model = qop
    assert {n.op_type for n in model.graph.node} & QOPERATOR_OPS >= {"QLinearConv"}
    assert any(n.op_type in ("QGemm", "QLinearMatMul") for n in model.graph.node)


def test_qoperator_prunes_bit_exactly_with_sliced_parameters(qop):
    """Pruned == the quantized original with the consumers' integer weight slices at their zero
    point, exactly; per-channel w_scale / w_zero_point / int32 bias sliced with the weight."""
    _, model = qop
    result = check_exact(model, atol=0, rtol=0)
    before, after = _inits(model), _inits(result.model)
    for name, t in after.items():
        assert t.data_type == before[name].data_type, name
    shrunk = 0
    for node in result.model.graph.node:
        if node.op_type not in ("QLinearConv", "QLinearMatMul", "QGemm"):
            continue
        w = after[node.input[3]].dims
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        out_axis = {"QLinearConv": 0, "QLinearMatMul": len(w) - 1}.get(node.op_type, 1 - trans_b)
        for k in (4, 5):
            if len(after[node.input[k]].dims) == 1:
                assert after[node.input[k]].dims[0] == w[out_axis], node.name
        if node.op_type == "QLinearConv" and len(node.input) > 8:
            assert list(after[node.input[8]].dims) == [w[0]]
        for k in (1, 2, 7, 8) if node.op_type == "QGemm" else (1, 2, 6, 7):
            if k < len(node.input) and node.input[k]:  # per-tensor: untouched
                assert np.size(numpy_helper.to_array(after[node.input[k]])) == 1
        shrunk += list(w) != list(before[node.input[3]].dims)
    assert shrunk >= 2
    onnx.checker.check_model(result.model, full_check=True)


def test_qoperator_masked_runs_set_integer_slices_to_the_zero_point(qop):
    """One shared session (spa.verify.MaskedRuns) gives masked_original's outputs bit for bit."""
    from spa.verify import MaskedRuns, masked_original

    _, model = qop
    plan = prune(model, Target(ratio=0.5), criterion="l1").plan
    feeds = [random_inputs(model, batch=2, seed=s) for s in (0, 1)]
    runs = MaskedRuns(plan.analysis, feeds)
    for got, original, batch in zip(runs.outputs(plan), runs.outputs(), feeds):
        np.testing.assert_array_equal(got[0], run(masked_original(plan), batch)[0])
        np.testing.assert_array_equal(original[0], run(model, batch)[0])
        assert not np.array_equal(got[0], original[0])


def test_qoperator_analyze_lists_prunable_groups(qop, tmp_path, capsys):
    from spa.cli import main

    _, model = qop
    analysis = analyze(model)
    members = {m.tensor for g in analysis.groups if g.prunable for m in g.members}
    scales = {n.input[4] for n in model.graph.node if n.op_type in ("QLinearConv", "QLinearMatMul", "QGemm")}
    assert scales & members  # per-channel weight scales, sliced with their output channel
    onnx.save(model, str(tmp_path / "qop.onnx"))
    assert main(["analyze", str(tmp_path / "qop.onnx"), "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prunable_groups"] >= 1
    assert all("graph output" in g["frozen_by"][0] for g in summary["groups"] if not g["prunable"])


def test_qoperator_scores_read_the_dequantized_weights(qop):
    """l1 of a QLinearConv / QLinearMatMul / QGemm weight is that of (w - w_zp) * w_scale, close to
    the float weight's; scales and zero points are never scored."""
    float_model, model = qop
    floats = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    for member in scored_like_the_floats(model, floats):
        assert not member.tensor.endswith(("_scale", "_zero_point")), member.tensor


def test_qoperator_obspa_plans_prune_bit_exactly(qop):
    _, model = qop
    result = check_exact(model, criterion="obspa", calibration="synthetic", compensation="none", atol=0, rtol=0)
    assert not result.weights


def test_obspa_compensates_qoperator_layers_on_their_integer_grid(qop):
    """A QLinearConv / QLinearMatMul / QGemm is read as the float layer it quantizes (its integer input
    dequantized with its scale and zero point): compensated, its weight and int32 bias rounded back onto
    their grids (uint8 weights with their zero points too), and the outputs move less than without."""
    _, model = qop
    results, said, errors = compensated_and_not(model)
    assert any("integer weights (QDQ, QOperator" in m for m in said), said
    compensated = results["obs"]
    assert compensated.weights
    before = _inits(model)
    for name, value in compensated.weights.items():
        assert value.dtype == numpy_helper.to_array(before[name]).dtype  # integers, on the grid
    assert errors["obs"] < errors["none"], errors


def _frozen_reasons(model):
    analysis = analyze(model)
    return [r for g in analysis.groups if not g.prunable for r in g.reasons()]


def test_qoperator_per_channel_parameters_that_cannot_be_sliced_freeze(tmp_path):
    """A QLinearAdd with a per-channel scale (its kernel takes per-tensor ones only) and a
    QLinearConv weight scale that is neither per-tensor nor per-channel freeze, with the reason."""
    model = _qoperator(tmp_path, float_net(), quantization.QuantType.QInt8)
    inits = _inits(model)
    add = next(n for n in model.graph.node if n.op_type == "QLinearAdd")
    scale = numpy_helper.to_array(inits[add.input[1]])
    inits[add.input[1]].CopyFrom(numpy_helper.from_array(np.full(8, scale, scale.dtype), add.input[1]))
    assert any("QLinearAdd" in r and "not per-tensor" in r for r in _frozen_reasons(model))
    model = _qoperator(tmp_path, float_net(), quantization.QuantType.QInt8)
    conv = next(n for n in model.graph.node if n.op_type == "QLinearConv")
    for k in (4, 5):
        value = numpy_helper.to_array(_inits(model)[conv.input[k]])
        _inits(model)[conv.input[k]].CopyFrom(numpy_helper.from_array(value[:2], conv.input[k]))
    assert any("neither per-tensor nor one per channel" in r for r in _frozen_reasons(model))


def test_unmapped_com_microsoft_op_is_frozen(tmp_path):
    """QLinearSoftmax (over the channels here) has no rule: the channels it reads are frozen."""
    b = Builder(opset=17)
    y = b.op("Softmax", [b.conv(b.input([N, 3, 8, 8]), 3, 8)], axis=1)
    b.output(b.conv(y, 8, 4))
    model = _qoperator(tmp_path, b.model(), quantization.QuantType.QInt8)
    assert "QLinearSoftmax" in {n.op_type for n in model.graph.node}
    assert any("custom-domain op com.microsoft::QLinearSoftmax" in r for r in _frozen_reasons(model))


def mlp_net():
    """MatMul-Relu-MatMul with biases, residual Add, MatMul: the layers quantize_dynamic quantizes."""
    b = Builder(opset=17)
    x = b.input([N, "tokens", 8])
    h = b.op("Relu", [b.op("Add", [b.op("MatMul", [x, b.weight(8, 16)]), b.weight(16)])])
    y = b.op("Add", [b.op("MatMul", [h, b.weight(16, 8)]), x])
    b.output(b.op("MatMul", [y, b.weight(8, 4)]))
    return b.model()


def _dynamic(tmp_path, model, **kw):
    onnx.save(model, str(tmp_path / "float.onnx"))
    quantization.quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "dynamic.onnx"), **kw)
    return onnx.load(str(tmp_path / "dynamic.onnx"))


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_quantization_prunes_bit_exactly(per_channel, tmp_path):
    """quantize_dynamic's DynamicQuantizeLinear -> MatMulInteger / ConvInteger -> Cast -> Mul(scale):
    the quantized input's scale and zero point come from its range, which always includes 0, so
    removing a channel quantizes the rest as zeroing it does. The oracle zeroes the removed slices
    in front of DynamicQuantizeLinear and sets the weight's to its zero point: bit-exact. Per-channel
    weight zero points and scales are sliced with the output channel."""
    for model in (_dynamic(tmp_path, mlp_net(), per_channel=per_channel),
                  _dynamic(tmp_path, float_net(), per_channel=per_channel)):
        ops = {n.op_type for n in model.graph.node}
        assert "DynamicQuantizeLinear" in ops and ops & {"MatMulInteger", "ConvInteger"}
        result = check_exact(model, atol=0, rtol=0, fused=False, dims={"tokens": 5})
        integer = [n.input[1] for n in result.model.graph.node if n.op_type in ("MatMulInteger", "ConvInteger")]
        before, after = _inits(model), _inits(result.model)
        assert any(after[w].dims != before[w].dims for w in integer)
        for w in integer:  # integer weights stay integers
            assert after[w].data_type == before[w].data_type


def test_obspa_compensates_dynamically_quantized_layers_on_their_integer_grid(tmp_path):
    """OBSPA reads a MatMulInteger / ConvInteger as the float layer it quantizes (Hessians of the
    DynamicQuantizeLinear's float input, the weight dequantized with the scale applied after it),
    compensates it and rounds the update back onto the weight's integer grid: the weights stay
    integers, and the outputs move less from the original's than without compensation."""
    from spa.cost import count_params

    for model in (_dynamic(tmp_path, mlp_net()), _dynamic(tmp_path, float_net())):
        results, said, errors = compensated_and_not(model, {"tokens": 5})
        assert any("integer weights (QDQ, QOperator, dynamically quantized" in m and "integer grid" in m
                   for m in said), said
        compensated = results["obs"]
        assert compensated.weights and count_params(compensated.model) == count_params(results["none"].model)
        before = _inits(model)
        for name, value in compensated.weights.items():
            assert value.dtype == numpy_helper.to_array(before[name]).dtype  # integers, on the grid
        assert errors["obs"] < errors["none"], errors


def test_dynamic_quantization_with_a_per_row_input_zero_point_is_frozen(tmp_path):
    """A MatMulInteger whose a_zero_point holds one value per row of A (not what quantize_dynamic
    writes) is frozen, with the reason."""
    b = Builder(opset=17)
    x = b.input([4, 8], "x", dtype=TensorProto.UINT8)
    w = b.const(np.ones((8, 6), np.int8))
    y = b.op("MatMulInteger", [x, w, b.const(np.arange(4, dtype=np.uint8)), b.const(np.array(0, np.int8))])
    out = b.op("Cast", [y], to=TensorProto.FLOAT)
    b.output(b.op("MatMul", [b.op("Relu", [out]), b.weight(6, 3)]))
    reasons = _frozen_reasons(b.model())
    assert any("MatMulInteger" in r and "not per-tensor" in r for r in reasons), reasons


def shuffle_net():
    """A channel shuffle sized at run time as torch exports it (Shape -> Gather -> Div -> Concat ->
    Reshape, Transpose, Reshape) after a Concat of two conv branches."""
    b = Builder(opset=17)
    x = b.input([N, 3, 8, 8])
    a = b.op("Relu", [b.conv(x, 3, 8)])
    cat = b.op("Concat", [a, b.op("Relu", [b.conv(a, 8, 8)])], axis=1)

    def dim(k):
        return b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [cat]), b.const(np.array(k, np.int64))], axis=0),
                                  b.const(np.array([0], np.int64))])

    per_group = b.op("Div", [dim(1), b.const(np.array(2, np.int64))])
    split = b.op("Concat", [dim(0), b.const(np.array([2], np.int64)), per_group, dim(2), dim(3)], axis=0)
    shuffled = b.op("Transpose", [b.op("Reshape", [cat, split])], perm=[0, 2, 1, 3, 4])
    merged = b.op("Concat", [dim(0), b.const(np.array([-1], np.int64)), dim(2), dim(3)], axis=0)
    y = b.op("Relu", [b.conv(b.op("Reshape", [shuffled, merged]), 16, 8, k=1)])
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [y])]), 8, 5))
    return b.model()


def test_qoperator_shuffle_sized_off_the_dequantized_tensor_prunes(tmp_path):
    """The QOperator quantizer reshapes the quantized Concat output with sizes read by Shape off
    its DequantizeLinear: the same shape, so the shuffle follows the new channel count."""
    model = _qoperator(tmp_path, shuffle_net(), quantization.QuantType.QUInt8)
    producer = {o: n for n in model.graph.node for o in n.output}
    assert any(n.op_type == "Shape" and producer[n.input[0]].op_type == "DequantizeLinear" for n in model.graph.node)
    reasons = _frozen_reasons(model)
    assert not any("sizes Reshape" in r for r in reasons), reasons
    result = check_exact(model, atol=0, rtol=0)
    assert any(len(result.plan.removed(m.tensor, m.axis)) for m in result.plan.analysis.members.values()
               if "concat" in m.tensor.lower())


def test_a_quantized_bidirectional_lstms_directions_are_no_heads(tmp_path):
    """quantize_dynamic writes a BiLSTM as com.microsoft DynamicQuantizeLSTM. Its
    output Y [sequence, 2, batch, hidden] reaches the next layers through Transpose and Reshape
    [sequence, batch, 2 * hidden]; entered from there, the Reshape's split is the two directions,
    which share one hidden size: unit j of both is one channel, not a direction one "head"
    (Kokoro-82M's int8 TTS reported its decoder's channels as 1251 heads)."""
    b = Builder(opset=17)
    hidden = 8
    x = b.input(["sequence", N, 16])
    y = b.op("LSTM", [x, b.weight(2, 4 * hidden, 16), b.weight(2, 4 * hidden, hidden)], n_out=3,
             hidden_size=hidden, direction="bidirectional")[0]
    merged = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.const(np.array([0, 0, 2 * hidden]))])
    mixed = b.op("Add", [merged, b.op("MatMul", [x, b.weight(16, 2 * hidden)])])
    b.output(b.op("MatMul", [mixed, b.weight(2 * hidden, 4)]))
    model = _dynamic(tmp_path, b.model())
    assert "DynamicQuantizeLSTM" in {n.op_type for n in model.graph.node}
    analysis = analyze(model)
    reshaped = next(n.output[0] for n in model.graph.node if n.op_type == "Reshape")
    group = next(g for g in analysis.groups if any(m.tensor == reshaped for m in g.members))
    assert group.kind == "channels" and len(group.atoms) == hidden, (group.kind, len(group.atoms))


def test_the_masked_model_reads_new_integer_weights_through_their_masked_copies(tmp_path):
    """The staged compensation runs masked_original(plan), which reads each integer weight through a
    copy with the removed slices at the zero point. Compensated integer weights reach it through
    those copies (verify.masked_integer_copies): fed so, the masked model computes what the pruned
    model with those weights computes, so later stages see the earlier ones compensated."""
    from spa.verify import masked_integer_copies, masked_original

    model = _dynamic(tmp_path, mlp_net())
    result = prune(model, Target(ratio=0.5), criterion="obspa", compensation="obs")
    integer = {name for name in result.weights if numpy_helper.to_array(_inits(model)[name]).dtype.kind in "iu"}
    assert integer
    copies = masked_integer_copies(result.analysis, result.plan, result.weights)
    assert len(copies) == len(integer)
    masked = masked_original(result.plan)
    for t in masked.graph.initializer:
        if t.name in copies:
            t.CopyFrom(numpy_helper.from_array(copies[t.name], t.name))
    feeds = random_inputs(model, batch=4, seed=5, dims={"tokens": 5})
    np.testing.assert_allclose(run(masked, feeds)[0], run(result.model, feeds)[0], atol=1e-5, rtol=1e-5)


def test_a_bidirectional_lstm_merged_by_reshape_prunes_exactly_entered_from_the_merged_side():
    """The float counterpart: a layer before the LSTM in node order reaches the Reshape from its
    merged side first; unit j of both directions goes together (the LSTM's one hidden size), and
    the pruned model matches the oracle."""
    b = Builder(opset=17)
    hidden = 8
    x = b.input(["sequence", N, 16])
    beside = b.op("MatMul", [x, b.weight(16, 2 * hidden)])
    y = b.op("LSTM", [x, b.weight(2, 4 * hidden, 16), b.weight(2, 4 * hidden, hidden)], n_out=3,
             hidden_size=hidden, direction="bidirectional")[0]
    merged = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.const(np.array([0, 0, 2 * hidden]))])
    b.output(b.op("MatMul", [b.op("Add", [merged, beside]), b.weight(2 * hidden, 4)]))
    result = check_exact(b.model(), dims={"sequence": 5})
    lstm = next(n for n in result.model.graph.node if n.op_type == "LSTM")
    assert next(a.i for a in lstm.attribute if a.name == "hidden_size") < hidden


def _silent_units(plan):
    """The oracle for DynamicQuantizeLSTM: the masked original with the removed units' own gate rows
    of W, R (at the zero point) and B (0) zeroed too. The op quantizes its hidden state over all units
    at every step, so a unit that only its readers ignore still moves that range; with its rows zeroed
    its gates stay at sigmoid(0) and tanh(0), and from a zero cell it outputs exactly 0, as when removed."""
    from spa.quant import at_zero_point
    from spa.verify import masked_original

    model = masked_original(plan)
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    g = plan.analysis.graph
    original = next(n for n in g.nodes if n.op_type == "DynamicQuantizeLSTM")
    inits = {t.name: t for t in model.graph.initializer}
    for slot, rows in ((1, 2), (2, 2), (3, 1)):  # W and R at their zero points, B at 0
        removed = plan.removed(original.input[slot], rows)
        value = numpy_helper.to_array(inits[node.input[slot]]).copy()
        if slot == 3:
            np.moveaxis(value, rows, 0)[removed] = 0
        else:  # the masked copy of R (its removed inputs already at the zero point) or W itself
            value = at_zero_point(g, original.input[slot], rows, removed, value)
        inits[node.input[slot]].CopyFrom(numpy_helper.from_array(value, node.input[slot]))
    return model


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_a_dynamically_quantized_lstm_prunes_its_hidden_units(per_channel, direction, tmp_path):
    """quantize_dynamic's com.microsoft DynamicQuantizeLSTM: W [directions, input, 4 x hidden] and R
    [directions, hidden, 4 x hidden] in int8 (transposed against LSTM's), per-direction or per-row
    scales and zero points; hidden unit j goes with its gate rows, R's row j and the scales of its rows,
    and the layer before it loses input channels through W's input axis."""
    b = Builder(opset=17)
    hidden, dirs = 8, 2 if direction == "bidirectional" else 1
    x = b.input(["sequence", N, 12])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight(12, 16)])])
    y = b.op("LSTM", [h, b.weight(dirs, 4 * hidden, 16), b.weight(dirs, 4 * hidden, hidden),
                      b.weight(dirs, 8 * hidden)], n_out=3, hidden_size=hidden, direction=direction)[0]
    merged = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.const(np.array([0, 0, dirs * hidden]))])
    b.output(b.op("MatMul", [merged, b.weight(dirs * hidden, 4)]))
    model = _dynamic(tmp_path, b.model(), per_channel=per_channel)
    lstm = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    assert not any("DynamicQuantizeLSTM" in r for r in _frozen_reasons(model)), _frozen_reasons(model)
    result = check_exact(model, dims={"sequence": 5}, oracle=_silent_units, atol=0, rtol=0)
    pruned = next(n for n in result.model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    size = next(a.i for a in pruned.attribute if a.name == "hidden_size")
    assert size < hidden
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert shapes[pruned.input[1]][1] < 16 and shapes[pruned.input[2]][1:] == (size, 4 * size)
    if per_channel:
        assert shapes[pruned.input[8]] == shapes[pruned.input[10]] == (dirs, 4 * size)
    assert lstm.input[1] in {t.name for t in model.graph.initializer}
    from spa.cost import concrete_shapes, macs_by_op
    macs = macs_by_op(model, concrete_shapes(model, dims={"sequence": 5, N: 2}))["DynamicQuantizeLSTM"]
    assert macs == 5 * 2 * dirs * 4 * hidden * (16 + hidden)  # W and R, 5 steps of a batch of 2


def depthwise_net():
    """Conv (3 -> 48), depthwise Conv, Conv (48 -> 8): one 48-channel group that the depthwise conv reads."""
    b = Builder(opset=17)
    x = b.input([N, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 48)])
    y = b.op("Relu", [b.conv(y, 48, 48, group=48)])
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [b.conv(y, 48, 8, k=1)])]), 8, 5))
    return b.model()


def _depthwise_width(model) -> int:
    g = Graph(model)
    for node in g.nodes:
        if node.op_type in ("Conv", "QLinearConv") and attr(node, "group", 1) > 1:
            return attr(node, "group")
    raise AssertionError("no depthwise conv left")


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_the_default_keeps_int8_depthwise_groups_at_multiples_of_16(fmt, tmp_path, capsys):
    """onnxruntime's int8 depthwise kernel takes multiples of 16 channels only (x86): the default rounding
    keeps 32 of the 48 where half would go (24, a multiple of 8, as the float model and --round-to 8 get)."""
    import spa

    onnx.save(depthwise_net(), str(tmp_path / "float.onnx"))
    quantization.quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"), _Reader(),
                                 quant_format=getattr(quantization.QuantFormat, fmt), per_channel=True,
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8)
    quantized = str(tmp_path / "q.onnx")
    assert sorted(integer_conv_weights(Graph(onnx.load(quantized))).values()) == [False, False, True]
    assert _depthwise_width(spa.prune(quantized, 0.5, criterion="l1").model) == 32
    assert _depthwise_width(spa.prune(quantized, 0.5, criterion="l1", round_to=8).model) == 24
    assert _depthwise_width(spa.prune(str(tmp_path / "float.onnx"), 0.5, criterion="l1").model) == 24
    assert not integer_conv_weights(Graph(depthwise_net()))
    assert main(["prune", quantized, "-o", str(tmp_path / "small.onnx"), "--ratio", "0.5", "--criterion", "l1"]) == 0
    assert "1 group(s) read by int8 depthwise convs keep multiples of 16 channels" in capsys.readouterr().err


@pytest.mark.parametrize("criterion", ["l1", "obs"])
def test_sparsify_zeroes_integer_weights_at_their_zero_point_in_the_pattern(criterion, qdq, tmp_path):
    """spa sparsify reads ConvInteger / MatMulInteger (dynamic), QLinearConv / QGemm (QOperator, int8 and
    uint8) and QDQ weights as the float layers they quantize: masks and OBS updates on the dequantized values,
    written back on the integer grid, every removed weight at its zero point, so that the dequantized weight
    takes the pattern; int32 biases are left as they are."""
    from spa.calibration import Calibration
    from spa.layers import weighted_layers
    from spa.quant import as_float, is_integer_weight
    from spa.sparsity import conforms, parse_pattern, sparsify

    pattern = parse_pattern("2:4")
    calibration = Calibration(source="synthetic", samples=8, dims={"tokens": 5}) if criterion == "obs" else None
    for model in (_dynamic(tmp_path, mlp_net(), per_channel=True), _dynamic(tmp_path, float_net()),
                  _qoperator(tmp_path, float_net(), quantization.QuantType.QUInt8), qdq[1]):
        sparse, report = sparsify(model, pattern, criterion, calibration=calibration)
        g, before = Graph(sparse), _inits(model)
        layers = {layer.weight: layer for layer in weighted_layers(g)}
        done = [row["weight"] for row in report["layers"]]
        assert done and all(is_integer_weight(g, w) for w in done), done
        for w in done:
            value = numpy_helper.to_array(_inits(sparse)[w])
            assert value.dtype == numpy_helper.to_array(before[w]).dtype  # integers, on their grid
            assert conforms(as_float(g, w, value), layers[w], pattern)
        biases = [n.input[8] for n in model.graph.node if n.op_type == "QLinearConv" and len(n.input) > 8] + \
            [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in before
             and before[n.input[0]].data_type == TensorProto.INT32]
        assert all(_inits(sparse)[b] == before[b] for b in biases)
        feeds = random_inputs(sparse, dims={"tokens": 5})
        assert all(np.all(np.isfinite(y)) for y in run(sparse, feeds))
