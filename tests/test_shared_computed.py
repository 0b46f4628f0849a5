"""Issue 12, computed case: one expanded attention mask read by every layer must not couple the
layers' heads (spa.shared_tensors), and layers that then lose different heads must still read
their own shape vectors (spa.rewrite's copy on write)."""
import numpy as np
import onnx
import pytest

from builder import Builder
from oracle import check_exact
from spa import analyze, shared_tensors
from spa.plan import Plan
from spa.rewrite import rewrite
from spa.runtime import random_inputs, run
from spa.selection import Target
from spa.verify import masked_original

D, H, S = 16, 4, 6
d = D // H


def _attention(b, x, mask, qkv_shape, merge_shape):
    """[B, S, D] -> [B, S, D]: scores + mask, softmax, heads merged, output projection."""
    def heads(perm):
        return b.op("Transpose", [b.op("Reshape", [b.op("MatMul", [x, b.weight(D, D)]), qkv_shape])], perm=perm)

    q, k, v = heads([0, 2, 1, 3]), heads([0, 2, 3, 1]), heads([0, 2, 1, 3])
    scores = b.op("Add", [b.op("MatMul", [q, k]), mask])
    ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    merged = b.op("Reshape", [b.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
    return b.op("Add", [x, b.op("MatMul", [merged, b.weight(D, D)])])


def two_blocks(expand=True):
    """Two attention blocks whose scores add one mask: Expand-ed [B, 1, 1, S] -> [B, H, S, S] with a
    target shape computed from the mask's shape (a Concat both blocks' copies would share), or
    (expand False) the [B, 1, 1, S] mask itself, broadcast by the Adds."""
    b = Builder()
    x = b.input(["B", S, D], "x")
    mask = b.input(["B", 1, 1, S], "mask")
    if expand:
        shape = b.op("Shape", [mask])
        batch = b.op("Slice", [shape, b.const(np.array([0])), b.const(np.array([1]))])
        target = b.op("Concat", [batch, b.const(np.array([H, S])), b.const(np.array([S]))], axis=0)
        mask = b.op("Expand", [mask, target])
    qkv_shape, merge_shape = b.const(np.array([0, 0, H, d])), b.const(np.array([0, 0, D]))
    y = _attention(b, x, mask, qkv_shape, merge_shape)
    y = _attention(b, y, mask, qkv_shape, merge_shape)
    b.output(y)
    return b.model()


def head_groups(analysis):
    return [g for g in analysis.groups if g.kind == "heads" and g.prunable]


def weights_of(group):
    return {m.tensor for m in group.members if m.is_const}


def assert_matches_oracle(plan, batch=2, dims=None):
    pruned = rewrite(plan)
    onnx.checker.check_model(pruned)
    feeds = random_inputs(plan.analysis.model, batch=batch, seed=3, dims=dims)
    got, expected = run(pruned, feeds), run(masked_original(plan), feeds)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, atol=1e-5 * max(1.0, float(np.abs(e).max())), rtol=1e-5)
    # dynamic batch still works
    assert run(pruned, random_inputs(plan.analysis.model, batch=3, seed=4, dims=dims))[0].shape[0] == 3
    return pruned


def test_expanded_mask_does_not_couple_the_blocks(monkeypatch):
    model = two_blocks()
    with monkeypatch.context() as patch:  # without the copies, the one mask couples both blocks
        patch.setattr(shared_tensors, "split_shared_tensors", lambda propagation: False)
        assert len(head_groups(analyze(model))) == 1
    analysis = analyze(model)
    groups = head_groups(analysis)
    assert len(groups) == 2, [[m.tensor for m in g.members] for g in analysis.groups]
    assert not weights_of(groups[0]) & weights_of(groups[1])
    # the caller's model is left alone; the analysis graph carries the mask's copy
    assert len(model.graph.node) < len(analysis.model.graph.node)
    onnx.checker.check_model(analysis.model)


def test_blocks_lose_different_heads_exactly():
    model = two_blocks()
    analysis = analyze(model)
    first, second = head_groups(analysis)
    plan = Plan(analysis, list(first.prunable_atoms[[1]]) + list(second.prunable_atoms[[0, 3]]))
    pruned = assert_matches_oracle(plan)
    widths = sorted({tuple(numpy_shape) for numpy_shape in
                     (list(t.dims) for t in pruned.graph.initializer if len(t.dims) == 2)})
    assert [D, D - d] in [list(w) for w in widths] and [D, D - 2 * d] in [list(w) for w in widths]
    check_exact(model, Target(ratio=0.5), atol=1e-5, rtol=1e-5)


def test_one_block_pruned_the_other_kept():
    model = two_blocks()
    analysis = analyze(model)
    first, _ = head_groups(analysis)
    assert_matches_oracle(Plan(analysis, first.prunable_atoms[:2]))


def test_no_copy_without_coupling():
    """A mask broadcast by the Adds themselves couples nothing: the graph is not touched."""
    model = two_blocks(expand=False)
    analysis = analyze(model)
    assert len(head_groups(analysis)) == 2
    assert len(analysis.model.graph.node) == len(model.graph.node)


def test_dynamo_transformer_encoder_one_head_group_per_layer():
    tz = pytest.importorskip("models.transformers")
    pytest.importorskip("onnxscript")
    try:
        path = tz.cached_export_transformer("torch_encoder", "dynamo")
    except Exception as exc:  # an exporter this torch cannot run
        pytest.skip(f"dynamo export unavailable: {type(exc).__name__}: {exc}")
    model = onnx.load(path)
    analysis = analyze(model)
    groups = head_groups(analysis)
    assert len(groups) == tz.LAYERS == 2
    layers = [{w.split(".")[2] for w in weights_of(g) if w.startswith("encoder.layers.")} for g in groups]
    assert all(len(layer) == 1 for layer in layers) and layers[0] != layers[1], layers
    dims = {"sequence": 5}
    first, second = groups
    assert_matches_oracle(Plan(analysis, list(first.prunable_atoms[:1]) + list(second.prunable_atoms[1:3])),
                          dims=dims)
    check_exact(model, Target(ratio=0.5), dims=dims, atol=1e-5, rtol=1e-5)
