"""TensorRT backend: the bundle's ONNX graphs built into engines with TensorRT's own Python API (10.x, 11.x).

Written from the TensorRT 10.x / 11.x Python API documentation and the cuda-python runtime bindings'
documentation (what has run where: docs/verification.md). tests/gpu/test_gpu_smoke.py is its runtime
check on a GPU; tests/runners/test_trt_logic.py checks the pure logic, the
builder configuration against a recording fake ``tensorrt`` and the runner's execute path against a fake
TensorRT/CUDA pair that simulates the documented contracts on the host.

Modules, one job each (importing this package imports no engine library):

- :mod:`.api`      TensorRT generations (10 keeps the weak-typing flags, 11 is strongly typed), imports of
                   tensorrt / cuda-python, which graph a build takes (:func:`select_graph`).
- :mod:`.profile`  the one optimization profile over batch and visible tokens.
- :mod:`.ort_ep`   ONNX Runtime's TensorRT provider: its options, graphs and cache folders.
- :mod:`.dtypes`   TensorRT data types by name.
- :mod:`.cache`    engine-cache keys, layout and records.
- :mod:`.build`    parsing, builder configuration per generation, building into the cache.
- :mod:`.cuda`     cuda-python helpers (errors, devices, stream handles).
- :mod:`.session`  one engine's context, device buffers and stream.
- :mod:`.runner`   :class:`TrtRunner`, the backend behind ``--backend trt``.

A missing ``tensorrt`` / ``cuda-python`` is a :class:`MissingDependency` naming the extra to install; no
working CUDA device is a :class:`DeviceUnavailable`.
"""

from __future__ import annotations

from mae_deploy.runners.trt.api import (
    CAPABILITIES,
    INPUTS,
    INSTALL_HINT,
    OUTPUT,
    PARTS,
    PRECISIONS,
    TrtCapabilities,
    UnsupportedTensorRT,
    import_cudart,
    import_tensorrt,
    installed_trt_generation,
    select_graph,
    trt_api_generation,
)
from mae_deploy.runners.trt.build import (
    DEFAULT_WORKSPACE_GB,
    BuildProgress,
    BuildResult,
    EngineBuildError,
    _progress_monitor,
    build_engine,
    get_or_build_engine,
)
from mae_deploy.runners.trt.cache import (
    ENGINE_KEY_VERSION,
    CachedEngine,
    EnginePaths,
    default_cache_dir,
    engine_cache_key,
    engine_paths,
    graph_sha256,
    timing_cache_path,
)
from mae_deploy.runners.trt.cuda import _cuda, cuda_device_name, parse_cuda_device, set_device, stream_handle
from mae_deploy.runners.trt.dtypes import (
    TRT_ITEMSIZE,
    TRT_TO_NUMPY,
    buffer_nbytes,
    dtype_itemsize,
    numpy_dtype,
    trt_dtype_for_numpy,
    trt_dtype_name,
)
from mae_deploy.runners.trt.ort_ep import OrtTrtSetup, ort_trt_graph, ort_trt_provider_options, profile_cache_dir
from mae_deploy.runners.trt.profile import (
    DEFAULT_MAX_BATCH,
    DEFAULT_OPT_BATCH,
    Shape,
    TrtProfile,
    derive_profile,
    format_shape,
    parse_visible,
    profile_for_bundle,
)
from mae_deploy.runners.trt.runner import TrtRunner
from mae_deploy.runners.trt.session import EngineSession

__all__ = [
    "CAPABILITIES",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_OPT_BATCH",
    "DEFAULT_WORKSPACE_GB",
    "ENGINE_KEY_VERSION",
    "INPUTS",
    "INSTALL_HINT",
    "OUTPUT",
    "PARTS",
    "PRECISIONS",
    "TRT_ITEMSIZE",
    "TRT_TO_NUMPY",
    "BuildProgress",
    "BuildResult",
    "CachedEngine",
    "EngineBuildError",
    "EnginePaths",
    "EngineSession",
    "OrtTrtSetup",
    "Shape",
    "TrtCapabilities",
    "TrtProfile",
    "TrtRunner",
    "UnsupportedTensorRT",
    "_cuda",
    "_progress_monitor",
    "buffer_nbytes",
    "build_engine",
    "cuda_device_name",
    "default_cache_dir",
    "derive_profile",
    "dtype_itemsize",
    "engine_cache_key",
    "engine_paths",
    "format_shape",
    "get_or_build_engine",
    "graph_sha256",
    "import_cudart",
    "import_tensorrt",
    "installed_trt_generation",
    "numpy_dtype",
    "ort_trt_graph",
    "ort_trt_provider_options",
    "parse_cuda_device",
    "parse_visible",
    "profile_cache_dir",
    "profile_for_bundle",
    "select_graph",
    "set_device",
    "stream_handle",
    "timing_cache_path",
    "trt_api_generation",
    "trt_dtype_for_numpy",
    "trt_dtype_name",
]
