"""The Masked Autoencoder (He et al., CVPR 2022) and its ViT classifier, in one file.

Shapes: N batch, C channels, H=W image size, p patch size, L = (H/p)^2 patches, K visible patches,
D encoder width, Dd decoder width.

The encoder takes explicit ``ids_keep`` and the decoder explicit ``ids_restore``: masking is a separate
step (:func:`random_masking`) so that exported graphs hold no random ops and the host decides the mask.
Parameter names follow the official checkpoints (``blocks.0.attn.qkv.weight``, ``decoder_pred``,
``fc_norm``, ``head`` ...), so official state dicts load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mae_deploy.config_check import check_architecture

# --------------------------------------------------------------------------------------------------
# Configuration and registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MAEConfig:
    """Architecture of an MAE (encoder, optional decoder)."""

    name: str = "custom"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8  # 0 = encoder only
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    norm_pix_loss: bool = False

    def __post_init__(self) -> None:
        # The one architecture check (mae_deploy.config_check), shared with config.json and mae.json.
        check_architecture(asdict(self), "architecture", ValueError)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    @property
    def has_decoder(self) -> bool:
        return self.decoder_depth > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"num_classes", "global_pool"})
        if unknown:
            raise ValueError(f"unknown architecture fields {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})


_DEC = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
MODEL_CONFIGS: dict[str, MAEConfig] = {
    "mae_vit_base_patch16": MAEConfig(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DEC),
    "mae_vit_large_patch16": MAEConfig(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DEC),
    "mae_vit_huge_patch14": MAEConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DEC),
    # Small models for tests and the built-in demo.
    "mae_vit_test": MAEConfig(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    ),
    "mae_vit_tiny_patch4": MAEConfig(
        img_size=32,
        patch_size=4,
        embed_dim=128,
        depth=4,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
}
# The official code's names carry the decoder shape too.
for _n in ("base_patch16", "large_patch16", "huge_patch14"):
    MODEL_CONFIGS[f"mae_vit_{_n}_dec512d8b"] = MODEL_CONFIGS[f"mae_vit_{_n}"]
MODEL_CONFIGS = {k: replace(v, name=k) for k, v in MODEL_CONFIGS.items()}


def get_config(name: str, **overrides) -> MAEConfig:
    """Registry config by name, with field overrides (e.g. ``img_size=384, norm_pix_loss=True``)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(sorted(MODEL_CONFIGS))}")
    return replace(MODEL_CONFIGS[name], **overrides)


def create_model(name_or_config: str | MAEConfig, **overrides) -> MaskedAutoencoderViT:
    """Build an MAE at random init from a registry name or a config."""
    cfg = name_or_config if isinstance(name_or_config, MAEConfig) else get_config(name_or_config)
    return MaskedAutoencoderViT(replace(cfg, **overrides) if overrides else cfg)


# --------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embeddings
# --------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): sin of all frequencies, then cos."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """(1+g*g, D) if cls_token else (g*g, D), float64; row-major over the grid.

    The first D/2 channels encode the column (w) coordinate and the last D/2 the row, as in the
    released checkpoints; the cls row is zeros.
    """
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = np.concatenate([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize (1, extra+g*g, D) position embeddings to another grid, bicubic, extra tokens unchanged."""
    extra, grid_tokens = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    old_grid = math.isqrt(grid_tokens.shape[1])
    if old_grid * old_grid != grid_tokens.shape[1]:
        raise ValueError(f"position embedding has {grid_tokens.shape[1]} grid tokens, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)


# --------------------------------------------------------------------------------------------------
# Masking (on top of the model: the encoder itself only sees ids_keep)
# --------------------------------------------------------------------------------------------------


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise; small noise is kept.

    Returns ids_keep (N,K), ids_restore (N,L) and mask (N,L) with 1 = removed, K = int(L*(1-ratio)).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = (ids_restore >= keep).float()
    return ids_keep, ids_restore, mask


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N,L,D), ids (N,K) -> (N,K,D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N,C,H,W) -> (N,L,D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N,heads,T,hd)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block (timm layout: norm1, attn, norm2, mlp)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# Encoder shared by the MAE and the classifier
# --------------------------------------------------------------------------------------------------


