"""TensorRT backend: the bundle's ONNX graphs built into engines with TensorRT's own Python API (10.x, 11.x).

NOT RUN ON THIS PROJECT'S MACHINES. This module was written from the TensorRT 10.x / 11.x Python API
documentation and the cuda-python runtime bindings' documentation; no machine of this project has a GPU
or TensorRT, and neither can be installed there. The GPU smoke test ``tests/gpu/test_gpu_smoke.py`` is its
only runtime check (it compares this runner with the PyTorch reference where CUDA and TensorRT exist).
What the CPU test suite does check (``tests/test_trt_logic.py``): the pure logic below (API generation,
profile derivation, cache keys and paths, dtype mapping, ONNX Runtime TensorRT-EP options), the builder
configuration against a recording fake ``tensorrt`` module, and the runner's execute path against a fake
TensorRT/CUDA pair that simulates the documented contracts on the host.

How it works
------------
- **API generations.** TensorRT 10 still has the weak-typing builder flags (``BuilderFlag.FP16`` ...);
  TensorRT 11 removed them and ``EXPLICIT_BATCH``: every network is strongly typed, so precision comes from
  the ONNX file. fp16 therefore means the fp32 graph + ``BuilderFlag.FP16`` on 10 (LayerNorm and Softmax
  pinned to fp32, the same policy as the bundle's fp16 ONNX variant), and the bundle's ``*.fp16.onnx``
  variant on 11. :data:`CAPABILITIES` records the differences; :func:`trt_api_generation` picks the row.
- **One optimization profile** covers every dynamic input of a part: ``pixel_values`` and ``ids_keep`` share
  ``batch``; ``latent`` has ``visible + 1`` tokens; ``ids_restore`` is ``[batch, L]``
  (:func:`derive_profile`). Batches above the profile's max are run in chunks; visible counts outside it
  are an error that says how to rebuild.
- **Engine cache.** Engines are keyed by the graph's sha256 (its external data included), the TensorRT
  version, the GPU, the profile, the precision and the build options (:func:`engine_cache_key`) and stored as
  ``<cache>/<part>-<precision>-<key>.engine`` with a JSON sidecar saying what built it. One timing cache per
  TensorRT version and GPU is shared by every build (:func:`timing_cache_path`), so a second model or profile
  builds faster. Default cache: ``$XDG_CACHE_HOME/mae-deploy/trt`` (``~/.cache/mae-deploy/trt``).
- **Execution** uses the name-based tensor API (``set_input_shape``, ``set_tensor_address``,
  ``execute_async_v3``) on one CUDA stream, with device buffers from cuda-python (``cudaMalloc``) sized for
  the profile's max shapes and reused by every call.

A missing ``tensorrt`` / ``cuda-python`` is a :class:`MissingDependency` naming ``pip install
'mae-deploy[trt]'``; no working CUDA device is a :class:`DeviceUnavailable`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mae_deploy.errors import BundleError, DeviceUnavailable, InputError, MaeDeployError, MissingDependency
from mae_deploy.masking import check_decode_inputs, check_encode_inputs
from mae_deploy.runners.base import RunnerInfo

INSTALL_HINT = "pip install 'mae-deploy[trt]'"
PRECISIONS = ("fp32", "fp16")
PARTS = ("encoder", "decoder")
INPUTS = {"encoder": ("pixel_values", "ids_keep"), "decoder": ("latent", "ids_restore")}
OUTPUT = {"encoder": "latent", "decoder": "pred"}
DEFAULT_MAX_BATCH = 32
DEFAULT_OPT_BATCH = 8
DEFAULT_WORKSPACE_GB = 4.0
# Bump when the meaning of a cached engine changes (build policy, key fields): old entries are then ignored.
ENGINE_KEY_VERSION = 1

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------------
# TensorRT API generations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtCapabilities:
    """What differs between the TensorRT major versions this module supports."""

    generation: int
    precision_builder_flags: bool  # BuilderFlag.FP16 / BF16 / INT8 exist (weak typing)
    always_strongly_typed: bool  # every network is strongly typed: precision comes from the ONNX
    strongly_typed_flag: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED means something (11 ignores it)
    explicit_batch_flag: bool  # EXPLICIT_BATCH must be passed (never: 10 ignores it, 11 removed it)
    fp16_source: str  # "builder-flag": fp32 graph + BuilderFlag.FP16; "onnx-variant": the bundle's fp16 ONNX


CAPABILITIES: dict[int, TrtCapabilities] = {
    10: TrtCapabilities(10, precision_builder_flags=True, always_strongly_typed=False, strongly_typed_flag=True,
                        explicit_batch_flag=False, fp16_source="builder-flag"),
    11: TrtCapabilities(11, precision_builder_flags=False, always_strongly_typed=True, strongly_typed_flag=False,
                        explicit_batch_flag=False, fp16_source="onnx-variant"),
}


class UnsupportedTensorRT(MissingDependency):
    """TensorRT is installed but older than 10 (the name-based tensor API and this module need 10+)."""

    def __init__(self, version: str) -> None:
        MaeDeployError.__init__(
            self,
            f"the trt backend needs TensorRT 10 or newer, but TensorRT {version} is installed; "
            f"upgrade it: pip install -U 'mae-deploy[trt]'",
        )
        self.package = "tensorrt"


def trt_api_generation(version: str) -> int:
    """10 or 11: which API this TensorRT version speaks. '10.3.0' -> 10, '11.4.0.106' -> 11.

    Versions above 11 are treated as 11, the newest API this module knows. Below 10 (or unparsable) is an
    :class:`UnsupportedTensorRT` error.
    """
    m = re.match(r"\s*(\d+)(?:\.\d+)*", str(version))
    if not m:
        raise UnsupportedTensorRT(repr(version))
    major = int(m.group(1))
    if major < 10:
        raise UnsupportedTensorRT(str(version))
    return 10 if major == 10 else 11


def import_tensorrt():
    """``import tensorrt``, checked to be 10+; a one-line error saying what to install otherwise."""
    try:
        import tensorrt
    except ImportError as e:
        raise MissingDependency("tensorrt", "the trt backend", INSTALL_HINT) from e
    except OSError as e:  # the wheel is there but libnvinfer cannot be loaded (driver/CUDA mismatch)
        raise DeviceUnavailable(f"TensorRT is installed but its libraries cannot be loaded: {e}") from e
    trt_api_generation(getattr(tensorrt, "__version__", "unknown"))
    return tensorrt


def import_cudart():
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError as e:
            raise MissingDependency("cuda-python", "the trt backend (CUDA device buffers)", INSTALL_HINT) from e
    return cudart


# --------------------------------------------------------------------------------------------------
# Optimization profile
# --------------------------------------------------------------------------------------------------


def parse_visible(spec: int | str, num_patches: int) -> int:
    """A visible-token count from an int or from 'L' / 'L/4' (floor, at least 1); checked to be in 1..L."""
    L = num_patches
    if isinstance(spec, str):
        s = spec.strip().replace(" ", "")
        if s.isdigit():
            value = int(s)
        elif s == "L":
            value = L
        elif m := re.fullmatch(r"L/(\d+)", s):
            d = int(m.group(1))
            if d == 0:
                raise InputError(f"visible-token count {spec!r} divides by zero")
            value = max(1, L // d)
        else:
            raise InputError(f"visible-token count {spec!r} is not a number, 'L' or 'L/N' (L = {L} patches)")
    else:
        value = int(spec)
    if not 1 <= value <= L:
        raise InputError(f"visible-token count {value} must be in 1..{L} (the model has L = {L} patches)")
    return value


@dataclass(frozen=True)
class TrtProfile:
    """One optimization profile over batch and visible tokens, for both parts of a bundle.

    Batch runs 1..max_batch (optimised for opt_batch), visible tokens min_visible..max_visible (optimised
    for opt_visible). :meth:`shapes` turns it into the (min, opt, max) shape of every graph input.
    """

    num_patches: int
    image_size: int
    in_chans: int
    embed_dim: int
    max_batch: int
    opt_batch: int
    min_visible: int
    opt_visible: int
    max_visible: int
    min_batch: int = 1

    def shapes(self, part: str) -> dict[str, tuple[Shape, Shape, Shape]]:
        """{input name: (min, opt, max)} for ``part`` ('encoder' or 'decoder')."""
        c, s, L, d = self.in_chans, self.image_size, self.num_patches, self.embed_dim
        corners = ((self.min_batch, self.min_visible), (self.opt_batch, self.opt_visible),
                   (self.max_batch, self.max_visible))
        if part == "encoder":
            return {
                "pixel_values": tuple((b, c, s, s) for b, _ in corners),
                "ids_keep": tuple((b, k) for b, k in corners),
            }
        if part == "decoder":
            return {
                "latent": tuple((b, k + 1, d) for b, k in corners),  # cls token + visible tokens
                "ids_restore": tuple((b, L) for b, _ in corners),
            }
        raise InputError(f"unknown part {part!r}; expected one of {list(PARTS)}")

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        return (f"batch {self.min_batch}..{self.max_batch} (opt {self.opt_batch}), visible tokens "
                f"{self.min_visible}..{self.max_visible} (opt {self.opt_visible}) of L={self.num_patches}")

    def check_call(self, part: str, batch: int, visible: int) -> None:
        """InputError unless ``visible`` lies in the profile (batch is chunked by the runner, never refused)."""
        if not self.min_visible <= visible <= self.max_visible:
            raise InputError(
                f"the TensorRT {part} engine was built for {self.min_visible}..{self.max_visible} visible tokens, "
                f"but this call has {visible}; rebuild with --min-visible/--max-visible covering it "
                f"(runner options min_visible=/max_visible=)"
            )
        if batch < self.min_batch:
            raise InputError(f"batch {batch} is below the engine profile's minimum batch {self.min_batch}")


def derive_profile(
    num_patches: int,
    image_size: int,
    in_chans: int,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    opt_visible: int | str | None = None,
    min_visible: int | str = 1,
    *,
    embed_dim: int,
    max_visible: int | str | None = None,
) -> TrtProfile:
    """The optimization profile for a bundle: batch 1..max_batch, visible min_visible..max_visible.

    Defaults: opt_batch = min(8, max_batch); max_visible = L (feature extraction); opt_visible = max_visible.
    For reconstruction-heavy use pass opt_visible='L/4' (mask ratio 0.75). Visible counts may be ints or
    'L' / 'L/N'. Every bad combination is an InputError naming the value and the allowed range.
    """
    for name, v in (("num_patches", num_patches), ("image_size", image_size), ("in_chans", in_chans),
                    ("embed_dim", embed_dim)):
        if int(v) < 1:
            raise InputError(f"{name} must be positive, got {v}")
    L = int(num_patches)
    if int(max_batch) < 1:
        raise InputError(f"max_batch must be at least 1, got {max_batch}")
    max_batch = int(max_batch)
    opt_batch = min(DEFAULT_OPT_BATCH, max_batch) if opt_batch is None else int(opt_batch)
    if not 1 <= opt_batch <= max_batch:
        raise InputError(f"opt_batch {opt_batch} must be in 1..max_batch ({max_batch})")
    lo = parse_visible(min_visible, L)
    hi = L if max_visible is None else parse_visible(max_visible, L)
    if lo > hi:
        raise InputError(f"min_visible {lo} is above max_visible {hi}")
    opt = hi if opt_visible is None else parse_visible(opt_visible, L)
    if not lo <= opt <= hi:
        raise InputError(f"opt_visible {opt} must be in min_visible..max_visible ({lo}..{hi})")
    return TrtProfile(num_patches=L, image_size=int(image_size), in_chans=int(in_chans), embed_dim=int(embed_dim),
                      max_batch=max_batch, opt_batch=opt_batch, min_visible=lo, opt_visible=opt, max_visible=hi)


def profile_for_bundle(bundle, **kwargs) -> TrtProfile:
    """:func:`derive_profile` with the bundle's L, image size, channels and encoder width."""
    return derive_profile(bundle.num_patches, bundle.image_size, bundle.in_chans, embed_dim=bundle.embed_dim,
                          **kwargs)


