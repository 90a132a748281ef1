"""16-bit and 32-bit greyscale images scale to 8 bits in integers, equal to round(v / 257) for every value."""

from __future__ import annotations

import numpy as np
from PIL import Image

from mae_deploy.preprocess import _scale_16_to_8, to_rgb


def test_every_16_bit_value_scales_to_the_rounded_quotient():
    a = np.arange(65536, dtype=np.uint16)
    want = np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(_scale_16_to_8(a), want)


def test_16_bit_and_int32_images_through_to_rgb():
    a = np.array([[0, 128, 257, 32896], [65535, 1000, 12345, 65534]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(a)))  # uint16 -> a 16-bit mode (I;16, or I on older Pillow)
    np.testing.assert_array_equal(rgb[..., 0], np.rint(a / 257.0).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all()
    wide = np.array([[-5, 70000], [300, 65535]], dtype=np.int32)  # "I": clipped to 0..65535, then scaled
    got = np.asarray(to_rgb(Image.fromarray(wide)))[..., 0]
    np.testing.assert_array_equal(got, [[0, 255], [1, 255]])
    small = np.array([[-5, 7], [200, 255]], dtype=np.int32)  # "I" within 0..255: kept, negatives clipped
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(small)))[..., 0], [[0, 7], [200, 255]])
