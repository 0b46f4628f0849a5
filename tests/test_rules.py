"""One equivalence test per rule family: pruned == original with consumer slices zeroed."""
import numpy as np
import onnx
import pytest
from onnx import helper

from builder import Builder
from oracle import check_exact
from spa import Options, analyze
from spa.selection import Target

N = "batch"


def head(b, x, c, classes=5):
    """GlobalAveragePool + Flatten + Gemm: the usual classifier."""
    return b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])]), c, classes))


def frozen_reasons(model):
    return [r for g in analyze(model).groups for r in g.reasons()]


def test_conv_bn_relu_chain_prunes_exactly():
    b = Builder()
    x = b.input([N, 3, 8, 8])
    y = b.op("Relu", [b.bn(b.conv(x, 3, 8), 8)])
    y = b.op("Relu", [b.bn(b.conv(y, 8, 6), 6)])
    head(b, y, 6)
    result = check_exact(b.model())
    assert {g["id"] for g in result.plan.to_json()["groups"]} and len(result.plan.removed_atoms) == 7


def test_residual_add_couples_both_branches():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)])
    y = b.op("Add", [x, b.conv(b.op("Relu", [b.conv(x, 8, 4)]), 4, 8)])
    head(b, b.op("Relu", [y]), 8)
    model = b.model()
    analysis = analyze(model)
    [group] = [g for g in analysis.groups if any(m.tensor == y for m in g.members)]
    assert {m.tensor for m in group.members} >= {x, y}
    check_exact(model)


def test_depthwise_conv_shrinks_group_attribute():
    b = Builder()
    x = b.op("Clip", [b.conv(b.input([N, 3, 8, 8]), 3, 8), b.const(np.float32(0)), b.const(np.float32(6))])
    y = b.op("Relu", [b.conv(x, 8, 8, group=8)])
    head(b, b.conv(y, 8, 4, k=1), 4)
    result = check_exact(b.model())
    [dw] = [n for n in result.model.graph.node if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert [a.i for a in dw.attribute if a.name == "group"] == [4]


def test_depthwise_with_channel_multiplier():
    b = Builder()
    x = b.conv(b.input([N, 3, 8, 8]), 3, 4)
    y = b.conv(x, 4, 8, group=4)  # two outputs per input channel
    head(b, y, 8)
    check_exact(b.model())


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_keeps_equal_groups(groups):
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)])
    y = b.op("Relu", [b.conv(x, 8, 8, group=groups)])
    head(b, b.conv(y, 8, 4), 4)
    result = check_exact(b.model())
    w = [i for i in result.model.graph.initializer if len(i.dims) == 4 and i.dims[0] % groups == 0]
    assert all(d % 1 == 0 for d in w[0].dims)


def test_concat_maps_offsets():
    b = Builder()
    x = b.input([N, 3, 8, 8])
    y = b.op("Concat", [b.conv(x, 3, 4), b.conv(x, 3, 6), b.conv(x, 3, 2)], axis=1)
    head(b, b.conv(y, 12, 5), 5)
    check_exact(b.model())


def test_concat_on_last_axis_channels_last():
    b = Builder()
    x = b.input([N, 4, 6])
    y = b.op("Concat", [b.op("MatMul", [x, b.weight(6, 5)]), b.op("MatMul", [x, b.weight(6, 3)])], axis=-1)
    b.output(b.op("MatMul", [b.op("Relu", [y]), b.weight(8, 2)]))
    check_exact(b.model())


def test_split_sizes_rewritten():
    b = Builder()
    x = b.conv(b.input([N, 3, 8, 8]), 3, 10)
    s1, s2 = b.op("Split", [x, b.const(np.array([4, 6], dtype=np.int64))], n_out=2, axis=1)
    y = b.op("Concat", [b.conv(s1, 4, 3), b.op("Relu", [s2])], axis=1)
    head(b, y, 9)
    check_exact(b.model())


