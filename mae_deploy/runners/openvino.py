"""OpenVINO backend (CPU): the bundle's ONNX files read as they are, no second export format.

``openvino.Core().read_model`` takes the ``.onnx`` path directly (external weight data resolves beside it);
``batch`` and ``visible`` stay dynamic, so one compiled encoder serves feature extraction (visible = L) and
reconstruction (visible = L/4). torch-free; ``openvino`` is imported when a runner is made (extra
``mae-deploy[openvino]``).

Precisions:

- ``fp32``: the fp32 graph with ``INFERENCE_PRECISION_HINT=f32``. Said explicitly, because on CPUs with
  bf16 support OpenVINO's default inference precision is bf16, which would make "fp32" silently inexact.
- ``bf16``: the fp32 graph with ``INFERENCE_PRECISION_HINT=bf16``. Refused (DeviceUnavailable, exit 7)
  where the CPU's ``OPTIMIZATION_CAPABILITIES`` lack ``BF16``: OpenVINO would otherwise quietly run fp32.
- ``int8``: the bundle's statically calibrated Q/DQ graph, which OpenVINO runs with int8 kernels: the NNCF
  one (``int8-nncf``: OpenVINO's own quantiser, attention's q @ k^T in int8 too) where the bundle has it,
  else ``int8-qdq``. ``int8-nncf`` / ``int8-qdq`` name one of them exactly (benchmarks compare the two).
  The bundle's plain ``int8`` graphs are ONNX Runtime dynamic quantisation (MatMulInteger), not what
  OpenVINO is fast at, so they are not used here. What the Q/DQ nodes leave float (LayerNorm, softmax,
  GELU, softmax @ v, the position embeddings) runs in bf16 where the CPU has bf16 kernels, as OpenVINO does
  by default, and f32 elsewhere: on the ViT-B/16 encoder (AMX CPU, batch 8) that made int8 1.1x faster at
  the same pooled cosine to fp32 (benchmarks/RESULTS.md, issue #25). On a CPU without VNNI (AVX2 only)
  oneDNN has no fast int8 GEMM: OpenVINO's int8 ran slower than its fp32 there and lost accuracy (0.90x,
  pooled cosine 0.9976, AVX2 emulated by a cpuid mask), and ONNX Runtime's dynamic int8 (``--backend ort
  --precision int8``, 1.6x eager fp32 there) is the int8 to use; the runner says so in a RuntimeWarning
  where cpuid shows AVX2 and none of AVX-512, VNNI, AMX.

Options: ``threads`` -> ``INFERENCE_NUM_THREADS``; ``hint`` "latency" | "throughput" -> ``PERFORMANCE_HINT``;
``num_streams`` -> ``NUM_STREAMS``. Each part has one infer request, used under a lock, so a runner can be
shared by threads (calls on a part are serialised).

``compile=True`` (``--compile``) also compiles the graph for each input shape (batch, visible) it meets, with
static dimensions, and runs that shape there; the ``STATIC_SHAPES_KEPT`` most recent are kept (LRU), others
run on the dynamic model. OpenVINO's CPU kernels for static shapes are faster: ViT-B/16 int8, batch 8, AMX,
170 -> 157 ms (the attention subgraph 43 -> 34 ms). The first call of a shape pays the compile (about a
second for ViT-B/16); it suits extraction and benchmarks (one batch size), less a server whose batches take
many sizes.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np

from mae_deploy.bundle import Bundle, GraphSpec
from mae_deploy.cpuid import visible_flags
from mae_deploy.errors import BundleError, DeviceUnavailable, InputError, MissingDependency
from mae_deploy.names import CALIBRATED_PRECISIONS, DECODER, ENCODER, INT8_NNCF, INT8_QDQ, OPENVINO_PRECISIONS
from mae_deploy.runners.base import PART_INPUTS as _INPUTS
from mae_deploy.runners.base import PART_OUTPUT as _OUTPUT
from mae_deploy.runners.base import BaseRunner, RunnerInfo, check_threads

PRECISIONS = OPENVINO_PRECISIONS
GRAPH_NAMED = CALIBRATED_PRECISIONS  # int8 with the graph named: benchmarks compare the two
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
INT8_PRECISIONS = ("int8", *CALIBRATED_PRECISIONS)
STATIC_SHAPES_KEPT = 8  # compile=True: per-shape compiled models kept (each holds its own weights)
# Any of these and oneDNN has int8 GEMMs faster than its fp32 ones (AVX-512 without VNNI: not measured).
BEYOND_AVX2 = frozenset({"avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})


def import_openvino():
    """``import openvino`` with the one-line MissingDependency naming the extra."""
    try:
        import openvino
    except ImportError as e:
        raise MissingDependency("openvino", "the openvino backend", "pip install 'mae-deploy[openvino]'") from e
    return openvino


def cpu_supports_bf16(core) -> bool:
    """Whether OpenVINO's CPU plugin has bf16 kernels on this CPU (AVX512_BF16 or AMX)."""
    return "BF16" in [str(c).upper() for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def int8_slower_than_fp32() -> bool:
    """Whether cpuid shows this process AVX2 and nothing of ``BEYOND_AVX2``: OpenVINO int8 loses there."""
    shown = visible_flags()
    return shown is not None and "avx2" in shown and not shown & BEYOND_AVX2


def graph_precision(bundle: Bundle, part: str, precision: str) -> str | None:
    """Which of the bundle's graph variants OpenVINO runs for ``part`` (None: the bundle has no such part).

    fp32 and bf16 run the fp32 graph (bf16 is an inference hint, not a file). int8 runs a Q/DQ variant, the
    NNCF one first; a decoder without one runs fp32, as ORT does when the bundle lacks a decoder at the asked
    precision.
    """
    have = bundle.precisions(part)
    if not have:
        return None
    if precision in ("fp32", "bf16"):
        return "fp32"
    wanted = (INT8_NNCF, INT8_QDQ) if precision == "int8" else (precision,)
    found = next((p for p in wanted if p in have), None)
    if found is not None:
        return found
    if part == DECODER:
        return "fp32"
    raise InputError(
        f"--backend openvino --precision {precision} runs a statically quantised Q/DQ graph, and bundle "
        f"{bundle.path} has no {part} graph at {wanted[-1]} (it has: {', '.join(have)}; its int8 is ONNX Runtime "
        f"dynamic quantisation, which OpenVINO does not speed up). Export one with `mae-deploy export CHECKPOINT "
        f"--out DIR --precision {wanted[-1]} --calibration IMAGES`"
        + (f" (or {INT8_NNCF}: NNCF's Q/DQ graph)" if precision == "int8" else "")
        + ", or use --backend ort --precision int8"
    )


def inference_precision(precision: str, bf16_cpu: bool) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for ``precision``: what runs the ops that are not int8."""
    if precision == "bf16" or (precision in INT8_PRECISIONS and bf16_cpu):
        return "bf16"
    return "f32"


def compile_config(
    precision: str, threads: int | None, hint: str, num_streams: int | None, bf16_cpu: bool = False
) -> dict[str, str]:
    """The CPU plugin's properties for our options (values as strings, as OpenVINO's config takes them)."""
    config = {"PERFORMANCE_HINT": HINTS[hint], "INFERENCE_PRECISION_HINT": inference_precision(precision, bf16_cpu)}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    if num_streams is not None:
        config["NUM_STREAMS"] = str(num_streams)
    return config


def _property_text(value) -> str:
    """'f32' for an element type (not "<Type: 'float32'>"), 'LATENCY' for a hint, '2' for a count."""
    type_name = getattr(value, "get_type_name", None)
    if callable(type_name):
        return str(type_name())
    return str(getattr(value, "name", value))


class OpenVinoRunner(BaseRunner):
    """Run a bundle's encoder/decoder ONNX graphs with OpenVINO on the CPU (see the module docstring)."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        precision: str = "fp32",
        *,
        threads: int | None = None,
        hint: str = "latency",
        num_streams: int | None = None,
        compile: bool = False,
    ) -> None:
        if device.lower() != "cpu":
            raise InputError(f"the openvino backend runs on cpu, not {device!r}")
        if precision not in (*PRECISIONS, *GRAPH_NAMED):
            raise InputError(
                f"the openvino backend runs {', '.join(PRECISIONS)}, not {precision!r} (int8 can also "
                f"name its graph: {', '.join(GRAPH_NAMED)})"
            )
        if hint not in HINTS:
            raise InputError(f"hint must be one of {list(HINTS)}, got {hint!r}")
        self.threads = check_threads(threads)
        self.num_streams = check_threads(num_streams, "num_streams")
        self.bundle, self.device, self.precision, self.hint = bundle, "cpu", precision, hint
        # Resolve the graph files before loading OpenVINO, so a bundle without a Q/DQ graph fails fast.
        variants = {part: graph_precision(bundle, part, precision) for part in (ENCODER, DECODER)}
        self._specs: dict[str, GraphSpec | None] = {
            part: bundle.graph(part, v) if v else None for part, v in variants.items()
        }
        self.ov = import_openvino()
        self.core = self.ov.Core()
        if precision == "bf16" and not cpu_supports_bf16(self.core):
            caps = ", ".join(self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            raise DeviceUnavailable(
                f"--precision bf16 on openvino needs a CPU with bf16 instructions (AVX512_BF16 or AMX), and this "
                f"one offers {caps}; use --precision fp32 (or int8 with a Q/DQ graph) here"
            )
        if precision in INT8_PRECISIONS and int8_slower_than_fp32():
            warnings.warn(
                "openvino int8 on this CPU (AVX2 without VNNI or AMX) runs slower than openvino fp32 and less "
                "accurately: use --backend ort --precision int8 (ONNX Runtime's AVX2 int8 kernels) or "
                "--precision fp32 here",
                RuntimeWarning,
                stacklevel=2,
            )
        bf16_cpu = precision in INT8_PRECISIONS and cpu_supports_bf16(self.core)
        self.config = compile_config(precision, self.threads, hint, self.num_streams, bf16_cpu)
        self.compile = bool(compile)
        self._models: dict[str, Any] = {}  # part -> the openvino.Model read from its graph
        self._compiled: dict[str, Any] = {}  # part -> openvino.CompiledModel
        self._requests: dict[str, Any] = {}  # part -> its openvino.InferRequest
        # compile=True: (part, input shapes) -> infer request of a model compiled for those shapes, LRU order
        self._static: OrderedDict[tuple, Any] = OrderedDict()
        self._locks = {ENCODER: threading.Lock(), DECODER: threading.Lock()}

    # -- compiling --------------------------------------------------------------------------------
    def _read(self, part: str):
        """The part's openvino.Model, read once and checked for the bundle's input and output names."""
        if part in self._models:
            return self._models[part]
        spec = self._specs[part]
        assert spec is not None  # request() compiles only the parts this runner has
        path = self.bundle.path / spec.file
        try:
            model = self.core.read_model(str(path))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with the frontend's message
            raise BundleError(f"OpenVINO cannot read {path}: {e}") from e
        inputs = sorted(n for i in model.inputs for n in i.get_names())
        outputs = [n for o in model.outputs for n in o.get_names()]
        if not set(_INPUTS[part]) <= set(inputs) or _OUTPUT[part] not in outputs:
            raise BundleError(
                f"{path} has inputs {inputs} and outputs {outputs}; a bundle {part} needs inputs "
                f"{list(_INPUTS[part])} and output '{_OUTPUT[part]}'"
            )
        self._models[part] = model
        return model

    def _compile(self, part: str, shapes: dict[str, tuple[int, ...]] | None = None):
        """Compile the part's graph: dynamic, or with ``shapes`` (input name -> shape) fixed."""
        model = self._read(part)
        if shapes is not None:
            model = model.clone()
            model.reshape(shapes)
        try:
            return self.core.compile_model(model, "CPU", self.config)
        except Exception as e:
            spec = self._specs[part]
            path = self.bundle.path / spec.file if spec else part
            raise BundleError(f"OpenVINO cannot compile {path} for the CPU: {e}") from e

    def _static_request(self, part: str, feeds: dict[str, np.ndarray]):
        """compile=True: the infer request compiled for these inputs' shapes (called under the part's lock)."""
        key = (part, *((name, a.shape) for name, a in sorted(feeds.items())))
        request = self._static.get(key)
        if request is None:
            request = self._compile(part, {name: tuple(a.shape) for name, a in feeds.items()}).create_infer_request()
            self._static[key] = request
            while len(self._static) > STATIC_SHAPES_KEPT:
                self._static.popitem(last=False)
        self._static.move_to_end(key)
        return request

    def request(self, part: str):
        """The part's infer request on the dynamic model, compiled on first use."""
        if not self.has_part(part):
            self._missing_part(part)
        with self._locks[part]:
            return self._dynamic_request(part)

    def _dynamic_request(self, part: str):
        """The dynamic model's infer request (called under the part's lock)."""
        if part not in self._requests:
            compiled = self._compile(part)
            self._compiled[part] = compiled
            self._requests[part] = compiled.create_infer_request()
        return self._requests[part]

    def _load(self, part: str) -> None:
        if not self.compile:
            self.request(part)
            return
        if not self.has_part(part):
            self._missing_part(part)
        with self._locks[part]:  # compile=True compiles per shape at the first call: read and check the graph now
            self._read(part)

    # -- running ----------------------------------------------------------------------------------
    def _run(self, part: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if not self.has_part(part):
            self._missing_part(part)
        with self._locks[part]:  # one request per part and shape: calls are serialised
            # compile=True never builds the dynamic model: each shape has its own (a second copy of the weights)
            req = self._static_request(part, feeds) if self.compile else self._dynamic_request(part)
            req.infer(feeds)
            # Copy out: the request's output tensor is overwritten by the next call.
            return np.array(req.get_tensor(_OUTPUT[part]).data, dtype=np.float32, copy=True)

    def _encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        return self._run(ENCODER, {"pixel_values": pixel_values, "ids_keep": ids_keep})

    def _decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        return self._run(DECODER, {"latent": latent, "ids_restore": ids_restore})

    @property
    def info(self) -> RunnerInfo:
        """What the compiled models really use (threads, precision, hint), read back from OpenVINO."""
        compiled = {}
        for part, cm in self._compiled.items():
            compiled[part] = {
                k: _property_text(cm.get_property(k))
                for k in ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS")
            }
        return RunnerInfo(
            backend="openvino",
            device=self.device,
            precision=self.precision,
            providers=("openvino:CPU",),
            details={
                "openvino": self.ov.get_version(),
                "cpu": str(self.core.get_property("CPU", "FULL_DEVICE_NAME")),
                "graphs": {p: s.file for p, s in self._specs.items() if s is not None},
                "sessions": sorted(self._requests),
                "threads": self.threads,
                "hint": self.hint,
                "config": dict(self.config),
                "compiled": compiled,
                "compile": self.compile,
                "static_shapes": [
                    {"part": key[0], **{name: list(shape) for name, shape in key[1:]}} for key in self._static
                ],
            },
        )

    def close(self) -> None:
        for part, lock in self._locks.items():
            with lock:
                self._requests.pop(part, None)
                self._compiled.pop(part, None)
                self._models.pop(part, None)
                for key in [k for k in self._static if k[0] == part]:
                    del self._static[key]
