"""OBS sparsity masks with weight updates (spa.sparse_obs) against brute-force references."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from spa import obs
from spa.sparse_obs import column_order, refit_kept, sparsegpt

N_M = SimpleNamespace(kind="n:m", n=2, m=4, amount=0.5)
FIXED = SimpleNamespace(kind="k-of-n", amount=0.5)


def correlated_hessian(d, rng, rows=400):
    x = rng.normal(size=(d, rows))
    x[: d // 2] += 0.8 * x[d - d // 2:]  # correlated columns: the update has something to do
    x[1] *= 4
    return 2 * x @ x.T / rows


def sequential_obs(w, H, pruned, damp):
    """Columns visited in order; a pruned weight is zeroed and the columns after it re-fitted by
    least squares (the later columns minimise the output error given the earlier ones), naively."""
    Hd = obs.damped(H, damp)
    out = np.array(w, dtype=np.float64)
    for r, i in itertools.product(range(len(w)), range(w.shape[1])):
        if pruned[r, i]:
            later = np.arange(i + 1, w.shape[1])
            out[r, later] += out[r, i] * Hd[i, later] @ np.linalg.inv(Hd[np.ix_(later, later)])
            out[r, i] = 0.0
    return out


def test_fixed_mask_update_is_sequential_obs():
    rng = np.random.default_rng(0)
    H, w = correlated_hessian(12, rng), rng.normal(size=(3, 12))
    pruned = rng.random((3, 12)) < 0.5
    got = sparsegpt(w, H, FIXED, damp=0.01, fixed=pruned)
    np.testing.assert_allclose(got, sequential_obs(w, H, pruned, 0.01), rtol=1e-6, atol=1e-8)
    assert obs.layer_error(w, got, H) < obs.layer_error(w, np.where(pruned, 0, w), H)


@pytest.mark.parametrize("seed", range(5))
def test_n_m_conforms_and_beats_magnitude(seed):
    rng = np.random.default_rng(seed)
    H, w = correlated_hessian(16, rng), rng.normal(size=(8, 16))
    got = sparsegpt(w, H, N_M, damp=0.01)
    assert np.count_nonzero(got.reshape(8, 4, 4), axis=2).max() <= 2
    magnitude = w.copy()
    for r, g in itertools.product(range(8), range(4)):
        block = slice(4 * g, 4 * g + 4)
        magnitude[r, block][np.argsort(np.abs(w[r, block]))[:2]] = 0.0
    assert obs.layer_error(w, got, H) <= obs.layer_error(w, magnitude, H)


def test_mask_choice_is_optimal_for_one_group():
    """One row, one group of 4, diagonal H: OBS picks the best of all 6 masks."""
    rng = np.random.default_rng(3)
    H = np.diag(rng.uniform(0.1, 5, 4))
    w = rng.normal(size=(1, 4))
    got = sparsegpt(w, H, N_M, damp=1e-9)
    best = min(obs.layer_error(w, np.where(np.isin(np.arange(4), keep), w, 0), H)
               for keep in itertools.combinations(range(4), 2))
    assert obs.layer_error(w, got, H) == pytest.approx(best, rel=1e-6)


def test_unstructured_amount_and_frozen_bias_column():
    rng = np.random.default_rng(1)
    H, w = correlated_hessian(11, rng), rng.normal(size=(4, 11))
    got = sparsegpt(w, H, SimpleNamespace(kind="unstructured", amount=0.5), frozen=1)
    assert np.count_nonzero(got[:, :10] == 0) == 20
    assert np.all(got[:, 10] != 0)  # the bias column takes updates, is never pruned


@pytest.mark.parametrize("seed", range(3))
def test_refit_reaches_the_least_squares_optimum_for_the_mask(seed):
    """Per row, the kept weights solve H_KK w_K = (H w0)_K (damped H), brute force by row; the
    sweep's weights are above that error, the refit's never."""
    rng = np.random.default_rng(seed)
    H, w = correlated_hessian(16, rng), rng.normal(size=(6, 17))
    H = np.pad(H, ((0, 1), (0, 1)))
    H[-1, -1], H[-1, :-1], H[:-1, -1] = 2.0, 0.3, 0.3  # a bias column of ones
    swept = sparsegpt(w, H, N_M, damp=0.01, frozen=1)
    got = refit_kept(w, swept, H, damp=0.01, frozen=1, iterations=50)
    Hd = obs.damped(H, 0.01)
    for r in range(len(w)):
        keep = swept[r] != 0
        keep[-1] = True
        best = np.zeros(17)
        best[keep] = np.linalg.solve(Hd[np.ix_(keep, keep)], (Hd @ w[r])[keep])
        np.testing.assert_allclose(got[r], best, rtol=1e-4, atol=1e-6)
    assert np.array_equal(got[:, :16] == 0, swept[:, :16] == 0)  # the mask stays
    assert obs.layer_error(w, got, Hd) <= obs.layer_error(w, swept, Hd)
    few = refit_kept(w, swept, H, damp=0.01, frozen=1, iterations=3)
    assert obs.layer_error(w, got, Hd) <= obs.layer_error(w, few, Hd) <= obs.layer_error(w, swept, Hd)


def test_conv_columns_group_input_channels_per_kernel_position():
    layer = SimpleNamespace(per_index=9, bias="b")
    order = column_order(layer, 4 * 9)
    assert list(order[:4]) == [0, 9, 18, 27]  # channels 0..3 at kernel position 0
    assert order[-1] == 36 and sorted(order) == list(range(37))


@pytest.mark.parametrize("kind", ["dense", "dense_t"])
def test_wide_layer_mask_is_the_sweep_under_its_diagonal_hessian(kind):
    """A layer too wide for a full H: the diagonal's mask (|w| ||x||) is what the OBS sweep
    chooses under that diagonal H, and nothing is updated (no column is coupled to another)."""
    from spa.layers import Layer
    from spa.sparse_obs import diagonal

    rng = np.random.default_rng(4)
    w, diag = rng.normal(size=(6, 16)), rng.uniform(0.1, 5, 16)
    layer = Layer(node=0, weight="w", in_axis=1 if kind == "dense" else 0, activation="x", kind=kind)
    got = diagonal(layer, w if kind == "dense" else w.T, None, diag[None], N_M)[0]
    swept = sparsegpt(w, np.diag(diag), N_M, damp=1e-12)
    np.testing.assert_allclose(got, swept, atol=1e-9)
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(w)) and np.all((got == 0) | (got == w))


def test_calibration_at_sizes_the_model_does_not_take_is_one_error():
    """Stages never run the last layer: a Flatten of a map larger than the model was made for
    would hand it more columns than its weight has (and, wide, a diagonal H of them)."""
    from builder import Builder
    from spa.calibration import Calibration
    from spa.errors import CalibrationRunError
    from spa.graph import Graph
    from spa.sparse_obs import obs_sparsify
    from spa.sparsity import Pattern, eligible_layers

    b = Builder()
    x = b.op("Flatten", [b.op("Relu", [b.conv(b.input(["batch", 3, "h", "w"]), 3, 8)])])
    b.output(b.op("MatMul", [x, b.weight(8 * 6 * 6, 4)]))
    model = b.model()
    layers = eligible_layers(Graph(model), Pattern("n:m", n=2, m=4))[0]
    with pytest.raises(CalibrationRunError, match="takes 288 inputs per row, the calibration gives it"):
        obs_sparsify(model, layers, Pattern("n:m", n=2, m=4), "synthetic")
    assert obs_sparsify(model, layers, Pattern("n:m", n=2, m=4), Calibration("synthetic", shapes=(1, 3, 6, 6)))


def test_an_integer_layers_update_is_judged_on_its_grid_against_plain_rounding_and_the_magnitude_mask():
    """`grid` puts the OBS weights on an integer grid in several ways; the held-out judge takes the
    best of those and the magnitude mask (whose weights are on the grid already): never worse than
    either, and the pattern's zeros stay zeros."""
    from spa.layers import Layer
    from spa.obspa import held_error
    from spa.sparse_obs import magnitude, sparsify_layer

    rng = np.random.default_rng(7)
    scale = 0.25
    w = np.rint(rng.normal(size=(6, 16)) / scale) * scale  # on the grid, zero point 0
    H, held = correlated_hessian(16, rng), correlated_hessian(16, np.random.default_rng(8))

    def plain(m):
        return np.clip(np.rint(m / scale), -8, 7) * scale

    def grid(mats, hessians, damp):
        return [np.stack([obs.on_grid(m, h, np.full((6, 1), scale), np.zeros((6, 1)), -8, 7, damp, zeros=m == 0)
                          for m, h in zip(mats, hessians)]), plain(mats)]

    layer = Layer(node=0, weight="w", in_axis=1, activation="x", kind="dense")
    new, how, _ = sparsify_layer(layer, w, None, ("full", H[None]), ("full", held[None]), N_M, grid=grid)
    got = new["w"]
    assert np.all((got != 0).reshape(6, 4, 4).sum(-1) <= 2)
    np.testing.assert_allclose(got / scale, np.rint(got / scale), atol=1e-9)
    ungridded, _, _ = sparsify_layer(layer, w, None, ("full", H[None]), ("full", held[None]), N_M)
    mats = w[None]
    error = held_error(mats, got[None], ("full", held[None]))
    assert error <= held_error(mats, magnitude(layer, w, None, N_M), ("full", held[None])) + 1e-12
    assert error <= held_error(mats, plain(ungridded["w"])[None], ("full", held[None])) + 1e-12


