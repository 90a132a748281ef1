"""Reading results: the shards of one or more output directories as one lazily concatenated array.

:func:`open_features` memory-maps the shards of a directory (or of the parts of a ``--num-parts`` job) and
returns a :class:`Features` array plus paths and global rows, in source order. Every shard is checked for
truncation (size against its .npy header) and against its index; ``verify=True`` also checks each file's
sha256 against the manifest. A damaged shard is an InputError naming the file.
"""

from __future__ import annotations

import glob as _glob
import os
from pathlib import Path

import numpy as np

from mae_deploy.errors import InputError
from mae_deploy.extract.commit import job_settings
from mae_deploy.extract.layout import (
    MANIFEST_NAME,
    check_shard_files,
    index_name,
    read_index,
    read_manifest,
    shard_checksum_mismatch,
    shard_name,
)


class Features:
    """Features of one or more output directories, memory-mapped, as one lazily concatenated array.

    ``features[i]``, ``features[a:b]``, ``features[[i, j]]`` and ``np.asarray(features)`` read only the
    rows asked for (``np.asarray`` reads everything). ``paths[i]`` and ``rows[i]`` (the input's global row
    in the source) belong to ``features[i]``; order is the source order across shards and parts.
    ``shards`` are the per-shard memory maps (``np.load(mmap_mode="r")``) for streaming;
    :meth:`locate` maps a position to (shard number, row within it).
    """

    def __init__(self, shards: list[np.ndarray], paths: list[str], rows: np.ndarray, manifests: list[dict]) -> None:
        self.shards = shards
        self.paths = paths
        self.rows = rows
        self.manifests = manifests
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in shards], dtype=np.int64)])
        m = manifests[0]
        self.feature_shape = tuple(m["feature_shape"])
        self.dtype = np.dtype(m["settings"]["dtype"])
        self.pool = m["settings"]["pool"]
        self._by_path: dict[str, int] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.feature_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def locate(self, i: int) -> tuple[int, int]:
        """Position ``i`` (negative counts from the end) -> (shard number, row within that shard)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} features")
        i %= n
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return s, int(i - self.offsets[s])

    def index_of(self, path: str | os.PathLike) -> int:
        """Position of ``path`` as the index writes it (a local file: absolute or relative to the current
        directory; a URL, ``SHARD#KEY.EXT``, ``FILE#ROW`` or an id: as it is). KeyError when it has no features."""
        if self._by_path is None:
            self._by_path = {p: i for i, p in enumerate(self.paths)}
        p = os.fspath(path)
        return self._by_path[p] if p in self._by_path else self._by_path[os.path.abspath(p)]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            s, j = self.locate(int(key))
            return np.asarray(self.shards[s][j])
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._range(start, stop)
            key = np.arange(start, stop, step)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean index of shape {idx.shape} for {len(self)} features")
            idx = np.flatnonzero(idx)
        if not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
            raise TypeError("index with an int, a slice, or a 1-d array of ints or bools")
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {n} features")
        idx = idx % n if n else idx
        out = np.empty((len(idx), *self.feature_shape), dtype=self.dtype)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s][idx[sel] - self.offsets[s]]
        return out

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, *self.feature_shape), dtype=self.dtype)
        s0 = int(np.searchsorted(self.offsets, start, side="right") - 1)
        pieces = []
        s = s0
        while s < len(self.shards) and self.offsets[s] < stop:
            a = max(start, self.offsets[s]) - self.offsets[s]
            b = min(stop, self.offsets[s + 1]) - self.offsets[s]
            pieces.append(self.shards[s][a:b])
            s += 1
        return np.concatenate(pieces) if pieces else np.empty((0, *self.feature_shape), dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):
        a = self._range(0, len(self))
        return a if dtype is None else a.astype(dtype)

    def __iter__(self):
        for shard in self.shards:
            yield from shard

    def __repr__(self) -> str:
        return f"Features(shape={self.shape}, dtype={self.dtype}, pool={self.pool}, shards={len(self.shards)})"


