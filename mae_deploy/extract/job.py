"""The extraction job: plan, lock the output, resume, run an engine, commit shards, write the manifest.

The engine (local processes, or Ray Data) only turns tasks into per-batch features in source order; the
job does everything that decides the output directory's bytes, so both engines write the same directory.
On any exception (Ctrl-C included) the shards already handed to the writer are committed, workers are
stopped, the manifest says ``interrupted`` and the lock is released: rerunning the same command resumes.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import replace

import numpy as np

from mae_deploy.bundle import Bundle
from mae_deploy.decode_torch import default_decoder
from mae_deploy.errors import InputError
from mae_deploy.extract.commit import (
    ResumeState,
    Shard,
    ShardWriter,
    append_errors,
    finish_errors,
    prepare_output,
    refuse_foreign,
)
from mae_deploy.extract.engine import Engine
from mae_deploy.extract.layout import MANIFEST_NAME
from mae_deploy.extract.lock import OutputLock
from mae_deploy.extract.options import ExtractOptions
from mae_deploy.extract.plan import ExtractSummary, JobPlan, check_options, make_plan, now, versions
from mae_deploy.fileio import atomic_write_json, check_writable
from mae_deploy.names import DECODERS
from mae_deploy.sources import Source, list_source, split_rows

# While a job runs, the manifest's shard checksums are brought up to date at most this often.
CHECKPOINT_S = 30.0


class _Job:
    """One run of a planned job into a locked output directory."""

    def __init__(self, plan: JobPlan, state: ResumeState, t_start: float, started: str) -> None:
        self.plan, self.state, self.t_start = plan, state, t_start
        self.out = plan.out
        self.manifest = plan.manifest
        self.todo = [k for k in range(len(plan.shard_rows)) if k not in state.done]
        self.errors = list(state.errors)
        self.n_features = state.features
        self.processed = 0
        self.timings: dict[str, float] = {"startup_s": 0.0, "write_s": 0.0}
        self.run: dict = {"started": started, "resumed_shards": len(state.done)}
        self.writer: ShardWriter | None = None
        self._last_checkpoint = time.monotonic()

    # -- manifest ----------------------------------------------------------------------------------

    def _checksums(self) -> dict:
        sums = dict(self.state.checksums)
        if self.writer is not None:
            sums.update(self.writer.checksums)
        return {str(k): sums[k] for k in sorted(sums)}

    def _write_manifest(self) -> None:
        self.manifest["shards"] = self._checksums()
        atomic_write_json(self.out / MANIFEST_NAME, self.manifest, durable=True)

    def start_manifest(self, engine_name: str) -> None:
        previous = self.state.previous or {}
        self.run["engine"] = engine_name
        self.manifest["runs"] = [*previous.get("runs", []), self.run]
        self.manifest["versions"] = versions()
        unchanged = {str(k): v for k, v in (previous.get("shards") or {}).items()} == self._checksums()
        if self.todo or previous.get("status") != "complete" or not unchanged:
            self._write_manifest()

    def _checkpoint(self) -> None:
        """Writer thread, after a commit: record checksums now and then, so a kill loses few of them."""
        if time.monotonic() - self._last_checkpoint >= CHECKPOINT_S:
            self._last_checkpoint = time.monotonic()
            self._write_manifest()

    def finish_manifest(self, status: str) -> None:
        wall = time.perf_counter() - self.t_start
        self.run.update(
            {
                "finished": now(),
                "status": status,
                "wall_s": round(wall, 3),
                "images": self.processed,
                "images_per_s": round(self.processed / wall, 3) if wall > 0 else 0.0,
                "timings": {k: round(v, 4) for k, v in self.timings.items()},
            }
        )
        by_reason = dict(Counter(e.get("reason", "corrupt") for e in self.errors))
        self.manifest["counts"] = {
            "inputs": len(self.plan.part),
            "features": self.n_features,
            "failed": len(self.errors),
            "failed_by_reason": by_reason,
            "shards": len(self.plan.shard_rows),
        }
        self.manifest["status"] = status
        try:
            self._write_manifest()
        except OSError:
            if status == "complete":
                raise

    # -- running -----------------------------------------------------------------------------------

    def execute(self, engine: Engine, *, strict: bool, progress: bool) -> None:
        """Consume the engine's batches into shards; on any exception leave a resumable directory."""
        from tqdm import tqdm

        self.writer = ShardWriter(self.out, on_commit=self._checkpoint)
        self.timings["startup_s"] = time.perf_counter() - self.t_start
        done_inputs = sum(len(self.plan.shard_rows[k]) for k in self.state.done)
        bar = tqdm(
            total=len(self.plan.part),
            initial=done_inputs,
            unit="img",
            desc="extract",
            disable=not progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        status = "interrupted"
        try:
            self._consume(engine, bar, strict)
            self.writer.close()
            self.run.update(engine.run_info())
            status = "complete"
        finally:
            bar.close()
            try:
                if status != "complete":  # let shards already handed over be committed (e.g. on Ctrl-C)
                    _quietly(self.writer.close)
                engine.close()
            finally:
                self.timings.update(engine.timings)
                self.timings["write_s"] = self.writer.write_s
                if status != "complete":
                    self.finish_manifest(status)

    def _consume(self, engine: Engine, bar, strict: bool) -> None:
        assert self.writer is not None  # execute() made it
        paths, feature_shape, dtype = self.plan.src.paths, self.plan.feature_shape, self.plan.dtype
        feats: list[np.ndarray] = []
        index: list[tuple[int, str]] = []
        failures: list[dict] = []
        for task, res in engine.batches():
            for row, reason, message in res.failures:
                rec = {"row": row, "path": paths[row], "reason": reason, "message": message}
                failures.append(rec)
                if strict:
                    self.writer.close()
                    append_errors(self.out, [rec])
                    raise InputError(
                        f"--strict: stopped at row {row} ({paths[row]}): {reason}: {message}. "
                        f"{len(self.writer.checksums) + len(self.state.done)} shards are committed in {self.out}; "
                        "fix or remove the file and rerun the same command to resume"
                    )
            if res.features is not None:
                feats.append(res.features)
                index.extend((r, paths[r]) for r in res.rows)
            self.processed += len(task.items)
            bar.update(len(task.items))
            if failures or self.errors:
                bar.set_postfix(failed=len(self.errors) + len(failures), refresh=False)
            if task.last_in_shard:
                arr = np.concatenate(feats) if feats else np.zeros((0, *feature_shape), dtype=dtype)
                self.writer.put(Shard(task.shard, np.ascontiguousarray(arr), index, failures))
                self.n_features += len(index)
                self.errors.extend(failures)
                feats, index, failures = [], [], []

    def summary(self, engine_name: str) -> ExtractSummary:
        wall = time.perf_counter() - self.t_start
        by_reason = dict(Counter(e.get("reason", "corrupt") for e in self.errors))
        return ExtractSummary(
            out_dir=self.out,
            inputs=len(self.plan.part),
            features=self.n_features,
            failed=len(self.errors),
            failures_by_reason=by_reason,
            shards=len(self.plan.shard_rows),
            processed=self.processed,
            wall_s=wall,
            images_per_s=self.processed / wall if wall > 0 else 0.0,
            feature_shape=self.plan.feature_shape,
            dtype=self.plan.dtype,
            pool=self.plan.pool,
            complete=True,
            timings={k: round(v, 4) for k, v in self.timings.items()},
            engine=engine_name,
            repaired=list(self.state.damaged),
        )


def _quietly(fn) -> None:
    try:
        fn()
    except BaseException:  # already failing: the first error is the one to report
        pass


def extract_features(
    source: str | os.PathLike | Source,
    bundle: Bundle | str | os.PathLike,
    out_dir: str | os.PathLike,
    options: ExtractOptions | None = None,
    **settings,
) -> ExtractSummary:
    """Extract features of every image of ``source`` (part ``part_index`` of ``num_parts``) into ``out_dir``.

    Settings come in ``options`` (an :class:`ExtractOptions`, what ``mae-deploy extract`` builds) and/or as
    keywords that override its fields (``extract_features(src, bundle, out, backend="torch", pool="mean")``).

    Resumes when ``out_dir`` already holds the same job; see :mod:`mae_deploy.extract` for the layout,
    failure reasons and guarantees. ``workers`` decode processes (None: :func:`default_workers`; 0: a
    thread); ``transfer`` is how decoded images travel back from workers: float32 CHW, normalised by the
    workers (the default: the main process only hands shared memory to the runner), or uint8 HWC (4x
    smaller, normalised in the main process). ``shard_size`` None: 10,000 inputs (less for ``pool="tokens"``
    so a shard stays under 256 MiB), or the existing job's value when resuming. ``max_pixels`` None: Pillow's
    ``Image.MAX_IMAGE_PIXELS``; 0 disables the bomb check. ``threads``: inference threads, mapped by each
    backend (``create_runner(threads=...)``); ``runner_opts`` go to the runner as they are.

    ``engine="ray"`` runs decoding and inference on Ray Data (``ray_address``: None starts or joins a local
    Ray, "auto" or "ray://host:port" a cluster; ``actors`` encoder actors with ``gpus_per_actor`` /
    ``cpus_per_actor`` each); ``workers`` and ``start_method`` then do not apply. The output is the same.

    ``exact_resize=True`` decodes every image at full size before resizing (see
    :class:`~mae_deploy.preprocess.Preprocessor`); the default downscales large JPEGs while decoding. It is
    recorded in the manifest, and resuming with the other setting is refused.

    ``decoder`` "torch" decodes JPEGs in batches on the runner's device (torchvision; nvJPEG on CUDA) with
    resize, crop and normalisation there, other files through PIL (same failure reasons); "pil" decodes
    everything with Pillow in the workers (the exact reference). None: torch on CUDA, pil on the CPU
    (:func:`~mae_deploy.decode_torch.default_decoder`). Recorded in the manifest; it binds a resume.
    """
    o = (options or ExtractOptions()).updated(**settings)
    t_start = time.perf_counter()
    started = now()
    workers, max_pixels = check_options(
        pool=o.pool,
        dtype=o.dtype,
        transfer=o.transfer,
        batch_size=o.batch_size,
        min_side=o.min_side,
        workers=o.workers,
        shard_size=o.shard_size,
        max_pixels=o.max_pixels,
        engine=o.engine,
    )
    decoder = o.decoder or default_decoder(o.device)
    if decoder not in DECODERS:
        raise InputError(f"decoder must be one of {list(DECODERS)}, got {decoder!r}")
    if o.engine == "ray" and decoder == "torch":
        raise InputError("--decoder torch runs with --engine local; Ray's decode tasks use --decoder pil")
    if o.engine == "ray":
        from mae_deploy.extract.ray_engine import check_ray_options

        check_ray_options(actors=o.actors, gpus_per_actor=o.gpus_per_actor, cpus_per_actor=o.cpus_per_actor)
    o = replace(o, workers=workers, max_pixels=max_pixels, decoder=decoder)
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    src = source if isinstance(source, Source) else list_source(source)
    part = split_rows(len(src), o.num_parts, o.part_index)
    out = check_writable(out_dir, what="--out", directory=True)
    refuse_foreign(out)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        plan = make_plan(bundle, src, part, out, o)
        state = prepare_output(out, plan.manifest, len(plan.shard_rows))
        job = _Job(plan, state, t_start, started)
        job.start_manifest(o.engine)
        if job.todo:
            try:
                eng = _make_engine(plan, job.todo, o)
            except BaseException:
                job.finish_manifest("interrupted")
                raise
            job.execute(eng, strict=o.strict, progress=o.progress)
        job.errors = finish_errors(out, job.errors)
        if job.todo or (state.previous or {}).get("status") != "complete":
            job.finish_manifest("complete")
        return job.summary(o.engine)


def _runner_options(runner_opts: dict | None, threads: int | None) -> dict:
    """Options for ``create_runner``: ``threads`` is one option every backend maps (or rejects)."""
    opts = dict(runner_opts or {})
    if threads is not None:
        opts["threads"] = threads
    return opts


def _make_engine(plan: JobPlan, todo: list[int], o: ExtractOptions) -> Engine:
    runner_opts = _runner_options(o.runner_opts, o.threads)
    if o.engine == "ray":
        from mae_deploy.extract.ray_engine import RayEngine

        return RayEngine(
            plan,
            todo,
            address=o.ray_address,
            actors=o.actors,
            gpus_per_actor=o.gpus_per_actor,
            cpus_per_actor=o.cpus_per_actor,
            batch_size=o.batch_size,
            backend=o.backend,
            device=o.device,
            transfer=o.transfer,
            runner_opts=runner_opts,
        )
    from mae_deploy.extract.local import LocalEngine

    assert o.workers is not None  # check_options filled in the default
    return LocalEngine(
        plan,
        plan.tasks(todo, o.batch_size),
        workers=o.workers,
        start_method=o.start_method,
        batch_size=o.batch_size,
        backend=o.backend,
        device=o.device,
        transfer=o.transfer,
        runner_opts=runner_opts,
    )