def test_split_equal_parts_opset18():
    b = Builder(opset=18)
    x = b.conv(b.input([N, 3, 8, 8]), 3, 8)
    s1, s2 = b.op("Split", [x], n_out=2, axis=1, num_outputs=2)
    head(b, b.op("Add", [s1, s2]), 4)
    check_exact(b.model())


@pytest.mark.parametrize("index", [np.int64, np.int32])  # tf2onnx writes int32 starts / ends / axes / steps
def test_slice_on_channel_axis(index):
    b = Builder()
    x = b.conv(b.input([N, 3, 8, 8]), 3, 10)
    bounds = [b.const(np.array(v, dtype=index)) for v in ([2, 0], [8, 1 << 30], [1, 2], [1, 1])]
    s = b.op("Slice", [x] + bounds)
    head(b, b.conv(s, 6, 4), 4)
    result = check_exact(b.model())
    [node] = [n for n in result.model.graph.node if n.op_type == "Slice"]
    values = {t.name: t for t in result.model.graph.initializer}
    index_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(index))
    assert {values[name].data_type for name in node.input[1:]} == {index_type}


def test_gather_on_channel_axis():
    b = Builder()
    x = b.conv(b.input([N, 3, 8, 8]), 3, 8)
    g = b.op("Gather", [x, b.const(np.array([0, 2, 3, 5, 7], dtype=np.int64))], axis=1)
    head(b, b.conv(g, 5, 4), 4)
    check_exact(b.model())


def test_scalar_gather_freezes_only_that_channel():
    b = Builder()
    x = b.conv(b.input([N, 3, 8, 8]), 3, 8)
    picked = b.op("Gather", [x, b.const(np.array(3, dtype=np.int64))], axis=1)
    b.output(b.op("ReduceMean", [picked], keepdims=0))
    head(b, b.op("Relu", [x]), 8)
    model = b.model()
    [group] = [g for g in analyze(model).groups if any(m.tensor == x for m in g.members)]
    assert len(group.frozen) == 1 and group.prunable
    check_exact(model)


def test_flatten_into_gemm():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 4, 4]), 3, 6)])
    b.output(b.gemm(b.op("Flatten", [x], axis=1), 6 * 16, 5))
    check_exact(b.model())


def test_reshape_constant_rewritten():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 4, 4]), 3, 6)])
    flat = b.op("Reshape", [x, b.const(np.array([-1, 96], dtype=np.int64))])
    b.output(b.op("Add", [b.op("MatMul", [flat, b.weight(96, 5)]), b.weight(5)]))
    result = check_exact(b.model())
    shapes = [onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer if i.name.endswith("_spa")]
    assert any(s.tolist() == [-1, 48] for s in shapes)


def test_channel_shuffle_prunes_exactly():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 6, 6]), 3, 8)])
    r = b.op("Reshape", [x, b.const(np.array([0, 2, 4, 6, 6], dtype=np.int64))])
    t = b.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
    y = b.op("Reshape", [t, b.const(np.array([0, 8, 6, 6], dtype=np.int64))])
    head(b, b.conv(y, 8, 4), 4)
    check_exact(b.model())


def test_squeeze_excite_mul():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)])
    s = b.op("Sigmoid", [b.conv(b.op("Relu", [b.conv(b.op("GlobalAveragePool", [x]), 8, 2, k=1)]), 2, 8, k=1)])
    head(b, b.conv(b.op("Mul", [x, s]), 8, 4), 4)
    check_exact(b.model())


def test_identity_like_ops():
    b = Builder(opset=13)
    x = b.conv(b.input([N, 3, 8, 8]), 3, 6)
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Resize", [x, "", b.const(np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    x = b.op("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))])
    x = b.op("Cast", [b.op("Dropout", [b.op("Clip", [x, b.const(np.float32(0)), b.const(np.float32(6))])])], to=1)
    x = b.op("Mul", [b.op("HardSigmoid", [x]), b.op("LeakyRelu", [x])])
    x = b.op("Add", [x, b.weight(6, 1, 1)])  # per-channel constant: sliced with the channel
    head(b, b.op("AveragePool", [x], kernel_shape=[2, 2]), 6)
    check_exact(b.model())


