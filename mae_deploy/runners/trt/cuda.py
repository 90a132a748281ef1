"""CUDA through cuda-python's runtime bindings: error checks, device selection and naming, stream handles.

Unrun on this project's machines (no GPU): checked against a fake ``cuda.bindings.runtime``
(tests/runners/test_trt_logic.py) and, for "no driver", against the real cuda-python installed here.
"""

from __future__ import annotations

from mae_deploy.errors import DeviceUnavailable, InputError


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


def set_device(cudart, device_id: int) -> None:
    """cudaSetDevice: the current device is per thread, so every entry point that may run on a new thread
    (building, creating a session, running) sets it before touching CUDA or TensorRT."""
    _cuda(cudart.cudaSetDevice(device_id), f"cudaSetDevice({device_id})")


def stream_handle(stream) -> int:
    """The ``cudaStream_t`` value TensorRT's ``execute_async_v3`` takes, from a cuda-python stream object.

    ``cuda.bindings.utils.get_cuda_native_handle`` (cuda-python 12.9+) is the documented way; ``int(stream)``
    (deprecated there) covers older releases. Never ``stream.getPtr()``: that is the address *of* the handle.
    """
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(stream)
    try:
        return int(get_cuda_native_handle(stream))
    except TypeError:  # not one of cuda-python's own types (e.g. a raw int)
        return int(stream)
