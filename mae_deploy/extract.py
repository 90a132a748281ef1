"""Batch feature extraction: millions of images -> sharded, memory-mappable features; resumable.

The job (``mae-deploy extract``, :func:`extract_features`) reads a source (see :mod:`mae_deploy.sources`),
decodes and preprocesses images in worker processes, encodes them with a runner in the main process and
writes numbered shards. Three stages overlap:

    source rows --(batches)--> decode workers --(bounded, in order)--> inference --(queue of 1)--> shard writer

At most ``2 * workers + 2`` decoded batches exist at any time, plus the shard being filled and one being
written, so memory stays flat however many images there are.

Output directory (``DIR``)::

    manifest.json              settings, source, counts, versions and per-run timings (written atomically)
    shard-00000.npy            features of the shard's successful inputs: (n, D), or (n, L+1, D) for tokens
    shard-00000.index.jsonl    one line per feature row: {"row": <global source row>, "path": "<abs path>"}
    ...
    errors.jsonl               one line per failed input: {"row", "path", "reason", "message"}

Shard ``k`` covers the part's inputs ``[k * shard_size, (k+1) * shard_size)`` (input positions, not
successes), so its rows are fixed before anything is decoded. A shard is written to hidden temporary files,
fsynced and renamed: ``.npy`` first, the index last. It counts as done only when its index exists, and that
rename is the commit. Failures of a shard are appended (and fsynced) to errors.jsonl just *before* its commit;
on resume, lines for rows past the last committed shard are dropped, so the file ends up byte-identical to an
uninterrupted run's (as do the shards: batches never straddle shards, so a resumed shard sees the same
batches).

Failure reasons in errors.jsonl (:data:`FAILURE_REASONS`): ``empty`` (zero bytes), ``not_an_image``
(Pillow recognises no format), ``truncated``, ``corrupt`` (any other decoding error), ``too_small`` (shorter
side below ``min_side``), ``decompression_bomb`` (more pixels than ``max_pixels``, default Pillow's
``Image.MAX_IMAGE_PIXELS``), ``unreadable`` (missing file, permissions, a directory), ``decoder_crashed``
(decoding it killed the worker process: a crash in a decoder, or out of memory; see :class:`_DecodeStage`).

Exit status (CLI): 0 when every input succeeded; 4 (:class:`~mae_deploy.errors.PartialFailure`) when the
job ran to the end but some inputs failed; 3 (:class:`~mae_deploy.errors.InputError`) for bad options, an
empty source, a directory holding another job, or ``--strict`` stopping at a failure. The Python API returns
an :class:`ExtractSummary` instead of raising for failed inputs (``summary.raise_for_failures()`` raises
PartialFailure).

Reading results: :func:`open_features` memory-maps the shards of one or more output directories (the parts
of a ``--num-shards`` job) and returns them as one lazily concatenated :class:`Features` array plus paths
and global rows, in source order.

Worker processes are started with the ``spawn`` method (safe with the threads that ONNX Runtime, PyTorch and
CUDA start; the same on Linux, macOS and Windows), so a script calling :func:`extract_features` needs the
usual ``if __name__ == "__main__":`` guard. ``workers=0`` decodes in one background thread instead (Pillow
releases the GIL while decoding and resizing; but a crash in a decoder then takes the job down, whereas a
dead worker process is replaced). A worker exits by itself when the main process dies.

Not run on this project's machines: ``--device cuda`` and ``--backend trt`` (no GPU); they go through the
same runner interface as the CPU path that is tested.
"""

from __future__ import annotations

import glob as _glob
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import queue
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mae_deploy import __version__
from mae_deploy.bundle import Bundle
from mae_deploy.errors import InputError, MaeDeployError, PartialFailure
from mae_deploy.sources import Source, list_source, split_rows

FORMAT_NAME = "mae-deploy-features"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
POOLS = ("cls", "mean", "tokens")
DTYPES = ("float32", "float16")
FAILURE_REASONS = (
    "empty", "not_an_image", "truncated", "corrupt", "too_small", "decompression_bomb", "unreadable", "decoder_crashed",
)
TRANSFERS = ("uint8", "float32")
DEFAULT_SHARD_SIZE = 10_000
# Token shards hold (L+1)*D values per image (ViT-B: 0.6 MB fp32); default shards stay under this size.
MAX_DEFAULT_SHARD_BYTES = 256 << 20
# Settings that decide the bytes of the output: resuming with any of them changed is refused.
_BINDING_SETTINGS = ("pool", "dtype", "shard_size", "min_side", "max_pixels", "num_shards", "shard_index")


