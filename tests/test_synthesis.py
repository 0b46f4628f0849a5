"""Data-free input synthesis (spa.frontends.torch_synthesis): BN-statistics inversion (inputs
optimised so that every BatchNormalization layer's batch statistics match its running statistics)
and output-targeted inversion (inputs the model classifies as random targets); the converter's
AveragePool over inputs shorter than its window (PP-OCR's recognizer)."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from builder import Builder
from spa.calibration import calibration_batches
from spa.errors import SpaError
from spa.frontends.torch import from_onnx
from spa.frontends.torch_synthesis import bn_inversion, bn_match_error, bn_nodes, invert

torch.set_num_threads(1)


def _real(n, seed=0):
    """'Real' inputs: per-channel offsets and scales, spatially smooth, not N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 10, 10))
    x = (x[:, :, :-2, :-2] + x[:, :, 1:-1, 1:-1] + x[:, :, 2:, 2:]) / np.sqrt(3)
    return (x * np.array([2.0, 0.5, 1.0])[:, None, None] + np.array([1.0, -0.5, 0.3])[:, None, None]).astype(np.float32)


def _with_real_statistics(model, data):
    """Set every BN's running statistics to those of its input under `data`, in graph order."""
    import onnxruntime as ort

    inits = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(helper.ValueInfoProto(name=node.input[0]))
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        x = sess.run([node.input[0]], data)[0].astype(np.float64)
        axes = tuple(d for d in range(x.ndim) if d != 1)
        for slot, value in ((3, x.mean(axes)), (4, x.var(axes))):
            inits[node.input[slot]].CopyFrom(numpy_helper.from_array(value.astype(np.float32), node.input[slot]))
    return model


def _model(mask=False, training_mode=False):
    """[mask *] x -> Conv -> BN -> Relu -> Conv -> BN -> Relu -> GAP -> Flatten -> Gemm -> BN (rank 2)."""
    b = Builder(seed=3)
    x = b.input(["batch", 3, 8, 8])
    if mask:
        m = b.input(["batch", 1, 8, 8], "mask", TensorProto.INT64)
        x = b.op("Mul", [x, b.op("Cast", [m], to=TensorProto.FLOAT)])
    y = b.op("Relu", [b.bn(b.conv(x, 3, 6), 6)])
    y = b.conv(y, 6, 5)
    y = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [b.bn(y, 5)])])])
    b.output(b.bn(b.gemm(y, 5, 4), 4))
    model = b.model()
    data = {"input": _real(256)}
    if mask:
        data["mask"] = np.ones((256, 1, 8, 8), np.int64)
    model = _with_real_statistics(model, data)
    if training_mode:  # as torchscript's training export: the node normalises with batch stats
        bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"][1]
        bn.attribute.append(helper.make_attribute("training_mode", 1))
        bn.output.extend(["bn_running_mean", "bn_running_var"])
    return model


def test_inversion_matches_every_bn_layer():
    model = _model()
    start = calibration_batches(model, "synthetic", 32, 16, seed=0)
    before = bn_match_error(model, start)
    messages = []
    out = bn_inversion(model, start, steps=150, lr=0.1, progress=messages.append)
    after = bn_match_error(model, out)
    assert len(before) == len(after) == len(bn_nodes(model)) == 3
    assert all(a * 5 <= b for a, b in zip(after, before)), (before, after)
    # real data of the same batch size is about as close as the inversion gets, or further
    real = bn_match_error(model, [{"input": _real(16, seed=s)} for s in (7, 8)])
    assert sum(after) < 2 * sum(real), (after, real)
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert [list(f) for f in out] == [list(f) for f in start]
    for got, was in zip(out, start):
        assert got["input"].shape == was["input"].shape and got["input"].dtype == was["input"].dtype
        assert not np.array_equal(got["input"], was["input"])
    # the starting feeds are not modified in place
    assert np.array_equal(start[0]["input"], calibration_batches(model, "synthetic", 32, 16, seed=0)[0]["input"])


