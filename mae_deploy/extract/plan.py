"""What a job will do, decided before any image is read: options, shards, tasks, the manifest; its summary.

Both engines (local and Ray) plan the same way, so the same source gives the same rows, shards and batches
wherever it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from mae_deploy import __version__
from mae_deploy.bundle import Bundle
from mae_deploy.errors import InputError, PartialFailure
from mae_deploy.extract.decode import TRANSFERS
from mae_deploy.extract.layout import DTYPES, ERRORS_NAME, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, read_manifest
from mae_deploy.extract.options import ExtractOptions
from mae_deploy.extract.workers import Task
from mae_deploy.names import POOLS
from mae_deploy.sources import Source

DEFAULT_SHARD_SIZE = 10_000
# Token shards hold (L+1)*D values per image (ViT-B: 0.6 MB fp32); default shards stay under this size.
MAX_DEFAULT_SHARD_BYTES = 256 << 20
ENGINES = ("local", "ray")


def default_workers() -> int:
    """Decode processes when ``workers`` is not given: one per core beyond the first, at most 8.

    Inference uses every core too; on a 2-core machine one worker keeps a ViT-B/16 fed (decoding a JPEG
    and resizing it costs a few ms, encoding it tens of ms; see benchmarks/RESULTS.md).
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def check_options(
    *,
    pool: str,
    dtype: str,
    transfer: str,
    batch_size: int,
    min_side: int,
    workers: int | None,
    shard_size: int | None,
    max_pixels: int | None,
    engine: str,
) -> tuple[int, int]:
    """InputError for any bad option; returns (workers, max_pixels) with their defaults filled in."""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if pool not in POOLS:
        raise InputError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if transfer not in TRANSFERS:
        raise InputError(f"transfer must be one of {list(TRANSFERS)}, got {transfer!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("min_side", min_side, 1)):
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}")
    if workers is None:
        workers = default_workers()
    if workers < 0:
        raise InputError(f"workers must be 0 (decode in a thread) or more, got {workers}")
    if shard_size is not None and shard_size < 1:
        raise InputError(f"shard_size must be at least 1, got {shard_size}")
    if max_pixels is None:
        max_pixels = int(Image.MAX_IMAGE_PIXELS or 0)
    if max_pixels < 0:
        raise InputError(f"max_pixels must be 0 (no limit) or positive, got {max_pixels}")
    return workers, max_pixels


@dataclass
class JobPlan:
    """Everything fixed before decoding: the part's rows, the shards' row ranges, the manifest to write."""

    bundle: Bundle
    src: Source
    part: range
    out: Path
    shard_rows: list[range]
    feature_shape: tuple[int, ...]
    manifest: dict
    pool: str
    dtype: str
    min_side: int
    max_pixels: int
    precision: str
    exact_resize: bool = False
    decoder: str = "pil"  # names.DECODERS: "torch" decodes JPEGs on the runner's device

    def decoder_args(self, transfer: str) -> dict:
        b = self.bundle
        return {
            "preprocessing": b.preprocessing,
            "in_chans": b.in_chans,
            "min_side": self.min_side,
            "max_pixels": self.max_pixels,
            "transfer": transfer,
            "exact_resize": self.exact_resize,
            "reader": self.src.reader,
            "device_jpeg": self.decoder == "torch",
        }

    def tasks(self, shards: Sequence[int], batch_size: int) -> Iterator[Task]:
        """Batches of the given shards, in order; a batch never straddles two shards."""
        paths = self.src.paths
        for k in shards:
            rows = self.shard_rows[k]
            for b in range(rows.start, rows.stop, batch_size):
                stop = min(b + batch_size, rows.stop)
                yield Task(k, [(r, paths[r]) for r in range(b, stop)], stop == rows.stop)


