"""Feature extraction: images -> encoder features, with every patch visible, batched.

Pools (``mae_deploy.pooling``): ``cls`` (the cls token), ``mean`` (mean of the patch tokens) -> (N, D); ``tokens``
-> (N, L+1, D). The runner pools where it runs (on the GPU for GPU runners), so only what was asked for
comes back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sized
from itertools import islice

import numpy as np
from PIL import Image

from mae_deploy.arrays import as_device_array, check_device_pixels
from mae_deploy.bundle import Bundle
from mae_deploy.errors import InputError
from mae_deploy.masking import all_visible, check_pixel_values
from mae_deploy.names import POOLS
from mae_deploy.pipeline import Pipeline
from mae_deploy.preprocess import ImageLike, Preprocessor
from mae_deploy.runners import Runner


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


class FeatureExtractor(Pipeline):
    """Features for images, uint8 arrays or paths, through any runner.

    ``runner`` lets several pipelines share one (e.g. a warmed-up GPU session); otherwise one is created
    from ``backend``/``device``/``precision`` and ``runner_opts``. Use as a context manager, or call
    :meth:`close`, to release it.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        backend: str = "ort",
        device: str = "cpu",
        precision: str = "fp32",
        pool: str = "cls",
        batch_size: int = 32,
        runner: Runner | None = None,
        preprocessor: Preprocessor | None = None,
        **runner_opts,
    ) -> None:
        if pool not in POOLS:
            raise InputError(f"pool must be one of {list(POOLS)}, got {pool!r}")
        self.pool = pool
        super().__init__(bundle, backend, device, precision, batch_size, runner, preprocessor, runner_opts)

    @property
    def dim(self) -> int:
        return self.bundle.embed_dim

    def extract_pixels(self, pixel_values):
        """Already preprocessed float32 (N, C, H, W) -> pooled features (one runner call).

        ``pixel_values`` may be a numpy array or a tensor on a device (torch, CuPy: anything with DLPack);
        the features come back the same way (numpy, or a tensor of that library on that device).
        """
        self._check_open()
        b = self.bundle
        dev = as_device_array(pixel_values)
        if dev is None:
            x = check_pixel_values(pixel_values, b.in_chans, b.image_size)
        else:
            check_device_pixels(dev, b.in_chans, b.image_size)
            x = pixel_values
        ids_keep, _, _ = all_visible(dev.shape[0] if dev is not None else x.shape[0], b.num_patches)
        return self.runner.encode_pooled(x, ids_keep, self.pool)

    def extract(self, images: ImageLike | Iterable[ImageLike], progress: bool = False) -> np.ndarray:
        """One image or an iterable of them -> float32 (N, D), or (N, L+1, D) for ``pool="tokens"``.

        A uint8 array of shape (N, H, W, C) counts as N images. Images are preprocessed and encoded
        ``batch_size`` at a time.
        """
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, (str, os.PathLike, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        ):
            images = [images]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(images) if isinstance(images, Sized) else None, unit="img", desc="features")
        out = []
        try:
            for chunk in _chunks(images, self.batch_size):
                out.append(self.extract_pixels(self.preprocessor(chunk)))
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if not out:
            raise InputError("no images given")
        return np.concatenate(out).astype(np.float32, copy=False)

    __call__ = extract
