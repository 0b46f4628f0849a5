"""Fine-grained sparsity (spa.sparsity, `spa sparsify`, `spa analyze --sparsity`, spa.sparsify):
every written weight conforms to its pattern, masks match a brute-force reference, the outputs
run, and bad requests are one `spa: error:` line."""
import contextlib
import importlib.util
import io
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import spa
from builder import Builder
from spa.cli import main
from spa.errors import SpaError, SpaWarning
from spa.graph import Graph
from spa.layers import weighted_layers
from spa.sparsity import (UNREAD_BODY, Pattern, conforms, densified, kept, layer_mask, parse_pattern, sparsify,
                          sparsity_report)

PATTERNS = [parse_pattern("2:4"), parse_pattern("1:4"), parse_pattern("4:8"), parse_pattern("unstructured", 0.6),
            parse_pattern("k-of-n", 0.5), parse_pattern("k-of-n", 0.5, "kernel"),
            parse_pattern("k-of-n", 0.75, "filter")]


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def conv_model():
    """Conv, grouped Conv (2 groups of 8 inputs), depthwise Conv, Gemm transB=1 and transB=0."""
    b = Builder()
    x = b.op("Relu", [b.conv(b.input(["batch", 8, 6, 6]), 8, 16)])
    x = b.op("Relu", [b.conv(x, 16, 16, group=2)])
    x = b.conv(x, 16, 16, group=16)
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    x = b.op("Relu", [b.gemm(x, 16, 8, transB=1)])
    b.output(b.gemm(x, 8, 4))
    return b.model()


def matmul_model():
    """MatMul with the weight right ([batch, 16] @ [16, 8]) and left ([8, 16] @ [16, batch])."""
    b = Builder()
    x = b.op("MatMul", [b.input(["batch", 16]), b.weight(16, 8)])
    x = b.op("Transpose", [b.op("Relu", [x])], perm=[1, 0])
    b.output(b.op("MatMul", [b.weight(8, 8), x]))
    return b.model()


def feeds(model, batch=2):
    rng = np.random.default_rng(1)
    shapes = {"input": {"conv": (batch, 8, 6, 6), "matmul": (batch, 16)}}
    kind = "conv" if model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 8 else "matmul"
    return {"input": rng.standard_normal(shapes["input"][kind]).astype(np.float32)}


def outputs(model, x):
    return ort.InferenceSession(model.SerializeToString()).run(None, x)


def written_weights(model):
    g = Graph(densified(model))
    return [(layer, np.asarray(g.consts[layer.weight])) for layer in weighted_layers(g)]


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def conv_file(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), path)
    return path


# ------------------------------------------------------------------------------------------------
# the masks against a brute-force reference
# ------------------------------------------------------------------------------------------------
def ranked(scores, indices, k):
    """The k indices of the highest scores, ties to the earlier index."""
    return set(sorted(indices, key=lambda i: (-scores[i], indices.index(i)))[:k])