def format_shape(shape: Shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def ort_trt_provider_options(
    profile: TrtProfile,
    cache_dir: str | os.PathLike,
    fp16: bool,
    part: str = "encoder",
    device_id: int = 0,
) -> dict[str, Any]:
    """Provider options for ONNX Runtime's TensorrtExecutionProvider running ``part`` over ``profile``.

    Shapes are ORT's strings (``"pixel_values:1x3x224x224,ids_keep:1x1"``); engine and timing caches are
    enabled under ``cache_dir``. Pure: imports neither onnxruntime nor tensorrt. (ORT's own TensorRT build
    is unrun here, like the rest of this module.)
    """
    shapes = profile.shapes(part)

    def corner(i: int) -> str:
        return ",".join(f"{name}:{format_shape(s[i])}" for name, s in shapes.items())

    cache = str(Path(cache_dir))
    return {
        "device_id": int(device_id),
        "trt_fp16_enable": bool(fp16),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": corner(0),
        "trt_profile_opt_shapes": corner(1),
        "trt_profile_max_shapes": corner(2),
    }


# --------------------------------------------------------------------------------------------------
# dtypes (by name, so this works without tensorrt imported)
# --------------------------------------------------------------------------------------------------

# trt.DataType member name -> numpy dtype name (None: numpy has no such type)
TRT_TO_NUMPY: dict[str, str | None] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",  # numpy needs ml_dtypes for it
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": None,
    "INT4": None,
    "FP4": None,
}
TRT_ITEMSIZE: dict[str, float] = {
    "FLOAT": 4, "HALF": 2, "BF16": 2, "INT8": 1, "UINT8": 1, "INT32": 4, "INT64": 8, "BOOL": 1,
    "FP8": 1, "INT4": 0.5, "FP4": 0.5,
}


