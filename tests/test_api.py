"""The Python one-liners: spa.prune / spa.analyze, keyword names of the CLI flags, per-layer ratios."""
import numpy as np
import onnx
import pytest

import spa
from spa.cli import main
from spa.runtime import random_inputs, run
from test_cli import small_model


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(small_model(), path)
    return str(path)


def widths(model):
    return {t.name: t.dims[0] for t in model.graph.initializer if t.name in ("w1", "w13")}


def test_prune_one_liner_from_a_path_returns_model_plan_and_stats(model_path, tmp_path):
    small = spa.prune(model_path, ratio=0.5)
    assert widths(small.model) == {"w1": 4, "w13": 4}
    assert small.stats["params"]["after"] < small.stats["params"]["before"]
    assert small.stats["macs"]["after"] < small.stats["macs"]["before"]
    out = small.save(str(tmp_path / "small.onnx"))
    feeds = random_inputs(small_model(), batch=2)
    assert run(out, feeds)[0].shape == (2, 4)


def test_prune_takes_a_model_proto_and_cli_keywords(tmp_path):
    small = spa.prune(small_model(), target_params=0.6, round_to=2, criterion="l2")
    assert sum(np.prod(t.dims) for t in small.model.graph.initializer) <= \
        0.6 * sum(np.prod(t.dims) for t in small_model().graph.initializer)
    assert all(w % 2 == 0 for w in widths(small.model).values())


def test_prune_matches_the_cli(model_path, tmp_path):
    out = tmp_path / "cli.onnx"
    assert main(["prune", model_path, "-o", str(out), "--ratio", "0.25", "--criterion", "fpgm", "-q"]) == 0
    api = spa.prune(model_path, ratio=0.25, criterion="fpgm")
    assert widths(api.model) == widths(onnx.load(out))
    for a, b in zip(api.model.graph.initializer, onnx.load(out).graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0.5, "no_such_flag": 1}, "unknown option 'no_such_flag'"),
    ({"ratio": 1.5}, "ratio must be between 0 and 1"),
    ({"ratio": 0.5, "criterion": "l1", "damp": 0.1}, "--damp has no effect"),
    ({"ratios": {"nothing*": 0.5}}, "--ratio-for 'nothing*' matches no node or initializer"),
    ({"ratios": {"Conv_4": 0.5}, "target_params": 0.5}, "per-layer ratios"),
    ({}, "give exactly one target"),
])
def test_prune_refuses_what_the_cli_refuses(model_path, kwargs, message):
    with pytest.raises(spa.SpaError, match=message.replace("(", r"\(").replace("*", r"\*")):
        spa.prune(model_path, **kwargs)


def test_per_layer_ratios_override_the_ratio_by_node_or_weight_name():
    only_first = spa.prune(small_model(), ratios={"Conv_4": 0.5})
    assert widths(only_first.model) == {"w1": 4, "w13": 8}
    by_weight = spa.prune(small_model(), ratio=0.25, ratios={"w13": 0.5})
    assert widths(by_weight.model) == {"w1": 6, "w13": 4}
    first_wins = spa.prune(small_model(), ratio=0.25, ratios={"Conv_16": 0, "Conv_*": 0.5})
    assert widths(first_wins.model) == {"w1": 4, "w13": 8}


def test_cli_ratio_for(model_path, tmp_path):
    out = tmp_path / "small.onnx"
    assert main(["prune", model_path, "-o", str(out), "--ratio-for", "Conv_16=0.5", "-q"]) == 0
    assert widths(onnx.load(out)) == {"w1": 8, "w13": 4}
    assert main(["prune", model_path, "-o", str(out), "--ratio-for", "Conv_16", "-q"]) == 2


def test_obspa_with_per_layer_ratios_is_uniform_and_announced(model_path):
    small = spa.prune(model_path, ratios={"Conv_4": 0.5}, criterion="obspa", calibration="synthetic",
                      calibration_samples=8)
    assert widths(small.model)["w1"] == 4
    with pytest.raises(spa.SpaError, match="allocation 'global' would override"):
        spa.prune(model_path, ratios={"Conv_4": 0.5}, criterion="obspa", allocation="global")


def test_analyze_takes_a_path(model_path):
    analysis = spa.analyze(model_path)
    assert sum(g.prunable for g in analysis.groups) == 2
    assert spa.analyze(model_path, granularity="channels").options.granularity == ("channels",)


def test_save_refuses_the_input_file(model_path):
    small = spa.prune(model_path, ratio=0.5)
    with pytest.raises(spa.SpaError, match="overwrite the input"):
        small.save(model_path)
    assert widths(onnx.load(model_path)) == {"w1": 8, "w13": 8}
