"""What a batch job reads: a directory, a glob or a text file of paths -> an ordered list of image paths.

Every input gets a stable *row*: its position in the listing of the whole source. The listing is
deterministic, so the same source gives the same rows on every run and every machine that sees the same
files:

- a **directory** is walked recursively; files whose extension is one of :data:`IMAGE_EXTENSIONS`
  (case-insensitive) are kept, hidden files and directories (names starting with '.') are skipped, and the
  result is sorted by the path relative to the directory (POSIX separators, code-point order);
- a **glob** (``'data/**/*.jpg'``, recursive ``**`` allowed) keeps every matching regular file, whatever its
  extension (the pattern is the user's choice), sorted the same way;
- a **text file** lists one path per line, in the order given (that order *is* the user's choice of rows);
  blank lines and lines starting with ``#`` are skipped; relative paths are relative to the text file's
  directory, so the list can move with the data;
- a single image file is a source of one.

Paths are made absolute (``os.path.abspath``, symlinks kept as they are), so the index of a job names
files unambiguously.

Scale-out (:func:`split_rows`) uses **contiguous ranges**: with N inputs and S parts, part i gets rows
``[i*N//S, (i+1)*N//S)``. Part sizes differ by at most one, a part's local row j is global row
``start + j``, and the parts in index order, concatenated, are the whole source in order.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from mae_deploy.errors import InputError
from mae_deploy.names import IMAGE_EXTENSIONS

__all__ = ["IMAGE_EXTENSIONS", "Source", "is_image_name", "list_source", "split_rows"]
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Source:
    """An ordered listing of a source: ``paths[row]`` is the input with that global row."""

    spec: str  # what the user gave
    kind: str  # "directory" | "glob" | "list" | "file"
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def fingerprint(self) -> str:
        """sha256 of the kind and every path in order: any added, removed or reordered input changes it."""
        h = hashlib.sha256(self.kind.encode())
        for p in self.paths:
            h.update(b"\0")
            h.update(os.fsencode(p))
        return h.hexdigest()


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_directory(root: Path) -> list[str]:
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and is_image_name(name):
                full = os.path.join(dirpath, name)
                found.append((Path(os.path.relpath(full, root)).as_posix(), full))
    found.sort()
    return [os.path.abspath(full) for _, full in found]


def _read_list(list_file: Path) -> list[str]:
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{list_file} is not a UTF-8 text file of paths (and its extension is not an image one); "
            "give a directory, a glob or a text file with one image path per line"
        ) from e
    except OSError as e:
        raise InputError(f"cannot read the list of paths {list_file}: {e}") from e
    base = list_file.parent
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        paths.append(os.path.abspath(p if p.is_absolute() else base / p))
    return paths


def _expand_glob(pattern: str) -> list[str]:
    matches = [m for m in _glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)]
    return sorted({os.path.abspath(m) for m in matches})


def list_source(spec: str | os.PathLike) -> Source:
    """The ordered listing of ``spec`` (directory, glob, text file of paths, or one image).

    An empty result is an :class:`InputError` that says what was searched for.
    """
    s = os.fspath(spec)
    p = Path(s).expanduser()
    if p.is_dir():
        kind, paths = "directory", _walk_directory(p)
        if not paths:
            raise InputError(
                f"directory {s} holds no images (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                "any case); give another directory, a glob or a text file of paths"
            )
    elif p.is_file():
        if is_image_name(p.name):
            kind, paths = "file", [os.path.abspath(p)]
        else:
            kind, paths = "list", _read_list(p)
            if not paths:
                raise InputError(f"the list of paths {s} is empty (no non-blank, non-comment lines)")
    elif p.exists():  # neither a directory nor a regular file: reading it would block or never end
        raise InputError(f"source {s} is not a regular file (a FIFO, socket or device); give a directory, a glob "
                         "or a text file of image paths")
    elif _GLOB_CHARS & set(s):
        kind, paths = "glob", _expand_glob(s)
        if not paths:
            raise InputError(f"the glob {s!r} matches no files; check the pattern (quote it so the shell keeps it)")
    else:
        raise InputError(f"source {s} does not exist; give a directory, a glob or a text file of image paths")
    return Source(spec=s, kind=kind, paths=tuple(paths))


def split_rows(num_rows: int, num_shards: int = 1, shard_index: int = 0) -> range:
    """Global rows of part ``shard_index`` of ``num_shards``: a contiguous, balanced range."""
    if num_shards < 1:
        raise InputError(f"--num-shards must be at least 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise InputError(
            f"--shard-index must be in 0..{num_shards - 1} for --num-shards {num_shards}, got {shard_index}"
        )
    return range(shard_index * num_rows // num_shards, (shard_index + 1) * num_rows // num_shards)