@pytest.mark.parametrize("channel_size", ["own", "constant", "other"])
def test_resize_to_sizes_computed_from_shapes(channel_size):
    """paddle2onnx's interpolate(x, size=y.shape[2:]): sizes = Concat(Slice(Shape(x), 0, 2), Shape(y)[2:]).
    The channel size read off the resized tensor itself follows the pruning at run time; a constant, or
    a static size read off another tensor, is rewritten."""
    b = Builder(opset=13)
    x = b.conv(b.input([N, 3, 8, 8]), 3, 6)
    y = b.op("MaxPool", [b.conv(x, 6, 5)], kernel_shape=[2, 2], strides=[2, 2])  # [N, 5, 4, 4]
    other = b.conv(x, 6, 5)
    index = b.const(np.array([0]))

    def shape_slice(tensor, start, stop):
        return b.op("Slice", [b.op("Shape", [tensor]), b.const(np.array([start])), b.const(np.array([stop])), index])
    lead = {"own": [shape_slice(y, 0, 2)], "constant": [shape_slice(y, 0, 1), b.const(np.array([5]))],
            "other": [shape_slice(y, 0, 1), shape_slice(other, 1, 2)]}[channel_size]
    sizes = b.op("Concat", lead + [shape_slice(x, 2, 4)], axis=0)
    up = b.op("Resize", [y, "", "", sizes], mode="nearest")  # [N, 5, 8, 8]
    head(b, b.op("Add", [b.conv(up, 5, 4), b.conv(other, 5, 4)]), 4)
    model = b.model()
    assert next(g for g in analyze(model).groups if any(m.tensor == up for m in g.members)).prunable
    check_exact(model)


def test_conv_transpose_and_grouped_conv_transpose():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 4, 4]), 3, 8)])
    up = b.op("ConvTranspose", [x, b.weight(8, 6, 2, 2), b.weight(6)], strides=[2, 2])
    up2 = b.op("ConvTranspose", [b.op("Relu", [up]), b.weight(6, 2, 2, 2)], strides=[2, 2], group=2)
    head(b, b.conv(up2, 4, 3), 3)
    check_exact(b.model())


def test_depthwise_conv_transpose_entered_from_its_output():
    """A depthwise ConvTranspose (Kokoro's upsampling `pool`) whose input channels are reached first
    through its output: its weight (whose axis 0 is the input channel) is sliced with the channel all
    the same (kokoro-82m: 'filter number not equal to input channel number' in the pruned model)."""
    b = Builder()
    image = b.input([N, 3, 6, 6])
    z = b.conv(image, 3, 8)
    x = b.conv(image, 3, 8)
    for _ in range(3):  # the ConvTranspose's own output (a source) reaches x before x's producers do
        x = b.op("Relu", [x])
    y = b.op("ConvTranspose", [x, b.weight(8, 1, 3, 3), b.weight(8)], group=8, pads=[1, 1, 1, 1])
    head(b, b.conv(b.op("Add", [z, y]), 8, 4), 4)
    model = b.model()
    weight = next(n.input[1] for n in model.graph.node if n.op_type == "ConvTranspose")
    assert any(m.tensor == weight for g in analyze(model).groups if g.prunable for m in g.members)
    check_exact(model)


