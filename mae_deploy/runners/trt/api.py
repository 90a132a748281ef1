"""TensorRT API generations (10.x, 11.x), importing tensorrt / cuda-python, and which graph a build takes.

Unrun on this project's machines (no GPU, no TensorRT): written from the TensorRT 10.x / 11.x Python API
and cuda-python documentation, checked on the CPU against fakes (tests/runners/test_trt_logic.py).

TensorRT 10 still has the weak-typing builder flags (``BuilderFlag.FP16`` ...); TensorRT 11 removed them
and ``EXPLICIT_BATCH``: every network is strongly typed, so precision comes from the ONNX file. fp16
therefore means the fp32 graph + ``BuilderFlag.FP16`` on 10, and the bundle's ``*.fp16.onnx`` variant on
11 (:func:`select_graph`). :data:`CAPABILITIES` records the differences.
"""

from __future__ import annotations

import ctypes.util
import re
from dataclasses import dataclass
from importlib import metadata

from mae_deploy.errors import BundleError, DeviceUnavailable, InputError, MaeDeployError, MissingDependency
from mae_deploy.names import TRT_PRECISIONS
from mae_deploy.runners.base import PART_INPUTS, PART_OUTPUT
from mae_deploy.runners.base import PARTS as PARTS  # re-exported: the trt package names its parts here

# `trt` is TensorRT 10 + cuda-python 12 for CUDA 12 drivers; `trt-cu13` is TensorRT 11 + cuda-python 13.
INSTALL_HINT = "pip install 'mae-deploy[trt]' (CUDA 12 driver; 'mae-deploy[trt-cu13]' for CUDA 13)"
PRECISIONS = TRT_PRECISIONS
INPUTS, OUTPUT = PART_INPUTS, PART_OUTPUT
# Distributions that carry TensorRT's libraries, newest naming first (for a version without importing them).
TRT_DISTRIBUTIONS = (
    "tensorrt",
    "tensorrt-cu13",
    "tensorrt-cu12",
    "tensorrt-cu13-libs",
    "tensorrt-cu12-libs",
    "tensorrt-libs",
)


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
    10: TrtCapabilities(
        10,
        precision_builder_flags=True,
        always_strongly_typed=False,
        strongly_typed_flag=True,
        explicit_batch_flag=False,
        fp16_source="builder-flag",
    ),
    11: TrtCapabilities(
        11,
        precision_builder_flags=False,
        always_strongly_typed=True,
        strongly_typed_flag=False,
        explicit_batch_flag=False,
        fp16_source="onnx-variant",
    ),
}


class UnsupportedTensorRT(MissingDependency):
    """TensorRT is installed but older than 10 (the name-based tensor API and this module need 10+)."""

    def __init__(self, version: str) -> None:
        MaeDeployError.__init__(
            self,
            f"the trt backend needs TensorRT 10 or newer, but TensorRT {version} is installed; "
            f"upgrade it: pip install -U 'mae-deploy[trt]' (CUDA 12) or 'mae-deploy[trt-cu13]' (CUDA 13)",
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


def installed_trt_generation(find_library=ctypes.util.find_library, version=metadata.version) -> int | None:
    """The TensorRT major installed here (10 or 11), without importing it; None when none is found.

    For ONNX Runtime's TensorRT provider, which links libnvinfer itself and does not say which version:
    the pip distributions are asked first, then the shared library's soname (``libnvinfer.so.10``).
    """
    for dist in TRT_DISTRIBUTIONS:
        try:
            return trt_api_generation(version(dist))
        except (metadata.PackageNotFoundError, MaeDeployError):
            continue
    lib = find_library("nvinfer")
    m = re.search(r"\.so\.(\d+)", lib or "")
    if m and int(m.group(1)) >= 10:
        return trt_api_generation(m.group(1))
    return None


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
