"""The model behind the endpoints: one runner, one micro-batcher, decoding threads, and the three jobs.

:class:`ModelService` knows nothing of HTTP: it turns image bytes into features or a reconstruction and
named tensors into named tensors, raising :class:`~mae_deploy.serve.errors.ApiError` for what a client did
wrong. The FastAPI app (local uvicorn or a Ray Serve replica) holds one.

Threads: image decoding and preprocessing run on a thread pool (``decode_workers``); the runner runs on the
batcher's own thread; the event loop only awaits. Reconstruction reuses :class:`Reconstructor` unchanged,
on a decoding thread, through :class:`BatchedRunner`, a Runner whose calls go through the batcher.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from mae_deploy.arrays import host_array
from mae_deploy.bundle import Bundle
from mae_deploy.errors import InputError, MaeDeployError
from mae_deploy.masking import (
    all_visible,
    check_decode_inputs,
    check_encode_inputs,
    check_pixel_values,
    random_masking,
)
from mae_deploy.names import CLASSIFIER, DECODER, ENCODER, ENCODER_INPUTS, ENCODER_OUTPUTS, GRAPH_IO, POOLED_OUTPUTS
from mae_deploy.pooling import pool_latent
from mae_deploy.preprocess import Preprocessor
from mae_deploy.serve.admission import DecodeBudget, decode_cost, give_back_memory
from mae_deploy.serve.batcher import BatcherClosed, MicroBatcher, QueueFull
from mae_deploy.serve.config import ServeConfig
from mae_deploy.serve.errors import ApiError, bad_input, not_ready, overloaded, timed_out
from mae_deploy.serve.images import decode_image, preprocess
from mae_deploy.serve.metrics import ServeMetrics, add_timing, timed
from mae_deploy.serve.protocol_v2 import InferRequest, tensor_metadata

if TYPE_CHECKING:
    from mae_deploy.serve.device_images import DeviceImageDecoder

log = logging.getLogger("mae_deploy.serve")

RECONSTRUCT_FORMATS = ("png", "npz")
# An image this small once decoded (a 640x480 photo; a 224^2 one is ~0.4 MiB) decodes inline in a few ms. Judged
# by the decoded size, not the body's: a few KB of PNG can hold 9400^2 pixels, seconds of decoding.
INLINE_MAX_DECODE_BYTES = 2 * 2**20
# The encoder's pooled outputs are served for every bundle: from the graph where it has them, else pooled here.
_GRAPH_IO = {**GRAPH_IO, ENCODER: (ENCODER_INPUTS, (*ENCODER_OUTPUTS, *POOLED_OUTPUTS.values()))}
_POOL_OF = {name: pool for pool, name in POOLED_OUTPUTS.items()}


def pooled_part(pool: str) -> str:
    """The batcher's part name for encoder calls pooled with ``pool`` (also the metrics' ``part`` label)."""
    return f"{ENCODER}:{pool}"


class BatchedRunner:
    """A Runner whose encode/decode queue on the batcher and wait (from a worker thread) until ``deadline``."""

    def __init__(self, runner, batcher: MicroBatcher, deadline: float) -> None:
        self.info = runner.info
        self.has_decoder = runner.has_decoder
        self._batcher = batcher
        self._deadline = deadline

    def _left(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        return self._batcher.run(ENCODER, (pixel_values, ids_keep), timeout=self._left())

    def encode_pooled(self, pixel_values: np.ndarray, ids_keep: np.ndarray, pool: str) -> np.ndarray:
        part = ENCODER if pool == "tokens" else pooled_part(pool)
        return self._batcher.run(part, (pixel_values, ids_keep), timeout=self._left())

    def decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        return self._batcher.run(DECODER, (latent, ids_restore), timeout=self._left())

    def close(self) -> None:
        return None


class ModelService:
    """Loads the runner, warms it up, and serves features, reconstructions and v2 inference."""

    def __init__(
        self, config: ServeConfig, runner=None, metrics: ServeMetrics | None = None, bundle: Bundle | None = None
    ) -> None:
        self.config = config
        self.bundle = bundle or Bundle.load(config.bundle, verify=config.verify_bundle)
        self.preprocessor = Preprocessor.from_bundle(self.bundle, max_pixels=config.max_pixels)
        self.metrics = metrics or ServeMetrics()
        self.runner = runner
        self.batcher: MicroBatcher | None = None
        self.executor = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="mae-decode")
        self.state = "loading"  # loading -> ready -> draining; or failed
        self.device_images: DeviceImageDecoder | None = None  # --decoder torch: JPEGs decoded on the runner's device
        self.classifier = None  # a Classifier (class names, top-k) when the bundle has a classifier graph
        self._inflight = 0  # images admitted and not yet answered (decoding, queued or running)
        self._inflight_lock = threading.Lock()
        self.decode_budget = DecodeBudget(config.max_decode_bytes)  # bytes of images being decoded
        self.load_error: BaseException | None = None

    # -- life cycle -------------------------------------------------------------------------------------
    def make_runner(self):
        """The runner the config asks for (not yet loaded)."""
        from mae_deploy.runners import create_runner

        c = self.config
        opts = dict(c.runner_opts)
        if c.threads is not None:
            opts["threads"] = c.threads
        return create_runner(self.bundle, c.backend, c.device, c.precision, **opts)

    def load(self) -> None:
        """Create the runner's sessions, warm them up with one batch, start the batcher (blocking)."""
        try:
            if self.runner is None:
                self.runner = self.make_runner()
            if hasattr(self.runner, "load"):
                self.runner.load()
            self.classifier = self._make_classifier()
            if self.config.image_decoder == "torch":
                from mae_deploy.serve.device_images import DeviceImageDecoder

                self.device_images = DeviceImageDecoder(self.preprocessor, self.config.device)
            self._warm_up()
            c = self.config
            self.batcher = MicroBatcher(
                self._calls(), c.max_batch_size, c.max_delay_ms / 1000.0, c.max_queue, observer=self.metrics
            ).start()
        except BaseException as e:
            self.state, self.load_error = "failed", e
            raise
        self.state = "ready"
        log.info("model %s ready on %s", self.bundle.name, self.runner_description())

    def _has_classifier(self) -> bool:
        return bool(getattr(self.bundle, "has_classifier", False)) and hasattr(self.runner, "classify")

    def _make_classifier(self):
        if not self._has_classifier():
            return None
        from mae_deploy.classify import Classifier

        try:
            return Classifier(self.bundle, runner=self.runner, preprocessor=self.preprocessor)
        except InputError as e:  # e.g. no class names: /v2 still serves the logits
            log.warning("no /v1/classify: %s", e)
            return None

    def _calls(self) -> dict:
        calls = {ENCODER: self.runner.encode}
        # Pooled on the runner (on the GPU for GPU runners): (N, D) comes back, not the whole latent. One batch
        # key per pool, so concurrent cls and mean requests do not share a runner call.
        for pool in ("cls", "mean"):
            calls[pooled_part(pool)] = functools.partial(self.runner.encode_pooled, pool=pool)
        if self.runner.has_decoder:
            calls[DECODER] = self.runner.decode
        if self._has_classifier():
            calls[CLASSIFIER] = self.runner.classify
        return calls

    def _warm_up(self) -> None:
        b = self.bundle
        x = np.zeros((1, b.in_chans, b.image_size, b.image_size), np.float32)
        ids, restore, _ = all_visible(1, b.num_patches)
        latent = self.runner.encode(x, ids)
        if self.runner.has_decoder:
            self.runner.decode(latent, restore)
        if self._has_classifier():
            self.runner.classify(x)

    def runner_description(self) -> str:
        info = self.runner.info
        providers = f" [{', '.join(info.providers)}]" if info.providers else ""
        return f"{info.backend}/{info.device} {info.precision}{providers}"

    def start_draining(self) -> None:
        """Readiness turns 503; queued work runs at once (no more waiting for company)."""
        if self.state == "ready":
            self.state = "draining"
        if self.batcher is not None:
            self.batcher.flush()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close(timeout=self.config.timeout_s)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.runner is not None:
            self.runner.close()

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "draining":
            raise not_ready("the server is shutting down; send the request to another replica")
        if self.state == "failed":
            raise ApiError(503, "load_failed", f"the model failed to load: {self.load_error}")
        raise not_ready("the model is still loading; retry shortly")

    # -- helpers ----------------------------------------------------------------------------------------
    def deadline(self, start: float) -> float:
        return start + self.config.timeout_s

    async def _in_thread(self, fn, *args, deadline: float, reserved: int = 0):
        """``fn(*args)`` on a decoding thread; ``reserved`` bytes of the decode budget go back when it ends."""

        def job():
            try:
                return fn(*args)
            finally:
                give_back_memory(reserved)

        try:
            future = self.executor.submit(job)
        except BaseException:
            self.decode_budget.release(reserved)
            raise
        # Released when the work ends or is cancelled unstarted, not when the request stops waiting for it.
        future.add_done_callback(lambda _: self.decode_budget.release(reserved))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), _left(deadline))
        except (asyncio.TimeoutError, TimeoutError):
            raise timed_out(self.config.timeout_s) from None

    def _reserve(self, blobs: list[bytes]) -> int:
        """Reserve the decode budget of ``blobs`` (413 / 503 at once when they do not fit; see admission)."""
        return self.decode_budget.reserve([decode_cost(b, self.preprocessor) for b in blobs])

    async def _preprocess(self, blobs: list[bytes], deadline: float) -> np.ndarray:
        """Decode and preprocess: on the event loop for a lone small image, else on the decoding threads.

        A lone request (nothing else in flight) that carries one small body is preprocessed where it is: nobody
        waits for the loop meanwhile, and the hop to a thread and back cost ~0.3 ms of its latency on a 2-core
        machine (measured). Anything else goes to the threads, so the loop keeps accepting while images decode.
        """
        reserved = self._reserve(blobs)
        if self.device_images is not None:  # --decoder torch: a tensor on the runner's device
            return await self._in_thread(self.device_images, blobs, deadline=deadline, reserved=reserved)
        if len(blobs) == 1 and reserved <= INLINE_MAX_DECODE_BYTES and self._inflight == 1:
            try:
                return preprocess(blobs, self.preprocessor)
            finally:
                self.decode_budget.release(reserved)
                give_back_memory(reserved)
        return await self._in_thread(preprocess, blobs, self.preprocessor, deadline=deadline, reserved=reserved)

    async def _batched(self, part: str, inputs: tuple, deadline: float) -> np.ndarray:
        assert self.batcher is not None  # start() made it before the service took requests
        try:
            return await self.batcher.run_async(
                part, inputs, timeout=_left(deadline), on_ran=lambda s: add_timing("runner", s * 1000)
            )
        except (asyncio.TimeoutError, TimeoutError):
            raise timed_out(self.config.timeout_s) from None
        except QueueFull as e:
            raise overloaded(str(e)) from None
        except BatcherClosed as e:
            raise not_ready(str(e)) from None
        except InputError as e:  # validated before queueing; a runner may still refuse (e.g. TensorRT profile)
            raise bad_input(e) from e

    @contextmanager
    def _admit(self, n: int):
        """Refuse (503) work beyond the queue plus one running batch, counted from arrival, so a flood of
        requests cannot pile up in the decoding threads' backlog before the batcher's own limit sees it."""
        limit = self.config.max_queue + self.config.max_batch_size
        with self._inflight_lock:
            if self._inflight + n > limit:
                raise overloaded(
                    f"the server is overloaded: {self._inflight} images in flight, {n} more would "
                    f"exceed {limit} (--max-queue {self.config.max_queue} + one batch)"
                )
            self._inflight += n
        try:
            yield
        finally:
            with self._inflight_lock:
                self._inflight -= n

    # -- the jobs ---------------------------------------------------------------------------------------
    async def features(self, blobs: list[bytes], pool: str, deadline: float) -> np.ndarray:
        """Image bytes -> pooled features (N, D), or (N, L+1, D) for tokens."""
        self.check_ready()
        with self._admit(len(blobs)):
            with timed("preprocess"):
                x = await self._preprocess(blobs, deadline)
            ids_keep, _, _ = all_visible(x.shape[0], self.bundle.num_patches)
            with timed("infer"):
                out = await self._batched(ENCODER if pool == "tokens" else pooled_part(pool), (x, ids_keep), deadline)
        return np.ascontiguousarray(host_array(out), dtype=np.float32)  # a device tensor in: one comes back

    async def classify(self, blobs: list[bytes], top_k: int, deadline: float) -> list[list[tuple[str, float]]]:
        """Image bytes -> per image the top_k (label, probability) pairs of the bundle's classifier."""
        self.check_ready()
        if self.classifier is None:
            raise ApiError(
                400,
                "no_classifier",
                f"the bundle {self.bundle.name} has no classifier graph with class "
                "names; export a fine-tuned or linear-probe checkpoint",
            )
        with self._admit(len(blobs)):
            with timed("preprocess"):
                x = await self._preprocess(blobs, deadline)
            with timed("infer"):
                logits = host_array(await self._batched(CLASSIFIER, (host_array(x),), deadline))
        try:
            return self.classifier.predictions(logits, top_k)
        except InputError as e:
            raise bad_input(e, "bad_request") from e

    async def reconstruct(
        self, blob: bytes, mask_ratio: float, seed: int, fmt: str, deadline: float
    ) -> tuple[bytes, str]:
        """One image -> (the four-panel PNG, or an .npz of mask / ids / prediction, and its media type)."""
        self.check_ready()
        if not self.runner.has_decoder:
            raise ApiError(
                400,
                "no_decoder",
                f"the bundle {self.bundle.name} has no decoder, so it cannot "
                "reconstruct; export a *_full or mae_visualize_* checkpoint",
            )
        if fmt not in RECONSTRUCT_FORMATS:
            raise ApiError(400, "bad_request", f"format must be one of {list(RECONSTRUCT_FORMATS)}, got {fmt!r}")
        try:
            with self._admit(1):
                return await self._in_thread(
                    self._reconstruct,
                    blob,
                    mask_ratio,
                    seed,
                    fmt,
                    deadline,
                    deadline=deadline,
                    reserved=self._reserve([blob]),
                )
        except TimeoutError:
            raise timed_out(self.config.timeout_s) from None
        except QueueFull as e:
            raise overloaded(str(e)) from None
        except InputError as e:
            raise bad_input(e) from e

    def _reconstruct(self, blob: bytes, mask_ratio: float, seed: int, fmt: str, deadline: float) -> tuple[bytes, str]:
        from mae_deploy.reconstruct import Reconstructor

        image = decode_image(blob, self.preprocessor, "(request body)")
        assert self.batcher is not None  # start() made it before the service took requests
        proxy = BatchedRunner(self.runner, self.batcher, deadline)
        with Reconstructor(self.bundle, runner=proxy, preprocessor=self.preprocessor, batch_size=1) as rec:
            result = rec.reconstruct([image], mask_ratio=mask_ratio, seed=seed)[0]
        buf = io.BytesIO()
        if fmt == "png":
            result.grid_image().save(buf, format="PNG")
            return buf.getvalue(), "image/png"
        ids_keep, ids_restore, _ = random_masking(1, self.bundle.num_patches, mask_ratio, rng=seed)  # as rec did
        np.savez(
            buf,
            mask=result.mask,
            ids_keep=ids_keep[0],
            ids_restore=ids_restore[0],
            pred=result.pred,
            reconstruction=result.reconstruction,
            original=result.original,
        )
        return buf.getvalue(), "application/x-npz"

    # -- KServe v2 --------------------------------------------------------------------------------------
    @property
    def graphs(self) -> list[str]:
        """The graph parts this server runs under /v2/models/{name}."""
        if self.runner is None:
            return sorted({g.part for g in self.bundle.graphs})
        return [p for p in self._calls() if p in _GRAPH_IO]  # not the pooled encoder calls: outputs, not models

    def graph_metadata(self, name: str) -> dict:
        if name not in {g.part for g in self.bundle.graphs}:
            raise ApiError(404, "unknown_model", f"no model {name!r} here; this server has {self.graphs}")
        spec = self.bundle.graph(name, self._graph_precision(name))
        return {
            "name": name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [tensor_metadata(t.name, t.dtype, t.shape) for t in spec.inputs],
            "outputs": [tensor_metadata(t.name, t.dtype, t.shape) for t in spec.outputs],
        }

    def _graph_precision(self, part: str) -> str:
        have = self.bundle.precisions(part)
        return self.config.precision if self.config.precision in have else "fp32"

    def _check_tensors(self, name: str, request: InferRequest) -> tuple[np.ndarray, ...]:
        inputs, outputs = _GRAPH_IO[name]
        if sorted(request.inputs) != sorted(inputs):
            raise ApiError(
                400, "bad_request", f"model {name!r} takes inputs {list(inputs)}, got {sorted(request.inputs)}"
            )
        unknown = [o for o in request.outputs if o not in outputs]
        if unknown:
            raise ApiError(400, "bad_request", f"model {name!r} has outputs {list(outputs)}, not {unknown}")
        b = self.bundle
        try:
            if name == CLASSIFIER:
                return (check_pixel_values(request.inputs[inputs[0]], b.in_chans, b.image_size),)
            a, c = (request.inputs[n] for n in inputs)
            if name == ENCODER:
                return check_encode_inputs(
                    a, c, in_chans=b.in_chans, image_size=b.image_size, num_patches=b.num_patches
                )
            return check_decode_inputs(a, c, embed_dim=b.embed_dim, num_patches=b.num_patches)
        except InputError as e:
            raise bad_input(e) from e

    async def infer(self, name: str, request: InferRequest, deadline: float) -> dict[str, np.ndarray]:
        """Named tensors for graph ``name`` -> its named outputs, batched with everything else."""
        self.check_ready()
        if name not in self.graphs:
            raise ApiError(404, "unknown_model", f"no model {name!r} here; this server has {self.graphs}")
        inputs = self._check_tensors(name, request)
        n = inputs[0].shape[0]
        if n > self.config.max_images_per_request:
            raise ApiError(
                413,
                "payload_too_large",
                f"the request holds a batch of {n}; this server takes at most "
                f"{self.config.max_images_per_request} per request",
            )
        wanted = request.outputs or self._graph_outputs(name)
        with self._admit(n), timed("infer"):
            if name == ENCODER and all(o in _POOL_OF for o in wanted):
                # Only pooled features asked for: the runner pools (on the GPU), the latent stays there.
                return {o: await self._batched(pooled_part(_POOL_OF[o]), inputs, deadline) for o in wanted}
            out = await self._batched(name, inputs, deadline)
        main = _GRAPH_IO[name][1][0]
        results = {main: out}
        for o in wanted:
            if o in _POOL_OF:
                results[o] = np.ascontiguousarray(pool_latent(out, _POOL_OF[o]), dtype=np.float32)
        return results

    def _graph_outputs(self, name: str) -> list[str]:
        """What a v2 request that names no outputs gets: the graph's outputs as its metadata lists them."""
        have = self.bundle.precisions(name)
        if not have:
            return [_GRAPH_IO[name][1][0]]
        return [o for o in self.bundle.graph(name, self._graph_precision(name)).output_names if o in _GRAPH_IO[name][1]]

    # -- /v1/models -------------------------------------------------------------------------------------
    def model_card(self) -> dict:
        b = self.bundle
        d = b.embed_dim
        card = {
            "id": b.name,
            "architecture": b.architecture,
            "parts": sorted({g.part for g in b.graphs}),
            "precisions": {p: b.precisions(p) for p in sorted({g.part for g in b.graphs})},
            "feature_dims": {"cls": [d], "mean": [d], "tokens": [b.num_patches + 1, d]},
            "preprocessing": b.preprocessing,
            "norm_pix_loss": b.norm_pix_loss,
            "state": self.state,
        }
        if self.classifier is not None:
            card["class_names"] = self.classifier.class_names
        if self.runner is not None:
            info = self.runner.info
            card["runner"] = {
                "backend": info.backend,
                "device": info.device,
                "precision": info.precision,
                "providers": list(info.providers),
            }
        return card


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def describe_load_error(e: BaseException) -> tuple[str, int]:
    """(message, exit code) of a failed load: a MaeDeployError keeps its own code; anything else is 1."""
    if isinstance(e, MaeDeployError):
        return str(e), e.exit_code
    return f"{type(e).__name__}: {e}", 1