def test_norms_and_prelu(opset=21):
    b = Builder(opset=opset)
    x = b.conv(b.input([N, 3, 8, 8]), 3, 8)
    x = b.op("InstanceNormalization", [x, b.positive(8), b.weight(8)])
    x = b.op("PRelu", [x, b.weight(8, 1, 1)])
    x = b.conv(x, 8, 8)
    params = 8  # per channel from opset 21 (opset 18's per-group form is deprecated)
    x = b.op("GroupNormalization", [x, b.positive(params), b.weight(params)], num_groups=4)
    b.output(b.conv(x, 8, 3, k=1), shape=[N, 3, 8, 8])
    result = check_exact(b.model())
    [gn] = [n for n in result.model.graph.node if n.op_type == "GroupNormalization"]
    assert [a.i for a in gn.attribute if a.name == "num_groups"] == [2]


def test_softmax_over_channels_freezes_with_reason():
    b = Builder()
    x = b.conv(b.input([N, 3, 8, 8]), 3, 8)
    b.output(b.op("Softmax", [x], axis=1))
    reasons = frozen_reasons(b.model())
    assert any("Softmax" in r and "channel axis" in r for r in reasons)


def test_reduce_over_spatial_passes_reduce_over_channels_freezes():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)])
    pooled = b.op("ReduceMean", [x], axes=[2, 3], keepdims=0)
    b.output(b.gemm(pooled, 8, 3))
    check_exact(b.model())
    b2 = Builder()
    y = b2.conv(b2.input([N, 3, 8, 8]), 3, 8)
    b2.output(b2.op("ReduceMax", [y], axes=[1]))
    assert any("ReduceMax" in r for r in frozen_reasons(b2.model()))


def test_channels_last_layout_through_transposes():
    b = Builder()
    x = b.conv(b.input([N, 3, 6, 6]), 3, 8)
    nhwc = b.op("Transpose", [x], perm=[0, 2, 3, 1])
    y = b.op("Add", [b.op("MatMul", [nhwc, b.weight(8, 12)]), b.weight(12)])
    y = b.op("MatMul", [b.op("Relu", [y]), b.weight(12, 8)])
    head(b, b.op("Transpose", [y], perm=[0, 3, 1, 2]), 8)
    check_exact(b.model())


def test_squeeze_unsqueeze():
    b = Builder()
    x = b.conv(b.input([N, 3, 1, 8]), 3, 8, k=1)
    sq = b.op("Squeeze", [x, b.const(np.array([2], dtype=np.int64))])
    un = b.op("Unsqueeze", [b.op("Relu", [sq]), b.const(np.array([3], dtype=np.int64))])
    head(b, b.conv(un, 8, 4, k=1), 4)
    check_exact(b.model())


def test_layernorm_over_channels_is_frozen_unless_approximate():
    b = Builder()
    x = b.input([N, 5, 8])
    y = b.op("MatMul", [x, b.weight(8, 16)])
    y = b.op("LayerNormalization", [y, b.positive(16), b.weight(16)], axis=-1)
    b.output(b.op("MatMul", [y, b.weight(16, 4)]))
    model = b.model()
    assert any("LayerNormalization" in r for r in frozen_reasons(model))
    # Approximate by nature: the statistics of the remaining channels change. The test says so
    # and bounds the deviation from the oracle (relative to the output scale).
    options = Options(granularity=("channels", "heads", "hidden"))
    result = check_exact(model, options=options, atol=1.0, rtol=1.0)
    assert options.approximate_nodes and len(result.plan.removed_atoms) > 0


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d(dims):
    b = Builder()
    spatial = [6] * dims
    x = b.input([N, 3] + spatial)
    w1, w2 = b.weight(8, 3, *[3] * dims), b.weight(4, 8, *[1] * dims)
    y = b.op("Relu", [b.op("Conv", [x, w1], pads=[1] * (2 * dims))])
    y = b.op("Conv", [y, w2])
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalMaxPool", [y])]), 4, 3))
    check_exact(b.model())


