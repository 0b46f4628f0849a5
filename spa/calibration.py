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
  images (the model carries its dictionary in its metadata, or `charset` names one): half text
  lines in its characters (`spa.text_lines`), normalised with PaddleOCR's mean and std 0.5 unless
  `mean`/`std` say otherwise, right-padded like ``resize="pad"`` images; other float
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
channel axis of 1 or 3 at position 1 (NCHW) or 3 (NHWC)) gets 224 for an unknown height/width; a
float [N, C, L] gets L = 256; a token-id input (integer, indexing an embedding table) gets one
length per batch from a seeded schedule spread log-uniformly over 4..max_length (128), capped by
the model's position table, with its mask/type/position inputs following; any other axis 16.

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
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from . import text_lines
from .errors import SpaError, first_line
from .graph import Graph
from .runtime import declared_inputs, is_float

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SAMPLES = 128
DEFAULT_SEQUENCE = 16      # any other unknown axis
DEFAULT_IMAGE = 224        # unknown height / width of an image-like input
DEFAULT_SIGNAL = 256       # unknown L of a float [N, C, L] input
MIN_TOKENS = 4             # shortest synthetic token batch (the longest: max_length)
FRESH_TOKENS = 16          # a fresh token batch holds batch_size * FRESH_TOKENS tokens (fresh_batches)
FREQUENT_SHARE = 0.25      # synthetic sentences draw from this first share of the tokenizer's whole words
SCAFFOLD_SHARE = 0.25      # of generated token sequences: clauses of English function words (SyntheticVocabulary)
# closed-class English words a scaffolded clause is built from (its open slots: the tokenizer's frequent words)
SCAFFOLD_WORDS = {
    "det": "the a an this that these those my your his her our their some every no any each",
    "pron": "i you he she it we they", "obj": "me him her it us them you",
    "prep": "in on at to for with from by about of after before under over into through",
    "aux": "is are was were will can could would should do does did has have had may must",
    "conj": "and but or because so when if while", "wh": "what where when why how who which",
    "adv": "not very also just still never always really too"}
NATURAL_SLOPES = (0.75, 1.25)  # spectral slopes of synthetic images and signals (natural_noise)
DEAD_LEAVES_SHARE = 0.25   # of every synthetic image / signal batch: dead leaves (the rest 1/f noise)
DEAD_LEAVES = 300          # discs (intervals) per dead-leaves image (signal)
TEXT_LINE_SOURCES = ("auto", "synthetic", "inverted")  # the sources whose images can be text lines (charset)
TEXT_LINE_SHARE = 0.5      # of a text recognizer's synthetic image batches: text lines (the rest noise images)
MAX_SIGNAL_CHANNELS = 4    # a float [N, C, L] input with at most this many channels is a signal
RESIZE_MODES = ("stretch", "pad")
LAYOUTS = ("nchw", "nhwc")
LAYOUT_AXES = {"nchw": (1, (2, 3)), "nhwc": (3, (1, 2))}  # (channel axis, (height, width) axes)


def _quiet(message):
    pass


@dataclass
class Calibration:
    """Where calibration inputs come from and how they are shaped (see the module docstring).

    shapes: {input name: (N, ...)} (or one bare shape for a single-input model); dims: {symbolic
    dim name: size}; tokenizer: tokenizer.json or a directory holding one (.txt sources; generated
    sources: synthetic token ids shaped like its sentences);
    image_size: (H, W); mean/std: per channel (or one value); layout: "nchw" / "nhwc";
    resize: "stretch" / "pad"; scaffold: the share of generated sentences written as English clauses
    (None: SCAFFOLD_SHARE; spa.pipeline's held-out sentences: all).
    samples None: DEFAULT_SAMPLES (spa.pipeline uses fewer for models
    whose forward pass is expensive, and says so). time_limit (seconds): "inverted" gives up with a
    SpaError once its first step shows it would take longer (the "auto" source sets it)."""
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
    tokenizer_found: bool = False  # `tokenizer` was found beside the model, not given (`with_tokenizer`)
    charset: str | None = None  # text lines' dictionary file; "none": noise images; None: the model's metadata

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
        if self.scaffold is not None and not (isinstance(self.scaffold, (int, float)) and 0 <= self.scaffold <= 1):
            raise SpaError(f"calibration scaffold share must be between 0 and 1, got {self.scaffold!r}")
        return self


def is_generated(source: str) -> bool:
    """Whether the source makes its inputs (any number of fresh ones) rather than reading them."""
    source = (source or "synthetic").strip()
    return source in ("auto", "synthetic", "bn", "inverted") or source.startswith("ood:noise-")


@dataclass(frozen=True)
class SampleDefault:
    """A caller's own count of generated samples where none is given (instead of DEFAULT_SAMPLES
    under spa.pipeline.CALIBRATION_MACS), for one kind of generated input: "tokens" (token
    sequences of varied length) or "synthetic" (synthetic float inputs: images, signals);
    `budget`: MACs per pass; `why` is announced."""
    kind: str
    count: int
    budget: float
    why: str

    @property
    def what(self) -> str:
        return "generated token sequences" if self.kind == "tokens" else "synthetic samples"

    def applies(self, model: onnx.ModelProto, cal: Calibration) -> bool:
        if self.kind == "tokens":
            return is_generated(cal.source) and generated_token_lengths(model)
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


def generated_token_lengths(model: onnx.ModelProto) -> bool:
    """Whether generated inputs have a token axis whose length max_length bounds: an integer input
    indexing an embedding table with no static sequence length."""
    for name, dims, dtype in declared_inputs(model):
        inp = _Input(name, dims, dtype)
        if not inp.is_float and inp.dtype != np.bool_ and len(dims) >= 2 and not isinstance(dims[-1], int):
            inp.vocab = vocabulary_size(model, name)
            if inp.role == "ids":
                return True
    return False


