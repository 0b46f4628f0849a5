"""Generated inputs that are not model-specific: natural-image noise (`natural_noise`: 1/f spectra,
`dead_leaves`), the integer conventions of generated integer inputs (`_integer_input`: masks,
token types, positions, ids below the vocabulary; `zeros_in_every_sample`: models whose generated
samples would all be alike), and the out-of-distribution sources (`out_of_distribution`:
``ood:noise-uniform``, ``ood:noise-gaussian``, ``ood:<path>``).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SpaError
from .files import from_path
from .shapes import _Input, _pixel_layout, model_inputs

if TYPE_CHECKING:
    from .feeds import _Plan

NATURAL_SLOPES = (0.75, 1.25)  # spectral slopes of synthetic images and signals (natural_noise)
DEAD_LEAVES = 300          # discs (intervals) per dead-leaves image (signal)


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


def zeros_in_every_sample(model) -> list:
    """The integer inputs `_integer_input` fills with zeros, where every generated sample would be the same: no float
    input, no uint8 image and no ids below a vocabulary (masks, token types and positions are the same in every
    sample too); [] where generated samples differ."""
    inputs = model_inputs(model)
    if any(inp.is_float or inp.role == "ids" or _pixel_layout(inp, inp.dims) for inp in inputs):
        return []
    return [inp.name for inp in inputs if inp.role is None and inp.dtype != np.bool_]


def out_of_distribution(plan: _Plan, kind: str, rng) -> list:
    if kind == "noise-uniform":
        return plan.generated(rng, floats=lambda shape: rng.random(shape))
    if kind == "noise-gaussian":
        return plan.generated(rng, floats=lambda shape: 2.0 * rng.standard_normal(shape))
    if not kind:
        raise SpaError("ood: needs a kind (noise-uniform, noise-gaussian) or a path")
    return from_path(plan, kind)
