"""Parquet files with an image column: one row per table row, read a row group at a time (memory bounded).

The image column holds encoded image bytes: a binary column, or Hugging Face's image struct
``{bytes: binary, path: string}`` (what ``datasets`` writes for an ``Image()`` feature). ``image_column``
None takes the first such column. A null value (or a struct whose ``bytes`` is null) is a row that fails as
``missing_image``. The row's path is ``FILE#ROW`` (ROW counted from 0 within the file) or, with
``id_column``, that column's value as text (``FILE#ROW`` where it is null).

Planning reads each file's footer (row groups and their sizes; the id column when one is given) and nothing
else. A reader keeps one row group's image column in memory: the rows of a batch are consecutive, so a decode
worker reads each row group it touches once.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, Literal

import numpy as np

from mae_deploy.errors import InputError, MissingDependency
from mae_deploy.sources import urls
from mae_deploy.sources.base import Failure, Source
from mae_deploy.sources.webdataset import PLAN_THREADS, open_binary

OPEN_FILES = 4
ID_BATCH = 65_536  # id values read per step at planning


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingDependency("pyarrow", "reading Parquet sources", urls.INSTALL) from e
    return pq


def image_field(type_) -> Literal["bytes", False] | None:
    """How a column of this Arrow type holds image bytes: None (binary itself), "bytes" (a struct with a binary
    ``bytes`` field), or False (it does not)."""
    import pyarrow as pa

    def binary(t) -> bool:
        return (
            pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or getattr(pa.types, "is_binary_view", lambda _: False)(t)
        )

    if binary(type_):
        return None
    if pa.types.is_struct(type_):
        idx = type_.get_field_index("bytes")
        if idx >= 0 and binary(type_.field(idx).type):
            return "bytes"
    return False


def choose_image_column(schema, wanted: str | None, file: str) -> tuple[str, str | None]:
    """(column, struct field or None) of the image bytes in ``schema``; InputError naming the columns."""
    described = ", ".join(f"{n} ({schema.field(n).type})" for n in schema.names)
    if wanted is not None:
        if wanted not in schema.names:
            raise InputError(f"--image-column {wanted!r} is not a column of {file}; its columns: {described}")
        how = image_field(schema.field(wanted).type)
        if how is False:
            raise InputError(
                f"--image-column {wanted!r} of {file} is {schema.field(wanted).type}, not image bytes "
                "(binary, or a struct {bytes, path} as Hugging Face datasets write)"
            )
        return wanted, how
    for name in schema.names:
        how = image_field(schema.field(name).type)
        if how is not False:
            return name, how
    raise InputError(
        f"{file} has no image column (binary, or a struct {{bytes, path}}); its columns: {described}. "
        "Give --image-column"
    )


def _open_parquet(file: str):
    """(ParquetFile, the binary file under it): closing the first leaves the second open."""
    pq = _pq()
    f = open_binary(file)
    try:
        return pq.ParquetFile(f), f
    except Exception as e:  # noqa: BLE001 - ArrowInvalid and friends: not a Parquet file
        f.close()
        if isinstance(e, (ConnectionError, TimeoutError)):
            raise urls.unreachable(file, e) from e
        raise InputError(f"{file} is not a Parquet file ({e})") from e


def _scan_file(file: str, image_column: str | None, id_column: str | None) -> dict:
    pf, f = _open_parquet(file)
    try:
        schema = pf.schema_arrow
        column, how = choose_image_column(schema, image_column, file)
        if id_column is not None and id_column not in schema.names:
            raise InputError(
                f"--id-column {id_column!r} is not a column of {file}; its columns: {', '.join(schema.names)}"
            )
        md = pf.metadata
        counts = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        n = sum(counts)
        if id_column is None:
            paths = [f"{file}#{r}" for r in range(n)]
        else:
            paths = []
            for batch in pf.iter_batches(batch_size=ID_BATCH, columns=[id_column]):
                for v in batch.column(0).to_pylist():
                    paths.append(f"{file}#{len(paths)}" if v is None else str(v))
        return {"column": column, "field": how, "counts": counts, "paths": paths}
    finally:
        f.close()


def plan_parquet(spec: str, files: list[str], *, image_column: str | None, id_column: str | None) -> Source:
    """The Source of Parquet ``files`` (in the order given): every row of every file, in order."""
    with ThreadPoolExecutor(max_workers=max(1, min(PLAN_THREADS, len(files)))) as pool:
        scans = list(pool.map(lambda f: _scan_file(f, image_column, id_column), files))
    chosen = {(s["column"], s["field"]) for s in scans}
    if len(chosen) > 1:
        raise InputError(
            f"the files of {spec} put their images in different columns ({sorted(map(str, chosen))}); "
            "give --image-column"
        )
    paths = [p for s in scans for p in s["paths"]]
    if not paths:
        raise InputError(f"the Parquet files of {spec} hold no rows ({len(files)} files read)")
    column, field = chosen.pop()
    file_starts = np.cumsum([0, *(len(s["paths"]) for s in scans)], dtype=np.int64)
    group_starts = tuple(np.cumsum([0, *s["counts"]], dtype=np.int64) for s in scans)
    reader = ParquetReader(tuple(files), file_starts, group_starts, column, field)
    return Source(spec=spec, kind="parquet", paths=tuple(paths), reader=reader)


class ParquetReader:
    """Reads a row's image bytes: its row group's image column is read once and kept until another is needed."""

    def __init__(
        self,
        files: tuple[str, ...],
        file_starts: np.ndarray,
        group_starts: tuple[np.ndarray, ...],
        column: str,
        field: str | None,
    ) -> None:
        self.files, self.file_starts, self.group_starts = files, file_starts, group_starts
        self.column, self.field = column, field
        self._open: OrderedDict[int, tuple[Any, IO[bytes]]] = OrderedDict()  # (pyarrow ParquetFile, its file)
        self._group: tuple[tuple[int, int], Any] | None = None  # ((file, row group), its pyarrow image column)

    def __getstate__(self) -> dict:  # open files and cached columns stay in the process that read them
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_group")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open, self._group = OrderedDict(), None

    def identity(self) -> str:
        return f"parquet image column {self.column}" + (f".{self.field}" if self.field else "")

    def _file(self, i: int):
        opened = self._open.pop(i, None)
        if opened is None:
            f = open_binary(self.files[i])
            opened = (_pq().ParquetFile(f), f)
            while len(self._open) >= OPEN_FILES:
                self._open.popitem(last=False)[1][1].close()
        self._open[i] = opened
        return opened[0]

    def _values(self, i: int, g: int):
        if self._group is None or self._group[0] != (i, g):
            self._group = None  # free the previous row group before reading the next
            col = self._file(i).read_row_group(g, columns=[self.column]).column(0)
            self._group = ((i, g), col)
        return self._group[1]

    def read(self, row: int, path: str) -> bytes:
        i = int(np.searchsorted(self.file_starts, row, side="right") - 1)
        local = row - int(self.file_starts[i])
        starts = self.group_starts[i]
        g = int(np.searchsorted(starts, local, side="right") - 1)
        try:
            value = self._values(i, g)[local - int(starts[g])].as_py()
        except Exception as e:  # noqa: BLE001 - a damaged page or a network error: this row's failure
            self._open.pop(i, None)
            reason = "unreadable" if isinstance(e, OSError) else "corrupt"
            raise Failure(
                reason, f"cannot read {path} (row group {g} of {self.files[i]}): {type(e).__name__}: {e}"
            ) from e
        if isinstance(value, dict):
            value = value.get(self.field)
        if value is None:
            raise Failure("missing_image", f"{path}: the image column {self.column!r} is null in this row")
        if not value:
            raise Failure("empty", f"{path}: the image column {self.column!r} holds 0 bytes")
        return bytes(value)

    def close(self) -> None:
        self._group = None
        while self._open:
            self._open.popitem()[1][1].close()
