"""Committing shards, and finding on a rerun what is committed: the output directory's commit protocol.

Output directory (``DIR``)::

    manifest.json              settings, source, counts, versions, per-run timings and each shard's sha256
    shard-00000.npy            features of the shard's successful inputs: (n, D), or (n, L+1, D) for tokens
    shard-00000.index.jsonl    one line per feature row: {"row": <global source row>, "path": "<abs path>"}
    ...
    errors.jsonl               one line per failed input: {"row", "path", "reason", "message"}, in row order
    .extract.lock              held (flock) by the one job writing into DIR; see :mod:`.lock`

Shard ``k`` covers the part's inputs ``[k * shard_size, (k+1) * shard_size)`` (input positions, not
successes), so its rows are fixed before anything is decoded. A shard is written to hidden temporary files,
fsynced and renamed: ``.npy`` first, the index last. It counts as done only when its index exists, and that
rename is the commit. Failures of a shard are appended (and fsynced) to errors.jsonl just *before* its commit;
on resume, lines for rows of shards that are not committed are dropped, so the file ends up byte-identical to
an uninterrupted run's (as do the shards: batches never straddle shards, so a resumed shard sees the same
batches).

Checksums: the writer hashes each file as it writes it; the sha256s go into manifest.json at the end of a
run (also when it is interrupted, and every 30 s while it runs). A rerun checks every committed shard: its
size against its .npy header, its rows against its index and, where recorded, its sha256. A damaged shard is
deleted and recomputed (with its error lines); a committed shard whose sha256 was not yet recorded (the run
was killed) is hashed then. Everything runs under the directory's lock, so the start-up cleanup of temp
files never touches another live job's files.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mae_deploy.errors import InputError, MaeDeployError
from mae_deploy.extract.layout import (
    ERRORS_NAME,
    MANIFEST_NAME,
    check_shard_files,
    file_sha256,
    index_name,
    json_line,
    npy_layout,
    read_manifest,
    shard_checksum_mismatch,
    shard_name,
    shard_number,
)
from mae_deploy.fileio import atomic_write, fsync_dir, write_temp

# Settings that decide the bytes of the output: resuming with any of them changed is refused.
BINDING_SETTINGS = (
    "pool",
    "dtype",
    "shard_size",
    "min_side",
    "max_pixels",
    "num_parts",
    "part_index",
    "exact_resize",
    "decoder",
)
# Manifests written before the source split was called "parts" (output files are the only "shards").
RENAMED_SETTINGS = {"num_shards": "num_parts", "shard_index": "part_index"}


def job_settings(manifest: dict) -> dict:
    """A manifest's settings under today's names (older manifests said num_shards / shard_index)."""
    settings = dict(manifest.get("settings", {}))
    for old, new in RENAMED_SETTINGS.items():
        if old in settings and new not in settings:
            settings[new] = settings.pop(old)
    return settings


@dataclass
class Shard:
    k: int
    features: np.ndarray
    index: list[tuple[int, str]]  # (row, path) per feature row
    failures: list[dict]  # errors.jsonl records, in row order


class _HashingFile:
    """A write-only file wrapper that hashes what goes through it (numpy writes .npy data in chunks)."""

    def __init__(self, f) -> None:
        self.f, self.h = f, hashlib.sha256()

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)


def append_errors(out: Path, records: list[dict]) -> None:
    if not records:
        return
    with open(out / ERRORS_NAME, "ab") as f:
        f.write(b"".join(json_line(r) for r in records))
        f.flush()
        os.fsync(f.fileno())


def commit_shard(out: Path, shard: Shard) -> dict:
    """Durably write one shard; the rename of its index file is the commit. Returns its checksum record."""
    append_errors(out, shard.failures)  # before the commit: a resume drops lines of uncommitted shards
    npy, idx = out / shard_name(shard.k), out / index_name(shard.k)
    hashed: dict[str, str] = {}

    def write_npy(f) -> None:
        hf = _HashingFile(f)
        np.lib.format.write_array(hf, shard.features, allow_pickle=False)
        hashed["sha256"] = hf.h.hexdigest()

    index_bytes = b"".join(json_line({"row": r, "path": p}) for r, p in shard.index)
    tmp_npy = write_temp(npy, write_npy, durable=True)
    tmp_idx = write_temp(idx, lambda f: f.write(index_bytes), durable=True)
    os.replace(tmp_npy, npy)
    os.replace(tmp_idx, idx)
    fsync_dir(out)
    return {
        "rows": len(shard.index),
        "sha256": hashed["sha256"],
        "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
    }


class ShardWriter:
    """A thread that commits shards in order; ``checksums`` collects each committed shard's record.

    ``on_commit`` (optional) is called in the writer thread after each commit, e.g. to checkpoint the
    manifest. The queue holds one shard, so at most two shards' features exist at once (one being filled).
    """

    def __init__(self, out: Path, on_commit: Callable[[], None] | None = None) -> None:
        self.out = out
        self.write_s = 0.0
        self.checksums: dict[int, dict] = {}
        self.on_commit = on_commit
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mae-deploy-writer", daemon=True)
        self._thread.start()

    def put(self, shard: Shard) -> None:
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
                self.checksums[shard.k] = commit_shard(self.out, shard)
                self.write_s += time.perf_counter() - t0
                if self.on_commit is not None:
                    self.on_commit()
            except BaseException as e:
                self._error = e


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------


def settings_mismatch(old: dict, new: dict) -> list[str]:
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
    previous = job_settings(old)
    for key in BINDING_SETTINGS:
        if previous.get(key) != new["settings"][key]:
            out.append(f"{key}: was {previous.get(key)!r}, now {new['settings'][key]!r}")
    return out


@dataclass
class ResumeState:
    done: set[int]  # committed shards whose files check out
    checksums: dict[int, dict]  # their checksum records
    features: int  # feature rows in them
    errors: list[dict]  # errors.jsonl records of the committed shards
    previous: dict | None  # the existing manifest
    damaged: list[str] = field(default_factory=list)  # why shards are recomputed


def _check_reuse(out: Path, manifest: dict) -> dict | None:
    """The existing manifest when ``out`` holds the same job (None when new); InputError otherwise."""
    if (out / MANIFEST_NAME).is_file():
        previous = read_manifest(out)
        diffs = settings_mismatch(previous, manifest)
        if diffs:
            raise InputError(
                f"{out} holds features of a different job, so it cannot be resumed with these settings:\n  "
                + "\n  ".join(diffs)
                + "\nUse another --out directory, pass the same settings as before, or delete it to start over."
            )
        return previous
    refuse_foreign(out)
    return None


def refuse_foreign(out: Path) -> None:
    """InputError when ``out`` holds files but no manifest: never write (not even a lock) into such a directory."""
    if out.is_dir() and not (out / MANIFEST_NAME).is_file() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise InputError(
            f"--out {out} is not empty and holds no {MANIFEST_NAME} (it is not an extraction output); "
            "choose a new or empty directory"
        )


def prepare_output(out: Path, manifest: dict, num_shards: int) -> ResumeState:
    """``num_shards``: output shard files this job writes."""
    """Under the directory's lock: check ``out`` holds this job, find the good shards, remove the rest."""
    previous = _check_reuse(out, manifest)
    recorded = {int(k): v for k, v in ((previous or {}).get("shards") or {}).items()}
    done: set[int] = set()
    checksums: dict[int, dict] = {}
    damaged: list[str] = []
    features = 0
    for k in range(num_shards):
        if not (out / index_name(k)).is_file():
            continue
        problem = check_shard_files(out, k)
        if problem is None and k in recorded:
            problem = shard_checksum_mismatch(out, k, recorded[k])
        if problem is not None:
            damaged.append(problem)
            continue
        rec = recorded.get(k) or {
            "rows": npy_layout(out / shard_name(k))[0],
            "sha256": file_sha256(out / shard_name(k)),
            "index_sha256": file_sha256(out / index_name(k)),
        }
        checksums[k] = rec
        features += rec["rows"]
        done.add(k)
    # Anything not committed is an interrupted or damaged write: remove it so it is recomputed.
    for p in out.iterdir():
        stale_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
        if stale_tmp or (p.name.startswith("shard-") and shard_number(p.name) not in done):
            p.unlink(missing_ok=True)
    errors = _keep_errors(out, manifest, done)
    return ResumeState(done, checksums, features, errors, previous, damaged)


def _keep_errors(out: Path, manifest: dict, done: set[int]) -> list[dict]:
    """errors.jsonl records of committed shards (the file is rewritten without the others)."""
    start, shard_size = manifest["source"]["rows"][0], manifest["settings"]["shard_size"]
    epath = out / ERRORS_NAME
    if not epath.is_file():
        atomic_write(epath, b"", durable=True)  # always present: an empty file says "no failures"
        return []
    import json

    raw = epath.read_bytes()
    errors = []
    for line in raw.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill: its shard is recomputed anyway
            continue
        if isinstance(rec, dict) and (rec.get("row", -1) - start) // shard_size in done:
            errors.append(rec)
    kept = b"".join(json_line(r) for r in errors)
    if kept != raw:
        atomic_write(epath, kept, durable=True)
    return errors


def finish_errors(out: Path, errors: list[dict]) -> list[dict]:
    """Put errors.jsonl in row order (a recomputed shard's lines were appended after later shards')."""
    ordered = sorted(errors, key=lambda r: r.get("row", -1))
    if ordered != errors:
        atomic_write(out / ERRORS_NAME, b"".join(json_line(r) for r in ordered), durable=True)
    return ordered
