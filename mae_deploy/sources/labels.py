"""The class label of each row of a planned source, for ``eval``: WebDataset ``.cls`` members, Parquet columns.

Labels are read as the data stores them, one value per row in the source's row order; mapping them to a
classifier's classes is the caller's job. A shard is read once more, front to back, for its ``.cls`` members
(planning records only where the images are); a Parquet file's label column is read alone.
"""

from __future__ import annotations

import tarfile
from typing import TYPE_CHECKING, cast

from mae_deploy.errors import InputError
from mae_deploy.sources import urls
from mae_deploy.sources.base import Source

if TYPE_CHECKING:
    from mae_deploy.sources.parquet import ParquetReader
    from mae_deploy.sources.webdataset import TarReader

CLS_SUFFIX = "cls"  # WebDataset's convention: the sample's class index as text


def webdataset_labels(src: Source) -> list[str | None]:
    """Per row, the text of its sample's ``.cls`` member (None when the sample has none)."""
    from mae_deploy.sources.webdataset import _KEY, open_binary

    reader = cast("TarReader", src.reader)
    out: list[str | None] = []
    for s, shard in enumerate(reader.shards):
        found: dict[str, str] = {}
        with open_binary(shard) as f:
            try:
                with tarfile.open(fileobj=f, mode="r:") as tf:
                    for ti in tf:
                        # headers are not kept: memory stays flat over a long shard (typeshed lacks TarFile.members)
                        tf.members = []  # type: ignore[attr-defined]
                        m = _KEY.match(ti.name)
                        if ti.isreg() and m and m.group(2).lower() == CLS_SUFFIX:
                            cls = tf.extractfile(ti)
                            if cls is not None:  # always, for a regular member
                                found[m.group(1)] = cls.read().decode("utf-8", "replace").strip()
            except tarfile.ReadError:  # cut short: the samples after the cut have no label (the caller says so)
                pass
            except (ConnectionError, TimeoutError) as e:
                raise urls.unreachable(shard, e) from e
        for row in range(int(reader.starts[s]), int(reader.starts[s + 1])):
            member = src.paths[row][len(shard) + 1 :]  # a row's path is SHARD#MEMBER (or SHARD#KEY)
            m = _KEY.match(member)
            out.append(found.get(m.group(1) if m else member))
    return out


def parquet_labels(src: Source, column: str) -> list[object]:
    """Per row, the value of ``column`` (ints, strings or None, as stored)."""
    from mae_deploy.sources.parquet import _open_parquet

    out: list[object] = []
    for file in cast("ParquetReader", src.reader).files:
        pf, f = _open_parquet(file)
        try:
            if column not in pf.schema_arrow.names:
                raise InputError(
                    f"--label-column {column!r} is not a column of {file}; its columns: "
                    f"{', '.join(pf.schema_arrow.names)}"
                )
            for batch in pf.iter_batches(columns=[column]):
                out += batch.column(0).to_pylist()
        finally:
            f.close()
    if len(out) != len(src):
        raise InputError(
            f"the Parquet files of {src.spec} changed since they were listed ({len(out)} labels for "
            f"{len(src)} rows); run again"
        )
    return out
