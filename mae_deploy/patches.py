"""Patches in numpy, in the official layout, and the norm-pix de-normalisation.

A patch vector is ordered (row-in-patch, col-in-patch, channel), channel fastest; patches are row-major
over the grid. This is the layout of the decoder's predictions (not the Conv2d weight order).
"""

from __future__ import annotations

import math

import numpy as np

NORM_PIX_EPS = 1e-6  # the official norm-pix target: (t - mean) / sqrt(var + 1e-6)


def patchify(imgs: np.ndarray, patch_size: int) -> np.ndarray:
    """(N, C, H, W) -> (N, L, p*p*C)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible into {p}x{p} patches")
    x = imgs.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1)  # (N, h, w, p, p, C)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: np.ndarray, patch_size: int, in_chans: int) -> np.ndarray:
    """(N, L, p*p*C) -> (N, C, H, W) for a square grid."""
    n, num_patches, _ = x.shape
    g, p, c = math.isqrt(num_patches), patch_size, in_chans
    if g * g != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    x = x.reshape(n, g, g, p, p, c).transpose(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
    return x.reshape(n, c, g * p, g * p)


def denormalize_norm_pix(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Undo the norm-pix target with each target patch's own statistics.

    ``pred`` and ``target`` are (N, L, p*p*C); ``target`` is the patchified input image. Returns
    pred * sqrt(var + 1e-6) + mean with mean and unbiased var over each patch of ``target``. For a
    masked patch this borrows the true patch's mean and variance (the model never predicts them), so
    the brightness and contrast of masked patches in such a reconstruction come from the original.
    """
    target = target.astype(np.float64)
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    return (pred * np.sqrt(var + NORM_PIX_EPS) + mean).astype(np.float32)


def mask_to_pixels(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """(N, L) patch mask -> (N, H, W) pixel mask (same values, each patch expanded to p x p)."""
    n, num_patches = mask.shape
    g = math.isqrt(num_patches)
    m = mask.reshape(n, g, g)
    return np.repeat(np.repeat(m, patch_size, axis=1), patch_size, axis=2)
