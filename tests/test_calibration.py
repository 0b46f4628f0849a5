"""Calibration sources for OBSPA: synthetic, none, bn, files, ood; bad sources give one line."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builder import Builder
from spa.calibration import calibration_batches
from spa.cli import main
from spa.errors import SpaError
from spa.runtime import run


def _cnn(with_bn=True, bn_first=False):
    b = Builder(seed=1)
    x = b.input(["batch", 3, 8, 8])
    if bn_first:
        x = b.bn(x, 3)
    y = b.conv(x, 3, 6)
    if with_bn:
        y = b.bn(y, 6)
    y = b.op("Relu", [y])
    y = b.conv(y, 6, 4)
    b.output(b.op("GlobalAveragePool", [y]))
    return b.model()


def _text_model():
    """input_ids -> embedding (vocab 37), token_type_ids -> type table (2), attention_mask."""
    b = Builder()
    ids = b.input(["batch", "sequence"], "input_ids", TensorProto.INT64)
    types = b.input(["batch", "sequence"], "token_type_ids", TensorProto.INT64)
    mask = b.input(["batch", "sequence"], "attention_mask", TensorProto.INT64)
    x = b.op("Add", [b.op("Gather", [b.weight(37, 8), b.op("Cast", [ids], to=TensorProto.INT64)]),
                     b.op("Gather", [b.weight(2, 8), types])])
    m = b.op("Unsqueeze", [b.op("Cast", [mask], to=TensorProto.FLOAT), b.const(np.array([-1]))])
    b.output(b.op("MatMul", [b.op("Mul", [x, m]), b.weight(8, 5)]))
    return b.model()


def _inputs(batches, name):
    return np.concatenate([f[name] for f in batches])


def test_none_gives_no_inputs():
    assert calibration_batches(_cnn(), "none") == []


def test_synthetic_is_gaussian_in_batches():
    batches = calibration_batches(_cnn(), "synthetic", samples=40, batch_size=16)
    assert [len(f["input"]) for f in batches] == [16, 16, 8]
    x = _inputs(batches, "input")
    assert x.shape == (40, 3, 8, 8) and x.dtype == np.float32
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05


def test_synthetic_text_inputs_are_valid_tokens():
    model = _text_model()
    batches = calibration_batches(model, "synthetic", samples=32, batch_size=32)
    ids = _inputs(batches, "input_ids")
    assert ids.shape == (32, 16) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 37 and len(np.unique(ids)) > 30  # the whole vocabulary
    assert np.all(_inputs(batches, "attention_mask") == 1)
    assert np.all(_inputs(batches, "token_type_ids") == 0)
    run(model, batches[0])


@pytest.mark.parametrize("bn_first", [False, True])
def test_bn_inputs_reproduce_the_first_batchnorm_statistics(bn_first):
    model = _cnn(bn_first=bn_first)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    mean, var = consts[bn.input[3]], consts[bn.input[4]]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.ValueInfoProto(name=bn.input[0]))
    x = _inputs(calibration_batches(model, "bn", samples=512, batch_size=512), "input")
    seen = run(probe, {"input": x})[-1]
    inner = seen[:, :, 1:-1, 1:-1] if not bn_first else seen  # border padding is not modelled
    got_mean = inner.mean(axis=(0, 2, 3))
    got_var = inner.var(axis=(0, 2, 3))
    if bn_first:
        np.testing.assert_allclose(got_mean, mean, atol=0.05)
        np.testing.assert_allclose(got_var, var, rtol=0.1)
    else:  # 6 statistics from 3 input channels: a least-squares fit, better than N(0, 1) inputs
        gauss = run(probe, {"input": np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)})[-1]
        gauss = gauss[:, :, 1:-1, 1:-1]
        assert np.abs(got_mean - mean).sum() < np.abs(gauss.mean(axis=(0, 2, 3)) - mean).sum()
        assert np.abs(np.log(got_var / var)).sum() < np.abs(np.log(gauss.var(axis=(0, 2, 3)) / var)).sum()


def test_bn_without_batchnorm_is_a_clear_error():
    with pytest.raises(SpaError, match="no BatchNormalization"):
        calibration_batches(_cnn(with_bn=False), "bn")


def test_npz_keyed_and_single_array(tmp_path):
    data = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "named.npz", input=data)
    np.savez(tmp_path / "single.npz", data)
    for f in ("named.npz", "single.npz"):
        batches = calibration_batches(_cnn(), str(tmp_path / f), samples=8, batch_size=4)
        np.testing.assert_array_equal(_inputs(batches, "input"), data[:8])


def test_npz_for_text_model_casts_integers(tmp_path):
    ids = np.arange(24, dtype=np.int32).reshape(4, 6)
    np.savez(tmp_path / "text.npz", input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=np.ones_like(ids))
    batches = calibration_batches(_text_model(), str(tmp_path / "text.npz"))
    assert batches[0]["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(batches[0]["input_ids"], ids)


def test_directory_of_npy(tmp_path):
    rng = np.random.default_rng(0)
    named, samples = tmp_path / "named", tmp_path / "samples"
    named.mkdir()
    samples.mkdir()
    np.save(named / "input.npy", rng.standard_normal((5, 3, 8, 8)).astype(np.float32))
    for k in range(3):  # one sample per file, and a file holding a batch of two
        np.save(samples / f"s{k}.npy", rng.standard_normal((3, 8, 8)).astype(np.float32))
    np.save(samples / "batch.npy", rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    assert len(_inputs(calibration_batches(_cnn(), str(named)), "input")) == 5
    assert len(_inputs(calibration_batches(_cnn(), str(samples)), "input")) == 5


def test_directory_of_images(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 13, 3), dtype=np.uint8)).save(tmp_path / f"im{k}.png")
    Image.fromarray(np.full((5, 5, 3), 255, dtype=np.uint8)).save(tmp_path / "white.jpg")
    batches = calibration_batches(_cnn(), str(tmp_path), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = _inputs(batches, "input")
    assert x.shape == (4, 3, 8, 8)
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_allclose(x[-1], 1.0, atol=1e-2)  # white.jpg sorts last: (1 - 0.5) / 0.5


def test_ood_noise_and_ood_path(tmp_path):
    x = _inputs(calibration_batches(_cnn(), "ood:noise-uniform", samples=16), "input")
    assert x.min() >= 0 and x.max() < 1 and abs(x.mean() - 0.5) < 0.05
    g = _inputs(calibration_batches(_cnn(), "ood:noise-gaussian", samples=64), "input")
    assert abs(g.std() - 2) < 0.1
    np.savez(tmp_path / "other.npz", input=np.ones((3, 3, 8, 8), dtype=np.float32))
    assert np.all(_inputs(calibration_batches(_cnn(), f"ood:{tmp_path / 'other.npz'}"), "input") == 1)


def _bad_sources(tmp_path):
    np.savez(tmp_path / "wrong_name.npz", pixels=np.zeros((2, 3, 8, 8), np.float32), other=np.zeros(2))
    np.savez(tmp_path / "wrong_rank.npz", input=np.zeros((2, 3, 8), np.float32))
    np.savez(tmp_path / "wrong_size.npz", input=np.zeros((2, 3, 9, 8), np.float32))
    np.savez(tmp_path / "wrong_dtype.npz", input=np.full((2, 3, 8, 8), "a"))
    np.savez(tmp_path / "no_samples.npz", input=np.zeros((0, 3, 8, 8), np.float32))
    np.savez(tmp_path / "nothing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.csv").write_text("1,2,3")
    return {
        "missing": (str(tmp_path / "missing.npz"), "neither"),
        "wrong_name": (str(tmp_path / "wrong_name.npz"), "no array for input input"),
        "wrong_rank": (str(tmp_path / "wrong_rank.npz"), "needs rank 4"),
        "wrong_size": (str(tmp_path / "wrong_size.npz"), "axis 2 must be 8"),
        "wrong_dtype": (str(tmp_path / "wrong_dtype.npz"), "needs float32"),
        "no_samples": (str(tmp_path / "no_samples.npz"), "no samples"),
        "nothing": (str(tmp_path / "nothing.npz"), "no arrays"),
        "garbage": (str(tmp_path / "garbage.npz"), "cannot be read"),
        "empty_dir": (str(tmp_path / "empty"), "no .npy or image files"),
        "csv": (str(tmp_path / "data.csv"), "expected .npz"),
        "ood_empty": ("ood:", "needs a kind"),
    }


def test_bad_sources_raise_one_line(tmp_path):
    for name, (source, message) in _bad_sources(tmp_path).items():
        with pytest.raises(SpaError, match=message) as err:
            calibration_batches(_cnn(), source)
        assert "\n" not in str(err.value), name


def test_float_data_for_token_ids_is_refused(tmp_path):
    f = np.zeros((2, 6), np.float32)
    np.savez(tmp_path / "t.npz", input_ids=f, token_type_ids=f, attention_mask=f)
    with pytest.raises(SpaError, match="needs int64"):
        calibration_batches(_text_model(), str(tmp_path / "t.npz"))


def test_cli_bad_calibration_exits_2_with_one_line(tmp_path, capsys):
    path, plain = tmp_path / "m.onnx", tmp_path / "no_bn.onnx"
    onnx.save(_cnn(), path)
    onnx.save(_cnn(with_bn=False), plain)
    sources = _bad_sources(tmp_path)
    for model, source in ((path, sources["wrong_size"][0]), (path, sources["missing"][0]), (plain, "bn")):
        rc = main(["prune", str(model), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5", "-q",
                   "--criterion", "obspa", "--calibration", source])
        err = capsys.readouterr().err
        assert rc == 2 and (err.startswith("spa: error: calibration") or "bn calibration" in err)
        assert err.count("\n") == 1
    rc = main(["prune", str(path), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5", "-q",
               "--criterion", "obspa", "--calibration-samples", "0"])
    assert rc == 2 and "positive" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()
