"""The exported graphs as nn.Modules, and resizing a model before export.

The encoder and decoder take the host's mask as index arrays (``ids_keep``, ``ids_restore``) instead of a
mask ratio, so they hold no random ops and one encoder file serves any number of visible tokens. The
classifier sees every patch (as fine-tuning and linear probing evaluate) and returns logits.

Every graph is written with attention in the layout inference engines fuse (:class:`InferenceAttention`,
put in by :func:`inference_layout`): the same weights and the same function as ``training.model.Attention``,
which the parity grid checks against the model as trained.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from mae_deploy.errors import InputError
from mae_deploy.names import CLASSIFIER
from training.model import Attention, MaskedAutoencoderViT, VisionTransformer, interpolate_pos_embed


class InferenceAttention(nn.Module):
    """``training.model.Attention`` written out for inference engines; x (N,T,D) -> (N,T,D).

    Training's attention is one qkv projection, a 5-D permute and PyTorch's fused
    ``scaled_dot_product_attention`` (what is fast in PyTorch). Exported as is, that becomes a 5-D Transpose
    that OpenVINO runs with its reference kernel and a scaled-dot-product decomposition its attention fusion
    does not match. Here:

    - q, k and v are three projections (``q``, ``k``, ``v``: the row blocks of ``qkv``, shared, not copied),
      so an int8 engine writes each one's int8 output straight from its GEMM instead of splitting a float
      (N,T,3D) tensor first;
    - each is reshaped to (N,heads,T,hd) with 4-D transposes, q is scaled by hd^-0.5, and
      ``softmax(q @ k^T) @ v`` is written out: the pattern OpenVINO, TensorRT and ONNX Runtime fuse.

    On the ViT-B/16 encoder (batch 8, 2 threads, AMX CPU) this made OpenVINO's NNCF int8 graph 1.26x and ONNX
    Runtime's dynamic int8 1.12x faster than the training layout (benchmarks/RESULTS.md, issue #25).
    """

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        d = attn.proj.in_features
        weight, bias = attn.qkv.weight, attn.qkv.bias
        for i, name in enumerate(("q", "k", "v")):
            layer = nn.Linear(d, d, bias=bias is not None, device="meta")
            # Row blocks of a row-major weight are contiguous views: no copy of the weights.
            layer.weight = nn.Parameter(weight[i * d : (i + 1) * d], requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(bias[i * d : (i + 1) * d], requires_grad=False)
            setattr(self, name, layer)
        self.proj = attn.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        hd = d // self.num_heads
        q = self.q(x).reshape(n, t, self.num_heads, hd).transpose(1, 2) * hd**-0.5
        k = self.k(x).reshape(n, t, self.num_heads, hd).transpose(1, 2)
        v = self.v(x).reshape(n, t, self.num_heads, hd).transpose(1, 2)
        weights = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # (N,heads,T,T)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, d))


def inference_layout(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules, sharing its tensors, with every Attention an :class:`InferenceAttention`.

    Only the module tree is copied (parameters and buffers are the model's own), so a ViT-H export does not
    hold its weights twice; ``model`` itself is left as it was.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    out = copy.deepcopy(model, memo=shared)
    for parent in list(out.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Attention):
                setattr(parent, name, InferenceAttention(child))
    return out


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
    """The wrapper for ``part`` ("encoder", "decoder" or "classifier"), in eval mode, in the inference layout."""
    model = inference_layout(model)
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
