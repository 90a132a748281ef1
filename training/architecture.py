"""What an MAE / ViT state dict's shapes tell about its architecture, and what they cannot.

Patch size, width, depth, image size, MLP ratio, decoder width and depth, class count and pooling are read off
the weights (official key layout); head counts and norm-pix loss are not in them, so they come from hints (the
training args, a Hugging Face config, ``--num-heads``), the registry architecture whose shapes match, or the
released architectures' values, with a note saying what was assumed.
"""

from __future__ import annotations

import math

import torch

from mae_deploy.errors import CheckpointError
from training.model import MODEL_CONFIGS, MAEConfig

# Head counts cannot be read off weight shapes; these are the released architectures' (ViT-S/Ti too).
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def infer_config(
    sd: dict[str, torch.Tensor],
    hints: dict | None = None,
    notes: list[str] | None = None,
) -> tuple[MAEConfig, int, bool]:
    """Architecture, num_classes and global_pool from an official-layout state dict.

    ``hints`` may carry ``model`` (a registry name, e.g. from the training args), ``num_heads``,
    ``decoder_num_heads``, ``norm_pix_loss``, ``norm_eps``: values that weight shapes cannot tell.
    """
    hints = typed_hints(hints or {})
    notes = notes if notes is not None else []
    for key in ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight"):
        if key not in sd:
            raise CheckpointError(
                f"this does not look like an MAE/ViT checkpoint: '{key}' is missing "
                f"(found keys like {shorten_keys(list(sd), 5)})"
            )
    proj = sd["patch_embed.proj.weight"]
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    if "pos_embed" not in sd:
        raise CheckpointError("checkpoint has no pos_embed: cannot tell the image size")
    num_patches = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointError(f"pos_embed holds {num_patches} patch positions, not a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    base = _registry_match(sd, hints.get("model"), patch, dim, depth, mlp_ratio)
    if hints.get("num_heads"):
        heads = int(hints["num_heads"])
    elif base is not None and base.embed_dim == dim:
        heads = base.num_heads
    elif dim in _HEADS_BY_WIDTH:
        heads = _HEADS_BY_WIDTH[dim]
    else:
        heads = max(1, dim // 64)
        notes.append(
            f"num_heads is not stored in the weights; assumed {heads} (head dim 64). Override with --num-heads"
        )
    kw = dict(
        name=base.name if base is not None else "custom",
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        norm_eps=float(hints.get("norm_eps", 1e-6)),
        decoder_depth=0,
    )
    if "decoder_embed.weight" in sd:
        ddim = sd["decoder_embed.weight"].shape[0]
        kw["decoder_embed_dim"] = ddim
        kw["decoder_depth"] = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks.")), default=-1)
        if hints.get("decoder_num_heads"):
            kw["decoder_num_heads"] = int(hints["decoder_num_heads"])
        elif base is not None and base.decoder_embed_dim == ddim:
            kw["decoder_num_heads"] = base.decoder_num_heads
        else:
            kw["decoder_num_heads"] = max(1, ddim // 32)  # 512 -> 16 as released
        if "norm_pix_loss" in hints:
            kw["norm_pix_loss"] = bool(hints["norm_pix_loss"])
        else:
            kw["norm_pix_loss"] = True
            notes.append(
                "norm_pix_loss is not recorded in this checkpoint; assumed True (the released *_full "
                "checkpoints). mae_visualize_* checkpoints predict raw pixels: pass --no-norm-pix-loss"
            )
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    global_pool = "fc_norm.weight" in sd
    try:
        return MAEConfig(**kw), num_classes, global_pool
    except ValueError as e:
        raise CheckpointError(f"inconsistent architecture read from the weights: {e}") from None


def typed_hints(hints: dict) -> dict:
    """Hints from a command line or a Hugging Face config.json, as numbers (or a CheckpointError)."""
    out = dict(hints)
    for key, kind in (("num_heads", int), ("decoder_num_heads", int), ("norm_eps", float)):
        if out.get(key) is None:
            out.pop(key, None)
            continue
        v = out[key]
        ok = not isinstance(v, bool) and isinstance(v, (int, float) if kind is float else int)
        if not ok or v <= 0 or (kind is float and not math.isfinite(v)):
            raise CheckpointError(f"{key} must be a positive {kind.__name__}, got {v!r}")
        out[key] = kind(v)
    return out


def _registry_match(
    sd: dict[str, torch.Tensor], name: str | None, patch: int, dim: int, depth: int, mlp_ratio: float
) -> MAEConfig | None:
    """The registry architecture named in the hints, or the one whose shapes match these weights."""
    if name:  # official args say e.g. 'mae_vit_base_patch16'; fine-tuning args 'vit_base_patch16'
        for candidate in (str(name), "mae_" + str(name)):
            if candidate in MODEL_CONFIGS:
                return MODEL_CONFIGS[candidate]
    for cfg in MODEL_CONFIGS.values():
        same_encoder = (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.mlp_ratio) == (patch, dim, depth, mlp_ratio)
        if same_encoder and (
            "decoder_embed.weight" not in sd or cfg.decoder_embed_dim == sd["decoder_embed.weight"].shape[0]
        ):
            return cfg
    return None


def hints_from_args(args: object) -> dict:
    hints = {}
    for name in ("model", "norm_pix_loss"):
        if hasattr(args, name):
            hints[name] = getattr(args, name)
    if isinstance(args, dict):
        hints.update({k: args[k] for k in ("model", "norm_pix_loss") if k in args})
    return hints


def shorten_keys(items: list[str], n: int = 8) -> str:
    """The first ``n`` names, sorted, and how many more: for error messages about state-dict keys."""
    items = sorted(items)
    more = f" … and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
