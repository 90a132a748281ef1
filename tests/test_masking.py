"""Host-side masking matches the official algorithm; every validation error names the problem."""

from __future__ import annotations

import numpy as np
import pytest

from mae_deploy.errors import InputError
from mae_deploy.masking import (
    all_visible,
    check_batch,
    check_decode_inputs,
    check_encode_inputs,
    check_ids_keep,
    check_ids_restore,
    check_latent,
    check_pixel_values,
    random_masking,
)
from mae_deploy.patches import denormalize_norm_pix, mask_to_pixels, patchify, unpatchify


def test_masking_is_reproducible_from_a_seed():
    a = random_masking(4, 196, 0.75, rng=123)
    b = random_masking(4, 196, 0.75, rng=np.random.default_rng(123))
    c = random_masking(4, 196, 0.75, rng=124)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_masking_semantics():
    ids_keep, ids_restore, mask = random_masking(3, 196, 0.75, rng=0)
    assert ids_keep.shape == (3, 49) and ids_keep.dtype == np.int64
    assert ids_restore.shape == (3, 196) and ids_restore.dtype == np.int64
    assert mask.dtype == np.float32 and (mask.sum(1) == 147).all()
    for r in range(3):
        # Kept patches are exactly the unmasked ones; ids_restore inverts the shuffle.
        assert set(ids_keep[r]) == set(np.flatnonzero(mask[r] == 0))
        assert sorted(ids_restore[r]) == list(range(196))
    # Small noise is kept: with noise = position, the first K patches are kept.
    noise = np.tile(np.arange(16, dtype=np.float64), (2, 1))
    ids_keep, _, mask = random_masking(2, 16, 0.75, noise=noise)
    np.testing.assert_array_equal(ids_keep, [[0, 1, 2, 3]] * 2)
    np.testing.assert_array_equal(mask[0], [0] * 4 + [1] * 12)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_matches_training_random_masking_on_the_same_noise(ratio):
    torch = pytest.importorskip("torch")
    from training.model import random_masking as torch_masking

    noise = np.random.default_rng(7).random((5, 64)).astype(np.float32)
    ours = random_masking(5, 64, ratio, noise=noise)
    ref = torch_masking(5, 64, ratio, noise=torch.from_numpy(noise))
    for x, y in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(x, y.numpy())


