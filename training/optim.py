"""Optimisation recipes of the MAE paper: parameter groups, layer-wise lr decay, the lr schedule, LARS.

- ``lr = blr * effective_batch / 256`` with ``effective_batch = batch_size * accum_iter * world_size``.
- Schedule, per iteration: linear warm-up from 0 to ``lr`` over ``warmup_epochs``, then a half-cycle
  cosine from ``lr`` down to ``min_lr`` at ``epochs`` (``epoch`` is fractional: epoch + step / steps).
- No weight decay for norms, biases (every 1-D parameter) and the cls / mask / position tokens.
- Layer-wise lr decay (fine-tuning): layer id 0 for cls_token, pos_embed and patch_embed, ``i + 1`` for
  ``blocks.i``, ``num_layers = depth + 1`` for everything after the blocks (fc_norm, head); a parameter of
  layer id ``k`` gets ``lr_scale = layer_decay ** (num_layers - k)``.
- LARS (linear probing): SGD with momentum where each weight matrix's update is scaled by
  ``trust_coefficient * ||w|| / ||g + wd * w||``; 1-D parameters (biases, norms) are neither decayed
  nor scaled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# Parameters that are tokens or embeddings, not weights: never decayed.
NO_WEIGHT_DECAY = frozenset({"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "encoder_mask_token"})


def effective_lr(blr: float, batch_size: int, accum_iter: int = 1, world_size: int = 1) -> float:
    """Absolute lr from the base lr: blr x effective batch / 256."""
    return blr * batch_size * accum_iter * world_size / 256


def lr_at(epoch: float, lr: float, min_lr: float, epochs: float, warmup_epochs: float) -> float:
    """Learning rate at fractional ``epoch``: linear warm-up, then half-cycle cosine to ``min_lr``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(
    optimizer: torch.optim.Optimizer, epoch: float, lr: float, min_lr: float, epochs: float, warmup_epochs: float
) -> float:
    """Set every group's lr for fractional ``epoch`` (times its ``lr_scale``); returns the base lr."""
    value = lr_at(epoch, lr, min_lr, epochs, warmup_epochs)
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)
    return value


def _no_decay(name: str, param: nn.Parameter, skip: Iterable[str]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name in NO_WEIGHT_DECAY or name in skip


def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict]:
    """Two groups: weights with ``weight_decay``; norms, biases and tokens with none. Frozen ones left out."""
    skip = set(skip)
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _no_decay(name, p, skip):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": no_decay, "weight_decay": 0.0, "param_names": no_decay_names},
        {"params": decay, "weight_decay": weight_decay, "param_names": decay_names},
    ]


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The official layer id of a ViT parameter (``num_layers`` = number of blocks + 1)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_layer_decay(
    model: nn.Module, weight_decay: float, layer_decay: float = 0.75, skip: Iterable[str] = ()
) -> list[dict]:
    """Groups per (layer id, decay / no decay), each with ``lr_scale = layer_decay ** (num_layers - id)``."""
    skip = set(skip)
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = _no_decay(name, p, skip)
        layer = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(
            key,
            {
                "lr_scale": scales[layer],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "params": [],
                "param_names": [],
            },
        )
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017) as used for MAE linear probing.

    For a parameter with more than one dimension: ``d = g + weight_decay * w``, then
    ``d *= trust_coefficient * ||w|| / ||d||`` (when both norms are non-zero). 1-D parameters use ``d = g``.
    Then momentum ``m = momentum * m + d`` and ``w -= lr * m``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid LARS settings lr={lr} weight_decay={weight_decay} momentum={momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:  # weight matrices only: biases and norm parameters are left as SGD
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(w_norm)
                    trust = torch.where(
                        w_norm > 0, torch.where(d_norm > 0, group["trust_coefficient"] * w_norm / d_norm, one), one
                    )
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def make_adamw(
    param_groups: list[dict], lr: float, device: torch.device, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW with the fused kernel on CPU and CUDA: one pass over each tensor instead of a loop of small
    ops (on CPU, ViT-B's optimizer step drops from ~0.24 s to ~0.07 s)."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))
