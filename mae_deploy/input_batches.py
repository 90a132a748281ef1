"""Rows of a SOURCE -> normalised model-input batches, decoded by PIL on the host or by torch on a device.

What ``classify`` and ``eval`` read images with, so that they take every SOURCE ``extract`` takes (folders,
globs, lists, WebDataset shards, Parquet, URLs) and decode exactly as it does: the source's reader gives each
row's bytes (:class:`~mae_deploy.sources.RowReader`), and extraction's decoders turn them into model input.
``decoder="pil"`` is :class:`~mae_deploy.extract.decode.Decoder`, the reference; ``decoder="torch"`` sends
whole RGB / greyscale JPEGs to :class:`~mae_deploy.extract.device_decode.DeviceBatcher` (one batched decode,
resize and normalisation on the runner's device) and everything else through PIL, with the same failure
reasons and messages. torch is imported only for ``decoder="torch"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mae_deploy.errors import InputError
from mae_deploy.names import DECODERS
from mae_deploy.preprocess import Preprocessor
from mae_deploy.sources import Source


@dataclass
class InputBatch:
    """One batch of rows: the model input of those that decoded, in row order, and why the others did not."""

    rows: list[int]  # rows of ``pixels``, ascending
    pixels: np.ndarray | None  # float32 (len(rows), C, S, S) on the host; None when no row decoded
    failures: list[tuple[int, str, str]]  # (row, reason, message), reason one of FAILURE_REASONS


def check_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise InputError(f"--decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    return decoder


class InputBatches:
    """Batches of a source's rows as model input (see the module docstring).

    ``pre`` gives the preprocessing (the pipeline's own Preprocessor: its bundle settings, ``exact_resize``
    and ``max_pixels``); ``device`` is the runner's, where ``decoder="torch"`` decodes.
    """

    def __init__(self, source: Source, pre: Preprocessor, decoder: str = "pil", device: str = "cpu") -> None:
        from PIL import Image

        from mae_deploy.extract.decode import Decoder

        self.source = source
        limit = Image.MAX_IMAGE_PIXELS if pre.max_pixels is None else pre.max_pixels
        self._args: dict[str, Any] = {
            "preprocessing": _config(pre),
            "in_chans": pre.in_chans,
            "min_side": pre.min_side,
            "max_pixels": int(limit or 0),
            "transfer": "float32",
            "exact_resize": pre.exact_resize,
            "reader": source.reader,
            "device_jpeg": check_decoder(decoder) == "torch",
        }
        self._decoder = Decoder(**self._args)
        self._device = None
        if decoder == "torch":
            from mae_deploy.extract.device_decode import DeviceBatcher

            self._device = DeviceBatcher(self._args, device)

    def batch(self, rows: range | list[int]) -> InputBatch:
        """The given rows of the source, decoded."""
        items = [(r, self.source.paths[r]) for r in rows]
        dec = self._decoder.decode_batch(items)
        if self._device is None:
            return InputBatch(dec.rows, dec.pixels, sorted(dec.failures))
        done, x, failures = self._device.assemble(items, dec, "float32")
        # Runners' classify() takes host arrays; the decoding and resizing still ran on the device.
        pixels = None if x is None else x.float().cpu().numpy()
        return InputBatch(done, pixels, failures)

    def batches(self, batch_size: int) -> Iterator[InputBatch]:
        """Every row of the source, ``batch_size`` rows at a time, in order."""
        n = len(self.source)
        for start in range(0, n, batch_size):
            yield self.batch(range(start, min(start + batch_size, n)))


def _config(pre: Preprocessor) -> dict:
    """The preprocessing block a Preprocessor was made from (what Decoder builds its own from)."""
    return {
        "image_size": pre.image_size,
        "resize": pre.resize,
        "crop_pct": pre.crop_pct,
        "interpolation": pre.interpolation,
        "mean": pre.mean.ravel().tolist(),
        "std": pre.std.ravel().tolist(),
    }