def default_workers() -> int:
    """Decode processes when ``workers`` is not given: one per core beyond the first, at most 8.

    Inference uses every core too; on a 2-core machine one worker keeps a ViT-B/16 fed (decoding a JPEG
    and resizing it costs a few ms, encoding it tens of ms; see benchmarks/RESULTS.md).
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


def index_name(k: int) -> str:
    return f"shard-{k:05d}.index.jsonl"


# ------------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------------


def _fsync_dir(d: Path) -> None:
    """Make renames in ``d`` durable (no-op where directories cannot be opened, e.g. Windows)."""
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


def _tmp_path(final: Path) -> Path:
    # Hidden, unique per process: never mistaken for a result, never shared by two writers.
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def _write_durable(final: Path, write) -> Path:
    """Write through ``write(file)`` to a hidden temp file, fsync it; returns the temp path (not renamed)."""
    tmp = _tmp_path(final)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Temp file + fsync + os.replace + directory fsync: readers see the old file or the new one."""
    tmp = _write_durable(final, lambda f: f.write(data))
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _json_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=True) + "\n").encode()


def _dump_json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=True) + "\n").encode()


# ------------------------------------------------------------------------------------------------
# Decoding (runs in the worker processes, or in a thread for workers=0)
# ------------------------------------------------------------------------------------------------


def classify_failure(exc: BaseException) -> str:
    """A failure reason (one of FAILURE_REASONS) for an exception raised while loading an image."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    text = " ".join(str(e) for e in chain).lower()
    if any(isinstance(e, Image.DecompressionBombError) for e in chain) or "decompression bomb" in text:
        return "decompression_bomb"
    if any(isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) for e in chain):
        return "unreadable"
    if any(isinstance(e, UnidentifiedImageError) for e in chain):
        return "not_an_image"
    if "truncated" in text:
        return "truncated"
    return "corrupt"


@dataclass
class _Decoded:
    """What a worker returns for one batch: model-sized images of the good inputs, and the failures."""

    rows: list[int]
    pixels: np.ndarray | None  # uint8 (n, H, W[, C]) or float32 (n, C, H, W); None when n == 0
    failures: list[tuple[int, str, str]]  # (row, reason, message)
    decode_s: float = 0.0


class _Decoder:
    """Path -> model-sized image with the runtime's Preprocessor (one definition of the preprocessing)."""

    def __init__(self, preprocessing: dict, in_chans: int, min_side: int, max_pixels: int, transfer: str) -> None:
        from mae_deploy.preprocess import Preprocessor

        self.pre = Preprocessor.from_config(preprocessing, in_chans=in_chans, max_pixels=max_pixels, min_side=1)
        self.min_side = min_side
        self.transfer = transfer

    def decode_one(self, path: str) -> np.ndarray:
        from mae_deploy.preprocess import check_min_side

        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from e
        if size == 0:
            raise _Failure("empty", f"{path} is empty (0 bytes)")
        try:
            im = self.pre.load_image(path)
        except Exception as e:  # any decoder error is this input's failure, never the job's
            raise _Failure(classify_failure(e), str(e)) from e
        try:
            check_min_side(im, self.min_side, path)
        except InputError as e:
            raise _Failure("too_small", str(e)) from e
        model_image = np.asarray(self.pre.resize_crop(im))
        return model_image if self.transfer == "uint8" else self.pre.normalize(model_image)

    def decode_batch(self, items: Sequence[tuple[int, str]]) -> _Decoded:
        t0 = time.perf_counter()
        rows, images, failures = [], [], []
        for row, path in items:
            try:
                images.append(self.decode_one(path))
                rows.append(row)
            except _Failure as f:
                failures.append((row, f.reason, f.message))
            except Exception as e:
                failures.append((row, classify_failure(e), str(e)))
        pixels = np.stack(images) if images else None
        return _Decoded(rows, pixels, failures, time.perf_counter() - t0)


