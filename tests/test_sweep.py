"""spa sweep: every grid point pruned and measured, the same table serially and on Ray; a trial
whose worker dies or that keeps failing loses nothing else (spa.trials)."""
import json
import os
import sys
import types

import numpy as np
import onnx
import pytest

import spa
from spa import grid_sweep, group_sensitivity, trials
from spa.cli import main
from test_cli_honest import conv_chain
from test_sensitivity import _has_ray, _without_ray

GRID = ["--criteria", "l1,obspa", "--targets", "ratio=0.5,macs=0.6", "--calibration", "synthetic,none"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "m.onnx"
    onnx.save(conv_chain((8, 16)), path)  # built with tests/builder.py
    return str(path)


@pytest.fixture
def ray_cluster():
    """A local Ray that run_trials uses (it starts none when one is up)."""
    if not _has_ray():
        pytest.skip("ray not installed")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _spa(*argv):
    return main([str(a) for a in argv])


def _serially(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr("builtins.__import__", _without_ray(__import__))


def _measured(trial):
    return {k: v for k, v in trial.items() if k != "latency_ms"}


def test_grid_pairs_calibration_with_the_criteria_that_read_it():
    points = grid_sweep.grid("l1,obspa", "ratio=0.5,params=0.7", "synthetic,none", "1,8")
    assert len(points) == 2 * 2 + 2 * 2 * 2  # l1: targets x round-to; obspa: x calibration too
    assert {p.calibration for p in points if p.criterion == "l1"} == {None}
    drawn = grid_sweep.pick(points, 5, 3)
    assert len(drawn) == 5 and drawn == grid_sweep.pick(points, 5, 3) != grid_sweep.pick(points, 5, 4)
    assert all(p in points for p in drawn)


def test_serial_sweep_table_json_and_plot(model_path, tmp_path, monkeypatch, capsys):
    _serially(monkeypatch)
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    assert _spa("sweep", model_path, *GRID, "-o", out, "--plot", png, "-q") == 0
    captured = capsys.readouterr()
    assert "spa: Ray not installed (pip install 'spa[ray]'); running 6 trials serially" in captured.err
    result = json.loads(out.read_text())
    assert result["executor"] == "serial" and len(result["trials"]) == 6 and png.stat().st_size > 0
    ranked = sorted(result["trials"], key=lambda t: t["rank"])
    assert [t["value"] for t in ranked] == sorted(t["value"] for t in ranked)  # deviation: lower first
    best = ranked[0]
    assert best["pareto"] and best["criterion"] == "obspa" and best["calibration"] == "synthetic"
    smallest = min(ranked, key=lambda t: t["macs"])
    assert smallest["pareto"] and smallest["macs_kept"] <= 0.6 + 1e-9
    for t in ranked:
        assert t["params"] < result["original"]["params"] and t["bytes"] < result["original"]["bytes"]
        assert t["macs_kept"] == pytest.approx(t["macs"] / result["original"]["macs"])
    table = captured.out.splitlines()
    assert table[1].split()[:3] == ["rank", "pareto", "criterion"] and len(table) == 2 + 6
    assert table[2].split()[:2] == ["1", "*"]


def test_ray_gives_the_serial_table(ray_cluster, model_path, monkeypatch, capsys):
    assert _spa("sweep", model_path, *GRID, "--json", "-q") == 0
    on_ray = json.loads(capsys.readouterr().out)
    _serially(monkeypatch)
    assert _spa("sweep", model_path, *GRID, "--json", "-q") == 0
    serial = json.loads(capsys.readouterr().out)
    assert (on_ray["executor"], serial["executor"]) == ("ray", "serial")
    assert on_ray["trials"] == serial["trials"]
    assert on_ray["original"] == serial["original"]


def test_a_killed_worker_loses_no_trial(ray_cluster, model_path, tmp_path):
    points = grid_sweep.grid("l1,obspa", "ratio=0.5,macs=0.6", "synthetic")
    model = onnx.load(model_path)
    shared = {"model": model.SerializeToString(), "metric": group_sensitivity.Deviation(model),
              "granularity": ("channels", "heads"), "latency": False, "original": grid_sweep.figures(model, False),
              "shapes": None}
    marker, victim = str(tmp_path / "killed"), points[1]

    def dies_once(shared, point):
        if point == victim and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies mid-sweep
        return grid_sweep._trial(shared, point)

    results, executor = trials.run_trials(dies_once, shared, points)
    assert executor == "ray" and os.path.exists(marker)
    with trials.one_thread():
        expected = [grid_sweep._trial(dict(shared), p) for p in points]
    assert results == expected


def test_a_failing_trial_is_reported_and_the_others_finish(model_path, monkeypatch, capsys):
    _serially(monkeypatch)
    assert _spa("sweep", model_path, "--criteria", "l1,bn-scale", "--targets", "ratio=0.5", "--json") == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    good, bad = result["trials"]
    assert "value" in good and good["rank"] == 1
    assert bad["criterion"] == "bn-scale" and "BatchNormalization" in bad["error"] and "rank" not in bad
    assert "trial bn-scale ratio=0.5 round-to 1 failed 3 times" in captured.err


def test_retries_on_ray_with_a_stand_in(monkeypatch):
    """The Ray glue: a task whose result raises is submitted again; one that keeps failing becomes
    an error record after RETRIES more tries, and the others finish."""
    fake, calls = types.ModuleType("ray"), {"put": 0, "submitted": []}

    class Ref:
        def __init__(self, fn, args):
            self.fn, self.args = fn, args

    fake.is_initialized = lambda: True
    fake.put = lambda value: calls.__setitem__("put", calls["put"] + 1) or value
    fake.remote = lambda fn: types.SimpleNamespace(
        remote=lambda shared, item: calls["submitted"].append(item) or Ref(fn, (shared, item)))
    fake.wait = lambda refs, num_returns=1: (refs[:num_returns], refs[num_returns:])
    fake.get = lambda ref: ref.fn(*ref.args)
    monkeypatch.setitem(sys.modules, "ray", fake)
    flaky = {"b": 1}

    def trial(shared, item):
        if item == "c" or flaky.get(item, 0) > 0:
            flaky[item] = flaky.get(item, 0) - 1
            raise RuntimeError(f"{item} broke\nsecond line")
        return {"item": item, "shared": shared}

    notes = []
    results, executor = trials.run_trials(trial, 7, ["a", "b", "c"], note=notes.append)
    assert executor == "ray" and calls["put"] == 1
    assert results == [{"item": "a", "shared": 7}, {"item": "b", "shared": 7}, {"error": "c broke"}]
    assert sorted(calls["submitted"]) == ["a", "b", "b", "c", "c", "c"]
    assert notes == ["trial c failed 3 times; last: c broke"]


def test_python_api(model_path, monkeypatch):
    _serially(monkeypatch)
    def agreement(run_model):
        x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
        return float(np.mean(run_model(x)[0].argmax(-1) == spa.runtime.run(model_path, {"input": x})[0].argmax(-1)))

    with pytest.warns(spa.errors.SpaWarning, match="Ray not installed"):
        result = spa.sweep(model_path, criteria=["l1", "l2"], targets=["ratio=0.25", "params=0.5", "macs=0.5"],
                           round_to=(1, 2), random=4, seed=1, eval=agreement, latency=True)
    assert len(result["trials"]) == 4 and result["metric"]["better"] == "higher"
    assert all(t["latency_ms"] > 0 and t["value"] <= 1 for t in result["trials"])
    assert result["original"]["latency_ms"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--targets", "ratio=0.5", "--calibration", "synthetic"], "--calibration has no effect: criteria l1 read no"),
    (["--targets", "ratio=0.5", "--seed", "1"], "--seed has no effect without --random"),
    (["--targets", "ratio=0.5,macs=0.5", "--random", "2"], "--random 2: the grid has 2 points"),
    (["--targets", "ratio=0.5,ratio=0.5"], "ratio=0.5 given twice"),
    (["--targets", "latency=0.5"], "KIND one of ratio, params, macs"),
    (["--targets", "ratio=1.5"], "between 0 and 1"),
    (["--targets", "ratio=0.5", "--round-to", "auto"], "--round-to 'auto': expected positive integers"),
    (["--targets", "ratio=0.5", "--criteria", "l1,nope"], "unknown criterion nope"),
    (["--targets", "ratio=0.5", "--eval-output", "y"], "--eval-output has no effect without --eval"),
    (["--targets", "ratio=0.5", "--address", "nonsense"], "--address 'nonsense': expected HOST:PORT"),
])
def test_refusals(model_path, capsys, argv, message):
    assert _spa("sweep", model_path, "-q", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spa: error: ") and message in err[0], err


@pytest.mark.skipif(not _has_ray(), reason="ray not installed")
def test_an_address_where_no_cluster_listens_is_one_error_line(model_path, capsys):
    assert _spa("sweep", model_path, "-q", "--targets", "ratio=0.5", "--address", "127.0.0.1:1") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spa: error: ")]
    assert len(errors) == 1 and "cannot join the Ray cluster at 127.0.0.1:1" in errors[0]


def test_an_eval_file_that_does_not_match_the_model_is_refused(model_path, tmp_path, capsys):
    np.savez(tmp_path / "val.npz", x=np.zeros((4, 64), np.float32), labels=np.zeros(4, np.int64))
    assert _spa("sweep", model_path, "-q", "--targets", "ratio=0.5", "--eval", tmp_path / "val.npz") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input 'input' needs rank 4" in err[0], err


def test_trials_run_onnxruntime_on_one_thread(monkeypatch):
    from spa import runtime
    seen = []
    real = runtime.ort.InferenceSession

    def spy(source, options=None, **kw):
        seen.append(options.intra_op_num_threads)
        return real(source, options, **kw)

    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    with trials.one_thread():
        runtime.session(model)
    runtime.session(model)
    assert seen == [1, 0] and runtime.DEFAULT_THREADS is None
