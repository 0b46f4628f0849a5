"""spa sensitivity: each group pruned alone at a few ratios, ranked by the damage; --ratios-from
turns the result into per-group ratios that keep uniform R's parameter budget."""
import json
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import spa
from spa.cli import main
from spa.cost import count_params
from test_cli import small_model
from test_cli_honest import conv_chain


def _sensitive_second():
    """conv(3->8) -> conv(8->8) -> gemm, the first conv's weights and bias scaled by 0.01: its
    channels barely reach the output, the second conv's carry it."""
    model = conv_chain((8, 8))
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    for init in model.graph.initializer:
        if init.name in first.input[1:]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.01, init.name))
    return model


def _weight(model, index):
    return [n for n in model.graph.node if n.op_type == "Conv"][index].input[1]


@pytest.fixture
def sensitive(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_sensitive_second(), path)
    return str(path)


def _spa(*argv):
    return main([str(a) for a in argv])


def test_table_ranks_the_sensitive_group_first(sensitive, tmp_path, capsys):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    assert _spa("sensitivity", sensitive, "-o", out, "--plot", png, "-q") == 0
    captured = capsys.readouterr()
    assert "running 4 trials serially" in captured.err or _has_ray()  # r=0.1 of 8 removes none: not run
    table = captured.out.splitlines()
    assert table[1].split()[:2] == ["rank", "group"] and table[2].split()[0] == "1"
    result = json.loads(out.read_text())
    model = onnx.load(sensitive)
    first, second = result["groups"]
    assert first["key"] == f"{_weight(model, 1)}:0" and second["key"] == f"{_weight(model, 0)}:0"
    assert first["rank"] == 1 and first["sensitivity"] > 10 * second["sensitivity"]
    assert [t["ratio"] for t in first["trials"]] == [0.1, 0.3, 0.5] == result["ratios"]
    assert all(t["removed_channels"] == int(t["ratio"] * 8) for t in first["trials"])
    assert result["metric"]["metric"] == "relative output deviation" and result["metric"]["better"] == "lower"
    assert png.stat().st_size > 0


def test_ratios_from_spares_the_sensitive_group_and_meets_the_budget(sensitive, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert _spa("sensitivity", sensitive, "-o", out, "-q", "--ratios", "0.25,0.5,0.75") == 0
    result = json.loads(out.read_text())
    for ratio in (0.3, 0.5):
        uniform, chosen = tmp_path / "u.onnx", tmp_path / "c.onnx"
        assert _spa("prune", sensitive, "--ratio", ratio, "-o", uniform, "-q") == 0
        assert _spa("prune", sensitive, "--ratio", ratio, "--ratios-from", out, "-o", chosen, "-q",
                    "--plan-out", tmp_path / "plan.json") == 0
        plan = json.loads((tmp_path / "plan.json").read_text())
        removed = {g["id"]: g["removed"] for g in plan["groups"]}
        sensitive_id, other_id = result["groups"][0]["id"], result["groups"][1]["id"]
        assert removed.get(sensitive_id, 0) < int(ratio * 8) < removed.get(other_id, 0), removed
        kept_uniform, kept = count_params(onnx.load(uniform)), count_params(onnx.load(chosen))
        per_channel = sum(max(t["params_removed"] / t["removed_channels"] for t in g["trials"] if t["removed_channels"])
                          for g in result["groups"])
        assert kept <= kept_uniform and kept_uniform - kept <= per_channel, (kept, kept_uniform, per_channel)


def test_a_sensitivity_file_of_another_model_is_refused(sensitive, tmp_path, capsys):
    other, out = tmp_path / "other.onnx", tmp_path / "s.json"
    onnx.save(small_model(), other)
    assert _spa("sensitivity", other, "-o", out, "-q", "--ratios", "0.5") == 0
    capsys.readouterr()
    assert _spa("prune", sensitive, "--ratio", "0.5", "--ratios-from", out, "-o", tmp_path / "p.onnx", "-q") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match this model" in err[0]
    assert not (tmp_path / "p.onnx").exists()
    # the same model with a group's channel count changed
    assert _spa("sensitivity", sensitive, "-o", out, "-q", "--ratios", "0.5") == 0
    data = json.loads(out.read_text())
    data["groups"][0]["channels"] += 1
    out.write_text(json.dumps(data))
    capsys.readouterr()
    assert _spa("prune", sensitive, "--ratio", "0.5", "--ratios-from", out, "-o", tmp_path / "p.onnx", "-q") == 2
    assert "channels there" in capsys.readouterr().err
    out.write_text("{}")
    assert _spa("prune", sensitive, "--ratio", "0.5", "--ratios-from", out, "-o", tmp_path / "p.onnx", "-q") == 2
    assert "not a spa sensitivity result" in capsys.readouterr().err


def test_refusals(sensitive, tmp_path, capsys):
    for argv, message in [
            (["sensitivity", sensitive, "--ratios", "0.5,1.2"], "ratios must be fractions in (0, 1)"),
            (["sensitivity", sensitive, "--ratios", "a"], "--ratios 'a'"),
            (["sensitivity", sensitive, "--eval-output", "y"], "--eval-output has no effect without --eval"),
            (["prune", sensitive, "--target-params", "0.5", "--ratios-from", "x.json", "-o", tmp_path / "p.onnx"],
             "--ratios-from needs --ratio R"),
            (["prune", sensitive, "--ratio", "0.5", "--ratio-for", "x=0.1", "--ratios-from", "x.json", "-o",
              tmp_path / "p.onnx"], "--ratio-for would override it"),
            (["prune", sensitive, "--ratio", "0.5", "--ratios-from", tmp_path / "none.json", "-o",
              tmp_path / "p.onnx"], "No such file")]:
        capsys.readouterr()
        assert _spa(*argv, "-q") == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("spa: error: ") and message in err[0], (argv, err)


def test_eval_file_and_python_api(sensitive, tmp_path, capsys):
    from spa.runtime import run

    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x, labels=run(sensitive, {"input": x})[0].argmax(-1))
    assert _spa("sensitivity", sensitive, "--eval", tmp_path / "val.npz", "--json", "-q", "--ratios", "0.5") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"]["metric"] == "accuracy" and result["metric"]["before"] == 1.0
    assert all(t["loss"] == pytest.approx(1.0 - t["value"]) for g in result["groups"] for t in g["trials"])

    def agreement(run_model):
        return float(np.mean(run_model(x)[0].argmax(-1) == run(sensitive, {"input": x})[0].argmax(-1)))

    with pytest.warns(spa.errors.SpaWarning, match="Ray not installed") if "ray" not in sys.modules and \
            not _has_ray() else _nothing():
        result = spa.sensitivity(sensitive, ratios=(0.25, 0.5), eval=agreement)
    assert result["metric"]["metric"] == "agreement" and len(result["groups"]) == 2
    pruned = spa.prune(sensitive, ratio=0.5, ratios_from=result)
    uniform = spa.prune(sensitive, ratio=0.5)
    assert pruned.stats["params"]["after"] <= uniform.stats["params"]["after"]
    with pytest.raises(spa.SpaError, match="greater_is_better applies to an eval function only"):
        spa.sensitivity(sensitive, greater_is_better=False)


