"""Tensors the caller already holds on a device: what runners accept besides numpy arrays.

Users who keep images as PyTorch or CuPy tensors on a GPU should not round-trip them through the host. A
runner accepts any object that speaks DLPack (``__dlpack__`` / ``__dlpack_device__``) for ``pixel_values``,
and its result comes back where the pixels came from:

- a numpy array in: numpy out (as always);
- a torch / CuPy tensor in: a tensor of the same library on the same device out.

:class:`DeviceArray` wraps such a tensor: its library, device, shape and dtype, a raw data pointer for
engines that bind memory (ONNX Runtime IO binding, TensorRT), a host copy for engines that need numpy, and
tensors of the same library for outputs. torch and CuPy are imported only when the caller's tensor is theirs.

Index arrays (``ids_keep``) are small and validated on the host (duplicates, range): a device ``ids_keep`` is
copied to the host first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mae_deploy.errors import InputError

# DLPack device types (dlpack.h): what ``__dlpack_device__()`` returns first.
DL_CPU, DL_CUDA, DL_CUDA_HOST, DL_CUDA_MANAGED = 1, 2, 3, 13
_GPU_TYPES = (DL_CUDA, DL_CUDA_MANAGED)


def _library(obj: object) -> str:
    """'torch', 'cupy' or the top-level module that defines the object's type."""
    return type(obj).__module__.split(".")[0]


@dataclass(frozen=True)
class DeviceArray:
    """A caller's DLPack tensor and what a runner needs to know about it."""

    obj: Any  # the caller's tensor, used through its own library's API (torch, CuPy, DLPack)
    library: str  # "torch" | "cupy" | another DLPack producer
    device_type: int  # DLPack device type (DL_CPU, DL_CUDA, ...)
    device_id: int

    @property
    def on_gpu(self) -> bool:
        return self.device_type in _GPU_TYPES

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.obj.shape)

    @property
    def dtype(self) -> str:
        """numpy's name for the element type ('float32', 'int64', ...)."""
        d = self.obj.dtype
        return str(d).removeprefix("torch.") if self.library == "torch" else np.dtype(d).name

    @property
    def contiguous(self) -> bool:
        if self.library == "torch":
            return bool(self.obj.is_contiguous())
        if self.library == "cupy":
            return bool(self.obj.flags.c_contiguous)
        cai = getattr(self.obj, "__cuda_array_interface__", None)
        return cai is not None and cai.get("strides") is None

    def data_ptr(self) -> int:
        """The address of the first element (device memory for GPU tensors)."""
        if self.library == "torch":
            return int(self.obj.data_ptr())
        if self.library == "cupy":
            return int(self.obj.data.ptr)
        cai = getattr(self.obj, "__cuda_array_interface__", None) or getattr(self.obj, "__array_interface__", None)
        if cai is None:
            raise InputError(
                f"cannot bind a {type(self.obj).__name__} to an engine: it has no data pointer; pass a "
                "numpy array, a torch tensor or a CuPy array"
            )
        return int(cai["data"][0])

    def synchronize(self) -> None:
        """Wait for the work that produces this tensor on its library's current stream.

        Engines run on their own streams and read the memory by address, so the producer must be done first.
        """
        if not self.on_gpu:
            return
        if self.library == "torch":
            import torch

            torch.cuda.current_stream(self.obj.device).synchronize()
        elif self.library == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    def to_numpy(self) -> np.ndarray:
        """A host copy (or a view, for CPU tensors)."""
        if self.library == "torch":
            return self.obj.detach().cpu().numpy()
        if self.library == "cupy":
            return self.obj.get()
        if self.on_gpu:
            raise InputError(
                f"cannot copy a {type(self.obj).__name__} from the GPU to the host; pass a torch tensor, "
                "a CuPy array or a numpy array"
            )
        return np.from_dlpack(self.obj)

    def empty(self, shape: tuple[int, ...], dtype: str = "float32"):
        """An uninitialised tensor of this library on this device, or None when the library is not known."""
        if self.library == "torch":
            import torch

            return torch.empty(shape, dtype=getattr(torch, dtype), device=self.obj.device)
        if self.library == "cupy":
            import cupy

            with cupy.cuda.Device(self.device_id):
                return cupy.empty(shape, dtype=dtype)
        return None

    def like(self, host: np.ndarray):
        """``host`` as a tensor of this library on this device (numpy when the library is not known)."""
        if self.library == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(host)).to(self.obj.device)
        if self.library == "cupy":
            import cupy

            with cupy.cuda.Device(self.device_id):
                return cupy.asarray(host)
        return host


def as_device_array(x: object) -> DeviceArray | None:
    """A :class:`DeviceArray` for a DLPack tensor (torch, CuPy, ...); None for numpy arrays and plain data."""
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack_device__"):
        return None
    try:
        device_type, device_id = x.__dlpack_device__()
    except Exception as e:  # a producer that cannot describe its device is not usable
        raise InputError(f"{type(x).__name__}.__dlpack_device__() failed: {e}") from e
    return DeviceArray(x, _library(x), int(device_type), int(device_id))


def host_array(x: object) -> object:
    """numpy for DLPack tensors (copied from a device when needed); anything else unchanged."""
    dev = as_device_array(x)
    return x if dev is None else dev.to_numpy()


def check_device_pixels(dev: DeviceArray, in_chans: int, image_size: int) -> None:
    """The shape and dtype checks of ``check_pixel_values`` for a tensor that stays on its device."""
    if dev.dtype != "float32":
        raise InputError(f"pixel_values on {dev.library} must be float32, got {dev.dtype}")
    shape = dev.shape
    if len(shape) != 4 or shape[1:] != (in_chans, image_size, image_size) or shape[0] < 1:
        raise InputError(
            f"pixel_values has shape {shape} but the model expects (N, {in_chans}, {image_size}, {image_size})"
        )
    if not dev.contiguous:
        raise InputError("pixel_values must be contiguous (call .contiguous() on it first)")