def reference(w, layer, pattern):
    """Keep mask by loops over the weight's own index tuples."""
    s, keep = np.abs(w), np.zeros(w.shape, dtype=bool)
    out = 0 if layer.kind == "conv" else 1 - layer.in_axis
    every = list(np.ndindex(*w.shape))
    if pattern.kind == "unstructured":
        groups, k = [every], kept(w.size, pattern.amount)
    elif pattern.kind == "n:m":
        m = pattern.m
        groups = {}
        for i in every:
            rest = tuple(d for a, d in enumerate(i) if a != layer.in_axis)
            groups.setdefault(rest + (i[layer.in_axis] // m,), []).append(i)
        groups, k = list(groups.values()), pattern.n
    elif pattern.granularity == "filter":
        totals = {}
        for i in every:
            totals[i[out]] = totals.get(i[out], 0.0) + s[i]
        chosen = ranked(totals, list(totals), kept(len(totals), pattern.amount))
        return np.array([i[out] in chosen for i in every]).reshape(w.shape)
    elif pattern.granularity == "kernel" and layer.kind == "conv":
        for o in range(w.shape[0]):
            totals = {c: s[o, c].sum() for c in range(w.shape[1])}
            for c in ranked(totals, list(totals), kept(w.shape[1], pattern.amount)):
                keep[o, c] = True
        return keep
    else:
        rows = {}
        for i in every:
            rows.setdefault(i[out], []).append(i)
        groups = list(rows.values())
        k = kept(len(groups[0]), pattern.amount)
    for group in groups:
        for i in ranked({j: s[j] for j in group}, group, k):
            keep[i] = True
    return keep


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("build", [conv_model, matmul_model])
def test_masks_match_the_reference(pattern, build):
    g = Graph(build())
    for layer in weighted_layers(g):
        w = np.asarray(g.consts[layer.weight])
        w = np.round(w * 2) / 2  # ties: the earlier index wins
        if pattern.kind == "n:m" and w.shape[layer.in_axis] % pattern.m:
            continue
        mask = layer_mask(w, layer, pattern)
        np.testing.assert_array_equal(mask, reference(w, layer, pattern), err_msg=f"{layer.weight} {pattern}")
        assert conforms(np.where(mask, w, 0), layer, pattern)


def test_n_m_groups_run_along_the_input_channels():
    """Conv [O, I, kh, kw]: the 2:4 groups are 4 consecutive input channels at one (o, kh, kw)."""
    g = Graph(conv_model())
    layer = weighted_layers(g)[0]
    w = np.zeros((16, 8, 3, 3), np.float32)
    w[:, :, 1, 1] = 1.0  # dense along I at one position: 2:4 must thin it; along kh/kw it would not
    kept_along_i = layer_mask(w, layer, Pattern("n:m", 2, 4))[:, :, 1, 1]
    assert kept_along_i.sum() == 16 * 4
    assert not conforms(w, layer, Pattern("n:m", 2, 4))


# ------------------------------------------------------------------------------------------------
# models: every written tensor conforms, the outputs run
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("build", [conv_model, matmul_model])
def test_every_written_weight_conforms_and_runs(pattern, build):
    model = build()
    sparse, report = sparsify(model, pattern)
    done = {row["weight"] for row in report["layers"]}
    skipped = {row["weight"] for row in report["skipped"]}
    assert done and done | skipped == {layer.weight for layer, _ in written_weights(model)}
    for layer, w in written_weights(sparse):
        if layer.weight in done:
            assert conforms(w, layer, pattern), (layer.weight, pattern)
    if pattern.kind == "n:m":  # the depthwise Conv (1 input per group) cannot take N:M
        assert all("not a multiple of" in row["reason"] for row in report["skipped"])
    got = outputs(sparse, feeds(model))[0]
    assert got.shape == outputs(model, feeds(model))[0].shape and np.all(np.isfinite(got))
    assert report["sparsity"]["after"] > report["sparsity"]["before"]


def test_weights_keep_float16():
    b = Builder()
    x = b.input(["batch", 8], dtype=TensorProto.FLOAT16)
    w = b.const(b.rng.standard_normal((8, 4)).astype(np.float16))
    y = b.op("MatMul", [x, w])
    b.outputs.append(onnx.helper.make_tensor_value_info(y, TensorProto.FLOAT16, None))
    sparse, report = sparsify(b.model(), parse_pattern("2:4"))
    value = numpy_helper.to_array(sparse.graph.initializer[0])
    assert value.dtype == np.float16 and report["layers"][0]["zeros_after"] == 0.5


def test_a_weight_read_alike_by_several_layers_takes_one_mask_and_one_read_otherwise_is_skipped_once():
    """An unrolled recurrence reads one weight a step (captcha-whisperer's CRNN: each LSTM weight by 20 Gemms):
    one mask serves every reader, by magnitude with l1, by OBS from all the readers' inputs in one Hessian with
    obs, said; a weight read differently (here as a Gather table too) is skipped, one warning for all its readers."""
    b = Builder()
    x, w, table = b.input(["batch", 8]), b.weight(8, 8), b.weight(8, 8)
    b.output(b.op("MatMul", [b.op("Relu", [b.op("MatMul", [x, w])]), w]))
    ids = b.input(["batch"], "ids", dtype=TensorProto.INT64)
    b.output(b.op("Add", [b.op("MatMul", [x, table]), b.op("Gather", [table, ids])]))
    model = b.model()
    said = []
    obs_sparse, report = sparsify(model, parse_pattern("2:4"), progress=said.append)
    assert [r["weight"] for r in report["layers"]] == [w]
    assert [(s["weight"], s["reason"]) for s in report["skipped"]] == [(table, f"weight {table} is shared by 2 nodes")]
    assert any(m.endswith("1 weights that several layers read alike (an unrolled recurrence's) at once, from the "
                          "inputs of all their readers in the original model") for m in said), said
    assert "OBS sparsity: 1 layers obs" in said, said
    sparse, _ = sparsify(model, parse_pattern("2:4"), criterion="l1")
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == w))
    written = numpy_helper.to_array(next(t for t in sparse.graph.initializer if t.name == w))
    from spa.layers import Layer
    assert np.array_equal(written, np.where(layer_mask(original, Layer(0, w, 0, "x", "dense_t"), parse_pattern("2:4")),
                                            original, 0))
    feeds = {"input": np.ones((2, 8), np.float32), "ids": np.array([0, 3])}
    got = ort.InferenceSession(sparse.SerializeToString()).run(None, feeds)[0]
    assert np.allclose(got, np.maximum(feeds["input"] @ written, 0) @ written, atol=1e-5)
    # both readers' inputs in the original model (x, relu(x w)): OBS reproduces the weight's outputs on them
    # better than the magnitude mask does
    x = np.random.default_rng(2).standard_normal((512, 8))
    rows = np.concatenate([x, np.maximum(x @ original, 0)])
    by_obs = numpy_helper.to_array(next(t for t in obs_sparse.graph.initializer if t.name == w))
    assert conforms(by_obs, Layer(0, w, 0, "x", "dense_t"), parse_pattern("2:4"))
    assert np.square(rows @ (by_obs - original)).sum() < 0.9 * np.square(rows @ (written - original)).sum()


