"""Google's magika file-type classifier (pip magika, `make survey-models`: 214 content types from a file's first and
last 1024 bytes) and files to judge it on: the files of this machine's site-packages, a few of every extension, as
magika's own feature extraction reads them. What it finds there is the reference; a pruned model is scored by the
share of files it labels as the original does. The files differ from machine to machine (what is installed), so
figures compare runs on one machine.

Public API
----------
magika_path() -> str                         standard_v3_3/model.onnx inside the package
features(content) -> int32 [2048]            magika's input: the first 1024 bytes after leading whitespace and the
                                             last 1024 before trailing whitespace, padded with 256 (its padding token)
machine_files(root, count, seed, skip=()) -> list of paths   `count` files of at least 64 bytes, an extension drawn
                                             uniformly, then a file of it
file_features(paths) -> int32 [N, 2048]
"""
from __future__ import annotations

import glob
import importlib.util
import os
import random

import numpy as np

BEGINNING = END = 1024
BLOCK = 4096
PADDING = 256


def magika_path() -> str:
    spec = importlib.util.find_spec("magika")
    if spec is None or spec.origin is None:
        raise ImportError("magika is not installed (make survey-models)")
    return os.path.join(os.path.dirname(spec.origin), "models", "standard_v3_3", "model.onnx")


def features(content: bytes) -> np.ndarray:
    """magika's features of a file (Magika._extract_features_from_seekable, beg_size = end_size = 1024)."""
    if len(content) <= BLOCK:
        beginning = end = content.strip()
    else:
        beginning, end = content[:BLOCK].lstrip(), content[-BLOCK:].rstrip()
    first = list(beginning[:BEGINNING])
    last = list(end[-END:]) if end else []
    return np.array(first + [PADDING] * (BEGINNING - len(first)) + [PADDING] * (END - len(last)) + last, np.int32)


def machine_files(root: str, count: int, seed: int, skip=()) -> list:
    rng = random.Random(seed)
    paths = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                   if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) >= 64 and p not in skip)
    by_extension: dict = {}
    for path in paths:
        by_extension.setdefault(os.path.splitext(path)[1].lower(), []).append(path)
    extensions = sorted(by_extension)
    return [rng.choice(by_extension[rng.choice(extensions)]) for _ in range(count)]


def file_features(paths) -> np.ndarray:
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(features(f.read()))
    return np.stack(out)
