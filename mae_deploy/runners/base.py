"""The one interface every backend implements.

Pipelines (features, reconstruction, batch extraction, benchmark) are written once against
:class:`Runner`; a backend only has to turn numpy arrays into numpy arrays.

Shapes (L = number of patches, K = visible tokens, D = encoder width):

- ``encode(pixel_values float32 [N,C,H,W], ids_keep int64 [N,K]) -> latent float32 [N,K+1,D]``
- ``decode(latent float32 [N,K+1,D], ids_restore int64 [N,L]) -> pred float32 [N,L,p*p*C]``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class RunnerInfo:
    """What a runner really runs on (not what was asked for)."""

    backend: str  # "ort" | "trt" | "torch"
    device: str  # "cpu" | "cuda" | "cuda:1" ...
    precision: str  # "fp32" | "fp16" | "int8" | "bf16"
    providers: tuple[str, ...] = ()  # ORT execution providers in use, or library names
    details: dict = field(default_factory=dict)  # versions, threads, GPU name, engine path ...


@runtime_checkable
class Runner(Protocol):
    info: RunnerInfo

    def encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray: ...

    def decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray: ...

    @property
    def has_decoder(self) -> bool: ...

    def close(self) -> None: ...
