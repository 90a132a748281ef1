"""Decode workers for the local engine: batches of paths in, decoded batches out, in task order.

:class:`DecodeWorkers` runs worker processes; :class:`ThreadDecode` decodes in one background thread
(``workers=0``). Both yield ``(task, Decoded)`` in the order of the tasks, with at most ``max_in_flight``
batches decoded ahead of the consumer, so memory stays flat.

Worker processes are started with ``spawn`` by default (safe with the threads that ONNX Runtime, PyTorch and
CUDA start). A worker exits by itself when the main process dies, and ignores SIGINT (Ctrl-C is the main
process's to handle: it closes the pool).

Pixels travel in shared memory (:mod:`.slots`) when the pool knows the batch size and the system has room:
a worker writes a batch into its slot and sends only the rows and failures through its pipe; the parent
yields a view of the slot, valid until it asks for the next batch. Otherwise (and for single-image retries)
they are pickled through the pipe.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from mae_deploy.errors import MaeDeployError
from mae_deploy.extract.decode import Decoded, Decoder, merge_decoded
from mae_deploy.extract.slots import SharedSlots, SlotWriter

# A pipe to or from a worker that died fails with one of these.
_PIPE_ERRORS = (EOFError, OSError)  # OSError covers BrokenPipeError and ConnectionResetError


@dataclass
class Task:
    """One batch of one shard: ``items`` are (global row, path) pairs in row order."""

    shard: int
    items: list[tuple[int, str]]
    last_in_shard: bool


class DecodeStage(Protocol):
    """What the local engine needs of a decode stage (:class:`DecodeWorkers` or :class:`ThreadDecode`)."""

    restarts: int
    transport: str  # how pixels reach the consumer: "shared_memory", "pipe" or "thread"

    def __iter__(self) -> Iterator[tuple[Task, Decoded]]: ...

    def worker_pids(self) -> list[int]: ...

    def close(self) -> None: ...


def _worker_main(task_conn, result_conn, decoder_args: dict, max_pixels: int, parent_pid: int) -> None:
    """Worker process loop: (task id, items) -> (task id, Decoded) over its own pipes.

    Before a single-image task (a retry after a death) it sends ``(task id, None)``: the parent then knows
    the worker really started that image, so only an image that was being decoded is blamed for a death.
    A task that names a shared-memory slot has its pixels written there (the result says ``in_slot``).
    Exits on None, when its task pipe closes, or when the parent is gone (polled every second).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Images above the limit fail as decompression_bomb; Pillow's warning just before would only be noise.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    # Pillow's own bomb check (at 2x its limit, on open) must not be stricter than the job's limit.
    Image.MAX_IMAGE_PIXELS = max_pixels or None
    decoder = Decoder(**decoder_args)
    shape, dtype = decoder.pixel_layout()
    slots = SlotWriter()
    try:
        while True:
            if not task_conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            task = task_conn.recv()
            if task is None:
                return
            tid, items, slot = task
            if isinstance(tid, tuple):
                result_conn.send((tid, None))
            if slot is None:
                result_conn.send((tid, decoder.decode_batch(items)))
                continue
            res = decoder.decode_batch(items, out=slots.array(slot, (len(items), *shape), dtype))
            res.pixels, res.in_slot = None, True
            result_conn.send((tid, res))
    except _PIPE_ERRORS:  # the parent went away
        return


def _death_text(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class _Worker:
    """One decode process with its own task and result pipes; ``assigned`` are the task ids it holds."""

    def __init__(self, ctx, decoder_args: dict, max_pixels: int) -> None:
        task_r, self.task_conn = ctx.Pipe(duplex=False)
        self.result_conn, result_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=_worker_main,
            args=(task_r, result_w, decoder_args, max_pixels, os.getpid()),
            daemon=True,
            name="mae-deploy-decode",
        )
        self.proc.start()
        task_r.close()  # the child's ends: the parent's copies would keep the pipes open after a death
        result_w.close()
        self.assigned: list = []
        self.started: object = None  # the single-image task it reported starting, if any

    def send(self, tid, items, slot: str | None = None) -> None:
        """Hand over a task; raises OSError when the worker is gone (the task is then not assigned)."""
        self.task_conn.send((tid, items, slot))
        self.assigned.append(tid)

    def close_pipes(self) -> None:
        self.task_conn.close()
        self.result_conn.close()


