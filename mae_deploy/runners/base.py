"""The one interface every backend implements, and the base class that does the common work once.

Pipelines (features, reconstruction, batch extraction, benchmark, serving) are written once against
:class:`Runner`; a backend only has to turn numpy arrays into numpy arrays.

Shapes (L = number of patches, K = visible tokens, D = encoder width):

- ``encode(pixel_values float32 [N,C,H,W], ids_keep int64 [N,K]) -> latent float32 [N,K+1,D]``
- ``encode_pooled(pixel_values, ids_keep, pool) -> float32 [N,D]`` (cls / mean; ``tokens``: the latent):
  pooled where the runner runs, so a GPU runner copies back (N, D) instead of (N, K+1, D)
- ``decode(latent float32 [N,K+1,D], ids_restore int64 [N,L]) -> pred float32 [N,L,p*p*C]``

``pixel_values`` may also be a tensor the caller holds on a device (torch, CuPy: DLPack, see
:mod:`mae_deploy.arrays`); the result then comes back as a tensor of that library on that device.

:class:`BaseRunner` validates inputs (``mae_deploy.masking``), checks that the part exists, and gives
``load()``, ``has_decoder`` and the context manager; a backend implements ``_encode`` / ``_decode`` (and
``_load`` when it creates sessions lazily), and may implement ``_encode_pooled`` (default: pool the latent on
the host) and ``_encode_device`` (default: copy a device tensor to the host and back).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn, Protocol, runtime_checkable

import numpy as np

from mae_deploy.arrays import DeviceArray, as_device_array, check_device_pixels, host_array
from mae_deploy.errors import BundleError, InputError
from mae_deploy.masking import check_batch, check_decode_inputs, check_encode_inputs, check_ids_keep
from mae_deploy.names import DECODER, ENCODER, GRAPH_IO
from mae_deploy.pooling import check_pool, pool_latent

if TYPE_CHECKING:
    from mae_deploy.bundle import Bundle

PARTS = (ENCODER, DECODER)
# Each part's graph inputs and its main output, as every backend feeds and reads them (from names.GRAPH_IO).
PART_INPUTS = {part: GRAPH_IO[part][0] for part in PARTS}
PART_OUTPUT = {part: GRAPH_IO[part][1][0] for part in PARTS}


@dataclass(frozen=True)
class RunnerInfo:
    """What a runner really runs on (not what was asked for)."""

    backend: str  # one of mae_deploy.names.BACKENDS
    device: str  # "cpu" | "cuda" | "cuda:1" ...
    precision: str  # "fp32" | "fp16" | "int8" | "bf16"
    providers: tuple[str, ...] = ()  # ORT execution providers in use, or library names
    details: dict = field(default_factory=dict)  # versions, threads, GPU name, engine path ...


@runtime_checkable
class Runner(Protocol):
    @property
    def info(self) -> RunnerInfo: ...

    def encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray: ...

    def encode_pooled(self, pixel_values: np.ndarray, ids_keep: np.ndarray, pool: str) -> np.ndarray: ...

    def decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray: ...

    @property
    def has_decoder(self) -> bool: ...

    def close(self) -> None: ...


def check_threads(threads: int | None, name: str = "threads") -> int | None:
    """None (the library's default) or a positive int; anything else is an InputError."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InputError(f"{name} must be a positive integer, got {threads!r}")
    return int(threads)


def run_in_chunks(
    run: Callable[[dict[str, np.ndarray]], np.ndarray], feeds: dict[str, np.ndarray], step: int
) -> np.ndarray:
    """``run(feeds)``, or ``run`` on consecutive batch slices of at most ``step`` rows, concatenated.

    For engines whose optimization profile has a largest batch (TensorRT, ORT's TensorRT provider): a
    bigger batch is split rather than refused.
    """
    n = next(iter(feeds.values())).shape[0]
    if n <= step:
        return run(feeds)
    outs = [run({k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
    return np.concatenate(outs, axis=0)


class BaseRunner:
    """Input validation, part checks, ``load()`` and the context manager for every backend.

    A subclass sets ``self.bundle`` and ``self._specs`` ({part: graph spec or None when the bundle or
    checkpoint lacks it}) in its constructor, and implements ``_encode`` / ``_decode`` (arrays already
    validated: float32/int64, C-contiguous) and ``info``. ``_load(part)`` creates a part's session now;
    the default does nothing (for runners that load everything in the constructor).
    """

    bundle: Bundle
    _specs: Mapping[str, object | None]

    if TYPE_CHECKING:  # a property or a class attribute of each backend

        @property
        def info(self) -> RunnerInfo: ...

    # -- what a backend implements ------------------------------------------------------------------
    def _encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _load(self, part: str) -> None:
        return None

    def _encode_pooled(self, pixel_values: np.ndarray, ids_keep: np.ndarray, pool: str) -> np.ndarray:
        """cls / mean features (N, D); the default pools the latent on the host."""
        return pool_latent(self._encode(pixel_values, ids_keep), pool)

    def _encode_device(self, pixels: DeviceArray, ids_keep: np.ndarray, pool: str | None):
        """A device tensor's latent (pool None) or features, as a tensor of its library on its device.

        The default goes through the host; backends that can read device memory override it.
        """
        x = np.ascontiguousarray(pixels.to_numpy(), dtype=np.float32)
        out = self._encode(x, ids_keep) if pool is None else self._encode_pooled(x, ids_keep, pool)
        return pixels.like(out)

    def _missing_part(self, part: str) -> NoReturn:
        """Raise the error for a part this runner does not have (default: the bundle's own message)."""
        self.bundle.graph(part)
        # The bundle lists the part, but this runner did not load it (e.g. its precision has no such graph).
        raise BundleError(f"{type(self).__name__} has no {part} for bundle {self.bundle.path}")

    # -- the interface ------------------------------------------------------------------------------
    def has_part(self, part: str) -> bool:
        """Whether this runner has ``part`` (encoder, decoder, or an extra graph its backend lists)."""
        if part not in PARTS and part not in self._specs:
            raise InputError(f"unknown part {part!r}; expected one of {list(PARTS)}")
        return self._specs.get(part) is not None

    @property
    def has_decoder(self) -> bool:
        return self.has_part(DECODER)

    def encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        """latent (N, K+1, D): numpy for numpy input, a tensor on the input's device for a device tensor."""
        return self._encode_checked(pixel_values, ids_keep, None)

    def encode_pooled(self, pixel_values: np.ndarray, ids_keep: np.ndarray, pool: str) -> np.ndarray:
        """Features (N, D) for ``pool`` cls / mean, pooled where the runner runs; the latent for ``tokens``."""
        check_pool(pool)
        return self._encode_checked(pixel_values, ids_keep, None if pool == "tokens" else pool)

    def _encode_checked(self, pixel_values, ids_keep, pool: str | None):
        b = self.bundle
        dev = as_device_array(pixel_values)
        if dev is None:
            x, ids = check_encode_inputs(
                pixel_values, ids_keep, in_chans=b.in_chans, image_size=b.image_size, num_patches=b.num_patches
            )
            return self._encode(x, ids) if pool is None else self._encode_pooled(x, ids, pool)
        check_device_pixels(dev, b.in_chans, b.image_size)
        ids = check_ids_keep(host_array(ids_keep), b.num_patches)  # small: validated on the host
        if dev.shape[0] != ids.shape[0]:
            check_batch(pixel_values=np.empty((dev.shape[0], 0)), ids_keep=ids)
        return self._encode_device(dev, ids, pool)

    def decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        b = self.bundle
        if not self.has_decoder:
            self._missing_part(DECODER)
        x, ids = check_decode_inputs(latent, ids_restore, embed_dim=b.embed_dim, num_patches=b.num_patches)
        return self._decode(x, ids)

    def classify(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [N,C,H,W] -> logits [N,num_classes]; backends that run the classifier graph override it."""
        raise InputError(
            f"the {self.info.backend} backend does not run the classifier graph; use --backend ort or torch"
        )

    def load(self, parts: Iterable[str] = PARTS):
        """Create the sessions/engines of ``parts`` now (those the runner has) instead of on first use."""
        for part in parts:
            if self.has_part(part):
                self._load(part)
        return self

    def close(self) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
