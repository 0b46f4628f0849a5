"""Synthetic text lines for text recognizers: the model's own dictionary (metadata or --charset),
half of each generated image batch, drawn only in characters the font has; bad charsets are one line.
Pages of such lines for text detectors (text_images="pages", --text-images pages)."""
import dataclasses

import numpy as np
import onnx
import pytest

from builder import Builder
from spa.calibration import (IMAGENET_MEAN, IMAGENET_STD, Calibration, calibration_batches, looking_beside, text_lines,
                             text_mode, with_text_config)
from spa.cli import main
from spa.errors import SpaError

pytest.importorskip("PIL")
CHARACTERS = "a\nb\nc\nK\n7\n中\n-\n"


def _recognizer(dictionary: str | None = CHARACTERS, nhwc=False, batchnorm=False):
    """An [N, 3, 32, W] (or NHWC) image model -> Conv (-> BN) -> Relu -> Conv -> GlobalAveragePool, its
    dictionary in the metadata as PaddleOCR exports keep it."""
    b = Builder(seed=4)
    x = b.input(["batch", 32, "width", 3] if nhwc else ["batch", 3, 32, "width"])
    if nhwc:
        x = b.op("Transpose", [x], perm=[0, 3, 1, 2])
    y = b.conv(x, 3, 8)
    if batchnorm:
        y = b.bn(y, 8)
    b.output(b.op("GlobalAveragePool", [b.conv(b.op("Relu", [y]), 8, 4)]))
    model = b.model()
    if dictionary is not None:
        onnx.helper.set_model_props(model, {"character": dictionary})
    return model


def _batches(model, messages=None, **options):
    say = messages.append if messages is not None else None
    cal = Calibration(source="synthetic", samples=16, batch_size=16, **options)
    return calibration_batches(model, cal, progress=say)


def test_the_dictionary_comes_from_the_metadata_a_file_or_nowhere(tmp_path):
    model = _recognizer()
    chars, where = text_lines.dictionary(model, None)
    assert chars == ["a", "b", "c", "K", "7", "中", "-"] and "metadata 'character'" in where
    keys = tmp_path / "keys.txt"
    keys.write_text("x\ny\ny\n\n", encoding="utf-8")
    assert text_lines.dictionary(model, str(keys)) == (["x", "y"], f"the dictionary {keys}")
    assert text_lines.dictionary(model, "none") is None
    assert text_lines.dictionary(_recognizer(None), None) is None
    assert text_lines.dictionary(_recognizer(" \n\n"), None) is None  # an empty entry: no dictionary
    assert text_lines.dictionary(_recognizer("0\n90\n180\n270"), None) is None  # a classifier's labels


def test_only_characters_the_font_draws_are_drawn():
    assert text_lines.drawable(("a", "K", "7", "-", "中", " ")) == ["a", "K", "7", "-"]


def test_half_of_each_generated_batch_is_text_lines_normalised_like_paddleocr():
    messages = []
    x = _batches(_recognizer(), messages, shapes={"input": (1, 3, 32, 96)})[0]["input"]
    assert x.shape == (16, 3, 32, 96) and x.dtype == np.float32
    noise, lines = x[:8], x[8:]
    assert np.allclose(noise.mean(axis=(2, 3)), 0, atol=1e-4) and np.allclose(noise.std(axis=(2, 3)), 1, atol=1e-3)
    assert lines.min() >= -1 and lines.max() <= 1
    assert all(np.ptp(line) > 0.3 for line in lines)  # ink on a background
    assert any("text lines" in m and "6 characters of the model's metadata 'character' (7 in all)" in m for m in messages), messages
    assert any("PaddleOCR's mean/std 0.5" in m for m in messages), messages


def test_text_lines_keep_their_aspect_and_are_right_padded_with_zero():
    x = _batches(_recognizer(), shapes={"input": (1, 3, 32, 1000)})[0]["input"][8:]
    assert np.all(x[:, :, :, -50:] == 0)  # a line of at most 6 words of 10 characters is narrower


