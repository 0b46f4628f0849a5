"""Layers inside a Loop body (tf2onnx writes Keras LSTMs with masking as while-loops): the body copied out as its
first iteration for the analysis (spa.control_flow.flattened), the Loop coupling what it is given, hands on and
stacks (spa.rules.control), the rewritten copy folded back as its body; the oracle holds at every length."""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spa.activations import fetch
from spa.control_flow import flattened, folded
from spa.groups import analyze
from spa.pipeline import prune, save
from spa.runtime import run
from spa.selection import Target
from spa.verify import masked_original

UNITS, FEATURES = 16, 8


def lstm_loop_model(seed: int = 0, one_start: bool = False) -> onnx.ModelProto:
    """x [T, N, F] -> an LSTM written as a Loop over T, tf2onnx's way (its weights W, R, B loop-carried constants
    the body hands on unchanged, the input read from the outer scope by the iteration number, the state started
    from ConstantOfShape zeros) -> the final h through a MatMul, and the mean over time of the stacked h's through
    another. `one_start`: h and c start from one zeros tensor, as tf2onnx writes them."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    def value(name, elem=TensorProto.FLOAT, shape=None):
        return helper.make_tensor_value_info(name, elem, shape)

    weights = [weight("W", FEATURES, 4 * UNITS), weight("R", UNITS, 4 * UNITS), weight("B", 4 * UNITS),
               weight("Wo", UNITS, 4), weight("Wo2", UNITS, 3)]
    ints = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
            (("units", [UNITS]), ("one", [1]), ("zero", [0]))]
    step = [helper.make_node("Gather", ["x", "i"], ["xt"], axis=0),
            helper.make_node("MatMul", ["xt", "w_in"], ["a"], name="kernel"),
            helper.make_node("MatMul", ["h_in", "r_in"], ["b"], name="recurrent"),
            helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "b_in"], ["z"]),
            helper.make_node("Split", ["z"], ["g0", "g1", "g2", "g3"], axis=1, num_outputs=4),
            helper.make_node("Sigmoid", ["g0"], ["ig"]), helper.make_node("Sigmoid", ["g1"], ["fg"]),
            helper.make_node("Tanh", ["g2"], ["cg"]), helper.make_node("Sigmoid", ["g3"], ["og"]),
            helper.make_node("Mul", ["fg", "c_in"], ["fc"]), helper.make_node("Mul", ["ig", "cg"], ["icg"]),
            helper.make_node("Add", ["fc", "icg"], ["c_out"]), helper.make_node("Tanh", ["c_out"], ["tc"]),
            helper.make_node("Mul", ["og", "tc"], ["h_out"]), helper.make_node("Identity", ["h_out"], ["scan_h"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["w_in"], ["w_out"])]
    body = helper.make_graph(
        step, "body", [value("i", TensorProto.INT64, []), value("cond_in", TensorProto.BOOL, []), value("h_in"),
                       value("c_in"), value("w_in"), value("r_in"), value("b_in")],
        [value("cond_out", TensorProto.BOOL, []), value("h_out"), value("c_out"), value("w_out"), value("r_in"),
         value("b_in"), value("scan_h")])
    nodes = [helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Gather", ["xs", "zero"], ["T1"], axis=0),
             helper.make_node("Squeeze", ["T1", "zero"], ["T"]), helper.make_node("Gather", ["xs", "one"], ["N1"]),
             helper.make_node("Concat", ["N1", "units"], ["state"], axis=0),
             helper.make_node("ConstantOfShape", ["state"], ["h0"]),
             helper.make_node("ConstantOfShape", ["state"], ["c0"]),
             helper.make_node("Loop", ["T", "", "h0", "h0" if one_start else "c0", "W", "R", "B"],
                              ["hT", "cT", "Wf", "Rf", "Bf", "hs"],
                              name="while_loop", body=body),
             helper.make_node("MatMul", ["hT", "Wo"], ["y1"]),
             helper.make_node("ReduceMean", ["hs", "zero"], ["hm"], keepdims=0),
             helper.make_node("MatMul", ["hm", "Wo2"], ["y2"])]
    graph = helper.make_graph(nodes, "g", [value("x", shape=["T", "N", FEATURES])],
                              [value("y1", shape=["N", 4]), value("y2", shape=["N", 3])], weights + ints)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(steps: int, seed: int = 1) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((steps, 3, FEATURES)).astype(np.float32)}


def test_the_units_of_an_lstm_written_as_a_loop_prune_and_match_the_oracle(tmp_path):
    """Its 16 units were frozen ("control flow (Loop) is a boundary"); now one group: the kernel's and the
    recurrent weight's gate columns, the recurrent weight's rows, the bias, and the rows of both MatMuls after it.
    The Loop keeps its place, its body the rewritten copy (no copy left outside), and at any sequence length the
    pruned model computes what the original computes with those channels' consumer slices zeroed."""
    for one_start in (True, False):  # h and c from one zeros tensor: both loop-carried values link through it
        groups = [g for g in analyze(lstm_loop_model(one_start=one_start)).groups if g.prunable]
        assert len(groups) == 1 and len(groups[0].atoms) == UNITS
        assert {m.tensor for m in groups[0].members} >= {"W", "R", "B", "Wo", "Wo2", "hT", "cT", "hs"}
    model = lstm_loop_model(one_start=True)
    result = prune(model, Target(ratio=0.5), criterion="l1")
    path = os.path.join(tmp_path, "pruned.onnx")
    save(result.model, path)
    pruned = onnx.load(path)
    assert [n.op_type for n in pruned.graph.node if n.op_type in ("Loop", "MatMul", "Sigmoid")] == \
        ["Loop", "MatMul", "MatMul"]
    sizes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert sizes["W"] == [FEATURES, 32] and sizes["R"] == [8, 32] and sizes["Wo"] == [8, 4]
    body = next(n for n in pruned.graph.node if n.op_type == "Loop").attribute[0].g
    assert [n.name for n in body.node if n.op_type == "MatMul"] == ["kernel", "recurrent"]
    oracle = masked_original(result.plan)
    for steps in (1, 4, 9):
        for got, expected in zip(run(path, _inputs(steps)), run(oracle, _inputs(steps))):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_flatten_then_fold_computes_the_model():
    """Folding the unchanged copy back gives a model that computes the original's outputs."""
    model = lstm_loop_model()
    flat, found = flattened(model)
    assert [f.kind for f in found] == ["Loop"] and any(n.name.startswith("while_loop/body/") for n in flat.graph.node)
    assert all(np.allclose(a, b) for a, b in zip(run(flat, _inputs(5)), run(model, _inputs(5))))
    back = folded(flat, found)
    assert not any(n.name.startswith("while_loop/body/") for n in back.graph.node)
    onnx.checker.check_model(back, full_check=True)
    for got, expected in zip(run(back, _inputs(6)), run(model, _inputs(6))):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_a_layer_inside_a_loop_is_calibrated_on_every_iterations_inputs():
    """The copy computes the first iteration only; its layers' inputs are fetched from the Loop itself, every
    iteration's stacked as more rows (the kernel reads x[t] of every t; the recurrent weight h of every step, not
    only the zeros it starts from). OBSPA then compensates the layers inside with them."""
    flat, _ = flattened(lstm_loop_model())
    x = _inputs(5)
    got = next(fetch(flat, ["while_loop/body/xt", "while_loop/body/h_in", "hT"], [x], None))
    np.testing.assert_array_equal(got["while_loop/body/xt"], x["x"].reshape(15, FEATURES))
    assert got["while_loop/body/h_in"].shape == (15, UNITS) and np.abs(got["while_loop/body/h_in"][3:]).min() > 0
    assert got["hT"].shape == (3, UNITS)
    said = []
    result = prune(lstm_loop_model(), Target(ratio=0.25), criterion="obspa", progress=said.append)
    assert any("Hessians of 3 layers" in m for m in said) and {"R", "Wo", "Wo2"} <= set(result.weights)