def test_constant_node_weights():
    b = Builder()
    x = b.input([N, 3, 8, 8])
    w = b.op("Constant", [], value=onnx.numpy_helper.from_array(b.rng.standard_normal((8, 3, 3, 3)).astype(np.float32)))
    y = b.op("Relu", [b.op("Conv", [x, w], pads=[1, 1, 1, 1])])
    head(b, y, 8)
    result = check_exact(b.model())
    const = [n for n in result.model.graph.node if n.op_type == "Constant"]
    assert onnx.numpy_helper.to_array(const[0].attribute[0].t).shape == (4, 3, 3, 3)


def test_unknown_and_custom_ops_freeze_with_reason():
    b = Builder()
    x = b.conv(b.input([N, 3, 8, 8]), 3, 8)
    b.nodes.append(helper.make_node("MyOp", [x], ["custom"], domain="my.domain", name="mine"))
    b.output("custom")
    head(b, b.conv(b.input([N, 3, 8, 8], "other"), 3, 6), 6)
    graph = helper.make_graph(b.nodes, "t", b.inputs, b.outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    reasons = frozen_reasons(model)
    assert any("custom-domain op my.domain::MyOp" in r for r in reasons)


def test_control_flow_reading_a_tensor_freezes_it():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)])
    out = helper.make_tensor_value_info("branch_out", onnx.TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Identity", [x], ["branch_out"])], "then", [], [out])
    other = helper.make_graph([helper.make_node("Neg", [x], ["branch_out"])], "else", [], [out])
    cond = b.const(np.array(True))
    b.nodes.append(helper.make_node("If", [cond], ["if_out"], then_branch=then, else_branch=other, name="if"))
    b.output("if_out")
    model = helper.make_model(helper.make_graph(b.nodes, "t", b.inputs, b.outputs, b.inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    assert any("control flow (If)" in r for r in frozen_reasons(model))


def test_depth_to_space_pixel_shuffle():
    b = Builder()
    x = b.conv(b.input([N, 3, 4, 4]), 3, 16)
    y = b.op("DepthToSpace", [b.op("Relu", [x])], blocksize=2, mode="CRD")
    head(b, b.conv(y, 4, 3), 3)
    check_exact(b.model())


def test_expand_and_tile():
    b = Builder()
    x = b.conv(b.input([N, 3, 4, 4]), 3, 6)
    scale = b.op("Expand", [b.weight(6, 1, 1), b.const(np.array([6, 4, 4], dtype=np.int64))])
    y = b.op("Mul", [x, scale])
    y = b.op("Tile", [y, b.const(np.array([1, 1, 2, 2], dtype=np.int64))])
    head(b, y, 6)
    check_exact(b.model())


@pytest.mark.parametrize("opset", [9, 11, 13, 21])
def test_old_and_new_opsets(opset):
    b = Builder(opset=opset)
    x = b.op("Relu", [b.bn(b.conv(b.input([N, 3, 8, 8]), 3, 8), 8)])
    y = b.op("Concat", [b.conv(x, 8, 4), x], axis=1)
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [y])]), 12, 3))
    check_exact(b.model())


def test_global_ranking_and_budget_targets():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 16)])
    y = b.op("Relu", [b.conv(x, 16, 8)])
    head(b, b.conv(y, 8, 8), 8)
    model = b.model()
    check_exact(model, Target(ratio=0.4, global_ranking=True))
    from spa.cost import count_macs, count_params
    result = check_exact(model, Target(keep_params=0.5))
    assert count_params(result.model) <= 0.5 * count_params(model) + 100
    check_exact(model, Target(keep_macs=0.6))
    result = check_exact(model, Target(ratio=0.5, round_to=4))
    for group in result.plan.to_json()["groups"]:
        assert (group["size"] - group["removed"]) % 4 == 0
    result = check_exact(model, Target(ratio=0.3, round_to=4, round_from=16))  # the 8-wide groups keep exact widths
    kept = {g["size"]: g["size"] - g["removed"] for g in result.plan.to_json()["groups"]}
    assert kept[16] % 4 == 0 and kept[8] == 6
    both = check_exact(model, Target(keep_params=0.6, keep_macs=0.5))  # both budgets are met
    assert count_params(both.model) <= 0.6 * count_params(model) and count_macs(both.model) <= 0.5 * count_macs(model)