def test_text_lines_follow_the_layout_the_seed_and_a_given_normalisation():
    nhwc = _batches(_recognizer(nhwc=True), shapes={"input": (1, 32, 64, 3)})[0]["input"]
    assert nhwc.shape == (16, 32, 64, 3) and np.all(nhwc[8:].min(axis=(1, 2, 3)) >= -1)
    model = _recognizer()
    same = [_batches(model, shapes={"input": (1, 3, 32, 64)}, seed=s)[0]["input"] for s in (0, 0, 1)]
    assert np.array_equal(same[0], same[1]) and not np.array_equal(same[0], same[2])
    unit = _batches(model, shapes={"input": (1, 3, 32, 64)}, mean=0.0, std=1.0)[0]["input"][8:]
    assert unit.min() >= 0 and unit.max() <= 1


def test_the_share_of_text_lines_is_the_calibrations_to_set():
    model = _recognizer()
    for share, lines in ((1.0, 16), (0.25, 4), (0.0, 0)):
        x = _batches(model, shapes={"input": (1, 3, 32, 64)}, line_share=share)[0]["input"]
        standardised = np.isclose(x.std(axis=(1, 2, 3)), 1, atol=1e-3) & np.isclose(x.mean(axis=(1, 2, 3)), 0, atol=1e-4)
        assert int((~standardised).sum()) == lines
    with pytest.raises(SpaError, match="line share must be between 0 and 1"):
        Calibration(line_share=1.5).check()


def test_charset_none_or_no_dictionary_leaves_noise_images():
    for model, charset in ((_recognizer(), "none"), (_recognizer(None), None)):
        messages = []
        x = _batches(model, messages, shapes={"input": (1, 3, 32, 64)}, charset=charset)[0]["input"]
        assert not any("text lines" in m for m in messages)
        assert np.allclose(x.std(axis=(2, 3)), 1, atol=1e-3)


def test_auto_calibration_of_a_recognizer_with_batchnorm_is_synthetic_text_lines():
    from spa.pipeline import default_source
    model, said = _recognizer(batchnorm=True), []
    assert text_mode(model, Calibration()) and not text_mode(model, Calibration(charset="none"))
    assert default_source(model, Calibration(), said.append).source == "synthetic"
    assert "text lines" in said[0]


def test_bad_charsets_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(SpaError, match="holds no characters"):
        text_lines.dictionary(_recognizer(), str(empty))
    with pytest.raises(SpaError, match="cannot be read"):
        text_lines.dictionary(_recognizer(), str(tmp_path / "missing.txt"))
    cjk = tmp_path / "cjk.txt"
    cjk.write_text("中\n文\n", encoding="utf-8")
    with pytest.raises(SpaError, match="draws none of the 2 characters"):
        _batches(_recognizer(), shapes={"input": (1, 3, 32, 64)}, charset=str(cjk))
    keys = tmp_path / "keys.txt"
    keys.write_text(CHARACTERS, encoding="utf-8")
    features = Builder(seed=6)
    features.output(features.op("MatMul", [features.input(["batch", 8]), features.weight(8, 4)]))
    with pytest.raises(SpaError, match="has no effect: the model has no image input of 1 or 3 channels"):
        calibration_batches(features.model(), Calibration(source="synthetic", charset=str(keys)))
    with pytest.raises(SpaError, match="charset .* has no effect with calibration"):
        calibration_batches(_recognizer(), Calibration(source="bn", charset=str(cjk)))


