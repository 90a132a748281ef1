"""Hugging Face ViTMAE key names <-> the official MAE names (transformers 4.x and 5.x).

HF splits attention into query/key/value and nests blocks under ``vit.encoder.layer.N`` and
``decoder.decoder_layers.N``; the official layout (which ours keeps) fuses them into ``qkv`` and names
blocks ``blocks.N`` / ``decoder_blocks.N``.
"""

from __future__ import annotations

import re

import torch

from mae_deploy.errors import CheckpointError

_HF_LAYER = re.compile(
    r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)$|^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$"
)
_HF_SUB = {  # transformers 4.x names and 5.x names -> official block names
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
}


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Hugging Face ViTMAE keys (transformers 4.x or 5.x) and fuse q/k/v into qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], list] = {}
    unknown = []
    for key, value in sd.items():
        k = key[len("vit.") :] if key.startswith("vit.") else key
        if k in _HF_TOP:
            out[_HF_TOP[k]] = value
            continue
        if k.startswith("decoder.") and k.split(".")[1] in ("decoder_embed", "decoder_norm", "decoder_pred"):
            out[k[len("decoder.") :]] = value
            continue
        m = _HF_LAYER.match(key)
        if not m:
            unknown.append(key)
            continue
        prefix = f"blocks.{m.group(1)}" if m.group(1) is not None else f"decoder_blocks.{m.group(3)}"
        rest = m.group(2) or m.group(4)
        sub, _, kind = rest.rpartition(".")  # kind: weight | bias
        if sub in _HF_QKV:
            qkv.setdefault((prefix, kind), [None, None, None])[_HF_QKV[sub]] = value
        elif sub in _HF_SUB:
            out[f"{prefix}.{_HF_SUB[sub]}.{kind}"] = value
        else:
            unknown.append(key)
    for (prefix, kind), parts in qkv.items():
        if any(t is None for t in parts):
            raise CheckpointError(f"Hugging Face checkpoint has an incomplete query/key/value set in {prefix}")
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" … and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointError(f"unexpected keys in Hugging Face checkpoint: {shown}")
    return out


def official_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_official`, in transformers' saved (4.x) naming."""
    top = {v: k for k, v in _HF_TOP.items()}
    sub = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    out = {}
    for key, value in sd.items():
        if key in top:
            out[("" if key in ("mask_token", "decoder_pos_embed") else "vit.") + top[key]] = value
            continue
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            out[f"decoder.{key}"] = value  # decoder_embed / decoder_norm / decoder_pred
            continue
        base = f"vit.encoder.layer.{m.group(2)}" if m.group(1) == "blocks" else f"decoder.decoder_layers.{m.group(2)}"
        if m.group(3) == "attn.qkv":
            for name, t in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"{base}.attention.attention.{name}.{m.group(4)}"] = t.clone()
        else:
            out[f"{base}.{sub[m.group(3)]}.{m.group(4)}"] = value
    return out
