"""The exported graphs as nn.Modules, and resizing a model before export.

The encoder and decoder take the host's mask as index arrays (``ids_keep``, ``ids_restore``) instead of a
mask ratio, so they hold no random ops and one encoder file serves any number of visible tokens. The
classifier sees every patch (as fine-tuning and linear probing evaluate) and returns logits.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from mae_deploy.errors import InputError
from mae_deploy.names import CLASSIFIER
from training.model import MaskedAutoencoderViT, VisionTransformer, interpolate_pos_embed


class EncoderGraph(nn.Module):
    """pixel_values (N,C,H,W) float32, ids_keep (N,K) int64 -> latent (N,1+K,D), pooled_cls (N,D),
    pooled_mean (N,D), all float32.

    The pooled outputs (``names.POOLED_OUTPUTS``) let a GPU runner fetch (N, D) features without copying the
    whole latent to the host; they are ``mae_deploy.pooling.pool_latent``'s cls and mean.
    """

    def __init__(self, model: MaskedAutoencoderViT | VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, pixel_values: torch.Tensor, ids_keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent = self.model.forward_encoder(pixel_values, ids_keep)
        return latent, latent[:, 0], latent[:, 1:].mean(dim=1)


class DecoderGraph(nn.Module):
    """latent (N,1+K,D) float32, ids_restore (N,L) int64 -> pred (N,L,p*p*C) float32."""

    def __init__(self, model: MaskedAutoencoderViT) -> None:
        super().__init__()
        if not getattr(model, "has_decoder", False):
            raise InputError("this checkpoint has no decoder (encoder-only): export it with --parts encoder")
        self.model = model

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return self.model.forward_decoder(latent, ids_restore)


class ClassifierGraph(nn.Module):
    """pixel_values (N,C,H,W) float32 -> logits (N,num_classes) float32, every patch visible.

    Global-pool checkpoints (official fine-tuning): mean of the patch tokens, fc_norm, head. Cls-token
    checkpoints (our linear probe saves these, its BatchNorm folded into the head): the cls token after the
    encoder norm, head.
    """

    def __init__(self, model: MaskedAutoencoderViT | VisionTransformer) -> None:
        super().__init__()
        if not isinstance(model, VisionTransformer) or model.num_classes <= 0:
            raise InputError(
                "this checkpoint has no classification head: the classifier graph needs a fine-tuned or "
                "linear-probe checkpoint (mae-deploy finetune / linprobe)"
            )
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


def graph_module(model: MaskedAutoencoderViT | VisionTransformer, part: str) -> nn.Module:
    """The wrapper for ``part`` ("encoder", "decoder" or "classifier"), in eval mode."""
    if part == "encoder":
        return EncoderGraph(model).eval()
    if part == "decoder":
        return DecoderGraph(model).eval()
    if part == CLASSIFIER:
        return ClassifierGraph(model).eval()
    raise InputError(f"unknown part {part!r}; use encoder, decoder or classifier")


def resize_model(
    model: MaskedAutoencoderViT | VisionTransformer, image_size: int
) -> MaskedAutoencoderViT | VisionTransformer:
    """A copy of ``model`` for ``image_size`` input: position-embedding grids resized bicubically.

    This is what the official fine-tuning code does when it loads a checkpoint at another resolution
    (the sin-cos grid is interpolated, not recomputed), so features match a model fine-tuned that way.
    The patch embedding is a strided convolution and does not depend on the image size.
    """
    cfg = model.config
    if image_size == cfg.img_size:
        return model
    if image_size <= 0 or image_size % cfg.patch_size:
        raise InputError(
            f"--image-size {image_size} is not a positive multiple of the patch size {cfg.patch_size}; "
            f"try {max(1, round(image_size / cfg.patch_size)) * cfg.patch_size}"
        )
    grid = image_size // cfg.patch_size
    out = copy.deepcopy(model)
    out.config = replace(cfg, img_size=image_size)
    with torch.no_grad():
        out.pos_embed = nn.Parameter(interpolate_pos_embed(model.pos_embed.detach(), grid), requires_grad=False)
        if getattr(model, "has_decoder", False):
            out.decoder_pos_embed = nn.Parameter(
                interpolate_pos_embed(model.decoder_pos_embed.detach(), grid), requires_grad=False
            )
    return out.eval()
