"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers.

Devices: ``cpu``; ``cuda`` / ``cuda:N`` (CUDAExecutionProvider); ``tensorrt`` / ``tensorrt:N``
(TensorrtExecutionProvider, with CUDA for the nodes TensorRT does not take). A GPU device that does not
work is an error (:class:`DeviceUnavailable`), never a silent fall-back to the CPU: onnxruntime-gpu
quietly drops to CPU when CUDA libraries fail to load, so the providers each session really got are
checked with ``session.get_providers()`` and reported in :attr:`OrtRunner.info`.

Sessions are created lazily, one per part, on first use (feature extraction never loads the decoder);
call :meth:`OrtRunner.load` to create them up front.

Not run on this project's machines (no GPU here): the CUDA and TensorRT providers, their IO binding and
TensorRT's fp16 / engine cache / profile options. The CPU path, the provider checks and the IO-binding
code path (bound to CPU memory) are tested.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from mae_deploy.bundle import Bundle, GraphSpec
from mae_deploy.errors import BundleError, DeviceUnavailable, InputError, MissingDependency
from mae_deploy.masking import check_decode_inputs, check_encode_inputs
from mae_deploy.runners.base import RunnerInfo

_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_OPT_LEVELS = ("disable", "basic", "extended", "all")
_INPUTS = {"encoder": ("pixel_values", "ids_keep"), "decoder": ("latent", "ids_restore")}
_OUTPUT = {"encoder": "latent", "decoder": "pred"}


def import_onnxruntime(device: str = "cpu"):
    """``import onnxruntime`` with a one-line MissingDependency saying which extra installs it."""
    try:
        import onnxruntime
    except ImportError as e:
        extra = "cpu" if device == "cpu" else "gpu"
        raise MissingDependency(
            "onnxruntime" if extra == "cpu" else "onnxruntime-gpu",
            f"the ort backend on {device}",
            f"pip install 'mae-deploy[{extra}]'",
        ) from e
    return onnxruntime


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' | 'cuda[:N]' | 'tensorrt[:N]' -> (kind, device_id)."""
    kind, _, idx = device.partition(":")
    if kind not in _PROVIDER or (kind == "cpu" and idx):
        raise InputError(f"unknown ort device {device!r}; use cpu, cuda, cuda:N, tensorrt or tensorrt:N")
    if idx and not idx.isdigit():
        raise InputError(f"device index in {device!r} must be a non-negative integer")
    return kind, int(idx or 0)


def check_providers(device: str, requested: str, available_or_actual: list[str], session: bool) -> None:
    """DeviceUnavailable unless ``requested`` is among the providers (available ones, or a session's own)."""
    if requested in available_or_actual:
        return
    have = ", ".join(available_or_actual) or "none"
    if not session:
        raise DeviceUnavailable(
            f"ONNX Runtime here has no {requested} (available: {have}), so --device {device} cannot run; "
            "install the GPU build (pip uninstall onnxruntime; pip install 'mae-deploy[gpu]') or use --device cpu"
        )
    raise DeviceUnavailable(
        f"--device {device} asked for {requested}, but ONNX Runtime fell back to {have} (the CUDA/cuDNN or "
        "TensorRT libraries could not be loaded; ONNX Runtime's log says which); fix the GPU install or use "
        "--device cpu"
    )


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mae-deploy" / "ort-trt"