def tokenizer_beside(model_path) -> str | None:
    """The tokenizer.json beside a model file (in its directory, or inside a model directory), where
    exporters such as Hugging Face optimum write it; None where there is none."""
    if not isinstance(model_path, (str, os.PathLike)):
        return None
    path = os.fspath(model_path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    found = os.path.join(folder, "tokenizer.json")
    return found if os.path.isfile(found) else None


def looking_beside(options: Calibration, model_path) -> Calibration:
    """`options` with the tokenizer beside `model_path` (`tokenizer_beside`) where none is given and
    the source generates inputs or reads text; `with_tokenizer` decides, per model, whether it is used."""
    if options.tokenizer is not None or source_kind(options.source) not in ("generated", "text"):
        return options
    found = tokenizer_beside(model_path)
    return options if found is None else dataclasses.replace(options, tokenizer=found, tokenizer_found=True)


def asked(calibration) -> bool:
    """Whether calibration was asked for: given, and more than a tokenizer found beside the model."""
    if calibration is None:
        return False
    if isinstance(calibration, Calibration) and calibration.tokenizer_found:
        return dataclasses.replace(calibration, tokenizer=None, tokenizer_found=False) != Calibration()
    return True


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
        progress(f"calibration: the tokenizer beside the model, {options.tokenizer}, is not used: "
                 f"{first_line(exc, 200)} (--tokenizer PATH names another)")
        return dropped
    progress(f"calibration: token inputs shaped by the tokenizer beside the model, {options.tokenizer} "
             "(--tokenizer none: without it)")
    return dataclasses.replace(options, tokenizer_found=False)


def draws_text_lines(model: onnx.ModelProto, options: Calibration) -> bool:
    """Whether generated calibration draws text lines for the model: it has a character dictionary
    (`options.charset`, or its metadata) and an image input of 1 or 3 channels."""
    if text_lines.dictionary(model, options.charset) is None:
        return False
    return any(_image_layout(_Input(n, d, t), list(d)) for n, d, t in declared_inputs(model))


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


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
    source = (options.source or "synthetic").strip()
    if source == "auto":  # spa.pipeline resolves it per model (default_source); on its own: synthetic
        source = "synthetic"
    if source == "none":
        return []
    plan = _Plan(model, options, progress or _quiet)
    if options.tokenizer and is_generated(source) and not any(i.role == "ids" for i in plan.inputs):
        raise SpaError(f"tokenizer {options.tokenizer} has no effect: the model has no token-id input (an integer "
                       f"input indexing an embedding table), and calibration {source} reads no text")
    if options.charset is not None and str(options.charset).strip().lower() != "none" and \
            source not in TEXT_LINE_SOURCES:
        raise SpaError(f"charset {options.charset} has no effect with calibration {source}: it shapes the images "
                       f"that {' and '.join(TEXT_LINE_SOURCES[1:])} calibration generate as text lines")
    rng = np.random.default_rng(options.seed)
    if source == "synthetic":
        return plan.generated(rng)
    if source == "bn":
        return from_batchnorm(plan, rng)
    if source == "inverted":
        from . import plugins
        limit = {} if options.time_limit is None else {"time_limit": options.time_limit}
        return plugins.load("spa.calibration", "inverted")(model, plan.generated(rng), seed=options.seed,
                                                           progress=progress or _quiet, **limit)
    if source.startswith("ood:"):
        return out_of_distribution(plan, source[4:], rng)
    return from_path(plan, source)


def fresh_batches(model: onnx.ModelProto, calibration: Calibration, progress=_quiet):
    """`step -> feeds` of "synthetic" batches never drawn before: blocks of the calibration's batches,
    each from a seed of its own (its own lengths too), the tokenizer read once. For training that
    would otherwise cycle the calibration batches: MiniLM's distillation gained 0.001 cosine on its
    192 calibration sequences, 0.015 on fresh ones (docs/recover.md). A token batch of a model
    without a fixed batch holds about batch_size * FRESH_TOKENS tokens, as many sequences as fit at
    its length (4 tokens: 64, 128: 2, for the default 16): steps cost alike whatever the length, and
    short sequences come in numbers (MiniLM: 600 such steps beat 300 of 16 sequences, in less time;
    docs/recover.md)."""
    options = dataclasses.replace(calibration, samples=calibration.samples or DEFAULT_SAMPLES).check()
    if options.source != "synthetic":
        raise SpaError(f"fresh batches are drawn from the synthetic source, not {options.source!r}")
    plan = _Plan(model, options, progress or _quiet)
    per_block = len(plan.chunk_sizes())
    block_feeds: dict = {}

    def batches(step: int) -> dict:
        block, k = divmod(step, per_block)
        if block not in block_feeds:
            block_feeds.clear()
            seed = options.seed * 1_000_003 + block + 1
            block_feeds[block] = plan.generated(np.random.default_rng([seed, 104729]), lengths_seed=seed,
                                                tokens_per_batch=options.batch_size * FRESH_TOKENS)
        return block_feeds[block][k]

    return batches


# ---------------------------------------------------------------------------------------------
# shapes and batches
# ---------------------------------------------------------------------------------------------
class _Batch:
    def __repr__(self):
        return "N"


class _Tokens:
    def __repr__(self):
        return "L"


BATCH, TOKENS = _Batch(), _Tokens()


@dataclass
class _Input:
    name: str
    dims: tuple      # declared: int, symbolic name or None
    dtype: type
    vocab: int | None = None

    @property
    def is_float(self) -> bool:
        return is_float(self.dtype)

    @property
    def role(self) -> str | None:
        """What a token model's integer (or mask) input carries, read from its name."""
        lower = self.name.lower()
        if "mask" in lower:
            return "mask"
        if "type" in lower or "segment" in lower:
            return "types"
        if "position" in lower:
            return "positions"
        if not self.is_float and self.dtype != np.bool_ and self.vocab:
            return "ids"
        return None


def user_shapes(model, shapes) -> dict:
    """{input: shape} from the user's shapes ({input: shape}, or one bare shape for a
    single-input model), checked against the model's declared inputs; SpaError if they do not fit."""
    return _checked_shapes([_Input(n, d, t) for n, d, t in declared_inputs(model)], shapes)


def shared_shapes(model, batches: list) -> dict | None:
    """{input: shape} of the inputs with a symbolic size after the batch axis, where every batch
    fed them at the same sizes (batch axis 1): the sizes the model ran at, which verification and
    the summary take where the user gave none (the 32 they default to may not run). None where no
    input has such a size or the batches differ (token batches of varied length)."""
    shapes = {}
    for name, dims, _ in declared_inputs(model):
        if all(isinstance(d, int) for d in dims[1:]):
            continue
        sizes = {np.shape(b[name])[1:] for b in batches if name in b}
        if len(sizes) != 1:
            return None
        shapes[name] = (1, *sizes.pop())
    return shapes or None


def _checked_shapes(inputs: list, shapes) -> dict:
    if shapes is None:
        return {}
    by_name = {i.name: i for i in inputs}
    if not isinstance(shapes, Mapping):
        if len(inputs) != 1:
            raise SpaError(f"input shape without an input name needs a single-input model "
                           f"(inputs: {', '.join(by_name)}); name the input (NAME=1x3x224x224)")
        shapes = {inputs[0].name: shapes}
    out = {}
    for name, shape in shapes.items():
        if name not in by_name:
            raise SpaError(f"input shape for '{name}', which is no input of the model (inputs: {', '.join(by_name)})")
        try:
            shape = tuple(shape)
        except TypeError:
            raise SpaError(f"input shape for '{name}' must be a list of sizes, got {shape!r}") from None
        if not all(_positive_int(s) for s in shape):
            raise SpaError(f"input shape for '{name}' must be positive integers, got {shape}")
        dims = by_name[name].dims
        if len(shape) != len(dims):
            raise SpaError(f"input shape for '{name}' has rank {len(shape)}, the input has rank "
                           f"{len(dims)} ({_declared(dims)})")
        for k, (s, d) in enumerate(zip(shape, dims)):
            if k and isinstance(d, int) and s != d:
                raise SpaError(f"input shape for '{name}' {_shape_text(shape)}: axis {k} must be {d} "
                               f"({_declared(dims)})")
        out[name] = tuple(int(s) for s in shape)
    return out


class _Plan:
    """The model's inputs, its batch chunk and the shape resolution, with the announcements."""

    def __init__(self, model, options: Calibration, progress):
        self.model, self.options, self.progress = model, options, progress
        self.said: set = set()
        self.inputs = [_Input(n, d, t) for n, d, t in declared_inputs(model)]
        if not self.inputs:
            raise SpaError("calibration: the model has no inputs")
        for inp in self.inputs:
            if not inp.is_float and inp.dtype != np.bool_:
                inp.vocab = vocabulary_size(model, inp.name)
        self.by_name = {i.name: i for i in self.inputs}
        statics = {i.dims[0] for i in self.inputs if i.dims and isinstance(i.dims[0], int)}
        if len(statics) > 1:
            raise SpaError(f"calibration: the model's inputs fix different batch sizes {sorted(statics)}")
        self.static_batch = statics.pop() if statics else None
        self.chunk = self.static_batch or options.batch_size
        self.batch_names = {i.dims[0] for i in self.inputs if i.dims and isinstance(i.dims[0], str)}
        self.explicit = _checked_shapes(self.inputs, options.shapes)
        self.named = self._named_sizes()
        self._position_limit = -1
        self._vocabulary = None
        self._alphabet: list | None = None  # drawable characters of the text lines; [] for noise images
        self.fixed: dict = {}   # (input, axis) -> size a source imposes (bn: the channel count)

    def say(self, message: str):
        if message not in self.said:
            self.said.add(message)
            self.progress(message)

    # user shapes ---------------------------------------------------------------------------------
    def _named_sizes(self) -> dict:
        named = {k: int(v) for k, v in dict(self.options.dims or {}).items()}
        fixed_by: dict = {}
        for name, shape in self.explicit.items():
            for k, d in enumerate(self.by_name[name].dims):
                if k and isinstance(d, str) and d not in self.batch_names:
                    if d in fixed_by and named[d] != shape[k]:
                        raise SpaError(f"calibration shapes disagree on '{d}': {named[d]} for '{fixed_by[d]}', "
                                       f"{shape[k]} for '{name}'")
                    named[d], fixed_by[d] = shape[k], name
        return named

    def known(self, inp: _Input, k: int):
        """Axis k's size from (a) the user's shape, (b) dims by name, (c) the declared static dim;
        BATCH for the batch axis (and axes sharing its name), None when unknown."""
        if k == 0:
            return BATCH
        if (inp.name, k) in self.fixed:
            return self.fixed[(inp.name, k)]
        if inp.name in self.explicit:
            return self.explicit[inp.name][k]
        d = inp.dims[k]
        if isinstance(d, int):
            return d
        if isinstance(d, str):
            if d in self.batch_names:
                return BATCH
            return self.named.get(d)
        return None

    # generated inputs ------------------------------------------------------------------------
    def resolved(self) -> dict:
        """{input: shape} with BATCH / TOKENS placeholders; defaults announced."""
        shapes = {i.name: [self.known(i, k) for k in range(len(i.dims))] for i in self.inputs}
        by_dim: dict = {}   # symbolic name -> default chosen for it
        ids = [i for i in self.inputs if i.role == "ids" and i.dims and shapes[i.name][-1] is None]
        token_names = {i.dims[-1] for i in ids if isinstance(i.dims[-1], str)}
        unnamed_tokens = any(i.dims[-1] is None for i in ids)
        for i in ids:
            shapes[i.name][-1] = TOKENS
        for name in token_names:
            by_dim[name] = TOKENS
        if ids:
            hi = self.max_tokens()
            lo = min(MIN_TOKENS, hi)
            for i in ids:
                hint = _hint(i.name, shapes[i.name])
                capped = " (the model's position table)" if hi < self.options.max_length else ""
                self.say(f"calibration: input '{i.name}' has no declared sequence length; synthetic token "
                         f"batches vary from {lo} to {hi} tokens{capped}, one length per batch "
                         f"(set --input-shape {hint} for one length)")
        for i in self.inputs:
            shape = shapes[i.name]
            for k, v in enumerate(shape):
                if v is None and isinstance(i.dims[k], str) and i.dims[k] in by_dim:
                    shape[k] = by_dim[i.dims[k]]
            if ids and unnamed_tokens and shape and shape[-1] is None and i.dims[-1] is None \
                    and (not i.is_float or i.role == "mask") and len(shape) == len(ids[0].dims):
                shape[-1] = TOKENS   # the mask / type ids of an unnamed sequence axis
            unknown = [k for k, v in enumerate(shape) if v is None]
            if not unknown:
                continue
            self._defaults(i, shape, unknown)
            for k in unknown:
                if isinstance(i.dims[k], str):
                    by_dim.setdefault(i.dims[k], shape[k])
        return shapes

    def _defaults(self, inp: _Input, shape: list, unknown: list):
        layout = _image_layout(inp, shape)
        if layout:
            c, (h, w) = LAYOUT_AXES[layout]
            missing = [a for a in (h, w) if a in unknown]
            if missing:
                for a in missing:
                    shape[a] = DEFAULT_IMAGE
                what = "height/width" if len(missing) == 2 else ("height" if missing[0] == h else "width")
                image = "x".join(str(shape[a]) for a in ((c, h, w) if layout == "nchw" else (h, w, c)))
                hint = _hint(inp.name, shape, {h: "H", w: "W"})
                self.say(f"calibration: input '{inp.name}' has no declared {what}; synthetic images are "
                         f"{image} (set --input-shape {hint})")
                unknown = [k for k in unknown if k not in missing]
        if inp.is_float and len(shape) == 3 and 2 in unknown:
            shape[2] = DEFAULT_SIGNAL
            self.say(f"calibration: input '{inp.name}' has no declared length; synthetic inputs have length "
                     f"{DEFAULT_SIGNAL} (set --input-shape {_hint(inp.name, shape, {2: 'L'})})")
            unknown = [k for k in unknown if k != 2]
        if unknown:
            for k in unknown:
                shape[k] = DEFAULT_SEQUENCE
            axes = ", ".join(f"{k}" + (f" ('{inp.dims[k]}')" if isinstance(inp.dims[k], str) else "") for k in unknown)
            self.say(f"calibration: input '{inp.name}' has no declared size for axis {axes}; synthetic inputs use "
                     f"{DEFAULT_SEQUENCE} (set --input-shape {_hint(inp.name, shape, {k: '?' for k in unknown})})")

    def max_tokens(self) -> int:
        if self._position_limit == -1:
            self._position_limit = position_limit(self.model)
        limit = self.options.max_length
        if self._position_limit and self._position_limit < limit:
            limit = self._position_limit
        return limit

    def chunk_sizes(self) -> list:
        samples = self.options.samples
        if self.static_batch:
            return [self.static_batch] * max(1, samples // self.static_batch)
        return [min(self.chunk, samples - s) for s in range(0, samples, self.chunk)]

    def token_lengths(self, count: int, seed: int | None = None) -> list:
        """One length per batch: stratified log-uniform over [4, max], in an order seeded by `seed`
        (None: the calibration's)."""
        hi = self.max_tokens()
        lo = min(MIN_TOKENS, hi)
        rng = np.random.default_rng([self.options.seed if seed is None else seed, 7919])
        u = (np.arange(count) + rng.random(count)) / count
        lengths = np.rint(np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))).astype(int)
        return [int(v) for v in rng.permutation(np.clip(lengths, lo, hi))]

    def generated(self, rng, floats=None, override: dict | None = None, lengths_seed: int | None = None,
                  tokens_per_batch: int | None = None) -> list:
        """Generated feeds: `floats(shape)` for float inputs (N(0, 1) by default), `override`
        {input: fn(shape)} for particular ones, the integer conventions for the rest; token batch
        lengths drawn from `lengths_seed` (None: the calibration's seed); `tokens_per_batch`: token
        batches sized to hold about that many tokens where the batch is not fixed (as many batches)."""
        shapes = self.resolved()
        sizes = self.chunk_sizes()
        tokens = any(TOKENS in s for s in shapes.values())
        lengths = self.token_lengths(len(sizes), lengths_seed) if tokens else [None] * len(sizes)
        if tokens and tokens_per_batch and not self.static_batch:
            sizes = [max(1, tokens_per_batch // length) for length in lengths]
        feeds = []
        for n, length in zip(sizes, lengths):
            feed = {}
            for inp in self.inputs:
                shape = tuple(n if v is BATCH else length if v is TOKENS else v for v in shapes[inp.name])
                if override and inp.name in override:
                    feed[inp.name] = override[inp.name](shape).astype(inp.dtype)
                elif inp.is_float and inp.role == "mask" and len(shape) == 2:  # a float attention mask
                    feed[inp.name] = np.ones(shape, dtype=inp.dtype)
                elif inp.is_float:
                    feed[inp.name] = (floats(shape) if floats else self.float_noise(inp, shape, rng)).astype(inp.dtype)
                elif inp.role == "ids" and self.options.tokenizer:
                    feed[inp.name] = self.token_ids(inp, shape, rng)
                else:
                    feed[inp.name] = _integer_input(inp, shape, rng)
            feeds.append(feed)
        return feeds

    def token_ids(self, inp: _Input, shape: tuple, rng) -> np.ndarray:
        """Generated ids shaped like the tokenizer's sentences: its special tokens around a body
        drawn from its frequent whole-word ids (see `SyntheticVocabulary`)."""
        if self._vocabulary is None:
            self._vocabulary = synthetic_vocabulary(self.options.tokenizer, inp.vocab)
            self.say(f"calibration: synthetic token ids for '{inp.name}' are sentences of the tokenizer's "
                     f"{len(self._vocabulary.body)} most frequent whole-word tokens, framed "
                     f"{self._vocabulary.framing}")
        share = SCAFFOLD_SHARE if self.options.scaffold is None else self.options.scaffold
        if self._vocabulary.scaffold is not None and share > 0:
            self.say(f"calibration: {share:.0%} of the synthetic token sequences for '{inp.name}' are English clauses "
                     "(function words from a fixed list around those words; docs/obspa.md)")
        return self._vocabulary.draw(shape, rng, share).astype(inp.dtype)

    def float_noise(self, inp: _Input, shape: tuple, rng) -> np.ndarray:
        """Text lines for a text recognizer's image input (`text_line_images`), natural-image noise for
        other image-like and [N, C, L] signal inputs, N(0, 1) for the rest."""
        axes = _spatial_axes(inp, shape)
        if not axes:
            return rng.standard_normal(shape)
        if len(axes[1]) == 2 and shape[axes[0]] in (1, 3) and self.text_alphabet():
            return self.text_line_images(inp, shape, rng)
        self.say(f"calibration: synthetic inputs for '{inp.name}' are 1/f noise (the spectrum of natural images "
                 f"and signals), {DEAD_LEAVES_SHARE:.0%} of each batch dead leaves (grey discs or intervals over "
                 "each other: the flat regions and sharp edges of natural ones), zero mean and unit variance per "
                 "sample")
        return natural_noise(rng, shape, *axes, dead_leaves_share=DEAD_LEAVES_SHARE)

    def text_alphabet(self) -> list:
        """The characters text lines are drawn from ([]: noise images): the dictionary of the charset
        option or of the model's metadata (`spa.text_lines`), those the built-in font draws. Without
        Pillow the model's own dictionary gives way to noise images, announced; a named one is refused."""
        if self._alphabet is None:
            found = text_lines.dictionary(self.model, self.options.charset)
            self._alphabet = []
            if found is not None:
                chars, where = found
                try:
                    self._alphabet = text_lines.drawable(chars)
                    if not self._alphabet:
                        raise SpaError(f"the built-in font draws none of the {len(chars)} characters of {where}")
                except SpaError as exc:
                    if self.options.charset is not None:
                        raise
                    self.say(f"calibration: noise images, not text lines in the characters of {where}: "
                             f"{first_line(exc, 200)}")
                    return self._alphabet
                self.say(f"calibration: {TEXT_LINE_SHARE:.0%} of each synthetic image batch is text lines, random "
                         f"words in the {len(self._alphabet)} characters of {where} ({len(chars)} in all) that "
                         "Pillow's built-in font draws, dark on light and light on dark; the rest noise images "
                         "(--charset none: noise only)")
        return self._alphabet

    def text_line_images(self, inp: _Input, shape: tuple, rng) -> np.ndarray:
        """`shape`'s batch: TEXT_LINE_SHARE of it text lines, the rest noise images (`natural_noise`;
        lines alone lost the PP-OCRv4 recognizer its light-on-dark codes, noise alone its
        in-distribution lines: docs/obspa.md). Each line resized to the input's height keeping its aspect and
        right-padded with 0 to its width after normalising (PaddleOCR's resize_norm_img), mean 0.5 and
        std 0.5 (PaddleOCR's) unless the calibration gives its own."""
        layout = _image_layout(inp, list(shape))
        c, (h, w) = LAYOUT_AXES[layout]
        channels = shape[c]
        defaults = [n for n, v in (("mean", self.options.mean), ("std", self.options.std)) if v is None]
        if defaults:
            self.say(f"calibration: text lines scaled to [0, 1] and normalised with PaddleOCR's {'/'.join(defaults)} "
                     "0.5 (set --image-mean / --image-std)")
        mean = _per_channel(self.options.mean, (0.5,) * 3, channels, "mean")
        std = _per_channel(self.options.std, (0.5,) * 3, channels, "std")
        noise = int(round(shape[0] * (1 - TEXT_LINE_SHARE)))
        images = text_lines.lines(rng, shape[0] - noise, self._alphabet, channels)
        x = np.stack([_fitted(im, shape[h], shape[w], channels, "pad", mean, std) for im in images])
        x = x.transpose(0, 3, 1, 2) if layout == "nchw" else x
        if noise:
            x = np.concatenate([natural_noise(rng, (noise,) + tuple(shape[1:]), c, (h, w), DEAD_LEAVES_SHARE), x])
        return x

    # data --------------------------------------------------------------------------------------
    def sample_count(self, available: int, what: str) -> int:
        """How many of `available` samples to use: up to `samples`, whole static batches."""
        count = min(available, self.options.samples)
        if not self.static_batch:
            return count
        if available < self.static_batch:
            raise SpaError(f"calibration {what}: {available} sample{'s' * (available != 1)}, fewer than the "
                           f"model's static batch of {self.static_batch}")
        count = max(self.static_batch, count // self.static_batch * self.static_batch)
        if count < min(available, self.options.samples):
            self.say(f"calibration: the model's batch is fixed at {self.static_batch}: using {count} of "
                     f"{min(available, self.options.samples)} samples")
        return count

    def split(self, data: dict, what: str) -> list:
        batched = {k: v for k, v in data.items() if np.ndim(v)}
        available = min(len(v) for v in batched.values()) if batched else 1
        count = self.sample_count(available, what)
        return [{k: np.ascontiguousarray(v[s:s + self.chunk]) if k in batched else v for k, v in data.items()}
                for s in range(0, count, self.chunk)]


def _image_layout(inp: _Input, shape: list) -> str | None:
    if not inp.is_float or len(shape) != 4:
        return None
    if shape[1] in (1, 3):
        return "nchw"
    if shape[3] in (1, 3):
        return "nhwc"
    return None


def _spatial_axes(inp: _Input, shape) -> tuple | None:
    """(channel axis, spatial axes) of an image-like input or a float [N, C, L] signal with at most
    four channels; None for any other input (feature vectors, embeddings, masks)."""
    layout = _image_layout(inp, list(shape))
    if layout:
        return LAYOUT_AXES[layout]
    if inp.is_float and len(shape) == 3 and shape[1] <= MAX_SIGNAL_CHANNELS and shape[2] > shape[1]:
        return 1, (2,)
    return None


def natural_noise(rng, shape: tuple, channel_axis: int, spatial_axes: tuple,
                  dead_leaves_share: float = 0.0) -> np.ndarray:
    """Noise whose amplitude spectrum falls as 1/f^a over `spatial_axes`, a ~ U(NATURAL_SLOPES)
    per sample: natural images have a ~ 0.9-1.0 (van der Schaaf & van Hateren 1996); the first
    `dead_leaves_share` of the samples are `dead_leaves` images (signals) instead. Every channel
    holds the same field (grey images: colour noise on top cost the PP-OCRv4 recognizer half its
    exact lines). Per sample zero mean, unit variance. Measured against N(0, 1) and mixtures in
    docs/obspa.md."""
    order = (0, channel_axis) + tuple(spatial_axes)
    canonical = tuple(shape[a] for a in order)
    n, c, spatial = canonical[0], canonical[1], tuple(canonical[2:])
    grids = np.meshgrid(*[np.fft.fftfreq(s) for s in spatial[:-1]], np.fft.rfftfreq(spatial[-1]), indexing="ij")
    f = np.sqrt(sum(g ** 2 for g in grids))
    f.flat[0] = 1.0 / max(spatial)
    slopes = rng.uniform(*NATURAL_SLOPES, size=(n, 1) + (1,) * len(spatial))
    axes = tuple(range(2, 2 + len(spatial)))
    z = rng.standard_normal((n, 1) + f.shape) + 1j * rng.standard_normal((n, 1) + f.shape)
    x = np.fft.irfftn(z / f ** slopes, s=spatial, axes=axes)
    leaves = int(round(n * dead_leaves_share))
    if leaves:
        x[:leaves, 0] = dead_leaves(rng, leaves, *spatial)
    x -= x.mean(axis=axes, keepdims=True)
    x /= x.std(axis=axes, keepdims=True) + 1e-12
    return np.transpose(np.broadcast_to(x, (n, c) + spatial), np.argsort(order))


def dead_leaves(rng, n: int, *size: int) -> np.ndarray:
    """n dead-leaves images (Matheron's model; Lee, Mumford & Huang 2001 for natural images'
    statistics; Baradad et al. 2021 trained vision models on them), or signals for one `size`:
    DEAD_LEAVES discs (intervals) of uniform random grey painted one over the other on a grey
    background, radii with density ~ r^-3 (the scale-invariant choice) from 1 sample to half the
    longest side, centres up to a quarter of that beyond the edges. Flat regions and sharp edges,
    which 1/f noise lacks."""
    rmax = max(size) / 2
    radii = (1.0 - rng.uniform(size=(n, DEAD_LEAVES)) * (1.0 - max(rmax, 1.0) ** -2)) ** -0.5
    centres = [rng.uniform(-rmax / 4, s + rmax / 4, size=(n, DEAD_LEAVES)) for s in size]
    greys = rng.uniform(size=(n, DEAD_LEAVES))
    images = np.empty((n,) + tuple(size))
    for k in range(n):
        images[k] = rng.uniform()
        for leaf in range(DEAD_LEAVES):
            r = radii[k, leaf]
            at = [c[k, leaf] for c in centres]
            box = tuple(slice(max(int(c - r), 0), min(int(c + r) + 1, s)) for c, s in zip(at, size))
            if any(b.start >= b.stop for b in box):
                continue
            # squared distances along each axis, added as an outer sum (np.ogrid cost 3x as much per disc)
            inside = functools.reduce(np.add.outer, [(np.arange(b.start, b.stop) - c) ** 2
                                                     for b, c in zip(box, at)]) < r * r
            images[k][box][inside] = greys[k, leaf]
    return images


def _hint(name: str, shape: list, letters: dict | None = None) -> str:
    letters = letters or {}
    parts = ["1" if v is BATCH else letters.get(k) or ("L" if v is TOKENS else str(v)) for k, v in enumerate(shape)]
    return f"{name}={'x'.join(parts)}"


def _declared(dims) -> str:
    return "[" + ", ".join("N" if k == 0 and not isinstance(d, int) else str(d) if d is not None else "?"
                           for k, d in enumerate(dims)) + "]"


def _shape_text(shape) -> str:
    return "x".join(str(s) for s in shape)


def _integer_input(inp: _Input, shape, rng):
    dtype, role = inp.dtype, inp.role
    if dtype == np.bool_ or role == "mask":
        return np.ones(shape, dtype=dtype)
    if role == "types":
        return np.zeros(shape, dtype=dtype)
    if role == "positions":
        return np.broadcast_to(np.arange(shape[-1] if shape else 1), shape).astype(dtype)
    if inp.vocab:
        return rng.integers(0, inp.vocab, size=shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)


_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten", "Expand"}


def _constant_dims(model) -> dict:
    consts = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = tuple(a.t.dims)
    return consts


def vocabulary_size(model, name) -> int | None:
    """Rows of the constant table that `name` indexes (through casts and reshapes), if any."""
    consts = _constant_dims(model)
    readers: dict = {}
    for node in model.graph.node:
        for slot, x in enumerate(node.input):
            readers.setdefault(x, []).append((node, slot))
    frontier, seen = [name], set()
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node, slot in readers.get(tensor, []):
            if node.op_type == "Gather" and slot == 1 and node.input[0] in consts:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                shape = consts[node.input[0]]
                return int(shape[axis]) if shape else None
            if node.op_type in _PASS_THROUGH and slot == 0:
                frontier.extend(node.output)
    return None


def position_limit(model) -> int | None:
    """The longest sequence a token model can take, if it shows: the rows of a position table
    (a `position*` input's table, or a constant 2-D table, at least 4 rows, that a Gather reads
    with computed indices: an exported position-id buffer sliced to the sequence length)."""
    consts = _constant_dims(model)
    inputs = [vi.name for vi in model.graph.input if vi.name not in consts]
    limits = [vocabulary_size(model, n) for n in inputs if "position" in n.lower()]
    direct, frontier = set(), list(inputs)
    while frontier:
        tensor = frontier.pop()
        if tensor in direct:
            continue
        direct.add(tensor)
        for node in model.graph.node:
            if node.op_type in _PASS_THROUGH and node.input and node.input[0] == tensor:
                frontier.extend(node.output)
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in consts:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table, index = consts[node.input[0]], node.input[1]
        if axis == 0 and len(table) == 2 and index not in direct and index not in consts and table[0] >= MIN_TOKENS:
            limits.append(int(table[0]))
    limits = [v for v in limits if v]
    return min(limits) if limits else None


def out_of_distribution(plan: _Plan, kind: str, rng) -> list:
    if kind == "noise-uniform":
        return plan.generated(rng, floats=lambda shape: rng.random(shape))
    if kind == "noise-gaussian":
        return plan.generated(rng, floats=lambda shape: 2.0 * rng.standard_normal(shape))
    if not kind:
        raise SpaError("ood: needs a kind (noise-uniform, noise-gaussian) or a path")
    return from_path(plan, kind)


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics
# ---------------------------------------------------------------------------------------------
def from_batchnorm(plan: _Plan, rng) -> list:
    from scipy.optimize import nnls

    floats = [i for i in plan.inputs if i.is_float]
    if len(floats) != 1 or len(floats[0].dims) < 3:
        raise SpaError("bn calibration needs one float input of shape [N, C, ...]")
    name = floats[0].name
    g = Graph(plan.model)
    bn = next((n for n in g.nodes if n.op_type == "BatchNormalization"), None)
    if bn is None:
        raise SpaError("bn calibration: the model has no BatchNormalization (eval exports fold it "
                       "into Conv; export with BatchNorm kept, or use --calibration synthetic)")
    stats = [g.const(x) for x in bn.input[3:5]]
    if any(s is None for s in stats):
        raise SpaError("bn calibration: the first BatchNormalization's running statistics are not constants")
    mu, var = (np.asarray(s, dtype=np.float64).reshape(-1) for s in stats)
    if bn.input[0] == name:
        channels = len(mu)
        mean, variance = mu, var
    else:
        conv = g.nodes[g.producer[bn.input[0]]] if bn.input[0] in g.producer else None
        if conv is None or conv.op_type != "Conv" or conv.input[0] != name or g.const(conv.input[1]) is None:
            raise SpaError("bn calibration: the first BatchNormalization must read the input directly "
                           "or through one Conv with constant weights")
        from .graph import attr
        channels = np.shape(g.const(conv.input[1]))[1] * attr(conv, "group", 1)
        A, B, bias = _conv_moments(g, conv, channels)
        mean = np.linalg.lstsq(A, mu - bias, rcond=None)[0]
        variance = nnls(B, var)[0]
    declared = plan.known(floats[0], 1)
    if isinstance(declared, int) and declared != channels:
        raise SpaError(f"bn calibration: input '{name}' has {declared} channels, the BatchNormalization "
                       f"statistics imply {channels}")
    if declared is None:
        plan.fixed[(name, 1)] = channels
    scale = np.sqrt(np.maximum(variance, 1e-4))

    def draw(shape):
        view = (1, -1) + (1,) * (len(shape) - 2)
        return mean.reshape(view) + scale.reshape(view) * rng.standard_normal(shape)
    return plan.generated(rng, override={name: draw})


def _conv_moments(g, conv, channels):
    """Per (out, in) channel sums of w and w^2 (group structure expanded), and the bias."""
    from .graph import attr
    w = np.asarray(g.const(conv.input[1]), dtype=np.float64)
    groups = attr(conv, "group", 1)
    c_out, cin_g = w.shape[:2]
    flat = w.reshape(c_out, cin_g, -1)
    A, B = np.zeros((c_out, channels)), np.zeros((c_out, channels))
    per_out = c_out // groups
    for o in range(c_out):
        cols = (o // per_out) * cin_g + np.arange(cin_g)
        A[o, cols] = flat[o].sum(axis=1)
        B[o, cols] = (flat[o] ** 2).sum(axis=1)
    bias = g.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    return A, B, np.zeros(c_out) if bias is None else np.asarray(bias, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def from_path(plan: _Plan, path: str) -> list:
    if not os.path.exists(path):
        raise SpaError(f"calibration source '{path}' is neither none, synthetic, bn, ood:... nor an existing path")
    if os.path.isdir(path):
        try:
            files = sorted(f for f in os.listdir(path)
                           if not f.startswith(".") and os.path.isfile(os.path.join(path, f)))
        except OSError as exc:
            raise SpaError(f"calibration directory {path} cannot be listed ({type(exc).__name__})") from None
        arrays = [f for f in files if f.lower().endswith(".npy")]
        images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if arrays:
            raw = _npy_directory(plan, path, arrays)
        elif images:
            return _image_directory(plan, path, images)
        else:
            raise SpaError(f"calibration directory {path} has no .npy or image files")
    elif path.lower().endswith(".npz"):
        raw = _npz(plan, path)
    elif path.lower().endswith(".npy"):
        raw = _single_input(plan, path, _load(path))
    elif path.lower().endswith(".txt"):
        return from_text(plan, path)
    else:
        raise SpaError(f"calibration file {path}: expected .npz, .npy, .txt or a directory")
    return plan.split(_checked(plan, raw, path), path)


def _load(path):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise SpaError(f"calibration file {path} cannot be read ({type(exc).__name__})") from None


def _names(plan):
    return [i.name for i in plan.inputs]


def _single_input(plan, path, array):
    if len(plan.inputs) != 1:
        raise SpaError(f"calibration {path}: one unnamed array, but the model has inputs "
                       f"{', '.join(_names(plan))} (name the arrays after them)")
    return {plan.inputs[0].name: array}


def _npz(plan, path):
    archive = _load(path)
    if not hasattr(archive, "files"):
        return _single_input(plan, path, archive)
    try:
        arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise SpaError(f"calibration file {path} cannot be read ({type(exc).__name__})") from None
    names = _names(plan)
    if not arrays:
        raise SpaError(f"calibration file {path} holds no arrays")
    if set(names) <= set(arrays):
        return {n: arrays[n] for n in names}
    if len(arrays) == 1 and len(names) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = sorted(set(names) - set(arrays))
    raise SpaError(f"calibration file {path} has no array for input {', '.join(missing)} "
                   f"(has {', '.join(sorted(arrays))})")


def _npy_directory(plan, path, files):
    names = _names(plan)
    stems = {os.path.splitext(f)[0]: f for f in files}
    if set(names) <= set(stems):
        return {n: _load(os.path.join(path, stems[n])) for n in names}
    if len(names) != 1:
        missing = sorted(set(names) - set(stems))
        raise SpaError(f"calibration directory {path} has no .npy for input {', '.join(missing)}")
    rank = len(plan.inputs[0].dims)
    parts, total = [], 0
    for f in files:
        a = _load(os.path.join(path, f))
        a = a[None] if a.ndim == rank - 1 else a
        if a.ndim != rank or (parts and a.shape[1:] != parts[0].shape[1:]):
            raise SpaError(f"calibration directory {path}: .npy files of different or wrong shapes "
                           f"(input '{names[0]}' has rank {rank}; {f} has shape {a.shape})")
        parts.append(a)
        total += len(a)
        if total >= plan.options.samples:
            break
    return {names[0]: np.concatenate(parts)}


def check_input_array(what: str, name: str, a: np.ndarray, dims, dtype, batch_names, sizes: dict,
                      scalar_ok: bool = True, samples_hint: str = "", vocab: int | None = None) -> None:
    """One array for a model input against its declaration: rank, samples, dtype, static sizes,
    symbolic sizes (other than the batch) equal across inputs (`sizes` collects them), and token
    ids inside `vocab` when given. SpaError if not."""
    if a.ndim != len(dims):
        raise SpaError(f"{what}: input '{name}' needs rank {len(dims)} ({_declared(dims)}), got shape {a.shape}")
    if (a.ndim == 0 and not scalar_ok) or (a.ndim and a.shape[0] == 0):
        raise SpaError(f"{what}: input '{name}' has no samples{samples_hint}")
    if not _kind_fits(a.dtype, dtype):
        raise SpaError(f"{what}: input '{name}' needs {np.dtype(dtype).name}, got {a.dtype.name}")
    for k, d in enumerate(dims):
        if k and isinstance(d, int) and a.shape[k] != d:
            raise SpaError(f"{what}: input '{name}' axis {k} must be {d} ({_declared(dims)}), got shape {a.shape}")
        if k and isinstance(d, str) and d not in batch_names:
            seen = sizes.setdefault(d, (a.shape[k], name))
            if seen[0] != a.shape[k]:
                raise SpaError(f"{what}: axis '{d}' is {seen[0]} in '{seen[1]}' but {a.shape[k]} in '{name}'")
    if vocab and a.size and np.issubdtype(a.dtype, np.integer):
        low, high = int(a.min()), int(a.max())
        if low < 0 or high >= vocab:
            raise SpaError(f"{what}: input '{name}' holds id {high if high >= vocab else low}, outside the "
                           f"model's vocabulary of {vocab}")


def _checked(plan: _Plan, raw, path) -> dict:
    data, sizes = {}, {}
    for inp in plan.inputs:
        name, dims, dtype = inp.name, inp.dims, inp.dtype
        a = np.asarray(raw[name])
        check_input_array(f"calibration {path}", name, a, dims, dtype, plan.batch_names, sizes,
                          vocab=inp.vocab if inp.role == "ids" else None)
        data[name] = a.astype(dtype)
    counts = {len(a) for a in data.values() if a.ndim}
    if len(counts) > 1:
        raise SpaError(f"calibration {path}: inputs have different sample counts {sorted(counts)}")
    return data


def check_static_dims(model, data: dict, path: str = "calibration"):
    """Axes the model fixes must match (symbolic ones, the batch among them, may be anything)."""
    for vi in model.graph.input:
        if vi.name not in data:
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if k and d.HasField("dim_value") and d.dim_value > 0 and data[vi.name].shape[k] != d.dim_value:
                raise SpaError(f"calibration {path}: input '{vi.name}' axis {k} must be {d.dim_value}, "
                               f"got shape {data[vi.name].shape}")


def _kind_fits(have, want) -> bool:
    have, want = np.dtype(have), np.dtype(want)
    if is_float(want):
        return is_float(have) or np.issubdtype(have, np.integer) and have.itemsize == 1
    if want == np.bool_:
        return have == np.bool_ or np.issubdtype(have, np.integer)
    return np.issubdtype(have, np.integer) or have == np.bool_


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _image_directory(plan: _Plan, path: str, files: list) -> list:
    try:
        from PIL import Image
    except ImportError:
        raise SpaError("image calibration needs Pillow (pip install pillow)") from None
    opts = plan.options
    inp = plan.inputs[0]
    if len(plan.inputs) != 1 or not inp.is_float or len(inp.dims) != 4:
        raise SpaError(f"image calibration needs a model with one float input of rank 4 (NCHW or NHWC); "
                       f"the model has {', '.join(f'{i.name} {_declared(i.dims)}' for i in plan.inputs)}")
    known = [v if isinstance(v, int) else None for v in (plan.known(inp, k) for k in range(4))]
    layout = str(opts.layout).lower() if opts.layout else \
        "nchw" if known[1] in (1, 3) else "nhwc" if known[3] in (1, 3) else None
    if layout is None:
        raise SpaError(f"image calibration: cannot tell the channel axis of input '{inp.name}' "
                       f"{_declared(inp.dims)}; pass --image-layout nchw or nhwc")
    c, (h, w) = LAYOUT_AXES[layout]
    channels = known[c]
    if channels is None:
        channels = 3
        plan.say(f"calibration: input '{inp.name}' has no declared channel count; images are read as RGB "
                 f"(set --input-shape)")
    elif channels not in (1, 3):
        raise SpaError(f"image calibration: input '{inp.name}' {_declared(inp.dims)} has {channels} channels on its "
                       f"{layout.upper()} channel axis; images give 1 or 3 (check --image-layout)")
    if opts.image_size is not None:
        height, width = (int(s) for s in opts.image_size)
        for axis, size in ((h, height), (w, width)):
            if known[axis] is not None and known[axis] != size:
                raise SpaError(f"image calibration: image size {height}x{width} does not fit input '{inp.name}' "
                               f"{_declared(inp.dims)}")
    else:
        height, width = known[h] or DEFAULT_IMAGE, known[w] or DEFAULT_IMAGE
        missing = [n for n, v in (("height", known[h]), ("width", known[w])) if v is None]
        if missing:
            plan.say(f"calibration: input '{inp.name}' has no declared {'/'.join(missing)}; images are resized to "
                     f"{height}x{width} (set --image-size HxW)")
    defaults = [n for n, v in (("mean", opts.mean), ("std", opts.std)) if v is None]
    if defaults:
        plan.say(f"calibration: images scaled to [0, 1] and normalised with ImageNet's {'/'.join(defaults)} "
                 f"(set --image-mean / --image-std)")
    mean = _per_channel(opts.mean, IMAGENET_MEAN, channels, "mean")
    std = _per_channel(opts.std, IMAGENET_STD, channels, "std")
    count = plan.sample_count(len(files), path)
    images = []
    for f in files[:count]:
        try:
            with Image.open(os.path.join(path, f)) as im:
                im.load()
                images.append(_fitted(_converted(im, channels), height, width, channels, opts.resize, mean, std))
        except SpaError:
            raise
        except Exception as exc:
            raise SpaError(f"calibration image {os.path.join(path, f)} cannot be read ({type(exc).__name__})") from None
    x = np.stack(images)
    if layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    return plan.split({inp.name: np.ascontiguousarray(x, dtype=inp.dtype)}, path)


def _fitted(im, height: int, width: int, channels: int, resize: str, mean, std) -> np.ndarray:
    """A Pillow image ("RGB" or "L") as a normalised [height, width, channels] array: stretched to the
    size, or ("pad": PaddleOCR's resize_norm_img) resized to ceil(height * aspect), at most width, and
    right-padded with 0 after normalising."""
    from PIL import Image

    if resize == "pad":
        fit = max(1, min(width, math.ceil(height * im.width / max(1, im.height))))
        im = im.resize((fit, height), Image.BILINEAR)
    else:
        im = im.resize((width, height), Image.BILINEAR)
    a = (np.asarray(im, dtype=np.float32).reshape(im.height, im.width, channels) / 255.0 - mean) / std
    if a.shape[1] < width:
        a = np.concatenate([a, np.zeros((height, width - a.shape[1], channels), np.float32)], axis=1)
    return a


def _converted(im, channels):
    """Any mode (grayscale, palette, RGBA, 16-bit) to RGB or L; transparency over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        span = a.max() - a.min()
        from PIL import Image
        im = Image.fromarray(np.uint8(np.rint(255 * (a - a.min()) / span)) if span else np.zeros(a.shape, np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        from PIL import Image
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)
    return im.convert("RGB" if channels == 3 else "L")


def _per_channel(values, default, channels, field) -> np.ndarray:
    if values is None:
        v = np.asarray(default, dtype=np.float32)
        return v if channels == 3 else np.full(channels, v.mean(), np.float32)
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if len(v) == 1:
        return np.full(channels, v[0], np.float32)
    if len(v) != channels:
        raise SpaError(f"image calibration: --image-{field} needs 1 or {channels} values, got {len(v)}")
    return v


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
def from_text(plan: _Plan, path: str) -> list:
    opts = plan.options
    if not opts.tokenizer:
        raise SpaError(f"calibration {path}: a text file needs a tokenizer (pass --tokenizer PATH: a "
                       f"tokenizer.json or a directory holding one)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SpaError(f"calibration {path} is not UTF-8 text") from None
    except OSError as exc:
        raise SpaError(f"calibration file {path} cannot be read ({type(exc).__name__})") from None
    lines = [line.strip() for line in text.lstrip("\ufeff").splitlines() if line.strip()]
    if not lines:
        raise SpaError(f"calibration {path} holds no sentences (one a line)")
    ids = [i for i in plan.inputs if i.role == "ids"]
    if not ids:
        loose = [i for i in plan.inputs if not i.is_float and i.dtype != np.bool_ and i.role is None]
        if len(loose) != 1:
            raise SpaError(f"text calibration needs a model with one token-id input indexing an embedding table "
                           f"(inputs: {', '.join(_names(plan))})")
        ids = loose
    for i in plan.inputs:
        if i not in ids and i.role not in ("mask", "types", "positions"):
            raise SpaError(f"text calibration: cannot tell what input '{i.name}' carries (filled by name: "
                           f"*mask*, *type*/*segment*, *position*; the ids index the embedding table)")
        if len(i.dims) != 2:
            raise SpaError(f"text calibration needs [batch, sequence] inputs; '{i.name}' is {_declared(i.dims)}")
    tokenizer = _tokenizer(opts.tokenizer)
    static = plan.known(ids[0], 1)
    static = static if isinstance(static, int) else None
    limit = static or plan.max_tokens()
    if not static and limit < opts.max_length:
        plan.say(f"calibration: sentences truncated at {limit} tokens, the model's position table "
                 f"(max_length {opts.max_length})")
    pad = _pad_id(tokenizer)
    count = plan.sample_count(len(lines), path)
    try:
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=limit)
        encoded = [e.ids for e in tokenizer.encode_batch(lines[:count])]
    except Exception as exc:
        raise SpaError(f"calibration {path}: tokenizer {opts.tokenizer} failed ({first_line(exc, 200)})") from None
    for i in ids:
        top = max((max(e) for e in encoded if e), default=0)
        if i.vocab and top >= i.vocab:
            raise SpaError(f"calibration {path}: tokenizer {opts.tokenizer} gives id {top}, beyond the model's "
                           f"vocabulary of {i.vocab} (input '{i.name}'): is it this model's tokenizer?")
    order = sorted(range(count), key=lambda j: (len(encoded[j]), j))
    feeds = []
    for s in range(0, count, plan.chunk):
        rows = [encoded[j] for j in order[s:s + plan.chunk]]
        length = static or max(1, max(len(r) for r in rows))
        tokens = np.full((len(rows), length), pad, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for r, row in enumerate(rows):
            tokens[r, :len(row)] = row[:length]
            mask[r, :len(row)] = 1
        feed = {}
        for i in plan.inputs:
            value = tokens if i in ids else mask if i.role == "mask" else np.zeros_like(tokens) \
                if i.role == "types" else np.broadcast_to(np.arange(length), tokens.shape)
            feed[i.name] = np.ascontiguousarray(value.astype(i.dtype))
        feeds.append(feed)
    lengths = [f[ids[0].name].shape[1] for f in feeds]
    plan.say(f"calibration: {count} sentences from {path} in {len(feeds)} batches of similar length "
             f"({min(lengths)}..{max(lengths)} tokens)")
    return feeds


def _tokenizer(path):
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SpaError(f"tokenizer {path}: " + ("the directory holds no tokenizer.json" if os.path.isdir(path)
                                                else "no such file"))
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SpaError("text calibration needs the tokenizers package (pip install tokenizers)") from None
    try:
        return Tokenizer.from_file(file)
    except Exception as exc:
        raise SpaError(f"tokenizer {path} cannot be loaded ({first_line(exc, 200)})") from None


@dataclass
class SyntheticVocabulary:
    """Synthetic sentences for a token model from its tokenizer: ``prefix`` + body + ``suffix``:
    the special ids the tokenizer puts around every sentence, a full stop before the closing ones
    (the tokenizer's encoding of '.' after a word), and a body drawn uniformly from
    ``body``: the first FREQUENT_SHARE of its whole-word tokens (ids that decode to text which
    encodes back to that one id: not special tokens, unused slots or word pieces) in id order.
    WordPiece and BPE vocabularies and SentencePiece's scores list tokens roughly from the most
    frequent down, so that share is the tokenizer's everyday words (docs/obspa.md: +0.02 mean
    cosine on MiniLM over uniform random ids)."""
    prefix: list
    suffix: list
    body: np.ndarray
    framing: str  # e.g. "[CLS] ... . [SEP]"
    scaffold: dict | None = None  # word class -> ids for English clauses (`_scaffold`); None: not English

    @classmethod
    def of(cls, path, vocab: int | None) -> "SyntheticVocabulary":
        tokenizer = _tokenizer(path)
        try:
            tokenizer.no_padding()
            tokenizer.no_truncation()
            framed = tokenizer.encode("a", add_special_tokens=True)
            period = _after_word(tokenizer, ".")
            texts = tokenizer.decode_batch([[i] for i in range(tokenizer.get_vocab_size())])
            back = tokenizer.encode_batch(texts, add_special_tokens=False)
        except Exception as exc:
            raise SpaError(f"tokenizer {path} failed ({first_line(exc, 200)})") from None
        special = list(framed.special_tokens_mask)
        lead = next((k for k, v in enumerate(special) if not v), len(special))
        trail = next((k for k, v in enumerate(reversed(special)) if not v), 0)
        closing = framed.ids[len(special) - trail:]
        prefix, suffix = framed.ids[:lead], period + closing
        words = [i for i, (t, e) in enumerate(zip(texts, back)) if t.strip() and e.ids == [i]]
        if not words:
            raise SpaError(f"tokenizer {path}: none of its tokens is a whole word that encodes back to itself; "
                           "cannot draw synthetic sentences from it")
        body = np.array(words[:max(1, round(len(words) * FREQUENT_SHARE))], dtype=np.int64)
        top = max(prefix + suffix + [int(body[-1])])
        if vocab and top >= vocab:
            raise SpaError(f"tokenizer {path} gives id {top}, beyond the model's vocabulary of {vocab}: is it this "
                           f"model's tokenizer?")
        framing = " ".join([tokenizer.id_to_token(i) for i in prefix] + ["..."] +
                           [tokenizer.id_to_token(i) for i in suffix])
        return cls(prefix, suffix, body, framing, _scaffold(tokenizer, body, texts, closing))

    def draw(self, shape: tuple, rng, scaffold: float = 0.0) -> np.ndarray:
        """Ids of `shape`; a `scaffold` share of the sequences (last axis) as English clauses."""
        ids = self.body[rng.integers(0, len(self.body), size=shape)]
        head, tail = len(self.prefix), len(self.suffix)
        if shape and shape[-1] > head + tail:
            ids[..., :head] = self.prefix
            ids[..., shape[-1] - tail:] = self.suffix
            if self.scaffold is not None and scaffold > 0:
                rows = ids.reshape(-1, shape[-1])
                closing = self.scaffold["closing"]
                end = shape[-1] - len(closing)
                for r in np.flatnonzero(rng.random(len(rows)) < scaffold):
                    rows[r, head:end] = _clauses(self.scaffold, end - head, rng)
                    rows[r, end:] = closing
        return ids


def synthetic_vocabulary(path, vocab: int | None) -> SyntheticVocabulary:
    """`SyntheticVocabulary.of`, built once per tokenizer file (as last modified) and vocabulary size:
    a run draws generated batches several times (fit, held-out, recovery), and decoding a 30k-token
    vocabulary takes a quarter of a second each time."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    try:
        stamp = os.stat(file).st_mtime_ns
    except (OSError, TypeError, ValueError):
        return SyntheticVocabulary.of(path, vocab)  # its own error says what is wrong with the path
    return _cached_vocabulary(path, stamp, vocab)


@functools.lru_cache(maxsize=8)
def _cached_vocabulary(path, stamp, vocab) -> SyntheticVocabulary:  # stamp: in the key, not read
    return SyntheticVocabulary.of(path, vocab)


def _after_word(tokenizer, mark: str) -> list:
    """The ids `mark` takes right after a word (in 'a' + mark); [] where it does not encode apart."""
    word, marked = (tokenizer.encode(t, add_special_tokens=False).ids for t in ("a", "a" + mark))
    ids = marked[len(word):]
    return ids if marked[:len(word)] == word and tokenizer.decode(ids).strip() == mark else []


def _scaffold(tokenizer, body: np.ndarray, texts: list, closing: list) -> dict | None:
    """Word classes of English clauses for this tokenizer: SCAFFOLD_WORDS that are one token each
    (as a word after a space), '.', '?', '!' and ',' after a word, and the open slots: `body`'s
    alphabetic words of two letters or more. None where a tenth of those words or a mark is missing
    (not an English vocabulary)."""
    def one(text):  # the id of `text` as one token (not an unknown-word id)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return ids[0] if len(ids) == 1 and tokenizer.decode(ids).strip() == text.strip() else None

    marks = {}
    for mark in ".?!,":
        ids = _after_word(tokenizer, mark)
        marks[mark] = ids[0] if len(ids) == 1 else None
    classes = {k: [one(" " + w) for w in v.split()] for k, v in SCAFFOLD_WORDS.items()}
    found = [i for ids in classes.values() for i in ids if i is not None]
    if None in marks.values() or len(found) < 0.9 * sum(len(ids) for ids in classes.values()):
        return None
    closed = set(found) | set(marks.values())
    alphabetic = [int(i) for i in body if texts[i].strip().isascii() and texts[i].strip().isalpha()
                  and len(texts[i].strip()) > 1 and int(i) not in closed]
    if not alphabetic:
        return None
    scaffold = {k: np.array([i for i in ids if i is not None]) for k, ids in classes.items()}
    return {**scaffold, "open": np.array(alphabetic), "marks": marks, "closing": list(closing)}


def _clauses(words: dict, length: int, rng) -> list:
    """`length` ids of English-shaped clauses (statements, questions, one-word replies, two clauses
    joined), open slots filled at random; cut to length, ending on '.', '?' or '!'."""
    def pick(kind):
        return int(words[kind][rng.integers(len(words[kind]))])

    def noun_phrase():
        if rng.random() < 0.3:
            return [pick("pron")]
        phrase = ([pick("det")] if rng.random() < 0.8 else []) + [pick("open") for _ in range(rng.integers(1, 3))]
        if rng.random() < 0.2:
            phrase += [pick("prep")] + ([pick("det")] if rng.random() < 0.7 else []) + [pick("open")]
        return phrase

    def verb_phrase():
        phrase = ([pick("aux")] if rng.random() < 0.5 else []) + ([pick("adv")] if rng.random() < 0.15 else [])
        phrase += [pick("open")]
        if rng.random() < 0.7:
            phrase += noun_phrase() if rng.random() < 0.7 else [pick("obj")]
        if rng.random() < 0.4:
            phrase += [pick("prep")] + noun_phrase()
        return phrase

    marks = words["marks"]
    out: list = []
    while len(out) < length:
        kind = rng.random()
        if kind < 0.08:
            out += [pick("open") for _ in range(rng.integers(1, 3))] + [marks[".!?"[rng.integers(3)]]]
        elif kind < 0.28:
            out += [pick("wh"), pick("aux")] + noun_phrase() + verb_phrase()[-3:] + [marks["?"]]
        else:
            clause = noun_phrase() + verb_phrase()
            if rng.random() < 0.25:
                clause += [marks[","], pick("conj")] + noun_phrase() + verb_phrase()
            out += clause + [marks["." if rng.random() < 0.85 else "!"]]
    out = out[:length]
    if length and out[-1] not in (marks["."], marks["?"], marks["!"]):
        out[-1] = marks["."]
    return out


def _pad_id(tokenizer) -> int:
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|pad|>", "<PAD>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0
