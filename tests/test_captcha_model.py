"""Two trained captcha recognizers (`make install`): ddddocr's common_old.onnx, whose [T, 1, K] logits, declared
[1, seqlen], read as a text recognizer's, so that the default calibration draws text lines for it, and
captcha-whisperer's CRNN, which reads lines only with pixels in [0, 255]; and the evaluation bench_quality_real
runs on them (models/captcha.py)."""
import importlib.util

import onnx
import pytest

from models.captcha import captcha_judge, captcha_path, captcha_set, read, truth_accuracy

needs_ddddocr = pytest.mark.skipif(importlib.util.find_spec("ddddocr") is None,
                                   reason="ddddocr (a pretrained captcha recognizer) is not installed")
needs_crnn = pytest.mark.skipif(importlib.util.find_spec("captcha_whisperer") is None,
                                reason="captcha-whisperer (a pretrained captcha recognizer) is not installed")


@needs_ddddocr
def test_the_recognizer_reads_drawn_captchas_and_agrees_with_itself():
    images, texts = captcha_set("in-distribution", 4, seed=1)
    assert [x.shape[:3] for x in images] == [(1, 1, 64)] * 4 and all(4 <= len(t) <= 6 for t in texts)
    assert truth_accuracy(captcha_path(), "in-distribution", count=20) >= 0.6  # measured 0.755 on 200
    judge = captcha_judge(captcha_path(), count=8)
    assert judge(onnx.load(captcha_path())) == {"in-distribution": 1.0, "shifted": 1.0}


@needs_ddddocr
def test_its_logits_read_text_lines_so_the_default_calibration_draws_them():
    from spa.calibration import Calibration, text_lines, with_judged_text
    from spa.runtime import session

    model = onnx.load(captcha_path())
    assert [len(o.type.tensor_type.shape.dim) for o in model.graph.output] == [2]  # [1, seqlen], as declared
    x = captcha_set("in-distribution", 1)[0][0]
    assert read(session(model, quiet=True), x)  # it reads the captcha from [T, 1, K] logits
    said = []
    cal = with_judged_text(model, Calibration(), said.append)
    assert cal.text_images == "lines" and text_lines.dictionary(model, cal.charset) is None, said
    assert len(said) == 1 and "gives class scores along a sequence, as a text recognizer's does" in said[0], said


@needs_crnn
def test_the_crnn_reads_captchas_in_0_255_and_the_default_calibration_draws_its_lines_so():
    from spa.calibration import LINE_SCALES, Calibration, with_judged_text

    path = captcha_path("crnn")
    images, _ = captcha_set("shifted", 2, name="crnn")
    assert images[0].shape == (1, 3, 60, 160) and images[0].max() > 100  # BGR pixels in [0, 255]
    assert truth_accuracy(path, "in-distribution", count=20, name="crnn") >= 0.6  # measured 0.785 on 200
    assert captcha_judge(path, count=4, name="crnn")(onnx.load(path)) == {"in-distribution": 1.0, "shifted": 1.0}
    said = []
    cal = with_judged_text(onnx.load(path), Calibration(), said.append)
    assert (cal.text_images, cal.mean, cal.std) == ("lines", *LINE_SCALES["[0, 255]"]), said
    assert len(said) == 1 and "too few at PaddleOCR's [-1, 1] or [0, 1]" in said[0], said