class _Failure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def _worker_main(task_conn, result_conn, decoder_args: dict, max_pixels: int, parent_pid: int) -> None:
    """Worker process loop: (task id, items) -> (task id, _Decoded) over its own pipes.

    Exits on None, when its task pipe closes, or when the parent is gone (polled every second), so a
    SIGKILLed job leaves no decode process behind.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # Images above the limit fail as decompression_bomb; Pillow's warning just before would only be noise.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    # Pillow's own bomb check (at 2x its limit, on open) must not be stricter than the job's limit.
    Image.MAX_IMAGE_PIXELS = max_pixels or None
    decoder = _Decoder(**decoder_args)
    try:
        while True:
            if not task_conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            task = task_conn.recv()
            if task is None:
                return
            tid, items = task
            result_conn.send((tid, decoder.decode_batch(items)))
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the parent went away
        return


@dataclass
class _Task:
    shard: int
    items: list[tuple[int, str]]  # (global row, path)
    last_in_shard: bool


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
        self.proc = ctx.Process(target=_worker_main, args=(task_r, result_w, decoder_args, max_pixels, os.getpid()),
                                daemon=True, name="mae-deploy-decode")
        self.proc.start()
        task_r.close()  # the child's ends: the parent's copies would keep the pipes open after a death
        result_w.close()
        self.assigned: list = []

    def send(self, tid, items) -> None:
        self.task_conn.send((tid, items))
        self.assigned.append(tid)


class _DecodeStage:
    """Decoded batches in task order, with at most ``max_in_flight`` batches decoded ahead.

    Process mode: the parent hands each worker at most two tasks through the worker's own pipe, so it always
    knows which tasks a worker holds. When a worker dies (killed for memory, or a crash inside an image
    decoder), a replacement starts and the lost batches are decoded again one image per task; an image whose
    single-image task kills a worker too fails with reason ``decoder_crashed``, and the job goes on.
    """

    MAX_RESTARTS = 100

    def __init__(
        self, tasks: Iterator[_Task], decoder_args: dict, max_pixels: int, workers: int, max_in_flight: int,
        start_method: str = "spawn",
    ) -> None:
        self.tasks = tasks
        self.decoder_args = decoder_args
        self.max_pixels = max_pixels
        self.workers = workers
        self.max_in_flight = max(1, max_in_flight)
        self.restarts = 0
        self._stop = threading.Event()
        self._pool: list[_Worker] = []
        if workers > 0:
            self._ctx = mp.get_context(start_method)
            self._pool = [_Worker(self._ctx, decoder_args, max_pixels) for _ in range(workers)]

    def __iter__(self) -> Iterator[tuple[_Task, _Decoded]]:
        return self._iter_processes() if self.workers > 0 else self._iter_thread()

    def _iter_processes(self) -> Iterator[tuple[_Task, _Decoded]]:
        meta: dict[int, _Task] = {}  # batch seq -> task, until yielded
        done: dict[int, _Decoded] = {}
        singles: dict[int, dict[int, _Decoded]] = {}  # batch seq -> item position -> result, after a death
        retry: list[tuple[tuple[int, int], list]] = []  # single-image tasks to hand out first
        submitted = next_seq = 0
        exhausted = False

        def next_work():
            nonlocal submitted, exhausted
            if retry:
                return retry.pop(0)
            if exhausted or submitted - next_seq >= self.max_in_flight:
                return None
            task = next(self.tasks, None)
            if task is None:
                exhausted = True
                return None
            meta[submitted] = task
            submitted += 1
            return submitted - 1, task.items

        def assign() -> None:
            for w in sorted(self._pool, key=lambda w: len(w.assigned)):  # two each: one decoding, one queued
                while len(w.assigned) < 2 and (work := next_work()) is not None:
                    w.send(*work)

        def receive(w: _Worker, tid, res: _Decoded) -> None:
            w.assigned.remove(tid)
            if isinstance(tid, tuple):
                seq, j = tid
                singles[seq][j] = res
                if len(singles[seq]) == len(meta[seq].items):
                    done[seq] = _merge(singles.pop(seq), meta[seq].items)
            else:
                done[tid] = res

        def drain(w: _Worker) -> None:
            try:
                while w.result_conn.poll():
                    receive(w, *w.result_conn.recv())
            except (EOFError, OSError):
                pass

        def bury(w: _Worker) -> None:
            drain(w)  # results it sent before dying are good
            w.proc.join(timeout=5)  # reap it, so its exit code is known
            why = _death_text(w.proc.exitcode)
            # A worker takes its tasks in order: the first it holds is the one it died on; the others were
            # never started and are simply handed out again.
            for tid in w.assigned[1:]:
                retry.append((tid, [meta[tid[0]].items[tid[1]]] if isinstance(tid, tuple) else meta[tid].items))
            for tid in w.assigned[:1]:
                if isinstance(tid, tuple):  # a single image killed it: that image fails, the job goes on
                    seq, j = tid
                    row, path = meta[seq].items[j]
                    singles[seq][j] = _Decoded([], None, [(row, "decoder_crashed", (
                        f"decoding {path} made the decode worker die ({why}): the file crashes the image decoder "
                        "or needs more memory than the machine has"))])
                    if len(singles[seq]) == len(meta[seq].items):
                        done[seq] = _merge(singles.pop(seq), meta[seq].items)
                else:  # which image of the batch was it? decode them again one by one
                    singles[tid] = {}
                    retry.extend(((tid, j), [item]) for j, item in enumerate(meta[tid].items))
            self._pool.remove(w)
            w.result_conn.close()
            w.task_conn.close()
            self.restarts += 1
            if self.restarts > self.MAX_RESTARTS:
                raise MaeDeployError(
                    f"decode workers died {self.restarts} times (last: {why}); finished shards are kept. Check "
                    "memory (fewer --workers) and rerun the same command to resume"
                )
            self._pool.append(_Worker(self._ctx, self.decoder_args, self.max_pixels))

        assign()
        while next_seq < submitted:
            while next_seq not in done:
                by_conn = {w.result_conn: w for w in self._pool}
                by_sentinel = {w.proc.sentinel: w for w in self._pool}
                ready = mp.connection.wait([*by_conn, *by_sentinel], timeout=5.0)
                for r in ready:
                    if r in by_conn and by_conn[r] in self._pool:
                        w = by_conn[r]
                        try:
                            receive(w, *w.result_conn.recv())
                        except (EOFError, OSError):
                            w.proc.join(timeout=5)  # its sentinel follows; bury() then
                for r in ready:
                    if r in by_sentinel and by_sentinel[r] in self._pool:
                        bury(by_sentinel[r])
                assign()
            res, task = done.pop(next_seq), meta.pop(next_seq)
            next_seq += 1
            assign()  # before yielding: workers decode the next batches while the caller runs inference
            yield task, res

    def _iter_thread(self) -> Iterator[tuple[_Task, _Decoded]]:
        q: queue.Queue = queue.Queue(maxsize=self.max_in_flight)
        end = object()

        def put(item) -> bool:
            while not self._stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def run() -> None:
            try:
                decoder = _Decoder(**self.decoder_args)
                for task in self.tasks:
                    if not put((task, decoder.decode_batch(task.items))):
                        return
                put(end)
            except BaseException as e:  # surfaced in the consumer
                put(e)

        thread = threading.Thread(target=run, name="mae-deploy-decode", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()
            thread.join(timeout=5)

    def close(self) -> None:
        self._stop.set()
        for w in self._pool:
            try:
                w.task_conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for w in self._pool:
            # A worker blocked sending a result we no longer want is stopped rather than waited for.
            w.proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(timeout=1)
            w.task_conn.close()
            w.result_conn.close()
        self._pool = []


def _merge(parts: dict[int, _Decoded], items: list[tuple[int, str]]) -> _Decoded:
    """Single-image results (after a worker death) -> one batch result, in item order."""
    ordered = [parts[j] for j in range(len(items))]
    pixels = [d.pixels for d in ordered if d.pixels is not None]
    return _Decoded(
        rows=[r for d in ordered for r in d.rows],
        pixels=np.concatenate(pixels) if pixels else None,
        failures=[f for d in ordered for f in d.failures],
        decode_s=sum(d.decode_s for d in ordered),
    )


# ------------------------------------------------------------------------------------------------
# Shard writing
# ------------------------------------------------------------------------------------------------


@dataclass
class _Shard:
    k: int
    features: np.ndarray
    index: list[tuple[int, str]]  # (row, path) per feature row
    failures: list[dict]  # errors.jsonl records, in row order


class _ShardWriter:
    """A thread that commits shards in order: errors appended, .npy + index written, index renamed last."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.write_s = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mae-deploy-writer", daemon=True)
        self._thread.start()

    def put(self, shard: _Shard) -> None:
        self._raise()
        self._q.put(shard)

    def close(self) -> None:
        """Wait for every queued shard to be committed (raises the writer's error, if any)."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise MaeDeployError(f"writing a shard into {self.out} failed: {self._error}") from self._error

    def _run(self) -> None:
        while (shard := self._q.get()) is not None:
            if self._error is not None:
                continue  # drain; nothing more is committed after a failure
            try:
                t0 = time.perf_counter()
                commit_shard(self.out, shard)
                self.write_s += time.perf_counter() - t0
            except BaseException as e:
                self._error = e


def append_errors(out: Path, records: list[dict]) -> None:
    if not records:
        return
    with open(out / ERRORS_NAME, "ab") as f:
        f.write(b"".join(_json_line(r) for r in records))
        f.flush()
        os.fsync(f.fileno())


def commit_shard(out: Path, shard: _Shard) -> None:
    """Durably write one shard; the rename of its index file is the commit."""
    append_errors(out, shard.failures)  # before the commit: a resume drops lines of uncommitted shards
    npy, idx = out / shard_name(shard.k), out / index_name(shard.k)
    tmp_npy = _write_durable(npy, lambda f: np.lib.format.write_array(f, shard.features, allow_pickle=False))
    index_bytes = b"".join(_json_line({"row": r, "path": p}) for r, p in shard.index)
    tmp_idx = _write_durable(idx, lambda f: f.write(index_bytes))
    os.replace(tmp_npy, npy)
    os.replace(tmp_idx, idx)
    _fsync_dir(out)


# ------------------------------------------------------------------------------------------------
# Output directory: settings, resume
# ------------------------------------------------------------------------------------------------


def _read_manifest(d: Path) -> dict:
    path = d / MANIFEST_NAME
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise InputError(f"{path} is not a mae-deploy features manifest (format {m.get('format')!r})")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{path} has format_version {m['format_version']}; upgrade mae-deploy to read it")
    return m


def _read_index(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def _npy_rows(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)  # the header only: no data is read
    return int(shape[0])


def _settings_mismatch(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two manifests' binding settings, source and bundle."""
    out = []
    ob, nb = old.get("bundle", {}), new["bundle"]
    if ob.get("fingerprint") != nb["fingerprint"]:
        out.append(
            f"bundle: was {ob.get('path')} (fingerprint {str(ob.get('fingerprint'))[:12]}), now {nb['path']} "
            f"(fingerprint {nb['fingerprint'][:12]})"
        )
    if ob.get("precision") != nb["precision"]:
        out.append(f"precision: was {ob.get('precision')}, now {nb['precision']}")
    os_, ns = old.get("source", {}), new["source"]
    if os_.get("fingerprint") != ns["fingerprint"]:
        out.append(
            f"source: was {os_.get('spec')!r} ({os_.get('num_inputs')} inputs), now {ns['spec']!r} "
            f"({ns['num_inputs']} inputs){'' if os_.get('spec') != ns['spec'] else ' (its files changed)'}"
        )
    for key in _BINDING_SETTINGS:
        if old.get("settings", {}).get(key) != new["settings"][key]:
            out.append(f"{key}: was {old.get('settings', {}).get(key)!r}, now {new['settings'][key]!r}")
    return out


