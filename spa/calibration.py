"""Calibration inputs for OBSPA: where the layer inputs X (and so the Hessians) come from.

Sources (the `--calibration` string):

- ``none``: no inputs at all; every Hessian is the identity, so the saliency is the squared norm
  of a channel's consumer weights (a weight-norm criterion) and nothing is compensated.
- ``synthetic`` (default, needs no data): float inputs ~ N(0, 1) (what a normalised input looks
  like); integer inputs: names containing ``mask`` get ones, ``token_type``/``segment`` zeros,
  ``position`` 0..T-1, token ids are uniform below the vocabulary size read from the embedding
  table they index (a Gather on a constant); other integers zeros, booleans True.
- ``bn``: Gaussian inputs whose per-channel mean and variance are fitted so that the first
  BatchNormalization's running statistics are reproduced: BN reading the input directly takes
  them as they are; BN after one Conv on the input solves mean(y) = b + A m by least squares and
  var(y) = B s^2 by non-negative least squares (A, B: the kernel's sums of w and w^2 per
  (out, in) channel; border padding ignored). A model without such a BN is an error (eval
  exports usually fold BN into the Conv: export with BN kept).
- a path: a ``.npz`` file (arrays keyed by input name; a single array for a single-input model),
  a directory of ``.npy`` files (named after the inputs, or, for a single-input model, any names:
  each file one sample or a batch of samples), or a directory of images (PNG/JPEG/BMP; single
  NCHW float input with static C in {1, 3}, H, W: resized to H x W, scaled to [0, 1], then
  normalised by ``mean``/``std``, ImageNet's by default). The first axis is the sample axis.
- ``ood:<kind or path>``: out-of-distribution data: ``ood:noise-uniform`` (floats ~ U[0, 1)),
  ``ood:noise-gaussian`` (floats ~ N(0, 4)) or ``ood:<path>`` (another data set, read as above).

Generated inputs give symbolic sizes other than the batch (e.g. the sequence length) the size
16 unless `dims` names them ({"sequence": 64}).

Bad sources (missing files, unknown input names, wrong shapes or dtypes, empty directories)
raise a one-line SpaError.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from .errors import SpaError
from .graph import Graph
from .runtime import input_specs

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SEQUENCE = 16


def calibration_batches(model: onnx.ModelProto, source: str = "synthetic", samples: int = 128,
                        batch_size: int = 16, seed: int = 0, dims: dict | None = None,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list:
    """Feeds for onnxruntime, `samples` in all, split in batches; [] for "none"."""
    if samples < 1 or batch_size < 1:
        raise SpaError("calibration samples and batch size must be positive")
    source = (source or "synthetic").strip()
    if source == "none":
        return []
    specs = input_specs(model, batch=samples, dims=dims, default_dim=DEFAULT_SEQUENCE)
    rng = np.random.default_rng(seed)
    if source == "synthetic":
        data = synthetic(model, specs, rng)
    elif source == "bn":
        data = from_batchnorm(model, specs, rng)
    elif source.startswith("ood:"):
        data = out_of_distribution(model, specs, source[4:], rng, mean, std)
    else:
        data = from_path(model, specs, source, mean, std)
    return split(data, samples, batch_size)


def split(data: dict, samples: int, batch_size: int) -> list:
    count = min(len(v) for v in data.values())
    count = min(count, samples)
    return [{k: np.ascontiguousarray(v[s:s + batch_size]) for k, v in data.items()}
            for s in range(0, count, batch_size)]


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------
def synthetic(model, specs, rng, floats=None) -> dict:
    data = {}
    for name, shape, dtype in specs:
        if np.issubdtype(dtype, np.floating):
            data[name] = (floats(shape) if floats else rng.standard_normal(shape)).astype(dtype)
        else:
            data[name] = _integer_input(model, name, shape, dtype, rng)
    return data


def _integer_input(model, name, shape, dtype, rng):
    lower = name.lower()
    if dtype == np.bool_ or "mask" in lower:
        return np.ones(shape, dtype=dtype)
    if "token_type" in lower or "segment" in lower:
        return np.zeros(shape, dtype=dtype)
    if "position" in lower:
        return np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
    vocab = vocabulary_size(model, name)
    if vocab:
        return rng.integers(0, vocab, size=shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)


_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten", "Expand"}


def vocabulary_size(model, name) -> int | None:
    """Rows of the constant table that `name` indexes (through casts and reshapes), if any."""
    consts = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = tuple(a.t.dims)
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
                return int(consts[node.input[0]][axis])
            if node.op_type in _PASS_THROUGH and slot == 0:
                frontier.extend(node.output)
    return None


def out_of_distribution(model, specs, kind, rng, mean, std) -> dict:
    if kind == "noise-uniform":
        return synthetic(model, specs, rng, floats=lambda shape: rng.random(shape))
    if kind == "noise-gaussian":
        return synthetic(model, specs, rng, floats=lambda shape: 2.0 * rng.standard_normal(shape))
    if not kind:
        raise SpaError("ood: needs a kind (noise-uniform, noise-gaussian) or a path")
    return from_path(model, specs, kind, mean, std)


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics
# ---------------------------------------------------------------------------------------------
def from_batchnorm(model, specs, rng) -> dict:
    from scipy.optimize import nnls

    floats = [(n, s, d) for n, s, d in specs if np.issubdtype(d, np.floating)]
    if len(floats) != 1 or len(floats[0][1]) < 3:
        raise SpaError("bn calibration needs one float input of shape [N, C, ...]")
    name, shape, dtype = floats[0]
    g = Graph(model)
    bn = next((n for n in g.nodes if n.op_type == "BatchNormalization"), None)
    if bn is None:
        raise SpaError("bn calibration: the model has no BatchNormalization (eval exports fold it "
                       "into Conv; export with BatchNorm kept, or use --calibration synthetic)")
    stats = [g.const(x) for x in bn.input[3:5]]
    if any(s is None for s in stats):
        raise SpaError("bn calibration: the first BatchNormalization's running statistics are not constants")
    mu, var = (np.asarray(s, dtype=np.float64).reshape(-1) for s in stats)
    channels = shape[1]
    if bn.input[0] == name:
        mean, variance = mu, var
    else:
        conv = g.nodes[g.producer[bn.input[0]]] if bn.input[0] in g.producer else None
        if conv is None or conv.op_type != "Conv" or conv.input[0] != name or g.const(conv.input[1]) is None:
            raise SpaError("bn calibration: the first BatchNormalization must read the input directly "
                           "or through one Conv with constant weights")
        A, B, bias = _conv_moments(g, conv, channels)
        mean = np.linalg.lstsq(A, mu - bias, rcond=None)[0]
        variance = nnls(B, var)[0]
    scale = np.sqrt(np.maximum(variance, 1e-4))
    view = (1, -1) + (1,) * (len(shape) - 2)
    x = mean.reshape(view) + scale.reshape(view) * rng.standard_normal(shape)
    data = synthetic(model, specs, rng)
    data[name] = x.astype(dtype)
    return data


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
def from_path(model, specs, path, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    if not os.path.exists(path):
        raise SpaError(f"calibration source '{path}' is neither none, synthetic, bn, ood:... nor an existing path")
    if os.path.isdir(path):
        files = sorted(os.listdir(path))
        arrays = [f for f in files if f.endswith(".npy")]
        images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if arrays:
            raw = _npy_directory(specs, path, arrays)
        elif images:
            raw = _image_directory(specs, path, images, mean, std)
        else:
            raise SpaError(f"calibration directory {path} has no .npy or image files")
    elif path.endswith(".npz"):
        raw = _npz(specs, path)
    elif path.endswith(".npy"):
        raw = _single_input(specs, path, _load(path))
    else:
        raise SpaError(f"calibration file {path}: expected .npz, .npy or a directory")
    data = _checked(specs, raw, path)
    check_static_dims(model, data, path)
    return data


def _load(path):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise SpaError(f"calibration file {path} cannot be read ({type(exc).__name__})") from None


def _single_input(specs, path, array):
    if len(specs) != 1:
        raise SpaError(f"calibration {path}: one unnamed array, but the model has inputs "
                       f"{', '.join(n for n, _, _ in specs)} (name the arrays after them)")
    return {specs[0][0]: array}


def _npz(specs, path):
    archive = _load(path)
    try:
        arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise SpaError(f"calibration file {path} cannot be read ({type(exc).__name__})") from None
    names = [n for n, _, _ in specs]
    if not arrays:
        raise SpaError(f"calibration file {path} holds no arrays")
    if set(names) <= set(arrays):
        return {n: arrays[n] for n in names}
    if len(arrays) == 1 and len(names) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = sorted(set(names) - set(arrays))
    raise SpaError(f"calibration file {path} has no array for input {', '.join(missing)} "
                   f"(has {', '.join(sorted(arrays))})")


def _npy_directory(specs, path, files):
    names = [n for n, _, _ in specs]
    stems = {os.path.splitext(f)[0]: f for f in files}
    if set(names) <= set(stems):
        return {n: _load(os.path.join(path, stems[n])) for n in names}
    if len(names) != 1:
        missing = sorted(set(names) - set(stems))
        raise SpaError(f"calibration directory {path} has no .npy for input {', '.join(missing)}")
    rank = len(specs[0][1])
    parts = []
    for f in files:
        a = _load(os.path.join(path, f))
        parts.append(a[None] if a.ndim == rank - 1 else a)
    if len({p.shape[1:] for p in parts}) != 1 or parts[0].ndim != rank:
        raise SpaError(f"calibration directory {path}: .npy files of different or wrong shapes "
                       f"(input '{names[0]}' has rank {rank})")
    return {names[0]: np.concatenate(parts)}


def _image_directory(specs, path, files, mean, std):
    try:
        from PIL import Image
    except ImportError:
        raise SpaError("image calibration needs Pillow (pip install pillow)") from None
    floats = [(n, s) for n, s, d in specs if np.issubdtype(d, np.floating)]
    if len(specs) != 1 or not floats or len(floats[0][1]) != 4 or floats[0][1][1] not in (1, 3):
        raise SpaError("image calibration needs a model with one float NCHW input with 1 or 3 channels")
    name, (_, channels, height, width) = floats[0]
    images = []
    for f in files:
        try:
            with Image.open(os.path.join(path, f)) as im:
                im = im.convert("RGB" if channels == 3 else "L").resize((width, height))
                a = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as exc:
            raise SpaError(f"calibration image {f} cannot be read ({type(exc).__name__})") from None
        a = a.reshape(height, width, channels).transpose(2, 0, 1)
        m = np.asarray(mean[:channels] if channels == 3 else [np.mean(mean)], dtype=np.float32)
        s = np.asarray(std[:channels] if channels == 3 else [np.mean(std)], dtype=np.float32)
        images.append((a - m[:, None, None]) / s[:, None, None])
    return {name: np.stack(images)}


def _checked(specs, raw, path) -> dict:
    data = {}
    for name, shape, dtype in specs:
        a = np.asarray(raw[name])
        expected = " x ".join("N" if k == 0 else str(d) for k, d in enumerate(shape))
        if a.ndim != len(shape):
            raise SpaError(f"calibration {path}: input '{name}' needs rank {len(shape)} ({expected}), got shape {a.shape}")
        if a.shape[0] == 0:
            raise SpaError(f"calibration {path}: input '{name}' has no samples")
        if not _kind_fits(a.dtype, dtype):
            raise SpaError(f"calibration {path}: input '{name}' needs {np.dtype(dtype).name}, got {a.dtype.name}")
        data[name] = a.astype(dtype)
    counts = {len(a) for a in data.values()}
    if len(counts) != 1:
        raise SpaError(f"calibration {path}: inputs have different sample counts {sorted(counts)}")
    return data


def check_static_dims(model, data: dict, path: str = "calibration"):
    """Axes the model fixes must match (symbolic ones, the batch among them, may be anything)."""
    for vi in model.graph.input:
        if vi.name not in data:
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if k and d.HasField("dim_value") and data[vi.name].shape[k] != d.dim_value:
                raise SpaError(f"calibration {path}: input '{vi.name}' axis {k} must be {d.dim_value}, "
                               f"got shape {data[vi.name].shape}")


def _kind_fits(have, want) -> bool:
    have, want = np.dtype(have), np.dtype(want)
    if np.issubdtype(want, np.floating):
        return np.issubdtype(have, np.floating) or np.issubdtype(have, np.integer) and have.itemsize == 1
    if want == np.bool_:
        return have == np.bool_ or np.issubdtype(have, np.integer)
    return np.issubdtype(have, np.integer) or have == np.bool_