def test_integer_inputs_untouched_and_training_mode_bn():
    model = _model(mask=True, training_mode=True)
    start = calibration_batches(model, "synthetic", 16, 8, seed=1)
    out = bn_inversion(model, start, steps=60, lr=0.1)
    before, after = bn_match_error(model, start), bn_match_error(model, out)
    assert sum(after) * 3 <= sum(before), (before, after)
    _assert_mask_passes_through(out, start)


def _assert_mask_passes_through(out, start):
    """The integer mask passes through as it was; the float input keeps its dtype and shape."""
    for got, was in zip(out, start):
        assert set(got) == {"input", "mask"}
        assert got["mask"].dtype == np.int64 and np.array_equal(got["mask"], was["mask"])
        assert got["input"].dtype == np.float32 and got["input"].shape == (8, 3, 8, 8)


def test_deterministic_for_a_seed():
    model = _model()
    start = calibration_batches(model, "synthetic", 16, 16, seed=2)
    a = bn_inversion(model, start, steps=20, seed=5)
    b = bn_inversion(model, start, steps=20, seed=5)
    assert np.array_equal(a[0]["input"], b[0]["input"])


def test_priors_keep_inputs_smaller_and_smoother():
    model = _model()
    start = calibration_batches(model, "synthetic", 16, 16, seed=0)
    plain = bn_inversion(model, start, steps=40)[0]["input"]
    prior = bn_inversion(model, start, steps=40, tv=5.0, l2=5.0)[0]["input"]
    tv = lambda x: np.abs(np.diff(x, axis=-1)).mean() + np.abs(np.diff(x, axis=-2)).mean()
    assert tv(prior) < tv(plain) and np.square(prior).mean() < np.square(plain).mean()


def test_model_without_bn_is_one_line_error():
    b = Builder()
    x = b.input(["batch", 3, 8, 8])
    b.output(b.op("Relu", [b.conv(x, 3, 4)]))
    model = b.model()
    feeds = calibration_batches(model, "synthetic", 4, 4)
    for call in (lambda: bn_inversion(model, feeds, steps=2), lambda: bn_match_error(model, feeds)):
        with pytest.raises(SpaError) as info:
            call()
        assert "\n" not in str(info.value) and "BatchNormalization" in str(info.value)
        assert "synthetic" in str(info.value)


def test_bad_arguments():
    model = _model()
    feeds = calibration_batches(model, "synthetic", 4, 4)
    assert bn_inversion(model, [], steps=3) == []
    with pytest.raises(SpaError):
        bn_inversion(model, feeds, steps=-1)
    with pytest.raises(SpaError):
        bn_inversion(model, [{"other": feeds[0]["input"]}], steps=1)


# ---------------------------------------------------------------------------------------------
# output-targeted inversion
# ---------------------------------------------------------------------------------------------
def _classifier(classes=5, softmax=True, identity=False, mask=False):
    """x [N, 3, 8, 8] -> Conv -> Relu -> Conv -> Relu -> GAP -> Flatten -> Gemm [-> Softmax
    [-> Identity]]: no BatchNormalization."""
    b = Builder(seed=4)
    x = b.input(["batch", 3, 8, 8])
    if mask:
        m = b.input(["batch", 1, 8, 8], "mask", TensorProto.INT64)
        x = b.op("Mul", [x, b.op("Cast", [m], to=TensorProto.FLOAT)])
    y = b.op("Relu", [b.conv(b.op("Relu", [b.conv(x, 3, 6)]), 6, 8)])
    y = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [y])]), 8, classes)
    if softmax:
        y = b.op("Softmax", [y], axis=-1)
    if identity:
        y = b.op("Identity", [y])
    b.output(y)
    return b.model()


def _recognizer(classes=7, steps=6):
    """x [N, 3, 4, 2*steps] -> Conv -> Relu -> ReduceMean(H) -> stride-2 Conv -> Transpose ->
    MatMul -> Add -> Softmax(axis 2): CTC-like [N, T, C] probabilities."""
    b = Builder(seed=5)
    x = b.input(["batch", 3, 4, 2 * steps])
    y = b.op("Relu", [b.conv(x, 3, 8)])
    y = b.op("ReduceMean", [y], axes=[2], keepdims=0)  # [N, 8, W]
    y = b.op("Conv", [y, b.weight(8, 8, 2)], strides=[2])  # [N, 8, T]
    y = b.op("Transpose", [y], perm=[0, 2, 1])
    y = b.op("Add", [b.op("MatMul", [y, b.weight(8, classes)]), b.weight(classes)])
    b.output(b.op("Softmax", [y], axis=2))
    return b.model()