def drifted_inputs(d, rows, rng, drift=None):
    """(X, X_ref): the inputs a layer sees once the layers before it were sparsified, and the
    original model's, as (rows, d) arrays whose difference is small and correlated with them;
    `drift` (d, d): the map the sparsified layers before it apply (the same for every batch)."""
    x_ref = rng.normal(size=(rows, d))
    x_ref[:, : d // 2] += 0.8 * x_ref[:, d - d // 2:]
    drift = np.eye(d) + 0.2 * rng.normal(size=(d, d)) if drift is None else drift
    return x_ref @ drift + 0.1 * rng.normal(size=(rows, d)), x_ref


def test_reference_error_is_the_output_error_against_the_original_less_the_unchanged_layers():
    rng = np.random.default_rng(9)
    x, x_ref = drifted_inputs(10, 300, rng)
    w, w_new = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))
    H, cross = 2 * x.T @ x / 300, 2 * x.T @ x_ref / 300

    def brute(m):
        return np.sum((x_ref @ w.T - x @ m.T) ** 2) / 300

    assert obs.reference_error(w, H, cross)(w_new) == pytest.approx(brute(w_new) - brute(w), rel=1e-5)
    assert obs.reference_error(w, H, cross)(w) == 0.0


def test_reference_target_is_the_damped_least_squares_fit_to_the_original_outputs():
    """min ||W X_ref - W' X||^2 / N + lambda ||W' - W||^2 (lambda: the damping of H = 2 X X^T / N)
    by an augmented least-squares solve; where nothing upstream changed (X == X_ref) it is W; the
    held-out judge keeps W where no fit beats it."""
    from spa.sparse_obs import REFERENCE_UNJUDGED, reference_target

    rng = np.random.default_rng(10)
    x, x_ref = drifted_inputs(10, 300, rng)
    w = rng.normal(size=(4, 10))
    H, cross = 2 * x.T @ x / 300, 2 * x.T @ x_ref / 300
    damp = 0.01 * REFERENCE_UNJUDGED
    lam = damp * np.mean(np.diag(H))  # the damping adds lambda to H = 2 X X^T / N: the problem's 2x
    a = np.vstack([x * np.sqrt(2 / 300), np.sqrt(lam) * np.eye(10)])
    y = np.vstack([x_ref @ w.T * np.sqrt(2 / 300), np.sqrt(lam) * w.T])
    expected = np.linalg.lstsq(a, y, rcond=None)[0].T
    got = reference_target(w[None], H[None], cross[None], 0.01)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert obs.reference_error(w, H, cross)(got) < 0  # nearer the original outputs than W
    np.testing.assert_allclose(reference_target(w[None], H[None], H[None], 0.01)[0], w, atol=1e-10)
    kept = reference_target(w[None], H[None], cross[None], 0.01, error=lambda m: 1.0)
    np.testing.assert_array_equal(kept, w[None])


