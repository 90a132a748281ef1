"""The null runner: a diagnostic that returns zeros at once, to measure what surrounds the model.

``create_runner(bundle, "null")`` validates its inputs like every runner (so the pipeline pays the same
checks) and returns a zero latent of the right shape without computing anything. With it, the extraction
benchmark (``benchmarks/bench_extract.py --runner null``) measures the pipeline's own capacity: decoding,
transfer between processes, batching and the shard writer. It is not an inference backend: it is kept out
of ``names.BACKENDS`` (and so out of every ``--backend`` choice and ``mae-deploy bench``), and its
features are all zero.
"""

from __future__ import annotations

import numpy as np

from mae_deploy.bundle import Bundle
from mae_deploy.names import DECODER, ENCODER
from mae_deploy.runners.base import BaseRunner, RunnerInfo


class NullRunner(BaseRunner):
    """Zeros of the right shape, after the usual input checks; no graph is loaded."""

    info: RunnerInfo

    def __init__(
        self, bundle: Bundle, device: str = "cpu", precision: str = "fp32", threads: int | None = None
    ) -> None:
        self.bundle = bundle
        self._specs = {ENCODER: True, DECODER: True}
        self.info = RunnerInfo(
            backend="null",
            device=device,
            precision=precision,
            providers=("null",),
            details={"diagnostic": "returns zeros without running the model"},
        )

    def _encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        n, k = ids_keep.shape
        # A read-only broadcast view: allocating (N, K+1, D) zeros per batch would itself cost memory bandwidth.
        return np.broadcast_to(np.zeros((1, 1, self.bundle.embed_dim), np.float32), (n, k + 1, self.bundle.embed_dim))

    def _decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        b = self.bundle
        width = b.patch_size**2 * b.in_chans
        return np.broadcast_to(np.zeros((1, 1, width), np.float32), (latent.shape[0], b.num_patches, width))