class ViTEncoder(nn.Module):
    """patch_embed, cls_token, pos_embed, blocks, norm: the part every checkpoint has."""

    def __init__(
        self, cfg: MAEConfig, drop_path_rate: float = 0.0, learnable_pos: bool = False, final_norm: bool = True
    ) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Fixed sin-cos in pretraining; fine-tuning trains it (as the official fine-tuning does).
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim), requires_grad=learnable_pos)
        rates = torch.linspace(0, drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps, r) for r in rates
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if final_norm else nn.Identity()

    def _init_encoder(self) -> None:
        sincos = get_2d_sincos_pos_embed(self.config.embed_dim, self.config.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(sincos).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data  # initialise like a Linear over the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """imgs (N,C,H,W), ids_keep (N,K) or None for all -> latent (N,1+K,D) after the final norm."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # (N,L,D)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)  # (N,K,D): visible tokens only
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------------
# The Masked Autoencoder
# --------------------------------------------------------------------------------------------------


class MaskedAutoencoderViT(ViTEncoder):
    """MAE: ViT encoder on visible patches + light decoder that predicts every patch's pixels."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__(cfg)
        if cfg.has_decoder:
            dd = cfg.decoder_embed_dim
            self.decoder_embed = nn.Linear(cfg.embed_dim, dd)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, dd), requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps)
                for _ in range(cfg.decoder_depth)
            )
            self.decoder_norm = nn.LayerNorm(dd, eps=cfg.norm_eps)
            self.decoder_pred = nn.Linear(dd, cfg.patch_dim)
        self.initialize_weights()

    @property
    def has_decoder(self) -> bool:
        return self.config.has_decoder

    def initialize_weights(self) -> None:
        self.apply(_init_weights)
        self._init_encoder()
        if self.has_decoder:
            sincos = get_2d_sincos_pos_embed(self.config.decoder_embed_dim, self.config.grid_size)
            self.decoder_pos_embed.data.copy_(torch.from_numpy(sincos).float().unsqueeze(0))
            nn.init.normal_(self.mask_token, std=0.02)

    # -- patches --------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N,C,H,W) -> (N,L,p*p*C), each patch ordered (row, col, channel), channel fastest."""
        p, c = self.config.patch_size, imgs.shape[1]
        n, h, w = imgs.shape[0], imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(n, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (N,h,w,p,p,C)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N,L,p*p*C) -> (N,C,H,W)."""
        p, c = self.config.patch_size, self.config.in_chans
        n, g = x.shape[0], math.isqrt(x.shape[1])
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (N,C,h,p,w,p)
        return x.reshape(n, c, g * p, g * p)

    # -- decoder --------------------------------------------------------------------------------
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N,1+K,D), ids_restore (N,L) -> pred (N,L,p*p*C) for every patch."""
        if not self.has_decoder:
            raise RuntimeError("this checkpoint has no decoder (encoder-only); reconstruction needs one")
        x = self.decoder_embed(latent)  # (N,1+K,Dd)
        n, num_patches = x.shape[0], ids_restore.shape[1]
        masked = self.mask_token.expand(n, num_patches + 1 - x.shape[1], -1)  # (N,L-K,Dd)
        tokens = gather_tokens(torch.cat([x[:, 1:], masked], dim=1), ids_restore)  # unshuffle
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop cls

    # -- loss -----------------------------------------------------------------------------------
    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over removed patches only (per-patch normalised target if norm_pix_loss)."""
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in the paper's code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N,L)
        # mask_ratio 0 leaves nothing to predict: define the loss as 0 rather than 0/0.
        return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, pred (N,L,p*p*C), mask (N,L) with 1 = removed)."""
        ids_keep, ids_restore, mask = random_masking(
            imgs.shape[0], self.config.num_patches, mask_ratio, noise=noise, device=imgs.device
        )
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask.to(pred.dtype)), pred, mask


# --------------------------------------------------------------------------------------------------
# Classifier for fine-tuning and linear probing
# --------------------------------------------------------------------------------------------------


class VisionTransformer(ViTEncoder):
    """ViT classifier on the MAE encoder: global average pool + fc_norm (official fine-tuning), or the
    cls token after the encoder norm; then ``head``."""

    def __init__(self, cfg: MAEConfig, num_classes: int, global_pool: bool = True, drop_path_rate: float = 0.0) -> None:
        # With global pooling the official model replaces `norm` by `fc_norm` after pooling.
        super().__init__(cfg, drop_path_rate=drop_path_rate, learnable_pos=True, final_norm=not global_pool)
        self.global_pool = global_pool
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if global_pool else nn.Identity()
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self._init_encoder()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)  # official fine-tuning head init

    @property
    def num_classes(self) -> int:
        return self.head.out_features if isinstance(self.head, nn.Linear) else 0

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N,C,H,W) -> pooled features (N,D) before the head."""
        x = self.forward_encoder(imgs)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return x[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs))
