"""Real exports: shared (deduplicated) constants, deep graphs, very wide concats."""
import os
import time

import numpy as np
import onnx
import pytest

from builder import Builder
from oracle import check_exact
from spa import analyze
from spa.selection import Target

N = "batch"


def _group_of(analysis, tensor):
    [group] = [g for g in analysis.groups if any(m.tensor == tensor for m in g.members)]
    return group


def _two_stages(shared_value, through_identity=True):
    """conv1 -> relu -> conv2 -> relu -> conv3 -> head, conv1 and conv2 reading one bias (the second
    through an Identity, as torch.onnx's deduplication writes it), their BNs one set of statistics."""
    b = Builder()
    bias = b.const(shared_value, "shared_bias")
    ones, zeros = b.const(np.ones(8, np.float32), "ones"), b.const(np.zeros(8, np.float32), "zeros")
    x = b.input([N, 3, 8, 8])
    y1 = b.op("Conv", [x, b.weight(8, 3, 3, 3), bias], pads=[1] * 4)
    y1 = b.op("Relu", [b.op("BatchNormalization", [y1, ones, zeros, zeros, ones])])
    bias2 = b.op("Identity", [bias]) if through_identity else bias
    y2 = b.op("Conv", [y1, b.weight(8, 8, 3, 3), bias2], pads=[1] * 4)
    y2 = b.op("Relu", [b.op("BatchNormalization", [y2, ones, zeros, zeros, ones])])
    y3 = b.op("Relu", [b.conv(y2, 8, 6)])
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [y3])]), 6, 5))
    return b.model(), y1, y2


@pytest.mark.parametrize("through_identity", [True, False])
def test_shared_zero_bias_does_not_couple_stages(through_identity):
    model, y1, y2 = _two_stages(np.zeros(8, np.float32), through_identity)
    analysis = analyze(model)
    g1, g2 = _group_of(analysis, y1), _group_of(analysis, y2)
    assert g1.id != g2.id and g1.prunable and g2.prunable
    conv1, conv2 = [n.name for n in model.graph.node if n.op_type == "Conv"][:2]
    result = check_exact(model, Target(ratios={conv1: 0.25, conv2: 0.75}))
    widths = sorted(int(t.dims[0]) for t in result.model.graph.initializer if len(t.dims) == 4)
    assert widths == [2, 6, 6]  # conv2 kept 2 channels, conv1 6, conv3 all 6
    # equal slices of the shared zeros are written once per width, not once per consumer
    vectors = [t for t in result.model.graph.initializer if len(t.dims) == 1 and t.dims[0] in (2, 6)]
    assert len(vectors) == 3 * 2 + 1  # bias, ones, zeros at widths 6 and 2, plus conv3's own bias


def test_shared_constant_with_values_gets_a_copy_per_slice():
    model, y1, y2 = _two_stages(np.arange(8, dtype=np.float32) - 3)
    result = check_exact(model, Target(ratio=0.5))
    assert len(result.model.graph.initializer) <= len(model.graph.initializer) + 4


def test_unpruned_consumers_keep_reading_the_shared_constant():
    model, y1, y2 = _two_stages(np.zeros(8, np.float32))
    conv1 = [n.name for n in model.graph.node if n.op_type == "Conv"][0]
    result = check_exact(model, Target(ratios={conv1: 0.5}))
    names = {t.name for t in result.model.graph.initializer}
    assert {"shared_bias", "ones", "zeros"} <= names  # still read, unchanged, by the second stage
    assert sum(t.dims == [8] for t in result.model.graph.initializer) == 3


