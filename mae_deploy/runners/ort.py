"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers.

Devices: ``cpu``; ``cuda`` / ``cuda:N`` (CUDAExecutionProvider); ``tensorrt`` / ``tensorrt:N``
(TensorrtExecutionProvider, with CUDA for the nodes TensorRT does not take). A GPU device that does not
work is an error (:class:`DeviceUnavailable`), never a silent fall-back to the CPU: onnxruntime-gpu
quietly drops to CPU when CUDA libraries fail to load, so the providers each session really got are
checked with ``session.get_providers()`` and reported in :attr:`OrtRunner.info`.

Sessions are created lazily, one per part, on first use (feature extraction never loads the decoder);
call :meth:`OrtRunner.load` to create them up front.

What crosses the bus: ``encode_pooled`` fetches only the graph's pooled output (``pooled_cls`` /
``pooled_mean``, (N, D)) when the bundle has it; a tensor already on the runner's device (torch / CuPy) is
bound by address with IO binding, and the result is written into a tensor of the same library on that
device, so nothing goes through the host. The same binding code runs on the CPU provider with CPU tensors.

Which of these paths have run on which hardware: docs/verification.md.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from mae_deploy.arrays import DL_CPU, DeviceArray
from mae_deploy.bundle import Bundle
from mae_deploy.errors import BundleError, DeviceUnavailable, InputError, MissingDependency
from mae_deploy.masking import check_pixel_values
from mae_deploy.names import CLASSIFIER, DECODER, ENCODER, GRAPH_IO, POOLED_OUTPUTS
from mae_deploy.runners.base import BaseRunner, RunnerInfo, check_threads, run_in_chunks

if TYPE_CHECKING:
    from mae_deploy.bundle import GraphSpec
    from mae_deploy.runners.trt.ort_ep import OrtTrtSetup

_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_OPT_LEVELS = ("disable", "basic", "extended", "all")
_INPUTS = {part: inputs for part, (inputs, _) in GRAPH_IO.items()}
_OUTPUT = {part: outputs[0] for part, (_, outputs) in GRAPH_IO.items()}


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


def cuda_libraries(cuda_major: str | None) -> list[str]:
    """The shared libraries ONNX Runtime's CUDA provider loads, for the CUDA major it was built with
    (onnxruntime-gpu 1.31 on PyPI: 13; older releases and NVIDIA's CUDA 12 feed: 12); cuDNN 9 for both."""
    major = cuda_major or "13"
    # cuFFT's soname runs one behind the CUDA major (CUDA 12: libcufft.so.11).
    return [
        f"libcudart.so.{major}",
        f"libcublas.so.{major}",
        f"libcublasLt.so.{major}",
        f"libcufft.so.{int(major) - 1}",
        "libcudnn.so.9",
    ]


def unloadable_libraries(names: list[str]) -> list[str]:
    """Those of ``names`` the dynamic loader cannot open here (what a silent CPU fall-back comes from)."""
    import ctypes

    missing = []
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            missing.append(name)
    return missing


def _ort_cuda_major() -> str | None:
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    version = getattr(info, "cuda_version", None) or ""
    return version.split(".")[0] or None


def check_providers(
    device: str,
    requested: str,
    available_or_actual: list[str],
    session: bool,
    missing_libraries: list[str] | None = None,
) -> None:
    """DeviceUnavailable unless ``requested`` is among the providers (available ones, or a session's own).

    After a session fell back to the CPU, the message names the CUDA / cuDNN libraries that cannot be loaded
    (``missing_libraries``; probed here when None).
    """
    if requested in available_or_actual:
        return
    have = ", ".join(available_or_actual) or "none"
    if not session:
        raise DeviceUnavailable(
            f"ONNX Runtime here has no {requested} (available: {have}), so --device {device} cannot run; "
            "install the GPU build (pip uninstall onnxruntime; pip install 'mae-deploy[gpu]') or use --device cpu"
        )
    if missing_libraries is None:
        missing_libraries = unloadable_libraries(cuda_libraries(_ort_cuda_major()))
    if missing_libraries:
        why = (
            f"these libraries cannot be loaded: {', '.join(missing_libraries)}; install them (e.g. pip install "
            "the matching nvidia-*-cu13 / -cu12 packages) or put their folders on LD_LIBRARY_PATH (the "
            "nvidia/*/lib folders of a CUDA torch's environment hold them)"
        )
    else:
        why = "the CUDA/cuDNN or TensorRT libraries could not be loaded; ONNX Runtime's log says which"
    raise DeviceUnavailable(
        f"--device {device} asked for {requested}, but ONNX Runtime fell back to {have} ({why}); fix the GPU "
        "install or use --device cpu"
    )


