"""Micro-batching: rows from concurrent requests run through the runner together, in one thread.

Requests submit *work*: a graph part (``encoder``, ``decoder``, ...) and its input arrays, each with a
leading batch dimension. Work can share a runner call when the part and every input's per-row shape are
equal (for the encoder: the same number of visible tokens), so the batching key is
``(part, shapes without the batch dimension)``. Pooling and post-processing happen per request after the
call, so requests for cls, mean and tokens features share one encoder batch.

Policy: the runner thread takes the oldest queued work and everything else queued with the same key, in
arrival order, up to ``max_batch_size`` rows. A lone request waits for nobody; under load, batches form from
what arrived while the previous batch ran. ``max_delay_s`` > 0 holds a partial batch up to that long
(measured from its oldest row's arrival) for more company. Work larger than ``max_batch_size`` rows is
split into chunks at submission.

Admission: at most ``max_queue`` rows wait; beyond that :class:`QueueFull` (the server answers 503 with
Retry-After). Results come back as :class:`concurrent.futures.Future`, usable from threads and (through
``asyncio.wrap_future``) from the event loop; a cancelled future (a request that timed out) is skipped when
its batch forms, so it never costs runner time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class QueueFull(Exception):
    """More rows are waiting than ``max_queue`` allows."""

    def __init__(self, queued: int, asked: int, limit: int) -> None:
        super().__init__(f"the server is overloaded: {queued} images are queued, {asked} more would exceed {limit}")


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work."""


class BatchObserver(Protocol):
    """What the batcher reports (metrics); every method is called from the runner thread or a submitter."""

    def batch_done(self, part: str, rows: int, seconds: float) -> None: ...

    def queue_depth(self, rows: int) -> None: ...


@dataclass(eq=False)
class _Work:
    part: str
    inputs: tuple[np.ndarray, ...]
    rows: int
    key: tuple
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    runner_seconds: float = 0.0  # the duration of the runner call this work rode in (set before its result)


def batch_key(part: str, inputs: Sequence[np.ndarray]) -> tuple:
    """Work with equal keys can be concatenated along the batch dimension and run in one call: the same part,
    and per input the same library (numpy, or torch for images decoded on the device), device, dtype and
    per-row shape."""
    return (
        part,
        tuple((type(a).__module__, str(a.dtype), str(getattr(a, "device", "cpu")), tuple(a.shape[1:])) for a in inputs),
    )


