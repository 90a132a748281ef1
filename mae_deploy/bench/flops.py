"""How much arithmetic one call of a graph does: the FLOP count behind GFLOP/s and the share of peak.

Counted per image, 2 operations per multiply-accumulate (MAC), matrix products only. With L patches of
p*p*C pixels, K visible tokens, width D, MLP hidden H = int(D * mlp_ratio), and n tokens in a block:

    patch embed (encoder: all L patches, before the gather)   2 * L * (p*p*C) * D
    one transformer block on n tokens
        qkv projection                                        2 * n * D * 3D
        attention scores Q K^T (all heads together)           2 * n * n * D
        attention-weighted values A V                         2 * n * n * D
        output projection                                     2 * n * D * D
        MLP (two linears)                                     2 * n * D * H * 2
      = 2 * (4 n D^2 + 2 n D H + 2 n^2 D)
    encoder   patch embed + depth blocks at n = K + 1 (cls + visible)
    decoder   decoder_embed 2 (K+1) D Dd + decoder_depth blocks at n = L + 1, width Dd
              + decoder_pred 2 (L+1) Dd (p*p*C)
    classifier patch embed + depth blocks at n = L + 1 + head 2 D num_classes

Not counted: LayerNorm, softmax, GELU, bias and residual adds, the gathers. Together about 10 M
operations per ViT-B block against 2.9 G of matrix products (< 0.5 %), and they run at memory speed,
not at the MatMul peak the result is compared with.

ViT-B/16 at 224 px, all 196 tokens: 17.56 G MACs per image (the "17.6 GFLOPs" of the ViT and timm
tables, which count MACs), so **35.1 GFLOPs** per image in this module's 2-per-MAC convention. int8
graphs do the same products in integers: the same count, reported as GOP/s.
"""

from __future__ import annotations

from collections.abc import Mapping

from mae_deploy.errors import InputError


def block_flops(tokens: int, dim: int, mlp_hidden: int) -> int:
    """FLOPs of one transformer block (attention + MLP) on ``tokens`` tokens of width ``dim``."""
    n, d, h = tokens, dim, mlp_hidden
    return 2 * (4 * n * d * d + 2 * n * d * h + 2 * n * n * d)


def arch_dims(arch: Mapping) -> tuple[int, int, int, int, int]:
    """(L, patch_dim, D, depth, H) from a bundle's or checkpoint's architecture dict."""
    try:
        grid = int(arch["img_size"]) // int(arch["patch_size"])
        patch_dim = int(arch["patch_size"]) ** 2 * int(arch["in_chans"])
        d = int(arch["embed_dim"])
        return grid * grid, patch_dim, d, int(arch["depth"]), int(d * float(arch.get("mlp_ratio", 4.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"architecture lacks a field the FLOP count needs: {e}") from e


def _check_visible(visible: int, num_patches: int) -> None:
    if not 1 <= visible <= num_patches:
        raise InputError(f"visible token count {visible} is outside 1..{num_patches}")


def encoder_flops(arch: Mapping, visible: int | None = None) -> int:
    """FLOPs of the encoder for one image with ``visible`` tokens kept (None: all L)."""
    L, patch_dim, d, depth, h = arch_dims(arch)
    k = L if visible is None else int(visible)
    _check_visible(k, L)
    return 2 * L * patch_dim * d + depth * block_flops(k + 1, d, h)


def decoder_flops(arch: Mapping, visible: int | None = None) -> int:
    """FLOPs of the decoder for one image whose latent holds ``visible`` tokens (None: all L)."""
    L, patch_dim, d, _, _ = arch_dims(arch)
    k = L if visible is None else int(visible)
    _check_visible(k, L)
    dd, depth = int(arch.get("decoder_embed_dim") or 0), int(arch.get("decoder_depth") or 0)
    if not dd or not depth:
        raise InputError("this architecture has no decoder (decoder_embed_dim/decoder_depth missing or 0)")
    hd = int(dd * float(arch.get("mlp_ratio", 4.0)))
    return 2 * (k + 1) * d * dd + depth * block_flops(L + 1, dd, hd) + 2 * (L + 1) * dd * patch_dim


def classifier_flops(arch: Mapping, num_classes: int | None = None) -> int:
    """FLOPs of the fine-tuned classifier for one image: all tokens, then the linear head."""
    classes = int(arch.get("num_classes") or 0) if num_classes is None else int(num_classes)
    return encoder_flops(arch) + 2 * int(arch["embed_dim"]) * classes


def part_flops(arch: Mapping, part: str, batch: int, visible: int) -> int:
    """FLOPs of one benchmark call: ``part`` (encoder, decoder, reconstruct) on ``batch`` images."""
    if part == "encoder":
        per_image = encoder_flops(arch, visible)
    elif part == "decoder":
        per_image = decoder_flops(arch, visible)
    elif part == "reconstruct":
        per_image = encoder_flops(arch, visible) + decoder_flops(arch, visible)
    elif part == "classifier":
        per_image = classifier_flops(arch)
    else:
        raise InputError(f"no FLOP count for part {part!r}")
    return batch * per_image