def _probs(model, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def test_output_targets_become_the_prediction_without_any_bn():
    model = _classifier()
    start = calibration_batches(model, "synthetic", 32, 16, seed=0)
    messages = []
    out = invert(model, start, steps=60, lr=0.1, classes=[2], progress=messages.append)
    before, after = _probs(model, start)[:, 2].mean(), _probs(model, out)[:, 2].mean()
    assert after > 0.9 and after > before + 0.5, (before, after)
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert "random targets" in messages[0] and "logits" in messages[0] and "BatchNorm" not in messages[0]
    assert [list(f) for f in out] == [list(f) for f in start]
    for got, was in zip(out, start):
        assert got["input"].shape == was["input"].shape and got["input"].dtype == was["input"].dtype
    assert np.array_equal(start[0]["input"], calibration_batches(model, "synthetic", 32, 16, seed=0)[0]["input"])


def test_random_targets_per_sample_are_reached_and_read_from_probabilities():
    model = _classifier(identity=True)  # Softmax -> Identity: the output is read as probabilities
    start = calibration_batches(model, "synthetic", 32, 32, seed=1)
    messages = []
    out = invert(model, start, steps=60, lr=0.1, progress=messages.append)
    assert "probabilities" in messages[0]
    begin = float(messages[0].split("target probability ")[1].split(",")[0].split(";")[0])
    end = float(messages[1].split("target probability ")[1].split(" ")[0].rstrip(","))
    assert end > 0.8 and end > begin + 0.4, messages
    # the targets are spread over the classes: the predictions are too
    assert len(set(_probs(model, out).argmax(1))) >= 4


def test_ctc_targets_on_a_sequence_output():
    model = _recognizer()
    start = calibration_batches(model, "synthetic", 16, 8, seed=0)
    messages = []
    out = invert(model, start, steps=60, lr=0.1, blank=0, progress=messages.append)
    assert "ctc targets" in messages[0] and "[6, 7]" in messages[0], messages
    begin = float(messages[0].split("target probability ")[1].split(",")[0].split(";")[0])
    end = float(messages[1].split("target probability ")[1].split(" ")[0].rstrip(","))
    assert end > 0.8 and end > begin + 0.3, messages
    probs = _probs(model, out)
    assert probs.shape == (16, 6, 7)
    best = probs.argmax(-1)
    assert (best == 0).mean() >= 0.3 and (best != 0).any()  # blank-dominated alignments
    for mode in ("random", "entropy"):
        got = invert(model, start, steps=5, targets=mode, progress=messages.append)
        assert got[0]["input"].shape == start[0]["input"].shape
    assert "confidence" in messages[-1]


def test_integer_inputs_and_bn_term_together():
    model = _model(mask=True)  # BN layers and a rank-2 output (no Softmax: logits)
    start = calibration_batches(model, "synthetic", 16, 8, seed=1)
    messages = []
    out = invert(model, start, steps=40, bn_weight=1.0, output_weight=0.1, progress=messages.append)
    assert "3 BatchNorm layers" in messages[0] and "random targets" in messages[0]
    assert sum(bn_match_error(model, out)) * 2 < sum(bn_match_error(model, start))
    _assert_mask_passes_through(out, start)


def test_invert_is_deterministic_for_a_seed_with_augmentation_and_clip():
    model = _classifier()
    start = calibration_batches(model, "synthetic", 16, 16, seed=2)
    kwargs = dict(steps=15, jitter=1, flip=True, tv=0.1, l2=0.1, clip=(-1.5, 1.5))
    a, b = invert(model, start, seed=5, **kwargs), invert(model, start, seed=5, **kwargs)
    c = invert(model, start, seed=6, **kwargs)
    assert np.array_equal(a[0]["input"], b[0]["input"]) and not np.array_equal(a[0]["input"], c[0]["input"])
    assert np.abs(a[0]["input"]).max() <= 1.5


def test_without_class_output_bn_alone_or_one_line_error():
    b = Builder()
    x = b.input(["batch", 3, 8, 8])
    b.output(b.op("Relu", [b.conv(x, 3, 4)]))  # rank 4: not class scores, no BN
    plain = b.model()
    feeds = calibration_batches(plain, "synthetic", 4, 4)
    for call in (lambda: invert(plain, feeds, steps=2), lambda: invert(_classifier(), feeds, steps=2, output_weight=0)):
        with pytest.raises(SpaError) as info:
            call()
        assert "\n" not in str(info.value) and "BatchNormalization" in str(info.value)
    # BN layers but the output is not class scores: BN statistics only, said in a message
    b = Builder(seed=3)
    x = b.input(["batch", 3, 8, 8])
    b.output(b.op("Relu", [b.bn(b.conv(x, 3, 4), 4)]))
    bn_only = _with_real_statistics(b.model(), {"input": _real(64)})
    messages = []
    out = invert(bn_only, calibration_batches(bn_only, "synthetic", 8, 8), steps=30, progress=messages.append)
    assert "BatchNorm statistics only" in messages[0] and len(messages) == 3
    assert sum(bn_match_error(bn_only, out)) < sum(bn_match_error(bn_only, calibration_batches(bn_only, "synthetic", 8, 8)))


def test_invert_bad_arguments():
    model = _classifier()
    feeds = calibration_batches(model, "synthetic", 4, 4)
    assert invert(model, [], steps=3) == []
    for kwargs in (dict(steps=-1), dict(targets="nope"), dict(classes=[9]), dict(targets="ctc"),
                   dict(output="missing"), dict(bn_weight=-1)):
        with pytest.raises(SpaError) as info:
            invert(model, feeds, **{"steps": 1, **kwargs})
        assert "\n" not in str(info.value)
    b = Builder()
    tokens = b.input(["batch", 4], "ids", TensorProto.INT64)
    b.output(b.gemm(b.op("Cast", [tokens], to=TensorProto.FLOAT), 4, 3))
    ints = b.model()
    with pytest.raises(SpaError, match="no float input"):
        invert(ints, [{"ids": np.zeros((2, 4), np.int64)}], steps=1)


# ---------------------------------------------------------------------------------------------
# converter: pools over inputs shorter than the window (PP-OCRv4's recognizer)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,height,ceil,include", [("AveragePool", 1, 0, 0), ("AveragePool", 2, 0, 0),
                                                    ("AveragePool", 2, 0, 1), ("AveragePool", 1, 1, 0),
                                                    ("MaxPool", 2, 0, 0), ("AveragePool", 7, 0, 0)])
