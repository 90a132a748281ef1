"""The local engine: decode workers on this machine, the encoder in this process.

    source rows --(batches)--> decode workers --(bounded, in order)--> inference --(queue of 1)--> shard writer

At most ``2 * workers + 2`` decoded batches exist at any time, plus the shard being filled and one being
written, so memory stays flat however many images there are.

An engine turns the job's tasks into ``(task, BatchResult)`` pairs in task order; the job
(:mod:`mae_deploy.extract.job`) assembles shards from them and commits them. :mod:`.ray_engine` is the
other engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from mae_deploy.extract.decode import normalize_batch
from mae_deploy.extract.engine import BatchResult, runner_info
from mae_deploy.extract.plan import JobPlan
from mae_deploy.extract.workers import DecodeStage, DecodeWorkers, Task, ThreadDecode


class LocalEngine:
    """Decode processes (or a thread) feeding one runner in this process."""

    name = "local"

    def __init__(
        self,
        plan: JobPlan,
        tasks: Iterator[Task],
        *,
        backend: str,
        device: str,
        batch_size: int,
        workers: int,
        transfer: str,
        start_method: str,
        runner_opts: dict,
    ) -> None:
        """``plan.decoder`` "torch": workers send JPEGs encoded, decoded here on the runner's device."""
        from mae_deploy.features import FeatureExtractor
        from mae_deploy.preprocess import Preprocessor

        self.transfer = transfer
        self.dtype = plan.dtype
        # first_batch_s: until the first decoded batch (worker start-up); the rest is the steady state.
        self.timings = {
            "decode_wait_s": 0.0,
            "normalize_s": 0.0,
            "inference_s": 0.0,
            "decode_worker_s": 0.0,
            "first_batch_s": 0.0,
        }
        self.pre = Preprocessor.from_bundle(plan.bundle, exact_resize=plan.exact_resize)
        args = plan.decoder_args(transfer)
        self.device_batcher = None
        # Workers start first: their start-up (imports) overlaps with creating the inference session.
        self.stage: DecodeStage = (
            DecodeWorkers(tasks, args, plan.max_pixels, workers, 2 * workers + 2, start_method, batch_size=batch_size)
            if workers > 0
            else ThreadDecode(tasks, args, 2)
        )
        self.settings = {
            "backend": backend,
            "device": device,
            "batch_size": batch_size,
            "workers": workers,
            "transfer": transfer,
            "transport": self.stage.transport,
            "decoder": plan.decoder,
        }
        try:
            self.fx = FeatureExtractor(
                plan.bundle,
                backend=backend,
                device=device,
                precision=plan.precision,
                pool=plan.pool,
                batch_size=batch_size,
                preprocessor=self.pre,
                **runner_opts,
            )
            if plan.decoder == "torch":  # after the runner: its checks of device and options come first
                from mae_deploy.extract.device_decode import DeviceBatcher

                self.device_batcher = DeviceBatcher(args, device)
        except BaseException:
            self.stage.close()
            if hasattr(self, "fx"):
                self.fx.close()
            raise

    def batches(self) -> Iterator[tuple[Task, BatchResult]]:
        t_wait = t_first = time.perf_counter()
        for task, dec in self.stage:
            self.timings["decode_wait_s"] += time.perf_counter() - t_wait
            if not self.timings["first_batch_s"]:
                self.timings["first_batch_s"] = time.perf_counter() - t_first
            self.timings["decode_worker_s"] += dec.decode_s
            if self.device_batcher is not None:
                yield task, self._on_device(task, dec)
                t_wait = time.perf_counter()
                continue
            feats = None
            if dec.pixels is not None:
                t0 = time.perf_counter()
                x = dec.pixels
                if self.transfer == "uint8":
                    x = normalize_batch(self.pre, dec.pixels)
                t1 = time.perf_counter()
                feats = self.fx.extract_pixels(x).astype(self.dtype, copy=False)
                self.timings["normalize_s"] += t1 - t0
                self.timings["inference_s"] += time.perf_counter() - t1
            yield task, BatchResult(dec.rows, feats, dec.failures)
            t_wait = time.perf_counter()

    def _on_device(self, task: Task, dec) -> BatchResult:
        """--decoder torch: JPEGs decoded, resized and normalised on the device, then the runner."""
        assert self.device_batcher is not None  # batches() calls this only with a device batcher
        t0 = time.perf_counter()
        rows, x, failures = self.device_batcher.assemble(task.items, dec, self.transfer)
        t1 = time.perf_counter()
        feats = None
        if x is not None:
            # A CPU tensor goes in as numpy; a GPU one stays there (runners take DLPack tensors).
            out = self.fx.extract_pixels(x.numpy() if x.device.type == "cpu" else x)
            feats = (out if isinstance(out, np.ndarray) else out.float().cpu().numpy()).astype(self.dtype, copy=False)
        self.timings["normalize_s"] += t1 - t0  # the device decode, resize and normalisation
        self.timings["inference_s"] += time.perf_counter() - t1
        return BatchResult(rows, feats, failures)

    def run_info(self) -> dict:
        return {**self.settings, "runner": runner_info(self.fx.runner), "decode_worker_restarts": self.stage.restarts}

    def close(self) -> None:
        try:
            self.stage.close()
        finally:
            self.fx.close()