def concatenate(parts: Sequence) -> Any:  # np.ndarray or torch.Tensor, as the parts are
    """Arrays of one library along the batch dimension: numpy, or torch tensors (torch imported only then)."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(list(parts))


class MicroBatcher:
    """Queue work from any thread; run it in batches on one runner thread. ``calls`` maps part -> function."""

    def __init__(
        self,
        calls: Mapping[str, Callable[..., np.ndarray]],
        max_batch_size: int = 32,
        max_delay_s: float = 0.0,
        max_queue: int = 256,
        observer: BatchObserver | None = None,
        name: str = "mae-runner",
    ) -> None:
        self.calls = dict(calls)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.observer = observer
        self._cond = threading.Condition()
        self._pending: deque[_Work] = deque()
        self._queued_rows = 0
        self._closing = False
        self._flushing = False  # draining: run partial batches at once instead of holding them for company
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    # -- submitting ---------------------------------------------------------------------------------
    def start(self) -> MicroBatcher:
        self._thread.start()
        return self

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def submit(self, part: str, inputs: Sequence[np.ndarray]) -> list[Future]:
        """Queue ``inputs`` (same leading dim) for ``part``; one future per chunk of at most max_batch_size rows."""
        return [w.future for w in self._enqueue(part, inputs)]

    def _enqueue(self, part: str, inputs: Sequence[np.ndarray]) -> list[_Work]:
        if part not in self.calls:
            raise KeyError(f"no runner call for part {part!r}")
        rows = int(inputs[0].shape[0])
        key = batch_key(part, inputs)
        chunks = [
            _Work(part, tuple(a[s : s + self.max_batch_size] for a in inputs), min(self.max_batch_size, rows - s), key)
            for s in range(0, rows, self.max_batch_size)
        ]
        with self._cond:
            if self._closing:
                raise BatcherClosed("the server is shutting down")
            if self._queued_rows + rows > self.max_queue:
                raise QueueFull(self._queued_rows, rows, self.max_queue)
            self._pending.extend(chunks)
            self._queued_rows += rows
            self._cond.notify_all()
            depth = self._queued_rows
        self._report_depth(depth)
        return chunks

    def run(self, part: str, inputs: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        """Blocking: submit and wait (from a worker thread). TimeoutError after ``timeout`` seconds."""
        futures = self.submit(part, inputs)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            outs = [f.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futures]
        except TimeoutError:
            for f in futures:
                f.cancel()
            raise
        return outs[0] if len(outs) == 1 else concatenate(outs)

    async def run_async(
        self,
        part: str,
        inputs: Sequence[np.ndarray],
        timeout: float | None = None,
        on_ran: Callable[[float], None] | None = None,
    ) -> np.ndarray:
        """From the event loop: submit and await. ``asyncio.TimeoutError`` after ``timeout`` seconds.

        ``on_ran(seconds)``: told how long the runner calls carrying this work took (their sum over chunks), so a
        caller can tell waiting for a batch from computing it.
        """
        works = self._enqueue(part, inputs)
        wrapped = [asyncio.wrap_future(w.future) for w in works]
        try:
            if len(wrapped) == 1:  # the usual case: no gather, one task less per request
                outs = [await asyncio.wait_for(wrapped[0], timeout)]
            else:
                outs = await asyncio.wait_for(asyncio.gather(*wrapped), timeout)
        except BaseException:
            for w in works:  # a timed-out or abandoned request costs no runner time
                w.future.cancel()
            raise
        if on_ran is not None:
            on_ran(sum(w.runner_seconds for w in works))
        return outs[0] if len(outs) == 1 else concatenate(outs)

    # -- the runner thread ------------------------------------------------------------------------------
    def _rows_for(self, key: tuple) -> int:
        return sum(w.rows for w in self._pending if w.key == key)

    def _wait_for_company(self) -> None:
        """With max_delay_s, hold a partial batch until it fills or its oldest row has waited that long."""
        if self.max_delay_s <= 0:
            return
        first = self._pending[0]
        until = first.arrived + self.max_delay_s
        while not (self._closing or self._flushing) and self._rows_for(first.key) < self.max_batch_size:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _take(self) -> list[_Work]:
        """The oldest work's key: queued work with that key, in order, up to max_batch_size rows."""
        key = self._pending[0].key
        taken: list[_Work] = []
        kept: deque[_Work] = deque()
        rows = 0
        for w in self._pending:
            if w.key == key and rows + w.rows <= self.max_batch_size:
                self._queued_rows -= w.rows
                if w.future.set_running_or_notify_cancel():  # False: its request gave up (timeout)
                    taken.append(w)
                    rows += w.rows
            else:
                kept.append(w)
        self._pending = kept
        return taken

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:  # closing and nothing left
                    return
                self._wait_for_company()
                if not self._pending:
                    continue
                batch = self._take()
                depth = self._queued_rows
            self._report_depth(depth)
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Work]) -> None:
        part = batch[0].part
        rows = sum(w.rows for w in batch)
        t0 = time.perf_counter()
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = tuple(concatenate(parts) for parts in zip(*(w.inputs for w in batch), strict=True))
            out = self.calls[part](*inputs)
        except BaseException as e:  # noqa: BLE001 (every waiting request learns why its batch failed)
            for w in batch:
                w.future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        start = 0
        for w in batch:
            w.runner_seconds = seconds
            w.future.set_result(out[start : start + w.rows])
            start += w.rows
        if self.observer is not None:
            self.observer.batch_done(part, rows, seconds)

    def _report_depth(self, rows: int) -> None:
        if self.observer is not None:
            self.observer.queue_depth(rows)

    # -- shutting down -----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Stop holding partial batches (``max_delay_s``): the server is draining, company will not come."""
        with self._cond:
            self._flushing = True
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued, stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