def make_plan(bundle: Bundle, src: Source, part: range, out: Path, o: ExtractOptions) -> JobPlan:
    """The plan of a job into ``out`` (read under its lock: an existing job's shard size is reused).

    ``o`` has its defaults filled in (``max_pixels``, ``decoder``): what the manifest records is what runs.
    """
    pool, dtype, shard_size, precision, exact_resize = o.pool, o.dtype, o.shard_size, o.precision, o.exact_resize
    max_pixels, decoder = o.max_pixels, o.decoder
    if max_pixels is None or decoder is None:
        raise ValueError("make_plan needs the job's options with max_pixels and decoder filled in")
    L, D = bundle.num_patches, bundle.embed_dim
    feature_shape = (L + 1, D) if pool == "tokens" else (D,)
    if shard_size is None:
        previous_size = None
        if (out / MANIFEST_NAME).is_file():
            previous_size = read_manifest(out).get("settings", {}).get("shard_size")
        row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
        shard_size = previous_size or max(1, min(DEFAULT_SHARD_SIZE, MAX_DEFAULT_SHARD_BYTES // row_bytes))
    shard_rows = [range(a, min(a + shard_size, part.stop)) for a in range(part.start, part.stop, shard_size)]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "status": "running",
        "bundle": {
            "path": str(Path(bundle.path).resolve()),
            "name": bundle.name,
            "fingerprint": bundle_fingerprint(bundle, precision),
            "precision": precision,
            "embed_dim": D,
            "num_patches": L,
            "image_size": bundle.image_size,
            "preprocessing": bundle.preprocessing,
        },
        "source": {
            "spec": src.spec,
            "kind": src.kind,
            "fingerprint": src.fingerprint,
            "num_inputs": len(src),
            "rows": [part.start, part.stop],
        },
        "settings": {
            "pool": pool,
            "dtype": dtype,
            "shard_size": shard_size,
            "min_side": o.min_side,
            "max_pixels": max_pixels,
            "num_parts": o.num_parts,
            "part_index": o.part_index,
            "exact_resize": bool(exact_resize),
            "decoder": decoder,
        },
        "feature_shape": list(feature_shape),
        "layout": {
            "features": "shard-{k:05d}.npy",
            "index": "shard-{k:05d}.index.jsonl",
            "errors": ERRORS_NAME,
            "sharding": "contiguous row ranges of shard_size inputs; parts are contiguous row ranges",
        },
    }
    return JobPlan(
        bundle,
        src,
        part,
        out,
        shard_rows,
        feature_shape,
        manifest,
        pool,
        dtype,
        o.min_side,
        max_pixels,
        precision,
        bool(exact_resize),
        decoder,
    )


def bundle_fingerprint(bundle: Bundle, precision: str) -> str:
    """sha256 over what decides the features: the encoder graph files' hashes (or, for a precision the bundle
    has no graph of, e.g. the torch backend's bf16 autocast, the reference weights' and the precision),
    architecture, preprocessing."""
    files = bundle.manifest.get("files", {})
    if precision in bundle.precisions("encoder"):
        g = bundle.graph("encoder", precision)
        weights = {rel: files.get(rel) for rel in (g.file, *g.external_data)}
    else:  # the torch backend runs the reference weights at any precision; other backends refuse it later
        weights = {rel: sha for rel, sha in files.items() if rel.startswith("reference/")}
        weights["precision"] = precision
    payload = {
        "graph": weights,
        "architecture": bundle.architecture,
        "preprocessing": bundle.preprocessing,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def versions() -> dict:
    import PIL

    v = {
        "mae_deploy": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }
    for mod in ("onnxruntime", "torch", "tensorrt", "ray"):
        if mod in sys.modules:
            v[mod] = getattr(sys.modules[mod], "__version__", "?")
    return v


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ExtractSummary:
    """What :func:`extract_features` did (totals include shards committed by earlier, interrupted runs)."""

    out_dir: Path
    inputs: int  # inputs of this part
    features: int  # feature rows written (successful inputs)
    failed: int
    failures_by_reason: dict[str, int]
    shards: int
    processed: int  # inputs processed by this run (the rest were resumed)
    wall_s: float
    images_per_s: float  # processed / wall_s
    feature_shape: tuple[int, ...]
    dtype: str
    pool: str
    complete: bool = True
    timings: dict = field(default_factory=dict)
    engine: str = "local"
    repaired: list[str] = field(default_factory=list)  # damaged shards found and recomputed

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def raise_for_failures(self) -> None:
        """PartialFailure (exit code 4) when some inputs failed."""
        if self.failed:
            raise PartialFailure(
                f"{self.failed} of {self.inputs} inputs failed ({reasons_text(self.failures_by_reason)}); "
                f"see {self.out_dir / ERRORS_NAME}"
            )

    def __str__(self) -> str:
        resumed = self.inputs - self.processed
        lines = [f"recomputed a damaged shard: {why}" for why in self.repaired]
        lines += [
            f"images: {self.features} extracted, {self.failed} failed"
            + (f" ({reasons_text(self.failures_by_reason)})" if self.failed else "")
            + f", {self.inputs} inputs"
            + (f" ({resumed} resumed from earlier runs)" if resumed else ""),
            f"speed: {self.images_per_s:.1f} img/s over {self.processed} images, wall time {self.wall_s:.1f} s"
            if self.processed
            else "speed: nothing left to do (every shard was finished by an earlier run)",
            f"output: {self.out_dir} ({self.shards} shards, {self.pool} features {self.dtype} "
            f"(N, {', '.join(map(str, self.feature_shape))}))",
        ]
        if self.failed:
            lines.append(f"failures: {self.out_dir / ERRORS_NAME}")
        return "\n".join(lines)


def reasons_text(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