def trt_dtype_name(dtype: Any) -> str:
    """'FLOAT' for trt.DataType.FLOAT, its str 'DataType.FLOAT', or the name itself."""
    name = getattr(dtype, "name", None) or str(dtype)
    return name.rsplit(".", 1)[-1].upper()


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """The numpy dtype of a TensorRT data type (a trt.DataType or its name)."""
    name = trt_dtype_name(trt_dtype)
    if name not in TRT_TO_NUMPY:
        raise InputError(f"unknown TensorRT data type {name!r}; known: {', '.join(TRT_TO_NUMPY)}")
    np_name = TRT_TO_NUMPY[name]
    if np_name is None:
        raise InputError(f"TensorRT data type {name} has no numpy equivalent; the graph's inputs and outputs "
                         "must be float32/float16/int32/int64")
    if np_name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as e:
            raise MissingDependency("ml_dtypes", "a bfloat16 engine input/output") from e
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np_name)


def trt_dtype_for_numpy(dtype: Any) -> str:
    """The trt.DataType member name for a numpy dtype (np.float32 -> 'FLOAT')."""
    dt = np.dtype(dtype)
    for name, np_name in TRT_TO_NUMPY.items():
        if np_name is not None and dt.name == np_name:
            return name
    raise InputError(f"numpy dtype {dt} has no TensorRT equivalent")


