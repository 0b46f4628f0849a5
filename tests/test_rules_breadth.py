"""Breadth of real exports: channel Pad, channel-merging/splitting Reshapes, odd input declarations."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builder import Builder
from oracle import check_exact
from spa import analyze
from spa.runtime import random_inputs

N = "batch"


def head(b, x, c, classes=5):
    return b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])]), c, classes))


def frozen_reasons(model):
    return [r for g in analyze(model).groups for r in g.reasons()]


# ---------------------------------------------------------------------------------------------
# inputs declared with dim_value -1 or 0 (Paddle2ONNX), scalar bool inputs


@pytest.mark.parametrize("declared", [-1, 0])
def test_input_dims_declared_minus_one_or_zero_are_symbolic(declared):
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([declared, 3, declared, declared]), 3, 8)])
    y = b.op("Relu", [b.conv(x, 8, 6)])
    head(b, y, 6)
    model = b.model()
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == declared
    feeds = random_inputs(model, batch=2)
    assert feeds["input"].shape == (2, 3, 32, 32)
    result = check_exact(model, dims={})
    assert len(result.plan.removed_atoms) > 0


def test_zero_declared_file_runs_and_reports(tmp_path):
    """onnxruntime takes a declared 0 as "empty only": a file declaring it runs symbolic."""
    from spa.cost import concrete_shapes
    from spa.runtime import run

    b = Builder()
    y = b.op("Relu", [b.conv(b.input([0, 3, 0, 0]), 3, 4)])
    head(b, y, 4)
    model = b.model()
    path = str(tmp_path / "zero.onnx")
    onnx.save(model, path)
    feeds = random_inputs(model, batch=2)
    assert run(path, feeds)[0].shape == (2, 5)
    shapes = concrete_shapes(model, batch=1)
    assert shapes[model.graph.output[0].name] == (1, 5)


def test_scalar_bool_input_if_condition():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)])
    y = b.op("Relu", [b.conv(x, 8, 6)])
    cond = b.input([], name="cond", dtype=TensorProto.BOOL)
    out = helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Identity", [y], ["branch_out"])], "then", [], [out])
    other = helper.make_graph([helper.make_node("Neg", [y], ["branch_out"])], "else", [], [out])
    b.nodes.append(helper.make_node("If", [cond], ["if_out"], then_branch=then, else_branch=other, name="if"))
    b.outputs.append(helper.make_tensor_value_info("if_out", TensorProto.FLOAT, [N, 6, 8, 8]))
    model = b.model()
    feeds = random_inputs(model, batch=2)
    assert isinstance(feeds["cond"], np.ndarray) and feeds["cond"].shape == () and feeds["cond"].dtype == np.bool_
    analysis = analyze(model)
    assert any(g.prunable for g in analysis.groups)
    result = check_exact(model)
    [frozen_y] = [g for g in result.analysis.groups if any(m.tensor == y for m in g.members)]
    assert not frozen_y.prunable and any("If" in r for r in frozen_y.reasons())


# ---------------------------------------------------------------------------------------------
# Pad on the channel axis: BlazeFace's channel-padding shortcut


def _blaze_block(b, x, c_in, c_out, begin, pad_input):
    """x [N, c_in, H, W] padded to c_out channels and added to a wider conv branch."""
    branch = b.conv(b.op("Relu", [b.conv(x, c_in, c_in, group=c_in)]), c_in, c_out, k=1)
    end = c_out - c_in - begin
    pads = [0, begin, 0, 0, 0, end, 0, 0]
    if pad_input:
        padded = b.op("Pad", [x, b.const(np.array(pads, dtype=np.int64))], mode="constant")
    else:
        padded = b.op("Pad", [x], pads=pads, mode="constant")
    return b.op("Relu", [b.op("Add", [padded, branch])])


@pytest.mark.parametrize("opset,begin", [(13, 0), (13, 2), (9, 0), (9, 3)])
def test_pad_channel_axis_blazeface_shortcut(opset, begin):
    b = Builder(opset=opset)
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 6)])
    y = _blaze_block(b, x, 6, 10, begin, pad_input=opset >= 11)
    head(b, b.conv(y, 10, 4), 4)
    model = b.model()
    assert not any("Pad" in r for r in frozen_reasons(model))
    result = check_exact(model)
    [pad] = [n for n in result.model.graph.node if n.op_type == "Pad"]
    if opset >= 11:
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
        pads = inits[pad.input[1]].tolist()
    else:
        pads = [a.ints for a in pad.attribute if a.name == "pads"][0]
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in onnx.shape_inference.infer_shapes(result.model).graph.value_info}
    assert pads[1] + pads[5] + shapes[pad.input[0]][1] == shapes[pad.output[0]][1]
    assert shapes[pad.input[0]][1] < 6  # the shortcut's channels went with the producer's


def test_pad_channel_axis_opset18_axes_and_negative_crop():
    b = Builder(opset=18)
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)])
    # crop the first channel, pad three at the end: 8 -> 10 channels
    padded = b.op("Pad", [x, b.const(np.array([-1, 3], dtype=np.int64)), b.const(np.float32(0.5)),
                          b.const(np.array([1], dtype=np.int64))])
    y = b.op("Relu", [b.op("Add", [padded, b.conv(x, 8, 10, k=1)])])
    head(b, b.conv(y, 10, 4), 4)
    check_exact(b.model())


def test_pad_channels_last_nhwc():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 6, 6]), 3, 8)])
    nhwc = b.op("Transpose", [x], perm=[0, 2, 3, 1])
    padded = b.op("Pad", [nhwc, b.const(np.array([0, 0, 0, 2, 0, 0, 0, 4], dtype=np.int64))])
    wide = b.op("Add", [b.op("MatMul", [nhwc, b.weight(8, 14)]), b.weight(14)])
    y = b.op("Relu", [b.op("Add", [padded, wide])])
    y = b.op("MatMul", [y, b.weight(14, 6)])
    head(b, b.op("Transpose", [y], perm=[0, 3, 1, 2]), 6)
    check_exact(b.model())


def test_pad_channel_axis_reflect_freezes_with_reason():
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)])
    padded = b.op("Pad", [x, b.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], dtype=np.int64))], mode="reflect")
    head(b, b.conv(padded, 10, 4), 4)
    assert any("reflect Pad of the channel axis" in r for r in frozen_reasons(b.model()))


# ---------------------------------------------------------------------------------------------
# Reshapes that merge the channel axis as the inner factor, or split it into (anchors, values)


@pytest.mark.parametrize("seq,shape", [(8, [0, 4, 8]), ("seq", [0, -1, 8])])
def test_reshape_merges_sequence_into_channels(seq, shape):
    """[B, L, C] -> [B, L/k, k*C]: output channel j*C + c comes from input channel c."""
    b = Builder()
    x = b.input([N, seq, 6])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight(6, 4)])])
    merged = b.op("Reshape", [h, b.const(np.array(shape, dtype=np.int64))])
    b.output(b.op("MatMul", [b.op("Relu", [merged]), b.weight(8, 3)]))
    model = b.model()
    assert not any("Reshape" in r for r in frozen_reasons(model))
    result = check_exact(model, dims={"seq": 8})
    shapes = [onnx.numpy_helper.to_array(i).tolist() for i in result.model.graph.initializer if i.name.endswith("_spa")]
    assert [0, shape[1], 4] in shapes  # k * C rewritten to k * C' (C 4 -> 2)


def test_reshape_merge_entered_from_both_sides():
    """The merged tensor is also added to another layer's output: the map is the same both ways."""
    b = Builder()
    h = b.op("Relu", [b.op("MatMul", [b.input([N, 8, 6]), b.weight(6, 4)])])
    merged = b.op("Reshape", [h, b.const(np.array([0, 4, 8], dtype=np.int64))])
    other = b.op("MatMul", [b.input([N, 4, 5], name="other"), b.weight(5, 8)])
    y = b.op("Relu", [b.op("Add", [merged, other])])
    b.output(b.op("MatMul", [y, b.weight(8, 3)]))
    model = b.model()
    [group] = [g for g in analyze(model).groups if any(m.tensor == merged for m in g.members)]
    assert group.prunable and len(group.atoms) == 4
    check_exact(model)


