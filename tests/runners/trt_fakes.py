"""Fakes of tensorrt and cuda-python's runtime for the CPU tests of the trt backend, and their bundles.

The fixtures that install them and export their bundles (``installed_trt_fakes``, ``trt_bundle_dir``,
``trt_bundle``, ``trt_fp32_only_bundle``) are in tests/runners/conftest.py; test modules import the classes from here.

``FakeTrt`` / ``FakeCudart`` are small stand-ins that record every call and simulate the documented
contracts on the host (device memory is a bytearray; the current device is per thread, as in CUDA; an
"engine" runs its ONNX file with ONNX Runtime on the CPU, reading and writing that memory). They check what
our code asks of TensorRT and CUDA, not TensorRT itself: tests/gpu/ does that where a GPU exists.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import threading
import types
from pathlib import Path

import numpy as np

from mae_deploy.bundle import Bundle
from mae_deploy.runners import trt as T

DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 BF16 INT64 FP8 INT4 FP4")
LayerType = enum.Enum("LayerType", "NORMALIZATION SOFTMAX MATRIX_MULTIPLY CONVOLUTION OTHER")
TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
_ONNX_ELEM = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL}
_LAYER_OF_OP = {
    "LayerNormalization": LayerType.NORMALIZATION,
    "Softmax": LayerType.SOFTMAX,
    "MatMul": LayerType.MATRIX_MULTIPLY,
    "Conv": LayerType.CONVOLUTION,
}
ENGINE_MAGIC = b"FAKE-TRT-ENGINE\n"


class FakeCudart(types.ModuleType):
    """cuda-python's runtime API over host memory: every call returns (err, *values) like the real one."""

    cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidValue": 1})
    cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})

    class Stream:
        def __init__(self, handle: int) -> None:
            self.handle = handle

        def __int__(self) -> int:
            return self.handle

    def __init__(self, devices: int = 1) -> None:
        super().__init__("cuda.bindings.runtime")
        self.devices = devices
        self.memory: dict[int, bytearray] = {}
        self.next_ptr = 0x10000
        self.calls: list[tuple] = []
        self.streams: set[int] = set()
        self._thread = threading.local()  # CUDA's current device is per host thread

    @property
    def current_device(self):
        return getattr(self._thread, "device", None)

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def cudaGetDeviceCount(self):
        return self._ok(self.devices)

    def cudaSetDevice(self, i):
        self._thread.device = i
        self.calls.append(("cudaSetDevice", i, threading.get_ident()))
        return self._ok()

    def cudaGetDeviceProperties(self, i):
        return self._ok(types.SimpleNamespace(name=b"Fake GPU 80GB\x00\x00\x00", major=9, minor=0))

    def cudaMalloc(self, n):
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + n + 256
        self.memory[ptr] = bytearray(n)
        self.calls.append(("cudaMalloc", n, self.current_device))
        return self._ok(ptr)

    def cudaFree(self, ptr):
        self.memory.pop(int(ptr))
        return self._ok()

    def cudaStreamCreate(self):
        s = self.Stream(0x5000 + len(self.streams) + 1)
        self.streams.add(s.handle)
        return self._ok(s)

    def cudaStreamSynchronize(self, s):
        assert int(s) in self.streams
        return self._ok()

    def cudaStreamDestroy(self, s):
        self.streams.remove(int(s))
        return self._ok()

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert int(stream) in self.streams
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            buf = self.memory[int(dst)]
            assert n <= len(buf), f"host-to-device copy of {n} bytes overflows a {len(buf)}-byte buffer"
            buf[:n] = ctypes.string_at(int(src), n)
        else:
            buf = self.memory[int(src)]
            assert n <= len(buf), f"device-to-host copy of {n} bytes reads past a {len(buf)}-byte buffer"
            ctypes.memmove(int(dst), bytes(buf[:n]), n)
        self.calls.append(("cudaMemcpyAsync", int(kind), n))
        return self._ok()


