"""The inputs every backend is fed, and the reference outputs every row is checked against."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import numpy as np

from mae_deploy.bench.build import build_runner, torch_not_offered
from mae_deploy.bench.config import BenchConfig, image_source
from mae_deploy.errors import InputError


@dataclass
class ImageInputs:
    """Real images fed as pixel values (``--images``), preprocessed, and where they came from."""

    source: str
    pixel_values: np.ndarray  # (n, C, H, W) float32, in the listing's order
    skipped: list[str] = field(default_factory=list)  # "path: why" for each unreadable file passed over


def load_images(bundle, spec: str | os.PathLike, count: int) -> ImageInputs:
    """The first ``count`` readable images of ``spec`` (a folder, glob, list file ... as ``extract`` takes), in
    the listing's order (sorted for a folder or glob), through the bundle's own preprocessing.

    Unreadable files are passed over (and counted); none readable is an InputError naming the source.
    """
    from mae_deploy.preprocess import Preprocessor
    from mae_deploy.sources import Failure, NamedBytes

    source = image_source(spec)
    pre = Preprocessor.from_bundle(bundle)
    arrays: list[np.ndarray] = []
    skipped: list[str] = []
    for row, path in enumerate(source.paths):
        if len(arrays) == count:
            break
        try:
            # Bytes through the source's reader (tar members and Parquet cells too), decoded as extract does.
            im = pre.load_image(NamedBytes(source.reader.read(row, path), path))
            arrays.append(pre.normalize(pre.resize_crop(im)))
        except (Failure, InputError, OSError, ValueError) as e:
            skipped.append(f"{path}: {e}")
    if not arrays:
        raise InputError(
            f"--images {os.fspath(spec)}: none of its {len(source)} files is a readable image (first: {skipped[0]}); "
            "give a folder, glob or list file of images (what `extract` takes), or leave --images out for seeded noise"
        )
    return ImageInputs(os.fspath(spec), np.stack(arrays).astype(np.float32, copy=False), skipped)


class Workloads:
    """Inputs per (batch, visible): pixel values, ids_keep, ids_restore. Same on every backend.

    Pixel values are seeded standard-normal noise, or with ``images`` those images cycled to fill the batch
    (batch 8 from 3 images: 0 1 2 0 1 2 0 1). Masks are seeded either way.
    """

    def __init__(self, bundle, seed: int, images: ImageInputs | None = None) -> None:
        self.bundle, self.seed, self.images = bundle, seed, images
        self._pixels: dict[int, np.ndarray] = {}
        self._ids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def pixels(self, batch: int) -> np.ndarray:
        if batch not in self._pixels:
            b = self.bundle
            if self.images is not None:
                x = self.images.pixel_values
                self._pixels[batch] = np.ascontiguousarray(x[np.arange(batch) % len(x)])
            else:
                rng = np.random.default_rng([self.seed, batch])
                # Preprocessed images are roughly standard normal per channel.
                shape = (batch, b.in_chans, b.image_size, b.image_size)
                self._pixels[batch] = rng.standard_normal(shape, np.float32)
        return self._pixels[batch]

    def describe(self) -> dict:
        """The results' ``inputs``: what the pixel values were (docs/bench-schema.md)."""
        im = self.images
        if im is None:
            return {"pixels": "seeded noise", "source": None, "images": None, "skipped": None, "seed": self.seed}
        return {
            "pixels": "images",
            "source": im.source,
            "images": len(im.pixel_values),
            "skipped": len(im.skipped),
            "seed": self.seed,
        }

    def ids(self, batch: int, visible: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids_keep (N,K), ids_restore (N,L)): all tokens in order when K = L, else a random mask per image."""
        key = (batch, visible)
        if key not in self._ids:
            L = self.bundle.num_patches
            if visible == L:
                from mae_deploy.masking import all_visible

                keep, restore, _ = all_visible(batch, L)
            else:
                # The official masking with K given directly (a mask ratio would round K through floats).
                noise = np.random.default_rng([self.seed, batch, visible]).random((batch, L))
                shuffle = np.argsort(noise, axis=1, kind="stable")
                keep = np.ascontiguousarray(shuffle[:, :visible], dtype=np.int64)
                restore = np.argsort(shuffle, axis=1, kind="stable").astype(np.int64)
            self._ids[key] = (keep, restore)
        return self._ids[key]


class Reference:
    """Reference outputs per (batch, visible): torch fp32 on CPU, else ORT fp32 on CPU (and why)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.note = ""
        self.info: dict = {}
        self.latent: dict[tuple[int, int], np.ndarray] = {}
        self.pred: dict[tuple[int, int], np.ndarray] = {}

    def describe(self) -> dict:
        return {"name": self.name, "device": "cpu" if self.name else None, "note": self.note, **self.info}


def _reference_runner(bundle, config: BenchConfig, threads: int, ref: Reference):
    """The torch fp32 runner, else ORT fp32 (when torch or weights are missing); None when neither runs.

    An unreadable ``--checkpoint`` or reference/ raises (bad input): only a missing package, device or
    weights falls back.
    """
    torch_reason = torch_not_offered(bundle, "fp32", "cpu", config.checkpoint)
    if torch_reason is None:
        runner, _, torch_reason = build_runner(bundle, "torch", "fp32", "cpu", threads, config.checkpoint, config.parts)
        if runner is not None:
            ref.name, ref.note = "torch-fp32", "PyTorch fp32 on CPU"
            ref.info = {"checkpoint": str(getattr(runner, "checkpoint", config.checkpoint))}
            return runner
    runner, _, ort_reason = build_runner(bundle, "ort", "fp32", "cpu", threads, None, config.parts)
    if runner is None:
        ref.note = f"no reference available: torch ({torch_reason}); ort fp32 ({ort_reason})"
        return None
    ref.name = "ort-fp32"
    ref.note = (
        f"torch fp32 reference unavailable ({torch_reason}); ONNX Runtime fp32 on CPU is the "
        "reference instead, so its own rows agree trivially"
    )
    return runner


def compute_reference(
    bundle, config: BenchConfig, work: Workloads, visibles: list[int], threads: int, progress: bool
) -> Reference:
    """Run the reference once per workload (before any row, so rows measure only themselves)."""
    from tqdm import tqdm

    ref = Reference()
    if not config.reference:
        ref.note = "agreement not measured (--no-reference)"
        return ref
    runner = _reference_runner(bundle, config, threads, ref)
    if runner is None:
        return ref
    need_decoder = any(p in ("decoder", "reconstruct") for p in config.parts) and runner.has_decoder
    jobs = [(b, k) for b in config.batch_sizes for k in visibles]
    try:
        for b, k in tqdm(jobs, desc=f"reference ({ref.name})", disable=not progress, leave=False):
            keep, restore = work.ids(b, k)
            ref.latent[(b, k)] = runner.encode(work.pixels(b), keep)
            if need_decoder:
                ref.pred[(b, k)] = runner.decode(ref.latent[(b, k)], restore)
    finally:
        runner.close()
    gc.collect()  # free the reference model before rows measure their own memory
    return ref