def test_symbolic_spatial_dims_and_two_inputs():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, "height", "width"]), 3, 8)])
    z = b.op("Relu", [b.conv(b.input([N, 3, "height", "width"], name="second"), 3, 8)])
    y = b.op("Add", [x, z])
    b.output(b.conv(y, 8, 4), shape=[N, 4, "height", "width"])
    head(b, y, 8)
    check_exact(b.model(), dims={"height": 10, "width": 7})


def test_model_with_if_subgraph_still_prunes_elsewhere():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)])
    y = b.op("Relu", [b.conv(x, 8, 6)])
    out = helper.make_tensor_value_info("branch_out", onnx.TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Identity", [y], ["branch_out"])], "then", [], [out])
    other = helper.make_graph([helper.make_node("Neg", [y], ["branch_out"])], "else", [], [out])
    b.nodes.append(helper.make_node("If", [b.const(np.array(True))], ["if_out"], then_branch=then,
                                    else_branch=other, name="if"))
    b.outputs.append(helper.make_tensor_value_info("if_out", onnx.TensorProto.FLOAT, [N, 6, 8, 8]))
    model = b.model()
    result = check_exact(model)
    groups = {g.id: g for g in result.analysis.groups}
    frozen_y = [g for g in groups.values() if any(m.tensor == y for m in g.members)][0]
    assert not frozen_y.prunable and any("If" in r for r in frozen_y.reasons())


ORT_MAX_OPSET = 26  # onnxruntime 1.31 loads up to opset 26; onnx 1.23 defines up to 28


def test_newest_opset_onnxruntime_runs():
    b = Builder(opset=min(onnx.defs.onnx_opset_version(), ORT_MAX_OPSET))
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)])
    head(b, b.op("Relu", [b.conv(x, 8, 8)]), 8)
    check_exact(b.model())


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "bn-scale", "random"])
@pytest.mark.parametrize("aggregation,normalization", [("mean", "mean"), ("sum", "none"), ("max", "standardise"),
                                                       ("mean", "max")])
def test_every_criterion_and_option_prunes_exactly(criterion, aggregation, normalization):
    b = Builder()
    x = b.op("Relu", [b.bn(b.conv(b.input([N, 3, 8, 8]), 3, 12), 12)])
    y = b.op("Relu", [b.bn(b.conv(x, 12, 8), 8)])
    head(b, y, 8)
    check_exact(b.model(), Target(ratio=0.5, global_ranking=True), criterion=criterion,
                aggregation=aggregation, normalization=normalization)


def test_magnitude_removes_the_weakest_filters():
    b = Builder()
    x = b.input([N, 3, 8, 8])
    w = b.rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    w[[1, 4]] *= 0.01  # two nearly dead filters
    y = b.op("Relu", [b.op("Conv", [x, b.const(w, "w_first")], pads=[1, 1, 1, 1])])
    head(b, y, 6)
    result = check_exact(b.model(), Target(ratio=0.34))
    [entry] = [e for e in result.plan.weight_entries() if e["name"] == "w_first"]
    assert entry["removed"] == [1, 4]


def test_max_group_ratio_and_never_to_zero():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 10)])
    head(b, x, 10)
    result = check_exact(b.model(), Target(ratio=0.9, max_group_ratio=0.3))
    assert len(result.plan.removed_atoms) == 3
    b2 = Builder()
    x = b2.op("Relu", [b2.conv(b2.input([N, 3, 8, 8]), 3, 4)])
    head(b2, x, 4)
    result = check_exact(b2.model(), Target(ratio=0.99, max_group_ratio=1.0))
    assert len(result.plan.removed_atoms) == 3  # one channel always stays