@dataclass
class _ResumeState:
    first_shard: int  # shards [0, first_shard) are committed
    features: int  # feature rows in them
    errors: list[dict]  # errors.jsonl records of the committed shards
    previous: dict | None  # the existing manifest


def _prepare_output(out: Path, manifest: dict, shard_rows: list[range]) -> _ResumeState:
    """Create ``out`` or check that it holds the same job; find the committed shards; drop the rest."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    previous = None
    if (out / MANIFEST_NAME).is_file():
        previous = _read_manifest(out)
        diffs = _settings_mismatch(previous, manifest)
        if diffs:
            raise InputError(
                f"{out} holds features of a different job, so it cannot be resumed with these settings:\n  "
                + "\n  ".join(diffs)
                + "\nUse another --out directory, pass the same settings as before, or delete it to start over."
            )
    elif out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise InputError(
            f"--out {out} is not empty and holds no {MANIFEST_NAME} (it is not an extraction output); "
            "choose a new or empty directory"
        )
    out.mkdir(parents=True, exist_ok=True)

    k, features = 0, 0
    while k < len(shard_rows) and (out / index_name(k)).is_file() and (out / shard_name(k)).is_file():
        n_index = sum(1 for line in open(out / index_name(k), "rb") if line.strip())
        n_npy = _npy_rows(out / shard_name(k))
        if n_index != n_npy:
            raise InputError(
                f"{out / shard_name(k)} has {n_npy} rows but {index_name(k)} lists {n_index}; the directory was "
                "modified by hand: delete both files and rerun to recompute that shard"
            )
        features += n_npy
        k += 1
    # Anything past the last commit is an interrupted write: remove it so it is recomputed.
    for p in out.iterdir():
        stale_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
        if stale_tmp or (p.name.startswith("shard-") and _shard_number(p.name) >= k):
            p.unlink(missing_ok=True)
    first_row_left = shard_rows[k].start if k < len(shard_rows) else None
    errors: list[dict] = []
    epath = out / ERRORS_NAME
    if epath.is_file():
        raw = epath.read_bytes()
        for line in raw.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: its shard is recomputed anyway
                continue
            if first_row_left is None or rec.get("row", -1) < first_row_left:
                errors.append(rec)
        kept = b"".join(_json_line(r) for r in errors)
        if kept != raw:
            atomic_write_bytes(epath, kept)
    else:
        atomic_write_bytes(epath, b"")  # always present: an empty file says "no failures"
    return _ResumeState(k, features, errors, previous)


def _shard_number(name: str) -> int:
    try:
        return int(name.split("-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return -1


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


@dataclass
class ExtractSummary:
    """What :func:`extract_features` did (totals include shards committed by earlier, interrupted runs)."""

    out_dir: Path
    inputs: int  # inputs of this part
    features: int  # feature rows written (successful inputs)
    failed: int
    failures_by_reason: dict[str, int]
    shards: int
    processed: int  # inputs processed by this run (the rest were resumed)
    wall_s: float
    images_per_s: float  # processed / wall_s
    feature_shape: tuple[int, ...]
    dtype: str
    pool: str
    complete: bool = True
    timings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def raise_for_failures(self) -> None:
        """PartialFailure (exit code 4) when some inputs failed."""
        if self.failed:
            raise PartialFailure(
                f"{self.failed} of {self.inputs} inputs failed ({_reasons_text(self.failures_by_reason)}); "
                f"see {self.out_dir / ERRORS_NAME}"
            )

    def __str__(self) -> str:
        resumed = self.inputs - self.processed
        lines = [
            f"images: {self.features} extracted, {self.failed} failed"
            + (f" ({_reasons_text(self.failures_by_reason)})" if self.failed else "")
            + f", {self.inputs} inputs" + (f" ({resumed} resumed from earlier runs)" if resumed else ""),
            f"speed: {self.images_per_s:.1f} img/s over {self.processed} images, wall time {self.wall_s:.1f} s"
            if self.processed else "speed: nothing left to do (every shard was finished by an earlier run)",
            f"output: {self.out_dir} ({self.shards} shards, {self.pool} features {self.dtype} "
            f"(N, {', '.join(map(str, self.feature_shape))}))",
        ]
        if self.failed:
            lines.append(f"failures: {self.out_dir / ERRORS_NAME}")
        return "\n".join(lines)


def _reasons_text(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))


def bundle_fingerprint(bundle: Bundle, precision: str) -> str:
    """sha256 over what decides the features: the encoder graph files' hashes, architecture, preprocessing."""
    import hashlib

    g = bundle.graph("encoder", precision)
    files = bundle.manifest.get("files", {})
    payload = {
        "graph": {rel: files.get(rel) for rel in (g.file, *g.external_data)},
        "architecture": bundle.architecture,
        "preprocessing": bundle.preprocessing,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _versions(backend: str) -> dict:
    import PIL

    v = {"mae_deploy": __version__, "python": platform.python_version(), "numpy": np.__version__,
         "pillow": PIL.__version__}
    for mod in ("onnxruntime", "torch", "tensorrt"):
        if mod in sys.modules:
            v[mod] = getattr(sys.modules[mod], "__version__", "?")
    return v


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iter_tasks(shard_rows: list[range], first_shard: int, paths: Sequence[str], batch_size: int) -> Iterator[_Task]:
    for k in range(first_shard, len(shard_rows)):
        rows = shard_rows[k]
        for b in range(rows.start, rows.stop, batch_size):
            stop = min(b + batch_size, rows.stop)
            yield _Task(k, [(r, paths[r]) for r in range(b, stop)], stop == rows.stop)


def extract_features(
    source: str | os.PathLike | Source,
    bundle: Bundle | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    backend: str = "ort",
    device: str = "cpu",
    precision: str = "fp32",
    batch_size: int = 32,
    workers: int | None = None,
    pool: str = "cls",
    dtype: str = "float32",
    shard_size: int | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    strict: bool = False,
    min_side: int = 16,
    max_pixels: int | None = None,
    progress: bool = True,
    transfer: str = "uint8",
    start_method: str = "spawn",
    runner_opts: dict | None = None,
) -> ExtractSummary:
    """Extract features of every image of ``source`` (part ``shard_index`` of ``num_shards``) into ``out_dir``.

    Resumes when ``out_dir`` already holds the same job; see the module docstring for the layout, failure
    reasons and guarantees. ``workers`` decode processes (None: :func:`default_workers`; 0: a thread);
    ``transfer`` is how decoded images travel back from workers (uint8 HWC, normalised in the main process,
    is 4x smaller than float32 CHW). ``shard_size`` None: 10,000 inputs (less for ``pool="tokens"`` so a shard
    stays under 256 MiB), or the existing job's value when resuming. ``max_pixels`` None: Pillow's
    ``Image.MAX_IMAGE_PIXELS``; 0 disables the bomb check. ``runner_opts`` go to the runner (e.g.
    ``{"intra_op_threads": 2}``).
    """
    t_start = time.perf_counter()
    started = _now()
    if pool not in POOLS:
        raise InputError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if transfer not in TRANSFERS:
        raise InputError(f"transfer must be one of {list(TRANSFERS)}, got {transfer!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("min_side", min_side, 1)):
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}")
    if workers is None:
        workers = default_workers()
    if workers < 0:
        raise InputError(f"workers must be 0 (decode in a thread) or more, got {workers}")
    if shard_size is not None and shard_size < 1:
        raise InputError(f"shard_size must be at least 1, got {shard_size}")
    if max_pixels is None:
        max_pixels = int(Image.MAX_IMAGE_PIXELS or 0)
    if max_pixels < 0:
        raise InputError(f"max_pixels must be 0 (no limit) or positive, got {max_pixels}")

    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    src = source if isinstance(source, Source) else list_source(source)
    part = split_rows(len(src), num_shards, shard_index)
    out = Path(out_dir)

    L, D = bundle.num_patches, bundle.embed_dim
    feature_shape = (L + 1, D) if pool == "tokens" else (D,)
    if shard_size is None:
        previous_size = None
        if (out / MANIFEST_NAME).is_file():
            previous_size = _read_manifest(out).get("settings", {}).get("shard_size")
        row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
        shard_size = previous_size or max(1, min(DEFAULT_SHARD_SIZE, MAX_DEFAULT_SHARD_BYTES // row_bytes))
    shard_rows = [range(a, min(a + shard_size, part.stop)) for a in range(part.start, part.stop, shard_size)]

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "status": "running",
        "bundle": {
            "path": str(Path(bundle.path).resolve()),
            "name": bundle.name,
            "fingerprint": bundle_fingerprint(bundle, precision),
            "precision": precision,
            "embed_dim": D,
            "num_patches": L,
            "image_size": bundle.image_size,
            "preprocessing": bundle.preprocessing,
        },
        "source": {
            "spec": src.spec,
            "kind": src.kind,
            "fingerprint": src.fingerprint,
            "num_inputs": len(src),
            "rows": [part.start, part.stop],
        },
        "settings": {
            "pool": pool, "dtype": dtype, "shard_size": shard_size, "min_side": min_side,
            "max_pixels": max_pixels, "num_shards": num_shards, "shard_index": shard_index,
        },
        "feature_shape": list(feature_shape),
        "layout": {"features": "shard-{k:05d}.npy", "index": "shard-{k:05d}.index.jsonl", "errors": ERRORS_NAME,
                   "sharding": "contiguous row ranges of shard_size inputs; parts are contiguous row ranges"},
    }
    state = _prepare_output(out, manifest, shard_rows)
    runs = list((state.previous or {}).get("runs", []))
    run: dict = {"started": started, "backend": backend, "device": device, "batch_size": batch_size,
                 "workers": workers, "transfer": transfer, "resumed_at_shard": state.first_shard}
    runs.append(run)
    manifest["runs"] = runs
    manifest["versions"] = _versions(backend)
    if state.first_shard < len(shard_rows) or (state.previous or {}).get("status") != "complete":
        atomic_write_bytes(out / MANIFEST_NAME, _dump_json(manifest))

    done_inputs = shard_rows[state.first_shard].start - part.start if state.first_shard < len(shard_rows) else len(part)
    errors = list(state.errors)
    n_features = state.features
    processed = 0
    timings = {"startup_s": 0.0, "decode_wait_s": 0.0, "normalize_s": 0.0, "inference_s": 0.0, "write_s": 0.0,
               "decode_worker_s": 0.0}
    status = "complete"
    remaining = [r for r in shard_rows[state.first_shard:]]

    if remaining:
        from tqdm import tqdm

        from mae_deploy.features import FeatureExtractor
        from mae_deploy.preprocess import Preprocessor

        pre = Preprocessor.from_bundle(bundle)
        decoder_args = {"preprocessing": bundle.preprocessing, "in_chans": bundle.in_chans, "min_side": min_side,
                        "max_pixels": max_pixels, "transfer": transfer}
        tasks = _iter_tasks(shard_rows, state.first_shard, src.paths, batch_size)
        # Workers start first: their start-up (imports) overlaps with creating the inference session.
        stage = _DecodeStage(tasks, decoder_args, max_pixels, workers, 2 * workers + 2, start_method)
        writer = None
        bar = None
        try:
            fx = FeatureExtractor(bundle, backend=backend, device=device, precision=precision, pool=pool,
                                  batch_size=batch_size, preprocessor=pre, **(runner_opts or {}))
            writer = _ShardWriter(out)
            timings["startup_s"] = time.perf_counter() - t_start
            bar = tqdm(total=len(part), initial=done_inputs, unit="img", desc="extract", disable=not progress,
                       dynamic_ncols=True, smoothing=0.1)
            feats: list[np.ndarray] = []
            index: list[tuple[int, str]] = []
            failures: list[dict] = []
            t_wait = time.perf_counter()
            for task, dec in stage:
                timings["decode_wait_s"] += time.perf_counter() - t_wait
                timings["decode_worker_s"] += dec.decode_s
                for row, reason, message in dec.failures:
                    rec = {"row": row, "path": src.paths[row], "reason": reason, "message": message}
                    failures.append(rec)
                    if strict:
                        writer.close()
                        append_errors(out, [rec])
                        raise InputError(
                            f"--strict: stopped at row {row} ({src.paths[row]}): {reason}: {message}. "
                            f"{task.shard} shards are committed in {out}; fix or remove the file and rerun the "
                            "same command to resume"
                        )
                if dec.pixels is not None:
                    t0 = time.perf_counter()
                    x = dec.pixels if transfer == "float32" else np.stack([pre.normalize(im) for im in dec.pixels])
                    t1 = time.perf_counter()
                    feats.append(fx.extract_pixels(x).astype(dtype, copy=False))
                    timings["normalize_s"] += t1 - t0
                    timings["inference_s"] += time.perf_counter() - t1
                    index.extend((r, src.paths[r]) for r in dec.rows)
                processed += len(task.items)
                bar.update(len(task.items))
                if failures or errors:
                    bar.set_postfix(failed=len(errors) + len(failures), refresh=False)
                if task.last_in_shard:
                    arr = np.concatenate(feats) if feats else np.zeros((0, *feature_shape), dtype=dtype)
                    writer.put(_Shard(task.shard, np.ascontiguousarray(arr), index, failures))
                    n_features += len(index)
                    errors.extend(failures)
                    feats, index, failures = [], [], []
                t_wait = time.perf_counter()
            writer.close()
            timings["write_s"] = writer.write_s
            run["runner"] = _runner_info(fx.runner)
            run["decode_worker_restarts"] = stage.restarts
            fx.close()
        except BaseException:
            status = "interrupted"
            if writer is not None:  # let shards already handed over be committed (e.g. on Ctrl-C)
                try:
                    writer.close()
                except BaseException:
                    pass
            raise
        finally:
            if bar is not None:
                bar.close()
            stage.close()
            if status == "interrupted":
                _finish_manifest(out, manifest, run, status, t_start, processed, timings)

    wall = time.perf_counter() - t_start
    by_reason = dict(Counter(e.get("reason", "corrupt") for e in errors))
    manifest["counts"] = {"inputs": len(part), "features": n_features, "failed": len(errors),
                          "failed_by_reason": by_reason, "shards": len(shard_rows)}
    if remaining or (state.previous or {}).get("status") != "complete":
        _finish_manifest(out, manifest, run, status, t_start, processed, timings)
    return ExtractSummary(
        out_dir=out, inputs=len(part), features=n_features, failed=len(errors), failures_by_reason=by_reason,
        shards=len(shard_rows), processed=processed, wall_s=wall,
        images_per_s=processed / wall if wall > 0 else 0.0, feature_shape=feature_shape, dtype=dtype, pool=pool,
        complete=True, timings={k: round(v, 4) for k, v in timings.items()},
    )


def _runner_info(runner) -> dict:
    try:
        info = runner.info
        return {"backend": info.backend, "device": info.device, "precision": info.precision,
                "providers": list(info.providers), "details": json.loads(json.dumps(info.details, default=str))}
    except Exception as e:  # informational only
        return {"error": repr(e)}


def _finish_manifest(out: Path, manifest: dict, run: dict, status: str, t_start: float, processed: int,
                     timings: dict) -> None:
    wall = time.perf_counter() - t_start
    run.update({
        "finished": _now(), "status": status, "wall_s": round(wall, 3), "images": processed,
        "images_per_s": round(processed / wall, 3) if wall > 0 else 0.0,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    })
    manifest["status"] = status
    try:
        atomic_write_bytes(out / MANIFEST_NAME, _dump_json(manifest))
    except OSError:
        if status == "complete":
            raise


# ------------------------------------------------------------------------------------------------
# Reading results
# ------------------------------------------------------------------------------------------------


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
        """Position of ``path`` (as written in the index: absolute). KeyError when it has no features."""
        if self._by_path is None:
            self._by_path = {p: i for i, p in enumerate(self.paths)}
        return self._by_path[os.path.abspath(os.fspath(path))]

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


def open_features(dir_or_dirs, allow_incomplete: bool = False) -> Features:
    """Memory-map the features of an extraction output directory, or of the parts of one job.

    ``dir_or_dirs``: a directory, a glob of directories (``"feats/part-*"``) or a list. Parts must come from
    the same job (source, bundle, pool, dtype, number of parts); they are ordered by ``--shard-index``, so
    positions follow the source order. A directory whose job has not finished is an InputError unless
    ``allow_incomplete`` (then its committed shards are read).
    """
    dirs = _expand_dirs(dir_or_dirs)
    parts = []
    for d in dirs:
        if not (d / MANIFEST_NAME).is_file():
            raise InputError(f"{d} is not a feature directory (no {MANIFEST_NAME}); run `mae-deploy extract` first")
        m = _read_manifest(d)
        if m.get("status") != "complete" and not allow_incomplete:
            raise InputError(
                f"{d}: the extraction is {m.get('status')}, not complete; rerun the same `mae-deploy extract` "
                "command to finish it (or pass allow_incomplete=True to read its finished shards)"
            )
        parts.append((d, m))
    first = parts[0][1]
    key = lambda m: (m["source"]["fingerprint"], m["bundle"]["fingerprint"], m["settings"]["pool"],  # noqa: E731
                     m["settings"]["dtype"], m["settings"]["num_shards"])
    for d, m in parts[1:]:
        if key(m) != key(first):
            raise InputError(
                f"{d} and {parts[0][0]} are not parts of the same job (source, bundle, pool, dtype or --num-shards "
                "differ); open them separately"
            )
    seen: dict[int, Path] = {}
    for d, m in parts:
        i = m["settings"]["shard_index"]
        if i in seen:
            raise InputError(f"{d} and {seen[i]} are both part {i}; pass each part once")
        seen[i] = d
    parts.sort(key=lambda dm: dm[1]["settings"]["shard_index"])

    shards, paths, rows = [], [], []
    for d, _ in parts:
        k = 0
        while (d / index_name(k)).is_file():
            records = _read_index(d / index_name(k))
            arr = np.load(d / shard_name(k), mmap_mode="r") if records else None
            if arr is not None and len(arr) != len(records):
                raise InputError(f"{d / shard_name(k)} has {len(arr)} rows but its index lists {len(records)}")
            if arr is not None:
                shards.append(arr)
                paths.extend(r["path"] for r in records)
                rows.extend(r["row"] for r in records)
            k += 1
    return Features(shards, paths, np.asarray(rows, dtype=np.int64), [m for _, m in parts])