def test_sparse_storage_matches_dense():
    model = conv_model()
    pattern = parse_pattern("unstructured", 0.9)
    dense, dense_report = sparsify(model, pattern)
    stored, report = sparsify(model, pattern, storage="sparse", compressed=True)
    assert report["stored_sparse"] and not dense_report["stored_sparse"]
    assert report["bytes"]["written"] < report["bytes"]["dense"] == dense_report["bytes"]["written"]
    assert report["zipped_bytes"]["after"] < report["zipped_bytes"]["before"]
    onnx.checker.check_model(stored, full_check=True)
    np.testing.assert_array_equal(outputs(stored, feeds(model))[0], outputs(dense, feeds(model))[0])
    assert [r["zeros"] for r in sparsity_report(stored)] == [r["zeros"] for r in sparsity_report(dense)]


def test_sparse_storage_keeps_a_weight_dense_where_it_is_not_smaller():
    _, report = sparsify(conv_model(), parse_pattern("2:4"), storage="sparse")  # float32 at 50%: COO is bigger
    assert report["stored_sparse"] == []


# ------------------------------------------------------------------------------------------------
# patterns refused
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, amount, granularity, message", [
    ("4:2", None, "weight", "1 <= N <= M"),
    ("0:4", None, "weight", "1 <= N <= M"),
    ("2:x", None, "weight", "expected N:M with integers"),
    ("2:4", 0.5, "weight", "an amount has no effect with N:M"),
    ("2:4", None, "kernel", "granularity kernel has no effect with N:M"),
    ("unstructured", None, "weight", "needs an amount"),
    ("unstructured", 1.0, "weight", "amount must be in [0, 1)"),
    ("k-of-n", -0.1, "weight", "amount must be in [0, 1)"),
    ("unstructured", 0.5, "filter", "granularity filter applies to k-of-n"),
    ("k-of-n", 0.5, "rows", "granularity must be one of"),
    ("blocks", 0.5, "weight", "unknown sparsity pattern"),
])
def test_bad_patterns_are_refused(text, amount, granularity, message):
    with pytest.raises(SpaError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_pattern(text, amount, granularity)


@pytest.mark.parametrize("argv, message", [
    (["--pattern", "4:2"], "N:M needs 1 <= N <= M"),
    (["--pattern", "unstructured", "--amount", "1.5"], "amount must be in [0, 1)"),
    (["--pattern", "2:4", "--amount", "0.5"], "an amount has no effect with N:M"),
    (["--criterion", "l1", "--calibration-samples", "8"], "--calibration-samples has no effect with criterion l1"),
    (["--criterion", "l1", "--low-rank", "2"], "--low-rank fits its term on calibration inputs"),
    (["--low-rank", "-1"], "--low-rank needs a rank of at least 1"),
])
def test_cli_refuses_with_one_line(tmp_path, conv_file, argv, message):
    out = tmp_path / "out.onnx"
    rc, _, err = cli("sparsify", conv_file, "-o", out, "-q", *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("spa: error: ") and message in lines[0], err
    assert not out.exists()


def test_cli_refuses_a_model_no_layer_of_which_splits_in_m(tmp_path):
    b = Builder()
    b.output(b.gemm(b.input(["batch", 6]), 6, 4))
    onnx.save(b.model(), tmp_path / "m.onnx")
    rc, _, err = cli("sparsify", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "-q", "--pattern", "4:8")
    assert rc == 2 and err.strip().splitlines() == [
        "spa: error: no layer can take pattern 4:8: contracted axis of 6 weights is not a multiple of 8"]


def test_cli_names_the_layers_it_skips(tmp_path, conv_file):
    rc, out, err = cli("sparsify", conv_file, "-o", tmp_path / "o.onnx", "-q")
    assert rc == 0 and out.startswith(f"wrote {tmp_path / 'o.onnx'}: 4 layers sparsified to 2:4")
    assert err.strip().splitlines() == ["spa: warning: Conv_16 not sparsified: contracted axis of 1 weights is not "
                                        "a multiple of 4"]


def test_cli_writes_onnx_only(tmp_path, conv_file):
    rc, _, err = cli("sparsify", conv_file, "-o", tmp_path / "o.pt2", "-q")
    assert rc == 2 and "spa sparsify writes ONNX" in err and not (tmp_path / "o.pt2").exists()


def test_cli_refuses_to_overwrite_its_input(conv_file):
    rc, _, err = cli("sparsify", conv_file, "-o", conv_file, "-q")
    assert rc == 2 and "refusing to overwrite the input model (pass --overwrite)" in err


# ------------------------------------------------------------------------------------------------
# the CLI end to end
# ------------------------------------------------------------------------------------------------
def test_cli_json_report_and_analyze(tmp_path, conv_file):
    out = tmp_path / "o.onnx"
    rc, text, _ = cli("sparsify", conv_file, "-o", out, "-q", "--json", "--pattern", "unstructured", "--amount",
                      "0.8", "--storage", "sparse")
    report = json.loads(text)
    assert rc == 0 and report["pattern"] == "unstructured 0.8" and report["stored_sparse"]
    assert os.path.getsize(out) == report["bytes"]["written"]
    rc, text, _ = cli("analyze", out, "-q", "--json", "--sparsity")
    rows = json.loads(text)["sparsity"]
    assert rc == 0 and len(rows) == 5 and all(r["zeros"] >= 0.79 for r in rows)
    rc, text, _ = cli("analyze", out, "-q", "--sparsity")
    assert rc == 0 and "zeros  N:M" in text


def test_prune_then_sparsify(tmp_path, conv_file):
    pruned, sparse = tmp_path / "pruned.onnx", tmp_path / "sparse.onnx"
    assert cli("prune", conv_file, "-o", pruned, "--ratio", "0.5", "-q")[0] == 0
    rc, _, err = cli("sparsify", pruned, "-o", sparse, "-q", "--pattern", "2:4")
    assert rc == 0, err
    model = onnx.load(sparse)
    rows = sparsity_report(model)
    assert sum(r["zeros"] > 0 for r in rows) >= 2 and all("2:4" in r["n_m"] for r in rows if r["zeros"] > 0)
    assert all(f"{r['name']} not sparsified" in err for r in rows if r["zeros"] == 0)  # said why (axis of 1 or 2)
    outputs(model, feeds(conv_model()))


def test_api_sparsify(tmp_path, conv_file):
    result = spa.sparsify(str(conv_file), "k-of-n", amount=0.5, granularity="filter")
    assert result.report["pattern"] == "k-of-n 0.5, filter"
    path = result.save(str(tmp_path / "o.onnx"))
    assert [r["zeros"] for r in sparsity_report(onnx.load(path))] == [0.5] * 5
    with pytest.raises(SpaError, match="refusing to overwrite the input model"):
        result.save(str(conv_file))
    with pytest.raises(SpaError, match="a Pattern carries its amount"):
        spa.sparsify(conv_model(), parse_pattern("2:4"), amount=0.5)


def test_a_model_that_fails_verification_is_not_written(tmp_path, conv_file, monkeypatch):
    import spa.pipeline

    def fail(*args, **kwargs):
        raise SpaError("sparsified model failed onnxruntime: broken")
    monkeypatch.setattr(spa.pipeline, "validate", fail)
    rc, _, err = cli("sparsify", conv_file, "-o", tmp_path / "o.onnx", "-q")
    assert rc == 2 and "failed onnxruntime" in err and not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------------------------------
# criterion obs (spa.sparse_obs)
# ------------------------------------------------------------------------------------------------
needs_obs = pytest.mark.skipif(importlib.util.find_spec("spa.sparse_obs") is None, reason="spa.sparse_obs missing")


@needs_obs
@pytest.mark.parametrize("pattern", [parse_pattern("2:4"), parse_pattern("k-of-n", 0.5, "kernel")], ids=str)
def test_obs_weights_conform_and_run(pattern):
    from spa.calibration import Calibration

    model = conv_model()
    sparse, report = sparsify(model, pattern, "obs", calibration=Calibration(source="synthetic", samples=8))
    assert report["criterion"] == "obs" and report["layers"]
    done = {row["weight"] for row in report["layers"]}
    assert all(conforms(w, layer, pattern) for layer, w in written_weights(sparse) if layer.weight in done)
    assert np.all(np.isfinite(outputs(sparse, feeds(model))[0]))


def test_recover_keeps_every_zero():
    """Distillation after sparsifying trains the kept weights only: the pattern survives."""
    from spa.calibration import Calibration

    pytest.importorskip("torch")
    model = matmul_model()
    sparse, report = sparsify(model, parse_pattern("2:4"), calibration=Calibration(source="synthetic", samples=32),
                              recover=20)
    assert set(report["recover"]) == {"steps", "lr", "loss_before", "loss_after", "kept"}
    assert report["recover"]["kept"] == (report["recover"]["loss_after"] < report["recover"]["loss_before"])
    assert report["recover"]["lr"] in (1e-4, 1e-6)  # the default for a model without BatchNormalization, or its retry
    _, given = sparsify(model, parse_pattern("2:4"), calibration=Calibration(source="synthetic", samples=32),
                        recover=20, recover_lr=3e-4)
    assert given["recover"]["lr"] == 3e-4
    g = Graph(sparse)
    for layer in weighted_layers(g):
        assert conforms(g.consts[layer.weight], layer, parse_pattern("2:4"))


def test_weights_held_in_constant_nodes_are_sparsified_in_place():
    """Paddle2ONNX (the PP-OCR models) stores weights as Constant nodes, not initializers."""
    from onnx import helper

    model = conv_model()
    weights = list(model.graph.initializer)
    del model.graph.initializer[:]
    for k, tensor in enumerate(weights):
        model.graph.node.insert(k, helper.make_node("Constant", [], [tensor.name], value=tensor))
    sparse, report = sparsify(model, parse_pattern("2:4"))
    assert report["layers"] and not sparse.graph.initializer
    g = Graph(sparse)
    written = {row["weight"] for row in report["layers"]}
    for layer in weighted_layers(g):
        assert layer.weight not in written or conforms(g.consts[layer.weight], layer, parse_pattern("2:4"))
    assert len(written) == 4  # the depthwise Conv (one weight per group) is skipped
    onnx.checker.check_model(sparse, full_check=True)


def if_model():
    """An If whose branches read their layer weights three ways: a branch initializer, a branch Constant
    node (silero-vad's whole network sits in such an If) and a top-level initializer both branches read
    (optimum's merged decoders); x [1, 8] -> [1, 4] either way."""
    from onnx import helper

    rng = np.random.default_rng(0)
    shared = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "shared")

    def branch(name):
        own = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), f"{name}_own")
        constant = helper.make_node("Constant", [], [f"{name}_constant"],
                                    value=numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32)))
        nodes = [constant, helper.make_node("MatMul", ["x", "shared"], [f"{name}_a"], name=f"{name}_shared"),
                 helper.make_node("Relu", [f"{name}_a"], [f"{name}_b"]),
                 helper.make_node("MatMul", [f"{name}_b", f"{name}_constant"], [f"{name}_c"], name=f"{name}_const"),
                 helper.make_node("MatMul", [f"{name}_c", f"{name}_own"], [f"{name}_y"], name=f"{name}_own")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                 [1, 4])], [own])
    node = helper.make_node("If", ["cond"], ["y"], name="branches", then_branch=branch("then"),
                            else_branch=branch("else"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                                            helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [shared])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _branch_output(weights, x, branch):
    """What `branch` of if_model computes with `weights` ({name: value})."""
    return np.maximum(x @ weights["shared"], 0) @ weights[f"{branch}_constant"] @ weights[f"{branch}_own"]


def test_layers_inside_control_flow_bodies_are_sparsified():
    """Fine-grained masks change values only: the weights a body reads move to the top level (values unchanged);
    the weight both branches read is masked once. With l1 every one takes its magnitude mask. With obs (the
    default) one branch of the If is inlined for the calibration run, so its layers (the shared weight's too)
    get OBS masks and updates; the other branch's own layers, whose inputs OBS cannot read, keep their weights,
    named. Either way the written model computes exactly what its weights give, in both branches."""
    original = {t.name: numpy_helper.to_array(t) for t in if_model().graph.initializer}
    original.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for a in if_model().graph.node[0].attribute
                     for n in a.g.node if n.op_type == "Constant"})
    original.update({t.name: numpy_helper.to_array(t) for a in if_model().graph.node[0].attribute
                     for t in a.g.initializer})
    for criterion in ("l1", None):
        said = []
        sparse, report = sparsify(if_model(), parse_pattern("2:4"), criterion, progress=said.append)
        written = ["shared", "then_constant", "then_own"] + (["else_constant", "else_own"] if criterion else [])
        assert sorted(r["weight"] for r in report["layers"]) == sorted(written)
        assert "branches / MatMul 'then_own'" in {r["name"] for r in report["layers"]}
        onnx.checker.check_model(sparse, full_check=True)
        weights = {t.name: numpy_helper.to_array(t) for t in sparse.graph.initializer}
        for name in written:
            assert conforms(weights[name], _dense_t_layer(name), parse_pattern("2:4")), name
        x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
        run = ort.InferenceSession(sparse.SerializeToString())
        for cond, branch in ((True, "then"), (False, "else")):
            got = run.run(None, {"x": x, "cond": np.array(cond)})[0]
            assert np.allclose(got, _branch_output(weights, x, branch), atol=1e-5)
        magnitude = {name: np.array_equal(weights[name], np.where(
            layer_mask(original[name], _dense_t_layer(name), parse_pattern("2:4")), original[name], 0))
            for name in weights}
        if criterion == "l1":
            assert all(magnitude.values()), magnitude
        else:
            assert not magnitude["then_constant"] and not magnitude["then_own"], magnitude  # OBS updates
            assert all(np.array_equal(weights[n], original[n]) for n in ("else_constant", "else_own"))
            assert {s["weight"]: s["reason"] for s in report["skipped"]} == {n: UNREAD_BODY for n in
                                                                            ("else_constant", "else_own")}
            assert "3 layers inside If branches calibrated through one branch of each If, inlined for the " \
                   "calibration run only" in said, said
            assert any(m.startswith("OBS sparsity: 1 layers magnitude, 2 layers obs") for m in said), said
        rows = sparsity_report(sparse)  # `spa analyze --sparsity`: the weight both branches read once
        assert len(rows) == 5 and all(r["op"] == "MatMul" and ("2:4" in r["n_m"]) == (r["weight"] in written)
                                      for r in rows), rows
    assert len(sparsity_report(if_model())) == 5  # before: the branches' own constants read where they are