class OrtRunner(BaseRunner):
    """Run a bundle's encoder/decoder graphs with ONNX Runtime.

    ``precision`` picks the graph variant (fp32, fp16, int8); the decoder uses fp32 when the bundle has
    no decoder at that precision (``info.details['graphs']`` says which files run). ``threads`` (what
    ``create_runner`` passes) is ONNX Runtime's intra-op thread count; ``intra_op_threads`` is the same
    option under ONNX Runtime's own name, and ``inter_op_threads`` the inter-op count (None: ONNX Runtime's
    defaults, all physical cores). ``io_binding`` (default: on for GPU devices) binds outputs to device
    memory and copies them back once per call.

    On ``tensorrt``: one optimization profile (batch 1..``trt_max_batch``, visible 1..L) per part, built by
    the trt package's one definition of it; bigger batches run in chunks of ``trt_max_batch``; engines
    are cached in one folder per profile under ``trt_cache_dir``. fp16 runs the fp32 graph with
    ``trt_fp16_enable`` on TensorRT 10 and the bundle's fp16 graph on TensorRT 11+, where that flag has
    no effect (``trt_generation``: the TensorRT major ONNX Runtime uses; default: detected).
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        precision: str = "fp32",
        *,
        threads: int | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: str = "all",
        io_binding: bool | None = None,
        trt_max_batch: int = 64,
        trt_opt_batch: int | None = None,
        trt_opt_visible: int | None = None,
        trt_cache_dir: str | os.PathLike | None = None,
        trt_generation: int | None = None,
        log_level: int = 3,
    ) -> None:
        self.ort = import_onnxruntime(device)
        self.bundle = bundle
        self.device = device
        self.kind, self.device_id = parse_device(device)
        self.precision = precision
        if graph_optimization not in _OPT_LEVELS:
            raise InputError(f"graph_optimization must be one of {list(_OPT_LEVELS)}, got {graph_optimization!r}")
        threads = check_threads(threads)
        intra = check_threads(intra_op_threads, "intra_op_threads")
        if threads is not None and intra is not None and threads != intra:
            raise InputError(f"threads={threads} and intra_op_threads={intra} disagree; give one of them")
        self.intra_op_threads = intra if intra is not None else threads
        self.inter_op_threads = check_threads(inter_op_threads, "inter_op_threads")
        self.graph_optimization = graph_optimization
        self.io_binding = (self.kind != "cpu") if io_binding is None else io_binding
        self.log_level = log_level

        self._primary = _PROVIDER[self.kind]
        check_providers(device, self._primary, list(self.ort.get_available_providers()), session=False)
        self.trt: OrtTrtSetup | None = None
        self._specs: dict[str, GraphSpec | None]
        if self.kind == "tensorrt":
            from mae_deploy.runners.trt.ort_ep import OrtTrtSetup

            self.trt = OrtTrtSetup.for_bundle(
                bundle,
                precision,
                max_batch=trt_max_batch,
                opt_batch=trt_opt_batch,
                opt_visible=trt_opt_visible,
                cache_root=trt_cache_dir,
                generation=trt_generation,
            )
            self._specs = dict(self.trt.specs)
        else:
            # Resolve graph files now so a missing precision fails before any work.
            self._specs = {ENCODER: bundle.graph(ENCODER, precision)}
            dec = bundle.precisions(DECODER)
            self._specs[DECODER] = bundle.graph(DECODER, precision if precision in dec else "fp32") if dec else None
            if precision in bundle.precisions(CLASSIFIER):  # absent: classify() says what the bundle has
                self._specs[CLASSIFIER] = bundle.graph(CLASSIFIER, precision)
        self._sessions: dict[str, Any] = {}  # part -> onnxruntime.InferenceSession
        self._lock = threading.Lock()

    # -- sessions -------------------------------------------------------------------------------
    def _providers(self, part: str) -> list:
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
        if self.kind == "cpu":
            return ["CPUExecutionProvider"]
        if self.kind == "cuda":
            return [cuda, "CPUExecutionProvider"]
        assert self.trt is not None  # made for the tensorrt device
        return [
            ("TensorrtExecutionProvider", self.trt.provider_options(part, self.device_id)),
            cuda,
            "CPUExecutionProvider",
        ]

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
            self._missing_part(part)
        with self._lock:
            if part not in self._sessions:
                self._sessions[part] = self._create_session(part, self.bundle.path / spec.file)
        return self._sessions[part]

    def _create_session(self, part: str, path):
        if self.kind != "cpu" and hasattr(self.ort, "preload_dlls"):
            try:  # CUDA / cuDNN from the nvidia-* pip packages (e.g. a CUDA torch's), without LD_LIBRARY_PATH
                self.ort.preload_dlls()
            except Exception:  # a best effort: the provider check below says what is missing
                pass
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
        outputs = [o.name for o in sess.get_outputs()]
        if sorted(names) != sorted(_INPUTS[part]) or _OUTPUT[part] not in outputs:
            raise BundleError(
                f"{path} has inputs {list(names)} and outputs {outputs}; "
                f"a bundle {part} needs inputs {list(_INPUTS[part])} and output '{_OUTPUT[part]}'"
            )
        return sess

    def _load(self, part: str) -> None:
        self.session(part)

    # -- running --------------------------------------------------------------------------------
    def _run_once(self, part: str, feeds: dict[str, np.ndarray], out: str | None = None) -> np.ndarray:
        """One session run of numpy feeds -> the output ``out`` (default: the part's main output) as numpy."""
        sess = self.session(part)
        out = out or _OUTPUT[part]
        if not self.io_binding:
            return np.asarray(sess.run([out], feeds)[0], dtype=np.float32)
        binding = sess.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        where = "cpu" if self.kind == "cpu" else "cuda"
        binding.bind_output(out, where, self.device_id if where == "cuda" else 0)
        sess.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)

    def _run(self, part: str, feeds: dict[str, np.ndarray], out: str | None = None) -> np.ndarray:
        if self.trt is None:
            return self._run_once(part, feeds, out)
        # TensorRT's profile ends at its max batch: split bigger batches like the trt backend does.
        return run_in_chunks(lambda f: self._run_once(part, f, out), feeds, self.trt.profile.max_batch)

    def pooled_output(self, pool: str) -> str | None:
        """The encoder graph's output for ``pool`` (cls / mean), or None when this bundle's graph lacks it."""
        spec = self._specs.get(ENCODER)
        name = POOLED_OUTPUTS.get(pool)
        return name if spec is not None and name in spec.output_names else None

    def _encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        return self._run(ENCODER, {"pixel_values": pixel_values, "ids_keep": ids_keep})

    def _encode_pooled(self, pixel_values: np.ndarray, ids_keep: np.ndarray, pool: str) -> np.ndarray:
        name = self.pooled_output(pool)
        if name is None:  # a bundle exported before pooled outputs: pool the latent here
            return super()._encode_pooled(pixel_values, ids_keep, pool)
        return self._run(ENCODER, {"pixel_values": pixel_values, "ids_keep": ids_keep}, name)

    def _encode_device(self, pixels: DeviceArray, ids_keep: np.ndarray, pool: str | None):
        """Bind the caller's tensor by address and write the result into a tensor on the same device."""
        kind = "cpu" if pixels.device_type == DL_CPU else "cuda"
        same_place = (kind == self.kind == "cpu") or (
            kind == "cuda" == self.kind and pixels.on_gpu and pixels.device_id == self.device_id
        )
        out = _OUTPUT[ENCODER] if pool is None else self.pooled_output(pool)
        if not same_place or out is None or self.trt is not None:
            return super()._encode_device(pixels, ids_keep, pool)
        n, k, d = pixels.shape[0], ids_keep.shape[1], self.bundle.embed_dim
        shape = (n, k + 1, d) if pool is None else (n, d)
        result = pixels.empty(shape)
        if result is None:  # a DLPack producer we cannot allocate with: go through the host
            return super()._encode_device(pixels, ids_keep, pool)
        sess = self.session(ENCODER)
        binding = sess.io_binding()
        pixels.synchronize()  # ONNX Runtime reads the memory on its own stream
        binding.bind_input("pixel_values", kind, self.device_id, np.float32, list(pixels.shape), pixels.data_ptr())
        binding.bind_cpu_input("ids_keep", ids_keep)
        target = DeviceArray(result, pixels.library, pixels.device_type, pixels.device_id)
        binding.bind_output(out, kind, self.device_id, np.float32, list(shape), target.data_ptr())
        sess.run_with_iobinding(binding)  # returns after the device work is done (ORT synchronises its stream)
        return result

    def _decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        return self._run(DECODER, {"latent": latent, "ids_restore": ids_restore})

    def classify(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values float32 [N,C,H,W] -> logits float32 [N,num_classes] with the bundle's classifier graph."""
        b = self.bundle
        if self.trt is not None:
            raise InputError(
                "the classifier runs on --device cpu or cuda with ONNX Runtime; its TensorRT "
                "provider profile covers the encoder and decoder only"
            )
        if self._specs.get(CLASSIFIER) is None:
            b.classifier_graph(self.precision)  # raises: no classifier, or none at this precision
        return self._run(CLASSIFIER, {"pixel_values": check_pixel_values(pixel_values, b.in_chans, b.image_size)})

    @property
    def info(self) -> RunnerInfo:
        """Backend, device and the providers the created sessions really use (none before the first run)."""
        providers: list[str] = []
        for sess in self._sessions.values():
            providers += [p for p in sess.get_providers() if p not in providers]
        details = {
            "onnxruntime": self.ort.__version__,
            "requested_provider": self._primary,
            "graphs": {part: spec.file for part, spec in self._specs.items() if spec is not None},
            "sessions": sorted(self._sessions),
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "graph_optimization": self.graph_optimization,
            "io_binding": self.io_binding,
        }
        if self.trt is not None:
            details["tensorrt"] = self.trt.describe()
        return RunnerInfo(
            backend="ort", device=self.device, precision=self.precision, providers=tuple(providers), details=details
        )

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