@pytest.mark.parametrize("op,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_recurrent_hidden_pruned_per_gate_block(op, gates, direction):
    """Conv front end -> stacked recurrent layers -> linear head (a CRNN in miniature)."""
    dirs, hidden = (2 if direction == "bidirectional" else 1), 6
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 1, 5]), 3, 8, k=1)])  # [N, 8, 1, T]
    seq = b.op("Transpose", [b.op("Squeeze", [x, b.const(np.array([2], dtype=np.int64))])], perm=[2, 0, 1])
    h0 = b.input([dirs, N, hidden], name="h0")
    state = [h0] + ([b.input([dirs, N, hidden], name="c0")] if op == "LSTM" else [])
    y, y_h = b.op(op, [seq, b.weight(dirs, gates * hidden, 8), b.weight(dirs, gates * hidden, hidden),
                      b.weight(dirs, 2 * gates * hidden), ""] + state, n_out=2,
                  hidden_size=hidden, direction=direction)
    merged = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]),
                              b.const(np.array([0, 0, dirs * hidden], dtype=np.int64))])  # [T, N, dirs*H]
    y2, _ = b.op(op, [merged, b.weight(dirs, gates * 5, dirs * hidden), b.weight(dirs, gates * 5, 5)],
                 n_out=2, hidden_size=5, direction=direction)
    last = b.op("Reshape", [b.op("Transpose", [y2], perm=[0, 2, 1, 3]),
                            b.const(np.array([0, 0, dirs * 5], dtype=np.int64))])
    b.output(b.op("MatMul", [last, b.weight(dirs * 5, 3)]))
    model = b.model()
    result = check_exact(model, dims={})
    hidden_attrs = [a.i for n in result.model.graph.node if n.op_type == op for a in n.attribute if a.name == "hidden_size"]
    assert hidden_attrs == [6, 3]  # the first layer's hidden is tied to the graph inputs h0/c0


def _filled_model():
    """A CNN whose conv weights, biases and BatchNorm parameters are ConstantOfShape fills (onnx's
    "light" models): shape vectors as initializers, one shared by two convs of different groups,
    one read through Identity, one a Constant node. The BatchNorm biases are random initializers,
    so channels differ downstream and a wrong slice would show."""
    b = Builder()
    fills = iter([0.05, -0.03, 0.02, 0.07, 0.01, 0.04, 0.06, -0.02, 0.03])

    def filled(shape_name):
        return b.op("ConstantOfShape", [shape_name],
                    value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [next(fills, 0.05)]))

    x = b.input([N, 3, 8, 8])
    s_stem = b.const(np.array([8, 3, 3, 3], np.int64))
    s_vec = b.const(np.array([8], np.int64))  # every 8-channel vector: shared
    s_88 = b.const(np.array([8, 8, 3, 3], np.int64))  # two convs of different groups: shared
    s_id = b.op("Identity", [b.const(np.array([8, 8, 1, 1], np.int64))])
    s_node = b.op("Constant", [], value=onnx.numpy_helper.from_array(np.array([5, 8], np.int64)))
    ones = b.op("ConstantOfShape", [s_vec], value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [1.0]))

    def bn(y):
        return b.op("BatchNormalization", [y, filled(s_vec), b.weight(8), filled(s_vec), ones])

    y = b.op("Relu", [bn(b.op("Conv", [x, filled(s_stem), filled(s_vec)], pads=[1, 1, 1, 1]))])
    y = b.op("Relu", [bn(b.op("Conv", [y, filled(s_88)], pads=[1, 1, 1, 1]))])
    y = b.op("Relu", [bn(b.op("Conv", [y, filled(s_88)], pads=[1, 1, 1, 1]))])
    y = b.op("Relu", [bn(b.op("Conv", [y, filled(s_id), b.weight(8)]))])
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
    b.output(b.op("Gemm", [pooled, filled(s_node)], transB=1))
    return b.model()


