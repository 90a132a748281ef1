"""TensorRT data types by name (so they work without tensorrt imported): numpy dtypes and buffer sizes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mae_deploy.errors import InputError, MissingDependency

Shape = tuple[int, ...]


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
    "FLOAT": 4,
    "HALF": 2,
    "BF16": 2,
    "INT8": 1,
    "UINT8": 1,
    "INT32": 4,
    "INT64": 8,
    "BOOL": 1,
    "FP8": 1,
    "INT4": 0.5,
    "FP4": 0.5,
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
        raise InputError(
            f"TensorRT data type {name} has no numpy equivalent; the graph's inputs and outputs "
            "must be float32/float16/int32/int64"
        )
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
