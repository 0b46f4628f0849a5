"""Latency-aware pruning (spa.latency, Target(latency=F)): the latency model on synthetic timings
from an injected timer, the knapsack against brute force, the cache's keys, and the CLI's errors."""
import itertools
import json
import os

import numpy as np
import onnx
import pytest

from builder import Builder
from spa import analyze
from spa import latency
from spa.cli import main
from spa.cost import Dims, concrete_shapes, node_macs
from spa.pipeline import prune
from spa.plan import Plan
from spa.selection import Selector, Target, multiple_choice_knapsack


def slow_unless_multiple_of_8(model, feeds) -> float:
    """Synthetic timings: 1 ms per MFLOP of every layer, doubled where a layer's output channels
    are not a multiple of 8. Deterministic; used for single layers and whole models alike."""
    model = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
    batch = next(iter(feeds.values())).shape[0]
    shapes = concrete_shapes(model, batch=batch)
    total = 0.0
    for node in model.graph.node:
        macs = node_macs(node, Dims(shapes))
        if macs:
            channels = shapes[node.input[1]][0 if node.op_type == "Conv" else -1]
            total += macs * 1e-6 * (1 if channels % 8 == 0 else 2)
    return total


@pytest.fixture
def fake_timer(monkeypatch, tmp_path):
    calls = []

    def timer(self, model, feeds):
        calls.append(1)
        return slow_unless_multiple_of_8(model, feeds)

    monkeypatch.setattr(latency.OrtTimer, "__call__", timer)
    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path / "cache"))
    return calls


def conv_chain(widths=(32, 64, 64, 32), size=16):
    b = Builder()
    x = b.input([1, 3, size, size])
    c_in = 3
    for c in widths:
        x = b.op("Relu", [b.conv(x, c_in, c, k=3)])
        c_in = c
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x])
    b.output(b.gemm(x, c_in, 10))
    return b.model()


def test_prediction_is_the_measurement_for_the_original_and_follows_the_tables(fake_timer):
    model = conv_chain()
    analysis = analyze(model)
    whole = 2 * slow_unless_multiple_of_8(model, {"input": np.zeros((1, 3, 16, 16), np.float32)})
    lm = latency.LatencyModel(analysis, whole_ms=whole)
    assert lm.predict({}) == pytest.approx(whole)
    assert lm.scale == pytest.approx(1.0) and lm.other_ms == pytest.approx(whole / 2)
    # half of the second conv's filters: it and its consumer lose half their MACs
    member = analysis.members[lm.layers[1].out_pair]
    state = lm.state_of(Plan(analysis, member.atoms[:32]))
    assert state[lm.layers[1].out_pair] == 32 and state[lm.layers[2].in_pair] == 32
    expected = sum(slow_unless_multiple_of_8(*layer.build(*lm.widths(layer, state))) for layer in lm.layers)
    assert lm.raw(state) - lm.other(state) == pytest.approx(expected, rel=1e-6)
    assert lm.other(state) < lm.other_ms  # the activations between them shrink too


def test_fast_widths_are_the_ones_no_wider_width_beats():
    assert latency.fast({8: 1.0, 12: 2.0, 16: 1.5, 24: 2.5, 32: 3.0}) == [8, 16, 24, 32]
    assert latency.fast({16: 1.0, 32: 1.0}) == [32]  # within 3%: keep the wider


def test_knapsack_matches_brute_force_on_small_instances():
    rng = np.random.default_rng(0)
    for _ in range(40):
        items = int(rng.integers(1, 5))
        values = [list(rng.normal(size=int(rng.integers(1, 5)))) for _ in range(items)]
        costs = [list(rng.integers(0, 10, size=len(v))) for v in values]
        budget = int(rng.integers(0, 25))
        best = max((sum(values[i][j] for i, j in enumerate(pick)), pick)
                   for pick in itertools.product(*[range(len(v)) for v in values])
                   if sum(costs[i][j] for i, j in enumerate(pick)) <= budget)[0] \
            if any(sum(costs[i][j] for i, j in enumerate(p)) <= budget
                   for p in itertools.product(*[range(len(v)) for v in values])) else None
        picks = multiple_choice_knapsack(values, costs, budget)
        if best is None:
            assert picks is None
        else:
            assert sum(costs[i][j] for i, j in enumerate(picks)) <= budget
            assert sum(values[i][j] for i, j in enumerate(picks)) == pytest.approx(best)


def test_latency_target_is_met_on_the_prediction_and_snaps_to_fast_widths(fake_timer):
    model = conv_chain()
    analysis = analyze(model)
    from spa.importance import score
    scores = score(analysis, "l1", "mean", "mean", 0)
    selector = Selector(analysis, scores, Target(latency=0.5))
    plan = selector.select()
    lm = selector.latency_model()
    assert lm.predict(lm.state_of(plan)) <= 0.5 * lm.whole_ms
    kept = [g["size"] - g["removed"] for g in plan.to_json("m")["groups"]]
    assert kept and all(k % 8 == 0 for k in kept)  # widths that are not multiples of 8 are slow here


def test_round_to_auto_finds_the_fast_multiple(fake_timer):
    model = conv_chain(widths=(64, 128, 128, 64))
    lm = latency.LatencyModel(analyze(model), whole_ms=1.0)
    assert latency.auto_multiple(lm) == 8


