"""Layers inside If branches: flattened for the analysis (spa.control_flow.flattened), read through the selector
rule (spa.rules.control), folded back after the rewrite; the oracle holds for either branch taken."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.control_flow import flattened, folded
from spa.errors import SpaError
from spa.groups import analyze
from spa.layers import find_layers
from spa.pipeline import prune, save
from spa.runtime import random_inputs, run
from spa.selection import Target
from spa.verify import masked_original


def _weight(rng, name, *shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def if_model(nested: bool = False) -> onnx.ModelProto:
    """x -> If(c): then MatMul W1, Add b1, Relu, MatMul W2; else MatMul W1, Sigmoid, MatMul W2 and a branch-local
    MLP (W3, W4) -> Relu. W1 and W2 at the top, read by both branches; `nested`: the else branch's MLP inside an If
    of its own (on the same condition)."""
    rng = np.random.default_rng(0)
    tops = [_weight(rng, "W1", 16, 32), _weight(rng, "b1", 32), _weight(rng, "W2", 32, 8)]
    own = [_weight(rng, "W3", 8, 24), _weight(rng, "W4", 24, 8)]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
                              helper.make_node("Add", ["h", "b1"], ["hb"]), helper.make_node("Relu", ["hb"], ["a"]),
                              helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")], "then", [], [out])
    mlp = [helper.make_node("MatMul", ["z", "W3"], ["u"]), helper.make_node("Tanh", ["u"], ["v"]),
           helper.make_node("MatMul", ["v", "W4"], ["y"])]
    if nested:
        mlp[-1].output[0] = "inner_y"
        inner_out = helper.make_tensor_value_info("inner_y", TensorProto.FLOAT, ["N", 8])
        inner = helper.make_graph(mlp, "inner_then", [], [inner_out], own)
        plain = helper.make_graph([helper.make_node("Neg", ["z"], ["inner_y"])], "inner_else", [], [inner_out])
        mlp = [helper.make_node("If", ["c"], ["y"], name="inner", then_branch=inner, else_branch=plain)]
        own = []
    other = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
                               helper.make_node("Sigmoid", ["h"], ["a"]),
                               helper.make_node("MatMul", ["a", "W2"], ["z"], name="down"), *mlp],
                              "else", [], [out], own)
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["out"], name="branchy", then_branch=then, else_branch=other),
         helper.make_node("Relu", ["out"], ["final"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("final", TensorProto.FLOAT, ["N", 8])], tops)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _oracle_holds(model, result, tmp_path):
    path = os.path.join(tmp_path, "pruned.onnx")
    save(result.model, path)
    for taken in (True, False):
        feeds = {**random_inputs(model, batch=3, seed=1), "c": np.array(taken)}
        np.testing.assert_allclose(run(path, feeds)[0], run(masked_original(result.plan), feeds)[0],
                                   rtol=1e-4, atol=1e-4)


def _structure(graph):
    """Node ops and outputs, initializer names, branch structure, recursively."""
    return ([(n.op_type, list(n.input), list(n.output), sorted((a.name, _structure(a.g)) for a in n.attribute
                                                                if a.type == onnx.AttributeProto.GRAPH))
             for n in graph.node], sorted(t.name for t in graph.initializer), [o.name for o in graph.output])


def test_flatten_then_fold_gives_the_model_back():
    for nested in (False, True):
        model = if_model(nested)
        flat, found = flattened(model)
        assert [n.op_type for n in flat.graph.node].count("If") == 1 + nested and len(found) == 1 + nested
        assert flattened(flat)[1] == found  # a flattened copy says so
        assert _structure(folded(flat, found).graph) == _structure(model.graph)
        assert not folded(flat, found).metadata_props


def test_channels_inside_both_branches_prune_and_match_the_oracle(tmp_path):
    for nested in (False, True):
        model = if_model(nested)
        analysis = analyze(model)
        shared = [g for g in analysis.groups if {m.tensor for m in g.members} >= {"W1", "b1", "W2"}]
        assert len(shared) == 1 and shared[0].prunable  # W1's channels: both branches, one group
        assert any(g.prunable and any(m.tensor.endswith("W3") for m in g.members) for g in analysis.groups)
        result = prune(model, Target(ratio=0.5), criterion="l1")
        _oracle_holds(model, result, tmp_path)
        pruned = result.model
        assert [n.op_type for n in pruned.graph.node] == ["If", "Relu"]
        assert {t.name for t in pruned.graph.initializer} == {"W1", "b1", "W2"}
        assert numpy_helper.to_array(pruned.graph.initializer[0]).shape[1] < 32


def test_an_if_holding_only_recurrent_layers_is_flattened(tmp_path):
    """An If whose branches hold an LSTM and no Conv / Gemm / MatMul (one reading x, one -x, the LSTM's weights
    at the top) was a boundary; its hidden channels now prune with the MatMul that reads the final state."""
    rng = np.random.default_rng(0)
    hidden = 16
    weights = [_weight(rng, "W", 1, 4 * hidden, 8), _weight(rng, "R", 1, 4 * hidden, hidden),
               _weight(rng, "B", 1, 8 * hidden), _weight(rng, "W2", hidden, 4)]
    state = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "N", hidden])
    then = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "h"], hidden_size=hidden)],
                             "then", [], [state])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["nx"]),
                               helper.make_node("LSTM", ["nx", "W", "R", "B"], ["", "h"], hidden_size=hidden)],
                              "else", [], [state])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["state"], name="recurrent", then_branch=then, else_branch=other),
         helper.make_node("Squeeze", ["state", "zero"], ["s"]), helper.make_node("MatMul", ["s", "W2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", 8]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        weights + [numpy_helper.from_array(np.array([0], np.int64), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    result = prune(model, Target(ratio=0.5), criterion="l1")
    _oracle_holds(model, result, tmp_path)
    assert numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "W2")).shape == (8, 4)


def test_a_weight_both_branches_read_is_compensated_from_both_inputs(tmp_path):
    model = if_model()
    layers = [l for l in find_layers(analyze(model)) if l.weight == "W2"]
    assert len(layers) == 1 and layers[0].compensable and len(layers[0].also_reads) == 1
    assert layers[0].bias is None  # only the then branch adds b1 after its first MatMul, not after W2
    result = prune(model, Target(ratio=0.5), criterion="obspa")
    assert "W2" in result.weights
    save(result.model, os.path.join(tmp_path, "pruned.onnx"))  # verified: checker, session, a run
    assert "W2" in prune(model, Target(ratio=0.5), criterion="obspa", staged=True).weights  # first order there
    errors = {}
    feeds = [{**random_inputs(model, batch=64, seed=5), "c": np.array(taken)} for taken in (True, False)]
    for name, pruned in (("compensated", result.model), ("plain", masked_original(result.plan))):
        errors[name] = sum(float(np.mean((run(pruned, f)[0] - run(model, f)[0]) ** 2)) for f in feeds)
    assert errors["compensated"] < errors["plain"]


def test_an_optimum_merged_decoder_prunes_in_both_branches(tmp_path):
    """optimum's merged decoder: the decoder with and without its key/value cache in the branches of an If, every
    weight read by both. It was "nothing prunable"; now its MLP channels and query-head slots prune as the
    decoder-with-past's do, alike in both branches, and either branch matches the oracle."""
    from models.llama_onnx import build_merged

    path = str(tmp_path / "merged.onnx")
    build_merged(path)
    model = onnx.load(path)
    result = prune(model, Target(ratio=0.5), criterion="l1")
    kinds = {g["kind"] for g in result.plan.to_json("m")["groups"] if g["removed"]}
    assert kinds == {"channels", "heads"}
    assert [n.op_type for n in result.model.graph.node] == ["If"]
    written = os.path.join(tmp_path, "pruned.onnx")
    save(result.model, written)
    rng = np.random.default_rng(0)
    past = {f"past_{kind}.{i}": rng.standard_normal((2, 2, 3, 8)).astype(np.float32)
            for kind in ("key", "value") for i in range(2)}
    for taken in (True, False):
        feeds = {"input_ids": rng.integers(0, 101, (2, 5)), **past, "use_cache_branch": np.array([taken])}
        for got, expected in zip(run(written, feeds), run(masked_original(result.plan), feeds)):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_decoders_with_a_cache_calibrate_on_a_text_file_or_an_npz(tmp_path):
    """A text file's sentences fill the ids; a decoder's cache (at the top or read inside a merged decoder's
    branches) is fed empty and use_cache_branch true, said, in batches of the batch size (the flag [1] is not a
    static batch of 1; an .npz gives it once). Both were refused ("cannot tell what input 'past_key.0' carries")."""
    pytest.importorskip("tokenizers")
    from models.llama_onnx import build, build_merged
    from spa.calibration import Calibration, calibration_batches
    from tests.test_calibration import _tokenizer

    tokenizer = _tokenizer(tmp_path / "tok", ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(99)])
    (tmp_path / "s.txt").write_text("\n".join(" ".join(f"w{(7 * k + j) % 99}" for j in range(1 + k % 9))
                                             for k in range(40)), encoding="utf-8")
    said = []
    source = Calibration(source=str(tmp_path / "s.txt"), tokenizer=str(tokenizer), batch_size=16)
    for builder in (build_merged, lambda path: build(path, "tiny", past=True)):
        path = str(tmp_path / "decoder.onnx")
        builder(path)
        batches = calibration_batches(onnx.load(path), source, progress=said.append)
        assert [len(b["input_ids"]) for b in batches] == [16, 16, 8]
        assert all(b["past_key.0"].shape == (len(b["input_ids"]), 2, 0, 8) for b in batches)
        assert any("cache input(s) (past_key.0, ...) fed empty" in m for m in said)
        result = prune(onnx.load(path), Target(ratio=0.3), criterion="obspa", calibration=source, progress=said.append)
        assert result.plan.removed_by_group() and any("Hessians of 4 layers from 32" in m for m in said)
    rng = np.random.default_rng(0)
    caches = {f"past_{kind}.{i}": np.zeros((40, 2, 0, 8), np.float32) for kind in ("key", "value") for i in range(2)}
    arrays = {"input_ids": rng.integers(0, 101, (40, 6)), "use_cache_branch": np.array([True]), **caches}
    build_merged(path)
    np.savez(tmp_path / "d.npz", **arrays)
    assert [len(b["input_ids"]) for b in calibration_batches(onnx.load(path), str(tmp_path / "d.npz"))] == [16, 16, 8]
    np.savez(tmp_path / "d.npz", **arrays | {"use_cache_branch": np.ones(40, bool)})
    with pytest.raises(SpaError, match="'use_cache_branch' is fed whole in every batch, so it must be \\[1\\]"):
        calibration_batches(onnx.load(path), str(tmp_path / "d.npz"))