def _expand_dirs(dir_or_dirs) -> list[Path]:
    items = [dir_or_dirs] if isinstance(dir_or_dirs, (str, os.PathLike)) else list(dir_or_dirs)
    dirs: list[Path] = []
    for item in items:
        s = os.fspath(item)
        if not os.path.exists(s) and set("*?[") & set(s):
            matches = sorted(_glob.glob(s))
            if not matches:
                raise InputError(f"no feature directories match {s!r}")
            dirs.extend(Path(m) for m in matches)
        else:
            dirs.append(Path(s))
    if not dirs:
        raise InputError("open_features needs at least one directory")
    return dirs


def open_features(dir_or_dirs, allow_incomplete: bool = False, verify: bool = False) -> Features:
    """Memory-map the features of an extraction output directory, or of the parts of one job.

    ``dir_or_dirs``: a directory, a glob of directories (``"feats/part-*"``) or a list. Parts must come from
    the same job (source, bundle, pool, dtype, number of parts); they are ordered by ``--part-index``, so
    positions follow the source order. A directory whose job has not finished is an InputError unless
    ``allow_incomplete`` (then its committed shards are read). Each shard's size, header and index are
    checked (cheap); ``verify=True`` also hashes every file against the manifest's sha256 (reads everything).
    A damaged shard is an InputError naming it.
    """
    dirs = _expand_dirs(dir_or_dirs)
    parts = []
    for d in dirs:
        if not (d / MANIFEST_NAME).is_file():
            raise InputError(f"{d} is not a feature directory (no {MANIFEST_NAME}); run `mae-deploy extract` first")
        m = read_manifest(d)
        if m.get("status") != "complete" and not allow_incomplete:
            raise InputError(
                f"{d}: the extraction is {m.get('status')}, not complete; rerun the same `mae-deploy extract` "
                "command to finish it (or pass allow_incomplete=True to read its finished shards)"
            )
        parts.append((d, m))
    first = parts[0][1]

    def key(m: dict) -> tuple:
        return (
            m["source"]["fingerprint"],
            m["bundle"]["fingerprint"],
            m["settings"]["pool"],
            m["settings"]["dtype"],
            job_settings(m)["num_parts"],
        )

    for d, m in parts[1:]:
        if key(m) != key(first):
            raise InputError(
                f"{d} and {parts[0][0]} are not parts of the same job (source, bundle, pool, dtype or --num-parts "
                "differ); open them separately"
            )
    seen: dict[int, Path] = {}
    for d, m in parts:
        i = job_settings(m)["part_index"]
        if i in seen:
            raise InputError(f"{d} and {seen[i]} are both part {i}; pass each part once")
        seen[i] = d
    parts.sort(key=lambda dm: job_settings(dm[1])["part_index"])

    shards: list[np.ndarray] = []
    paths: list[str] = []
    rows: list[int] = []
    for d, m in parts:
        for arr, records in _read_shards(d, m, complete=m.get("status") == "complete", verify=verify):
            shards.append(arr)
            paths.extend(r["path"] for r in records)
            rows.extend(r["row"] for r in records)
    return Features(shards, paths, np.asarray(rows, dtype=np.int64), [m for _, m in parts])


def _read_shards(d: Path, m: dict, *, complete: bool, verify: bool):
    """(memory map, index records) of each committed, non-empty shard of ``d``, checked; in shard order."""
    start, stop = m["source"]["rows"]
    size = m["settings"]["shard_size"]
    recorded = m.get("shards") or {}
    for k in range(-(-(stop - start) // size)):
        if not (d / index_name(k)).is_file():
            if complete:
                raise InputError(
                    f"{d / index_name(k)} is missing from a finished extraction; rerun the same "
                    "`mae-deploy extract` command to recompute it"
                )
            return  # an unfinished job: its shards up to the first gap, so positions are a prefix of the source
        problem = check_shard_files(d, k)
        if problem is None and verify and str(k) in recorded:
            problem = shard_checksum_mismatch(d, k, recorded[str(k)])
        if problem is not None:
            raise InputError(f"{problem}; rerun the same `mae-deploy extract` command to recompute it")
        records = read_index(d / index_name(k))
        if records:
            yield np.load(d / shard_name(k), mmap_mode="r"), records