def test_a_loops_carried_weight_is_sparsified():
    """tf2onnx hands a Keras LSTM's weights to its Loop as loop-carried values the body passes on unchanged:
    such a value is the constant in every iteration, and its MatMul inside the body takes the mask."""
    from onnx import helper

    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w_in"], ["hw"], name="step"), helper.make_node("Relu", ["hw"], ["h_out"]),
         helper.make_node("Identity", ["w_in"], ["w_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 8]),
                 helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [8, 8])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [8, 8])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["steps", "go", "x", "w"], ["h", "w_last"], name="recurrence", body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.array(3, np.int64), "steps"), numpy_helper.from_array(np.array(True), "go"),
         numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(SpaError, match="no layer can take pattern 2:4 with obs: the 1 that could are inside "
                       "control-flow bodies whose inputs OBS cannot read"):
        sparsify(model, parse_pattern("2:4"), criterion="obs")
    with pytest.warns(SpaWarning, match="criterion l1 .the default where obs cannot serve: every layer that can take "
                      "2:4 is inside a control-flow body whose inputs OBS cannot read"):
        assert sparsify(model, parse_pattern("2:4"))[1]["criterion"] == "l1"
    sparse, report = sparsify(model, parse_pattern("2:4"), criterion="l1")
    assert [r["name"] for r in report["layers"]] == ["recurrence / MatMul 'step'"]
    masked = numpy_helper.to_array(next(t for t in sparse.graph.initializer if t.name == "w"))
    assert np.array_equal(masked, np.where(layer_mask(w, _dense_t_layer("w"), parse_pattern("2:4")), w, 0))
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    h = x
    for _ in range(3):
        h = np.maximum(h @ masked, 0)
    assert np.allclose(ort.InferenceSession(sparse.SerializeToString()).run(None, {"x": x})[0], h, atol=1e-5)


