"""Document pages for layout models (spa.calibration.documents): the labels that make a model one, the pages
drawn, and the calibration that takes them (--text-images documents, or by default where the labels say so)."""
import numpy as np
import onnx
import pytest

from builder import Builder
from spa.calibration import IMAGENET_MEAN, IMAGENET_STD, Calibration, calibration_batches, documents, with_judged_text
from spa.cli import main

pytest.importorskip("PIL")
CDLA = "text\ntitle\nfigure\nfigure_caption\ntable\ntable_caption\nheader\nfooter\nreference\nequation"
DOCLAYNET = repr({0: "Caption", 1: "Footnote", 2: "Formula", 3: "List-item", 4: "Page-footer", 5: "Page-header",
                  6: "Picture", 7: "Section-header", 8: "Table", 9: "Text", 10: "Title"})


def _layout_model(labels: dict | None = None, batch=1):
    """A [batch, 3, 64, 48] image model -> Conv -> Relu -> Conv, class labels in its metadata."""
    b = Builder(seed=5)
    x = b.input([batch, 3, 64, 48])
    b.output(b.conv(b.op("Relu", [b.conv(x, 3, 8)]), 8, 4))
    model = b.model()
    if labels:
        onnx.helper.set_model_props(model, labels)
    return model


def test_class_labels_come_from_paddledetection_or_ultralytics_metadata():
    assert documents.class_labels(_layout_model({"character": CDLA}))[:3] == ["text", "title", "figure"]
    assert documents.class_labels(_layout_model({"names": DOCLAYNET}))[-2:] == ["Text", "Title"]
    assert documents.class_labels(_layout_model({"character": "a\nb\n7"})) == []  # a recognizer's dictionary
    assert documents.class_labels(_layout_model({"names": "not a dict"})) == []
    assert documents.class_labels(_layout_model()) == []


def test_labels_naming_three_document_parts_make_a_layout_model():
    assert documents.names_document_parts(_layout_model({"character": CDLA}))[:4] == ["text", "title", "figure",
                                                                                      "caption"]
    parts = documents.names_document_parts(_layout_model({"names": DOCLAYNET}))
    assert {"caption", "footnote", "formula", "list", "page", "header", "picture", "section", "table"} <= set(parts)
    coco = repr({0: "person", 1: "bicycle", 2: "car", 3: "stop sign", 4: "book"})
    assert documents.names_document_parts(_layout_model({"names": coco})) == []
    assert documents.names_document_parts(_layout_model({"character": "0\n90\n180\n270"})) == []
    assert documents.names_document_parts(_layout_model({"names": repr({0: "table", 1: "text"})})) == []  # two


def test_a_document_page_is_dark_ink_on_light_paper_with_its_parts():
    rng = np.random.default_rng(0)
    pages = [np.asarray(documents.page(rng, 400, 300, list("abcdefghijKLM")), np.float32) for _ in range(4)]
    assert all(p.shape == (400, 300, 3) for p in pages)
    assert all(np.median(p) > 170 and p.min() < 100 for p in pages)  # paper, and ink on it
    assert len({float(p.sum()) for p in pages}) == 4
    grey = documents.page(np.random.default_rng(1), 120, 90, list("abc"), channels=1)
    assert grey.mode == "L" and grey.size == (90, 120)


def test_documents_are_every_generated_image_normalised_like_imagenet():
    messages = []
    cal = Calibration(source="synthetic", samples=4, batch_size=4, text_images="documents")
    x = np.concatenate([b["input"] for b in calibration_batches(_layout_model(), cal, progress=messages.append)])
    assert x.shape == (4, 3, 64, 48)
    pixels = x * np.array(IMAGENET_STD)[:, None, None] + np.array(IMAGENET_MEAN)[:, None, None]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and all(np.median(p) > 0.6 for p in pixels)
    assert any("100% of the synthetic images are document pages" in m and "dark on light (" in m
               for m in messages), messages


def test_the_text_share_holds_over_batches_of_one():
    # a static batch of one drew text every time (round(0.5) == 0 noise images a batch)
    cal = Calibration(source="synthetic", samples=6, batch_size=16, text_images="pages")
    spreads = [float(b["input"].std()) for b in calibration_batches(_layout_model(), cal)]
    noise = [abs(s - 1) < 1e-3 for s in spreads]  # noise images have unit variance
    assert len(spreads) == 6 and sum(noise) == 3


def test_a_model_whose_labels_name_document_parts_gets_documents_by_default_announced():
    model, said = _layout_model({"character": CDLA}), []
    cal = with_judged_text(model, Calibration(), said.append)
    assert cal.text_images == "documents" and len(said) == 1, said
    assert "document pages among the synthetic images: the model's class labels name parts of a document " \
           "(text, title, figure, caption" in said[0]
    for asked in (Calibration(charset="none"), Calibration(text_images="pages"), Calibration(source="bn")):
        assert with_judged_text(model, asked, said.append) == asked  # what is asked for stays
    assert with_judged_text(_layout_model(), Calibration(), said.append) == Calibration()  # no labels: noise


