"""The machine's MatMul peak per backend and precision, probed in the same run as the rows it judges.

A row's achieved GFLOP/s means little alone; against the speed at which the *same engine* multiplies
matrices on this machine, with the same thread count, it says how far from the limit a graph is ("87 % of
this machine's fp32 peak"). The peak is the best of several GEMM shapes (``probe_shapes``): the encoder's
(and, when decoder rows run, the decoder's) own MatMul shapes at the largest batch and visible count of the
run (tokens x D x 3D for qkv, tokens x D x D, tokens x D x 4D, tokens x 4D x D, the patch embedding), then
large generic ones (1024^3 and 2048 x 1024 x 2048 on CPU; 8192^3 on a GPU). One shape alone understated
the limit for engines whose kernels prefer other shapes, and rows showed more than 100 %. Each shape is a
product with a constant weight, as in the exported graphs, so engines can pre-pack it: two untimed calls,
then timed calls (at least 3) for its share of ``seconds``; a shape's rate is its best call. The probe has
a time budget (``budget_s``): a shape whose five calls would not fit in what is left, judged from the rate
the earlier shapes reached, is skipped and recorded as such, so tiny test models and slow machines stay
quick. Every shape, its rate and which one set the peak are in the results (docs/bench-schema.md).

The ONNX probes (ORT, OpenVINO) time a chain of ``CHAIN`` products (K -> N, N -> K, ...) per call, as a
graph runs its layers: the input copy and the call's overhead are shared by four products, and the Q/DQ
probes put a Quantize/Dequantize pair before each, so an engine writes the tensor between two int8 layers
once, in int8, from the GEMM that makes it. A single Q/DQ product timed its float output write as well: it
read OpenVINO's int8 GEMMs at 1.2-1.7 TOPS where they run at 2.6-3.0 inside a graph (AMX, 2 threads), and
rows at 88 % of such a "peak" (issue #25). MatMulInteger (ORT's dynamic int8) stays one product: its graphs
write the int32 result of every product too.

    ort       fp32 MatMul chain; int8 MatMulInteger (uint8 x int8 -> int32, what the dynamic-int8 graphs run);
              an int8 Q/DQ variant (name containing "qdq" or "nncf") the Q/DQ MatMul chain ORT fuses;
              fp16 MatMul chain
    openvino  the same ONNX probes read by OpenVINO with the runner's inference precision
              (``runners.openvino.inference_precision``): fp32 (f32), bf16 (bf16), int8 (the Q/DQ chain,
              which OpenVINO runs in int8; bf16 between the int8 parts where the CPU has it)
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mae_deploy.errors import MaeDeployError

PROBE_KEYS = (
    "backend",
    "precision",
    "device",
    "op",
    "size",
    "unit",
    "peak",
    "calls",
    "seconds",
    "status",
    "reason",
    "shape",
    "shapes",
    "budget_s",
)
SHAPE_KEYS = ("m", "k", "n", "what", "rate", "calls", "seconds", "status")
_CPU_SIZE, _GPU_SIZE = 1024, 8192
# Large generic products after the model's own: a square one and a wider one (packing amortised over more work).
_GENERIC = {"cpu": ((1024, 1024, 1024), (2048, 1024, 2048)), "gpu": ((8192, 8192, 8192),)}
_BUDGET_S = {"cpu": 2.0, "gpu": 4.0}
CHAIN = 4  # products per call of an ONNX probe but MatMulInteger (see the module docstring)


@dataclass(frozen=True)
class ProbeCall:
    """One shape's probe: ``call`` runs ``products`` products of M x K x N each (``op`` names them)."""

    call: Callable[[], object]
    op: str
    products: int = 1


def unit_for(precision: str) -> str:
    """GOP/s for integer precisions, GFLOP/s for float ones."""
    return "GOP/s" if precision.startswith("int") else "GFLOP/s"


def _shape(m: int, k: int, n: int, what: str) -> dict:
    return {**dict.fromkeys(SHAPE_KEYS), "m": int(m), "k": int(k), "n": int(n), "what": what}


