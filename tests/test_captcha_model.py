"""ddddocr's trained captcha recognizer (common_old.onnx, `make install`): its [T, 1, K] logits, declared
[1, seqlen], read as a text recognizer's, so that the default calibration draws text lines for it; and the
evaluation bench_quality_real runs on it (models/captcha.py)."""
import importlib.util

import onnx
import pytest

from models.captcha import captcha_judge, captcha_path, captcha_set, read, truth_accuracy

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ddddocr") is None,
                                reason="ddddocr (the pretrained captcha recognizer) is not installed")


def test_the_recognizer_reads_drawn_captchas_and_agrees_with_itself():
    images, texts = captcha_set("in-distribution", 4, seed=1)
    assert [x.shape[:3] for x in images] == [(1, 1, 64)] * 4 and all(4 <= len(t) <= 6 for t in texts)
    assert truth_accuracy(captcha_path(), "in-distribution", count=20) >= 0.6  # measured 0.755 on 200
    judge = captcha_judge(captcha_path(), count=8)
    assert judge(onnx.load(captcha_path())) == {"in-distribution": 1.0, "shifted": 1.0}


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