def test_reshape_merge_symbolic_sequence_entered_from_both_sides():
    """floor(seq/2) is no fold of heads into seq: the channels map back to channels."""
    b = Builder()
    h = b.op("Relu", [b.op("MatMul", [b.input([N, "seq", 6]), b.weight(6, 4)])])
    merged = b.op("Reshape", [h, b.const(np.array([0, -1, 8], dtype=np.int64))])
    y = b.op("Relu", [b.op("Add", [merged, b.op("MatMul", [merged, b.weight(8, 8)])])])
    b.output(b.op("MatMul", [y, b.weight(8, 3)]))
    model = b.model()
    [group] = [g for g in analyze(model).groups if any(m.tensor == merged for m in g.members)]
    assert group.prunable and group.kind == "channels" and len(group.atoms) == 4
    check_exact(model, dims={"seq": 8})


def test_detection_head_split_into_anchors_and_values():
    """[N, A*V, H, W] -> [N, A, V, H, W]: whole anchors go (channels a*V .. a*V + V - 1)."""
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 4, 4]), 3, 12)])
    split = b.op("Reshape", [x, b.const(np.array([0, 3, 4, 4, 4], dtype=np.int64))])
    merged = b.op("Reshape", [b.op("Sigmoid", [split]), b.const(np.array([0, 12, 4, 4], dtype=np.int64))])
    b.output(b.conv(merged, 12, 2))
    model = b.model()
    [group] = [g for g in analyze(model).groups if any(m.tensor == split for m in g.members)]
    assert group.kind == "heads" and group.prunable
    result = check_exact(model)
    assert len(result.plan.removed_atoms) == 1  # one anchor of three, 4 channels
    assert any(onnx.numpy_helper.to_array(i).tolist() == [0, 2, 4, 4, 4] for i in result.model.graph.initializer)


