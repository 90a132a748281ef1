"""Shared-memory slots: where decode workers put a batch's pixels, so the parent never copies them.

A batch of 128 float32 ViT-B images is 77 MB. Pickled through a pipe it costs the parent a copy and
hundreds of syscalls (one core moves ~15k images/s at memcpy speed, and pickling is slower still); in a
slot the worker writes the pixels once and the parent hands a numpy view of them to the runner.

The parent owns the slots (one per batch in flight, plus the one being consumed), creates them before the
workers start and unlinks them when the pool closes. Space is reserved up front (``posix_fallocate``), so a
too-small ``/dev/shm`` (Docker's default is 64 MB) shows as "no slots" here, and the pool falls back to
pipes, instead of a worker dying of SIGBUS on its first write.
"""

from __future__ import annotations

import os
from multiprocessing import shared_memory

import numpy as np

SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux


class SharedSlots:
    """``count`` shared-memory blocks of ``nbytes`` each; :meth:`acquire` / :meth:`release` hand them out."""

    def __init__(self, blocks: list[shared_memory.SharedMemory]) -> None:
        self._blocks = blocks
        self._free = list(range(len(blocks)))

    @classmethod
    def create(cls, count: int, nbytes: int) -> SharedSlots | None:
        """The slots, or None when the system cannot hold them (then pixels travel through pipes).

        At most half of the free shared memory is taken: fallocate would otherwise fill it to the last page
        before failing, and other programs use it too.
        """
        try:
            st = os.statvfs(SHM_DIR)
        except OSError:
            return None
        if count * max(1, nbytes) > st.f_bavail * st.f_frsize // 2:
            return None
        blocks: list[shared_memory.SharedMemory] = []
        try:
            for _ in range(count):
                shm = shared_memory.SharedMemory(create=True, size=max(1, nbytes))
                blocks.append(shm)
                # reserve now: tmpfs would SIGBUS on a late write (_fd is CPython's private descriptor of the block)
                os.posix_fallocate(shm._fd, 0, max(1, nbytes))  # type: ignore[attr-defined]
        except (OSError, AttributeError):
            for shm in blocks:
                _unlink(shm)
            return None
        return cls(blocks)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self._blocks]

    def acquire(self) -> int:
        if not self._free:
            raise RuntimeError("no free shared-memory slot: more batches in flight than slots")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def array(self, slot: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """A numpy view of slot ``slot`` (valid until the slot is released)."""
        return np.ndarray(shape, dtype=dtype, buffer=self._blocks[slot].buf)

    def close(self) -> None:
        for shm in self._blocks:
            _unlink(shm)
        self._blocks, self._free = [], []


def _unlink(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # a view is still alive somewhere: the mapping goes with the process
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


class SlotWriter:
    """Worker side: the parent's slots by name, attached once each."""

    def __init__(self) -> None:
        self._attached: dict[str, shared_memory.SharedMemory] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        shm = self._attached.get(name)
        if shm is None:
            shm = self._attached[name] = shared_memory.SharedMemory(name=name)
        return np.ndarray(shape, dtype=dtype, buffer=shm.buf)
