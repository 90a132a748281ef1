"""Pooling an encoder output into one feature vector per image (the host-side definition).

- ``cls``: the cls token of the encoder output (after the encoder's final LayerNorm);
- ``mean``: the mean of the patch tokens, cls excluded, as the official global pool does. The official
  fine-tuned classifier applies a separate ``fc_norm`` after this mean; our latent is the pretrained
  encoder's output, already after its ``norm``, and no ``fc_norm`` is applied;
- ``tokens``: all tokens, (N, 1+K, D), cls first.

Bundles exported with pooled outputs compute cls / mean inside the encoder graph (``names.POOLED_OUTPUTS``);
runners use this function for older bundles and as the reference the graph's outputs are tested against.
"""

from __future__ import annotations

import numpy as np

from mae_deploy.errors import InputError
from mae_deploy.names import POOLS


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise InputError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    return pool


def pool_latent(latent: np.ndarray, pool: str) -> np.ndarray:
    """(N, 1+K, D) encoder output -> (N, D) for cls/mean, or the tokens unchanged."""
    check_pool(pool)
    if pool == "cls":
        return latent[:, 0]
    if pool == "mean":
        return latent[:, 1:].mean(axis=1)
    return latent