def _dense_t_layer(weight):
    from spa.layers import Layer
    return Layer(0, weight, 0, "x", "dense_t")


def test_default_criterion_is_obs_announced():
    said = []
    _, report = sparsify(conv_model(), parse_pattern("2:4"), progress=said.append)
    assert report["criterion"] == "obs" and said[0].startswith("criterion obs (the default: ")


def test_default_falls_back_to_l1_where_generated_inputs_do_not_fit(tmp_path):
    """Generated images are 224x224; a model flattening a 32x32 map runs at 32x32 only: the
    default says so and uses l1 (an explicit obs is one error, naming --input-shape)."""
    b = Builder()
    x = b.op("Flatten", [b.op("Relu", [b.conv(b.input(["batch", 3, "h", "w"]), 3, 4)])])
    b.output(b.op("MatMul", [x, b.weight(4 * 32 * 32, 8)]))
    path = str(tmp_path / "only32.onnx")
    onnx.save(b.model(), path)
    with pytest.warns(SpaWarning, match=r"criterion l1 \(the default where obs cannot serve: the model does not "
                                        r"run on its calibration inputs \(input 16x3x224x224\)"):
        result = spa.sparsify(path, "2:4")
    assert result.report["criterion"] == "l1"
    result.save(str(tmp_path / "o.onnx"))
    with pytest.raises(SpaError, match="--input-shape sets the sizes"):
        spa.sparsify(path, "2:4", criterion="obs")


