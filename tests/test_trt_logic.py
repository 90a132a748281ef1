"""TensorRT backend logic that needs no GPU (mae_deploy/runners/trt.py, the build-engine command).

No machine of this project has TensorRT or a GPU. The pure logic (API generation, profiles, cache keys and
paths, dtype mapping, ONNX Runtime TensorRT-EP options) is tested directly. The builder configuration and
the runner's execute path are tested against ``FakeTrt`` / ``FakeCudart`` below: small stand-ins that
record every call and simulate the documented contracts on the host (device memory is a bytearray; an
"engine" runs its ONNX file with ONNX Runtime on the CPU, reading and writing that memory). They check
what this code asks of TensorRT and CUDA, not TensorRT itself: tests/gpu/ does that where a GPU exists.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mae_deploy.bundle import Bundle
from mae_deploy.cli import main
from mae_deploy.errors import BundleError, DeviceUnavailable, InputError, MissingDependency
from mae_deploy.masking import random_masking
from mae_deploy.runners import create_runner
from mae_deploy.runners import trt as T

# --------------------------------------------------------------------------------------------------
# Fakes: tensorrt and cuda-python's runtime, recording calls
# --------------------------------------------------------------------------------------------------

DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 BF16 INT64 FP8 INT4 FP4")
LayerType = enum.Enum("LayerType", "NORMALIZATION SOFTMAX MATRIX_MULTIPLY CONVOLUTION OTHER")
TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
_ONNX_ELEM = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL}
_LAYER_OF_OP = {"LayerNormalization": LayerType.NORMALIZATION, "Softmax": LayerType.SOFTMAX,
                "MatMul": LayerType.MATRIX_MULTIPLY, "Conv": LayerType.CONVOLUTION}
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
        self.current_device = None

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def cudaGetDeviceCount(self):
        return self._ok(self.devices)

    def cudaSetDevice(self, i):
        self.current_device = i
        return self._ok()

    def cudaGetDeviceProperties(self, i):
        return self._ok(types.SimpleNamespace(name=b"Fake GPU 80GB\x00\x00\x00", major=9, minor=0))

    def cudaMalloc(self, n):
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + n + 256
        self.memory[ptr] = bytearray(n)
        self.calls.append(("cudaMalloc", n))
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
        self.DataType, self.LayerType, self.TensorIOMode = DataType, LayerType, TensorIOMode
        self.float32, self.float16 = DataType.FLOAT, DataType.HALF
        flags = ["TF32", "DEBUG", "REFIT"] + (
            ["FP16", "BF16", "INT8", "PREFER_PRECISION_CONSTRAINTS", "OBEY_PRECISION_CONSTRAINTS"] if gen == 10 else [])
        self.BuilderFlag = enum.Enum("BuilderFlag", flags)
        self.NetworkDefinitionCreationFlag = enum.Enum(
            "NetworkDefinitionCreationFlag", ["EXPLICIT_BATCH", "STRONGLY_TYPED"] if gen == 10 else ["STRONGLY_TYPED"])
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
        self.network.layers = [FakeLayer(n.name or f"{n.op_type}_{k}", _LAYER_OF_OP.get(n.op_type, LayerType.OTHER))
                               for k, n in enumerate(model.graph.node)]
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
        return FakeEngine(self.fake, json.loads(bytes(blob)[len(ENGINE_MAGIC):]))


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


@pytest.fixture
def fakes(monkeypatch):
    """Install FakeTrt (10.x) and FakeCudart as ``tensorrt`` and ``cuda.bindings.runtime``."""
    cudart = FakeCudart()
    trt = FakeTrt("10.13.1", cudart)
    install(monkeypatch, trt, cudart)
    return trt, cudart


def install(monkeypatch, trt, cudart) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)


# --------------------------------------------------------------------------------------------------
# Bundles: the tiny test model exported by the real exporter, with an fp16 variant
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model("mae_vit_test").eval()
    out = tmp_path_factory.mktemp("trt") / "bundle"
    export_bundle(model, out, precisions=("fp32", "fp16"), verify=False, progress=None)
    return out


@pytest.fixture(scope="module")
def bundle(bundle_dir) -> Bundle:
    return Bundle.load(bundle_dir)


@pytest.fixture(scope="module")
def fp32_only_bundle(tmp_path_factory, bundle_dir) -> Bundle:
    import shutil

    from mae_deploy.bundle import MANIFEST_NAME, write_manifest

    dst = tmp_path_factory.mktemp("trt32") / "bundle"
    shutil.copytree(bundle_dir, dst)
    m = json.loads((dst / MANIFEST_NAME).read_text())
    for g in [g for g in m["graphs"] if g["precision"] != "fp32"]:
        (dst / g["file"]).unlink()
    m["graphs"] = [g for g in m["graphs"] if g["precision"] == "fp32"]
    write_manifest(dst, m)
    return Bundle.load(dst)


VITB = dict(num_patches=196, image_size=224, in_chans=3, embed_dim=768)

# --------------------------------------------------------------------------------------------------
# API generations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version,gen", [("10.3.0", 10), ("10.13.1", 10), ("11.0.0", 11), ("11.4.0.106", 11),
                                         ("12.1.0", 11)])
def test_api_generation(version, gen):
    assert T.trt_api_generation(version) == gen


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0.post12.dev1", "7", "garbage", ""])
def test_tensorrt_older_than_10_is_refused(version):
    with pytest.raises(T.UnsupportedTensorRT, match="needs TensorRT 10 or newer") as e:
        T.trt_api_generation(version)
    assert isinstance(e.value, MissingDependency) and e.value.exit_code == 6
    if version[:1].isdigit():
        assert f"TensorRT {version} is installed" in str(e.value)


def test_capability_table():
    ten, eleven = T.CAPABILITIES[10], T.CAPABILITIES[11]
    assert ten.precision_builder_flags and not eleven.precision_builder_flags
    assert eleven.always_strongly_typed and not ten.always_strongly_typed
    assert ten.strongly_typed_flag and not eleven.strongly_typed_flag
    assert not ten.explicit_batch_flag and not eleven.explicit_batch_flag
    assert (ten.fp16_source, eleven.fp16_source) == ("builder-flag", "onnx-variant")


# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------


def test_profile_vit_base_reconstruction_opt():
    p = T.derive_profile(196, 224, 3, 32, 8, "L/4", embed_dim=768)
    assert (p.opt_visible, p.min_visible, p.max_visible) == (49, 1, 196)
    assert p.shapes("encoder") == {
        "pixel_values": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)),
        "ids_keep": ((1, 1), (8, 49), (32, 196)),
    }
    assert p.shapes("decoder") == {
        "latent": ((1, 2, 768), (8, 50, 768), (32, 197, 768)),  # visible + cls
        "ids_restore": ((1, 196), (8, 196), (32, 196)),
    }
    assert "batch 1..32 (opt 8), visible tokens 1..196 (opt 49) of L=196" == p.describe()


def test_profile_defaults_and_narrowed_visible_range():
    p = T.derive_profile(196, 224, 3, embed_dim=768)
    assert (p.max_batch, p.opt_batch, p.opt_visible, p.max_visible) == (32, 8, 196, 196)
    small = T.derive_profile(196, 224, 3, max_batch=4, embed_dim=768)
    assert small.opt_batch == 4  # default opt batch never exceeds max
    recon = T.derive_profile(196, 224, 3, 64, 16, min_visible="L/4", max_visible="L/4", embed_dim=768)
    assert recon.shapes("encoder")["ids_keep"] == ((1, 49), (16, 49), (64, 49))
    assert recon.shapes("decoder")["latent"][2] == (64, 50, 768)


def test_profile_edge_case_single_patch_single_image():
    p = T.derive_profile(1, 8, 1, 1, embed_dim=4)
    assert p.shapes("encoder") == {"pixel_values": ((1, 1, 8, 8),) * 3, "ids_keep": ((1, 1),) * 3}
    assert p.shapes("decoder") == {"latent": ((1, 2, 4),) * 3, "ids_restore": ((1, 1),) * 3}


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_batch=0), "max_batch must be at least 1, got 0"),
    (dict(max_batch=8, opt_batch=9), r"opt_batch 9 must be in 1..max_batch \(8\)"),
    (dict(opt_batch=0), r"opt_batch 0 must be in 1..max_batch \(32\)"),
    (dict(opt_visible=197), r"visible-token count 197 must be in 1..196"),
    (dict(opt_visible=0), r"visible-token count 0 must be in 1..196"),
    (dict(min_visible=50, opt_visible=49), r"opt_visible 49 must be in min_visible..max_visible \(50..196\)"),
    (dict(min_visible=100, max_visible=99), "min_visible 100 is above max_visible 99"),
    (dict(opt_visible="L/0"), "divides by zero"),
    (dict(opt_visible="half"), r"'half' is not a number, 'L' or 'L/N' \(L = 196 patches\)"),
])
def test_bad_profiles_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        T.derive_profile(196, 224, 3, **kwargs, embed_dim=768)


def test_profile_rejects_nonsense_model_sizes():
    with pytest.raises(InputError, match="embed_dim must be positive, got 0"):
        T.derive_profile(196, 224, 3, embed_dim=0)
    with pytest.raises(InputError, match="unknown part 'head'"):
        T.derive_profile(196, 224, 3, embed_dim=768).shapes("head")


@pytest.mark.parametrize("spec,value", [("L", 196), ("L/4", 49), ("L / 2", 98), (7, 7), ("7", 7), ("L/1000", 1)])
def test_parse_visible(spec, value):
    assert T.parse_visible(spec, 196) == value


def test_profile_check_call_names_the_range():
    p = T.derive_profile(196, 224, 3, max_visible="L/4", embed_dim=768)
    p.check_call("encoder", 100, 49)  # batch above max is chunked by the runner, not refused
    with pytest.raises(InputError, match=r"built for 1..49 visible tokens, but this call has 196; rebuild"):
        p.check_call("encoder", 1, 196)


# --------------------------------------------------------------------------------------------------
# Cache keys and paths
# --------------------------------------------------------------------------------------------------


def test_engine_cache_key_is_stable_and_order_independent():
    p = T.derive_profile(196, 224, 3, embed_dim=768)
    base = ("ab" * 32, "10.13.1", "NVIDIA H100 (sm_90)", p, "fp16", {"tf32": False, "workspace_gb": 4.0})
    key = T.engine_cache_key(*base)
    assert len(key) == 64 and int(key, 16) >= 0
    assert T.engine_cache_key(*base) == key
    shuffled_profile = dict(reversed(list(p.as_dict().items())))
    assert T.engine_cache_key(base[0], base[1], base[2], shuffled_profile, "fp16",
                              {"workspace_gb": 4.0, "tf32": False}) == key
    variants = [
        ("cd" * 32, *base[1:]),
        (base[0], "11.4.0.106", *base[2:]),
        (*base[:2], "NVIDIA A100 (sm_80)", *base[3:]),
        (*base[:3], T.derive_profile(196, 224, 3, 64, embed_dim=768), *base[4:]),
        (*base[:3], T.derive_profile(196, 224, 3, opt_visible="L/4", embed_dim=768), *base[4:]),
        (*base[:4], "fp32", base[5]),
        (*base[:5], {"tf32": True, "workspace_gb": 4.0}),
    ]
    keys = {T.engine_cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys


def test_cache_layout(tmp_path, monkeypatch):
    paths = T.engine_paths(tmp_path, "encoder", "fp16", "0123456789abcdef" * 4)
    assert paths.engine == tmp_path / "encoder-fp16-0123456789abcdef01234567.engine"
    assert paths.sidecar == tmp_path / "encoder-fp16-0123456789abcdef01234567.json"
    assert T.timing_cache_path(tmp_path, "10.13.1", "NVIDIA H100 80GB HBM3 (sm_90)") == (
        tmp_path / "timing-trt10.13.1-nvidia-h100-80gb-hbm3-sm-90.cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert T.default_cache_dir() == tmp_path / "xdg" / "mae-deploy" / "trt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert T.default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "mae-deploy" / "trt"


def test_graph_sha256_covers_external_data(bundle):
    spec = bundle.graph("encoder")
    assert T.graph_sha256(bundle, spec) == bundle.manifest["files"]["encoder.onnx"]
    with_data = type(spec)(part="encoder", precision="fp32", file="encoder.onnx", external_data=("encoder.onnx",))
    combined = T.graph_sha256(bundle, with_data)
    assert combined != bundle.manifest["files"]["encoder.onnx"] and len(combined) == 64


# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,np_dtype,size", [
    ("FLOAT", np.float32, 4), ("HALF", np.float16, 2), ("INT32", np.int32, 4), ("INT64", np.int64, 8),
    ("INT8", np.int8, 1), ("BOOL", np.bool_, 1), ("UINT8", np.uint8, 1),
])
def test_dtype_mapping_both_ways(name, np_dtype, size):
    for form in (name, f"DataType.{name}", DataType[name]):  # a name, str(trt.DataType.X), an enum member
        assert T.numpy_dtype(form) == np.dtype(np_dtype)
        assert T.dtype_itemsize(form) == size
    assert T.trt_dtype_for_numpy(np_dtype) == name


def test_dtype_mapping_special_types():
    import ml_dtypes

    assert T.numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16) and T.dtype_itemsize(DataType.BF16) == 2
    assert T.trt_dtype_for_numpy(ml_dtypes.bfloat16) == "BF16"
    with pytest.raises(InputError, match="FP8 has no numpy equivalent"):
        T.numpy_dtype(DataType.FP8)
    with pytest.raises(InputError, match="unknown TensorRT data type 'COMPLEX'"):
        T.numpy_dtype("COMPLEX")
    with pytest.raises(InputError, match="complex64 has no TensorRT equivalent"):
        T.trt_dtype_for_numpy(np.complex64)
    assert T.buffer_nbytes((32, 197, 768), DataType.FLOAT) == 32 * 197 * 768 * 4
    assert T.buffer_nbytes((3, 3), "INT4") == 5  # 4.5 bytes rounded up


# --------------------------------------------------------------------------------------------------
# ONNX Runtime TensorRT execution provider options
# --------------------------------------------------------------------------------------------------


def test_ort_trt_provider_options(tmp_path):
    p = T.derive_profile(196, 224, 3, 32, 8, "L/4", embed_dim=768)
    enc = T.ort_trt_provider_options(p, tmp_path / "ep", fp16=True)
    assert enc == {
        "device_id": 0,
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path / "ep"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(tmp_path / "ep"),
        "trt_profile_min_shapes": "pixel_values:1x3x224x224,ids_keep:1x1",
        "trt_profile_opt_shapes": "pixel_values:8x3x224x224,ids_keep:8x49",
        "trt_profile_max_shapes": "pixel_values:32x3x224x224,ids_keep:32x196",
    }
    dec = T.ort_trt_provider_options(p, tmp_path, fp16=False, part="decoder", device_id=1)
    assert dec["trt_profile_min_shapes"] == "latent:1x2x768,ids_restore:1x196"
    assert dec["trt_profile_opt_shapes"] == "latent:8x50x768,ids_restore:8x196"
    assert dec["trt_profile_max_shapes"] == "latent:32x197x768,ids_restore:32x196"
    assert dec["trt_fp16_enable"] is False and dec["device_id"] == 1


def test_trt_module_imports_no_engine_library():
    code = ("import sys, mae_deploy.runners.trt as t\n"
            "p = t.derive_profile(16, 32, 3, embed_dim=32)\n"
            "t.ort_trt_provider_options(p, '/tmp/x', True)\n"
            "print(sorted(m for m in ('torch', 'tensorrt', 'onnxruntime', 'cuda') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# Missing packages and devices
# --------------------------------------------------------------------------------------------------


def test_missing_tensorrt_names_the_extra(bundle):
    assert importlib.util.find_spec("tensorrt") is None, "this test documents the machine without TensorRT"
    with pytest.raises(MissingDependency) as e:
        T.import_tensorrt()
    assert str(e.value) == ("the trt backend needs the package 'tensorrt', which is not installed: "
                            "pip install 'mae-deploy[trt]'")
    assert e.value.exit_code == 6
    with pytest.raises(MissingDependency, match=r"pip install 'mae-deploy\[trt\]'"):
        create_runner(bundle, "trt", device="cuda")


def test_build_engine_command_without_tensorrt(bundle_dir):
    res = CliRunner().invoke(main, ["build-engine", str(bundle_dir)])
    assert res.exit_code == 6
    assert "error: the trt backend needs the package 'tensorrt'" in res.output
    assert "pip install 'mae-deploy[trt]'" in res.output


def test_missing_cuda_python_names_the_extra(monkeypatch, bundle):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt("10.13.1"))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` fail like an absent package
    with pytest.raises(MissingDependency, match=r"needs the package 'cuda-python'.*mae-deploy\[trt\]"):
        T.TrtRunner(bundle)


def test_real_cuda_python_without_a_gpu_is_device_unavailable():
    """cuda-python is installed here (a torch dependency) but there is no driver: the real call fails."""
    cudart = T.import_cudart()
    with pytest.raises(DeviceUnavailable, match="no usable CUDA device for the trt backend"):
        T.cuda_device_name(cudart, 0)


def test_device_errors(monkeypatch, bundle):
    install(monkeypatch, FakeTrt("10.13.1"), FakeCudart(devices=0))
    with pytest.raises(DeviceUnavailable, match="needs a CUDA GPU and none is visible"):
        T.TrtRunner(bundle)
    install(monkeypatch, FakeTrt("10.13.1"), FakeCudart(devices=1))
    with pytest.raises(DeviceUnavailable, match=r"cuda:3 does not exist: 1 CUDA device\(s\) visible"):
        T.TrtRunner(bundle, device="cuda:3")
    with pytest.raises(InputError, match="runs on cuda or cuda:N, not 'cpu'"):
        T.TrtRunner(bundle, device="cpu")
    with pytest.raises(InputError, match="int8 graphs are ONNX Runtime dynamic quantisation"):
        T.TrtRunner(bundle, precision="int8")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt("8.6.1"))
    with pytest.raises(T.UnsupportedTensorRT, match="TensorRT 8.6.1 is installed"):
        T.TrtRunner(bundle)


# --------------------------------------------------------------------------------------------------
# Choosing graphs and configuring the builder (fake tensorrt)
# --------------------------------------------------------------------------------------------------


def test_select_graph_per_generation(bundle, fp32_only_bundle):
    assert T.select_graph(bundle, "encoder", "fp16", 10).file == "encoder.onnx"  # FP16 builder flag on 10
    assert T.select_graph(bundle, "encoder", "fp16", 11).file == "encoder.fp16.onnx"  # strongly typed on 11
    assert T.select_graph(bundle, "decoder", "fp32", 11).file == "decoder.onnx"
    with pytest.raises(BundleError, match=r"TensorRT 11 builds strongly typed networks, so fp16 needs the "
                                          r"bundle's fp16 ONNX.*--precision fp16"):
        T.select_graph(fp32_only_bundle, "encoder", "fp16", 11)
    assert T.select_graph(fp32_only_bundle, "encoder", "fp16", 10).file == "encoder.onnx"


def _count_ops(path: Path, ops: tuple[str, ...]) -> int:
    import onnx

    return sum(n.op_type in ops for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_build_engine_fp32_on_10(bundle):
    trt = FakeTrt("10.13.1")
    p = T.profile_for_bundle(bundle, max_batch=16, opt_visible="L/4")
    res = T.build_engine(bundle.graph_path("encoder"), p.shapes("encoder"), "fp32", b"seed", 2 << 30, trt=trt)
    assert ("create_network", 0) in trt.log  # no EXPLICIT_BATCH (ignored in 10, gone in 11), weakly typed
    sets = [e for e in trt.log if e[0] == "set_shape"]
    assert sets == [("set_shape", "pixel_values", (1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32)),
                    ("set_shape", "ids_keep", (1, 1), (8, 4), (16, 16))]
    assert ("create_timing_cache", b"seed") in trt.log
    assert res.timing_cache == b"seed+timings"  # the updated cache comes back to be saved
    meta = json.loads(res.engine[len(ENGINE_MAGIC):])
    assert meta["flags"] == []  # TF32 cleared: fp32 means fp32; no FP16
    assert res.builder_flags == [] and res.fp32_layers == [] and res.generation == 10
    assert res.inputs == ["pixel_values", "ids_keep"]


def test_build_engine_config_details(bundle, monkeypatch):
    trt = FakeTrt("10.13.1")
    configs = []
    orig = trt.Builder.create_builder_config
    monkeypatch.setattr(trt.Builder, "create_builder_config", lambda self: configs.append(orig(self)) or configs[-1])
    p = T.profile_for_bundle(bundle)
    T.build_engine(bundle.graph_path("decoder"), p.shapes("decoder"), "fp32", None, 3 << 30, tf32=True, trt=trt)
    cfg = configs[0]
    assert cfg.pools == {trt.MemoryPoolType.WORKSPACE: 3 << 30}
    assert trt.BuilderFlag.TF32 in cfg.flags  # tf32=True leaves TensorRT's default on
    assert ("create_timing_cache", b"") in trt.log  # no seed: an empty cache
    assert [e[1:] for e in trt.log if e[0] == "set_shape"] == [
        ("latent", (1, 2, 32), (8, 17, 32), (32, 17, 32)), ("ids_restore", (1, 16), (8, 16), (32, 16))]


def test_build_engine_fp16_on_10_uses_the_flag_and_pins_norms(bundle, monkeypatch):
    trt = FakeTrt("10.3.0")
    networks = []
    orig = trt.Builder.create_network
    monkeypatch.setattr(trt.Builder, "create_network", lambda self, f=0: networks.append(orig(self, f)) or networks[-1])
    path = bundle.graph_path("encoder")
    res = T.build_engine(path, T.profile_for_bundle(bundle).shapes("encoder"), "fp16", trt=trt)
    assert json.loads(res.engine[len(ENGINE_MAGIC):])["flags"] == ["FP16", "PREFER_PRECISION_CONSTRAINTS"]
    n_norm = _count_ops(path, ("LayerNormalization", "Softmax"))
    assert n_norm >= 5 and len(res.fp32_layers) == n_norm  # 2 blocks x (2 LN + softmax) + final norm
    for layer in networks[0].layers:
        pinned = layer.type in (LayerType.NORMALIZATION, LayerType.SOFTMAX)
        assert (layer.precision == DataType.FLOAT) == pinned
        assert (layer.output_types == {0: DataType.FLOAT}) == pinned


def test_build_engine_fp16_on_11_takes_precision_from_the_onnx(bundle):
    trt = FakeTrt("11.4.0.106")
    assert not hasattr(trt.BuilderFlag, "FP16")  # the fake mirrors 11: touching the flag would fail
    spec = T.select_graph(bundle, "encoder", "fp16", 11)
    res = T.build_engine(bundle.path / spec.file, T.profile_for_bundle(bundle).shapes("encoder"), "fp16", trt=trt)
    assert ("create_network", 0) in trt.log
    assert res.builder_flags == [] and res.fp32_layers == [] and res.generation == 11
    assert json.loads(res.engine[len(ENGINE_MAGIC):])["onnx"].endswith("encoder.fp16.onnx")


def test_build_engine_errors(bundle, tmp_path):
    p = T.profile_for_bundle(bundle)
    with pytest.raises(BundleError, match=r"the profile gives no shapes for \['ids_keep'\]"):
        T.build_engine(bundle.graph_path("encoder"), {"pixel_values": p.shapes("encoder")["pixel_values"]},
                       trt=FakeTrt())
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(T.EngineBuildError, match="TensorRT's ONNX parser rejected .*junk.onnx: cannot parse"):
        T.build_engine(junk, p.shapes("encoder"), trt=FakeTrt())
    with pytest.raises(T.EngineBuildError, match="could not build an engine .* larger --workspace-gb"):
        T.build_engine(bundle.graph_path("encoder"), p.shapes("encoder"), trt=FakeTrt(build_fails=True))
    with pytest.raises(BundleError, match="does not exist"):
        T.build_engine(tmp_path / "missing.onnx", p.shapes("encoder"), trt=FakeTrt())
    with pytest.raises(InputError, match="builds fp32 or fp16 engines, not 'int8'"):
        T.build_engine(bundle.graph_path("encoder"), p.shapes("encoder"), "int8", trt=FakeTrt())


@pytest.mark.parametrize("seed", [b"incompatible", b"corrupt"])
def test_refused_timing_cache_is_dropped(bundle, seed):
    trt = FakeTrt()
    res = T.build_engine(bundle.graph_path("encoder"), T.profile_for_bundle(bundle).shapes("encoder"), "fp32",
                         seed, trt=trt)
    assert [e for e in trt.log if e[0] == "create_timing_cache"] == [
        ("create_timing_cache", seed), ("create_timing_cache", b"")]
    assert res.timing_cache == b"+timings"  # built with a fresh cache


def test_build_progress_monitor_follows_the_outer_phase(bundle, capsys):
    trt = FakeTrt()
    T.build_engine(bundle.graph_path("encoder"), T.profile_for_bundle(bundle).shapes("encoder"), trt=trt,
                   progress=True)
    assert ("IProgressMonitor.__init__",) in trt.log
    mon = T._progress_monitor(trt, "x")
    mon.phase_start("Build", None, 4)
    assert mon.bar.total == 4
    mon.phase_start("Inner", "Build", 10)
    assert mon.step_complete("Inner", 0) is True and mon.bar.n == 0  # inner steps do not move the bar
    mon.step_complete("Build", 0)
    assert mon.bar.n == 1
    mon.phase_finish("Build")
    assert mon.bar is None
    assert T._progress_monitor(types.SimpleNamespace(), "x") is None  # TensorRT without IProgressMonitor


# --------------------------------------------------------------------------------------------------
# Engine cache (fake tensorrt)
# --------------------------------------------------------------------------------------------------


def test_engine_cache_builds_once_and_reuses_the_timing_cache(bundle, tmp_path):
    trt = FakeTrt("10.13.1")
    gpu = "Fake GPU (sm_90)"
    p = T.profile_for_bundle(bundle, max_batch=4)
    first = T.get_or_build_engine(bundle, "encoder", "fp16", p, gpu_name=gpu, cache_dir=tmp_path, trt=trt,
                                  progress=False)
    assert first.built and first.paths.engine.is_file() and first.paths.engine.parent == tmp_path
    side = first.sidecar()
    assert side["tensorrt"] == "10.13.1" and side["gpu"] == gpu and side["precision"] == "fp16"
    assert side["graph"]["file"] == "encoder.onnx"
    assert side["graph"]["sha256"] == bundle.manifest["files"]["encoder.onnx"]
    assert side["profile"] == p.as_dict() and side["builder_flags"] == ["FP16", "PREFER_PRECISION_CONSTRAINTS"]
    assert side["input_shapes"]["ids_keep"] == [[1, 1], [4, 16], [4, 16]]
    assert side["timing_cache"]["seeded"] is False
    tcache = T.timing_cache_path(tmp_path, "10.13.1", gpu)
    assert tcache.read_bytes() == b"+timings"
    builds = sum(e[0] == "build_serialized_network" for e in trt.log)

    again = T.get_or_build_engine(bundle, "encoder", "fp16", p, gpu_name=gpu, cache_dir=tmp_path, trt=trt)
    assert not again.built and again.paths == first.paths
    assert sum(e[0] == "build_serialized_network" for e in trt.log) == builds  # no new build

    other = T.get_or_build_engine(bundle, "decoder", "fp16", p, gpu_name=gpu, cache_dir=tmp_path, trt=trt,
                                  progress=False)
    assert other.built and other.paths.engine != first.paths.engine
    assert ("create_timing_cache", b"+timings") in trt.log  # the second build started from the saved cache
    assert other.sidecar()["timing_cache"]["seeded"] is True
    assert tcache.read_bytes() == b"+timings+timings"

    forced = T.get_or_build_engine(bundle, "encoder", "fp16", p, gpu_name=gpu, cache_dir=tmp_path, trt=trt,
                                   rebuild=True, progress=False)
    assert forced.built and forced.paths == first.paths
    other_gpu = T.get_or_build_engine(bundle, "encoder", "fp16", p, gpu_name="Other GPU (sm_80)",
                                      cache_dir=tmp_path, trt=trt, progress=False)
    assert other_gpu.built and other_gpu.paths.engine != first.paths.engine
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary files behind


# --------------------------------------------------------------------------------------------------
# The runner's execute path (fake tensorrt + fake CUDA)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort_reference(bundle):
    from mae_deploy.runners.ort import OrtRunner

    return OrtRunner(bundle, device="cpu")


def test_runner_matches_onnxruntime_and_reuses_max_sized_buffers(fakes, bundle, ort_reference, tmp_path):
    trt, cudart = fakes
    rng = np.random.default_rng(0)
    runner = create_runner(bundle, "trt", device="cuda", cache_dir=tmp_path, max_batch=4, progress=False)
    assert runner.has_decoder and runner.info.details["gpu"] == "Fake GPU 80GB (sm_90)"
    x = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    ids_keep, ids_restore, _ = random_masking(6, 16, 0.75, rng)
    latent = runner.encode(x, ids_keep)  # batch 6 > max 4: two chunks
    np.testing.assert_allclose(latent, ort_reference.encode(x, ids_keep), rtol=0, atol=1e-6)
    pred = runner.decode(latent, ids_restore)
    np.testing.assert_allclose(pred, ort_reference.decode(latent, ids_restore), rtol=0, atol=1e-6)
    full = runner.encode(x[:2], np.tile(np.arange(16), (2, 1)))  # feature extraction: every token visible
    assert full.shape == (2, 17, 32)

    # Buffers: one per tensor, sized for the profile's max shapes, allocated once.
    mallocs = sorted(n for c, n in [c[:2] for c in cudart.calls] if c == "cudaMalloc")
    assert mallocs == sorted([4 * 3 * 32 * 32 * 4, 4 * 16 * 8, 4 * 17 * 32 * 4,  # encoder: pixels, ids, latent
                              4 * 17 * 32 * 4, 4 * 16 * 8, 4 * 16 * 192 * 4])  # decoder: latent, ids, pred
    ctx = runner.session("encoder").context
    shapes = [e[2] for e in ctx.log if e[0] == "set_input_shape" and e[1] == "ids_keep"]
    assert shapes == [(4, 16), (4, 4), (2, 4), (2, 16)]  # max (sizing), then every call's real shape
    info = runner.info
    assert info.backend == "trt" and info.providers == ("tensorrt",)
    assert info.details["built"] == {"encoder": True, "decoder": True}
    assert info.details["api_generation"] == 10 and info.details["sessions"] == ["decoder", "encoder"]
    runner.close()
    assert cudart.memory == {} and cudart.streams == set()  # every buffer and stream released

    # A second runner with the same options finds the cached engines.
    again = T.TrtRunner(bundle, cache_dir=tmp_path, max_batch=4, progress=False).load()
    assert again.info.details["built"] == {"encoder": False, "decoder": False}
    np.testing.assert_allclose(again.encode(x, ids_keep), latent, atol=1e-6)
    again.close()


def test_runner_validates_and_enforces_the_profile(fakes, bundle, tmp_path):
    runner = T.TrtRunner(bundle, cache_dir=tmp_path, max_visible="L/4", progress=False)
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(InputError, match="built for 1..4 visible tokens, but this call has 16"):
        runner.encode(x, np.tile(np.arange(16), (2, 1)))
    with pytest.raises(InputError, match="ids_keep row 1 has duplicate index 3"):
        runner.encode(x, np.array([[0, 1], [3, 3]]))
    with pytest.raises(InputError, match="batch mismatch"):
        runner.decode(np.zeros((2, 3, 32), np.float32), np.arange(16)[None])
    with pytest.raises(InputError, match="latent has width 8 but the model's encoder width is 32"):
        runner.decode(np.zeros((1, 3, 8), np.float32), np.arange(16)[None])
    assert runner.info.details["sessions"] == []  # nothing was built for invalid calls
    runner.close()


def test_runner_rebuilds_a_corrupt_cached_engine(fakes, bundle, tmp_path):
    first = T.TrtRunner(bundle, cache_dir=tmp_path, max_batch=2, progress=False)
    path = first.engine("encoder").paths.engine
    path.write_bytes(b"truncated engine")
    second = T.TrtRunner(bundle, cache_dir=tmp_path, max_batch=2, progress=False)
    out = second.encode(np.zeros((1, 3, 32, 32), np.float32), np.array([[0, 5]]))
    assert out.shape == (1, 3, 32) and second.info.details["built"]["encoder"] is True
    assert path.read_bytes().startswith(ENGINE_MAGIC)
    second.close()


def test_runner_on_tensorrt_11_uses_the_fp16_variant(monkeypatch, bundle, fp32_only_bundle, ort_reference, tmp_path):
    cudart = FakeCudart()
    install(monkeypatch, FakeTrt("11.4.0.106", cudart), cudart)
    runner = T.TrtRunner(bundle, precision="fp16", cache_dir=tmp_path, progress=False)
    assert runner.info.details["graphs"] == {"encoder": "encoder.fp16.onnx", "decoder": "decoder.fp16.onnx"}
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.tile(np.arange(16), (2, 1))
    a, b = runner.encode(x, ids).mean(1), ort_reference.encode(x, ids).mean(1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999  # the fp16 graph really ran (float16 inside), close to fp32
    runner.close()
    with pytest.raises(BundleError, match="re-export with `mae-deploy export CHECKPOINT --out DIR --precision fp16`"):
        T.TrtRunner(fp32_only_bundle, precision="fp16", cache_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# build-engine command (fake tensorrt)
# --------------------------------------------------------------------------------------------------


def test_build_engine_command(fakes, bundle_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ["build-engine", str(bundle_dir), "--cache-dir", str(cache), "--max-batch", "4", "--opt-visible", "L/4"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "TensorRT 10.13.1 (API 10) on Fake GPU 80GB (sm_90)" in out
    assert "profile: batch 1..4 (opt 4), visible tokens 1..16 (opt 4) of L=16" in out
    assert "encoder (fp32, from encoder.onnx): built in" in out and "decoder (fp32, from decoder.onnx): built in" in out
    assert "ids_keep      min 1x1            opt 4x4            max 4x16" in out
    assert "latent        min 1x2x32         opt 4x5x32         max 4x17x32" in out
    engines = sorted(cache.glob("*.engine"))
    assert len(engines) == 2 and all(str(e) in out for e in engines)
    again = CliRunner().invoke(main, args + ["--parts", "encoder"])
    assert again.exit_code == 0 and "encoder (fp32, from encoder.onnx): already cached" in again.output
    assert "decoder (" not in again.output  # --parts encoder: the decoder is neither built nor listed


@pytest.mark.parametrize("extra,message", [
    (["--parts", "encoder,head"], "--parts takes encoder and/or decoder"),
    (["--opt-visible", "99"], "visible-token count 99 must be in 1..16"),
    (["--max-batch", "2", "--opt-batch", "4"], r"opt_batch 4 must be in 1..max_batch \(2\)"),
    (["--workspace-gb", "0"], "workspace must be positive"),
])
def test_build_engine_command_errors(fakes, bundle_dir, tmp_path, extra, message):
    res = CliRunner().invoke(main, ["build-engine", str(bundle_dir), "--cache-dir", str(tmp_path), *extra])
    assert res.exit_code == 3, res.output
    assert re.search(message, res.output)