def test_pool_over_an_input_shorter_than_its_window_matches_onnxruntime(op, height, ceil, include):
    """onnxruntime gives one output where the input is shorter than the kernel by less than a
    stride (C truncation toward zero in its output size), torch none: the module pads."""
    b = Builder()
    x = b.input(["batch", 4, height, 6])
    attrs = dict(kernel_shape=[3, 2], strides=[3, 2], pads=[0, 0, 0, 0], ceil_mode=ceil)
    if op == "AveragePool":
        attrs["count_include_pad"] = include
    b.output(b.op(op, [b.conv(x, 4, 4)], **attrs))
    model = b.model()
    feed = {"input": np.random.default_rng(0).standard_normal((2, 4, height, 6)).astype(np.float32)}
    module = from_onnx(model, inputs=feed)  # raises beyond 1e-4 of onnxruntime
    assert tuple(module(torch.tensor(feed["input"])).shape) == (2, 4, max(1, height // 3), 3)


# ---------------------------------------------------------------------------------------------
# the "inverted" calibration source (spa.calibration entry point)
# ---------------------------------------------------------------------------------------------
def test_inverted_source_matches_bn_statistics_and_is_generated():
    from spa.calibration import is_generated

    model = _model()
    messages = []
    inverted = calibration_batches(model, "inverted", 32, 16, seed=0, progress=messages.append)
    synthetic = calibration_batches(model, "synthetic", 32, 16, seed=0)
    assert [b["input"].shape for b in inverted] == [b["input"].shape for b in synthetic]
    assert sum(bn_match_error(model, inverted)) * 3 < sum(bn_match_error(model, synthetic))
    assert any("3 BatchNorm layers" in m for m in messages) and is_generated("inverted")


def test_inverted_source_without_bn_targets_the_outputs():
    messages = []
    out = calibration_batches(_classifier(), "inverted", 16, 16, progress=messages.append)
    assert out[0]["input"].shape == (16, 3, 8, 8) and any("random targets" in m for m in messages)


def test_inverted_source_refuses_token_models_with_one_line():
    b = Builder()
    ids = b.input(["batch", 4], "ids", TensorProto.INT64)
    b.output(b.op("Gather", [b.weight(10, 3), ids]))
    with pytest.raises(SpaError) as info:
        calibration_batches(b.model(), "inverted", 4, 4)
    assert "\n" not in str(info.value) and "float inputs" in str(info.value)


def test_default_calibration_inverts_bn_models_when_affordable(monkeypatch):
    import spa.pipeline as pipeline
    from spa.calibration import Calibration

    said = []
    chosen = pipeline.default_source(_model(), Calibration(), said.append)
    assert chosen.source == "inverted" and chosen.samples >= 16 and "inverted" in said[-1]
    assert pipeline.default_source(_classifier(), Calibration(), said.append).source == "synthetic"  # no BN
    assert pipeline.default_source(_model(), Calibration(source="synthetic")).source == "synthetic"
    monkeypatch.setattr(pipeline, "INVERSION_MACS", 1e3)
    assert pipeline.default_source(_model(), Calibration(), said.append).source == "synthetic"
    assert "TMACs" in said[-1] and "--calibration inverted" in said[-1]


def test_default_calibration_takes_synthetic_inputs_when_the_inversion_is_too_slow_or_fails(monkeypatch):
    import spa.pipeline as pipeline
    from spa.calibration import Calibration

    with pytest.raises(SpaError, match="would take about"):  # told after its first step
        calibration_batches(_model(), Calibration(source="inverted", samples=16, time_limit=1e-9))
    monkeypatch.setattr(pipeline, "INVERSION_SECONDS", 1e-9)
    said = []
    cal, fit, held = pipeline.calibration_inputs(_model(), Calibration(), said.append)
    assert cal.source == "synthetic" and fit and held
    assert any(m.startswith("calibration: synthetic after all (the inversion did not run: invert: 50 steps would")
               for m in said)
    with pytest.raises(SpaError, match="would take about"):  # inverted asked for: no fallback
        pipeline.calibration_inputs(_model(), Calibration(source="inverted", samples=16, time_limit=1e-9))


def test_an_inversion_over_its_time_limit_goes_on_with_the_batches_that_fit(monkeypatch):
    """The first step shows what all of them would take: the first batches that fit in the limit go on
    (announced, the rest dropped); where fewer than two would, SpaError."""
    import itertools
    import types

    import spa.frontends.torch_synthesis as synthesis
    from spa.calibration import Calibration

    clock = itertools.count()  # every reading of the clock one second later: a step takes 1 s, 50 steps 50 s
    monkeypatch.setattr(synthesis, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    feeds = calibration_batches(_model(), Calibration(source="synthetic", samples=128))
    said = []
    kept = synthesis.synthesise(_model(), feeds, progress=said.append, time_limit=25.0)
    assert len(feeds) == 8 and len(kept) == 4
    for got, start in zip(kept, feeds):
        assert got["input"].shape == start["input"].shape and not np.array_equal(got["input"], start["input"])
    assert any(m.startswith("invert: 50 steps of all 8 batches would take about 50 s") and
               "the first 4 go on (64 samples)" in m for m in said)
    with pytest.raises(SpaError, match="would take about 50 s on this machine, over the 10 s allowed"):
        synthesis.synthesise(_model(), feeds, time_limit=10.0)


def test_obspa_default_on_a_bn_model_inverts_its_calibration():
    from spa.pipeline import prune
    from spa.selection import Target

    said = []
    result = prune(_model(), Target(ratio=0.5), criterion="obspa", progress=said.append)
    assert any(m.startswith("calibration: inverted") for m in said)
    assert any(m.startswith("invert:") for m in said) and result.model is not None