def test_onnxruntime_failing_inside_the_stages_is_one_error(tmp_path):
    """A Reshape to a fixed width fails in onnxruntime at 224x224 (the PP-OCRv4 recognizer's case):
    the default falls back to l1, explicit obs is one CalibrationRunError, never a traceback."""
    from spa.errors import CalibrationRunError

    b = Builder()
    x = b.op("Relu", [b.conv(b.input(["batch", 3, "h", "w"]), 3, 4)])
    x = b.op("Reshape", [x, b.const(np.array([0, 4 * 32 * 32], dtype=np.int64))])
    b.output(b.op("MatMul", [x, b.weight(4 * 32 * 32, 8)]))
    path = str(tmp_path / "reshape32.onnx")
    onnx.save(b.model(), path)
    with pytest.warns(SpaWarning, match="onnxruntime could not run the model on its calibration inputs"):
        assert spa.sparsify(path, "2:4").report["criterion"] == "l1"
    with pytest.raises(CalibrationRunError, match=r"\(input 16x3x224x224\)"):
        spa.sparsify(path, "2:4", criterion="obs")


def test_callers_draw_their_own_count_of_generated_inputs_of_one_kind():
    """OBS masks of a token model get TOKEN_SAMPLES generated sequences, obspa OBSPA_SAMPLES
    sentences or synthetic images, unless a count is given (announced); other inputs and sources keep 128."""
    from spa.calibration import Calibration, SampleDefault
    from spa.pipeline import OBSPA_SAMPLES, calibration_inputs
    from spa.sparse_obs import TOKEN_SAMPLES

    assert (TOKEN_SAMPLES.kind, TOKEN_SAMPLES.count) == ("tokens", 1024)
    assert [(s.kind, s.count) for s in OBSPA_SAMPLES] == [("sentences", 1024), ("synthetic", 512)]
    b = Builder()
    ids = b.input(["batch", "sequence"], "input_ids", TensorProto.INT64)
    x = b.op("Gather", [b.weight(37, 8), ids])
    b.output(b.op("MatMul", [b.op("Relu", [b.op("MatMul", [x, b.weight(8, 16)])]), b.weight(16, 4)]))
    model = b.model()
    tokens, images = SampleDefault("tokens", 64, 1e12, "why"), SampleDefault("synthetic", 48, 1e12, "why")

    def fit_samples(cal, model=model, **kwargs):
        said = []
        _, fit, _ = calibration_inputs(model, cal, said.append, **kwargs)
        return sum(len(f[next(iter(f))]) for f in fit), said

    count, said = fit_samples(Calibration("synthetic"), samples=(tokens,))
    assert count == 64 and any("64 generated token sequences, not 128 (why;" in line for line in said)
    assert fit_samples(Calibration("synthetic", samples=32), samples=(tokens,))[0] == 32
    assert fit_samples(Calibration("synthetic"))[0] == 128
    assert fit_samples(Calibration("synthetic"), samples=(images,))[0] == 128  # token inputs: not this kind
    conv = Calibration("synthetic", shapes=(1, 8, 6, 6))
    assert fit_samples(conv, conv_model(), samples=(tokens,))[0] == 128
    count, said = fit_samples(conv, conv_model(), samples=(images,))
    assert count == 48 and any("48 synthetic samples, not 128 (why;" in line for line in said)
    noise = Calibration("ood:noise-uniform", shapes=(1, 8, 6, 6))
    assert fit_samples(noise, conv_model(), samples=(images,))[0] == 128
    assert fit_samples(conv, conv_model(), samples=(SampleDefault("synthetic", 48, 1, "why"),))[0] == 16  # the budget