def test_masking_rejects_bad_ratios():
    with pytest.raises(InputError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(1, 16, 1.0)
    with pytest.raises(InputError, match="leaves no visible patch out of 16"):
        random_masking(1, 16, 0.99)
    with pytest.raises(InputError, match=r"noise has shape \(3, 16\), expected \(2, 16\)"):
        random_masking(2, 16, 0.5, noise=np.zeros((3, 16)))


def test_all_visible():
    ids_keep, ids_restore, mask = all_visible(2, 5)
    np.testing.assert_array_equal(ids_keep, [[0, 1, 2, 3, 4]] * 2)
    np.testing.assert_array_equal(ids_restore, ids_keep)
    assert not mask.any()


# -- validation ------------------------------------------------------------------------------------


def test_ids_keep_errors():
    ok = check_ids_keep(np.array([[0, 5, 3]], dtype=np.int32), 16)
    assert ok.dtype == np.int64 and ok.flags.c_contiguous
    with pytest.raises(InputError, match=r"ids_keep must have rank 2 \(batch, tokens\), got shape \(3,\)"):
        check_ids_keep(np.array([0, 1, 2]), 16)
    with pytest.raises(InputError, match="ids_keep must hold integers .* got dtype float32"):
        check_ids_keep(np.zeros((1, 3), np.float32), 16)
    with pytest.raises(InputError, match="ids_keep row 1 has index 16 out of range"):
        check_ids_keep(np.array([[0, 1], [2, 16]]), 16)
    with pytest.raises(InputError, match="ids_keep row 0 has index -1 out of range"):
        check_ids_keep(np.array([[-1, 1]]), 16)
    ids = np.tile(np.arange(4), (5, 1))
    ids[3, 2] = 1
    with pytest.raises(InputError, match="ids_keep row 3 has duplicate index 1"):
        check_ids_keep(ids, 16)
    with pytest.raises(InputError, match="ids_keep has 17 visible tokens per row but the model has only 16 patches"):
        check_ids_keep(np.zeros((1, 17), np.int64), 16)
    with pytest.raises(InputError, match="at least one row and one visible token"):
        check_ids_keep(np.zeros((1, 0), np.int64), 16)
    with pytest.raises(InputError, match="must be a numpy array, got list"):
        check_ids_keep([[0, 1]], 16)


def test_ids_restore_errors():
    perm = np.stack([np.random.default_rng(i).permutation(16) for i in range(3)])
    assert check_ids_restore(perm, 16).shape == (3, 16)
    with pytest.raises(InputError, match=r"ids_restore has shape \(3, 15\), expected \(batch, 16\)"):
        check_ids_restore(perm[:, :15], 16)
    bad = perm.copy()
    bad[2, 0] = bad[2, 1]
    with pytest.raises(InputError, match=f"ids_restore row 2 has duplicate index {bad[2, 1]}"):
        check_ids_restore(bad, 16)


def test_pixel_values_errors():
    x = np.zeros((2, 3, 32, 32), np.float64)
    out = check_pixel_values(x, 3, 32)
    assert out.dtype == np.float32
    with pytest.raises(InputError, match=r"pixel_values must have rank 4 \(N, C, H, W\), got shape \(3, 32, 32\)"):
        check_pixel_values(x[0], 3, 32)
    with pytest.raises(InputError, match="must be floating point .* got dtype uint8 .*preprocess images first"):
        check_pixel_values(x.astype(np.uint8), 3, 32)
    with pytest.raises(InputError, match=r"shape \(2, 3, 64, 64\) but the model expects \(N, 3, 32, 32\)"):
        check_pixel_values(np.zeros((2, 3, 64, 64), np.float32), 3, 32)
    with pytest.raises(InputError, match=r"shape \(2, 32, 32, 3\) but the model expects \(N, 3, 32, 32\)"):
        check_pixel_values(np.zeros((2, 32, 32, 3), np.float32), 3, 32)


def test_latent_errors():
    with pytest.raises(InputError, match="latent must have rank 3"):
        check_latent(np.zeros((2, 32), np.float32), 32, 16)
    with pytest.raises(InputError, match="latent has width 16 but the model's encoder width is 32"):
        check_latent(np.zeros((2, 5, 16), np.float32), 32, 16)
    with pytest.raises(InputError, match=r"latent has 18 tokens; expected cls \+ 1..16 visible"):
        check_latent(np.zeros((2, 18, 32), np.float32), 32, 16)
    with pytest.raises(InputError, match="latent must be floating point"):
        check_latent(np.zeros((2, 5, 32), np.int64), 32, 16)


def test_batch_mismatch():
    x = np.zeros((4, 3, 32, 32), np.float32)
    ids = np.tile(np.arange(4), (3, 1))
    with pytest.raises(InputError, match="batch mismatch: pixel_values has batch 4 but ids_keep has batch 3"):
        check_encode_inputs(x, ids, in_chans=3, image_size=32, num_patches=16)
    lat = np.zeros((2, 5, 32), np.float32)
    with pytest.raises(InputError, match="batch mismatch: latent has batch 2 but ids_restore has batch 1"):
        check_decode_inputs(lat, np.arange(16)[None], embed_dim=32, num_patches=16)
    assert check_batch(a=np.zeros(3), b=np.zeros((3, 2))) == 3


# -- patches -----------------------------------------------------------------------------------------


def test_patchify_matches_the_model_layout_and_round_trips():
    torch = pytest.importorskip("torch")
    from training.model import create_model

    model = create_model("mae_vit_test")
    imgs = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    p = patchify(imgs, 8)
    np.testing.assert_array_equal(p, model.patchify(torch.from_numpy(imgs)).numpy())
    np.testing.assert_array_equal(unpatchify(p, 8, 3), imgs)
    # Channel fastest inside a patch: the first three values are pixel (0, 0) of patch 0.
    np.testing.assert_array_equal(p[0, 0, :3], imgs[0, :, 0, 0])


def test_norm_pix_denormalisation_inverts_the_training_target():
    rng = np.random.default_rng(1)
    target = rng.standard_normal((2, 16, 192)) * 3 + 1
    mean, var = target.mean(-1, keepdims=True), target.var(-1, ddof=1, keepdims=True)
    normalised = (target - mean) / np.sqrt(var + 1e-6)  # the training target (unbiased var)
    np.testing.assert_allclose(denormalize_norm_pix(normalised, target), target, atol=1e-5)


def test_mask_to_pixels():
    m = mask_to_pixels(np.array([[1, 0, 0, 1]], np.float32), 2)
    np.testing.assert_array_equal(m[0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
