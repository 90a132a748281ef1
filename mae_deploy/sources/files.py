"""Plain image files: a directory, a glob, a text file of paths or one image, local or behind a URL.

The listing is deterministic, so the same source gives the same rows on every run and every machine that
sees the same files:

- a **directory** is walked recursively; files whose extension is one of :data:`IMAGE_EXTENSIONS`
  (case-insensitive) are kept, hidden files and directories (names starting with '.') are skipped, and the
  result is sorted by the path relative to the directory (POSIX separators, code-point order);
- a **glob** (``'data/**/*.jpg'``, recursive ``**`` allowed) keeps every matching regular file, whatever its
  extension (the pattern is the user's choice), sorted the same way;
- a **text file** lists one path per line, in the order given (that order *is* the user's choice of rows);
  blank lines and lines starting with ``#`` are skipped; relative paths are relative to the text file's
  directory, so the list can move with the data; a line may be a URL;
- a single image file is a source of one.

Local paths are made absolute (``os.path.abspath``, symlinks kept as they are), so the index of a job names
files unambiguously; URLs stay URLs (``s3://bucket/key``). The same rules hold for a directory (prefix), a
glob or a list file behind an fsspec URL.
"""

from __future__ import annotations

import glob as _glob
import os
import posixpath
import stat
from pathlib import Path

from mae_deploy.errors import InputError
from mae_deploy.names import IMAGE_EXTENSIONS
from mae_deploy.sources import urls
from mae_deploy.sources.base import Failure


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def walk_directory(root: Path, keep=is_image_name) -> list[str]:
    """Absolute paths of the files under ``root`` that ``keep`` accepts, hidden ones skipped, sorted."""
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and keep(name):
                full = os.path.join(dirpath, name)
                found.append((Path(os.path.relpath(full, root)).as_posix(), full))
    found.sort()
    return [os.path.abspath(full) for _, full in found]


def walk_url(url: str, keep=is_image_name) -> list[str]:
    """URLs of the objects under the prefix ``url`` that ``keep`` accepts, hidden ones skipped, sorted."""
    fs = urls.filesystem(url)
    scheme = urls.protocol(url)
    base = fs._strip_protocol(url).rstrip("/")
    found = urls.call(url, "listing", fs.find, base)
    rels = sorted(posixpath.relpath(f, base) for f in found)
    return [f"{scheme}://{base}/{r}" for r in rels if not _hidden(r) and keep(posixpath.basename(r))]


def expand_glob(pattern: str) -> list[str]:
    """Every regular file (or object) matching ``pattern``, sorted; URLs through fsspec."""
    if urls.is_url(pattern):
        fs = urls.filesystem(pattern)
        scheme = urls.protocol(pattern)
        matches = urls.call(pattern, "listing", fs.glob, pattern)
        return sorted(f"{scheme}://{m}" for m in matches if not fs.isdir(m))
    matches = [m for m in _glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)]
    return sorted({os.path.abspath(m) for m in matches})


def read_text(spec: str) -> str:
    """A list file's text (local or URL); not UTF-8 or unreadable is an InputError (exit 7 for URLs that do
    not answer)."""
    try:
        if urls.is_url(spec):
            fs = urls.filesystem(spec)
            data = urls.call(spec, "reading", fs.cat_file, spec)
        else:
            data = Path(spec).read_bytes()
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{spec} is not a UTF-8 text file of paths (and its extension is not an image one); "
            "give a directory, a glob or a text file with one image path per line"
        ) from e
    except OSError as e:
        raise InputError(f"cannot read the list of paths {spec}: {e}") from e


def read_list(spec: str) -> list[str]:
    """The entries of a list file, in order; relative ones resolved against the list's directory."""
    entries = []
    for line in read_text(spec).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if urls.is_url(line):
            entries.append(line)
        elif urls.is_url(spec):
            entries.append(urls.join(spec, line))
        else:
            p = Path(urls.local_path(line)).expanduser()
            entries.append(os.path.abspath(p if p.is_absolute() else Path(spec).parent / p))
    return entries


class FileReader:
    """Reads whole files: local paths directly, URLs through fsspec."""

    def identity(self) -> str:
        return ""

    def read(self, row: int, path: str) -> bytes:
        if urls.is_url(path):
            return _read_url(path)
        try:
            st = os.stat(path)
        except OSError as e:
            raise Failure("unreadable", f"cannot read {path}: {e.strerror or e}") from e
        if stat.S_ISDIR(st.st_mode):
            raise Failure("unreadable", f"{path} is a directory, not an image")
        if not stat.S_ISREG(st.st_mode):
            # A FIFO would block the read forever, /dev/zero never ends: neither is an image file.
            raise Failure("unreadable", f"{path} is not a regular file (a FIFO, socket or device)")
        if st.st_size == 0:
            raise Failure("empty", f"{path} is empty (0 bytes)")
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise Failure("unreadable", f"cannot read {path}: {e.strerror or e}") from e


def _read_url(url: str) -> bytes:
    try:
        data = urls.filesystem(url).cat_file(url)
    except FileNotFoundError as e:
        raise Failure("unreadable", f"cannot read {url}: it does not exist") from e
    except Exception as e:  # noqa: BLE001 - network errors of any library: this input's failure
        raise Failure("unreadable", f"cannot read {url}: {type(e).__name__}: {e}") from e
    if not data:
        raise Failure("empty", f"{url} is empty (0 bytes)")
    return data
