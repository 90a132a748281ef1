"""The MAE facts of DESIGN.md, checked against independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.model import (
    VisionTransformer,
    create_model,
    get_2d_sincos_pos_embed,
    get_config,
    interpolate_pos_embed,
    random_masking,
)


def test_sincos_matches_independent_formula():
    dim, grid = 16, 4
    emb = get_2d_sincos_pos_embed(dim, grid)
    assert emb.shape == (1 + grid * grid, dim) and emb.dtype == np.float64
    assert np.all(emb[0] == 0)  # cls row
    q = dim // 4  # frequencies per (axis, sin/cos)
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        for i in range(q):
            w = 1.0 / 10000 ** (i / q)
            # first half: column (w) coordinate, sin then cos; second half: row coordinate.
            assert emb[1 + index, i] == pytest.approx(math.sin(col * w), abs=1e-12)
            assert emb[1 + index, q + i] == pytest.approx(math.cos(col * w), abs=1e-12)
            assert emb[1 + index, 2 * q + i] == pytest.approx(math.sin(row * w), abs=1e-12)
            assert emb[1 + index, 3 * q + i] == pytest.approx(math.cos(row * w), abs=1e-12)


def test_model_uses_sincos_and_registry_shapes():
    m = create_model("mae_vit_test")
    ref = torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float()
    assert torch.equal(m.pos_embed[0], ref)
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    for name, (dim, depth, heads, p) in {
        "mae_vit_base_patch16": (768, 12, 12, 16),
        "mae_vit_large_patch16": (1024, 24, 16, 16),
        "mae_vit_huge_patch14_dec512d8b": (1280, 32, 16, 14),
    }.items():
        c = get_config(name)
        assert (c.embed_dim, c.depth, c.num_heads, c.patch_size) == (dim, depth, heads, p)
        assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (512, 8, 16)
        assert c.mlp_ratio == 4 and c.qkv_bias and c.norm_eps == 1e-6


def test_patchify_layout_and_inverse():
    m = create_model("mae_vit_test")  # patch 8, 3 channels
    x = torch.randn(2, 3, 32, 32)
    patches = m.patchify(x)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    # patch (row 1, col 2), pixel (3, 5), channel c -> index (3*8 + 5)*3 + c: channel fastest.
    for c in range(3):
        assert patches[1, 1 * 4 + 2, (3 * 8 + 5) * 3 + c] == x[1, c, 8 + 3, 16 + 5]
    assert torch.equal(m.unpatchify(patches), x)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_invariants(ratio):
    n, length = 4, 196
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(n, length, ratio, generator=g)
    keep = int(length * (1 - ratio))
    assert ids_keep.shape == (n, keep) and ids_restore.shape == (n, length)
    assert torch.all(mask.sum(1) == length - keep)
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(length).expand(n, -1))
    assert torch.equal(ids_shuffle[:, :keep], ids_keep)
    # kept patches are exactly the mask == 0 ones
    kept = torch.zeros(n, length).scatter_(1, ids_keep, 1.0)
    assert torch.equal(kept, 1 - mask)


def test_small_noise_is_kept():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    ids_keep, _, mask = random_masking(1, 4, 0.5, noise=noise)
    assert ids_keep.tolist() == [[1, 3]] and mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_encoder_sees_only_visible_tokens_and_decoder_every_patch():
    m = create_model("mae_vit_test").eval()
    x = torch.randn(2, 3, 32, 32)
    ids_keep, ids_restore, _ = random_masking(2, 16, 0.75)
    latent = m.forward_encoder(x, ids_keep)
    assert latent.shape == (2, 1 + 4, 32)
    assert m.forward_decoder(latent, ids_restore).shape == (2, 16, 192)
    # Changing a masked-out patch's pixels does not change the latent.
    masked_patch = int(ids_restore[0].argmax())  # the last in shuffle order is removed
    r, c = divmod(masked_patch, 4)
    y = x.clone()
    y[0, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 5.0
    assert torch.allclose(m.forward_encoder(y, ids_keep)[0], latent[0])
    # With every token visible, the order given by ids_keep only permutes the outputs.
    full = m.forward_encoder(x)
    perm = torch.randperm(16).expand(2, -1)
    permuted = m.forward_encoder(x, perm)
    assert torch.allclose(permuted[:, 1:], full[:, 1:][:, perm[0]], atol=1e-5)


def test_loss_counts_masked_patches_only_and_norm_pix():
    torch.manual_seed(0)
    m = create_model("mae_vit_test", norm_pix_loss=True)
    x = torch.rand(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    _, ids_restore, mask = random_masking(2, 16, 0.75, noise=noise)
    target = m.patchify(x)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, unbiased=True)
    normed = (target - mean) / torch.sqrt(var + 1e-6)
    pred = normed.clone()
    pred[mask == 0] += 3.0  # errors on visible patches must not count
    assert m.forward_loss(x, pred, mask).item() == pytest.approx(0.0, abs=1e-10)
    pred = normed + 1.0
    assert m.forward_loss(x, pred, mask).item() == pytest.approx(1.0, rel=1e-5)


def test_mask_ratio_zero_has_no_nan():
    m = create_model("mae_vit_test")
    loss, pred, mask = m(torch.randn(2, 3, 32, 32), mask_ratio=0.0)
    assert torch.isfinite(loss) and torch.isfinite(pred).all() and mask.sum() == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_other_image_sizes_and_channels():
    m = create_model("mae_vit_test", img_size=48, in_chans=1)
    loss, pred, _ = m(torch.randn(1, 1, 48, 48))
    assert pred.shape == (1, 36, 64) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        create_model("mae_vit_test", img_size=36)


def test_interpolate_pos_embed_bicubic():
    pe = torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float().unsqueeze(0)
    out = interpolate_pos_embed(pe, 8)
    assert out.shape == (1, 65, 32) and torch.equal(out[:, 0], pe[:, 0])
    assert interpolate_pos_embed(pe, 4) is pe
    # A smooth grid survives down- then up-sampling approximately; values stay bounded by bicubic overshoot.
    assert out[:, 1:].abs().max() <= 1.3


def test_classifier_pools():
    cfg = get_config("mae_vit_test")
    x = torch.randn(2, 3, 32, 32)
    gp = VisionTransformer(cfg, 5, global_pool=True)
    assert gp(x).shape == (2, 5) and "fc_norm.weight" in gp.state_dict() and "norm.weight" not in gp.state_dict()
    manual = gp.fc_norm(gp.forward_encoder(x)[:, 1:].mean(1))
    assert torch.allclose(gp.forward_features(x), manual)
    cls = VisionTransformer(cfg, 5, global_pool=False)
    assert torch.allclose(cls.forward_features(x), cls.forward_encoder(x)[:, 0])
    assert "norm.weight" in cls.state_dict()