def _has_ray():
    try:
        import ray  # noqa: F401
        return True
    except ImportError:
        return False


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_trials_run_as_ray_tasks_when_ray_is_importable(sensitive, monkeypatch, capsys):
    """The Ray glue with a stand-in module: init once over every core, the model put once, every
    trial a task, shut down after; the same result as the serial loop."""
    calls = {"init": [], "put": 0, "tasks": 0, "shutdown": 0}
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: bool(calls["init"]) and not calls["shutdown"]
    fake.init = lambda **kw: calls["init"].append(kw)
    fake.shutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)

    class Ref:
        def __init__(self, value):
            self.value = value

    def put(value):
        calls["put"] += 1
        return Ref(value)

    def remote(fn):
        def run(ref, item):
            calls["tasks"] += 1
            return Ref(fn(ref.value, item))
        return types.SimpleNamespace(remote=run)

    fake.put, fake.remote = put, remote
    fake.wait = lambda refs, num_returns=1: (refs[:num_returns], refs[num_returns:])
    fake.get = lambda ref: ref.value
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr("spa.trials._reachable", lambda address: None)  # no cluster listens at 10.0.0.1
    assert _spa("sensitivity", sensitive, "--json", "-q") == 0
    on_ray = json.loads(capsys.readouterr().out)
    assert on_ray["executor"] == "ray" and calls["put"] == 1 and calls["tasks"] == 4 and calls["shutdown"] == 1
    assert calls["init"] == [{"num_cpus": __import__("os").cpu_count(), "include_dashboard": False,
                              "log_to_driver": False}]
    assert _spa("sensitivity", sensitive, "--json", "-q", "--address", "10.0.0.1:6379") == 0
    assert calls["init"][-1] == {"address": "10.0.0.1:6379", "log_to_driver": False}
    monkeypatch.delitem(sys.modules, "ray")
    monkeypatch.setattr("builtins.__import__", _without_ray(__import__))
    capsys.readouterr()
    assert _spa("sensitivity", sensitive, "--json", "-q") == 0
    captured = capsys.readouterr()
    serial = json.loads(captured.out)
    assert "spa: Ray not installed (pip install 'spa[ray]'); running 4 trials serially" in captured.err
    assert serial["executor"] == "serial" and serial["groups"] == on_ray["groups"]
    assert _spa("sensitivity", sensitive, "-q", "--address", "10.0.0.1:6379") == 2
    assert "--address needs Ray" in capsys.readouterr().err


def _without_ray(real):
    def importer(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)
    return importer


@pytest.mark.skipif(not _has_ray(), reason="ray not installed")
def test_real_ray_gives_the_serial_result(sensitive):
    import ray

    with_ray = spa.sensitivity(sensitive, ratios=(0.5,))
    assert with_ray["executor"] == "ray" and not ray.is_initialized()
    assert with_ray["groups"][0]["key"] == f"{_weight(onnx.load(sensitive), 1)}:0"