@pytest.mark.parametrize("command", ["prune", "sparsify"])
def test_cli_charset_flag(tmp_path, capsys, command):
    model = tmp_path / "rec.onnx"
    onnx.save(_recognizer(None), model)
    keys = tmp_path / "keys.txt"
    keys.write_text(CHARACTERS, encoding="utf-8")
    target = ["--ratio", "0.5"] if command == "prune" else ["--pattern", "2:4"]
    base = [command, str(model), "-o", str(tmp_path / "out.onnx"), *target, "--input-shape", "1x3x32x64"]
    assert main(base + ["--charset", str(keys), "--calibration-samples", "16"]) == 0
    share = "50%" if command == "prune" else "75%"  # OBS 2:4 masks take more lines (spa.sparse_obs)
    said = capsys.readouterr().err
    assert f"{share} of the synthetic images are text lines, random words in the 6 characters" in said, said
    for flags, message in ((["--charset", str(tmp_path / "nope.txt")], "no such file"),
                           (["--charset", str(keys), "--calibration", "none"], "--charset has no effect")):
        assert main(base + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("spa: error: ") and err.count("\n") == 1 and message in err, err


def test_a_recognizer_without_a_declared_size_gets_paddleocr_text_lines_48x320():
    b = Builder(seed=5)
    b.output(b.op("GlobalAveragePool", [b.conv(b.input(["batch", 3, "height", "width"]), 3, 4)]))
    model, messages = b.model(), []
    onnx.helper.set_model_props(model, {"character": CHARACTERS})
    assert _batches(model, messages)[0]["input"].shape == (16, 3, 48, 320)
    assert any("3x48x320, the text-line size of PaddleOCR's recognizers" in m for m in messages), messages
    assert _batches(model, charset="none")[0]["input"].shape == (16, 3, 224, 224)  # no dictionary, no lines


def test_image_mean_and_std_with_generated_inputs_only_for_text_lines():
    with pytest.raises(SpaError, match="have no effect with calibration synthetic on this model"):
        _batches(_recognizer(None), shapes={"input": (1, 3, 32, 64)}, mean=0.0)
    with pytest.raises(SpaError, match="have no effect with calibration synthetic"):
        _batches(_recognizer(), shapes={"input": (1, 3, 32, 64)}, std=2.0, charset="none")


def _detector(height="height", width="width", batchnorm=False):
    """An [N, 3, H, W] image model -> Conv (-> BN) -> Sigmoid: a text detector's probability map, no dictionary."""
    b = Builder(seed=7)
    y = b.conv(b.input(["batch", 3, height, width]), 3, 4)
    if batchnorm:
        y = b.bn(y, 4)
    b.output(b.op("Sigmoid", [b.conv(b.op("Relu", [y]), 4, 1)]))
    return b.model()


def test_a_page_is_lines_of_ink_on_a_plain_background():
    rng = np.random.default_rng(0)
    page = text_lines.page(rng, 96, 128, list("abcXYZ123"))
    assert page.mode == "RGB" and page.size == (128, 96)
    grey = np.asarray(page, np.float32).mean(axis=2)
    assert np.ptp(grey) >= text_lines.MIN_CONTRAST / 2  # ink (and line backgrounds) on the page
    assert text_lines.page(rng, 40, 50, list("ab"), channels=1).mode == "L"


def test_pages_for_a_detector_half_of_each_batch_in_latin_normalised_like_imagenet():
    messages = []
    x = _batches(_detector(), messages, text_images="pages", shapes={"input": (1, 3, 64, 96)})[0]["input"]
    assert x.shape == (16, 3, 64, 96)
    noise, pages = x[:8], x[8:]
    assert np.allclose(noise.std(axis=(2, 3)), 1, atol=1e-3)
    pixels = pages * np.array(IMAGENET_STD)[:, None, None] + np.array(IMAGENET_MEAN)[:, None, None]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and all(np.ptp(p) > 0.3 for p in pixels)
    assert any("pages of text lines, random words in the Latin letters" in m for m in messages), messages
    assert any("ImageNet's mean/std" in m for m in messages), messages
    with_keys = _batches(_recognizer(), text_images="pages", shapes={"input": (1, 3, 32, 64)}, messages=messages)
    assert with_keys[0]["input"].shape == (16, 3, 32, 64)
    assert any("pages of text lines" in m and "6 characters of the model's metadata" in m for m in messages), messages


def test_a_detector_without_a_declared_size_gets_640x640_pages_and_is_not_inverted():
    from spa.pipeline import default_source
    messages = []
    cal = Calibration(source="synthetic", samples=2, batch_size=2, text_images="pages")
    assert calibration_batches(_detector(), cal, progress=messages.append)[0]["input"].shape == (2, 3, 640, 640)
    assert any("3x640x640, a text page" in m for m in messages), messages
    assert _batches(_detector())[0]["input"].shape == (16, 3, 224, 224)  # no text asked for: noise at 224
    model, said = _detector(batchnorm=True), []
    assert text_mode(model, Calibration(text_images="pages")) == "pages" and not text_mode(model, Calibration())
    assert default_source(model, Calibration(text_images="pages"), said.append).source == "synthetic"
    assert "pages of text lines among its images" in said[0]


def test_lines_asked_for_without_a_dictionary_are_latin():
    messages = []
    x = _batches(_recognizer(None), messages, text_images="lines", shapes={"input": (1, 3, 32, 64)})[0]["input"]
    assert np.all(x[8:].min(axis=(1, 2, 3)) >= -1)
    assert any("text lines" in m and "Latin letters" in m for m in messages), messages


def test_the_clis_text_images_are_the_modes_the_calibration_draws():
    from spa.flags import TEXT_IMAGES
    assert TEXT_IMAGES == text_lines.MODES


def test_bad_text_images_are_one_line():
    with pytest.raises(SpaError, match="text images must be one of lines, pages"):
        Calibration(text_images="words").check()
    with pytest.raises(SpaError, match="text images pages and charset none contradict"):
        Calibration(text_images="pages", charset="none").check()
    features = Builder(seed=6)
    features.output(features.op("MatMul", [features.input(["batch", 8]), features.weight(8, 4)]))
    with pytest.raises(SpaError, match="text images pages has no effect: the model has no image input"):
        calibration_batches(features.model(), Calibration(source="synthetic", text_images="pages"))
    with pytest.raises(SpaError, match="text images lines has no effect with calibration bn"):
        calibration_batches(_detector(batchnorm=True), Calibration(source="bn", text_images="lines"))
    _batches(_detector(), shapes={"input": (1, 3, 32, 32)}, text_images="pages", mean=0.5)  # normalises pages


DETECTOR_CONFIG = """Global:
  model_name: PP-OCRv5_mobile_det
PreProcess:
  transform_ops:
  - DecodeImage: {img_mode: BGR}
  - NormalizeImage: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], scale: 1./255.}
PostProcess:
  name: DBPostProcess
  thresh: 0.2
"""
RECOGNIZER_CONFIG = """PreProcess:
  transform_ops:
  - RecResizeImg: {image_shape: [3, 48, 320]}
PostProcess:
  name: CTCLabelDecode
  character_dict:
  - a
  - b
  - 'K'
  - '7'
"""


def _exported(tmp_path, model, config):
    """`model` saved as PaddleOCR 3 exports it: inference.onnx with inference.yml beside it."""
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save(model, folder / "inference.onnx")
    if config is not None:
        (folder / "inference.yml").write_text(config, encoding="utf-8")
    return str(folder / "inference.onnx")


def test_a_paddleocr_config_beside_the_model_says_pages_or_lines(tmp_path):
    cases = ((DETECTOR_CONFIG, "pages"), (RECOGNIZER_CONFIG, "lines"), ("PostProcess:\n  name: CTCLabelDecode\n", None),
             ("Global: {}\n", None), ("PostProcess: [unclosed\n", None), (None, None))
    for k, (config, expected) in enumerate(cases):
        folder = tmp_path / f"case{k}"
        folder.mkdir()
        path = _exported(folder, _detector(), config)
        found = text_lines.config_beside(path)
        assert (found and found[0]) == expected, (config, found)
    config = tmp_path / "rec.yml"
    config.write_text(RECOGNIZER_CONFIG, encoding="utf-8")
    assert text_lines.dictionary(_recognizer(None), str(config)) == (["a", "b", "K", "7"],
                                                                     f"the character_dict of {config}")
    config.write_text(DETECTOR_CONFIG, encoding="utf-8")
    with pytest.raises(SpaError, match="holds no character_dict"):
        text_lines.dictionary(_recognizer(None), str(config))


def test_a_detector_exported_with_its_config_calibrates_on_pages_announced(tmp_path):
    from spa.calibration import asked, looking_beside

    path = _exported(tmp_path, _detector(), DETECTOR_CONFIG)
    found = looking_beside(Calibration(source="synthetic", samples=2, batch_size=2), path)
    assert found.text_found and found.text_images == "pages" and not asked(looking_beside(Calibration(), path))
    messages = []
    x = calibration_batches(onnx.load(path), found, progress=messages.append)[0]["input"]
    assert x.shape == (2, 3, 640, 640)
    assert any("the PaddleOCR config beside the model (inference.yml) says it is a text detector's" in m
               for m in messages), messages
    assert looking_beside(Calibration(charset="none"), path).text_images is None  # the opt-out looks no further
    assert looking_beside(Calibration(source="bn"), path).text_images is None  # bn draws no text
    features = Builder(seed=6)
    features.output(features.op("MatMul", [features.input(["batch", 8]), features.weight(8, 4)]))
    (tmp_path / "features").mkdir()
    other = _exported(tmp_path / "features", features.model(), DETECTOR_CONFIG)
    assert calibration_batches(onnx.load(other), looking_beside(Calibration(source="synthetic"), other))  # no refusal


def test_a_detector_config_s_normalize_image_normalises_its_pages_unless_given(tmp_path):
    """PaddleOCR's NormalizeImage, (pixel * scale - mean) / std on 0-255 pixels, read from the config
    beside the model; a given mean or std wins; no NormalizeImage (or one that is not numbers): ImageNet's."""
    halves = DETECTOR_CONFIG.replace("mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], scale: 1./255.",
                                     "mean: [127.5, 127.5, 127.5], std: [127.5, 127.5, 127.5], scale: 1")
    path = _exported(tmp_path, _detector(), halves)
    messages = []
    cal = looking_beside(Calibration(source="synthetic", samples=2, batch_size=2, image_size=(32, 48)), path)
    pages = calibration_batches(onnx.load(path), cal, progress=messages.append)[0]["input"][1:]
    assert np.all(pages >= -1 - 1e-5) and np.all(pages <= 1 + 1e-5) and np.ptp(pages) > 0.6  # (x - 0.5) / 0.5
    assert any("normalised as its NormalizeImage says (mean 0.5,0.5,0.5, std 0.5,0.5,0.5 of pixels in [0, 1])" in m
               for m in messages), messages
    assert not any("ImageNet's" in m for m in messages), messages
    given = with_text_config(_detector(), looking_beside(dataclasses.replace(cal, mean=(0.0,)), path))
    assert given.mean == (0.0,) and given.std == (0.5, 0.5, 0.5)
    assert text_lines.config_normalisation(path.replace("inference.onnx", "inference.yml")) == ((0.5,) * 3, (0.5,) * 3)
    yml = tmp_path / "rec.yml"
    yml.write_text(RECOGNIZER_CONFIG, encoding="utf-8")
    assert text_lines.config_normalisation(str(yml)) is None  # none: the defaults
    for k, bad in enumerate((halves.replace("127.5, 127.5]", "x, 127.5]"), halves.replace("scale: 1", "scale: 0/1"))):
        (tmp_path / f"bad{k}").mkdir()
        path = _exported(tmp_path / f"bad{k}", _detector(), bad)
        with pytest.raises(SpaError, match="its NormalizeImage is not finite numbers"):
            text_lines.config_normalisation(path.replace("inference.onnx", "inference.yml"))
        messages = []
        taken = with_text_config(_detector(), looking_beside(Calibration(source="synthetic"), path), messages.append)
        assert taken.mean is None and taken.std is None  # the defaults, said
        assert any("its NormalizeImage is not used" in m for m in messages), messages


def test_a_recognizer_exported_with_its_config_draws_its_character_dict(tmp_path, capsys):
    path = _exported(tmp_path, _recognizer(None), RECOGNIZER_CONFIG)
    assert main(["prune", path, "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5", "--input-shape", "1x3x32x64",
                 "--calibration-samples", "16"]) == 0
    said = capsys.readouterr().err
    assert "says it is a text recognizer's: text lines in its character_dict" in said, said
    assert "random words in the 4 characters of the character_dict of" in said, said


def test_a_config_whose_characters_the_font_cannot_draw_leaves_noise_said(tmp_path):
    from spa.calibration import looking_beside

    config = "PostProcess:\n  name: CTCLabelDecode\n  character_dict:\n  - 中\n  - 文\n"
    path = _exported(tmp_path, _recognizer(None), config)
    messages = []
    cal = looking_beside(Calibration(source="synthetic", samples=16, shapes={"input": (1, 3, 32, 64)}), path)
    x = calibration_batches(onnx.load(path), cal, progress=messages.append)[0]["input"]
    assert np.allclose(x.std(axis=(2, 3)), 1, atol=1e-3)  # noise images, no error
    assert any("draws none of the 2 characters" in m for m in messages), messages


def test_noise_images_for_a_model_whose_output_looks_like_a_text_map_say_pages_could_be_asked_for():
    from spa.pipeline import calibration_inputs

    def said(model, **options):
        messages = []
        cal = Calibration(source="synthetic", samples=16, dims={"height": 64, "width": 64}, **options)
        calibration_inputs(model, cal, messages.append, held_out=False)
        return [m for m in messages if "--text-images pages calibrates" in m]

    assert len(said(_detector())) == 1 and "one-channel map the size of the image" in said(_detector())[0]
    assert said(_detector(), text_images="pages") == []  # asked for already
    b = Builder(seed=7)
    b.output(b.conv(b.input(["batch", 3, "height", "width"]), 3, 1))  # a map, but not of probabilities
    assert said(b.model()) == []
    assert said(_recognizer(dictionary=None)) == []  # no map at all


def _with_statistics_of(model, batches):
    """`model` (one BatchNormalization) with running statistics measured on `batches` at the BN's input."""
    from onnx import numpy_helper
    from spa.activations import fetch

    model = onnx.ModelProto.FromString(model.SerializeToString())
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    x = np.concatenate([got[bn.input[0]] for got in fetch(model, [bn.input[0]], batches, desc=None)])
    x = x.astype(np.float64)
    moments = {bn.input[3]: x.mean(axis=(0, 2, 3)), bn.input[4]: x.var(axis=(0, 2, 3))}
    for t in model.graph.initializer:
        if t.name in moments:
            t.CopyFrom(numpy_helper.from_array(moments[t.name].astype(np.float32), t.name))
    return model


def test_batchnorm_statistics_mismatch_is_the_per_channel_distance_to_the_running_statistics():
    from spa.calibration import statistics_mismatch
    from spa.activations import fetch

    model = _detector(batchnorm=True)
    noise = _batches(model, shapes={"input": (1, 3, 32, 48)})[:2]
    fitted = _with_statistics_of(model, noise)
    assert statistics_mismatch(fitted, noise) == pytest.approx(0, abs=1e-5)  # the statistics it was given
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    stats = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    mean, var, eps = stats[bn.input[3]], stats[bn.input[4]], 1e-5
    x = np.concatenate([got[bn.input[0]] for got in fetch(model, [bn.input[0]], noise, desc=None)])
    x = x.astype(np.float64)
    brute = np.mean(np.abs(x.mean(axis=(0, 2, 3)) - mean) / np.sqrt(var + eps)
                    + np.abs(np.log((x.var(axis=(0, 2, 3)) + eps) / (var + eps))) / 2)
    assert statistics_mismatch(model, noise) == pytest.approx(brute, rel=1e-6)
    assert statistics_mismatch(_detector(), noise) is None  # no BatchNormalization


def test_pages_are_taken_for_a_text_map_model_whose_batchnorm_statistics_are_nearer_on_pages():
    from spa.calibration import JUDGED_IMAGES, with_judged_text

    shape = {"input": (1, 3, 64, 96)}
    generated = Calibration(source="synthetic", shapes=shape, samples=JUDGED_IMAGES, batch_size=JUDGED_IMAGES,
                            text_images="pages")
    # running statistics of the very images the judge draws (seed 0): 0 for those, more for the others
    pages = calibration_batches(_detector(), dataclasses.replace(generated, line_share=1.0))
    noise = calibration_batches(_detector(), dataclasses.replace(generated, line_share=0.0))
    on_pages = _with_statistics_of(_detector(batchnorm=True), pages)
    on_noise = _with_statistics_of(_detector(batchnorm=True), noise)

    def judged(model, **options):
        messages = []
        cal = with_judged_text(model, Calibration(**{"source": "synthetic", "shapes": shape, **options}),
                                messages.append)
        return cal.text_images, messages

    for source in ("synthetic", "auto"):
        taken, said = judged(on_pages, source=source)
        assert taken == "pages" and len(said) == 1 and "nearer on pages than on noise" in said[0], said
    from spa.pipeline import calibration_inputs
    cal, fit, _ = calibration_inputs(on_pages, Calibration(shapes=shape, samples=16), held_out=False)
    assert cal.source == "synthetic" and cal.text_images == "pages"  # auto: pages, not an inversion
    assert np.allclose(fit[0]["input"][:8].std(axis=(2, 3)), 1, atol=1e-3)  # half noise, half pages
    assert not np.allclose(fit[0]["input"][8:].std(axis=(2, 3)), 1, atol=1e-3)
    taken, said = judged(on_noise)
    assert taken is None and len(said) == 1 and "on pages against" in said[0], said  # both figures, said
    assert "--text-images pages calibrates" in said[0] and "of generated pages as text" in said[0]
    taken, said = judged(_detector())  # no BatchNorm to tell: suggested, not taken
    assert taken is None and len(said) == 1 and "--text-images pages calibrates" in said[0], said
    assert "BatchNorm" not in said[0]
    assert text_lines.marks_text(0.05, 0.0) and not text_lines.marks_text(0.05, 0.01)  # noise marked too
    assert not text_lines.marks_text(0.005, 0.0) and not text_lines.marks_text(0.6, 0.0)  # hardly any / all of a page
    assert text_lines.reads_text(0.42, 0.10) and not text_lines.reads_text(0.42, 0.2)  # noise read too
    assert not text_lines.reads_text(0.05, 0.0)  # hardly any character on text lines
    for options in ({"charset": "none"}, {"source": "bn"}, {"text_images": "lines"}):
        assert judged(on_pages, **options) == (options.get("text_images"), [])  # asked for otherwise
    assert judged(_recognizer(dictionary=None)) == (None, [])  # no one-channel map
    b = Builder()
    scores = b.op("Conv", [b.input(["batch", 3, "height", "width"]), b.const(np.zeros((5, 3, 1, 1), np.float32)),
                           b.const(np.array([4, 0, 0, 0, 0], np.float32))])  # class 0 wherever it looks
    sequence = b.op("Transpose", [b.op("ReduceMean", [scores], axes=[2], keepdims=0)], perm=[0, 2, 1])
    b.output(b.op("Softmax", [sequence], axis=2))
    assert judged(b.model()) == (None, [])  # a sequence of probabilities that reads nothing: no sign of text


def test_a_sequence_of_class_scores_is_probabilities_or_logits_along_the_image_width():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 28, 50)).astype(np.float32)  # a 224-wide line read every 8 pixels
    assert text_lines.class_sequence(logits, 224) and text_lines.class_sequence(logits.transpose(1, 0, 2), 224)
    assert text_lines.class_sequence(logits, 226) and text_lines.class_sequence(logits, 112)  # within one of W/2^k
    assert not text_lines.class_sequence(logits, None)  # no image width to follow
    tokens = rng.normal(size=(1, 197, 768)).astype(np.float32)  # a ViT's patch tokens tile a 224x224 image
    assert not text_lines.class_sequence(tokens, 224)
    assert not text_lines.class_sequence(logits.astype(np.int64), 224)  # not scores
    assert not text_lines.class_sequence(rng.normal(size=(2, 28, 50)), 224)  # no batch axis of one sample
    assert not text_lines.class_sequence(logits[:, :, :1], 224) and not text_lines.class_sequence(logits[0], 224)
    probabilities = np.exp(tokens) / np.exp(tokens).sum(axis=2, keepdims=True)
    assert text_lines.class_sequence(probabilities, 224)  # rows of probabilities whatever their length
    assert text_lines._image_width(np.zeros((1, 1, 64, 160))) == 160
    assert text_lines._image_width(np.zeros((1, 64, 160, 3))) == 160
    assert text_lines._image_width(np.zeros((1, 64, 160))) is None


