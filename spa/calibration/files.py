"""Calibration data read from a path (`from_path`): .npz and .npy files, directories of .npy files
or of images (their preprocessing: `_fitted`, `_converted`, `_per_channel`), .txt files (through
`spa.calibration.text.from_text`); arrays checked against the model's declared inputs
(`check_input_array`, `check_static_dims`).
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SpaError
from ..runtime import is_float
from .shapes import DEFAULT_IMAGE, LAYOUT_AXES, _declared, _names, metadata_image_size
from .text import from_text

if TYPE_CHECKING:
    from .feeds import _Plan

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    plan.refuse_unbatched(path)
    data, sizes = {}, {}
    for inp in plan.inputs:
        name, dims, dtype = inp.name, inp.dims, inp.dtype
        a = np.asarray(raw[name])
        check_input_array(f"calibration {path}", name, a, dims, dtype, plan.batch_names, sizes,
                          vocab=inp.vocab if inp.role == "ids" else None)
        if plan.whole(name) and a.shape != tuple(dims):
            raise SpaError(f"calibration {path}: input '{name}' is fed whole in every batch, so it must be "
                           f"{_declared(dims)}, got shape {a.shape}")
        data[name] = a.astype(dtype)
    counts = {len(a) for name, a in data.items() if a.ndim and not plan.whole(name)}
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
        recorded = metadata_image_size(plan.model) or (DEFAULT_IMAGE, DEFAULT_IMAGE)
        height, width = known[h] or recorded[0], known[w] or recorded[1]
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
    right-padded with 0 after normalising, or ("fit": PaddleOCR's table preprocessing) resized keeping its
    aspect to fit the size and padded with 0 on the right and at the bottom."""
    from PIL import Image

    if resize == "pad":
        fit = max(1, min(width, math.ceil(height * im.width / max(1, im.height))))
        im = im.resize((fit, height), Image.BILINEAR)
    elif resize == "fit":
        scale = min(height / max(1, im.height), width / max(1, im.width))
        im = im.resize((max(1, min(width, int(im.width * scale))), max(1, min(height, int(im.height * scale)))),
                       Image.BILINEAR)
    else:
        im = im.resize((width, height), Image.BILINEAR)
    a = (np.asarray(im, dtype=np.float32).reshape(im.height, im.width, channels) / 255.0 - mean) / std
    return np.pad(a, [(0, height - a.shape[0]), (0, width - a.shape[1]), (0, 0)])


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
