"""Synthetic text lines for text recognizers (OCR): random strings in the model's own character set,
drawn with Pillow's built-in font, what OCR models are trained on where nobody has the data
(SynthText, TextRecognitionDataGenerator). No data: the characters come from the model. For text
detectors, pages: such lines placed down a plain page (`page`, `text_images="pages"`).

`spa.calibration` draws a recognizer's generated image inputs as such lines where the model carries
its dictionary (PaddleOCR / RapidOCR exports keep it in the metadata entry 'character', one
character a line) or the user names a dictionary file (`charset`, `--charset`). Only the characters
the font has glyphs for are drawn (Pillow's Aileron: Latin letters, digits, punctuation).
Measured against noise images in docs/obspa.md ("Text lines for text recognizers").
"""
from __future__ import annotations

import functools
import math
import os
import string

import numpy as np

from ..errors import SpaError, first_line

METADATA_KEY = "character"
MODES = ("lines", "pages", "documents", "tables")  # documents, tables: `documents.page`, `documents.table`
PAGED = ("pages", "documents", "tables")  # normalised as a detector's input (ImageNet's mean and std)
DRAWN = {"lines": "text lines", "pages": "pages of text lines", "documents": "document pages",
         "tables": "table images"}  # what each mode draws
TABLE_SIZE = (488, 488)  # a table structure recognizer's input where it declares none (SLANet's, tables fitted in)
LINE_SIZE = (48, 320)  # height, width of PaddleOCR v3/v4 recognizers' inputs: where a text recognizer declares none
PAGE_SIZE = (640, 640)  # a text detector's page where it declares none (PaddleOCR resizes pages to multiples of 32)
LATIN = tuple(string.ascii_letters + string.digits + string.punctuation)  # pages or lines without a dictionary
FONT_SIZES = tuple(range(12, 42, 2))  # pixels; lines are resized to the model's height afterwards
MIN_CONTRAST = 80                     # grey levels between ink and background
MAX_WORDS = 6
MAX_WORD = 9


def off(charset) -> bool:
    """Whether `charset` turns text images off ('none')."""
    return charset is not None and str(charset).strip().lower() == "none"


def mode(text_images: str | None, charset, has_dictionary: bool) -> str | None:
    """What generated images are drawn with: `text_images` ("lines" / "pages") where asked, else lines
    where there is a dictionary; None (noise) for charset 'none'."""
    if off(charset):
        return None
    return text_images or ("lines" if has_dictionary else None)


def dictionary(model, charset: str | None) -> tuple[list, str] | None:
    """(characters, where they come from) for text lines: the file `charset` names (one character a
    line, or a PaddleOCR `inference.yml` whose PostProcess holds a character_dict), none where it is
    'none', else the model's metadata entry 'character' where it holds one character a line."""
    if off(charset):
        return None
    if charset is not None and _is_config(charset):
        chars, where = _config_dictionary(charset), f"the character_dict of {charset}"
    elif charset is not None:
        try:
            with open(os.fspath(charset), encoding="utf-8") as f:
                chars = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SpaError(f"charset {charset} cannot be read ({type(exc).__name__}): a text file of one "
                           "character a line") from None
        where = f"the dictionary {charset}"
    else:
        meta = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in meta:
            return None
        chars, where = meta[METADATA_KEY].splitlines(), f"the model's metadata '{METADATA_KEY}'"
        if any(len(c.strip()) > 1 for c in chars):
            return None  # class labels (a PaddleClas orientation classifier's "0\n90\n180\n270"), not characters
    chars = [c for c in dict.fromkeys(chars) if len(c) == 1 and c.strip()]
    if chars:
        return chars, where
    if charset is None:
        return None  # metadata without characters: no dictionary, nothing asked for
    raise SpaError(f"charset: {where} holds no characters (one character a line)")


def _is_config(path) -> bool:
    return os.fspath(path).lower().endswith((".yml", ".yaml"))


def _config(path) -> dict:
    """A PaddleOCR / PaddleX `inference.yml` as a dict (read once while the file stays the same: a
    recognizer's, 6623 characters, takes 0.16 s); SpaError where it cannot be read as one."""
    try:
        stamp = os.stat(os.fspath(path)).st_mtime_ns
    except OSError as exc:
        raise SpaError(f"{path} cannot be read ({type(exc).__name__})") from None
    return _read_config(os.fspath(path), stamp)