def test_sparsifying_towards_the_original_outputs_beats_the_layers_own_on_drifted_inputs():
    """With the inputs drifted, the layer sparsified towards `reference_target` reproduces the
    original model's outputs on held-out inputs better than the one sparsified towards its own
    weights, judged or not (the 2:4 pattern kept either way)."""
    from spa.layers import Layer
    from spa.sparse_obs import sparsify_layer

    rng = np.random.default_rng(11)
    w, drift = rng.normal(size=(6, 16)), np.eye(16) + 0.2 * rng.normal(size=(16, 16))
    (x, x_ref), (xh, xh_ref) = drifted_inputs(16, 600, rng, drift), drifted_inputs(16, 300, rng, drift)
    fit, held = ("full", (2 * x.T @ x / 600)[None]), ("full", (2 * xh.T @ xh / 300)[None])
    cross, held_cross = (2 * x.T @ x_ref / 600)[None], (2 * xh.T @ xh_ref / 300)[None]
    layer = Layer(node=0, weight="w", in_axis=1, activation="x", kind="dense")
    towards_original = sparsify_layer(layer, w, None, fit, held, N_M, cross=cross, held_cross=held_cross)[0]["w"]
    towards_own = sparsify_layer(layer, w, None, fit, held, N_M)[0]["w"]
    unjudged = sparsify_layer(layer, w, None, fit, None, N_M, cross=cross)[0]["w"]  # REFERENCE_UNJUDGED
    unjudged_own = sparsify_layer(layer, w, None, fit, None, N_M)[0]["w"]
    for got in (towards_original, towards_own, unjudged, unjudged_own):
        assert np.all((got != 0).reshape(6, 4, 4).sum(-1) <= 2)

    def error(m):
        return np.sum((xh_ref @ w.T - xh @ m.T) ** 2)

    assert error(towards_original) < error(towards_own)
    assert error(unjudged) < error(unjudged_own)
