"""TrtRunner: a bundle's encoder/decoder as TensorRT engines on one CUDA GPU (TensorRT 10.x and 11.x).

Written from the TensorRT 10.x / 11.x Python API and cuda-python documentation (what has run where:
docs/verification.md). tests/gpu/test_gpu_smoke.py is its runtime check on a GPU; tests/runners/test_trt_logic.py
drives it on the CPU through fakes of tensorrt and cuda-python.

Threading: engines and sessions are made once per part under that part's lock; calls on a part are
serialised by the same lock (one execution context and stream per part); ``cudaSetDevice`` is called at
the top of every entry point, because the current device is per thread and a first call from another
thread would otherwise build or allocate on device 0 for ``cuda:1``. ``close()`` takes each part's lock,
so it never frees buffers under a running call.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mae_deploy.errors import InputError
from mae_deploy.names import POOLED_OUTPUTS
from mae_deploy.runners.base import BaseRunner, RunnerInfo, run_in_chunks
from mae_deploy.runners.trt.api import PARTS, import_cudart, import_tensorrt, select_graph, trt_api_generation
from mae_deploy.runners.trt.build import DEFAULT_WORKSPACE_GB, EngineBuildError, get_or_build_engine
from mae_deploy.runners.trt.cache import CachedEngine, default_cache_dir
from mae_deploy.runners.trt.cuda import cuda_device_name, parse_cuda_device, set_device
from mae_deploy.runners.trt.profile import DEFAULT_MAX_BATCH, profile_for_bundle
from mae_deploy.runners.trt.session import EngineSession

if TYPE_CHECKING:
    from mae_deploy.bundle import GraphSpec


class TrtRunner(BaseRunner):
    """Run a bundle's encoder/decoder as TensorRT engines on one CUDA GPU (see the module docstring).

    ``precision``: fp32 or fp16. Profile options: ``max_batch`` (default 32; larger batches run in chunks),
    ``opt_batch`` (default min(8, max_batch)), ``opt_visible`` / ``min_visible`` / ``max_visible`` (ints or
    'L', 'L/4'; default: optimised for all L tokens, covering 1..L). ``cache_dir`` (default
    ~/.cache/mae-deploy/trt), ``workspace_gb`` (builder workspace), ``tf32`` (allow TF32 in fp32 engines;
    off by default), ``rebuild`` (ignore cached engines), ``progress`` (messages and a build progress bar on
    stderr). ``threads`` must stay None: TensorRT runs on the GPU and has no CPU thread count.
    Engines are built or loaded lazily per part on first use; :meth:`load` does it up front.
    """

    def __init__(
        self,
        bundle,
        device: str = "cuda",
        precision: str = "fp32",
        *,
        threads: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        opt_batch: int | None = None,
        opt_visible: int | str | None = None,
        min_visible: int | str = 1,
        max_visible: int | str | None = None,
        cache_dir: str | os.PathLike | None = None,
        workspace_gb: float = DEFAULT_WORKSPACE_GB,
        tf32: bool = False,
        rebuild: bool = False,
        progress: bool = True,
    ) -> None:
        if threads is not None:
            raise InputError(
                f"the trt backend has no CPU thread count (TensorRT runs on the GPU), so threads={threads} "
                "cannot apply; drop --threads, or use it with --backend ort, torch or openvino"
            )
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.generation = trt_api_generation(self.trt.__version__)
        self.bundle = bundle
        self.device = device
        self.device_id = parse_cuda_device(device)
        self.precision = precision
        # Resolve graphs and the profile before touching the GPU, so bad options fail fast.
        self._specs: dict[str, GraphSpec | None] = {
            "encoder": select_graph(bundle, "encoder", precision, self.generation)
        }
        self._specs["decoder"] = (
            select_graph(bundle, "decoder", precision, self.generation) if bundle.has_decoder else None
        )
        self.profile = profile_for_bundle(
            bundle,
            max_batch=max_batch,
            opt_batch=opt_batch,
            opt_visible=opt_visible,
            min_visible=min_visible,
            max_visible=max_visible,
        )
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.workspace_gb, self.tf32, self.rebuild, self.progress = workspace_gb, tf32, rebuild, progress
        self.gpu_name = cuda_device_name(self.cudart, self.device_id)
        set_device(self.cudart, self.device_id)
        self._engines: dict[str, CachedEngine] = {}
        self._sessions: dict[str, EngineSession] = {}
        self._locks = {part: threading.RLock() for part in PARTS}

    def _say(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    # -- engines --------------------------------------------------------------------------------
    def engine(self, part: str, rebuild: bool | None = None) -> CachedEngine:
        """The part's engine in the cache, built now if needed (no GPU buffers are allocated)."""
        if not self.has_part(part):
            self._missing_part(part)  # the bundle's own message (encoder-only bundle)
        set_device(self.cudart, self.device_id)  # the builder works on the calling thread's device
        with self._locks[part]:
            if part not in self._engines or rebuild:
                self._engines[part] = get_or_build_engine(
                    self.bundle,
                    part,
                    self.precision,
                    self.profile,
                    gpu_name=self.gpu_name,
                    cache_dir=self.cache_dir,
                    workspace_gb=self.workspace_gb,
                    tf32=self.tf32,
                    rebuild=self.rebuild if rebuild is None else rebuild,
                    trt=self.trt,
                    say=self._say if self.progress else None,
                    progress=self.progress,
                )
            return self._engines[part]

    def session(self, part: str) -> EngineSession:
        """The part's engine deserialized, with its context, buffers and stream (created on first use)."""
        set_device(self.cudart, self.device_id)
        if part in self._sessions:
            return self._sessions[part]
        with self._locks[part]:
            if part not in self._sessions:
                self._sessions[part] = self._open_session(part)
            return self._sessions[part]

    def _open_session(self, part: str) -> EngineSession:
        cached = self.engine(part)
        try:
            return EngineSession(self.trt, self.cudart, cached.read(), part, self.device_id)
        except EngineBuildError:
            if cached.built:
                raise
            # A stale or corrupt cache entry (e.g. a driver update): rebuild it once.
            self._say(f"the cached {part} engine {cached.paths.engine} could not be loaded; rebuilding it")
            cached = self.engine(part, rebuild=True)
            return EngineSession(self.trt, self.cudart, cached.read(), part, self.device_id)

    def _load(self, part: str) -> None:
        self.session(part)

    # -- running --------------------------------------------------------------------------------
    def _run(self, part: str, feeds: dict[str, np.ndarray], out: str | None = None) -> np.ndarray:
        sess = self.session(part)
        with self._locks[part]:  # one context and stream per part: calls are serialised
            return run_in_chunks(lambda f: sess.run(f, out), feeds, self.profile.max_batch)

    def _encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        self.profile.check_call("encoder", pixel_values.shape[0], ids_keep.shape[1])
        return self._run("encoder", {"pixel_values": pixel_values, "ids_keep": ids_keep})

    def _encode_pooled(self, pixel_values: np.ndarray, ids_keep: np.ndarray, pool: str) -> np.ndarray:
        name = POOLED_OUTPUTS[pool]
        if name not in self.session("encoder").outputs:  # an engine of a bundle without pooled outputs
            return super()._encode_pooled(pixel_values, ids_keep, pool)
        self.profile.check_call("encoder", pixel_values.shape[0], ids_keep.shape[1])
        return self._run("encoder", {"pixel_values": pixel_values, "ids_keep": ids_keep}, name)

    def _decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        self.profile.check_call("decoder", latent.shape[0], latent.shape[1] - 1)
        return self._run("decoder", {"latent": latent, "ids_restore": ids_restore})

    @property
    def info(self) -> RunnerInfo:
        return RunnerInfo(
            backend="trt",
            device=self.device,
            precision=self.precision,
            providers=("tensorrt",),
            details={
                "tensorrt": self.trt.__version__,
                "api_generation": self.generation,
                "gpu": self.gpu_name,
                "profile": self.profile.as_dict(),
                "graphs": {p: s.file for p, s in self._specs.items() if s is not None},
                "engines": {p: str(e.paths.engine) for p, e in self._engines.items()},
                "built": {p: e.built for p, e in self._engines.items()},
                "build_seconds": {p: e.build_seconds for p, e in self._engines.items() if e.built},
                "cache_dir": str(self.cache_dir),
                "tf32": self.tf32,
                "sessions": sorted(self._sessions),
            },
        )

    def close(self) -> None:
        """Free every part's buffers and stream, each under its part's lock (never under a running call)."""
        for part in PARTS:
            with self._locks[part]:
                sess = self._sessions.pop(part, None)
                if sess is not None:
                    sess.close()

    def __del__(self) -> None:  # best effort: free device memory of a runner nobody closed
        try:
            self.close()
        except Exception:
            pass
