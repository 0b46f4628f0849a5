"""CLI behaviour: happy paths, plans, external data, and one clear line + exit 2 for bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from builder import Builder
from spa.cli import main
from spa.runtime import random_inputs, run


def small_model():
    b = Builder()
    x = b.op("Relu", [b.bn(b.conv(b.input(["batch", 3, 8, 8]), 3, 8), 8)])
    y = b.op("Relu", [b.conv(x, 8, 8)])
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [y])]), 8, 4))
    model = b.model()
    model.doc_string = "keep me"
    onnx.helper.set_model_props(model, {"author": "spa-test"})
    return model


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(small_model(), path)
    return str(path)


def spa(*args):
    return main([str(a) for a in args])


def test_prune_writes_smaller_valid_model_and_keeps_metadata(model_path, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert spa("prune", model_path, "-o", out, "--ratio", "0.5", "-q") == 0
    pruned, original = onnx.load(out), onnx.load(model_path)
    assert os.path.getsize(out) < os.path.getsize(model_path)
    assert pruned.doc_string == "keep me"
    assert {p.key: p.value for p in pruned.metadata_props} == {"author": "spa-test"}
    assert [n.name for n in pruned.graph.node] == [n.name for n in original.graph.node]
    assert list(pruned.opset_import) == list(original.opset_import)
    feeds = random_inputs(original, batch=3)
    assert run(str(out), feeds)[0].shape == (3, 4)


def test_report_json_has_before_after_ratio(model_path, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert spa("prune", model_path, "-o", out, "--ratio", "0.5", "--json", "-q", "--repeats", "3", "--batch", "2") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["after"]["params"] < report["before"]["params"]
    assert report["ratio"]["macs"] > 1.5
    assert set(report["before"]["macs_by_op"]) == {"Conv", "Gemm"}
    assert report["batch"] == 2 and report["after"]["latency_ms"] > 0


def test_analyze_json_lists_groups_and_reasons(model_path, capsys):
    assert spa("analyze", model_path, "--json", "-q") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prunable_groups"] == 2
    frozen = [g for g in summary["groups"] if not g["prunable"]]
    assert frozen and "graph output" in frozen[0]["frozen_by"][0]


def test_analyze_names_weights_in_no_group(tmp_path, capsys):
    """An embedding table whose channels reach no channel rule is listed with its reader."""
    b = Builder()
    ids = b.input(["batch", 5], "ids", dtype=onnx.TensorProto.INT64)
    b.output(b.op("Softmax", [b.op("Gather", [b.weight(11, 8), ids])], axis=-1))
    path = tmp_path / "embedding.onnx"
    onnx.save(b.model(), path)
    assert spa("analyze", path, "--json", "-q") == 0
    loose = json.loads(capsys.readouterr().out)["ungrouped_weights"]
    assert [(w["shape"], w["read_by"][0].split()[0]) for w in loose] == [([11, 8], "Gather")]
    assert spa("analyze", path, "-q") == 0
    assert "1 weight tensors in no channel group (kept whole)" in capsys.readouterr().out


def test_plan_out_and_apply_plan_replay(model_path, tmp_path):
    out, plan, again = tmp_path / "a.onnx", tmp_path / "plan.json", tmp_path / "b.onnx"
    assert spa("prune", model_path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "--plan-out", plan, "-q") == 0
    data = json.loads(plan.read_text())
    entry = data["weights"][0]
    assert {"name", "axis", "kept", "removed", "group"} <= set(entry)
    assert data["granularity"] == ["channels", "heads"]  # apply-plan replays with it
    assert sorted(entry["kept"] + entry["removed"]) == list(range(len(entry["kept"]) + len(entry["removed"])))
    assert spa("apply-plan", model_path, plan, "-o", again, "-q") == 0
    feeds = random_inputs(onnx.load(model_path), batch=2)
    np.testing.assert_array_equal(run(str(out), feeds)[0], run(str(again), feeds)[0])


def test_apply_plan_counts_macs_where_prune_does(tmp_path, capsys):
    """An image model of symbolic height and width: prune without calibration counts its MACs at the
    224 x 224 images generated calibration takes, and replaying its plan counts them there too (it
    counted them at 32 x 32, the default of a symbolic size)."""
    b = Builder()
    x = b.op("Relu", [b.conv(b.input(["batch", 3, "height", "width"]), 3, 8)])
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [b.conv(x, 8, 8)])]), 8, 4))
    model, plan = tmp_path / "images.onnx", tmp_path / "plan.json"
    onnx.save(b.model(), model)
    assert spa("prune", model, "-o", tmp_path / "a.onnx", "--ratio", "0.5", "--criterion", "l1", "--plan-out", plan,
               "--json", "-q") == 0
    pruned = json.loads(capsys.readouterr().out)
    assert spa("apply-plan", model, plan, "-o", tmp_path / "b.onnx", "--json", "-q") == 0
    replayed = json.loads(capsys.readouterr().out)
    assert pruned["before"]["macs"] == replayed["before"]["macs"] > 3 * 8 * 9 * 224 * 224 / 2
    assert pruned["after"]["macs"] == replayed["after"]["macs"]


def test_external_data_in_and_out(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(small_model(), src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    assert spa("prune", src, "-o", out, "--ratio", "0.5", "-q") == 0
    assert (out.parent / "small.onnx.data").exists()
    loaded = onnx.load(out, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)


def test_console_script_and_module_entry_points(model_path, tmp_path):
    for cmd in (["spa"], [sys.executable, "-m", "spa"]):
        done = subprocess.run(cmd + ["analyze", model_path, "-q"], capture_output=True, text=True)
        assert done.returncode == 0 and "channel groups" in done.stdout


def _expect_error(capsys, args, message, out=None):
    assert spa(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spa: error:") and message in err[0], err
    assert "Traceback" not in "".join(err)
    if out is not None:
        assert not os.path.exists(out)
        assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".spa-")]


def test_not_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model")
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", bad, "-o", out, "--ratio", "0.5", "-q"], "not", out=str(out))


def test_truncated_file(model_path, tmp_path, capsys):
    data = open(model_path, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", cut, "-o", out, "--ratio", "0.5", "-q"], "cut.onnx", out=str(out))


def test_missing_external_data(tmp_path, capsys):
    src = tmp_path / "ext.onnx"
    onnx.save(small_model(), src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    os.remove(tmp_path / "weights.bin")
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", src, "-o", out, "--ratio", "0.5", "-q"], "external data file 'weights.bin'", out=str(out))


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_open_interval(model_path, tmp_path, capsys, ratio):
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", model_path, "-o", out, "--ratio", ratio, "-q"], "between 0 and 1", out=str(out))


def test_ignore_that_matches_nothing(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", model_path, "-o", out, "--ratio", "0.5", "--ignore", "nope*", "-q"],
                  "matches no node", out=str(out))


def test_ignore_keeps_those_channels(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    first_conv = [n for n in onnx.load(model_path).graph.node if n.op_type == "Conv"][0]
    assert spa("prune", model_path, "-o", out, "--ratio", "0.5", "--ignore", first_conv.name, "-q") == 0
    kept = {t.name: list(t.dims) for t in onnx.load(out).graph.initializer}
    assert kept[first_conv.input[1]][0] == 8


def test_nothing_prunable(tmp_path, capsys):
    b = Builder()
    b.output(b.gemm(b.input(["batch", 6]), 6, 3))
    path = tmp_path / "m.onnx"
    onnx.save(b.model(), path)
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", path, "-o", out, "--ratio", "0.5", "-q"], "nothing prunable", out=str(out))


def test_refuses_to_overwrite_input(model_path, capsys):
    before = open(model_path, "rb").read()
    _expect_error(capsys, ["prune", model_path, "-o", model_path, "--ratio", "0.5", "-q"], "overwrite")
    assert open(model_path, "rb").read() == before


def test_missing_file_and_bad_plan(model_path, tmp_path, capsys):
    _expect_error(capsys, ["analyze", tmp_path / "none.onnx", "-q"], "no such file")
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["apply-plan", model_path, plan, "-o", out, "-q"], "not a SPA plan", out=str(out))
    plan.write_text('{"granularity": "heads", "weights": []}')
    _expect_error(capsys, ["apply-plan", model_path, plan, "-o", out, "-q"], "granularity must be a list", out=str(out))


@pytest.mark.parametrize("flags, message", [
    (["--criterion", "l1", "--damp", "0.1"], "--damp has no effect with criterion l1"),
    (["--criterion", "l1", "--calibration", "synthetic"], "--calibration has no effect with criterion l1"),
    (["--criterion", "l1", "--calibration-samples", "8"], "--calibration-samples has no effect with criterion l1"),
    (["--criterion", "l1", "--allocation", "measured"], "--allocation measured compares OBS-compensated plans"),
    (["--criterion", "obspa", "--labels", "y.npy"], "--labels has no effect with criterion obspa"),
    (["--recover", "-3"], "--recover needs a number of steps >= 0"),
    (["--recover", "1 week"], "--recover needs a number of steps >= 0 or a time such as 90s, 20m or 1.5h"),
])
def test_options_that_would_do_nothing_are_refused(model_path, tmp_path, capsys, flags, message):
    out = tmp_path / "never.onnx"
    assert spa("prune", model_path, "-o", out, "--ratio", "0.5", *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not out.exists()


def test_compensation_with_a_magnitude_criterion(model_path, tmp_path):
    out = tmp_path / "compensated.onnx"
    assert spa("prune", model_path, "-o", out, "--ratio", "0.5", "--compensation", "obs", "--damp", "0.05",
               "--calibration-samples", "32", "-q") == 0
    onnx.checker.check_model(str(out), full_check=True)