SLANET = "<thead>\n</thead>\n<tbody>\n</tbody>\n<tr>\n</tr>\n<td\n>\n</td>\n colspan=\"2\"\n rowspan=\"2\""


def _table_model():
    """An [N, 3, H, W] image model with SLANet's HTML table tokens as its labels."""
    b = Builder(seed=6)
    x = b.input(["batch", 3, "height", "width"])
    b.output(b.op("GlobalAveragePool", [b.conv(b.op("Relu", [b.conv(x, 3, 8)]), 8, 4)]))
    model = b.model()
    onnx.helper.set_model_props(model, {"character": SLANET})
    return model


def test_a_table_structure_recognizer_gets_table_images_fitted_into_488x488():
    model, said = _table_model(), []
    assert documents.writes_table_structure(model) and not documents.names_document_parts(model)
    assert not documents.writes_table_structure(_layout_model({"character": CDLA}))
    cal = with_judged_text(model, Calibration(), said.append)
    assert cal.text_images == "tables" and "HTML table rows and cells" in said[0], said
    messages = []
    batch = calibration_batches(model, Calibration(source="synthetic", samples=4, batch_size=4, text_images="tables"),
                                progress=messages.append)[0]["input"]
    assert batch.shape == (4, 3, 488, 488)
    assert any("input' has no declared height/width; synthetic images are 3x488x488, SLANet's table size" in m
               for m in messages), messages
    for image in batch:  # a table's aspect kept: padded with 0 on the right or at the bottom
        assert np.all(image[:, -1, :] == 0) or np.all(image[:, :, -1] == 0)
        assert image[:, 0, 0].max() > 1  # light paper at the top left, not padding
    for seed in range(4):  # as wide as its columns (3-9 characters of 11-20 px each), as tall as its rows
        table = documents.table(np.random.default_rng(seed), list("abcXYZ"))
        assert 60 <= table.width <= 1110 and 30 <= table.height <= 400, table.size


def test_spa_prune_takes_text_images_documents(tmp_path, capsys):
    path, out = tmp_path / "layout.onnx", tmp_path / "small.onnx"
    onnx.save(_layout_model(), str(path))
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.25", "--text-images", "documents",
                 "--calibration-samples", "8"]) == 0
    assert out.exists() and "document pages (a title, paragraphs, tables, figures)" in capsys.readouterr().err


PP_DOCLAYOUT_CONFIG = """mode: paddle
draw_threshold: 0.5
Global:
  model_name: PP-DocLayout-M
arch: GFL
Preprocess:
- interp: 2
  keep_ratio: false
  target_size: [640, 640]
  type: Resize
- is_scale: true
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  type: NormalizeImage
- type: Permute
label_list:
- paragraph_title
- image
- text
- number
- abstract
- content
- figure_title
- formula
- table
"""


def test_a_paddlex_layout_export_calibrates_on_document_pages_its_config_names(tmp_path):
    """PP-DocLayout's labels sit in the inference.yml beside it (`label_list`), not in the file's metadata; its
    Preprocess NormalizeImage (PaddleDetection's: is_scale, mean and std of pixels in [0, 1], or none) says how."""
    from spa.calibration import looking_beside
    from spa.calibration.text_lines import config_beside, config_normalisation

    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save(_layout_model(batch="N"), folder / "inference.onnx")
    (folder / "inference.yml").write_text(PP_DOCLAYOUT_CONFIG, encoding="utf-8")
    path, config = str(folder / "inference.onnx"), str(folder / "inference.yml")
    assert config_beside(path) == ("documents", config)
    assert config_normalisation(config) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    messages = []
    cal = looking_beside(Calibration(source="synthetic", samples=2, batch_size=2), path)
    x = calibration_batches(onnx.load(path), cal, progress=messages.append)[0]["input"]
    assert x.shape == (2, 3, 64, 48) and np.ptp(x) > 1
    assert any("says it is a layout model's (its label_list names parts of a document): document pages, normalised "
               "as its NormalizeImage says (mean 0.485,0.456,0.406" in m for m in messages), messages
    unscaled = PP_DOCLAYOUT_CONFIG.replace("is_scale: true", "is_scale: false").replace(
        "mean: [0.485, 0.456, 0.406]", "mean: [127.5, 127.5, 127.5]").replace("std: [0.229, 0.224, 0.225]",
                                                                             "std: [127.5, 127.5, 127.5]")
    (folder / "inference.yml").write_text(unscaled, encoding="utf-8")
    assert np.allclose(config_normalisation(config), ((0.5,) * 3, (0.5,) * 3))
    (folder / "inference.yml").write_text(unscaled.replace("- is_scale", "- norm_type: none\n  is_scale"),
                                          encoding="utf-8")
    assert np.allclose(config_normalisation(config), ((0.0,), (1 / 255,)))  # raw 0-255 pixels
    (folder / "inference.yml").write_text(PP_DOCLAYOUT_CONFIG.split("label_list")[0] + "label_list: [car, person]\n",
                                          encoding="utf-8")
    assert config_beside(path) is None  # a detector of other things: no pages