def test_pipeline_times_the_plan_and_reports_predicted_and_measured(fake_timer):
    result = prune(conv_chain(), Target(latency=0.6))
    check = result.latency
    assert check["target"] == 0.6 and check["measured"] <= 0.6 + 0.05
    assert abs(check["measured"] - check["predicted"]) <= 0.1 * check["measured"]


def test_a_target_out_of_reach_after_the_refit_keeps_the_timed_plan(fake_timer, monkeypatch):
    monkeypatch.setattr(latency, "paired_latency", lambda *a, **k: (1.0, 0.9))  # far slower than predicted
    result = prune(conv_chain(), Target(latency=0.5))
    assert result.latency["measured"] == pytest.approx(0.9)  # reported, and the CLI warns: not met


def test_latency_target_with_obspa(fake_timer):
    result = prune(conv_chain(), Target(latency=0.6), criterion="obspa", calibration="synthetic",
                   calibration_samples=16)
    assert result.latency["measured"] <= 0.65


def test_cache_is_reused_and_keyed_by_machine_and_threads(fake_timer, tmp_path):
    layer = latency.timed_layers(analyze(conv_chain()), concrete_shapes(conv_chain()))[1]
    one = latency.Tables(threads=1)
    one.measure([(layer, 32, 48)])
    assert one.measured == 1
    again = latency.Tables(threads=1)
    again.measure([(layer, 32, 48)])
    assert again.measured == 0  # read from the cache
    assert latency.Tables(threads=2).path != one.path
    assert latency.Tables(threads=2).missing([(layer, 32, 48)])
    with open(one.path) as f:
        data = json.load(f)
    data["machine"]["cpu"] = "another CPU"
    with open(one.path, "w") as f:
        json.dump(data, f)
    assert latency.Tables(threads=1).missing([(layer, 32, 48)])  # a table from another machine is not used


@pytest.mark.parametrize("args, message", [
    (["--target-latency", "1.5"], "target-latency must be between 0 and 1"),
    (["--target-latency", "0"], "target-latency must be between 0 and 1"),
    (["--target-latency", "0.5", "--threads", "0"], "--threads must be a positive integer"),
    (["--target-latency", "0.5", "--batch", "0"], "--batch must be a positive integer"),
])
def test_cli_refuses_bad_latency_options(tmp_path, capsys, args, message):
    path = str(tmp_path / "m.onnx")
    onnx.save(conv_chain(), path)
    out = str(tmp_path / "o.onnx")
    assert main(["prune", path, "-o", out, "-q"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not os.path.exists(out)


def test_cli_latency_target_on_a_model_without_prunable_layers(tmp_path, capsys):
    b = Builder()
    x = b.input([1, 8])
    b.output(b.op("Relu", [x]))
    path = str(tmp_path / "m.onnx")
    onnx.save(b.model(), path)
    assert main(["prune", path, "-o", str(tmp_path / "o.onnx"), "-q", "--target-latency", "0.5"]) == 2
    assert "nothing prunable" in capsys.readouterr().err


def test_cli_prints_latency_and_warns_about_slowdowns(capsys):
    from spa.cli import _latency_lines
    check = {"original_ms": 2.0, "pruned_ms": 2.2, "measured": 1.1, "predicted": 0.5, "target": 0.5, "batch": 1,
             "threads": 1}
    _latency_lines(check)
    captured = capsys.readouterr()
    assert "latency 2 -> 2.2 ms measured" in captured.out
    assert "warning: the pruned model measured slower than the original" in captured.err
    _latency_lines(dict(check, pruned_ms=1.4, measured=0.7))
    err = capsys.readouterr().err
    assert "40% slower than predicted" in err and "target-latency 0.5 not met" in err
    _latency_lines(dict(check, pruned_ms=1.2, measured=0.6, predicted=0.58))
    err = capsys.readouterr().err
    assert "target-latency 0.5 not met: the pruned model measured 0.600" in err and "than predicted" not in err


def test_report_warns_when_the_pruned_model_is_slower(tmp_path, capsys, monkeypatch):
    import spa.report
    path = str(tmp_path / "m.onnx")
    onnx.save(conv_chain(), path)
    times = iter([1.0, 2.0])
    monkeypatch.setattr(spa.report, "latency_ms", lambda *a, **k: next(times))
    assert main(["prune", path, "-o", str(tmp_path / "o.onnx"), "-q", "--ratio", "0.25", "--report"]) == 0
    assert "warning: the pruned model measured slower than the original" in capsys.readouterr().err


def test_cli_profile_lists_layers_and_fast_widths(fake_timer, tmp_path, capsys):
    path = str(tmp_path / "m.onnx")
    onnx.save(conv_chain(), path)
    assert main(["profile", path, "-q", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["layers"]) == 5 and result["timed"] > 0
    heaviest = result["layers"][0]
    assert heaviest["ms"] >= result["layers"][-1]["ms"]
    assert all(int(w) % 8 == 0 for w in heaviest["fast"])
    assert main(["profile", path, "-q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["timed"] == 0  # the second run reads the cache


def test_latency_target_prunes_heads_and_mlp_of_a_transformer(fake_timer):
    pytest.importorskip("transformers")
    tz = pytest.importorskip("models.transformers")
    model = onnx.load(tz.cached_export_transformer("bert", "torchscript"))
    result = prune(model, Target(latency=0.4))  # more than removing heads alone can give
    kinds = {result.analysis.groups[g["id"]].kind for g in result.plan.to_json("m")["groups"]}
    assert kinds == {"channels", "heads"}
    assert result.latency["measured"] <= 0.45
