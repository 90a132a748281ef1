"""WebDataset tar shards: one row per sample, its image read straight out of the shard, never unpacked.

Samples follow WebDataset's conventions (``webdataset.tariterators``): regular members only, metadata
members (``__name__``) skipped, a member's key is its path up to the first dot of its base name and its
extension the rest (``a/b.seg.png`` -> key ``a/b``, extension ``seg.png``); consecutive members with the
same key are one sample. A sample's image is its first member, in tar order, whose extension is an image one
(jpg, jpeg, png, webp, ...; then a compound one ending in such, e.g. ``seg.png``); a sample without one is a
row that fails as ``missing_image``. The row's path is ``SHARD#MEMBER`` (``SHARD#KEY.EXT``).

Planning reads each shard's headers (locally a seek per member; over the network the shard streams once,
shards in parallel threads) and records each image member's offset and size: 16 bytes per row, what a
decode worker needs to read its rows with one seek each. Rows of one batch are consecutive members, so a
worker reads its part of a shard front to back (a read-ahead buffer over the network) and every shard is
read once in all. A shard cut short keeps the members before the cut; the member the cut falls in fails as
``truncated``.
"""

from __future__ import annotations

import re
import tarfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import numpy as np

from mae_deploy.errors import InputError
from mae_deploy.names import IMAGE_EXTENSIONS
from mae_deploy.sources import urls
from mae_deploy.sources.base import Failure, Source

# webdataset.tariterators.base_plus_ext and its skip_meta pattern.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
IMAGE_SUFFIXES = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
NO_IMAGE = -1  # size of a sample's row that has no image member
# Shards open at once per reader (a batch spans at most two; a few more for Ray tasks reading several).
OPEN_SHARDS = 4
PLAN_THREADS = 16
READ_AHEAD = 4 << 20  # bytes fetched per request when reading a shard over the network


def open_binary(path: str):
    """A seekable binary file of a local path or URL (URLs with a read-ahead buffer)."""
    return urls.open_planned(path, "shard", READ_AHEAD)


def _image_member(members: list[tuple[str, str, int, int]]) -> tuple[str, int, int] | None:
    """(name, offset, size) of the sample's image member: an exact image extension first, then a compound one."""
    for exact in (True, False):
        for name, suffix, offset, size in members:
            last = suffix.rsplit(".", 1)[-1]
            if (suffix if exact else last) in IMAGE_SUFFIXES:
                return name, offset, size
    return None


def scan_shard(shard: str) -> tuple[list[str], list[int], list[int]]:
    """(row paths, data offsets, sizes) of the samples of one shard, in member order (planning: exit 3 / 7)."""
    f = urls.open_planned(shard, "shard", READ_AHEAD)
    samples: list[tuple[str, list[tuple[str, str, int, int]]]] = []
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise InputError(f"{shard} is not a tar file ({e}); give WebDataset .tar shards") from e
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - a network error while reading the first header
            raise urls.unreachable(shard, e) from e
        while True:
            try:
                ti = tf.next()
            except tarfile.ReadError:  # cut short: keep what came before; the cut member fails when read
                break
            except Exception as e:  # noqa: BLE001 - the network went away in the middle of the shard
                raise urls.unreachable(shard, e) from e
            if ti is None:
                break
            # headers are not kept: memory stays flat over a long shard (typeshed lacks TarFile.members)
            tf.members = []  # type: ignore[attr-defined]
            name = ti.name
            if not ti.isreg() or _META.match(name):
                continue
            m = _KEY.match(name)
            if not m:
                continue
            key, suffix = m.group(1), m.group(2).lower()
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((name, suffix, ti.offset_data, ti.size))
    paths, offsets, sizes = [], [], []
    for key, members in samples:
        found = _image_member(members)
        if found is None:
            paths.append(f"{shard}#{key}")
            offsets.append(0)
            sizes.append(NO_IMAGE)
        else:
            paths.append(f"{shard}#{found[0]}")
            offsets.append(found[1])
            sizes.append(found[2])
    return paths, offsets, sizes


def plan_shards(spec: str, shards: list[str]) -> Source:
    """The Source of WebDataset ``shards`` (in the order given): every sample of every shard, in order."""
    with ThreadPoolExecutor(max_workers=max(1, min(PLAN_THREADS, len(shards)))) as pool:
        scans = list(pool.map(scan_shard, shards))
    paths = [p for s in scans for p in s[0]]
    if not paths:
        raise InputError(f"the shards of {spec} hold no samples ({len(shards)} shards read)")
    starts = np.cumsum([0, *(len(s[0]) for s in scans)], dtype=np.int64)
    reader = TarReader(
        tuple(shards),
        starts,
        np.fromiter((o for s in scans for o in s[1]), dtype=np.int64),
        np.fromiter((n for s in scans for n in s[2]), dtype=np.int64),
    )
    return Source(spec=spec, kind="webdataset", paths=tuple(paths), reader=reader)


class TarReader:
    """Reads a row's image member from its shard: one seek and one read, shards kept open (a few at a time)."""

    def __init__(self, shards: tuple[str, ...], starts: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> None:
        self.shards, self.starts, self.offsets, self.sizes = shards, starts, offsets, sizes
        self._open: OrderedDict[int, IO[bytes]] = OrderedDict()

    def __getstate__(self) -> dict:  # open files stay in the process that opened them
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open = OrderedDict()

    def identity(self) -> str:
        return ""

    def _file(self, s: int):
        f = self._open.pop(s, None)
        if f is None:
            f = open_binary(self.shards[s])
            while len(self._open) >= OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
        self._open[s] = f
        return f

    def read(self, row: int, path: str) -> bytes:
        size = int(self.sizes[row])
        if size == NO_IMAGE:
            raise Failure(
                "missing_image",
                f"{path}: the sample has no image member (extensions {', '.join(sorted(IMAGE_SUFFIXES))})",
            )
        if size == 0:
            raise Failure("empty", f"{path} is empty (0 bytes)")
        s = int(np.searchsorted(self.starts, row, side="right") - 1)
        try:
            f = self._file(s)
            f.seek(int(self.offsets[row]))
            data = f.read(size)
        except Exception as e:  # noqa: BLE001 - a vanished shard or a network error: this row's failure
            self._open.pop(s, None)
            raise Failure("unreadable", f"cannot read {path}: {type(e).__name__}: {e}") from e
        if len(data) < size:
            raise Failure("truncated", f"{path}: the shard ends inside this member ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
