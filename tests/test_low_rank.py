"""The low-rank term beside a sparsified layer (spa.low_rank, `spa sparsify --low-rank R`): the fit is
the best rank-R term in the metric of the layer's inputs (brute force), the written branch computes
exactly the layer with the term folded in, and the zeros stay exact."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from scipy.optimize import minimize

import spa
from builder import Builder
from spa import low_rank
from spa.graph import Graph
from spa.layers import weighted_layers
from spa.sparsity import conforms, parse_pattern


def inputs_metric(rows, cols, rng, bias):
    X = rng.standard_normal((rows, cols)) @ rng.standard_normal((cols, cols))  # correlated columns
    if bias:
        X = np.concatenate([X + 0.7, np.ones((rows, 1))], axis=1)  # a mean the bias column must carry
    return 2.0 * X.T @ X / rows


def metric_error(E, D, H):
    R = E - D
    return float(np.sum((R @ H) * R))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out,cols", [(4, 5), (7, 3)])  # the error wider or taller: either Gram matrix
def test_fit_is_the_best_rank_r_term_in_the_inputs_metric(bias, out, cols):
    rng = np.random.default_rng(0)
    rank = 2
    H = inputs_metric(60, cols, rng, bias)
    E = rng.standard_normal((out, cols + bias))
    U, V, change = low_rank.fit(E, H, rank, bias, damp=0.0)
    assert U.shape == (out, rank) and V.shape == (rank, cols) and (change is None) == (not bias)
    ours = metric_error(E, low_rank.as_matrices(np.zeros((1,) + E.shape), U, V, change)[0], H)

    def brute(p):
        u, v = p[:out * rank].reshape(out, rank), p[out * rank:out * rank + rank * cols].reshape(rank, cols)
        D = np.concatenate([u @ v, p[-out:, None]], axis=1) if bias else u @ v
        return metric_error(E, D, H)

    size = out * rank + rank * cols + (out if bias else 0)
    best = min(minimize(brute, rng.standard_normal(size), method="BFGS", options={"gtol": 1e-10}).fun for _ in range(6))
    assert ours == pytest.approx(best, rel=1e-6, abs=1e-9)
    assert ours < metric_error(E, np.zeros_like(E), H)
    U, V, change = low_rank.fit(E, H, cols, bias, damp=0.0)  # full rank: nothing left
    assert metric_error(E, low_rank.as_matrices(np.zeros((1,) + E.shape), U, V, change)[0], H) < 1e-9


def branch_model():
    """Conv (bias, stride 2), MatMul [batch, 6, 12] @ [12, 12] (the activation 3-D) and Gemm transB=1."""
    b = Builder()
    x = b.op("Relu", [b.conv(b.input(["batch", 4, 6, 6]), 4, 8, strides=[2, 2])])
    x = b.op("MatMul", [b.op("Reshape", [x, b.const(np.array([-1, 6, 12], dtype=np.int64))]), b.weight(12, 12)])
    x = b.op("Flatten", [b.op("ReduceMean", [x], axes=[1], keepdims=0)])
    b.output(b.gemm(x, 12, 8, transB=1))
    return b.model()


def test_branches_compute_the_layers_with_the_term_folded_in():
    model = branch_model()
    g = Graph(model)
    layers = [layer for layer in weighted_layers(g) if low_rank.takes_branch(g, layer)]
    assert sorted(g.nodes[layer.node].op_type for layer in layers) == ["Conv", "Gemm", "MatMul"]
    rng = np.random.default_rng(3)
    branches, folded = [], {}
    for layer in layers:
        w = np.asarray(g.consts[layer.weight])
        b = g.consts[layer.bias] if layer.bias else None
        mats = layer.matrices(w, b)
        U, V = rng.standard_normal((mats.shape[1], 2)), rng.standard_normal((2, mats.shape[2] - (b is not None)))
        branches.append((layer, U, V))
        new = layer.from_matrices(low_rank.as_matrices(mats, U, V, None), w.shape, w.dtype,
                                  None if b is None else b.shape, None if b is None else b.dtype)
        folded[layer.weight] = new[0]
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    for init in dense.graph.initializer:
        if init.name in folded:
            init.CopyFrom(onnx.numpy_helper.from_array(folded[init.name].astype(np.float32), init.name))
    branched = low_rank.with_branches(onnx.ModelProto.FromString(model.SerializeToString()), g, branches)
    onnx.checker.check_model(branched, full_check=True)
    x = {"input": rng.standard_normal((3, 4, 6, 6)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, x)[0]  # noqa: E731
    np.testing.assert_allclose(run(branched), run(dense), rtol=1e-4, atol=1e-4)
    kept = {i.name: i for i in branched.graph.initializer}
    for layer in layers:  # the layer's own weight is untouched: its zeros stay where they were
        assert np.array_equal(onnx.numpy_helper.to_array(kept[layer.weight]), np.asarray(g.consts[layer.weight]))


def test_sparsify_with_a_low_rank_term_keeps_the_pattern_and_comes_nearer_the_original(tmp_path):
    model = branch_model()
    rng = np.random.default_rng(5)
    np.save(tmp_path / "cal.npy", rng.standard_normal((256, 4, 6, 6)).astype(np.float32))
    fresh = {"input": rng.standard_normal((64, 4, 6, 6)).astype(np.float32)}
    original = ort.InferenceSession(model.SerializeToString()).run(None, fresh)[0]
    errors = {}
    for rank in (0, 2):
        result = spa.sparsify(model, "2:4", criterion="obs", calibration=str(tmp_path / "cal.npy"), low_rank=rank)
        result.save(str(tmp_path / f"rank{rank}.onnx"))  # verified, or nothing is written
        g = Graph(result.model)
        for layer in weighted_layers(g):
            if layer.weight in {r["name"] for r in result.report["layers"]}:
                assert conforms(np.asarray(g.consts[layer.weight]), layer, parse_pattern("2:4"))
        out = ort.InferenceSession(result.model.SerializeToString()).run(None, fresh)[0]
        errors[rank] = float(np.mean((out - original) ** 2))
        if rank:
            report = result.report["low_rank"]
            assert report["rank"] == 2 and report["layers"] >= 1 and report["parameters"] > 0
            assert sum(n.op_type == "Add" and n.name.startswith("low_rank_") for n in result.model.graph.node) == \
                report["layers"]
    assert errors[2] < errors[0]


def test_a_low_rank_term_needs_obs():
    with pytest.raises(spa.SpaError, match="use it with --criterion obs"):
        spa.sparsify(branch_model(), "2:4", criterion="l1", low_rank=2)


def test_layers_without_a_branch_form():
    b = Builder()
    x = b.conv(b.input(["batch", 4, 6, 6]), 4, 4, group=2)  # grouped
    x = b.op("Reshape", [x, b.const(np.array([-1, 12], dtype=np.int64))])
    b.output(b.op("MatMul", [b.weight(8, 12), b.op("Transpose", [x], perm=[1, 0])]))  # the weight on the left
    g = Graph(b.model())
    layers = weighted_layers(g)
    assert len(layers) == 2 and not any(low_rank.takes_branch(g, layer) for layer in layers)


def test_alternating_the_sparse_part_and_the_term_never_loses_on_held_out_inputs(monkeypatch):
    """More rounds of the sweep for what the term leaves and the term for what the sweep leaves: kept
    only while the held-out error falls, so never above one round's; the pattern holds throughout."""
    import spa.sparse_obs as sparse_obs
    from spa.layers import Layer

    rng = np.random.default_rng(2)
    layer = Layer(node=0, weight="w", in_axis=0, activation="x", kind="dense_t")
    w = rng.standard_normal((24, 16))
    fit, held = inputs_metric(400, 24, rng, False), inputs_metric(400, 24, rng, False)
    pattern = parse_pattern("2:4")

    def held_error(rounds):
        monkeypatch.setattr(sparse_obs, "LOW_RANK_ROUNDS", rounds)
        new, _, (U, V, folded) = sparse_obs.sparsify_layer(layer, w, None, ("full", fit[None]), ("full", held[None]),
                                                          pattern, rank=2)
        assert conforms(new["w"], layer, pattern)
        mats = layer.matrices(w, None)[0]
        return metric_error(mats, layer.matrices(folded["w"], None)[0], held)

    assert held_error(sparse_obs.LOW_RANK_ROUNDS) < held_error(1)