class DecodeWorkers:
    """Decoded batches in task order from worker processes, replacing workers that die.

    The parent hands each worker at most two tasks through the worker's own pipe, so it always knows which
    tasks a worker holds. A task id is a batch number ``seq``, or ``(seq, j)`` for image ``j`` of a batch
    decoded alone. When a worker dies (killed for memory, a crash inside an image decoder, or killed by
    someone), a replacement starts and:

    - the first batch it held is decoded again one image per task (which image was it?);
    - a single-image task it reported starting fails with reason ``decoder_crashed``, and the job goes on;
    - every other task it held, and a task whose hand-over failed (a broken pipe), is simply queued again.

    With ``batch_size`` (the most items a task has) each batch in flight gets a shared-memory slot, held
    from hand-over until the consumer asks for the next batch; ``shared_memory=False`` (or no room for the
    slots) sends pixels through the pipes instead. ``transport`` says which is in use.
    """

    MAX_RESTARTS = 100

    def __init__(
        self,
        tasks: Iterator[Task],
        decoder_args: dict,
        max_pixels: int,
        workers: int,
        max_in_flight: int,
        start_method: str = "spawn",
        batch_size: int | None = None,
        shared_memory: bool = True,
    ) -> None:
        self.tasks = tasks
        self.decoder_args = decoder_args
        self.max_pixels = max_pixels
        self.max_in_flight = max(1, max_in_flight)
        self.restarts = 0
        self._shape, self._dtype = Decoder(**decoder_args).pixel_layout()
        self._slot_items = batch_size or 0
        self._slots = None
        if shared_memory and batch_size and workers > 0:
            image_bytes = int(np.prod(self._shape)) * np.dtype(self._dtype).itemsize
            # Every batch in flight, plus the one the consumer holds.
            self._slots = SharedSlots.create(self.max_in_flight + 1, batch_size * image_bytes)
        self._slot_of: dict[int, int] = {}  # batch seq -> its slot, until the consumer is done with it
        self.transport = "shared_memory" if self._slots is not None else "pipe"
        self._ctx = mp.get_context(start_method)
        self._pool = [_Worker(self._ctx, decoder_args, max_pixels) for _ in range(workers)]
        self._closed = False
        self._meta: dict[int, Task] = {}  # batch seq -> task, until yielded
        self._done: dict[int, Decoded] = {}
        self._singles: dict[int, dict[int, Decoded]] = {}  # batch seq -> image position -> result
        self._retry: list[tuple[object, list]] = []  # tasks to hand out before new ones
        self._submitted = self._next_seq = 0
        self._exhausted = False

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._pool]

    def __iter__(self) -> Iterator[tuple[Task, Decoded]]:
        if self._closed:
            raise RuntimeError("this DecodeWorkers is closed; create a new one")
        self._assign()
        while self._next_seq < self._submitted:
            while self._next_seq not in self._done:
                self._wait_and_collect()
                self._assign()
            seq = self._next_seq
            res, task = self._done.pop(seq), self._meta.pop(seq)
            self._next_seq += 1
            self._assign()  # before yielding: workers decode the next batches while the caller runs inference
            yield task, res
            if self._slots is not None and seq in self._slot_of:  # the consumer is done with this batch's pixels
                self._slots.release(self._slot_of.pop(seq))

    # -- scheduling --------------------------------------------------------------------------------

    def _items(self, tid) -> list:
        return [self._meta[tid[0]].items[tid[1]]] if isinstance(tid, tuple) else self._meta[tid].items

    def _next_work(self) -> tuple[object, list] | None:
        if self._retry:
            return self._retry.pop(0)
        if self._exhausted or self._submitted - self._next_seq >= self.max_in_flight:
            return None
        task = next(self.tasks, None)
        if task is None:
            self._exhausted = True
            return None
        self._meta[self._submitted] = task
        if self._slots is not None and len(task.items) <= self._slot_items:
            self._slot_of[self._submitted] = self._slots.acquire()
        self._submitted += 1
        return self._submitted - 1, task.items

    def _slot_name(self, tid) -> str | None:
        """The shared-memory slot a whole-batch task writes to (single-image retries use the pipe)."""
        if isinstance(tid, tuple) or tid not in self._slot_of or self._slots is None:
            return None
        return self._slots.names[self._slot_of[tid]]

    def _assign(self) -> None:
        """Top every live worker up to two tasks (one decoding, one queued); replaced workers get theirs too."""
        replaced = True
        while replaced:
            replaced = False
            for w in sorted(self._pool, key=lambda w: len(w.assigned)):
                while len(w.assigned) < 2 and (work := self._next_work()) is not None:
                    try:
                        w.send(*work, self._slot_name(work[0]))
                    except OSError:
                        self._retry.insert(0, work)  # never reached the worker: not its fault, not the image's
                        self._replace(w)
                        replaced = True
                        break

    def _wait_and_collect(self) -> None:
        by_conn = {w.result_conn: w for w in self._pool}
        by_sentinel = {w.proc.sentinel: w for w in self._pool}
        ready = mp.connection.wait([*by_conn, *by_sentinel], timeout=5.0)
        dead = []
        for r in ready:
            w = by_conn.get(r)
            if w is not None and w in self._pool:
                try:
                    self._receive(w, *w.result_conn.recv())
                except _PIPE_ERRORS:
                    dead.append(w)
        dead += [by_sentinel[r] for r in ready if r in by_sentinel]
        for w in dict.fromkeys(dead):
            if w in self._pool:
                self._replace(w)

    def _receive(self, w: _Worker, tid, res: Decoded | None) -> None:
        if res is None:  # "started (seq, j)"
            w.started = tid
            return
        w.assigned.remove(tid)
        if res.in_slot:
            assert self._slots is not None  # a task is given a slot only when there are slots
            res.pixels = (
                self._slots.array(self._slot_of[tid], (len(res.rows), *self._shape), self._dtype) if res.rows else None
            )
        if isinstance(tid, tuple):
            self._single_done(tid, res)
        else:
            self._done[tid] = res

    def _single_done(self, tid: tuple[int, int], res: Decoded) -> None:
        seq, j = tid
        self._singles[seq][j] = res
        if len(self._singles[seq]) == len(self._meta[seq].items):
            self._done[seq] = merge_decoded(self._singles.pop(seq), len(self._meta[seq].items))

    def _drain(self, w: _Worker) -> None:
        """Results a worker sent before dying are good."""
        try:
            while w.result_conn.poll():
                self._receive(w, *w.result_conn.recv())
        except _PIPE_ERRORS:
            pass

    def _replace(self, w: _Worker) -> None:
        """Bury a dead (or unreachable) worker, re-queue what it held, start a new one."""
        self._drain(w)
        if w.proc.is_alive():  # its pipe broke but it still runs: it can no longer be trusted with work
            w.proc.kill()
        w.proc.join(timeout=5)  # reap it, so its exit code is known
        why = _death_text(w.proc.exitcode)
        held = list(w.assigned)
        if held and not isinstance(held[0], tuple):
            # A worker takes tasks in order: its first batch may be the one it died on; find the image.
            seq = held.pop(0)
            self._singles[seq] = {}
            self._retry.extend(((seq, j), [item]) for j, item in enumerate(self._meta[seq].items))
        for tid in held:
            if tid == w.started:
                self._blame(tid, why)
            else:
                self._retry.append((tid, self._items(tid)))
        self._pool.remove(w)
        w.close_pipes()
        self.restarts += 1
        if self.restarts > self.MAX_RESTARTS:
            raise MaeDeployError(
                f"decode workers died {self.restarts} times (last: {why}); finished shards are kept. Check "
                "memory (fewer --workers) and rerun the same command to resume"
            )
        self._pool.append(_Worker(self._ctx, self.decoder_args, self.max_pixels))

    def _blame(self, tid: tuple[int, int], why: str) -> None:
        row, path = self._items(tid)[0]
        self._single_done(
            tid,
            Decoded(
                [],
                None,
                [
                    (
                        row,
                        "decoder_crashed",
                        (
                            f"decoding {path} made the decode worker die ({why}): the file crashes the image decoder "
                            "or needs more memory than the machine has"
                        ),
                    )
                ],
            ),
        )

    def close(self) -> None:
        """Stop every worker (a worker blocked sending a result nobody wants is terminated)."""
        self._closed = True
        for w in self._pool:
            try:
                w.task_conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for w in self._pool:
            w.proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(timeout=1)
            w.close_pipes()
        self._pool = []
        if self._slots is not None:
            self._slots.close()


class ThreadDecode:
    """``workers=0``: decode in one background thread (Pillow releases the GIL while decoding and resizing;
    a crash in a decoder then takes the job down, whereas a dead worker process is replaced)."""

    restarts = 0
    transport = "thread"

    def __init__(self, tasks: Iterator[Task], decoder_args: dict, max_in_flight: int) -> None:
        self.tasks = tasks
        self.decoder_args = decoder_args
        self._q: queue.Queue = queue.Queue(maxsize=max(1, max_in_flight))
        self._stop = threading.Event()
        self._end = object()
        self._thread: threading.Thread | None = None

    def worker_pids(self) -> list[int]:
        return []

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            decoder = Decoder(**self.decoder_args)
            for task in self.tasks:
                if not self._put((task, decoder.decode_batch(task.items))):
                    return
            self._put(self._end)
        except BaseException as e:  # surfaced in the consumer
            self._put(e)

    def __iter__(self) -> Iterator[tuple[Task, Decoded]]:
        if self._stop.is_set():
            raise RuntimeError("this ThreadDecode is closed; create a new one")
        self._thread = threading.Thread(target=self._run, name="mae-deploy-decode", daemon=True)
        self._thread.start()
        try:
            while (item := self._q.get()) is not self._end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
