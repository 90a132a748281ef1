"""Writing files so that nothing is ever half-written, and checking up front that a path can be written.

The one atomic-write helper of the project: a hidden temp file in the target's directory, then
``os.replace``. Readers see the old file or the new one, never a prefix. Files come out mode 0644 (like
the bundle's), not the 0600 that ``tempfile.mkstemp`` gives. ``durable=True`` adds fsync of the file and
of the directory, for results a crash must not lose (extraction shards, manifests, checkpoints).

``check_writable`` runs before long work starts, so that a benchmark's results or an extraction's first
shard are not lost to a path under a file, a read-only filesystem or /proc after the work ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mae_deploy.errors import InputError

FILE_MODE = 0o644


def fsync_dir(d: str | os.PathLike) -> None:
    """Make renames in ``d`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(final: str | os.PathLike) -> Path:
    """A hidden temp name beside ``final``, unique per process: never mistaken for a result."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def write_temp(final: str | os.PathLike, write: Callable[[IO[bytes]], object], *, durable: bool = False) -> Path:
    """Write through ``write(file)`` into a fresh temp file beside ``final``; returns it, not yet renamed.

    For writers that rename several files together (a shard and its index). The temp file is removed
    if ``write`` raises.
    """
    final = Path(final)
    directory = final.parent if str(final.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE & ~_umask())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write(
    final: str | os.PathLike, data: bytes | Callable[[IO[bytes]], object], *, durable: bool = False
) -> Path:
    """Write ``data`` (bytes, or a callable that writes into the file) to ``final`` atomically; returns it."""
    final = Path(final)
    if not final.parent.is_dir() and str(final.parent):
        raise InputError(f"cannot write {final}: directory {final.parent} does not exist")
    write = data if callable(data) else (lambda f: f.write(data))
    tmp = write_temp(final, write, durable=durable)
    try:
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(final.parent if str(final.parent) else ".")
    return final


def atomic_write_text(final: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    return atomic_write(final, text.encode("utf-8"), durable=durable)


def atomic_write_json(final: str | os.PathLike, obj: object, *, durable: bool = False) -> Path:
    """Pretty JSON with a trailing newline, written atomically."""
    return atomic_write(final, (json.dumps(obj, indent=2, ensure_ascii=True) + "\n").encode(), durable=durable)


def check_writable(path: str | os.PathLike, *, what: str = "output", directory: bool = False) -> Path:
    """Raise InputError unless ``path`` can be created or replaced; returns it as a Path.

    ``directory=True``: ``path`` is a directory that may exist or will be created (with parents). Else
    ``path`` is a file whose parent must exist or be creatable. The check writes and removes a probe
    file, which is the only test a read-only mount, /proc or a full quota really answers.
    """
    p = Path(path)
    if directory:
        if p.exists() and not p.is_dir():
            raise InputError(f"{what} {p} exists and is not a directory: choose another path")
        target_dir = p
    else:
        if p.is_dir():
            raise InputError(f"{what} {p} is a directory: give a file name")
        target_dir = p.parent if str(p.parent) else Path(".")
    existing = target_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise InputError(f"cannot write {what} {p}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mae-deploy-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write {what} {p}: {existing} is not writable ({e.strerror or e})") from e
    return p


def _umask() -> int:
    # os.umask can only be read by setting it; done once per call, restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable_dir(out: Path, *, overwrite: bool, marker: str, what: str, protect: Path | None = None) -> None:
    """Raise InputError unless the directory ``out`` may be written, or replaced whole with ``overwrite``.

    An existing ``out`` is replaced only when it is empty or holds ``marker`` (the file our writer puts in
    every ``what`` it makes), and never when ``protect`` (the input being read) lies inside it. Checked
    before long work, so a failure costs nothing.
    """
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} exists and is a file; choose a directory path for the {what}")
        if not overwrite:
            raise InputError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise InputError(
                f"{out} is a non-empty directory but not a {what} (no {marker}): mae-deploy did not "
                "write it and refuses to replace it even with --overwrite; choose another --out"
            )
        if protect is not None and (protect.resolve() == out.resolve() or out.resolve() in protect.resolve().parents):
            raise InputError(f"the input {protect} is inside {out}; --overwrite would delete it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the parent directory of --out {out}: {e.strerror or e}") from e
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"cannot write to {out.parent} (permission denied); choose another --out")
