"""The Ray Data engine (``--engine ray``): the same job on one machine or a cluster.

The driver (this process) lists the source and plans shards exactly as the local engine does; the rows
still to do become a dataset of ``(row, path)`` blocks. Ray Data then runs

    read blocks --> decode + preprocess (map_batches, CPU tasks) --> encoder (map_batches, an actor pool of
    ``actors`` callable-class actors (``ActorPoolStrategy(size=actors)``, what ``concurrency=N`` was before
    Ray 2.51), each holding one runner, ``num_gpus`` each for GPU backends)

and streams the results back to the driver in source order (``preserve_order``, plus a small reorder
buffer keyed by the global row that would absorb any reordering), where the job commits them through the
same shard writer as the local engine. So the output directory is the local engine's format exactly.

A broken image is a row with a failure reason, never a failed dataset. A lost actor is restarted by Ray and
its batches retried (Ray Data's actor pools default to ``max_restarts=-1, max_task_retries=-1``); rows are
matched to the plan by their global row id, so none is lost or duplicated.
Unlike the local engine, an image that crashes the decoder process fails its Ray task, which Ray retries and
then fails the job (the local engine isolates such a file as ``decoder_crashed``).

Both ends must see the same files: on a cluster, SOURCE, the bundle and DIR must be on storage every node
mounts at the same path (the driver writes DIR; workers read SOURCE and the bundle).

Not run here: GPU actors (``gpus_per_actor > 0``, no GPU on this machine) and multi-node clusters; they use
the same code with other resource numbers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from mae_deploy.errors import DeviceUnavailable, InputError, MissingDependency
from mae_deploy.extract.engine import BatchResult
from mae_deploy.extract.plan import JobPlan
from mae_deploy.extract.workers import Task
from mae_deploy.ray_cluster import connect

# Dataset blocks: one batch each (so a small job spreads over every decode CPU and actor too), but at most
# about this many blocks (a block costs the driver an object and Ray a task).
MAX_BLOCKS = 2000
# What a decode task declares per image of its batch (a decoded 12-megapixel RGB photo is 36 MB; JPEG draft
# decoding makes most much smaller).
DECODE_BYTES_PER_IMAGE = 16 << 20


def import_ray():
    """The ``ray`` module with Ray Data, or MissingDependency (exit 6) with the install line."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MissingDependency("ray", "extract --engine ray", "pip install 'mae-deploy[ray]'") from e
    return ray


def check_ray_options(*, actors: int, gpus_per_actor: float, cpus_per_actor: float) -> None:
    if actors < 1:
        raise InputError(f"--actors must be at least 1, got {actors}")
    for name, value in (("--gpus-per-actor", gpus_per_actor), ("--cpus-per-actor", cpus_per_actor)):
        if not math.isfinite(value):  # nan passes every comparison below and breaks Ray's resource maths
            raise InputError(f"{name} must be a finite number of 0 or more, got {value}")
    if gpus_per_actor < 0 or cpus_per_actor < 0:
        raise InputError(
            f"--gpus-per-actor and --cpus-per-actor must be 0 or more, got {gpus_per_actor}, {cpus_per_actor}"
        )
    if gpus_per_actor == 0 and cpus_per_actor == 0:
        raise InputError("an encoder actor needs some resource: give --cpus-per-actor or --gpus-per-actor above 0")


def decode_rows(batch: dict, decoder_args: dict, pixel_shape: tuple[int, ...]) -> dict:
    """Ray task: a block of (row, path) -> model-sized uint8 images of the good rows, failures of the rest."""
    import warnings

    from PIL import Image

    from mae_deploy.extract.decode import Decoder

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    Image.MAX_IMAGE_PIXELS = decoder_args["max_pixels"] or None  # as in a local decode worker
    rows = np.asarray(batch["row"], dtype=np.int64)
    items = list(zip(rows.tolist(), [os.fsdecode(p) for p in batch["path"]], strict=True))
    dec = Decoder(**decoder_args).decode_batch(items)
    position = {r: i for i, r in enumerate(rows.tolist())}
    ok = np.zeros(len(rows), dtype=bool)
    pixels = np.zeros((len(rows), *pixel_shape), dtype=np.uint8)
    reason = np.full(len(rows), "", dtype=object)
    message = np.full(len(rows), b"", dtype=object)
    for r, im in zip(dec.rows, dec.pixels if dec.pixels is not None else [], strict=True):
        ok[position[r]] = True
        pixels[position[r]] = im
    for r, why, text in dec.failures:
        # Bytes, as the paths: a message naming a non-UTF-8 file name cannot be an Arrow string.
        reason[position[r]], message[position[r]] = why, os.fsencode(text)
    return {"row": rows, "ok": ok, "pixels": pixels, "reason": reason, "message": message}


