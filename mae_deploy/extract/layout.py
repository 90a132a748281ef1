"""The output directory's format: file names, the manifest, index lines, shard headers and checksums.

Shared by the writer (commit, resume), the reader (:func:`~mae_deploy.extract.reader.open_features`) and both
engines, so a directory written on one machine or a Ray cluster reads the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mae_deploy.errors import InputError
from mae_deploy.names import POOLS  # noqa: F401  (re-exported: the pools a job accepts)

FORMAT_NAME = "mae-deploy-features"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
# Hidden, so that the start-up cleanup and the "is this directory empty" check both ignore it.
LOCK_NAME = ".extract.lock"
DTYPES = ("float32", "float16")
FAILURE_REASONS = (
    "empty",
    "not_an_image",
    "truncated",
    "corrupt",
    "too_small",
    "decompression_bomb",
    "unreadable",
    "decoder_crashed",
    "missing_image",
)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


def index_name(k: int) -> str:
    return f"shard-{k:05d}.index.jsonl"


def shard_number(name: str) -> int:
    """``shard-00012.npy`` / ``shard-00012.index.jsonl`` -> 12; -1 for any other name."""
    try:
        return int(name.split("-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return -1


def json_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=True) + "\n").encode()


def read_manifest(d: Path) -> dict:
    """The manifest of feature directory ``d``; InputError when it is unreadable or of another format."""
    path = d / MANIFEST_NAME
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise InputError(f"{path} is not a mae-deploy features manifest (format {fmt!r})")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{path} has format_version {m['format_version']}; upgrade mae-deploy to read it")
    return m


def read_index(path: Path) -> list[dict]:
    """The {"row", "path"} records of one index file; InputError naming the file when it is damaged."""
    try:
        with open(path, "rb") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is damaged ({e}); rerun the `mae-deploy extract` command that wrote it") from e


def npy_layout(path: Path) -> tuple[int, int]:
    """(rows, expected file size) from a .npy header alone: no data is read. Raises ValueError/OSError."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        data_start = f.tell()
    return int(shape[0]), data_start + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def check_shard_files(out: Path, k: int) -> str | None:
    """Why shard ``k``'s files are structurally damaged (truncated, header, row count), or None."""
    npy, idx = out / shard_name(k), out / index_name(k)
    try:
        rows, size = npy_layout(npy)
        actual = os.stat(npy).st_size
    except (OSError, ValueError) as e:
        return f"{npy} cannot be read as .npy ({e})"
    if actual != size:
        return f"{npy} is {actual} bytes but its header says {size} (truncated or altered)"
    try:
        n_index = len(read_index(idx))
    except InputError as e:
        return str(e)
    if n_index != rows:
        return f"{npy} has {rows} rows but {idx.name} lists {n_index}"
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def shard_checksum_mismatch(out: Path, k: int, recorded: dict) -> str | None:
    """Which of shard ``k``'s files no longer has the sha256 recorded in the manifest, or None."""
    for name, key in ((shard_name(k), "sha256"), (index_name(k), "index_sha256")):
        want = recorded.get(key)
        if want and file_sha256(out / name) != want:
            return f"{out / name} does not match the sha256 recorded in {MANIFEST_NAME} (altered or damaged)"
    return None