class FakeTrt(types.ModuleType):
    """The parts of the tensorrt module this project uses, per API generation (10 keeps the weak-typing
    builder flags, 11 has none of them). Records builder/config/profile calls in ``self.log``."""

    def __init__(self, version: str = "10.13.1", cudart: FakeCudart | None = None, build_fails: bool = False):
        super().__init__("tensorrt")
        self.__version__ = version
        gen = 10 if version.startswith("10.") else 11
        self.cudart = cudart
        self.build_fails = build_fails
        self.log: list[tuple] = []
        self.build_devices: list = []  # the calling thread's CUDA device at each build
        self.DataType, self.LayerType, self.TensorIOMode = DataType, LayerType, TensorIOMode
        self.float32, self.float16 = DataType.FLOAT, DataType.HALF
        flags = ["TF32", "DEBUG", "REFIT"] + (
            ["FP16", "BF16", "INT8", "PREFER_PRECISION_CONSTRAINTS", "OBEY_PRECISION_CONSTRAINTS"] if gen == 10 else []
        )
        self.BuilderFlag = enum.Enum("BuilderFlag", flags)
        self.NetworkDefinitionCreationFlag = enum.Enum(
            "NetworkDefinitionCreationFlag", ["EXPLICIT_BATCH", "STRONGLY_TYPED"] if gen == 10 else ["STRONGLY_TYPED"]
        )
        self.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM")
        fake = self

        class Logger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

            def __init__(self, severity=2):
                self.severity = severity

        class IProgressMonitor:
            def __init__(self):
                fake.log.append(("IProgressMonitor.__init__",))

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags=0):
                fake.log.append(("create_network", flags))
                return FakeNetwork()

            def create_builder_config(self):
                return FakeConfig(fake)

            def create_optimization_profile(self):
                return FakeProfile(fake)

            def build_serialized_network(self, network, config):
                fake.log.append(("build_serialized_network",))
                if fake.cudart is not None:
                    fake.build_devices.append(fake.cudart.current_device)
                mon = getattr(config, "progress_monitor", None)
                if mon is not None:
                    mon.phase_start("Building engine", None, 3)
                    mon.phase_start("Tactic selection", "Building engine", 2)
                    for step in range(2):
                        mon.step_complete("Tactic selection", step)
                    mon.phase_finish("Tactic selection")
                    for step in range(3):
                        mon.step_complete("Building engine", step)
                    mon.phase_finish("Building engine")
                if fake.build_fails:
                    return None
                shapes = {n: [list(map(int, s)) for s in v] for n, v in config.profiles[0].shapes.items()}
                meta = {"onnx": network.path, "shapes": shapes, "flags": sorted(f.name for f in config.flags)}
                return ENGINE_MAGIC + json.dumps(meta).encode()

        self.Logger, self.IProgressMonitor, self.Builder = Logger, IProgressMonitor, Builder
        self.OnnxParser = FakeParser
        self.Runtime = lambda logger: FakeRuntime(fake)


class FakeLayer:
    def __init__(self, name: str, type_: LayerType) -> None:
        self.name, self.type, self.precision, self.num_outputs = name, type_, None, 1
        self.output_types: dict[int, DataType] = {}

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class FakeNetwork:
    def __init__(self) -> None:
        self.path, self.inputs, self.layers = None, [], []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


class FakeParser:
    """Reads the real ONNX file's inputs and nodes (without weights) into the fake network."""

    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        import onnx

        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as e:
            self.errors.append(f"cannot parse: {type(e).__name__}")
            return False
        self.network.path = str(path)
        self.network.inputs = [types.SimpleNamespace(name=i.name) for i in model.graph.input]
        self.network.layers = [
            FakeLayer(n.name or f"{n.op_type}_{k}", _LAYER_OF_OP.get(n.op_type, LayerType.OTHER))
            for k, n in enumerate(model.graph.node)
        ]
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class FakeTimingCache:
    def __init__(self, blob: bytes) -> None:
        self.blob = bytes(blob)

    def serialize(self) -> bytes:
        return self.blob + b"+timings"


class FakeConfig:
    def __init__(self, fake: FakeTrt) -> None:
        self.fake = fake
        self.flags = {fake.BuilderFlag.TF32}  # TensorRT enables TF32 by default
        self.pools: dict = {}
        self.profiles: list[FakeProfile] = []
        self.timing_cache = None
        self.progress_monitor = None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        self.fake.log.append(("create_timing_cache", bytes(blob)))
        if bytes(blob) == b"corrupt":
            raise RuntimeError("timing cache blob cannot be deserialized")
        return FakeTimingCache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.blob == b"incompatible":
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self):
        return self.timing_cache


