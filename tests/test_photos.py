"""models/photos.py: the crops and copies SSCD is judged on (bench_quality_real.py --models sscd)."""
import numpy as np

from models.photos import copies, descriptor_agreement, photo_crops


def test_crops_are_uint8_pixels_drawn_alike_for_a_seed_and_copies_change_them():
    crops = photo_crops(6, seed=0, size=64)
    assert crops.shape == (6, 64, 64, 3) and crops.dtype == np.uint8
    assert np.array_equal(crops, photo_crops(6, seed=0, size=64))
    assert not np.array_equal(crops, photo_crops(6, seed=1, size=64))
    copied = copies(crops, seed=1)
    assert copied.shape == crops.shape and copied.dtype == np.uint8
    assert all(not np.array_equal(a, b) for a, b in zip(crops, copied))
    assert np.ptp(copied[0].astype(int), axis=2).max() == 0  # the first copy is grey


def test_descriptor_agreement_is_one_for_the_same_descriptors_and_finds_swapped_ones():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((5, 8))
    same = descriptor_agreement(reference, 3 * reference)
    assert np.isclose(same["cosine"], 1.0) and same["copy_found"] == 1.0
    swapped = reference[[1, 0, 2, 3, 4]]
    assert descriptor_agreement(reference, swapped)["copy_found"] == 0.6
