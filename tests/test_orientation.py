"""Orientation classifiers (spa.calibration.orientation): text images turned in turn for their calibration
(--turns), and the judgement that gives them by default where a model's class follows the turn of generated ones."""
import importlib.util

import numpy as np
import pytest

from builder import Builder
from spa.calibration import Calibration, calibration_batches, orientation, with_judged_text
from spa.cli import main
from spa.errors import SpaError

pytest.importorskip("PIL")


def _classifier(classes=4, size=(64, 64)):
    """A random [1, 3, H, W] -> [1, classes] CNN: follows no turn."""
    b = Builder(seed=3)
    x = b.input(["N", 3, *size])
    pooled = b.op("GlobalAveragePool", [b.op("Relu", [b.conv(x, 3, 8)])])
    b.output(b.gemm(b.op("Flatten", [pooled]), 8, classes))
    return b.model()


def test_a_class_that_follows_every_turn_is_an_orientation_classifiers():
    upright = np.eye(4)[[0, 0, 0, 1]]  # three of four images upright in class 0
    scores = [np.roll(upright, t, axis=1) for t in range(4)]  # each quarter turn moves the class by one
    assert orientation.follows_turns(scores, 4) == (1.0, 0.75)
    assert orientation.is_orientation_classifier(*orientation.follows_turns(scores, 4))
    counter = [np.roll(upright, -t, axis=1) for t in range(4)]  # the other way round
    assert orientation.follows_turns(counter, 4)[0] == 1.0
    still = [upright] * 4  # the same class whatever the turn
    assert orientation.follows_turns(still, 4)[0] == 0.0
    half = [upright, np.roll(upright, 2, axis=1)]  # four classes judged on half turns only
    assert orientation.follows_turns(half, 2)[0] == 1.0
    two = [np.eye(2)[[0, 0, 0, 0]], np.eye(2)[[1, 1, 0, 1]]]
    assert orientation.follows_turns(two, 2) == (0.75, 1.0)
    assert not orientation.is_orientation_classifier(*orientation.follows_turns([upright, upright], 2))


def test_turns_go_round_in_turn_and_turn_a_picture_clockwise():
    assert [orientation.quarter_turns(i, 4) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [orientation.quarter_turns(i, 2) for i in range(4)] == [0, 2, 0, 2]
    assert [orientation.quarter_turns(i, 1) for i in range(3)] == [0, 0, 0]
    from PIL import Image
    image = Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert np.array_equal(np.asarray(orientation.turned(image, 1)), np.rot90(np.arange(6).reshape(2, 3), -1))
    assert np.array_equal(np.asarray(orientation.turned(image, 2)), np.rot90(np.arange(6).reshape(2, 3), 2))
    assert orientation.turned(image, 0) is image


def test_turned_pages_are_drawn_across_and_stood_up_to_fit_the_input():
    model, said = _classifier(size=(64, 96)), []
    drawn = lambda turns, say=None: calibration_batches(model, Calibration(  # noqa: E731
        source="synthetic", samples=8, batch_size=8, text_images="documents", turns=turns), progress=say)[0]["input"]
    quarters = drawn(4, said.append)
    assert quarters.shape == (8, 3, 64, 96)
    assert any("turned by 0, 90, 180 and 270 degrees in turn" in m for m in said), said
    upright, halves = drawn(1), drawn(2)  # the same pages drawn, every other one turned by 180 degrees
    assert np.allclose(halves[0::2], upright[0::2]) and np.allclose(halves[1::2], upright[1::2, :, ::-1, ::-1])
    assert np.allclose(quarters[0], upright[0]) and not np.allclose(quarters[1], upright[1])


def test_turns_that_cannot_take_effect_are_refused():
    model = _classifier()
    with pytest.raises(SpaError, match="turns 2 have no effect"):
        calibration_batches(model, Calibration(source="synthetic", samples=2, turns=2))  # noise: nothing to turn
    with pytest.raises(SpaError, match="text lines turn by 180 degrees only"):
        calibration_batches(model, Calibration(source="synthetic", samples=2, text_images="lines", turns=4))
    with pytest.raises(SpaError, match="calibration turns must be one of 1, 2, 4"):
        Calibration(turns=3).check()


def test_a_classifier_whose_class_follows_no_turn_keeps_upright_noise():
    said = []
    cal = with_judged_text(_classifier(4), Calibration(), said.append)
    assert cal.turns is None and cal.text_images is None and said == []
    assert with_judged_text(_classifier(6), Calibration(), said.append).turns is None  # six classes: not judged


@pytest.mark.skipif(importlib.util.find_spec("rapidocr_onnxruntime") is None, reason="rapidocr-onnxruntime not installed")
def test_the_text_line_direction_classifier_gets_half_its_lines_turned_by_default():
    import onnx
    from models.ocr import _packaged
    model = onnx.load(_packaged("ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    said = []
    cal = with_judged_text(model, Calibration(), said.append)
    assert (cal.text_images, cal.turns) == ("lines", 2), said
    assert "its class follows a half turn" in said[0] and "--turns 1 keeps them upright" in said[0]
    assert with_judged_text(model, Calibration(turns=1), said.append).turns == 1  # asked: not judged


def test_spa_prune_refuses_turns_its_calibration_never_draws(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    import onnx
    onnx.save(_classifier(), path)
    assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.25", "--criterion", "l1",
                 "--turns", "4"]) == 2
    assert "--turns has no effect with criterion l1" in capsys.readouterr().err
    assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.25", "--turns", "2"]) == 2
    assert "turns 2 have no effect" in capsys.readouterr().err
