"""One writer per output directory: an ``fcntl.flock`` on a lock file inside it, held for the whole job.

The operating system releases the lock when the process ends, however it ends (SIGKILL included), so a
stale lock file never blocks a rerun. A second job into the same directory is refused with the holder's
pid. Locks on network filesystems are as good as the filesystem's ``flock`` (NFSv4 and Lustre: yes; some
FUSE mounts: no-op).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mae_deploy.errors import InputError
from mae_deploy.extract.layout import LOCK_NAME


class OutputLock:
    """Exclusive, non-blocking lock on ``directory`` (created if missing); a context manager."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise InputError(
                f"--out {self.directory} is in use by {who} (another `mae-deploy extract` writing into it); "
                "wait for it to finish, or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # Closing the descriptor drops the flock; the file stays (removing it would race a new holder).
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
