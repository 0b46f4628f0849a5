"""Two trained captcha recognizers from pip packages (`make install` installs both with --no-deps; only their
files are read), judged on captchas drawn here with Pillow, never seen by SPA's own generator
(`spa.calibration.text_lines`):

    ddddocr  ddddocr's `common_old.onnx`, the model `ddddocr.DdddOcr()` loads by default: a dynamically quantized
             CNN and bidirectional LSTM read by CTC over 8210 characters; a grey image 64 pixels high and of any
             width, pixels in [0, 1]; it gives [T, 1, K] logits although it declares [1, seqlen]
    crnn     captcha-whisperer's `captcha_crnn.onnx`: a CNN and an unrolled LSTM read by CTC over 0-9, A-Z and a
             blank (class 36); a 3x60x160 BGR image with pixels in [0, 255], not normalised; [20, N, 37] logits

The captchas:

    in-distribution  4-6 letters and digits, each in its own dark colour at its own height, on a light
                     background, at most one stray line
    shifted          2-5 stray lines across the letters, pixel noise and blur

`captcha_judge(original, name)` gives `evaluate(model) -> {kind: share of the captchas read exactly as the
original reads them}`; `truth_accuracy` the share a model reads as drawn, letter case aside (ddddocr lowers most
letters, the CRNN knows upper case only).
"""
from __future__ import annotations

import importlib.util
import os
import string

import numpy as np

from models.ocr import _session

HEIGHT = 64
LETTERS = string.ascii_letters + string.digits
CRNN_LABELS = string.digits + string.ascii_uppercase + "_"
CRNN_SIZE = (160, 60)  # width, height
BLANK = {"ddddocr": 0, "crnn": 36}


def captcha_path(name: str = "ddddocr") -> str:
    package, file = {"ddddocr": ("ddddocr", "common_old.onnx"),
                     "crnn": ("captcha_whisperer", os.path.join("models", "captcha_crnn.onnx"))}[name]
    spec = importlib.util.find_spec(package)  # found, not imported: ddddocr itself needs OpenCV
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed (make install)")
    path = os.path.join(spec.submodule_search_locations[0], file)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def charset(name: str = "ddddocr") -> list:
    """The characters of a recognizer's classes (its CTC blank: '')."""
    if name == "crnn":
        return list(CRNN_LABELS[:-1]) + [""]
    path = os.path.join(os.path.dirname(captcha_path()), "charsets.py")
    spec = importlib.util.spec_from_file_location("ddddocr_charsets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CHARSET_OLD


def captcha(rng, shifted: bool):
    """(a PIL RGB captcha, its text)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    text = "".join(rng.choice(list(LETTERS), int(rng.integers(4, 7))))
    size = int(rng.integers(28, 44))
    font = ImageFont.load_default(size=size)
    width, height = int(font.getlength(text) + rng.integers(10, 40)), int(size * 1.5)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(image)
    x = int(rng.integers(3, 15))
    for char in text:
        draw.text((x, int(rng.integers(0, max(1, height - size)))), char, font=font,
                  fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
        x += int(font.getlength(char) + rng.integers(-2, 4))
    for _ in range(int(rng.integers(2, 6) if shifted else rng.integers(0, 2))):
        ends = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(ends, fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=int(rng.integers(1, 3)))
    if shifted:
        noisy = np.asarray(image, np.float32) + rng.normal(0, 20, (height, width, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    return image, text


def preprocess(image, name: str = "ddddocr") -> np.ndarray:
    """The recognizer's own preprocessing: ddddocr 64 pixels high keeping the aspect, grey, [0, 1],
    [1, 1, 64, W]; the CRNN stretched to 160x60, BGR, [0, 255], [1, 3, 60, 160]."""
    if name == "crnn":
        return np.ascontiguousarray(np.asarray(image.convert("RGB").resize(CRNN_SIZE), np.float32)[:, :, ::-1]
                                    .transpose(2, 0, 1))[None]
    image = image.resize((int(image.width * HEIGHT / image.height), HEIGHT)).convert("L")
    return (np.asarray(image, np.float32) / 255.0)[None, None]


def captcha_set(kind: str, count: int, seed: int = 0, name: str = "ddddocr") -> tuple[list, list]:
    """`count` captchas of `kind` ("in-distribution" or "shifted"), preprocessed for `name`, and their texts."""
    drawn = [captcha(np.random.default_rng([seed, k, kind == "shifted"]), kind == "shifted") for k in range(count)]
    return [preprocess(image, name) for image, _ in drawn], [text for _, text in drawn]


def calibration_images(count: int, seed: int, name: str = "ddddocr") -> np.ndarray:
    """`count` captchas, every other one shifted, preprocessed for `name` (ddddocr's stretched to 64x192), as a
    user's data: [count, C, H, W]."""
    drawn = [captcha(np.random.default_rng([seed, k]), k % 2 == 1)[0] for k in range(count)]
    return np.concatenate([preprocess(image if name == "crnn" else image.resize((192, HEIGHT)), name)
                           for image in drawn])


def read(run, x: np.ndarray, blank: int = 0) -> tuple:
    """The classes a model reads on one image: CTC greedy decoding (repeats merged, blanks dropped) of its
    [T, 1, K] (or [1, T, K]) scores."""
    scores = run.run(None, {run.get_inputs()[0].name: x})[0]
    classes = scores.argmax(-1).ravel()
    return tuple(int(c) for k, c in enumerate(classes) if c != blank and (k == 0 or c != classes[k - 1]))


def truth_accuracy(model, kind: str, count: int = 200, seed: int = 0, name: str = "ddddocr") -> float:
    """The share of `count` captchas of `kind` the recognizer `name` reads as drawn, letter case aside."""
    run, chars = _session(model), charset(name)
    images, texts = captcha_set(kind, count, seed, name)
    return float(np.mean([''.join(chars[c] for c in read(run, x, BLANK[name])).upper() == t.upper()
                          for x, t in zip(images, texts)]))


def captcha_judge(original, count: int = 200, seed: int = 0, name: str = "ddddocr"):
    """`evaluate(model) -> {kind: share of `count` captchas of each kind read as `original` (the recognizer
    `name`) reads them}`."""
    sets = {k: captcha_set(k, count, seed, name)[0] for k in ("in-distribution", "shifted")}
    run = _session(original)
    reference = {k: [read(run, x, BLANK[name]) for x in xs] for k, xs in sets.items()}

    def evaluate(model) -> dict:
        run = _session(model)
        return {kind: float(np.mean([read(run, x, BLANK[name]) == r for x, r in zip(xs, reference[kind])]))
                for kind, xs in sets.items()}

    return evaluate