class FakeProfile:
    def __init__(self, fake: FakeTrt) -> None:
        self.fake, self.shapes = fake, {}

    def set_shape(self, name, lo, opt, hi):
        # TensorRT's documented conditions: equal ranks, 1 <= min <= opt <= max.
        assert len(lo) == len(opt) == len(hi)
        assert all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), (name, lo, opt, hi)
        self.fake.log.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeRuntime:
    def __init__(self, fake: FakeTrt) -> None:
        self.fake = fake

    def deserialize_cuda_engine(self, blob):
        if not bytes(blob).startswith(ENGINE_MAGIC):
            return None
        return FakeEngine(self.fake, json.loads(bytes(blob)[len(ENGINE_MAGIC) :]))


class FakeEngine:
    """Runs the engine's ONNX file with ONNX Runtime, on inputs read from fake device memory."""

    def __init__(self, fake: FakeTrt, meta: dict) -> None:
        import onnxruntime as ort

        self.fake, self.meta = fake, meta
        self.session = ort.InferenceSession(meta["onnx"], providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        kinds = {"tensor(float)": DataType.FLOAT, "tensor(int64)": DataType.INT64, "tensor(float16)": DataType.HALF}
        self.dtypes = {v.name: kinds[v.type] for v in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self.profile = {n: [tuple(s) for s in v] for n, v in meta["shapes"].items()}

    @property
    def num_io_tensors(self):
        return len(self.input_names) + len(self.output_names)

    def get_tensor_name(self, i):
        return (self.input_names + self.output_names)[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.input_names else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0
        return self.profile[name]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self.log: list[tuple] = []

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        shape = tuple(int(d) for d in shape)
        self.log.append(("set_input_shape", name, shape))
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = shape
        return True

    def _feeds_from(self, read) -> dict:
        out = {}
        for n in self.engine.input_names:
            dt = T.numpy_dtype(self.engine.dtypes[n])
            out[n] = read(n, dt)
        return out

    def get_tensor_shape(self, name):
        if name in self.engine.input_names:
            return self.shapes.get(name, (-1,))
        # Output shapes follow from the input shapes: ask ONNX Runtime with zero-filled inputs.
        zeros = self._feeds_from(lambda n, dt: np.zeros(self.shapes[n], dt))
        return self.engine.session.run([name], zeros)[0].shape

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        mem = self.engine.fake.cudart.memory

        def read(n, dt):
            nbytes = int(np.prod(self.shapes[n])) * dt.itemsize
            buf = mem[self.addresses[n]]
            assert nbytes <= len(buf), f"{n}: {nbytes} bytes read from a {len(buf)}-byte buffer"
            return np.frombuffer(bytes(buf[:nbytes]), dt).reshape(self.shapes[n])

        feeds = self._feeds_from(read)
        self.log.append(("execute", {n: v.shape for n, v in feeds.items()}))
        for name, value in zip(self.engine.output_names, self.engine.session.run(None, feeds), strict=True):
            raw = np.ascontiguousarray(value).tobytes()
            buf = mem[self.addresses[name]]
            assert len(raw) <= len(buf), f"{name}: {len(raw)} bytes written into a {len(buf)}-byte buffer"
            buf[: len(raw)] = raw
        return True


def install(monkeypatch, trt, cudart) -> None:
    """Install ``trt`` and ``cudart`` as ``tensorrt`` and ``cuda.bindings.runtime`` for one test."""
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)


# --------------------------------------------------------------------------------------------------
# Bundles: the tiny test model exported by the real exporter, with an fp16 variant
# --------------------------------------------------------------------------------------------------


def export_trt_bundle(out: Path) -> Path:
    """mae_vit_test (random init) with fp32 and fp16 graphs, exported to ``out``."""
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model("mae_vit_test").eval()
    export_bundle(model, out, precisions=("fp32", "fp16"), verify=False, progress=None)
    return out


def fp32_only_copy(bundle_dir: Path, dst: Path) -> Bundle:
    """A copy of ``bundle_dir`` without its fp16 graphs."""
    import shutil

    from mae_deploy.bundle import MANIFEST_NAME, write_manifest

    shutil.copytree(bundle_dir, dst)
    m = json.loads((dst / MANIFEST_NAME).read_text())
    for g in [g for g in m["graphs"] if g["precision"] != "fp32"]:
        (dst / g["file"]).unlink()
    m["graphs"] = [g for g in m["graphs"] if g["precision"] == "fp32"]
    write_manifest(dst, m)
    return Bundle.load(dst)


VITB = dict(num_patches=196, image_size=224, in_chans=3, embed_dim=768)
