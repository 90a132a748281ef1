"""One deserialized engine with its execution context, device buffers and stream.

Execution uses the name-based tensor API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``)
on one CUDA stream, with device buffers from cuda-python (``cudaMalloc``) sized for the profile's max shapes
and reused by every call. Unrun on this project's machines (no GPU): checked against fakes that simulate
the documented contracts on the host (tests/runners/test_trt_logic.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mae_deploy.errors import BundleError, InputError
from mae_deploy.runners.trt.api import INPUTS, OUTPUT
from mae_deploy.runners.trt.build import EngineBuildError
from mae_deploy.runners.trt.cuda import _cuda, set_device, stream_handle
from mae_deploy.runners.trt.dtypes import Shape, buffer_nbytes, numpy_dtype


class EngineSession:
    """One deserialized engine with its execution context and device buffers (sized for the profile max)."""

    def __init__(self, trt, cudart, blob: bytes, part: str, device_id: int) -> None:
        self.trt, self.cudart, self.part, self.device_id = trt, cudart, part, device_id
        self.buffers: dict[str, int] = {}
        self.capacity: dict[str, int] = {}
        self.stream = None
        set_device(cudart, device_id)
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
            raise BundleError(
                f"the {part} engine has inputs {self.inputs} and outputs {self.outputs}; expected "
                f"inputs {list(INPUTS[part])} and output '{OUTPUT[part]}'"
            )
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

    def run(self, feeds: Mapping[str, np.ndarray], out_name: str | None = None) -> np.ndarray:
        """Copy ``feeds`` in, execute, copy one output back (default: the part's main one), all on the session's
        stream. Only that output crosses to the host (e.g. ``pooled_cls``, (N, D), instead of the latent)."""
        cudart, ctx = self.cudart, self.context
        set_device(cudart, self.device_id)  # the calling thread may be another one
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = []  # host arrays must outlive their async copies
        for n in self.inputs:
            arr = np.ascontiguousarray(feeds[n], dtype=self.dtypes[n])
            if arr.nbytes > self.capacity[n]:
                raise InputError(f"{n} of shape {arr.shape} exceeds the engine's max shape {self.max_shapes[n]}")
            if not ctx.set_input_shape(n, tuple(arr.shape)):
                raise InputError(
                    f"the TensorRT {self.part} engine refused {n} of shape {arr.shape} "
                    f"(profile max {self.max_shapes[n]})"
                )
            keep.append(arr)
            _cuda(
                cudart.cudaMemcpyAsync(self.buffers[n], arr.ctypes.data, arr.nbytes, h2d, self.stream),
                f"cudaMemcpyAsync({n} to device)",
            )
        out_name = out_name or OUTPUT[self.part]
        shape = tuple(int(d) for d in ctx.get_tensor_shape(out_name))
        out = np.empty(shape, dtype=self.dtypes[out_name])
        if out.nbytes > self.capacity[out_name]:
            raise EngineBuildError(f"output {out_name} {shape} is larger than its buffer; rebuild the engine")
        if not ctx.execute_async_v3(stream_handle(self.stream)):
            raise EngineBuildError(f"TensorRT failed to execute the {self.part} engine")
        _cuda(
            cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[out_name], out.nbytes, d2h, self.stream),
            f"cudaMemcpyAsync({out_name} to host)",
        )
        _cuda(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        del keep
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def close(self) -> None:
        cudart = self.cudart
        cudart.cudaSetDevice(self.device_id)  # free on the engine's device, whichever thread closes
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