def test_constant_of_shape_weights_prune_exactly():
    """Weights filled by ConstantOfShape of a constant shape are constants: their groups prune,
    the oracle agrees, and the rewrite shrinks the shape vectors instead of writing the values."""
    model = _filled_model()
    analysis = analyze(model)
    assert sum(g.prunable for g in analysis.groups) == 4  # the stem, the two s_88 convs, the 1x1 conv
    result = check_exact(model, Target(ratio=0.5))
    pruned = result.model
    assert [n.op_type for n in pruned.graph.node].count("ConstantOfShape") == \
        [n.op_type for n in model.graph.node].count("ConstantOfShape")
    assert max(onnx.numpy_helper.to_array(t).size for t in pruned.graph.initializer) <= 8  # no weight written out
    # every conv's filled weight has its pruned shape; the two convs that shared one shape vector
    # have their own now
    from spa.graph import Consts
    consts = Consts(pruned)
    convs = [n for n in pruned.graph.node if n.op_type == "Conv"]
    assert [consts.shape(c.input[1])[:2] for c in convs] == [(4, 3), (4, 4), (4, 4), (4, 4)]
    assert all(consts.fill(c.input[1]) is not None for c in convs)


def test_constant_of_shape_weights_score_like_their_values():
    """Criteria see the filled values: the same scores as the model with the fills written out."""
    from spa.importance import score

    model = _filled_model()
    written = onnx.ModelProto()
    written.CopyFrom(model)
    values = {}
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape":
            shape = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == node.input[0]) \
                if any(t.name == node.input[0] for t in model.graph.initializer) else None
            if shape is None:
                continue  # read through Identity / a Constant node: left as is in both
            fill = onnx.numpy_helper.to_array(node.attribute[0].t).reshape(())
            values[node.output[0]] = np.full(shape, fill, dtype=np.float32)
    keep = [n for n in written.graph.node if not (n.op_type == "ConstantOfShape" and n.output[0] in values)]
    del written.graph.node[:]
    written.graph.node.extend(keep)
    written.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in values.items())
    for criterion in ("l1", "l2", "fpgm"):
        a, b = score(analyze(model), criterion), score(analyze(written), criterion)
        assert a.keys() == b.keys()
        for gid in a:
            np.testing.assert_allclose(a[gid], b[gid], rtol=1e-6)


def test_constant_of_shape_of_a_computed_shape_stays_frozen():
    """A fill whose shape is computed at run time is no constant: nothing to slice."""
    b = Builder()
    x = b.input([N, 3, 8, 8])
    w = b.op("ConstantOfShape", [b.op("Shape", [b.op("Conv", [x, b.weight(8, 3, 3, 3)], pads=[1, 1, 1, 1])])],
             value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.1]))
    y = b.op("Add", [b.op("Conv", [x, b.weight(8, 3, 3, 3)], pads=[1, 1, 1, 1]), w])
    head(b, b.op("Relu", [y]), 8)
    analysis = analyze(b.model())
    assert not any(m.is_const for m in analysis.members.values() if m.tensor == w)


def test_compensated_constant_of_shape_weights_are_written_as_constants(tmp_path):
    """OBS compensation gives a filled weight non-uniform values: its node becomes a Constant
    holding them; the fills left alone stay ConstantOfShape."""
    from spa.pipeline import prune, save

    model = _filled_model()
    result = prune(model, Target(ratio=0.5), compensation="obs", calibration_samples=16)
    compensated = {name for name in result.weights if name in {n.output[0] for n in model.graph.node
                                                               if n.op_type == "ConstantOfShape"}}
    assert compensated
    ops = {n.output[0]: n.op_type for n in result.model.graph.node}
    assert all(ops[name] == "Constant" for name in compensated)
    assert sum(op == "ConstantOfShape" for op in ops.values()) > 0
    save(result.model, str(tmp_path / "pruned.onnx"))
