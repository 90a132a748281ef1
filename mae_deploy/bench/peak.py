"""The machine's MatMul peak per backend and precision, probed in the same run as the rows it judges.

A row's achieved GFLOP/s means little alone; against the speed at which the *same engine* multiplies
large matrices on this machine, with the same thread count, it says how far from the limit a graph is
("87 % of this machine's fp32 peak"). Each probe is one square matrix product (1024^3 on CPU, about
the size of ViT-B's qkv product at batch 8; 8192^3 on a GPU), the weight a constant as in the exported
graphs so engines can pre-pack it: two untimed calls, then timed calls for about 0.4 s (at least 3).
The peak is the best call: the probe measures the limit, not a typical call.

    ort       fp32 MatMul; int8 MatMulInteger (uint8 x int8, what the dynamic-int8 graphs run);
              an int8 Q/DQ variant (name containing "qdq") the Q/DQ MatMul ORT fuses; fp16 MatMul
    openvino  the same ONNX probes read by OpenVINO: fp32 (inference precision f32), bf16 (precision
              hint bf16), int8 (the Q/DQ MatMul, which OpenVINO runs in int8)
    torch     torch.matmul in fp32 or bf16 (fp16 on CUDA); the torch backend has no int8
    trt       no probe (a TensorRT engine per probe would cost more than the rows)

Probes are cached per run, one per (backend, precision, device), and run twice: before the rows of
their runner and after them (``PeakProbes.confirm``); the faster counts, so a burst of load from another
process during one probe does not make rows look closer to the limit than they are. A probe that cannot run (no onnx
package to build the probe graph, an engine without that kernel) gives a peak of null and the reason.
CUDA probes: ORT's CUDA provider and torch on cuda (what has run where: docs/verification.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from mae_deploy.errors import MaeDeployError

PROBE_KEYS = ("backend", "precision", "device", "op", "size", "unit", "peak", "calls", "seconds", "status", "reason")
_CPU_SIZE, _GPU_SIZE = 1024, 8192


def unit_for(precision: str) -> str:
    """GOP/s for integer precisions, GFLOP/s for float ones."""
    return "GOP/s" if precision.startswith("int") else "GFLOP/s"


def _onnx_matmul(n: int, precision: str) -> tuple[bytes, np.ndarray, str]:
    """(serialized ONNX model, its input, op name) for an n x n x n product at ``precision``."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise MaeDeployError("the MatMul probe graph is built with the onnx package: pip install onnx") from e
    rng = np.random.default_rng(0)
    if precision.startswith("int8") and "qdq" not in precision:
        a = rng.integers(0, 255, (n, n), dtype=np.uint8)
        w = numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "W")
        node = helper.make_node("MatMulInteger", ["A", "W"], ["Y"])
        inputs, out_type, op = [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])], TensorProto.INT32, \
            "MatMulInteger"
        nodes, inits = [node], [w]
    elif precision.startswith("int8"):
        a = rng.standard_normal((n, n), dtype=np.float32)
        inits = [
            numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "Wq"),
            numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
            numpy_helper.from_array(np.array(0, np.int8), "wz"),
            numpy_helper.from_array(np.array(0.03, np.float32), "as"),
            numpy_helper.from_array(np.array(128, np.uint8), "az"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["A", "as", "az"], ["Aq"]),
            helper.make_node("DequantizeLinear", ["Aq", "as", "az"], ["Ad"]),
            helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"]),
            helper.make_node("MatMul", ["Ad", "Wd"], ["Y"]),
        ]
        inputs, out_type, op = [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])], TensorProto.FLOAT, \
            "Q/DQ MatMul"
    else:
        dtype, elem = (np.float16, TensorProto.FLOAT16) if precision == "fp16" else (np.float32, TensorProto.FLOAT)
        a = rng.standard_normal((n, n)).astype(dtype)
        inits = [numpy_helper.from_array(rng.standard_normal((n, n)).astype(dtype), "W")]
        nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"])]
        inputs, out_type, op = [helper.make_tensor_value_info("A", elem, [n, n])], elem, "MatMul"
    graph = helper.make_graph(nodes, "matmul_probe", inputs, [helper.make_tensor_value_info("Y", out_type, [n, n])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), a, op


def _ort_call(precision: str, device: str, threads: int, n: int) -> tuple[Callable[[], object], str]:
    import onnxruntime as ort

    data, a, op = _onnx_matmul(n, precision)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"] if device == "cpu" else ["CUDAExecutionProvider"]
    sess = ort.InferenceSession(data, opts, providers=providers)
    return (lambda: sess.run(None, {"A": a})), op


def _openvino_call(precision: str, device: str, threads: int, n: int) -> tuple[Callable[[], object], str]:
    import openvino as ov

    if device != "cpu":
        raise MaeDeployError(f"the openvino probe runs on cpu, not {device}")
    data, a, op = _onnx_matmul(n, "int8-qdq" if precision.startswith("int8") else "fp32")
    core = ov.Core()
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = core.compile_model(core.read_model(data), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return (lambda: request.infer({0: a})), op


def _torch_call(precision: str, device: str, threads: int, n: int) -> tuple[Callable[[], object], str]:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise MaeDeployError(f"the torch backend has no {precision} matmul")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)

    def call():
        with torch.inference_mode():
            y = a @ b
        if device != "cpu":  # wait for the kernel, as the runners' copy back does
            torch.cuda.synchronize(device)
        return y

    return call, "matmul"


_PROBES = {"ort": _ort_call, "openvino": _openvino_call, "torch": _torch_call}


def probe_peak(backend: str, precision: str, device: str, threads: int, *, size: int | None = None,
               seconds: float = 0.4, max_calls: int = 200) -> dict:
    """Probe one (backend, precision, device); returns a dict with PROBE_KEYS (``peak`` in G per second)."""
    n = size or (_CPU_SIZE if device == "cpu" else _GPU_SIZE)
    out = dict.fromkeys(PROBE_KEYS)
    out.update(backend=backend, precision=precision, device=device, size=n, unit=unit_for(precision))
    make = _PROBES.get(backend)
    if make is None:
        out.update(status="skipped", reason=f"no peak probe for the {backend} backend")
        return out
    try:
        call, op = make(precision, device, threads, n)
        for _ in range(2):  # first calls pay for allocation and weight packing
            call()
        best, calls, start = float("inf"), 0, time.perf_counter()
        while calls < max_calls and (calls < 3 or time.perf_counter() - start < seconds):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
            calls += 1
    except (ImportError, MaeDeployError) as e:
        out.update(status="skipped", reason=f"{backend} {precision} probe unavailable: {e}")
        return out
    except Exception as e:  # an engine without this kernel (e.g. fp16 MatMul on a CPU provider)
        out.update(status="failed", reason=f"{backend} {precision} probe failed: {type(e).__name__}: "
                                           f"{str(e).splitlines()[0] if str(e) else ''}")
        return out
    out.update(op=op, peak=2 * n**3 / best / 1e9, calls=calls, seconds=round(time.perf_counter() - start, 3),
               status="ok")
    return out


class PeakProbes:
    """Probes run once per (backend, precision, device) in a benchmark run, then reused."""

    def __init__(self, threads: int, enabled: bool = True) -> None:
        self.threads, self.enabled = threads, enabled
        self._cache: dict[tuple[str, str, str], dict] = {}

    def get(self, backend: str, precision: str, device: str) -> dict | None:
        """The probe for this key (run now if not yet); None when probing is switched off."""
        if not self.enabled:
            return None
        key = (backend, precision, device)
        if key not in self._cache:
            self._cache[key] = probe_peak(backend, precision, device, self.threads)
        return self._cache[key]

    def confirm(self, backend: str, precision: str, device: str) -> dict | None:
        """Probe again (after the rows) and keep the faster of the two probes.

        A probe that met a burst of load from other processes would understate the peak and overstate
        every row's share of it; the limit is the best the engine showed in this run.
        """
        first = self.get(backend, precision, device)
        if first is None or first["status"] != "ok":
            return first
        again = probe_peak(backend, precision, device, self.threads)
        best = dict(again if again["status"] == "ok" and again["peak"] > first["peak"] else first)
        if again["status"] == "ok":
            best.update(calls=first["calls"] + again["calls"], seconds=round(first["seconds"] + again["seconds"], 3))
        self._cache[(backend, precision, device)] = best
        return best

    def results(self) -> list[dict]:
        return list(self._cache.values())


def compute(flops: int, p50_ms: float, probe: dict | None, precision: str) -> dict:
    """A row's ``compute`` object: the work per call, the rate reached at p50, and its share of the peak."""
    achieved = flops / (p50_ms / 1000) / 1e9
    ok = probe is not None and probe.get("status") == "ok"
    return {
        "flops": int(flops),
        "unit": unit_for(precision),
        "achieved": achieved,
        "peak": probe["peak"] if ok else None,
        "fraction_of_peak": achieved / probe["peak"] if ok else None,
        "peak_probe": f"{probe['backend']} {probe['precision']} {probe['op']} {probe['size']}^3" if ok else None,
        "note": None if ok else (probe["reason"] if probe else "peak not probed (--no-peak)"),
    }