def test_outputs_declared_of_another_rank_are_run_to_tell_a_sequence_of_scores():
    # as ddddocr's captcha recognizers: [T, 1, K] logits declared [1, seqlen]
    b = Builder()
    x = b.input(["batch", 1, 64, "width"])
    columns = b.op("ReduceMean", [b.conv(x, 1, 6, k=1, strides=[8, 8])], axes=[2], keepdims=0)  # [N, 6, W/8]
    b.output(b.op("Transpose", [columns], perm=[2, 0, 1]))  # [W/8, N, 6]
    b.output(b.op("ReduceMean", [x], axes=[1, 2, 3], keepdims=1))  # [N, 1, 1, 1]: no map of the image's size
    model = b.model()
    sequence = model.graph.output[0].name
    declared = onnx.helper.make_tensor_value_info(sequence, onnx.TensorProto.FLOAT, [1, "seqlen"])  # wrong
    model.graph.output[0].CopyFrom(declared)
    assert text_lines.sequence_outputs(model) == [sequence]  # rank 2 declared; the rank-4 output is no sequence
    classes = onnx.helper.make_tensor_value_info(sequence, onnx.TensorProto.FLOAT, ["batch", 6])
    as_classifier = onnx.ModelProto()
    as_classifier.CopyFrom(model)
    as_classifier.graph.output[0].CopyFrom(classes)
    assert text_lines.sequence_outputs(as_classifier) == []  # [N, K] with K fixed: a classifier's, not run
    feeds = {"input": np.random.default_rng(0).normal(size=(2, 1, 64, 160)).astype(np.float32)}
    assert text_lines.reading_output(model, feeds) == sequence
    feeds = {"input": feeds["input"][:, :, :, :88]}  # 11 positions: width / 8, as before
    assert text_lines.reading_output(model, feeds) == sequence