def model_shapes(arch: Mapping, batch: int, visible: int, decoder: bool = False) -> list[dict]:
    """The MatMul shapes (M x K x N, M = tokens of the whole batch) one call of the model runs.

    Encoder blocks on batch x (visible + 1) tokens: qkv D -> 3D, proj D -> D, fc1 D -> H, fc2 H -> D; the
    patch embedding (a Conv with stride = kernel, a GEMM) on every patch; with ``decoder`` the decoder blocks
    on batch x (L + 1) tokens. Attention's own products (per head, 64 wide) are left out: no engine reaches
    its peak on them, and the peak is a best-of.
    """
    from mae_deploy.bench.flops import arch_dims

    L, patch_dim, d, _, h = arch_dims(arch)
    t = batch * (visible + 1)
    shapes = [
        _shape(t, d, 3 * d, "encoder qkv"),
        _shape(t, d, d, "encoder proj"),
        _shape(t, d, h, "encoder fc1"),
        _shape(t, h, d, "encoder fc2"),
        _shape(batch * L, patch_dim, d, "patch embedding"),
    ]
    dd = int(arch.get("decoder_embed_dim") or 0)
    if decoder and dd and int(arch.get("decoder_depth") or 0):
        hd, td = int(dd * float(arch.get("mlp_ratio", 4.0))), batch * (L + 1)
        shapes += [
            _shape(td, dd, 3 * dd, "decoder qkv"),
            _shape(td, dd, hd, "decoder fc1"),
            _shape(td, hd, dd, "decoder fc2"),
        ]
    return shapes


def probe_shapes(device: str, model: Iterable[dict] = ()) -> list[dict]:
    """The shapes a probe times: the model's own (``model_shapes``), then the large generic ones, no duplicates."""
    kind = "cpu" if device == "cpu" else "gpu"
    out, seen = [], set()
    for s in [*model, *(_shape(m, k, n, "generic") for m, k, n in _GENERIC[kind])]:
        if (s["m"], s["k"], s["n"]) not in seen:
            seen.add((s["m"], s["k"], s["n"]))
            out.append(_shape(s["m"], s["k"], s["n"], s.get("what") or "given"))
    return out


