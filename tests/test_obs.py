"""OBS math (spa/obs.py) against brute force, and the im2col rows against onnxruntime's Conv."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa import obs
from spa.layers import Layer
from spa.runtime import run


def _layer(seed=0, d_out=6, d_in=10, n=200):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d_in)) @ rng.standard_normal((d_in, d_in))  # correlated columns
    return rng.standard_normal((d_out, d_in)), X


def _hessian(rows):
    acc = obs.HessianSum(rows.shape[1])
    for part in np.array_split(rows, 3):  # batch by batch
        acc.add(part)
    return acc.matrix[0]


def _error(W, W_new, X):
    return float(np.sum((X @ W.T - X @ W_new.T) ** 2) / len(X))


def test_hessian_is_two_x_xt_over_n():
    _, X = _layer()
    np.testing.assert_allclose(_hessian(X), 2 * X.T @ X / len(X), rtol=1e-6)


def test_hessian_read_then_added_to_counts_every_row():
    """`matrix` turns the sum into H in place; rows added after it still count."""
    _, X = _layer()
    acc = obs.HessianSum(X.shape[1])
    acc.add(X[:50])
    np.testing.assert_allclose(acc.matrix[0], 2 * X[:50].T @ X[:50] / 50, rtol=1e-6)
    acc.add(X[50:])
    np.testing.assert_allclose(acc.matrix[0], 2 * X.T @ X / len(X), rtol=1e-6)
    assert acc.matrix is acc.matrix  # read twice: the same array, not a second copy


def test_hessian_of_batches_narrower_than_its_columns_waits_for_rows_and_counts_every_one():
    """Batches of fewer rows than d_in wait to be multiplied together: H, the cross term and every
    block still sum every row, whether H is read in between or only at the end."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((700, 64)).astype(np.float32)
    X_ref = X + 0.1 * rng.standard_normal(X.shape).astype(np.float32)
    acc, cross = obs.HessianSum(64, blocks=2), obs.HessianSum(64)
    for k, (part, ref) in enumerate(zip(np.array_split(X, 35), np.array_split(X_ref, 35))):
        acc.add(part, 0)
        acc.add(2 * part, 1, count=False)
        cross.add(part, other=ref)
        if k == 9:
            np.testing.assert_allclose(acc.matrix[0], 2 * X[:200].T @ X[:200] / 200, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.matrix[0], 2 * X.T @ X / len(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.matrix[1], 8 * X.T @ X / len(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cross.matrix[0], 2 * X.T @ X_ref / len(X), rtol=1e-5, atol=1e-6)
    assert acc.count == cross.count == len(X)


@pytest.mark.parametrize("Q", [[3], [0, 7], [1, 2, 5, 9]])
def test_compensation_is_exact_least_squares(Q):
    W, X = _layer()
    new = obs.compensate(W, obs.inverse(_hessian(X), damp=0.0), Q)
    keep = np.setdiff1d(np.arange(W.shape[1]), Q)
    best = np.linalg.lstsq(X[:, keep], X @ W.T, rcond=None)[0].T
    np.testing.assert_allclose(new[:, keep], best, atol=1e-7)
    assert np.all(new[:, Q] == 0)


def test_saliency_is_the_brute_force_loss_increase():
    W, X = _layer(1)
    H = _hessian(X)
    Hinv = obs.inverse(H, damp=0.0)
    sets = [[c] for c in range(W.shape[1])] + [[0, 1], [4, 8, 9]]
    brute = []
    for Q in sets:
        keep = np.setdiff1d(np.arange(W.shape[1]), Q)
        best = np.linalg.lstsq(X[:, keep], X @ W.T, rcond=None)[0].T
        full = np.zeros_like(W)
        full[:, keep] = best
        brute.append(_error(W, full, X))
    np.testing.assert_allclose(obs.saliency(W, Hinv, sets), brute, rtol=1e-6)
    np.testing.assert_allclose(obs.layer_error(W, obs.compensate(W, Hinv, [0, 1]), H), brute[-2], rtol=1e-6)


def test_saliency_ranks_channels_like_brute_force():
    """Channel 2 carries almost nothing (tiny weights), channel 5 duplicates channel 4 (free to
    remove with compensation): both rank lowest; a strong independent channel ranks highest."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((300, 8))
    X[:, 5] = X[:, 4]
    W = rng.standard_normal((4, 8))
    W[:, 2] *= 1e-3
    W[:, 7] *= 10
    s = obs.saliency(W, obs.inverse(_hessian(X)), [[c] for c in range(8)])
    assert set(np.argsort(s)[:2]) == {2, 5} or set(np.argsort(s)[:2]) == {2, 4}
    assert np.argmax(s) == 7


def test_compensation_never_increases_the_error():
    for seed in range(5):
        W, X = _layer(seed, n=30)  # more columns than well-determined directions: damping matters
        H = _hessian(X)
        for Q in ([0], [2, 3, 4], list(range(0, 10, 2))):
            plain = W.copy()
            plain[:, Q] = 0
            compensated = obs.prune_columns(W, H, Q, damp=0.01)
            assert _error(W, compensated, X) <= _error(W, plain, X) + 1e-9


def test_sequential_removal_with_downdate_equals_joint_removal():
    W, X = _layer(3)
    Hinv = obs.inverse(_hessian(X), damp=0.0)
    step = obs.compensate(W, Hinv, [1, 6])
    both = obs.compensate(step, obs.downdate(Hinv, [1, 6]), [3])
    np.testing.assert_allclose(both, obs.compensate(W, Hinv, [1, 3, 6]), atol=1e-8)


@pytest.mark.parametrize("case", ["duplicated", "zero", "few-samples", "all-zero", "huge"])
def test_singular_hessians_give_finite_results(case):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((50, 12))
    if case == "duplicated":
        X[:, 3] = X[:, 7]
        X[:, 8] = 2 * X[:, 7]
    elif case == "zero":
        X[:, [0, 5]] = 0
    elif case == "few-samples":
        X = X[:4]
    elif case == "all-zero":
        X[:] = 0
    else:
        X *= 1e18
    W = rng.standard_normal((5, 12))
    H = _hessian(X)
    Hinv = obs.inverse(H, damp=0.0)  # no damping asked: the fallback must add enough
    assert np.all(np.isfinite(Hinv))
    s = obs.saliency(W, Hinv, [[c] for c in range(12)] + [[3, 7, 8]])
    assert np.all(np.isfinite(s)) and np.all(s >= 0)
    for Q in ([0], [3, 7], [5, 6, 7, 8]):
        new = obs.prune_columns(W, H, Q)
        assert np.all(np.isfinite(new))
        if case != "huge":
            plain = W.copy()
            plain[:, Q] = 0
            assert obs.layer_error(W, new, H) <= obs.layer_error(W, plain, H) * (1 + 1e-9) + 1e-9


def test_refit_matches_least_squares_to_reference_outputs():
    W, X = _layer(5)
    X_ref = X + 0.3 * np.random.default_rng(5).standard_normal(X.shape)
    H = _hessian(X)
    cross = obs.HessianSum(X.shape[1])
    cross.add(X, other=X_ref)
    Q = [2, 4]
    keep = np.setdiff1d(np.arange(W.shape[1]), Q)
    best = np.linalg.lstsq(X[:, keep], X_ref @ W.T, rcond=None)[0].T
    np.testing.assert_allclose(obs.refit(W, H, cross.matrix[0], Q, damp=0.0)[:, keep], best, atol=1e-7)
    # with the same inputs it is the OBS compensation, damping included
    textbook = obs.compensate(W, obs.inverse(H, 0.01), Q)
    np.testing.assert_allclose(obs.refit(W, H, H, Q, damp=0.01), textbook, atol=1e-9)
    np.testing.assert_allclose(obs.prune_columns(W, H, Q, damp=0.01), textbook, atol=1e-9)


# --------------------------------------------------------------------------------------------
# im2col rows: W_matrix @ rows must be exactly what onnxruntime's Conv computes
# --------------------------------------------------------------------------------------------
CONVS = [
    dict(spatial=(9, 8), kernel=(3, 3), c_in=4, c_out=6),
    dict(spatial=(9, 8), kernel=(3, 2), c_in=4, c_out=6, strides=[2, 1], pads=[1, 0, 2, 1]),
    dict(spatial=(10, 9), kernel=(3, 3), c_in=4, c_out=6, dilations=[2, 1], pads=[2, 1, 2, 1]),
    dict(spatial=(8, 8), kernel=(3, 3), c_in=6, c_out=4, group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(spatial=(7, 7), kernel=(3, 3), c_in=4, c_out=8, group=4, auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(spatial=(7, 6), kernel=(2, 3), c_in=3, c_out=3, auto_pad="SAME_LOWER"),
    dict(spatial=(11,), kernel=(3,), c_in=3, c_out=5, strides=[2], pads=[1, 1], dilations=[2]),
    dict(spatial=(4, 5, 5), kernel=(2, 3, 3), c_in=2, c_out=3, pads=[0, 1, 1, 1, 1, 0]),
    # pointwise (unfold's channels-last shortcut): plain, strided on odd sizes, grouped, 1-D, SAME
    dict(spatial=(9, 8), kernel=(1, 1), c_in=4, c_out=6),
    dict(spatial=(9, 7), kernel=(1, 1), c_in=4, c_out=6, strides=[2, 2]),
    dict(spatial=(8, 8), kernel=(1, 1), c_in=6, c_out=4, group=2, strides=[2, 1]),
    dict(spatial=(11,), kernel=(1,), c_in=3, c_out=5, strides=[3]),
    dict(spatial=(7, 7), kernel=(1, 1), c_in=4, c_out=4, auto_pad="SAME_UPPER", strides=[2, 2]),
]


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "x".join(map(str, s["kernel"])) + f"-g{s.get('group', 1)}")
def test_conv_rows_match_onnxruntime(spec):
    rng = np.random.default_rng(0)
    group = spec.get("group", 1)
    attrs = {k: spec[k] for k in ("strides", "pads", "dilations", "auto_pad") if k in spec}
    x = rng.standard_normal((2, spec["c_in"]) + spec["spatial"]).astype(np.float32)
    w = rng.standard_normal((spec["c_out"], spec["c_in"] // group) + spec["kernel"]).astype(np.float32)
    b = rng.standard_normal(spec["c_out"]).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    y = run(model, {"x": x})[0]
    conv = {"strides": spec.get("strides"), "pads": spec.get("pads"), "dilations": spec.get("dilations"),
            "auto_pad": spec.get("auto_pad", "NOTSET")}
    layer = Layer(0, "w", 1, "x", "conv", group, spec["kernel"], conv, bias="b")
    mats = layer.matrices(w, b)
    blocks = layer.rows(x)
    per_block = spec["c_out"] // group
    for k, rows in enumerate(blocks):
        got = rows @ mats[k].T  # (N * positions, out channels of the block)
        expected = np.moveaxis(y[:, k * per_block:(k + 1) * per_block], 1, -1).reshape(-1, per_block)
        np.testing.assert_allclose(got, expected, atol=1e-4)
    pick = np.array([0, 2, len(blocks[0]) - 1])  # rows gathered before unfolding: the same rows
    for k, rows in enumerate(layer.rows(x, pick)):
        np.testing.assert_array_equal(rows, blocks[k][pick])
    # and the Hessian of a block is the explicit unfold's 2 X X^T / N
    acc = obs.HessianSum(blocks[0].shape[1])
    acc.add(blocks[0])
    np.testing.assert_allclose(acc.matrix[0], 2 * blocks[0].T.astype(np.float64) @ blocks[0] / len(blocks[0]),
                               rtol=1e-5, atol=1e-5)
    # round trip of the weight layout
    w_back, b_back = layer.from_matrices(mats, w.shape, w.dtype, b.shape, b.dtype)
    np.testing.assert_array_equal(w_back, w)
    np.testing.assert_array_equal(b_back, b)


def test_conv_rows_match_torch_unfold():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    rows = obs.unfold(x, (3, 2), strides=[2, 1], pads=[1, 0, 1, 0], dilations=[1, 2])
    ref = torch.nn.functional.unfold(torch.tensor(x), (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1))
    np.testing.assert_allclose(rows, ref.transpose(1, 2).reshape(-1, ref.shape[1]).numpy())


def test_refits_along_the_damping_path_match_the_full_inverse():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 8))
    X[:, 3] = 0.0  # a dead input gets its extra damping too
    H = _hessian(X)
    W = rng.standard_normal((4, 8))
    textbook = obs.compensate(W, obs.inverse(H, 0.01), [1, 5])
    np.testing.assert_allclose(obs.refit(W, H, None, [1, 5], damp=0.01), textbook, atol=1e-9)
    for fit, damp in zip(obs.refits(W, H, None, [1, 5], (0.01, 0.1)), (0.01, 0.1)):
        np.testing.assert_allclose(fit, obs.compensate(W, obs.inverse(H, damp), [1, 5]), atol=1e-9)


@pytest.mark.parametrize("per_weight", [False, True])
def test_on_grid_rounds_plainly_under_an_identity_hessian_and_beats_plain_rounding_otherwise(per_weight):
    """obs.on_grid (an OBS update written back onto an integer weight's grid, GPTQ-style): every
    value lands on the grid; with H = I no column's error can be absorbed by another, so it is plain
    rounding; with correlated inputs the H-weighted error is below plain rounding's. The grid has a
    scale and zero point per row, or per weight (MatMulNBits: one per block of columns)."""
    rng = np.random.default_rng(4)
    W = rng.standard_normal((6, 12))
    scale, zero = np.full((6, 1), 0.25), np.arange(6)[:, None] - 3.0
    if per_weight:
        scale = np.repeat(rng.uniform(0.15, 0.35, (6, 3)), 4, axis=1)
        zero = np.repeat(rng.integers(-3, 3, (6, 3)), 4, axis=1)

    def plain(W):
        return (np.clip(np.rint(W / scale) + zero, -128, 127) - zero) * scale

    np.testing.assert_allclose(obs.on_grid(W, np.eye(12), scale, zero, -128, 127, damp=1e-12), plain(W))
    X = rng.standard_normal((500, 3)) @ rng.standard_normal((3, 12)) + 0.1 * rng.standard_normal((500, 12))
    H = X.T @ X / len(X)
    rounded = obs.on_grid(W, H, scale, zero, -128, 127)
    steps = rounded / scale + zero
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-9)

    def error(V):
        return float(np.trace((W - V) @ H @ (W - V).T))

    assert error(rounded) < 0.5 * error(plain(W))


def test_on_grid_holds_a_patterns_zeros_and_beats_rounding_the_sparse_weights_plainly():
    """With `zeros` (a 2:4 pattern's) those weights stay exactly 0 while the errors of the others spread
    onto the columns after them, and the H-weighted error to the sparse weights before rounding is below
    plain rounding's."""
    rng = np.random.default_rng(6)
    W = rng.standard_normal((6, 16))
    zeros = np.zeros_like(W, dtype=bool)
    for group in range(4):
        zeros[np.arange(6)[:, None], group * 4 + np.argsort(np.abs(W[:, group * 4:group * 4 + 4]), 1)[:, :2]] = True
    sparse = np.where(zeros, 0.0, W)
    X = rng.standard_normal((500, 4)) @ rng.standard_normal((4, 16)) + 0.1 * rng.standard_normal((500, 16))
    H, scale, zero = X.T @ X / len(X), np.full((6, 1), 0.3), np.full((6, 1), 2.0)
    rounded = obs.on_grid(sparse, H, scale, zero, -8, 7, zeros=zeros)
    assert np.all(rounded[zeros] == 0)
    steps = rounded / scale + zero
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-9)

    def error(V):
        return float(np.trace((sparse - V) @ H @ (sparse - V).T))

    plain = np.where(zeros, 0.0, (np.clip(np.rint(sparse / scale) + zero, -8, 7) - zero) * scale)
    assert error(rounded) < 0.5 * error(plain)


def test_on_grid_in_lazy_batches_is_column_by_column(monkeypatch):
    """GPTQ's lazy batches (the columns after a block of GRID_BLOCK take its errors in one product)
    give what updating every later column after each rounded column gives."""
    rng = np.random.default_rng(5)
    W = rng.standard_normal((7, 23))
    X = rng.standard_normal((300, 23)) @ rng.standard_normal((23, 23))
    H, scale, zero = X.T @ X / len(X), np.full((7, 1), 0.2), np.zeros((7, 1))
    monkeypatch.setattr(obs, "GRID_BLOCK", 5)
    batched = obs.on_grid(W, H, scale, zero, -8, 7)
    monkeypatch.setattr(obs, "GRID_BLOCK", 1000)
    np.testing.assert_allclose(batched, obs.on_grid(W, H, scale, zero, -8, 7), atol=1e-12)