class OrtRunner:
    """Run a bundle's encoder/decoder graphs with ONNX Runtime.

    ``precision`` picks the graph variant (fp32, fp16, int8); the decoder uses fp32 when the bundle has
    no decoder at that precision (``info.details['graphs']`` says which files run). On ``tensorrt``,
    ``fp16`` runs the fp32 graph with TensorRT's fp16 kernels enabled, the usual way to use that EP.
    ``intra_op_threads`` / ``inter_op_threads`` None leave ONNX Runtime's defaults (all physical cores).
    ``io_binding`` (default: on for GPU devices) binds outputs to device memory and copies them back
    once per call.
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        precision: str = "fp32",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: str = "all",
        io_binding: bool | None = None,
        trt_max_batch: int = 64,
        trt_opt_batch: int | None = None,
        trt_opt_visible: int | None = None,
        trt_cache_dir: str | os.PathLike | None = None,
        log_level: int = 3,
    ) -> None:
        self.ort = import_onnxruntime(device)
        self.bundle = bundle
        self.device = device
        self.kind, self.device_id = parse_device(device)
        self.precision = precision
        if graph_optimization not in _OPT_LEVELS:
            raise InputError(f"graph_optimization must be one of {list(_OPT_LEVELS)}, got {graph_optimization!r}")
        for name, n in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if n is not None and n < 1:
                raise InputError(f"{name} must be at least 1, got {n}")
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.graph_optimization = graph_optimization
        self.io_binding = (self.kind != "cpu") if io_binding is None else io_binding
        self.log_level = log_level
        self.trt_max_batch = trt_max_batch
        self.trt_opt_batch = trt_opt_batch or min(8, trt_max_batch)
        self.trt_opt_visible = trt_opt_visible or bundle.num_patches
        self.trt_cache_dir = Path(trt_cache_dir) if trt_cache_dir else default_cache_dir()

        self._primary = _PROVIDER[self.kind]
        check_providers(device, self._primary, list(self.ort.get_available_providers()), session=False)
        # Resolve graph files now so a missing precision fails before any work.
        graph_precision = "fp32" if (self.kind == "tensorrt" and precision == "fp16") else precision
        self._specs: dict[str, GraphSpec | None] = {"encoder": bundle.graph("encoder", graph_precision)}
        dec = bundle.precisions("decoder")
        self._specs["decoder"] = (
            bundle.graph("decoder", graph_precision if graph_precision in dec else "fp32") if dec else None
        )
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()

    # -- sessions -------------------------------------------------------------------------------
    def _providers(self, part: str) -> list:
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
        if self.kind == "cpu":
            return ["CPUExecutionProvider"]
        if self.kind == "cuda":
            return [cuda, "CPUExecutionProvider"]
        self.trt_cache_dir.mkdir(parents=True, exist_ok=True)
        # One definition of the TensorRT profile and its options, shared with the trt backend.
        from mae_deploy.runners.trt import ort_trt_provider_options, profile_for_bundle

        profile = profile_for_bundle(self.bundle, max_batch=self.trt_max_batch, opt_batch=self.trt_opt_batch,
                                     opt_visible=self.trt_opt_visible)
        trt = ort_trt_provider_options(profile, self.trt_cache_dir, fp16=self.precision == "fp16", part=part,
                                       device_id=self.device_id)
        return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]

    def _session_options(self):
        so = self.ort.SessionOptions()
        if self.intra_op_threads:
            so.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads:
            so.inter_op_num_threads = self.inter_op_threads
            if self.inter_op_threads > 1:
                so.execution_mode = self.ort.ExecutionMode.ORT_PARALLEL
        levels = self.ort.GraphOptimizationLevel
        so.graph_optimization_level = {
            "disable": levels.ORT_DISABLE_ALL,
            "basic": levels.ORT_ENABLE_BASIC,
            "extended": levels.ORT_ENABLE_EXTENDED,
            "all": levels.ORT_ENABLE_ALL,
        }[self.graph_optimization]
        so.log_severity_level = self.log_level
        return so

    def session(self, part: str):
        """The part's InferenceSession, created on first use and checked for a silent CPU fall-back."""
        if part in self._sessions:
            return self._sessions[part]
        spec = self._specs.get(part)
        if spec is None:
            self.bundle.graph(part)  # raises the bundle's own message (e.g. encoder-only)
        with self._lock:
            if part not in self._sessions:
                path = self.bundle.path / spec.file
                try:
                    sess = self.ort.InferenceSession(
                        str(path), sess_options=self._session_options(), providers=self._providers(part)
                    )
                except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
                    if self.kind == "cpu":
                        raise BundleError(f"ONNX Runtime cannot load {path}: {e}") from e
                    raise DeviceUnavailable(
                        f"ONNX Runtime could not start the {part} on {self.device}: {e} (if the bundle runs with "
                        "--device cpu, the GPU setup is at fault)"
                    ) from e
                check_providers(self.device, self._primary, list(sess.get_providers()), session=True)
                names = tuple(i.name for i in sess.get_inputs())
                if sorted(names) != sorted(_INPUTS[part]) or _OUTPUT[part] not in [o.name for o in sess.get_outputs()]:
                    raise BundleError(
                        f"{path} has inputs {list(names)} and outputs {[o.name for o in sess.get_outputs()]}; "
                        f"a bundle {part} needs inputs {list(_INPUTS[part])} and output '{_OUTPUT[part]}'"
                    )
                self._sessions[part] = sess
        return self._sessions[part]

    def load(self, parts: tuple[str, ...] = ("encoder", "decoder")) -> OrtRunner:
        """Create the sessions now (those the bundle has) instead of on first use."""
        for part in parts:
            if self._specs.get(part) is not None:
                self.session(part)
        return self

    # -- running --------------------------------------------------------------------------------
    def _run(self, part: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        sess = self.session(part)
        out = _OUTPUT[part]
        if not self.io_binding:
            return np.asarray(sess.run([out], feeds)[0], dtype=np.float32)
        binding = sess.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        where = "cpu" if self.kind == "cpu" else "cuda"
        binding.bind_output(out, where, self.device_id if where == "cuda" else 0)
        sess.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)

    def encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        b = self.bundle
        x, ids = check_encode_inputs(
            pixel_values, ids_keep, in_chans=b.in_chans, image_size=b.image_size, num_patches=b.num_patches
        )
        return self._run("encoder", {"pixel_values": x, "ids_keep": ids})

    def decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        b = self.bundle
        if self._specs["decoder"] is None:
            b.graph("decoder")  # raises: no decoder in this bundle
        x, ids = check_decode_inputs(latent, ids_restore, embed_dim=b.embed_dim, num_patches=b.num_patches)
        return self._run("decoder", {"latent": x, "ids_restore": ids})

    @property
    def has_decoder(self) -> bool:
        return self._specs["decoder"] is not None

    @property
    def info(self) -> RunnerInfo:
        """Backend, device and the providers the created sessions really use (none before the first run)."""
        providers: list[str] = []
        for sess in self._sessions.values():
            providers += [p for p in sess.get_providers() if p not in providers]
        return RunnerInfo(
            backend="ort",
            device=self.device,
            precision=self.precision,
            providers=tuple(providers),
            details={
                "onnxruntime": self.ort.__version__,
                "requested_provider": self._primary,
                "graphs": {part: spec.file for part, spec in self._specs.items() if spec is not None},
                "sessions": sorted(self._sessions),
                "intra_op_threads": self.intra_op_threads,
                "inter_op_threads": self.inter_op_threads,
                "graph_optimization": self.graph_optimization,
                "io_binding": self.io_binding,
            },
        )

    def close(self) -> None:
        self._sessions.clear()

    def __enter__(self) -> OrtRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
