"""Where a bundle is built before it is published: one writer per destination, no leftovers.

An export builds the bundle in a hidden ``.<name>.tmp-XXXX`` directory beside the destination and renames
it into place at the end. A killed export (kill -9, OOM) cannot clean up after itself, so every export
first takes an exclusive ``flock`` on ``.<name>.export.lock`` beside the destination and, holding it,
deletes the staging and swap directories a dead export left for that name: nobody else can be writing
them while we hold the lock, and the OS releases the lock of a dead process. A second export into the
same destination while the first runs is refused (exit 3, naming the holder's pid).

The lock file is removed when the export ends. Deleting a lock file is only safe with the inode check
done here: a process that opened the old file before it was unlinked finds, once it holds the lock, that
the path no longer names its inode, and tries again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from mae_deploy.errors import InputError
from mae_deploy.fileio import FILE_MODE

STAGING_TAGS = ("tmp", "old")  # .<name>.tmp-XXXX (being built), .<name>.old-XXXX (being swapped out)


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.export.lock"


class ExportLock:
    """Exclusive, non-blocking lock on exporting into ``out``; a context manager."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.path = lock_path(self.out)
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise InputError(
                    f"another export into {self.out} is running (pid {holder}); wait for it to finish or "
                    "choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still holding the lock: see the module docstring
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ExportLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def clean_stale(out: Path) -> list[Path]:
    """Remove what a killed export into ``out`` left behind; call while holding :class:`ExportLock`."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        if any(entry.name.startswith(f".{out.name}.{tag}-") for tag in STAGING_TAGS) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def staging_dir(out: Path) -> Path:
    """A fresh hidden directory beside ``out`` to build the bundle in."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def publish_permissions(root: Path) -> None:
    """mkdtemp makes 0700 directories and some writers 0600 files; a bundle is meant to be shared and
    deployed: directories 0755 and files 0644 (less what the umask removes), as fileio writes them."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(Path(base) / d, 0o777 & ~umask)
        for f in files:
            os.chmod(Path(base) / f, FILE_MODE & ~umask)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished staging dir to ``out``; an existing bundle is swapped out, then deleted."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
