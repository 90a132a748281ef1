"""Calibration inputs for the static Q/DQ int8 variant: real images through the runtime's preprocessing.

Images are read with ``mae_deploy``'s :class:`~mae_deploy.preprocess.Preprocessor` built from the bundle's
own preprocessing block, so the activation ranges are those the deployed model will see. ``count`` images
are taken evenly spaced over the sorted listing (an ImageFolder lists class by class: the first 256 files
would be one class). Undecodable files are skipped, counted and replaced by the next readable ones.

Per part, the feeds the quantiser runs:

- encoder: ``pixel_values`` with every patch visible (``ids_keep`` = 0..L-1), feature extraction's case;
  with ``masked=True`` (int8-nncf) each batch again at L/2, L/4 and 1 visible patches (random masks, fixed
  seed): a graph whose attention MatMuls are int8 too, calibrated at L only, lost pooled cosine at few visible
  tokens (test model, 1 visible: 0.92 against 0.996 calibrated this way);
- classifier: ``pixel_values``;
- decoder: the fp32 encoder's ``latent`` for a 75 % mask (the reconstruction setting), with its
  ``ids_restore``; masks from a fixed seed; with ``masked=True`` also for L, L/2 and 1 visible patches
  (calibrated at 75 % only, the int8-nncf decoder missed the 0.1 reconstruction bound elsewhere: 0.137).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from mae_deploy.errors import InputError
from mae_deploy.names import CLASSIFIER

DEFAULT_COUNT = 256
BATCH = 8  # images per calibration run (bounds the quantiser's memory for large models)
DECODER_MASK_RATIO = 0.75


@dataclass
class CalibrationSet:
    """Preprocessed calibration images and where they came from (recorded in mae.json)."""

    source: str
    pixel_values: np.ndarray  # (N, C, H, W) float32
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "images": int(len(self.pixel_values)),
            "skipped": len(self.skipped),
            "selection": "evenly spaced over the sorted listing",
            "method": "minmax",
        }


def load_calibration(
    directory: str | os.PathLike, preprocessing: dict, in_chans: int, count: int = DEFAULT_COUNT
) -> CalibrationSet:
    """``count`` images of ``directory`` (or a glob / list file, as ``extract`` takes) preprocessed."""
    from mae_deploy.preprocess import Preprocessor
    from mae_deploy.sources import list_source

    if count < 1:
        raise InputError(f"--calibration-count {count}: give at least 1 image (256 is the usual choice)")
    paths = list_source(directory).paths
    n = min(count, len(paths))
    picked = [paths[i * len(paths) // n] for i in range(n)]
    chosen = set(picked)
    # An unreadable pick is replaced by the next readable file of the listing.
    candidates = picked + [p for p in paths if p not in chosen]
    pre = Preprocessor.from_config(preprocessing, in_chans=in_chans)
    arrays, skipped = [], []
    for p in candidates:
        if len(arrays) == n:
            break
        try:
            arrays.append(pre(p)[0])
        except (InputError, OSError, ValueError) as e:
            skipped.append(f"{p}: {e}")
    if not arrays:
        raise InputError(
            f"none of the {n} calibration images picked from {directory} could be read; first error: "
            f"{skipped[0] if skipped else '-'}"
        )
    return CalibrationSet(os.fspath(directory), np.stack(arrays).astype(np.float32), skipped)


def _batches(x: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, len(x), BATCH):
        yield x[i : i + BATCH]


def _masked_encoder_feeds(x: np.ndarray, L: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """``x`` at L/2, L/4 and 1 visible patches (distinct counts only)."""
    feeds = []
    for k in sorted({max(1, L // 2), max(1, L // 4), 1}, reverse=True):
        ids = np.argsort(rng.random((len(x), L)), axis=1)[:, :k].astype(np.int64)
        feeds.append({"pixel_values": x, "ids_keep": np.ascontiguousarray(ids)})
    return feeds


def part_feeds(
    part: str,
    calib: CalibrationSet,
    num_patches: int,
    encoder_path: str | os.PathLike | None = None,
    masked: bool = False,
) -> list[dict[str, np.ndarray]]:
    """The input dicts the quantiser runs ``part`` on (see the module docstring)."""
    if part == CLASSIFIER:
        return [{"pixel_values": x} for x in _batches(calib.pixel_values)]
    L = num_patches
    if part == "encoder":
        rng = np.random.default_rng(0)
        feeds = []
        for x in _batches(calib.pixel_values):
            feeds.append({"pixel_values": x, "ids_keep": np.tile(np.arange(L, dtype=np.int64), (len(x), 1))})
            if masked:
                feeds.extend(_masked_encoder_feeds(x, L, rng))
        return feeds
    from export.verify import ort_session

    if encoder_path is None:
        raise ValueError("decoder calibration needs the fp32 encoder graph")
    session = ort_session(encoder_path)
    rng = np.random.default_rng(0)
    keeps = [max(1, int(L * (1 - DECODER_MASK_RATIO)))]
    if masked:
        keeps = sorted({*keeps, L, max(1, L // 2), 1}, reverse=True)
    feeds = []
    for x in _batches(calib.pixel_values):
        for keep in keeps:
            shuffle = np.argsort(rng.random((len(x), L)), axis=1).astype(np.int64)
            ids_keep = np.ascontiguousarray(shuffle[:, :keep])
            latent = session.run(None, {"pixel_values": x, "ids_keep": ids_keep})[0]
            feeds.append({"latent": latent, "ids_restore": np.argsort(shuffle, axis=1).astype(np.int64)})
    return feeds