def _reads_bright_columns():
    """[N, 3, 32, W] -> [W/8, N, 2] logits: class 1 (a character) where an 8-pixel column's mean is over 50,
    class 0 (the blank) elsewhere; it reads lines with pixels in [0, 255] only, as captcha-whisperer's CRNN."""
    b = Builder()
    x = b.input(["batch", 3, 32, "width"])
    means = b.op("ReduceMean", [b.op("AveragePool", [x], kernel_shape=[32, 8], strides=[32, 8])], axes=[1])
    blank = b.op("Add", [b.op("Mul", [means, b.const(np.zeros(1, np.float32))]), b.const(np.full(1, 50, np.float32))])
    scores = b.op("Squeeze", [b.op("Concat", [blank, means], axis=1), b.const(np.array([2]))])
    b.output(b.op("Transpose", [scores], perm=[2, 0, 1]))
    return b.model()


def test_lines_not_read_at_paddleocrs_scale_are_tried_in_0_1_and_0_255():
    from spa.calibration import LINE_SCALES, with_judged_text

    model = _reads_bright_columns()
    shape = {"input": (1, 3, 32, 160)}
    said = []
    cal = with_judged_text(model, Calibration(shapes=shape), said.append)
    assert (cal.text_images, cal.mean, cal.std) == ("lines", *LINE_SCALES["[0, 255]"]), said
    assert len(said) == 1 and "text lines with pixels in [0, 255] and 0% on noise" in said[0], said
    assert "too few at PaddleOCR's [-1, 1] or [0, 1]" in said[0]
    x = calibration_batches(model, cal)[0]["input"]
    assert x.max() > 200 and np.allclose(x[:8].std(axis=(1, 2, 3)), 1, atol=1e-3)  # lines in [0, 255], noise as ever
    for mean, std in (((0.5,), (0.5,)), ((0.0,), (1.0,))):  # a scale asked for is kept
        assert with_judged_text(model, Calibration(shapes=shape, mean=mean, std=std)).text_images is None


def test_a_line_is_cut_word_by_word_to_an_aspect():
    line = "alpha beta gamma delta epsilon"
    assert text_lines.fitting(line, None) == line and text_lines.fitting(line, 100) == line
    short = text_lines.fitting(line, 5)
    assert line.startswith(short) and " " in short and len(short.split()) < 5  # whole words dropped from the end
    assert text_lines.fitting("abcdefghijklmnop", 2) in ("ab", "abc", "abcd")  # one word: characters dropped


def test_generated_lines_are_cut_to_the_inputs_aspect_times_the_squeeze(monkeypatch):
    from spa.calibration import feeds

    asked = []
    monkeypatch.setattr(text_lines, "fitting", lambda line, max_aspect: asked.append(max_aspect) or line[:3])
    _batches(_recognizer(), shapes={"input": (1, 3, 32, 96)}, line_share=1.0)
    assert asked and set(asked) == {feeds.LINE_SQUEEZE * 96 / 32}
