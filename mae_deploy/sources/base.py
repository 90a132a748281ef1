"""What every kind of source shares: the ordered listing (:class:`Source`), the row reader protocol
(:class:`RowReader`) and one input's failure (:class:`Failure`).

A source is planned once, in the parent, into ``paths[row]`` (what the index records for the row) and a
reader. The reader is small and picklable: decode workers and Ray tasks receive it and call
``read(row, path) -> bytes`` for each row they decode, opening what they need lazily (files, shards and
row groups are opened in the process that reads them, never pickled open).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class Failure(Exception):
    """One input's failure: a reason from FAILURE_REASONS and a message naming the input."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@runtime_checkable
class RowReader(Protocol):
    """Reads the encoded image bytes of one planned row; raises :class:`Failure` for a bad row."""

    def read(self, row: int, path: str) -> bytes:
        """The bytes of global row ``row`` (``path`` is its index path, used in messages)."""
        ...

    def identity(self) -> str:
        """What, beyond the paths, decides each row's bytes (e.g. the image column); '' for plain files."""
        ...


class NamedBytes(io.BytesIO):
    """In-memory image bytes whose ``str`` is the row's path, so Pillow's and the Preprocessor's messages name
    the input (``cannot read image s3://b/x.tar#k.jpg: ...``), not a BytesIO repr."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def _file_reader() -> RowReader:
    from mae_deploy.sources.files import FileReader

    return FileReader()


@dataclass(frozen=True)
class Source:
    """An ordered listing of a source: ``paths[row]`` is the input with that global row; ``reader`` reads it."""

    spec: str  # what the user gave
    kind: str  # "directory" | "glob" | "list" | "file" | "webdataset" | "parquet"
    paths: tuple[str, ...]
    reader: RowReader = field(default_factory=_file_reader, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def fingerprint(self) -> str:
        """sha256 of the kind, every path in order and the reader's identity: any added, removed or reordered
        input (or another image column) changes it."""
        h = hashlib.sha256(self.kind.encode())
        for p in self.paths:
            h.update(b"\0")
            h.update(os.fsencode(p))
        ident = self.reader.identity()
        if ident:  # plain files add nothing, so their fingerprints are those of earlier versions
            h.update(b"\0\0" + ident.encode())
        return h.hexdigest()
