"""Shared data for the sources tests: the same images as a folder, as WebDataset shards and as Parquet files,
plus broken shards and rows; uploaded to the session's S3 endpoint on request.

The builders behind tests/extract/conftest.py's ``source_data``, ``broken_source_data`` and ``s3_source_data``
fixtures; the S3 endpoint itself is its ``s3_endpoint``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

N_IMAGES = 18
PER_SHARD = 6
BUCKET = "mae-sources"


def _encoded_images() -> list[tuple[str, str, bytes]]:
    """(key, extension, bytes): crops of scikit-image's photos, JPEG and PNG, sizes 40..150 px."""
    rng = np.random.default_rng(23)
    photos = [getattr(skimage_data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "camera")]
    out = []
    for i in range(N_IMAGES):
        a = photos[i % len(photos)]
        h, w = int(rng.integers(40, 150)), int(rng.integers(40, 150))
        y, x = int(rng.integers(0, a.shape[0] - h)), int(rng.integers(0, a.shape[1] - w))
        ext = ("jpg", "png", "jpeg")[i % 3]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a[y : y + h, x : x + w])).save(
            buf, format="PNG" if ext == "png" else "JPEG"
        )
        out.append((f"s{i:05d}", ext, buf.getvalue()))
    return out


def _tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_source_data(root: Path) -> dict:
    """The same images three ways, in the same row order: ``folder`` (KEY.EXT files), ``shards`` (3 tar shards:
    two from webdataset's TarWriter with a .json and a .cls member per sample, one from tarfile), ``parquet``
    (2 files: a Hugging Face image struct column, row groups of 4, an ``id`` column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    images = _encoded_images()
    folder = root / "folder"
    folder.mkdir()
    for key, ext, data in images:
        (folder / f"{key}.{ext}").write_bytes(data)
    shards = root / "shards"
    shards.mkdir()
    for s in range(N_IMAGES // PER_SHARD):
        part = images[s * PER_SHARD : (s + 1) * PER_SHARD]
        path = shards / f"train-{s:06d}.tar"
        if s < 2:
            with wds.TarWriter(str(path)) as w:
                for key, ext, data in part:
                    w.write({"__key__": key, ext: data, "json": {"key": key}, "cls": s})
        else:
            with tarfile.open(path, "w") as tf:
                for key, ext, data in part:
                    _tar_member(tf, f"{key}.txt", b"caption")
                    _tar_member(tf, f"{key}.{ext}", data)
    pq_dir = root / "parquet"
    pq_dir.mkdir()
    half = N_IMAGES // 2
    for f, part in enumerate((images[:half], images[half:])):
        table = pa.table(
            {
                "id": [key for key, _, _ in part],
                "label": list(range(len(part))),
                "image": [{"bytes": data, "path": f"{key}.{ext}"} for key, ext, data in part],
            }
        )
        pq.write_table(table, pq_dir / f"part-{f}.parquet", row_group_size=4)
    return {
        "root": root,
        "images": images,
        "folder": folder,
        "shards": shards,
        "parquet": pq_dir,
        "shard_spec": str(shards / "train-{000000..000002}.tar"),
    }


def write_broken_data(root: Path, source_data: dict) -> dict:
    """One shard with a good sample, a corrupt member, a sample without an image and a cut-off last member;
    one Parquet file with a good row, a null image and undecodable bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (_, ext, good), (_, _, other) = source_data["images"][0], source_data["images"][1]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _tar_member(tf, f"a-good.{ext}", good)
        _tar_member(tf, "b-corrupt.jpg", good[:200] + bytes(range(256)) * 8)
        _tar_member(tf, "c-noimage.json", json.dumps({"caption": "no image"}).encode())
        _tar_member(tf, "d-cut.jpg", other)
    data = buf.getvalue()
    cut = data.index(other) + len(other) // 2  # inside the last member's data
    (root / "broken.tar").write_bytes(data[:cut])
    values = [good, None, b"\x89PNG\r\n\x1a\n" + b"\0" * 64]
    table = pa.table({"image": values}, schema=pa.schema([("image", pa.binary())]))
    pq.write_table(table, root / "broken.parquet")
    return {"root": root, "shard": root / "broken.tar", "parquet": root / "broken.parquet"}


def upload_to_s3(source_data: dict) -> dict:
    """``source_data``'s shards and Parquet files uploaded to the S3 endpoint the environment names; their URLs."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    for kind in ("shards", "parquet"):
        for p in sorted(Path(source_data[kind]).iterdir()):
            fs.put_file(str(p), f"{BUCKET}/{kind}/{p.name}")
    return {
        "shard_spec": f"s3://{BUCKET}/shards/train-{{000000..000002}}.tar",
        "parquet": f"s3://{BUCKET}/parquet/",
        "bucket": BUCKET,
    }