def _chain(m: int, k: int, n: int, elem_dtype: type[np.floating] | None, helper, numpy_helper) -> tuple[list, list]:
    """Nodes and initializers of ``CHAIN`` MatMuls A (m x k) -> (m x n) -> (m x k) ..., output "Y".

    ``elem_dtype`` None: Q/DQ MatMuls with int8 weights per output channel (as NNCF and ORT's static quantiser
    write them) and a uint8 Quantize/Dequantize pair before each; else float weights of that dtype, scaled by
    1/sqrt(rows) so that values stay near 1 through the chain (fp16 would overflow otherwise)."""
    rng = np.random.default_rng(0)
    inits = []
    if elem_dtype is None:
        inits += [
            numpy_helper.from_array(np.array(0.03, np.float32), "as"),
            numpy_helper.from_array(np.array(128, np.uint8), "az"),
        ]
    nodes, x = [], "A"
    for i in range(CHAIN):
        rows, cols = (k, n) if i % 2 == 0 else (n, k)
        if elem_dtype is None:
            inits += [
                numpy_helper.from_array(rng.integers(-127, 127, (rows, cols), dtype=np.int8), f"W{i}"),
                numpy_helper.from_array(np.full(cols, 0.02, np.float32), f"ws{i}"),
                numpy_helper.from_array(np.zeros(cols, np.int8), f"wz{i}"),
            ]
            nodes += [
                helper.make_node("QuantizeLinear", [x, "as", "az"], [f"q{i}"]),
                helper.make_node("DequantizeLinear", [f"q{i}", "as", "az"], [f"a{i}"]),
                helper.make_node("DequantizeLinear", [f"W{i}", f"ws{i}", f"wz{i}"], [f"w{i}"], axis=1),
                helper.make_node("MatMul", [f"a{i}", f"w{i}"], [f"y{i}"]),
            ]
        else:
            weight = rng.standard_normal((rows, cols)) / np.sqrt(rows)
            inits.append(numpy_helper.from_array(weight.astype(elem_dtype), f"W{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"y{i}"]))
        x = f"y{i}"
    nodes[-1].output[0] = "Y"
    return nodes, inits


def _onnx_matmul(m: int, k: int, n: int, precision: str) -> tuple[bytes, np.ndarray, str, int]:
    """(serialized ONNX model, its input, op name, products per call) for (m x k) @ (k x n) at ``precision``."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise MaeDeployError("the MatMul probe graph is built with the onnx package: pip install onnx") from e
    rng = np.random.default_rng(0)
    if precision == "int8":  # ORT's dynamic int8 graphs: one product, its int32 output is what they write too
        a: np.ndarray = rng.integers(0, 255, (m, k), dtype=np.uint8)
        w = numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "W")
        nodes, inits = [helper.make_node("MatMulInteger", ["A", "W"], ["Y"])], [w]
        in_type, out_type, op, products, out_cols = TensorProto.UINT8, TensorProto.INT32, "MatMulInteger", 1, n
    else:
        quantized = precision.startswith("int8")
        dtype, elem = (np.float16, TensorProto.FLOAT16) if precision == "fp16" else (np.float32, TensorProto.FLOAT)
        a = rng.standard_normal((m, k)).astype(dtype)
        nodes, inits = _chain(m, k, n, None if quantized else dtype, helper, numpy_helper)
        in_type = out_type = elem
        op, products, out_cols = f"{'Q/DQ MatMul' if quantized else 'MatMul'} x{CHAIN}", CHAIN, (n if CHAIN % 2 else k)
    graph = helper.make_graph(
        nodes,
        "matmul_probe",
        [helper.make_tensor_value_info("A", in_type, [m, k])],
        [helper.make_tensor_value_info("Y", out_type, [m, out_cols])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), a, op, products


def _ort_call(precision: str, device: str, threads: int, m: int, k: int, n: int) -> ProbeCall:
    import onnxruntime as ort

    data, a, op, products = _onnx_matmul(m, k, n, precision)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"] if device == "cpu" else ["CUDAExecutionProvider"]
    sess = ort.InferenceSession(data, opts, providers=providers)
    return ProbeCall(lambda: sess.run(None, {"A": a}), op, products)


def _openvino_call(precision: str, device: str, threads: int, m: int, k: int, n: int) -> ProbeCall:
    import openvino as ov

    from mae_deploy.runners.openvino import cpu_supports_bf16, inference_precision

    if device != "cpu":
        raise MaeDeployError(f"the openvino probe runs on cpu, not {device}")
    data, a, op, products = _onnx_matmul(m, k, n, "int8-qdq" if precision.startswith("int8") else "fp32")
    core = ov.Core()
    hint = inference_precision(precision, cpu_supports_bf16(core))
    compiled = core.compile_model(
        core.read_model(data),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()
    return ProbeCall(lambda: request.infer({0: a}), op, products)


def _torch_call(precision: str, device: str, threads: int, m: int, k: int, n: int) -> ProbeCall:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise MaeDeployError(f"the torch backend has no {precision} matmul")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)

    def call():
        with torch.inference_mode():
            y = a @ b
        if device != "cpu":  # wait for the kernel, as the runners' copy back does
            torch.cuda.synchronize(device)
        return y

    return ProbeCall(call, "matmul")


_PROBES = {"ort": _ort_call, "openvino": _openvino_call, "torch": _torch_call}


def _time_shape(call: Callable[[], object], seconds: float, max_calls: int) -> tuple[float, int, float]:
    """(best call in s, timed calls, seconds spent) after two untimed calls (allocation, weight packing)."""
    for _ in range(2):
        call()
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < max_calls and (calls < 3 or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best, calls, time.perf_counter() - start


def probe_peak(
    backend: str,
    precision: str,
    device: str,
    threads: int,
    *,
    size: int | None = None,
    shapes: Iterable[dict] | None = None,
    seconds: float = 0.4,
    budget_s: float | None = None,
    max_calls: int = 200,
) -> dict:
    """Probe one (backend, precision, device); returns a dict with PROBE_KEYS (``peak`` in G per second).

    ``size`` probes the one square product size^3; else ``shapes`` (``probe_shapes``'s dicts; default: the
    generic ones). ``seconds`` of timed calls are shared among the shapes; ``budget_s`` bounds the whole probe.
    """
    kind = "cpu" if device == "cpu" else "gpu"
    if size is not None:
        todo = [_shape(size, size, size, "square")]
    else:
        todo = probe_shapes(device, shapes or ())
    budget = _BUDGET_S[kind] if budget_s is None else budget_s
    out: dict[str, Any] = dict.fromkeys(PROBE_KEYS)
    out.update(
        backend=backend, precision=precision, device=device, unit=unit_for(precision), budget_s=budget, shapes=todo
    )
    make = _PROBES.get(backend)
    if make is None:
        out.update(status="skipped", reason=f"no peak probe for the {backend} backend")
        return out
    start, best_rate, op, calls, products = time.perf_counter(), 0.0, None, 0, 1
    for s in todo:
        flops = 2 * s["m"] * s["k"] * s["n"] * products  # products per call: known from the first shape on
        left = budget - (time.perf_counter() - start)
        if best_rate and 5 * flops / (best_rate * 1e9) > left:  # two untimed + three timed calls would not fit
            s.update(status=f"skipped: over the probe's {budget:g} s budget")
            continue
        try:
            probe = make(precision, device, threads, s["m"], s["k"], s["n"])
            op, products = probe.op, probe.products
            flops = 2 * s["m"] * s["k"] * s["n"] * products
            t, n_calls, spent = _time_shape(probe.call, seconds / len(todo), max_calls)
        except (ImportError, MaeDeployError) as e:
            out.update(status="skipped", reason=f"{backend} {precision} probe unavailable: {e}")
            return out
        except Exception as e:  # an engine without this kernel (e.g. fp16 MatMul on a CPU provider)
            out.update(
                status="failed",
                reason=f"{backend} {precision} probe failed: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}",
            )
            return out
        s.update(rate=flops / t / 1e9, calls=n_calls, seconds=round(spent, 3), status="ok")
        calls += n_calls
        if s["rate"] > best_rate:
            best_rate, out["shape"] = s["rate"], [s["m"], s["k"], s["n"]]
    m, k, n = out["shape"]
    out.update(
        op=op,
        size=m if m == k == n else None,
        peak=best_rate,
        calls=calls,
        seconds=round(time.perf_counter() - start, 3),
        status="ok",
    )
    return out


class PeakProbes:
    """Probes run once per (backend, precision, device) in a benchmark run, then reused."""

    def __init__(self, threads: int, enabled: bool = True, shapes: Iterable[dict] = ()) -> None:
        """``shapes``: the model's own (``model_shapes``), probed before the generic ones."""
        self.threads, self.enabled, self.shapes = threads, enabled, list(shapes)
        self._cache: dict[tuple[str, str, str], dict] = {}

    def _probe(self, backend: str, precision: str, device: str) -> dict:
        if self.shapes:
            return probe_peak(backend, precision, device, self.threads, shapes=self.shapes)
        return probe_peak(backend, precision, device, self.threads)

    def get(self, backend: str, precision: str, device: str) -> dict | None:
        """The probe for this key (run now if not yet); None when probing is switched off."""
        if not self.enabled:
            return None
        key = (backend, precision, device)
        if key not in self._cache:
            self._cache[key] = self._probe(backend, precision, device)
        return self._cache[key]

    def confirm(self, backend: str, precision: str, device: str) -> dict | None:
        """Probe again (after the rows) and keep the faster of the two probes.

        A probe that met a burst of load from other processes would understate the peak and overstate
        every row's share of it; the limit is the best the engine showed in this run.
        """
        first = self.get(backend, precision, device)
        if first is None or first["status"] != "ok":
            return first
        again = self._probe(backend, precision, device)
        best = dict(again if again["status"] == "ok" and again["peak"] > first["peak"] else first)
        if again["status"] == "ok":
            best.update(calls=first["calls"] + again["calls"], seconds=round(first["seconds"] + again["seconds"], 3))
        self._cache[(backend, precision, device)] = best
        return best

    def results(self) -> list[dict]:
        return list(self._cache.values())


def probe_name(probe: dict) -> str:
    """What set the peak: ``ort fp32 MatMul x4 1024^3``, ``openvino int8 Q/DQ MatMul x4 1576x768x3072 (fc1)``."""
    head = f"{probe['backend']} {probe['precision']} {probe['op']}"
    if probe.get("size"):
        return f"{head} {probe['size']}^3"
    m, k, n = probe["shape"]
    what = next((s["what"] for s in probe.get("shapes") or [] if [s["m"], s["k"], s["n"]] == [m, k, n]), None)
    return f"{head} {m}x{k}x{n}" + (f" ({what})" if what else "")


def compute(flops: int, p50_ms: float, probe: dict | None, precision: str) -> dict:
    """A row's ``compute`` object: the work per call, the rate reached at p50, and its share of the peak.

    A share above 1 is kept, not clipped, and ``note`` says so: the row beat every probe shape (noise, load
    that hit the probes harder than the row, or a kernel the probe shapes do not reach).
    """
    achieved = flops / (p50_ms / 1000) / 1e9
    ok_probe = probe if probe is not None and probe.get("status") == "ok" else None
    fraction = achieved / ok_probe["peak"] if ok_probe is not None else None
    note = None if ok_probe is not None else (probe["reason"] if probe else "peak not probed (--no-peak)")
    if fraction is not None and fraction > 1:
        note = (
            f"above the probed peak ({100 * fraction:.0f} %): noise, load that hit the probes harder than the "
            "row, or a kernel the probe shapes do not reach"
        )
    return {
        "flops": int(flops),
        "unit": unit_for(precision),
        "achieved": achieved,
        "peak": ok_probe["peak"] if ok_probe is not None else None,
        "fraction_of_peak": fraction,
        "peak_probe": probe_name(ok_probe) if ok_probe is not None else None,
        "note": note,
    }