def test_ssd_head_anchors_merged_with_positions():
    """[N, H, W, A*V] -> [N, H*W*A, V]: value position v of every anchor goes together."""
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 4, 4]), 3, 12)])
    nhwc = b.op("Transpose", [x], perm=[0, 2, 3, 1])
    boxes = b.op("Reshape", [nhwc, b.const(np.array([0, -1, 4], dtype=np.int64))])
    b.output(b.op("MatMul", [b.op("Relu", [boxes]), b.weight(4, 2)]))
    model = b.model()
    [group] = [g for g in analyze(model).groups if any(m.tensor == boxes for m in g.members)]
    assert group.prunable and len(group.atoms) == 4
    check_exact(model)


def test_reshape_channel_pairs_into_rows():
    """[N, 8, H, W] -> [N, 4, 2H, W]: output channel t holds input channels 2t and 2t + 1."""
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 4, 4]), 3, 8)])
    r = b.op("Reshape", [x, b.const(np.array([0, 4, 8, 4], dtype=np.int64))])
    head(b, b.conv(b.op("Relu", [r]), 4, 3), 3)
    model = b.model()
    [group] = [g for g in analyze(model).groups if any(m.tensor == r for m in g.members)]
    assert group.prunable and len(group.atoms) == 4
    result = check_exact(model)
    assert any(onnx.numpy_helper.to_array(i).tolist() == [0, 2, 8, 4] for i in result.model.graph.initializer)


def test_reshape_without_channel_map_freezes_with_reason():
    """[N, 6, 4, 4] -> [N, 4, 6, 4]: output channel 0 holds channel 0 and half of channel 1."""
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 4, 4]), 3, 6)])
    r = b.op("Reshape", [x, b.const(np.array([0, 4, 6, 4], dtype=np.int64))])
    b.output(b.conv(r, 4, 2))
    assert any("Reshape regroups the channel axis" in r for r in frozen_reasons(b.model()))