def test_dedup_resnet_export_has_true_group_count(tmp_path):
    torch = pytest.importorskip("torch")
    from models.cnn import resnet50

    torch.manual_seed(0)
    net = resnet50(width=8, layers=(1, 1, 1, 1), num_classes=10).eval()  # fresh: BN folds to zero biases
    path = str(tmp_path / "r.onnx")
    torch.onnx.export(net, torch.randn(1, 3, 32, 32), path, opset_version=17, do_constant_folding=True,
                      dynamo=False)
    model = onnx.load(path)
    shared = {}
    for node in model.graph.node:
        for name in node.input:
            shared[name] = shared.get(name, 0) + 1
    assert any(n > 1 for k, n in shared.items() if k in {t.name for t in model.graph.initializer}), \
        "the export no longer deduplicates: this test lost its subject"
    analysis = analyze(model)
    # stem + 4 stage residual groups + 2 inner groups per bottleneck; the classifier's output is frozen
    assert sum(g.prunable for g in analysis.groups) == 1 + 4 + 2 * 4
    result = check_exact(model, Target(ratio=0.5), dims={"batch": 1}, batch=1)
    assert result.model.ByteSize() < model.ByteSize()


def test_deep_chains_do_not_recurse():
    """2000 nodes between the input and a Gemm, and a weight read through 1100 Identity/Cast
    nodes: nothing in the analysis recurses over graph depth (Python's limit is 1000 frames)."""
    b = Builder()
    x = b.conv(b.input([N, 3, 4, 4]), 3, 8)
    for k in range(2000):
        x = b.op("Relu" if k % 2 else "Identity", [x])
    w = b.weight(8, 6)
    for k in range(1100):
        w = b.op("Identity" if k % 2 else "Cast", [w], **({} if k % 2 else {"to": onnx.TensorProto.FLOAT}))
    y = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [x])]), w])
    b.output(b.gemm(b.op("Relu", [y]), 6, 3))
    model = b.model()
    analysis = analyze(model)
    assert analysis.graph.is_static(w) and not analysis.graph.is_static(x)
    assert sum(g.prunable for g in analysis.groups) == 2
    check_exact(model)


def _wide_concat(n, extra=()):
    b = Builder()
    x = b.input([N, 3, 4, 4])
    y = b.op("Concat", [b.conv(x, 3, 2, k=1) for _ in range(n)] + [e(b, x) for e in extra], axis=1)
    width = 2 * n + 3 * len(extra)
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [y])])]), width, 3))
    return b.model()


def test_concat_of_1000_inputs_is_linear():
    from spa.graph import Graph
    from spa.groups import Options, Propagation

    model = _wide_concat(1000)
    start = time.perf_counter()
    propagation = Propagation(Graph(model), Options())
    analysis = propagation.run()
    assert time.perf_counter() - start < 10
    assert len(propagation.edges) < 5 * 1000  # each input's slice once or twice, not every pair
    assert len(analysis.atom_group) >= 2000 and sum(g.prunable for g in analysis.groups) == 1


@pytest.mark.parametrize("op", ["Sum", "Max", "Mean"])
def test_variadic_elementwise_of_1000_inputs_is_linear(op):
    from spa.graph import Graph
    from spa.groups import Options, Propagation

    b = Builder()
    x = b.input([N, 3, 4, 4])
    y = b.op(op, [b.conv(x, 3, 2, k=1) for _ in range(1000)])
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [y])])]), 2, 3))
    propagation = Propagation(Graph(b.model()), Options())
    analysis = propagation.run()
    assert len(propagation.edges) < 5 * 1000  # each operand to the output, not every pair (34 s before)
    assert sum(g.prunable for g in analysis.groups) == 1 and len(analysis.groups[0].atoms) == 2


def test_small_variadic_sum_is_exact():
    b = Builder()
    x = b.input([N, 3, 4, 4])
    y = b.op("Sum", [b.conv(x, 3, 6, k=1) for _ in range(3)] + [b.conv(x, 3, 6, k=3)])
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [y])])]), 6, 3))
    check_exact(b.model())


def test_small_concat_stays_exact_and_freezes_what_it_must():
    # the graph input's slice is frozen even when every conv slice reaches the concat first
    model = _wide_concat(4, extra=[lambda b, x: x, lambda b, x: b.op("Relu", [x])])
    analysis = analyze(model)
    [group] = [g for g in analysis.groups if g.prunable]
    assert len(group.frozen) == 3 and len(group.prunable_atoms) == 8  # x and Relu(x): the same 3 channels
    check_exact(model)