@functools.lru_cache(maxsize=4)
def _read_config(path: str, stamp: int) -> dict:
    try:
        import yaml
    except ImportError:
        raise SpaError(f"{path}: reading a YAML config needs PyYAML (pip install pyyaml)") from None
    try:
        with open(os.fspath(path), encoding="utf-8") as f:
            config = yaml.load(f, Loader=yaml.BaseLoader)  # every scalar a string: characters such as ~ or 0
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaError(f"{path} cannot be read ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        raise SpaError(f"{path} is not valid YAML ({first_line(exc, 120)})") from None
    return config if isinstance(config, dict) else {}


def _post_process(path) -> dict:
    post = _config(path).get("PostProcess")
    return post if isinstance(post, dict) else {}


def _config_dictionary(path) -> list:
    chars = _post_process(path).get("character_dict")
    if not isinstance(chars, list):
        raise SpaError(f"charset {path}: its PostProcess holds no character_dict (a PaddleOCR recognizer's config)")
    return [c for c in chars if isinstance(c, str)]


def config_normalisation(path) -> tuple[tuple, tuple] | None:
    """(mean, std) for images of pixels in [0, 1] that a PaddleOCR config's PreProcess `NormalizeImage`
    describes ((pixel * scale - mean) / std on 0-255 pixels: mean / (255 scale), std / (255 scale)), or a
    PaddleDetection / PaddleX one's Preprocess NormalizeImage (`_detection_normalisation`); None
    where it has none (a recognizer's config normalises inside its resize); SpaError where its values are
    not finite numbers (std and scale above 0)."""
    try:
        config = _config(path)
        steps = config.get("PreProcess", {}).get("transform_ops", [])
    except (SpaError, AttributeError):
        return None
    detection = config.get("Preprocess")  # PaddleDetection / PaddleX: [{type: NormalizeImage, is_scale, ...}]
    for step in detection if isinstance(detection, list) else []:
        if isinstance(step, dict) and step.get("type") == "NormalizeImage":
            return _detection_normalisation(path, step)
    for step in steps if isinstance(steps, list) else []:
        normalise = step.get("NormalizeImage") if isinstance(step, dict) else None
        if isinstance(normalise, dict):
            try:
                scale = _fraction(normalise.get("scale", "1./255."))
                mean, std = ([float(v) for v in normalise[k]] for k in ("mean", "std"))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                mean = std = None
            unit = 255.0 * scale if mean is not None else float("nan")
            if not (math.isfinite(unit) and unit > 0 and mean and len(mean) == len(std)
                    and all(math.isfinite(v) for v in mean + std) and all(v > 0 for v in std)):
                raise SpaError(f"{path}: its NormalizeImage is not finite numbers with std and scale above 0 "
                               f"({_shown(normalise)})")
            return tuple(m / unit for m in mean), tuple(v / unit for v in std)
    return None


def _detection_normalisation(path, step: dict) -> tuple[tuple, tuple]:
    """(mean, std) for pixels in [0, 1] of a PaddleDetection NormalizeImage: pixels / 255 where `is_scale`,
    then (x - mean) / std where `norm_type` is mean_std (the default), nothing more where it is none."""
    scaled = str(step.get("is_scale", "true")).lower() == "true"
    unit = 1.0 if scaled else 1 / 255.0
    if str(step.get("norm_type", "mean_std")).lower() == "none":
        return (0.0,), (unit,)
    try:
        mean, std = ([float(v) * unit for v in step[k]] for k in ("mean", "std"))
    except (KeyError, TypeError, ValueError):
        mean = std = None
    if not (mean and len(mean) == len(std) and all(math.isfinite(v) for v in mean + std) and all(v > 0 for v in std)):
        raise SpaError(f"{path}: its NormalizeImage is not finite numbers with std above 0 "
                       f"(mean {step.get('mean')}, std {step.get('std')})")
    return tuple(mean), tuple(std)


def _shown(normalise: dict) -> str:
    return ", ".join(f"{k} {normalise.get(k)}" for k in ("mean", "std", "scale"))


def _fraction(text) -> float:
    """'1./255.', '0.00392157' or '1' as a number (PaddleOCR writes the scale as a fraction)."""
    top, _, bottom = str(text).partition("/")
    return float(top) / (float(bottom) if bottom else 1.0)


CONFIG_NAME = "inference.yml"  # PaddleOCR 3 / PaddleX exports: beside inference.onnx, pre- and post-processing
# what each says the model reads (SLANet's TableLabelDecode: tables of its HTML tokens)
POST_PROCESSES = {"DBPostProcess": "pages", "CTCLabelDecode": "lines", "TableLabelDecode": "tables"}


def config_beside(model_path) -> tuple[str, str] | None:
    """(text images, config path) from the PaddleOCR `inference.yml` beside a model file: "pages" for a
    text detector (PostProcess DBPostProcess), "lines" for a recognizer whose config holds its
    character_dict (CTCLabelDecode), "tables" for a table structure recognizer (TableLabelDecode),
    "documents" for a layout model whose label_list names parts of a document (PP-DocLayout's); None
    where there is no such config (or it says none of these, or cannot be read: it was not asked for)."""
    if not isinstance(model_path, (str, os.PathLike)):
        return None
    path = os.fspath(model_path)
    found = os.path.join(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
    if not os.path.isfile(found):
        return None
    try:
        post = _post_process(found)
    except SpaError:
        return None
    kind = POST_PROCESSES.get(post.get("name")) or _labelled_layout(found)
    if kind == "lines" and not isinstance(post.get("character_dict"), list):
        return None
    return (kind, found) if kind else None


def _labelled_layout(path) -> str | None:
    """"documents" where a PaddleDetection / PaddleX config (PP-DocLayout's) lists class labels (`label_list`)
    that name parts of a document, as a layout model's do (`documents.document_parts`)."""
    from .documents import MIN_PARTS, document_parts

    labels = _config(path).get("label_list")
    if isinstance(labels, list) and len(document_parts([str(v) for v in labels])) >= MIN_PARTS:
        return "documents"
    return None


@functools.lru_cache(maxsize=1)
def fonts() -> tuple:
    """Pillow's built-in scalable font at FONT_SIZES; SpaError where Pillow or its FreeType support
    is missing."""
    try:
        from PIL import ImageFont
        return tuple(ImageFont.load_default(size=s) for s in FONT_SIZES)
    except ImportError:
        raise SpaError("text lines need Pillow (pip install pillow)") from None
    except (TypeError, OSError) as exc:  # Pillow < 10.1, or built without FreeType
        raise SpaError(f"text lines need Pillow >= 10.1 with FreeType ({type(exc).__name__})") from None


@functools.lru_cache(maxsize=4)
def drawable(chars: tuple) -> list:
    """The characters the built-in font has a glyph for (not its missing-glyph box, not blank);
    cached: every calibration plan of a model asks (the recognizer's 6622 cost 0.3 s)."""
    font = fonts()[-1]
    missing = {bytes(font.getmask(c)) for c in ("\uffff", "\U0010fffd")}
    masks = {c: font.getmask(c) for c in chars if c.strip()}
    return [c for c, mask in masks.items() if mask.size[0] > 0 and bytes(mask) not in missing]


def text(rng, alphabet: list) -> str:
    """One to MAX_WORDS words: lower case, capitalised, upper case, digits or any characters of the
    alphabet, a fifth of them followed by a mark."""
    classes = [[c for c in alphabet if c.islower()], [c for c in alphabet if c.isupper()],
               [c for c in alphabet if c.isdigit()], [c for c in alphabet if not c.isalnum()]]
    lower, upper, digits, marks = (c or alphabet for c in classes)
    words = []
    for _ in range(rng.integers(1, MAX_WORDS + 1)):
        n, kind = int(rng.integers(1, MAX_WORD + 1)), rng.integers(5)
        pool = (lower, lower, upper, digits, alphabet)[kind]
        word = "".join(rng.choice(pool, n))
        if kind == 1:
            word = rng.choice(upper) + word
        if rng.random() < 0.2:
            word += rng.choice(marks)
        words.append(word)
    return " ".join(words)


def draw(rng, line: str, channels: int = 3):
    """`line` as a Pillow image ("RGB" or "L"): a random size of the built-in font, ink and background
    grey levels at least MIN_CONTRAST apart (either darker), a slight tint, tilt, blur and noise."""
    from PIL import Image, ImageDraw, ImageFilter

    font = fonts()[int(rng.integers(len(FONT_SIZES)))]
    left, top, right, bottom = font.getbbox(line)
    pad_x, pad_y = int(rng.integers(2, 20)), int(rng.integers(2, 12))
    size = (max(1, right - left) + 2 * pad_x, max(1, bottom - top) + 2 * pad_y)
    background = int(rng.integers(0, 256))
    contrast = int(rng.integers(MIN_CONTRAST, 256))
    darker = background - contrast >= 0 and (background + contrast > 255 or rng.random() < 0.5)
    ink = int(np.clip(background - contrast if darker else background + contrast, 0, 255))
    tint = rng.integers(-15, 16, size=3)
    image = Image.new("RGB", size, tuple(int(np.clip(background + t, 0, 255)) for t in tint))
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), line, font=font, fill=(ink, ink, ink))
    image = image.rotate(float(rng.uniform(-3, 3)), resample=Image.BILINEAR, fillcolor=image.getpixel((0, 0)))
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(0, 12), (size[1], size[0], 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image if channels == 3 else image.convert("L")


def lines(rng, count: int, alphabet: list, channels: int = 3, max_aspect: float | None = None) -> list:
    """`count` text-line images of random strings in `alphabet`, each cut to at most `max_aspect` times as wide
    as the font is high (`fitting`)."""
    return [draw(rng, fitting(text(rng, alphabet), max_aspect), channels) for _ in range(count)]


def fitting(line: str, max_aspect: float | None) -> str:
    """`line` without its last words (or, for one word, characters) while it is more than `max_aspect` times as
    wide as the built-in font is high."""
    font = fonts()[len(FONT_SIZES) // 2]
    size = FONT_SIZES[len(FONT_SIZES) // 2]
    while max_aspect is not None and len(line) > 1 and font.getlength(line) > max_aspect * size:
        line = line.rsplit(" ", 1)[0] if " " in line.strip() else line[:-1]
    return line


def page(rng, height: int, width: int, alphabet: list, channels: int = 3):
    """A `height` x `width` page as a Pillow image ("RGB" or "L"): a plain tinted background, lines drawn as
    `draw` does (each on its own background) from the top down at random places and gaps, a third of
    them scaled by 0.5-2.5x."""
    from PIL import Image

    background = int(rng.integers(0, 256))
    canvas = np.full((height, width, 3), background, np.float32) + rng.integers(-15, 16, size=3)
    canvas += rng.normal(0, rng.uniform(0, 6), (height, width, 3))
    y = int(rng.integers(0, 30))
    while y < height - 10:
        line = draw(rng, text(rng, alphabet))
        if rng.random() < 0.3:
            scale = rng.uniform(0.5, 2.5)
            line = line.resize((max(1, int(line.width * scale)), max(1, int(line.height * scale))), Image.BILINEAR)
        ink = np.asarray(line, np.float32)
        h, w = ink.shape[0], min(ink.shape[1], width)
        if h >= height - y:
            break
        x = int(rng.integers(0, width - w + 1))
        canvas[y:y + h, x:x + w] = ink[:, :w]
        y += h + int(rng.integers(0, 60))
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return image if channels == 3 else image.convert("L")


def map_outputs(model) -> list:
    """The outputs declared [N, 1, H, W]: one-channel maps, as a text detector's."""
    return [o.name for o in model.graph.output if len(o.type.tensor_type.shape.dim) == 4
            and o.type.tensor_type.shape.dim[1].dim_value == 1]


TEXT_PROBABILITY = 0.3     # a text map's pixel is text above this (DBNet's and PaddleOCR's threshold)
MARKED_PAGES = (0.01, 0.5)  # share of a generated page a text detector marks as text: some, not all of it
READ_LINES = 0.1           # share of a generated line's positions a text recognizer reads a character at, at least


def marked_share(maps: list) -> float:
    """The share of the pixels of one-channel probability `maps` over TEXT_PROBABILITY."""
    return float(np.mean(np.concatenate([np.ravel(m) for m in maps]) > TEXT_PROBABILITY))


def marks_text(on_pages: float, on_noise: float) -> bool:
    """Whether a map that marks the share `on_pages` of generated pages' pixels and `on_noise` of noise
    images' as text reads like a text detector's: some of the pages but far from all (MARKED_PAGES), and a
    tenth of that at most on noise (the PP-OCRv4 detector: 4-10 % of each page, none of any noise image)."""
    return MARKED_PAGES[0] <= on_pages <= MARKED_PAGES[1] and on_noise <= on_pages / 10


def sequence_outputs(model) -> list:
    """The outputs that may be a sequence of class scores, as a CTC text recognizer's: those declared
    [N, T, K] first, then those of no declared shape or of rank 1-2 whose last size is not fixed: such a
    declaration may be wrong (ddddocr's captcha recognizers declare [1, seqlen] and give [T, 1, K]; a
    classifier's [N, 1000] is left out). `reading_output` runs them to tell."""
    dims = [(list(o.type.tensor_type.shape.dim), o.name) for o in model.graph.output]
    return [name for d, name in dims if len(d) == 3] + \
        [name for d, name in dims if not d or (len(d) < 3 and not d[-1].HasField("dim_value"))]


def reading_output(model, feeds: dict) -> str | None:
    """The name of an output that gives, on one sample of `feeds`, a sequence of class scores
    (`class_sequence`); None where there is none. Only `sequence_outputs` are run for."""
    outputs = sequence_outputs(model)
    got = _on_one_sample(model, outputs, feeds)
    width = _image_width(np.asarray(next(iter(feeds.values())))) if len(feeds) == 1 else None
    return next((out for out, array in zip(outputs, got) if class_sequence(array, width)), None)


def class_sequence(array: np.ndarray, width: int | None) -> bool:
    """Whether `array`, one sample's output, reads as a sequence of scores over two classes or more:
    [N, T, K] rows of probabilities (in [0, 1], summing to 1: a CTC recognizer's after its softmax), or
    [1, T, K] / [T, 1, K] floating-point scores (logits, as ddddocr's give) whose length T follows the
    image's `width`, within one of it over 2, 4, ... 32 (a recognizer's sequence runs along the line; an
    image encoder's tokens tile the image)."""
    if array.ndim != 3 or array.shape[2] < 2:
        return False
    if np.all((array >= 0) & (array <= 1)) and np.allclose(array.sum(axis=2), 1, atol=1e-3):
        return True
    if width is None or not np.issubdtype(array.dtype, np.floating) or 1 not in array.shape[:2]:
        return False
    length = array.shape[1] if array.shape[0] == 1 else array.shape[0]
    return any(abs(length - width / 2 ** k) <= 1 for k in range(1, 6))


def _image_width(image: np.ndarray) -> int | None:
    """The width of an [N, C, H, W] or [N, H, W, C] image batch of 1 or 3 channels; None for other arrays."""
    if image.ndim != 4:
        return None
    return image.shape[3] if image.shape[1] in (1, 3) else image.shape[2] if image.shape[3] in (1, 3) else None


def most_likely(sequences: list) -> np.ndarray:
    """The most likely class at every position of `sequences` ([N, T, K] or [T, N, K] class scores), flattened."""
    return np.concatenate([np.ravel(m.argmax(axis=2)) for m in sequences])


def read_share(classes: np.ndarray, blank: int) -> float:
    """The share of positions whose most likely class (`most_likely`) is not `blank`."""
    return float(np.mean(classes != blank))


def blank_class(classes: np.ndarray) -> int:
    """The most frequent of `classes` (on noise images: a CTC recognizer's blank)."""
    return int(np.bincount(classes).argmax())


def reads_text(on_lines: float, on_noise: float) -> bool:
    """Whether a sequence output that reads a character (not its blank) at the share `on_lines` of the
    positions of generated text lines and `on_noise` of noise images' reads like a text recognizer's: at
    least READ_LINES of them, three times noise's at least (the PP-OCRv4 recognizer: 0.42-0.47 against
    0.06-0.10; ddddocr's captcha recognizers, over five seeds: 0.20-0.41 against 0.01-0.04)."""
    return on_lines >= READ_LINES and on_noise <= on_lines / 3


def text_map_output(model, feeds: dict) -> str | None:
    """The name of an output that is a one-channel map the size of the image input, with values in [0, 1]
    (a DBNet text detector's text probability map, as PaddleOCR's give), on one sample of `feeds`; None
    where there is none. Only declared [N, 1, H, W] outputs are run for."""
    outputs = map_outputs(model)
    image = np.asarray(next(iter(feeds.values())))[:1] if len(feeds) == 1 else None
    if image is None or image.ndim != 4 or image.shape[1] not in (1, 3):
        return None
    return next((out for out, array in zip(outputs, _on_one_sample(model, outputs, feeds))
                 if array.shape[2:] == image.shape[2:] and np.all((array >= 0) & (array <= 1))), None)


def _on_one_sample(model, outputs: list, feeds: dict) -> list:
    """`outputs` on the first sample of the one input in `feeds`; [] where there is none to run, or the run
    fails (these only judge: the calibration run itself reports failures)."""
    from ..runtime import session

    if not outputs or len(feeds) != 1:
        return []
    (name, image), = feeds.items()
    try:
        return session(model, quiet=True).run(outputs, {name: np.asarray(image)[:1]})
    except Exception:  # noqa: BLE001
        return []