def test_pad_channel_axis_padded_channels_can_go_too():
    from spa.selection import Target

    b = Builder()
    x = b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 6)])
    y = _blaze_block(b, x, 6, 10, 2, pad_input=True)
    head(b, b.conv(y, 10, 4), 4)
    result = check_exact(b.model(), Target(ratio=0.8))  # 8 of 10: padded channels among them
    [pad] = [n for n in result.model.graph.node if n.op_type == "Pad"]
    pads = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in result.model.graph.initializer}[pad.input[1]]
    assert pads[1] + pads[5] < 4


# ---------------------------------------------------------------------------------------------
# paddle2onnx: shape vectors behind Identity, flatten(2) by the input's own leading sizes


def test_a_bias_reshaped_by_a_shape_vector_behind_identity_prunes():
    """paddle2onnx writes each conv bias as Reshape(b, Identity([1, -1, 1, 1])) added to the conv, at
    opset 7. ONNX's shape inference does not read a target behind Identity, and onnxruntime's
    symbolic inference then merged the unknown dims with the Add's other operand ([N, 16, 8, W] for
    a [1, 16, 1, 1] bias): every such group froze (PP-OCRv5's recognizer: 6 of 26 groups prunable)."""
    b = Builder(opset=7)
    y = b.conv(b.input([N, 3, 8, "W"]), 3, 16, bias=False)
    shape = b.op("Identity", [b.const(np.array([1, -1, 1, 1], dtype=np.int64))])
    y = b.op("Relu", [b.op("Add", [y, b.op("Reshape", [b.weight(16), shape])])])
    b.output(b.conv(y, 16, 4), [N, 4, 8, "W"])
    model = b.model()
    assert [g.prunable for g in analyze(model).groups] == [True, False]
    check_exact(model, dims={"W": 6})


def test_a_flatten_by_the_inputs_own_leading_sizes_keeps_the_channel_axis():
    """paddle2onnx's flatten(2): Reshape(x, Concat(Slice(Shape(x), 0, 2), [-1])) with symbolic spatial
    sizes. The leading sizes are x's own, read at run time, so the channel axis passes unchanged
    (before: "Reshape around the channel axis with symbolic sizes", the SVTR neck of PP-OCR)."""
    b = Builder()
    y = b.op("Relu", [b.conv(b.input([N, 3, 8, "W"]), 3, 16)])
    ints = {k: b.const(np.array([k], dtype=np.int64)) for k in (0, 2, -1)}
    lead = b.op("Slice", [b.op("Shape", [y]), ints[0], ints[2], ints[0]])
    flat = b.op("Reshape", [y, b.op("Concat", [lead, ints[-1]], axis=0)])
    b.output(b.op("MatMul", [b.op("Transpose", [flat], perm=[0, 2, 1]), b.weight(16, 4)]), [N, "L", 4])
    model = b.model()
    assert [g.prunable for g in analyze(model).groups] == [True, False]
    check_exact(model, dims={"W": 6})


def test_an_opset7_neck_whose_reshape_reads_a_width_and_identity_chained_sizes_prunes():
    """PP-OCRv5's recognizer as paddle2onnx writes it at opset 7: the SVTR neck reshapes [N, W, C] to
    [N, 1, W, C] with a target Concat of constants behind Identity(Identity()) and a width read off
    another tensor's Shape by an attribute Slice (opset < 10). The Slice's bounds were read from
    inputs only, so the width counted as the channel count ("sizes Reshape of another tensor");
    onnxruntime's symbolic inference passes no values through Identity, so C came out unknown; and the
    probe did not reach the Concat's pieces behind the outer Identity, so C was not rewritten."""
    b = Builder(opset=7)
    y = b.op("Relu", [b.conv(b.input([N, 3, 1, "W"]), 3, 16)])
    h = b.op("MatMul", [b.op("Transpose", [b.op("Squeeze", [y], axes=[2])], perm=[0, 2, 1]), b.weight(16, 12)])
    width = b.op("Squeeze", [b.op("Slice", [b.op("Shape", [y])], axes=[0], starts=[3], ends=[4])], axes=[0])

    def piece(scalar):
        chained = b.op("Identity", [b.op("Identity", [b.const(np.array(scalar, dtype=np.int64))])])
        return b.op("Unsqueeze", [chained], axes=[0])

    target = b.op("Identity", [b.op("Concat", [piece(0), piece(1), b.op("Unsqueeze", [width], axes=[0]), piece(12)],
                                     axis=0)])
    z = b.op("Relu", [b.op("Transpose", [b.op("Reshape", [h, target])], perm=[0, 3, 1, 2])])
    b.output(b.conv(z, 12, 4), [N, 4, 1, "W"])
    model = b.model()
    assert [g.prunable for g in analyze(model).groups] == [True, True, False]
    check_exact(model, dims={"W": 6})


