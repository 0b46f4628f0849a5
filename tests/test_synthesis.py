"""BN-statistics inversion (spa.frontends.torch_synthesis): inputs optimised so that every
BatchNormalization layer's batch statistics match its running statistics."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from builder import Builder
from spa.calibration import calibration_batches
from spa.errors import SpaError
from spa.frontends.torch_synthesis import bn_inversion, bn_match_error, bn_nodes

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