class EncodeActor:
    """Ray actor (a callable class): one runner; decoded rows -> pooled features in the job's dtype."""

    def __init__(
        self,
        bundle_path: str,
        backend: str,
        device: str,
        precision: str,
        pool: str,
        dtype: str,
        batch_size: int,
        runner_opts: dict,
    ) -> None:
        from mae_deploy.features import FeatureExtractor

        self.fx = FeatureExtractor(
            bundle_path,
            backend=backend,
            device=device,
            precision=precision,
            pool=pool,
            batch_size=batch_size,
            **runner_opts,
        )
        self.dtype = dtype
        b = self.fx.bundle
        self.feature_shape = (b.num_patches + 1, b.embed_dim) if pool == "tokens" else (b.embed_dim,)

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray(batch["ok"], dtype=bool)
        feats = np.zeros((len(ok), *self.feature_shape), dtype=self.dtype)
        if ok.any():
            x = np.stack([self.fx.preprocessor.normalize(im) for im in batch["pixels"][ok]])
            feats[ok] = self.fx.extract_pixels(x).astype(self.dtype, copy=False)
        return {
            "row": batch["row"],
            "ok": ok,
            "features": feats,
            "reason": batch["reason"],
            "message": batch["message"],
        }


def pixel_shape(plan: JobPlan, decoder_args: dict) -> tuple[int, ...]:
    """The shape of one decoded uint8 model image (so a block whose images all failed has a column too)."""
    from PIL import Image

    from mae_deploy.extract.decode import Decoder

    pre = Decoder(**decoder_args).pre
    s = plan.bundle.image_size
    return np.asarray(pre.resize_crop(Image.new("L" if plan.bundle.in_chans == 1 else "RGB", (s, s)))).shape