def test_old_ir_models_keep_new_constants_among_graph_inputs(tmp_path):
    """IR < 4 lists every initializer among the graph inputs; constants the rewrite adds (e.g. a
    ConstantOfShape's new shape) must be listed too, or the checker refuses the pruned model."""
    onnx_test_data = pytest.importorskip("onnx.backend.test").__file__
    path = os.path.join(os.path.dirname(onnx_test_data), "data", "light", "light_squeezenet.onnx")
    if not os.path.exists(path):
        pytest.skip("onnx's light models are not installed")
    from spa.cli import main
    out = tmp_path / "small.onnx"
    assert main(["prune", path, "-o", str(out), "--ratio", "0.3", "-q"]) == 0
    pruned = onnx.load(out)
    assert pruned.ir_version < 4
    assert {t.name for t in pruned.graph.initializer} <= {vi.name for vi in pruned.graph.input}


def test_shape_inference_leaves_the_working_directory_alone(tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference, where it gives up, first saves sym_shape_infer_temp.onnx
    and per-tensor uuid .data files into the working directory (the QOperator shufflenet of the
    survey did this): the analysis runs it in a scratch folder."""
    from spa import graph

    class GivesUp:
        @staticmethod
        def infer_shapes(model, **kwargs):
            onnx.save_model(model, "sym_shape_infer_temp.onnx")
            raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.setattr(graph, "_symbolic_shape_inference", lambda: GivesUp)
    b = Builder()
    b.output(b.op("Relu", [b.conv(b.input(["batch", 3, 8, 8]), 3, 8)]))
    monkeypatch.chdir(tmp_path)
    assert graph._symbolic_shapes(b.model()) == {}
    assert os.listdir(tmp_path) == []


def _declared_rank_zero(extra_output: bool = False):
    """conv -> relu -> conv, and Shape -> Cast as a second output declared rank 0 where it infers as
    rank 1: the full checker rejects it, onnxruntime merges leniently and runs it (an exporter's
    slip, as in paddle2onnx's SLANet). `extra_output`: a third output declared wrongly too."""
    b = Builder()
    x = b.input([N, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8)])
    b.output(b.conv(y, 8, 4))
    b.output(b.op("Cast", [b.op("Shape", [x])], to=1))
    if extra_output:
        b.output(b.op("Cast", [b.op("Shape", [y])], to=1))
    model = b.model()
    for out in model.graph.output[1:]:
        del out.type.tensor_type.shape.dim[:]
        out.type.tensor_type.shape.SetInParent()  # a shape of rank 0, not none
    return model


def test_a_model_the_checker_rejects_as_exported_prunes_with_a_warning(tmp_path, capsys):
    from spa.cli import main
    from spa.verify import _check

    path = tmp_path / "m.onnx"
    onnx.save(_declared_rank_zero(), path)
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.25", "--criterion", "l1"]) == 0
    err = capsys.readouterr().err
    assert "the original model fails the onnx checker the same way" in err and "differ in rank" in err
    with pytest.raises(Exception, match="differ in rank"):  # a failure of its own: not let through
        _check(_declared_rank_zero(extra_output=True).SerializeToString(), str(path))
    with pytest.raises(Exception, match="differ in rank"):
        _check(_declared_rank_zero().SerializeToString(), None)


def test_nodes_out_of_topological_order_are_sorted_and_said(tmp_path, capsys):
    from spa.cli import main
    from spa.graph import sort_topologically

    b = Builder()
    b.output(b.conv(b.op("Relu", [b.conv(b.input([N, 3, 8, 8]), 3, 8)]), 8, 4))
    model = b.model()
    assert not sort_topologically(model.graph)  # already in order: untouched
    shuffled = list(reversed(model.graph.node))
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    with pytest.raises(Exception, match="topologically sorted"):
        onnx.checker.check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.25", "--criterion", "l1"]) == 0
    assert "its nodes were not in topological order" in capsys.readouterr().err
    pruned = onnx.load(tmp_path / "p.onnx")
    assert [n.name for n in pruned.graph.node] != [n.name for n in shuffled]