def test_an_if_whose_other_branch_fails_on_the_calibration_inputs_stays_a_boundary(tmp_path):
    """The flattened copy computes both branches: where the branch not taken fails on the calibration inputs (a
    Squeeze of the batch axis, taken only at batch 1), the If stays a boundary, said, and the rest prunes."""
    rng = np.random.default_rng(0)
    weights = [_weight(rng, "W0", 16, 32), _weight(rng, "Wa", 32, 16), _weight(rng, "W1", 16, 8),
               _weight(rng, "W2", 16, 8), numpy_helper.from_array(np.array([0], np.int64), "zero")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    batch_of_many = helper.make_graph([helper.make_node("MatMul", ["h", "W1"], ["y"])], "many", [], [out])
    batch_of_one = helper.make_graph([helper.make_node("Squeeze", ["h", "zero"], ["s"]),
                                      helper.make_node("MatMul", ["s", "W2"], ["t"]),
                                      helper.make_node("Unsqueeze", ["t", "zero"], ["y"])], "one", [], [out])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "Wa"], ["h"]), helper.make_node("Shape", ["x"], ["shape"], end=1),
             helper.make_node("Equal", ["shape", "one"], ["single"]),
             helper.make_node("Squeeze", ["single"], ["cond"]),
             helper.make_node("If", ["cond"], ["out"], name="by_batch", then_branch=batch_of_one,
                              else_branch=batch_of_many)]
    weights.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    said = []
    result = prune(model, Target(ratio=0.5), criterion="obspa", progress=said.append)
    assert any("stay boundaries" in m for m in said)
    assert result.plan.removed("W0", 1).size == 16 and not result.plan.removed("Wa", 1).size
    save(result.model, os.path.join(tmp_path, "pruned.onnx"))


def test_recovery_trains_the_flattened_copy_and_the_result_is_folded(tmp_path):
    model = if_model()
    result = prune(model, Target(ratio=0.5), criterion="l1", recover=20)
    assert result.recovery is not None and [n.op_type for n in result.model.graph.node] == ["If", "Relu"]
    save(result.model, os.path.join(tmp_path, "pruned.onnx"))


def test_sweep_figures_count_the_layers_of_both_branches():
    from spa.grid_sweep import figures

    found = figures(if_model(), latency=False)
    assert found["params"] == 16 * 32 + 32 + 32 * 8 + 8 * 24 + 24 * 8  # W1, b1, W2 once; W3, W4
    assert found["macs"] == 2 * (16 * 32 + 32 * 8) + 8 * 24 + 24 * 8  # W1, W2 in both branches
