"""Host-side masking (numpy) and validation of the arrays a runner is fed.

Masks are made here and passed to the graphs as index arrays, so the graphs hold no random ops and a
seed reproduces a mask on every backend. The algorithm is the official one (argsort of uniform noise,
small noise is kept) and gives the same indices as ``training.model.random_masking`` for the same noise.

Validators are vectorised (one sort per ids array) so they cost little next to inference; they name the
row and index that is wrong, e.g. ``ids_keep row 3 has duplicate index 17``.
"""

from __future__ import annotations

import numpy as np

from mae_deploy.errors import InputError


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), the official rounding (down)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    rng: np.random.Generator | int | None = None,
    noise: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample random masking: ``ids_keep`` int64 (N,K), ``ids_restore`` int64 (N,L), ``mask`` float32 (N,L).

    noise ~ U[0,1) of shape (N,L) (from ``rng``: a Generator, a seed, or None for fresh entropy) unless
    given; ids_shuffle = argsort(noise) so the smallest noise is kept; ids_restore = argsort(ids_shuffle);
    ids_keep = the first K of ids_shuffle; mask = 1 where removed, i.e. ids_restore >= K.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise InputError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if batch < 1 or num_patches < 1:
        raise InputError(f"batch ({batch}) and num_patches ({num_patches}) must be positive")
    keep = num_visible(num_patches, mask_ratio)
    if keep < 1:
        raise InputError(
            f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}; "
            f"use at most {1 - 1 / num_patches:.4f}"
        )
    if noise is None:
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        noise = gen.random((batch, num_patches))  # float64: ties (which would make order arbitrary) never happen
    else:
        noise = np.asarray(noise)
        if noise.shape != (batch, num_patches):
            raise InputError(f"noise has shape {noise.shape}, expected ({batch}, {num_patches})")
    # Stable sorts: the same noise gives the same indices on every platform.
    ids_shuffle = np.argsort(noise, axis=1, kind="stable")
    ids_restore = np.argsort(ids_shuffle, axis=1, kind="stable")
    ids_keep = np.ascontiguousarray(ids_shuffle[:, :keep], dtype=np.int64)
    mask = (ids_restore >= keep).astype(np.float32)
    return ids_keep, ids_restore.astype(np.int64), mask


def all_visible(batch: int, num_patches: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """No masking (feature extraction): every patch in order; mask all zeros."""
    ids = np.broadcast_to(np.arange(num_patches, dtype=np.int64), (batch, num_patches)).copy()
    return ids, ids.copy(), np.zeros((batch, num_patches), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _as_array(x: object, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise InputError(f"{name} must be a numpy array, got {type(x).__name__}")
    return x


def _check_index_rows(ids: np.ndarray, num_patches: int, name: str) -> None:
    """Every index in [0, L) and no index twice within a row."""
    bad = (ids < 0) | (ids >= num_patches)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(f"{name} row {r} has index {ids[r, c]} out of range [0, {num_patches})")
    s = np.sort(ids, axis=1)
    dup = s[:, 1:] == s[:, :-1]
    if dup.any():
        r, c = np.argwhere(dup)[0]
        raise InputError(f"{name} row {r} has duplicate index {s[r, c]}")


def _int64_ids(ids: object, name: str) -> np.ndarray:
    ids = _as_array(ids, name)
    if ids.ndim != 2:
        raise InputError(f"{name} must have rank 2 (batch, tokens), got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{name} must hold integers (int64), got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def check_ids_keep(ids_keep: object, num_patches: int, name: str = "ids_keep") -> np.ndarray:
    """Rank 2 integer array with 1..L distinct indices in [0, L) per row; returns it as contiguous int64."""
    ids = _int64_ids(ids_keep, name)
    k = ids.shape[1]
    if k > num_patches:
        raise InputError(f"{name} has {k} visible tokens per row but the model has only {num_patches} patches")
    if k < 1 or ids.shape[0] < 1:
        raise InputError(f"{name} has shape {ids.shape}: at least one row and one visible token are needed")
    _check_index_rows(ids, num_patches, name)
    return ids


def check_ids_restore(ids_restore: object, num_patches: int, name: str = "ids_restore") -> np.ndarray:
    """Rank 2 integer array, each row a permutation of 0..L-1; returns it as contiguous int64."""
    ids = _int64_ids(ids_restore, name)
    if ids.shape[1] != num_patches or ids.shape[0] < 1:
        raise InputError(f"{name} has shape {ids.shape}, expected (batch, {num_patches})")
    _check_index_rows(ids, num_patches, name)  # L distinct values in [0, L) = a permutation
    return ids


def _float32(x: object, name: str) -> np.ndarray:
    x = _as_array(x, name)
    if not np.issubdtype(x.dtype, np.floating):
        hint = " (preprocess images first: mae_deploy.preprocess.Preprocessor)" if x.dtype == np.uint8 else ""
        raise InputError(f"{name} must be floating point (float32), got dtype {x.dtype}{hint}")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_pixel_values(pixel_values: object, in_chans: int, image_size: int) -> np.ndarray:
    """(N, C, H, W) floating array matching the model; returns it as contiguous float32."""
    x = _float32(pixel_values, "pixel_values")
    if x.ndim != 4:
        raise InputError(f"pixel_values must have rank 4 (N, C, H, W), got shape {x.shape}")
    if x.shape[1:] != (in_chans, image_size, image_size) or x.shape[0] < 1:
        raise InputError(
            f"pixel_values has shape {x.shape} but the model expects (N, {in_chans}, {image_size}, {image_size})"
        )
    return x


def check_latent(latent: object, embed_dim: int, num_patches: int) -> np.ndarray:
    """(N, K+1, D) floating array with 1 <= K <= L; returns it as contiguous float32."""
    x = _float32(latent, "latent")
    if x.ndim != 3:
        raise InputError(f"latent must have rank 3 (N, visible+1, D), got shape {x.shape}")
    if x.shape[2] != embed_dim:
        raise InputError(f"latent has width {x.shape[2]} but the model's encoder width is {embed_dim}")
    if not 2 <= x.shape[1] <= num_patches + 1:
        raise InputError(
            f"latent has {x.shape[1]} tokens; expected cls + 1..{num_patches} visible tokens (2..{num_patches + 1})"
        )
    return x


def check_batch(**arrays: np.ndarray) -> int:
    """All arrays share their first dimension; returns it. ``check_batch(pixel_values=x, ids_keep=i)``."""
    sizes = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(sizes.values())) > 1:
        desc = " but ".join(f"{k} has batch {n}" for k, n in sizes.items())
        raise InputError(f"batch mismatch: {desc}")
    return next(iter(sizes.values()))


def check_encode_inputs(
    pixel_values: object, ids_keep: object, *, in_chans: int, image_size: int, num_patches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Everything a runner checks before ``encode``; returns contiguous float32 / int64 arrays."""
    x = check_pixel_values(pixel_values, in_chans, image_size)
    ids = check_ids_keep(ids_keep, num_patches)
    check_batch(pixel_values=x, ids_keep=ids)
    return x, ids


def check_decode_inputs(
    latent: object, ids_restore: object, *, embed_dim: int, num_patches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Everything a runner checks before ``decode``; returns contiguous float32 / int64 arrays."""
    x = check_latent(latent, embed_dim, num_patches)
    ids = check_ids_restore(ids_restore, num_patches)
    check_batch(latent=x, ids_restore=ids)
    return x, ids