class RayEngine:
    """Ray Data decode tasks and an encoder actor pool; results back in source order."""

    name = "ray"

    def __init__(
        self,
        plan: JobPlan,
        todo: list[int],
        *,
        address: str | None,
        actors: int,
        gpus_per_actor: float,
        cpus_per_actor: float,
        backend: str,
        device: str,
        batch_size: int,
        transfer: str,
        runner_opts: dict,
    ) -> None:
        self.ray = import_ray()
        self.plan, self.todo, self.batch_size = plan, todo, batch_size
        self.timings = {"ray_wait_s": 0.0}
        if device.startswith("cuda") and gpus_per_actor == 0:
            gpus_per_actor = 1.0  # an actor sees a GPU only when Ray gives it one
        self.info = {
            "backend": backend,
            "device": device,
            "batch_size": batch_size,
            "transfer": "uint8",
            "actors": actors,
            "gpus_per_actor": gpus_per_actor,
            "cpus_per_actor": cpus_per_actor,
            "address": address,
        }
        self._iter: Iterator[dict[str, Any]] | None = None  # Ray Data's batches, while they are read
        self._saved_context: tuple[bool, bool] | None = None
        self._own = connect(self.ray, address, include_dashboard=False, log_to_driver=False)
        try:
            self._check_resources(actors, cpus_per_actor, gpus_per_actor)
            if device == "cpu" and "threads" not in runner_opts:
                # Each actor would otherwise start one inference thread per core of its node.
                runner_opts = {**runner_opts, "threads": max(1, int(cpus_per_actor))}
            self.ds = self._dataset(backend, device, runner_opts, actors, gpus_per_actor, cpus_per_actor)
        except BaseException:
            self.close()
            raise

    def _check_resources(self, actors: int, cpus_per_actor: float, gpus_per_actor: float) -> None:
        res = self.ray.cluster_resources()
        self.info["cluster_resources"] = {k: v for k, v in res.items() if not k.startswith("node:")}
        self.info["nodes"] = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        if actors * cpus_per_actor + 1 > cpus:
            raise InputError(
                f"{actors} actors x {cpus_per_actor} CPUs leave no CPU for decoding on this Ray cluster "
                f"({cpus:g} CPUs); use fewer --actors or a smaller --cpus-per-actor"
            )
        if actors * gpus_per_actor > gpus:
            raise DeviceUnavailable(f"{actors} actors x {gpus_per_actor} GPUs asked, the Ray cluster has {gpus:g}")

    def _blocks(self):
        """The rows to do as pyarrow tables of whole batches (no Python object per row)."""
        import pyarrow as pa

        rows_to_do = sum(len(self.plan.shard_rows[k]) for k in self.todo)
        step = self.batch_size * max(1, -(-rows_to_do // (self.batch_size * MAX_BLOCKS)))
        paths = self.plan.src.paths
        for k in self.todo:
            rows = self.plan.shard_rows[k]
            for a in range(rows.start, rows.stop, step):
                b = min(a + step, rows.stop)
                # Paths travel as bytes (os.fsencode): a file name that is not valid UTF-8 (held with
                # surrogate escapes) cannot be an Arrow string, yet the local engine reads it.
                yield pa.table(
                    {
                        "row": pa.array(np.arange(a, b, dtype=np.int64)),
                        "path": pa.array([os.fsencode(p) for p in paths[a:b]], type=pa.binary()),
                    }
                )

    def _dataset(
        self, backend: str, device: str, runner_opts: dict, actors: int, gpus_per_actor: float, cpus_per_actor: float
    ):
        data = self.ray.data
        ctx = data.DataContext.get_current()
        self._saved_context = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        args = self.plan.decoder_args("uint8")
        decoded = data.from_arrow(list(self._blocks())).map_batches(
            decode_rows,
            fn_kwargs={"decoder_args": args, "pixel_shape": pixel_shape(self.plan, args)},
            batch_size=self.batch_size,
            batch_format="numpy",
            num_cpus=1,
            # Memory for a batch of decoded full-size images. Also: Ray Data fuses map steps whose resource
            # requests are equal, which would decode inside the encoder actors (a GPU idle while its actor
            # decodes); this request differs from the actors', so decoding stays a separate CPU task.
            memory=self.batch_size * DECODE_BYTES_PER_IMAGE,
        )
        plan = self.plan
        return decoded.map_batches(
            EncodeActor,
            batch_size=self.batch_size,
            batch_format="numpy",
            compute=data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
            fn_constructor_kwargs={
                "bundle_path": str(plan.bundle.path),
                "backend": backend,
                "device": device,
                "precision": plan.precision,
                "pool": plan.pool,
                "dtype": plan.dtype,
                "batch_size": self.batch_size,
                "runner_opts": runner_opts,
            },
        )

    def _ordered_rows(self) -> Iterator[tuple]:
        """(row, ok, features, reason, message) in the plan's row order, whatever order Ray delivers."""
        it = self._iter = iter(self.ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
        pending: dict[int, tuple] = {}
        for k in self.todo:
            for r in self.plan.shard_rows[k]:
                while r not in pending:
                    t0 = time.perf_counter()
                    batch = next(it, None)
                    self.timings["ray_wait_s"] += time.perf_counter() - t0
                    if batch is None:
                        raise RuntimeError(f"Ray Data ended before row {r}: rows were lost (a bug; please report)")
                    for i, row in enumerate(batch["row"].tolist()):
                        pending[row] = (batch["ok"][i], batch["features"][i], batch["reason"][i], batch["message"][i])
                yield (r, *pending.pop(r))

    def batches(self) -> Iterator[tuple[Task, BatchResult]]:
        rows = self._ordered_rows()
        for task in self.plan.tasks(self.todo, self.batch_size):
            good, feats, failures = [], [], []
            for _ in task.items:
                row, ok, feat, reason, message = next(rows)
                if ok:
                    good.append(row)
                    feats.append(feat)
                else:
                    failures.append((row, str(reason), os.fsdecode(message)))
            yield task, BatchResult(good, np.stack(feats) if feats else None, failures)

    def run_info(self) -> dict:
        return {
            **{k: v for k, v in self.info.items() if k not in ("cluster_resources", "nodes")},
            "ray": {
                "version": self.ray.__version__,
                "nodes": self.info.get("nodes"),
                "cluster_resources": self.info.get("cluster_resources"),
            },
        }

    def close(self) -> None:
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "close"):
            it.close()  # stops the streaming execution (e.g. --strict stopped early)
        if self._saved_context is not None:
            ctx = self.ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = self._saved_context
        if self._own and self.ray.is_initialized():
            self.ray.shutdown()