def dtype_itemsize(trt_dtype: Any) -> float:
    """Bytes per element (0.5 for the 4-bit types)."""
    name = trt_dtype_name(trt_dtype)
    if name not in TRT_ITEMSIZE:
        raise InputError(f"unknown TensorRT data type {name!r}")
    return TRT_ITEMSIZE[name]


def buffer_nbytes(shape: Shape, trt_dtype: Any) -> int:
    """Bytes of a dense tensor of ``shape`` (rounded up for the 4-bit types)."""
    return int(math.ceil(math.prod(int(d) for d in shape) * dtype_itemsize(trt_dtype)))


# --------------------------------------------------------------------------------------------------
# Engine cache: keys and paths
# --------------------------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """JSON-ready, order-independent form (dataclasses and tuples become dicts and lists)."""
    if isinstance(value, TrtProfile):
        return value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def engine_cache_key(
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    profile: TrtProfile | Mapping,
    precision: str,
    options: Mapping | None = None,
) -> str:
    """A stable hex key for an engine: the same inputs give the same key whatever the dict ordering.

    Anything that makes a cached engine wrong or different goes in: the graph's bytes, the TensorRT version
    (engines are not portable across versions), the GPU (nor across GPU models), the profile, the precision
    and the build options (tf32, workspace).
    """
    payload = {
        "key_version": ENGINE_KEY_VERSION,
        "onnx_sha256": str(onnx_sha256),
        "tensorrt": str(trt_version),
        "gpu": str(gpu_name),
        "profile": _canonical(profile),
        "precision": str(precision),
        "options": _canonical(options or {}),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def graph_sha256(bundle, spec) -> str:
    """The sha256 that identifies a graph: its file's (from mae.json), combined with its external data's."""
    files = bundle.manifest.get("files") or {}
    if spec.file not in files:
        raise BundleError(f"{spec.file} is not listed in mae.json 'files'; re-export the bundle")
    if not spec.external_data:
        return str(files[spec.file])
    h = hashlib.sha256()
    for rel in (spec.file, *sorted(spec.external_data)):
        h.update(f"{rel}:{files.get(rel, 'missing')}\n".encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mae-deploy" / "trt"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


@dataclass(frozen=True)
class EnginePaths:
    engine: Path
    sidecar: Path


def engine_paths(cache_dir: str | os.PathLike, part: str, precision: str, key: str) -> EnginePaths:
    """``<cache>/<part>-<precision>-<key[:24]>.engine`` and its ``.json`` sidecar."""
    stem = f"{part}-{precision}-{key[:24]}"
    d = Path(cache_dir)
    return EnginePaths(d / f"{stem}.engine", d / f"{stem}.json")


def timing_cache_path(cache_dir: str | os.PathLike, trt_version: str, gpu_name: str) -> Path:
    """One timing cache per TensorRT version and GPU, shared by every model and profile built there."""
    return Path(cache_dir) / f"timing-trt{_slug(trt_version)}-{_slug(gpu_name)}.cache"


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same directory, then os.replace: readers never see half an engine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def select_graph(bundle, part: str, precision: str, generation: int):
    """The bundle graph TensorRT builds for ``part`` at ``precision`` on this API generation.

    fp32: the fp32 graph. fp16 on TensorRT 10: the fp32 graph too (BuilderFlag.FP16 does the rest). fp16 on
    TensorRT 11: strongly typed networks take their precision from the ONNX, so the bundle must hold the
    fp16 variant (``<part>.fp16.onnx``) and the error says how to export it.
    """
    if precision not in PRECISIONS:
        if precision == "int8":
            raise InputError(
                "the trt backend runs fp32 or fp16: the bundle's int8 graphs are ONNX Runtime dynamic "
                "quantisation (MatMulInteger), which TensorRT does not take; use --backend ort for int8"
            )
        raise InputError(f"the trt backend runs precision fp32 or fp16, not {precision!r}")
    caps = CAPABILITIES[generation]
    if precision == "fp32" or caps.fp16_source == "builder-flag":
        return bundle.graph(part, "fp32")
    if "fp16" not in bundle.precisions(part):
        raise BundleError(
            f"TensorRT {generation} builds strongly typed networks, so fp16 needs the bundle's fp16 ONNX, but "
            f"bundle {bundle.path} has no {part} graph at fp16 (it has: {', '.join(bundle.precisions(part))}); "
            "re-export with `mae-deploy export CHECKPOINT --out DIR --precision fp16`"
        )
    return bundle.graph(part, "fp16")


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


class EngineBuildError(DeviceUnavailable):
    """TensorRT could not parse or build a graph on this machine."""


@dataclass
class BuildResult:
    engine: bytes
    timing_cache: bytes | None
    seconds: float
    generation: int
    network_flags: int
    builder_flags: list[str] = field(default_factory=list)
    fp32_layers: list[str] = field(default_factory=list)  # layers pinned to fp32 in an fp16 build
    inputs: list[str] = field(default_factory=list)


def _progress_monitor(trt, desc: str):
    """A tqdm progress bar fed by TensorRT's IProgressMonitor (10.0+), or None where there is none.

    TensorRT reports nested phases; the bar follows the outermost phase's steps and names the current one.
    """
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None
    from tqdm import tqdm

    class _Monitor(base):
        def __init__(self) -> None:
            base.__init__(self)
            self.bar = None
            self.top: str | None = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None and self.bar is None:
                self.top = phase_name
                self.bar = tqdm(total=max(int(num_steps), 1), desc=desc, unit="step", leave=False)
            if self.bar is not None:
                self.bar.set_postfix_str(str(phase_name)[:40], refresh=False)

        def step_complete(self, phase_name, step):
            if self.bar is not None and phase_name == self.top:
                self.bar.update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            if phase_name == self.top and self.bar is not None:
                self.bar.close()
                self.bar = None

    return _Monitor()


def _pin_fp32_layers(trt, network) -> list[str]:
    """In a weakly typed fp16 build, keep normalisation and softmax layers in fp32.

    Their reductions (variance, exp-sum) are where fp16 overflows or loses precision, and they are a small
    share of the time; the bundle's fp16 ONNX variant keeps LayerNormalization and Softmax in fp32 too.
    """
    wanted = {getattr(trt.LayerType, n) for n in ("NORMALIZATION", "SOFTMAX") if hasattr(trt.LayerType, n)}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in wanted:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    return pinned


def build_engine(
    onnx_path: str | os.PathLike,
    input_shapes: Mapping[str, tuple[Shape, Shape, Shape]],
    precision: str = "fp32",
    timing_cache: bytes | None = None,
    workspace: int = int(DEFAULT_WORKSPACE_GB * (1 << 30)),
    *,
    tf32: bool = False,
    trt=None,
    progress: bool = False,
    log_severity: str = "WARNING",
) -> BuildResult:
    """Parse ``onnx_path`` and build a serialized engine with one optimization profile.

    ``input_shapes``: {input: (min, opt, max)} for every network input (:meth:`TrtProfile.shapes`); an input
    it misses is an error. The file is parsed with ``parse_from_file`` so external weight data resolves
    relative to the model file. ``precision`` fp16 sets BuilderFlag.FP16 on TensorRT 10 (with LayerNorm and
    Softmax pinned to fp32); on TensorRT 11 there is no such flag and ``onnx_path`` must already be the fp16
    variant (see :func:`select_graph`). ``tf32`` False clears BuilderFlag.TF32 (TensorRT enables it by
    default) so fp32 means fp32. ``timing_cache`` (bytes) seeds the builder; the updated cache comes back
    in the result. ``trt``: the tensorrt module (tests pass a fake).
    """
    trt = trt or import_tensorrt()
    gen = trt_api_generation(trt.__version__)
    caps = CAPABILITIES[gen]
    if precision not in PRECISIONS:
        raise InputError(f"the trt backend builds fp32 or fp16 engines, not {precision!r}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BundleError(f"ONNX file {onnx_path} does not exist")

    logger = trt.Logger(getattr(trt.Logger, log_severity))
    builder = trt.Builder(logger)
    # Explicit batch is the only mode since 10 (EXPLICIT_BATCH is ignored there and gone in 11); strong
    # typing is implied in 11 and, on 10, would forbid the FP16 flag, so no creation flag is needed.
    network_flags = 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: " + ("; ".join(errors) or "no details"))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    builder_flags: list[str] = []
    pinned: list[str] = []
    if precision == "fp16" and caps.precision_builder_flags:
        config.set_flag(trt.BuilderFlag.FP16)
        builder_flags.append("FP16")
        pinned = _pin_fp32_layers(trt, network)
        if pinned:
            # "prefer": fall back (with a warning) where no fp32 kernel exists instead of failing the build.
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            builder_flags.append("PREFER_PRECISION_CONSTRAINTS")
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    elif tf32:
        builder_flags.append("TF32")

    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = [n for n in names if n not in input_shapes]
    if missing:
        raise BundleError(f"{onnx_path} has inputs {names}; the profile gives no shapes for {missing}")
    profile = builder.create_optimization_profile()
    for n in names:
        lo, opt, hi = input_shapes[n]
        profile.set_shape(n, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)

    # A seed TensorRT refuses (corrupt, or from another version or device) is dropped rather than failing
    # the build: the timing cache only saves time.
    try:
        seeded = bool(timing_cache) and bool(config.set_timing_cache(config.create_timing_cache(timing_cache), False))
    except Exception:
        seeded = False
    if not seeded:
        config.set_timing_cache(config.create_timing_cache(b""), False)

    if progress:
        monitor = _progress_monitor(trt, f"TensorRT build {onnx_path.name}")
        if monitor is not None:
            config.progress_monitor = monitor

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT could not build an engine from {onnx_path} (its log above says why; a larger "
            "--workspace-gb or a smaller --max-batch often helps)"
        )
    new_cache = config.get_timing_cache()
    return BuildResult(
        engine=bytes(serialized),
        timing_cache=bytes(new_cache.serialize()) if new_cache is not None else None,
        seconds=seconds,
        generation=gen,
        network_flags=network_flags,
        builder_flags=builder_flags,
        fp32_layers=pinned,
        inputs=names,
    )


@dataclass
class CachedEngine:
    """An engine file in the cache (just built, or found there)."""

    part: str
    precision: str
    key: str
    paths: EnginePaths
    built: bool
    build_seconds: float | None
    graph_file: str

    def read(self) -> bytes:
        return self.paths.engine.read_bytes()

    def sidecar(self) -> dict:
        try:
            return json.loads(self.paths.sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def get_or_build_engine(
    bundle,
    part: str,
    precision: str,
    profile: TrtProfile,
    *,
    gpu_name: str,
    cache_dir: str | os.PathLike | None = None,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    tf32: bool = False,
    rebuild: bool = False,
    trt=None,
    say: Callable[[str], None] | None = None,
    progress: bool = True,
) -> CachedEngine:
    """The cached engine for ``part`` (built now when absent or when ``rebuild``), with its sidecar.

    Writes are atomic (engine, then sidecar, then the shared timing cache), so a concurrent build of the
    same key by another process only costs time.
    """
    trt = trt or import_tensorrt()
    gen = trt_api_generation(trt.__version__)
    spec = select_graph(bundle, part, precision, gen)
    if workspace_gb <= 0:
        raise InputError(f"workspace must be positive (GiB), got {workspace_gb}")
    options = {"tf32": bool(tf32), "workspace_gb": float(workspace_gb)}
    onnx_sha = graph_sha256(bundle, spec)
    key = engine_cache_key(onnx_sha, trt.__version__, gpu_name, profile, precision, options)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    paths = engine_paths(cache, part, precision, key)
    if paths.engine.is_file() and not rebuild:
        return CachedEngine(part, precision, key, paths, built=False, build_seconds=None, graph_file=spec.file)

    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the engine cache directory {cache}: {e}; pass --cache-dir DIR") from e
    tpath = timing_cache_path(cache, trt.__version__, gpu_name)
    seed = tpath.read_bytes() if tpath.is_file() else None
    if say:
        say(f"building the TensorRT {part} engine ({precision}, {profile.describe()}) from {spec.file}; "
            "this takes a while once, then it is cached")
    result = build_engine(bundle.path / spec.file, profile.shapes(part), precision, seed,
                          int(workspace_gb * (1 << 30)), tf32=tf32, trt=trt, progress=progress)
    _atomic_write(paths.engine, result.engine)
    from mae_deploy import __version__

    sidecar = {
        "key": key,
        "key_version": ENGINE_KEY_VERSION,
        "part": part,
        "precision": precision,
        "graph": {"file": spec.file, "precision": spec.precision, "sha256": onnx_sha, "bundle": str(bundle.path),
                  "model": bundle.name},
        "tensorrt": trt.__version__,
        "api_generation": gen,
        "gpu": gpu_name,
        "profile": profile.as_dict(),
        "input_shapes": {n: [list(s) for s in v] for n, v in profile.shapes(part).items()},
        "options": options,
        "network_flags": result.network_flags,
        "builder_flags": result.builder_flags,
        "fp32_layers": len(result.fp32_layers),
        "timing_cache": {"path": str(tpath), "seeded": seed is not None},
        "build_seconds": round(result.seconds, 3),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mae_deploy": __version__,
    }
    _atomic_write(paths.sidecar, (json.dumps(sidecar, indent=2) + "\n").encode())
    if result.timing_cache:
        _atomic_write(tpath, result.timing_cache)
    return CachedEngine(part, precision, key, paths, built=True, build_seconds=result.seconds, graph_file=spec.file)


# --------------------------------------------------------------------------------------------------
# CUDA helpers (cuda-python)
# --------------------------------------------------------------------------------------------------


def _cuda(result, what: str):
    """cuda-python calls return (err, *values): raise on error, return the value(s)."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise DeviceUnavailable(f"CUDA call {what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def parse_cuda_device(device: str) -> int:
    """'cuda' -> 0, 'cuda:N' -> N; anything else is an InputError."""
    kind, _, idx = str(device).partition(":")
    if kind != "cuda" or (idx and not idx.isdigit()):
        raise InputError(f"the trt backend runs on cuda or cuda:N, not {device!r}")
    return int(idx or 0)


def cuda_device_name(cudart, device_id: int) -> str:
    """'NVIDIA H100 80GB HBM3 (sm_90)': the GPU model and compute capability (both decide engine validity)."""
    try:
        count = _cuda(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except DeviceUnavailable as e:
        raise DeviceUnavailable(
            f"no usable CUDA device for the trt backend ({e}); use --backend ort --device cpu"
        ) from e
    if not count:
        raise DeviceUnavailable("the trt backend needs a CUDA GPU and none is visible; use --backend ort --device cpu")
    if device_id >= count:
        raise DeviceUnavailable(
            f"cuda:{device_id} does not exist: {count} CUDA device(s) visible (cuda:0..{count - 1})"
        )
    props = _cuda(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return f"{str(name).strip()} (sm_{props.major}{props.minor})"


def _stream_handle(stream) -> int:
    try:
        return int(stream)
    except TypeError:
        return int(stream.getPtr())


class _EngineSession:
    """One deserialized engine with its execution context and device buffers (sized for the profile max)."""

    def __init__(self, trt, cudart, blob: bytes, part: str, device_id: int) -> None:
        self.trt, self.cudart, self.part, self.device_id = trt, cudart, part, device_id
        self.buffers: dict[str, int] = {}
        self.capacity: dict[str, int] = {}
        self.stream = None
        _cuda(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self.logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime and engine
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not deserialize the cached {part} engine")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineBuildError(f"TensorRT could not create an execution context for the {part} engine")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        if sorted(self.inputs) != sorted(INPUTS[part]) or OUTPUT[part] not in self.outputs:
            raise BundleError(f"the {part} engine has inputs {self.inputs} and outputs {self.outputs}; expected "
                              f"inputs {list(INPUTS[part])} and output '{OUTPUT[part]}'")
        self.dtypes = {n: numpy_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.trt_dtypes = {n: self.engine.get_tensor_dtype(n) for n in names}
        # Size every buffer for the profile's max shapes: set them, let TensorRT infer the outputs.
        self.max_shapes: dict[str, Shape] = {}
        for n in self.inputs:
            hi = tuple(int(d) for d in self.engine.get_tensor_profile_shape(n, 0)[2])
            if not self.context.set_input_shape(n, hi):
                raise EngineBuildError(f"TensorRT refused the profile's max shape {hi} for {n}")
            self.max_shapes[n] = hi
        for n in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise EngineBuildError(f"TensorRT could not infer the max shape of output {n} ({shape})")
            self.max_shapes[n] = shape
        try:
            for n in names:
                nbytes = max(buffer_nbytes(self.max_shapes[n], self.trt_dtypes[n]), 1)
                ptr = _cuda(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes for {n})")
                self.buffers[n], self.capacity[n] = int(ptr), nbytes
                self.context.set_tensor_address(n, int(ptr))
            self.stream = _cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        except BaseException:
            self.close()
            raise

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Copy ``feeds`` in, execute, copy the output back (all on the session's stream)."""
        cudart, ctx = self.cudart, self.context
        _cuda(cudart.cudaSetDevice(self.device_id), "cudaSetDevice")  # the calling thread may be another one
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = []  # host arrays must outlive their async copies
        for n in self.inputs:
            arr = np.ascontiguousarray(feeds[n], dtype=self.dtypes[n])
            if arr.nbytes > self.capacity[n]:
                raise InputError(f"{n} of shape {arr.shape} exceeds the engine's max shape {self.max_shapes[n]}")
            if not ctx.set_input_shape(n, tuple(arr.shape)):
                raise InputError(f"the TensorRT {self.part} engine refused {n} of shape {arr.shape} "
                                 f"(profile max {self.max_shapes[n]})")
            keep.append(arr)
            _cuda(cudart.cudaMemcpyAsync(self.buffers[n], arr.ctypes.data, arr.nbytes, h2d, self.stream),
                  f"cudaMemcpyAsync({n} to device)")
        out_name = OUTPUT[self.part]
        shape = tuple(int(d) for d in ctx.get_tensor_shape(out_name))
        out = np.empty(shape, dtype=self.dtypes[out_name])
        if out.nbytes > self.capacity[out_name]:
            raise EngineBuildError(f"output {out_name} {shape} is larger than its buffer; rebuild the engine")
        if not ctx.execute_async_v3(_stream_handle(self.stream)):
            raise EngineBuildError(f"TensorRT failed to execute the {self.part} engine")
        _cuda(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[out_name], out.nbytes, d2h, self.stream),
              f"cudaMemcpyAsync({out_name} to host)")
        _cuda(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        del keep
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def close(self) -> None:
        cudart = self.cudart
        if self.stream is not None:
            cudart.cudaStreamSynchronize(self.stream)
        for ptr in self.buffers.values():
            cudart.cudaFree(ptr)
        self.buffers.clear()
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        # Context before engine before runtime: TensorRT objects must die in reverse order of creation.
        self.context = None
        self.engine = None
        self.runtime = None


# --------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------


class TrtRunner:
    """Run a bundle's encoder/decoder as TensorRT engines on one CUDA GPU (see the module docstring).

    ``precision``: fp32 or fp16. Profile options: ``max_batch`` (default 32; larger batches run in chunks),
    ``opt_batch`` (default min(8, max_batch)), ``opt_visible`` / ``min_visible`` / ``max_visible`` (ints or
    'L', 'L/4'; default: optimised for all L tokens, covering 1..L). ``cache_dir`` (default
    ~/.cache/mae-deploy/trt), ``workspace_gb`` (builder workspace), ``tf32`` (allow TF32 in fp32 engines;
    off by default), ``rebuild`` (ignore cached engines), ``progress`` (messages and a build progress bar on
    stderr). Engines are built or loaded lazily per part on first use; :meth:`load` does it up front.

    Unrun on this project's machines (no GPU): only tests/gpu/ exercises it for real.
    """

    def __init__(
        self,
        bundle,
        device: str = "cuda",
        precision: str = "fp32",
        *,
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
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.generation = trt_api_generation(self.trt.__version__)
        self.bundle = bundle
        self.device = device
        self.device_id = parse_cuda_device(device)
        self.precision = precision
        # Resolve graphs and the profile before touching the GPU, so bad options fail fast.
        self._specs = {"encoder": select_graph(bundle, "encoder", precision, self.generation)}
        self._specs["decoder"] = (select_graph(bundle, "decoder", precision, self.generation)
                                  if bundle.has_decoder else None)
        self.profile = profile_for_bundle(bundle, max_batch=max_batch, opt_batch=opt_batch, opt_visible=opt_visible,
                                          min_visible=min_visible, max_visible=max_visible)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.workspace_gb, self.tf32, self.rebuild, self.progress = workspace_gb, tf32, rebuild, progress
        self.gpu_name = cuda_device_name(self.cudart, self.device_id)
        _cuda(self.cudart.cudaSetDevice(self.device_id), "cudaSetDevice")
        self._engines: dict[str, CachedEngine] = {}
        self._sessions: dict[str, _EngineSession] = {}
        self._locks = {part: threading.Lock() for part in PARTS}

    def _say(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    # -- engines --------------------------------------------------------------------------------
    def engine(self, part: str, rebuild: bool | None = None) -> CachedEngine:
        """The part's engine in the cache, built now if needed (no GPU buffers are allocated)."""
        if part not in PARTS:
            raise InputError(f"unknown part {part!r}; expected one of {list(PARTS)}")
        if self._specs.get(part) is None:
            self.bundle.graph(part)  # raises the bundle's own message (encoder-only bundle)
        if part not in self._engines or rebuild:
            self._engines[part] = get_or_build_engine(
                self.bundle, part, self.precision, self.profile, gpu_name=self.gpu_name, cache_dir=self.cache_dir,
                workspace_gb=self.workspace_gb, tf32=self.tf32, rebuild=self.rebuild if rebuild is None else rebuild,
                trt=self.trt, say=self._say if self.progress else None, progress=self.progress,
            )
        return self._engines[part]

    def session(self, part: str) -> _EngineSession:
        if part in self._sessions:
            return self._sessions[part]
        with self._locks[part]:
            if part not in self._sessions:
                cached = self.engine(part)
                try:
                    sess = _EngineSession(self.trt, self.cudart, cached.read(), part, self.device_id)
                except EngineBuildError:
                    if cached.built:
                        raise
                    # A stale or corrupt cache entry (e.g. a driver update): rebuild it once.
                    self._say(f"the cached {part} engine {cached.paths.engine} could not be loaded; rebuilding it")
                    cached = self.engine(part, rebuild=True)
                    sess = _EngineSession(self.trt, self.cudart, cached.read(), part, self.device_id)
                self._sessions[part] = sess
        return self._sessions[part]

    def load(self, parts: tuple[str, ...] = ("encoder", "decoder")) -> TrtRunner:
        """Build/load the engines of ``parts`` (those the bundle has) and allocate their buffers now."""
        for part in parts:
            if self._specs.get(part) is not None:
                self.session(part)
        return self

    # -- running --------------------------------------------------------------------------------
    def _run_chunked(self, part: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        sess = self.session(part)
        n, step = next(iter(feeds.values())).shape[0], self.profile.max_batch
        with self._locks[part]:  # one context and stream per part: calls are serialised
            if n <= step:
                return sess.run(feeds)
            outs = [sess.run({k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
        return np.concatenate(outs, axis=0)

    def encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        b = self.bundle
        x, ids = check_encode_inputs(
            pixel_values, ids_keep, in_chans=b.in_chans, image_size=b.image_size, num_patches=b.num_patches
        )
        self.profile.check_call("encoder", x.shape[0], ids.shape[1])
        return self._run_chunked("encoder", {"pixel_values": x, "ids_keep": ids})

    def decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        b = self.bundle
        if self._specs["decoder"] is None:
            b.graph("decoder")  # raises: no decoder in this bundle
        x, ids = check_decode_inputs(latent, ids_restore, embed_dim=b.embed_dim, num_patches=b.num_patches)
        self.profile.check_call("decoder", x.shape[0], x.shape[1] - 1)
        return self._run_chunked("decoder", {"latent": x, "ids_restore": ids})

    @property
    def has_decoder(self) -> bool:
        return self._specs["decoder"] is not None

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
        for sess in self._sessions.values():
            sess.close()
        self._sessions.clear()

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: free device memory of a runner nobody closed
        try:
            self.close()
        except Exception:
            pass