@pytest.mark.parametrize("time_axis, batch_axis", [(0, 1), (1, 0)])
def test_reverse_sequence_passes_channels_through(time_axis, batch_axis):
    """ReverseSequence (TensorFlow's reversed half of a bidirectional recurrence, mk8dx's BiLSTM):
    per-channel identity on the last axis; sequence_lens untouched."""
    b = Builder()
    dims = [N, "time"] if batch_axis == 0 else ["time", N]
    x = b.input([*dims, 6])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight(6, 8)])])
    steps = b.op("Shape", [x], start=time_axis, end=time_axis + 1)  # every sequence at full length
    counts = b.op("Expand", [steps, b.op("Shape", [x], start=batch_axis, end=batch_axis + 1)])
    r = b.op("ReverseSequence", [h, counts], time_axis=time_axis, batch_axis=batch_axis)
    b.output(b.op("MatMul", [b.op("Add", [r, h]), b.weight(8, 3)]))
    model = b.model()
    assert not any("ReverseSequence" in r for r in frozen_reasons(model))
    check_exact(model, dims={"time": 5})


@pytest.mark.parametrize("width", ["computed", "constant"])
def test_a_scatter_add_of_edge_messages_prunes_its_feature_channels(width):
    """A graph network's message passing (minimol, caustic-nmr): messages [edges, F] from the source
    nodes' features, summed into their target nodes by ScatterElements(zeros [nodes, F], indices
    Expand(target [edges, 1], [edges, F]), messages, reduction add); F prunes through data, indices,
    messages and output, with the zeros' and the Expand's shape vectors (F read off a shape or
    written as a constant)."""
    b = Builder()
    x = b.input(["nodes", 6])
    source, target = b.const(np.array([0, 1, 2, 3, 1, 0])), b.const(np.array([1, 2, 3, 0, 0, 2]))
    h = b.op("Relu", [b.op("MatMul", [x, b.weight(6, 8)])])
    messages = b.op("Gather", [h, source], axis=0)
    if width == "computed":
        features = b.op("Shape", [messages], start=1, end=2)
    else:
        features = b.const(np.array([8]))
    nodes = b.op("Shape", [x], start=0, end=1)
    zeros = b.op("ConstantOfShape", [b.op("Concat", [nodes, features], axis=0)],
                 value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
    edges = b.op("Shape", [messages], start=0, end=1)
    indices = b.op("Expand", [b.op("Reshape", [target, b.const(np.array([-1, 1]))]),
                              b.op("Concat", [edges, features], axis=0)])
    summed = b.op("ScatterElements", [zeros, indices, messages], axis=0, reduction="add")
    b.output(b.op("MatMul", [b.op("Add", [summed, h]), b.weight(8, 3)]))
    model = b.model()
    assert not any("ScatterElements" in r for r in frozen_reasons(model)), frozen_reasons(model)
    check_exact(model, dims={"nodes": 4})


def test_gather_elements_along_another_axis_passes_channels_through():
    b = Builder()
    x = b.input([N, 4, 6])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight(6, 8)])])
    picked = b.op("GatherElements", [h, b.const(np.array([[[3] * 8, [0] * 8]] * 2))], axis=1)
    b.output(b.op("MatMul", [picked, b.weight(8, 3)]))
    check_exact(b.model(), batch=2)
