"""An ImageFolder (``ROOT/<class>/<images>``) packed as WebDataset shards or Parquet files, in the ImageFolder's
row order: what ``mae-deploy data digits --format`` writes, so every source kind can be tried in seconds.

Shards: ``shard-{k:06d}.tar`` with ``KEY.EXT`` (the image's bytes), ``KEY.cls`` (class index) and
``KEY.txt`` (class name) per sample, KEY = ``<class>/<file stem>``. Parquet: ``part-{k:05d}.parquet`` with
Hugging Face's image struct ``image {bytes, path}``, ``label`` and ``class_name`` columns. Each file is
written atomically (mae_deploy.fileio).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from mae_deploy.errors import InputError
from mae_deploy.fileio import atomic_write
from mae_deploy.sources.files import walk_directory

FORMATS = ("folder", "webdataset", "parquet")


def _labelled(root: Path) -> list[tuple[str, str, int, str]]:
    """(path, key, label, class name) of every image under ``root/<class>/``, classes sorted."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root} has no class folders to pack")
    out = []
    for label, name in enumerate(classes):
        for path in walk_directory(root / name):
            stem = os.path.splitext(os.path.relpath(path, root / name))[0].replace(os.sep, "/")
            out.append((path, f"{name}/{stem}", label, name))
    return out


def write_shards(root: str | os.PathLike, out: str | os.PathLike, per_shard: int = 1000) -> list[Path]:
    """Pack the ImageFolder ``root`` into WebDataset shards in ``out``; returns the shard paths."""
    items, out = _labelled(Path(root)), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(0, len(items), per_shard):

        def write(f, part=items[k : k + per_shard]) -> None:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for path, key, label, name in part:
                    ext = os.path.splitext(path)[1].lower()
                    for member, data in (
                        (key + ext, Path(path).read_bytes()),
                        (f"{key}.cls", str(label).encode()),
                        (f"{key}.txt", name.encode()),
                    ):
                        info = tarfile.TarInfo(member)
                        info.size, info.mtime = len(data), 0  # no timestamps: the same digits, the same bytes
                        tf.addfile(info, io.BytesIO(data))

        written.append(atomic_write(out / f"shard-{k // per_shard:06d}.tar", write))
    return written


def write_parquet(
    root: str | os.PathLike, out: str | os.PathLike, per_file: int = 5000, row_group: int = 256
) -> list[Path]:
    """Pack the ImageFolder ``root`` into Parquet files in ``out`` (row groups of ``row_group``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items, out = _labelled(Path(root)), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(0, len(items), per_file):
        part = items[k : k + per_file]
        table = pa.table(
            {
                "image": [{"bytes": Path(p).read_bytes(), "path": os.path.basename(p)} for p, _, _, _ in part],
                "label": pa.array([label for _, _, label, _ in part], pa.int64()),
                "class_name": [name for _, _, _, name in part],
            }
        )

        def write(f, t=table) -> None:
            pq.write_table(t, f, row_group_size=row_group)

        written.append(atomic_write(out / f"part-{k // per_file:05d}.parquet", write))
    return written
