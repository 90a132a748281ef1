"""Latency benchmark: backends x precisions x parts x batch sizes x visible-token counts.

For every combination the benchmark reports latency percentiles (p50/p90/p99/mean/min/max), throughput
(images/s), the peak host RSS during the row, peak device memory where it can be measured, the runner's
build time (session / model / engine creation, measured separately from inference), and the agreement of
the outputs with a reference (torch fp32 on CPU; ONNX Runtime fp32 when no reference weights are around),
so a fast but wrong backend cannot look good. The results format is documented in docs/bench-schema.md.

How the clock works:

- Every call is timed on the host with ``time.perf_counter_ns`` around ``runner.encode``/``decode``.
  Runners take and return host numpy arrays, so a GPU call has finished (and its output is copied back)
  when the call returns: wall-clock latency therefore includes host-device copies and synchronisation,
  like trtexec's "Latency" (not its "GPU Compute Time").
- For the torch backend on CUDA the rows also carry ``gpu_compute_ms``: the model alone on inputs already
  on the device, timed with CUDA events (like trtexec's "GPU Compute Time"), and the peak device memory
  from ``torch.cuda.max_memory_allocated``. ONNX Runtime and TensorRT allocate device memory outside
  torch's allocator, so their device memory is reported as null with that reason.
- Warm-up calls are excluded (the first one is kept as ``first_call_ms``); the garbage collector is
  paused during the timed loop; thread counts are pinned (ORT intra-op = T, inter-op = 1; torch T).

Not run on this project's machines (no GPU): the CUDA paths (CUDA events, device memory, the torch
reference's device handling on a GPU host) and every TensorRT row.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import io
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from mae_deploy import __version__
from mae_deploy.errors import InputError, MaeDeployError, MissingDependency

SCHEMA_VERSION = 1
BACKENDS = ("torch", "ort", "trt")
PRECISIONS = ("fp32", "fp16", "int8", "bf16")
PARTS = ("encoder", "decoder", "reconstruct")
KEY_FIELDS = ("backend", "precision", "part", "batch", "visible")
STATS = ("p50", "p90", "p99", "mean", "min", "max", "std")

# Keys every results file and every row carries (docs/bench-schema.md documents each; tests check both agree).
TOP_KEYS = (
    "schema_version", "tool", "mae_deploy_version", "created", "bundle", "config", "machine", "reference",
    "runners", "rows", "load_average",
)
ROW_KEYS = (
    "backend", "precision", "device", "part", "batch", "visible", "status", "reason", "warmup", "iterations",
    "latency_ms", "first_call_ms", "throughput_ips", "timing", "gpu_compute_ms", "peak_rss_mb", "rss_scope",
    "peak_device_mem_mb", "device_mem_note", "build_s", "threads", "agreement",
)
RUNNER_KEYS = ("backend", "precision", "device", "status", "reason", "build_s", "providers", "threads", "details")
AGREEMENT_KEYS = ("reference", "max_abs_diff", "mean_abs_diff", "cosine")

_LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt", "mae-deploy")
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted samples, linear interpolation between closest ranks.

    The same definition as ``numpy.percentile(..., method="linear")``: position (n-1)*q/100, interpolated
    between its two neighbours.
    """
    n = len(sorted_samples)
    if n == 0:
        raise InputError("percentile of no samples")
    if not 0 <= q <= 100:
        raise InputError(f"percentile q must be in [0, 100], got {q}")
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * frac)


def latency_stats(samples_ms: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max/std (population) of latency samples in milliseconds."""
    s = sorted(float(x) for x in samples_ms)
    if not s:
        raise InputError("no latency samples")
    mean = sum(s) / len(s)
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / len(s))
    return {
        "p50": percentile(s, 50), "p90": percentile(s, 90), "p99": percentile(s, 99),
        "mean": mean, "min": s[0], "max": s[-1], "std": std,
    }


def agreement(output: np.ndarray, reference: np.ndarray, reference_name: str) -> dict:
    """Max/mean absolute difference and the lowest per-image cosine similarity against the reference."""
    if output.shape != reference.shape:
        raise InputError(f"output shape {output.shape} differs from the reference's {reference.shape}")
    a = output.astype(np.float64).reshape(output.shape[0], -1)
    b = reference.astype(np.float64).reshape(reference.shape[0], -1)
    diff = np.abs(a - b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # Two all-zero images agree perfectly; one zero and one not share no direction.
    cos = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0),
                   np.where(np.linalg.norm(a - b, axis=1) == 0, 1.0, 0.0))
    finite = bool(np.isfinite(a).all())
    return {
        "reference": reference_name,
        "max_abs_diff": float(diff.max()) if finite else float("nan"),
        "mean_abs_diff": float(diff.mean()) if finite else float("nan"),
        "cosine": float(cos.min()) if finite else float("nan"),
    }


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def visible_counts(num_patches: int, visible: Sequence[int] | None = None,
                   mask_ratios: Sequence[float] | None = None) -> list[int]:
    """The visible-token counts to run: ``visible`` as given, or K = int(L*(1-r)) per mask ratio.

    Neither given: all tokens (feature extraction) and the MAE training ratio 0.75 (reconstruction).
    """
    from mae_deploy.masking import num_visible

    if visible is not None and mask_ratios is not None:
        raise InputError("give visible counts or mask ratios, not both (--visible or --mask-ratios)")
    if visible is None and mask_ratios is None:
        mask_ratios = (0.0, 0.75)
    out: list[int] = []
    if visible is not None:
        for k in visible:
            if not 1 <= int(k) <= num_patches:
                raise InputError(
                    f"visible token count {k} is outside 1..{num_patches} (this model has L={num_patches} patches)"
                )
            out.append(int(k))
    else:
        for r in mask_ratios:
            if not 0.0 <= r < 1.0:
                raise InputError(f"mask ratio {r} is outside [0, 1)")
            k = num_visible(num_patches, r)
            if k < 1:
                raise InputError(f"mask ratio {r} leaves no visible patch out of {num_patches}")
            out.append(k)
    return list(dict.fromkeys(out))  # unique, in the order given


def default_threads() -> int:
    """Physical cores this process may use: what ONNX Runtime would pick, pinned so it is recorded."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        physical = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    return max(1, min(physical, allowed))


@dataclass
class BenchConfig:
    """What to run. ``iters`` and ``duration`` exclude each other; neither means ``iters=20``."""

    backends: tuple[str, ...] = ("ort",)
    precisions: tuple[str, ...] = ("fp32",)
    device: str = "cpu"
    parts: tuple[str, ...] = ("encoder",)
    batch_sizes: tuple[int, ...] = (1,)
    visible: tuple[int, ...] | None = None
    mask_ratios: tuple[float, ...] | None = None
    warmup: int = 3
    iters: int | None = None
    duration: float | None = None
    threads: int | None = None
    checkpoint: str | None = None  # weights for the torch backend and the torch reference
    reference: bool = True  # compare outputs with the reference (costs one reference run per workload)
    seed: int = 0

    def validate(self) -> None:
        """Check everything that does not need the bundle; InputError names the bad value."""
        def check_names(values: Sequence[str], allowed: Sequence[str], what: str) -> None:
            if not values:
                raise InputError(f"no {what} given; choose from: {', '.join(allowed)}")
            for v in values:
                if v not in allowed:
                    raise InputError(f"unknown {what[:-1]} {v!r}; choose from: {', '.join(allowed)}")

        check_names(self.backends, BACKENDS, "backends")
        check_names(self.precisions, PRECISIONS, "precisions")
        check_names(self.parts, PARTS, "parts")
        if not self.batch_sizes:
            raise InputError("no batch sizes given")
        for b in self.batch_sizes:
            if int(b) < 1:
                raise InputError(f"batch size {b} is not a positive integer; use e.g. --batch-sizes 1,8,32")
        if self.visible is not None and self.mask_ratios is not None:
            raise InputError("give visible counts or mask ratios, not both (--visible or --mask-ratios)")
        if self.iters is not None and self.duration is not None:
            raise InputError("give an iteration count or a duration, not both (--iters or --duration)")
        if self.iters is not None and self.iters < 1:
            raise InputError(f"iterations must be at least 1, got {self.iters}")
        if self.duration is not None and not self.duration > 0:
            raise InputError(f"duration must be positive seconds, got {self.duration}")
        if self.warmup < 0:
            raise InputError(f"warm-up iterations must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be at least 1, got {self.threads}")
        if not (self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise InputError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N")

    @property
    def effective_iters(self) -> int | None:
        return self.iters if self.iters is not None or self.duration is not None else 20


# --------------------------------------------------------------------------------------------------
# Machine and memory
# --------------------------------------------------------------------------------------------------


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """CPU model name and the SIMD/matrix flags that decide ViT speed (from /proc/cpuinfo where present)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    if m:
        model = m.group(1).strip()
    f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    if f:
        present = set(f.group(1).split())
        flags = [x for x in _CPU_FLAGS if x in present]
    return model, flags


def _gpus() -> list[dict]:
    """GPUs as nvidia-smi reports them (name, driver, memory); [] without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return gpus


def library_versions(names: Iterable[str] = _LIBRARIES) -> dict[str, str]:
    """Installed versions (from package metadata: nothing is imported, so torch stays out)."""
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_info(libraries: Iterable[str] = _LIBRARIES) -> dict:
    """CPU model and flags, cores, threads, memory, GPUs and driver, OS, Python and library versions."""
    model, flags = cpu_model_and_flags()
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        cores, memory_gb = None, None
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "cores": cores,
        "threads": os.cpu_count(),
        "cpus_allowed": allowed,
        "memory_gb": memory_gb,
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(libraries),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class CpuShare:
    """How much CPU other processes used while this one measured (Linux /proc; None elsewhere).

    The load average counts this process's own threads, so it cannot tell contention from the benchmark
    itself; this can: (machine busy CPU time - this process's CPU time) / (wall time x CPUs).
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            ticks = [int(x) for x in fields]
        except (OSError, ValueError, IndexError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        busy = (sum(ticks[:8]) - idle) / hz  # guest time is already inside user/nice
        t = os.times()
        return time.monotonic(), busy, t.user + t.system

    def others(self) -> float | None:
        """Share of all CPUs (0..1) that other processes used since construction."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        if wall <= 0:
            return None
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return round(min(max(other / (wall * (os.cpu_count() or 1)), 0.0), 1.0), 3)


class _PeakRss:
    """Peak resident memory of this process over a window.

    On Linux the kernel's high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so the
    peak is the row's own. Elsewhere ``ru_maxrss`` is the peak since the process started (scope "process").
    """

    def __init__(self) -> None:
        self.scope = "process"

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.scope = "row"
        except OSError:
            self.scope = "process"

    def peak_mb(self) -> float:
        if self.scope == "row":
            try:
                m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
                if m:
                    return int(m.group(1)) / 1024
            except OSError:
                pass
            self.scope = "process"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, kB on Linux


# --------------------------------------------------------------------------------------------------
# Workloads and timing
# --------------------------------------------------------------------------------------------------


class _Workloads:
    """Seeded inputs per (batch, visible): pixel values, ids_keep, ids_restore. Same on every backend."""

    def __init__(self, bundle, seed: int) -> None:
        self.bundle, self.seed = bundle, seed
        self._pixels: dict[int, np.ndarray] = {}
        self._ids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def pixels(self, batch: int) -> np.ndarray:
        if batch not in self._pixels:
            b = self.bundle
            rng = np.random.default_rng([self.seed, batch])
            # Preprocessed images are roughly standard normal per channel.
            self._pixels[batch] = rng.standard_normal((batch, b.in_chans, b.image_size, b.image_size), np.float32)
        return self._pixels[batch]

    def ids(self, batch: int, visible: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids_keep (N,K), ids_restore (N,L)): all tokens in order when K = L, else a random mask per image."""
        key = (batch, visible)
        if key not in self._ids:
            L = self.bundle.num_patches
            if visible == L:
                from mae_deploy.masking import all_visible

                keep, restore, _ = all_visible(batch, L)
            else:
                # The official masking with K given directly (a mask ratio would round K through floats).
                noise = np.random.default_rng([self.seed, batch, visible]).random((batch, L))
                shuffle = np.argsort(noise, axis=1, kind="stable")
                keep = np.ascontiguousarray(shuffle[:, :visible], dtype=np.int64)
                restore = np.argsort(shuffle, axis=1, kind="stable").astype(np.int64)
            self._ids[key] = (keep, restore)
        return self._ids[key]


def time_calls(fn: Callable[[], object], warmup: int, iters: int | None, duration: float | None
               ) -> tuple[list[float], float]:
    """Call ``fn`` ``warmup`` times untimed-for-statistics, then ``iters`` times (or for ``duration``
    seconds, at least once); returns (latencies in ms, the very first call's latency in ms)."""
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter_ns()
        fn()
        if first is None:
            first = (time.perf_counter_ns() - t0) / 1e6
    samples: list[float] = []
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection in the middle of a call would land in one sample at random
    try:
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - t0) / 1e6)
            if iters is not None:
                if len(samples) >= iters:
                    break
            elif time.perf_counter() - start >= duration:
                break
    finally:
        if was_enabled:
            gc.enable()
    return samples, (first if first is not None else samples[0])


def _torch_gpu_compute(runner, part: str, pixels, keep, latent, restore, warmup: int, n: int) -> dict:
    """The model alone on device-resident inputs, timed with CUDA events (trtexec's GPU Compute Time).

    Not run here (no GPU). Uses the TorchRunner's ``model``, ``torch`` and ``precision`` attributes.
    """
    torch = runner.torch
    dev = torch.device(runner.device)
    model = runner.model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(runner.precision)
    x = torch.from_numpy(pixels).to(dev)
    k = torch.from_numpy(keep).to(dev)
    r = torch.from_numpy(restore).to(dev)
    lat = torch.from_numpy(latent).to(dev) if latent is not None else None

    def call():
        if part == "encoder":
            return model.forward_encoder(x, k)
        if part == "decoder":
            return model.forward_decoder(lat, r)
        return model.forward_decoder(model.forward_encoder(x, k), r)

    times = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(warmup):
            call()
        torch.cuda.synchronize(dev)
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return latency_stats(times)


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def _empty_row(backend: str, precision: str, device: str, part: str, batch: int, visible: int) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(backend=backend, precision=precision, device=device, part=part, batch=batch, visible=visible)
    return row


def _runner_opts(backend: str, threads: int, checkpoint: str | None, max_batch: int) -> dict:
    if backend == "ort":
        return {"intra_op_threads": threads, "inter_op_threads": 1}
    if backend == "torch":
        return {"threads": threads, **({"checkpoint": checkpoint} if checkpoint else {})}
    if backend == "trt":
        # The engine's profile must cover the largest batch, or the runner would split it into chunks.
        # Its optimum shape stays the runner's default (batch min(8, max), all tokens). Unrun here (no GPU).
        return {"max_batch": max_batch}
    return {}


def _runner_threads(info, backend: str) -> dict:
    d = info.details or {}
    if backend == "ort":
        return {"intra_op": d.get("intra_op_threads"), "inter_op": d.get("inter_op_threads")}
    if backend == "torch":
        return {"intra_op": d.get("threads"), "inter_op": None}
    return {"intra_op": None, "inter_op": None}


def _build_runner(bundle, backend: str, precision: str, device: str, threads: int, checkpoint: str | None,
                  parts_needed: Sequence[str], max_batch: int = 1):
    """Create a runner and its sessions/engines now; returns (runner, build seconds)."""
    from mae_deploy.runners import create_runner

    t0 = time.perf_counter()
    runner = create_runner(bundle, backend=backend, device=device, precision=precision,
                           **_runner_opts(backend, threads, checkpoint, max_batch))
    load = getattr(runner, "load", None)
    if callable(load):  # lazily-creating runners (ORT) build their sessions here, not in the first call
        # Every part encodes (decoder rows without a reference decode the runner's own latent).
        wants_decoder = runner.has_decoder and any(p in ("decoder", "reconstruct") for p in parts_needed)
        load(("encoder", "decoder") if wants_decoder else ("encoder",))
    return runner, time.perf_counter() - t0


class _Reference:
    """Reference outputs per (batch, visible): torch fp32 on CPU, else ORT fp32 on CPU (and why)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.note = ""
        self.info: dict = {}
        self.latent: dict[tuple[int, int], np.ndarray] = {}
        self.pred: dict[tuple[int, int], np.ndarray] = {}

    def describe(self) -> dict:
        return {"name": self.name, "device": "cpu" if self.name else None, "note": self.note, **self.info}


def _compute_reference(bundle, config: BenchConfig, work: _Workloads, visibles: list[int], threads: int,
                       progress: bool) -> _Reference:
    from tqdm import tqdm

    ref = _Reference()
    if not config.reference:
        ref.note = "agreement not measured (--no-reference)"
        return ref
    runner = None
    try:
        runner, _ = _build_runner(bundle, "torch", "fp32", "cpu", threads, config.checkpoint, config.parts)
        ref.name = "torch-fp32"
        ref.note = "PyTorch fp32 on CPU"
        ref.info = {"checkpoint": str(getattr(runner, "checkpoint", config.checkpoint))}
    except (MaeDeployError, ImportError) as e:
        torch_reason = str(e)
        try:
            runner, _ = _build_runner(bundle, "ort", "fp32", "cpu", threads, None, config.parts)
            ref.name = "ort-fp32"
            ref.note = (f"torch fp32 reference unavailable ({torch_reason}); ONNX Runtime fp32 on CPU is the "
                        "reference instead, so its own rows agree trivially")
        except (MaeDeployError, ImportError) as e2:
            ref.note = f"no reference available: torch ({torch_reason}); ort fp32 ({e2})"
            return ref
    need_decoder = any(p in ("decoder", "reconstruct") for p in config.parts) and runner.has_decoder
    jobs = [(b, k) for b in config.batch_sizes for k in visibles]
    try:
        for b, k in tqdm(jobs, desc=f"reference ({ref.name})", disable=not progress, leave=False):
            keep, restore = work.ids(b, k)
            ref.latent[(b, k)] = runner.encode(work.pixels(b), keep)
            if need_decoder:
                ref.pred[(b, k)] = runner.decode(ref.latent[(b, k)], restore)
    finally:
        runner.close()
    gc.collect()  # free the reference model before rows measure their own memory
    return ref


def _bench_row(row: dict, runner, part: str, work: _Workloads, ref: _Reference, config: BenchConfig,
               rss: _PeakRss) -> None:
    b, k = row["batch"], row["visible"]
    pixels = work.pixels(b)
    keep, restore = work.ids(b, k)
    ref_latent = ref.latent.get((b, k))
    if part == "encoder":
        def call():
            return runner.encode(pixels, keep)
        expected = ref_latent
    elif part == "decoder":
        # Fed the reference latent when there is one, so the decoder's own error is what is measured.
        latent = ref_latent if ref_latent is not None else runner.encode(pixels, keep)

        def call():
            return runner.decode(latent, restore)
        expected = ref.pred.get((b, k))
    else:
        def call():
            return runner.decode(runner.encode(pixels, keep), restore)
        expected = ref.pred.get((b, k))

    torch_cuda = row["backend"] == "torch" and row["device"].startswith("cuda")
    if torch_cuda:  # not run here (no GPU)
        runner.torch.cuda.reset_peak_memory_stats(runner.device)
    rss.reset()
    # The first call's output is the one checked against the reference. It is always excluded from the
    # statistics (it is the first warm-up call; with --warmup 0 the only excluded one) and kept as first_call_ms.
    t0 = time.perf_counter_ns()
    out = call()
    first = (time.perf_counter_ns() - t0) / 1e6
    samples, _ = time_calls(call, max(config.warmup - 1, 0), config.effective_iters, config.duration)
    stats = latency_stats(samples)
    row.update(
        status="ok", warmup=config.warmup, iterations=len(samples), latency_ms=stats, first_call_ms=first,
        throughput_ips=b * 1000.0 / stats["mean"], peak_rss_mb=round(rss.peak_mb(), 1), rss_scope=rss.scope,
        timing="wall-clock (perf_counter) around the runner call; host arrays in and out, so GPU work "
               "is synchronised by the copy back",
    )
    if torch_cuda:  # not run here (no GPU)
        row["peak_device_mem_mb"] = runner.torch.cuda.max_memory_allocated(runner.device) / 2**20
        row["device_mem_note"] = "torch.cuda.max_memory_allocated"
        row["gpu_compute_ms"] = _torch_gpu_compute(
            runner, part, pixels, keep, ref_latent if ref_latent is not None else runner.encode(pixels, keep),
            restore, config.warmup, len(samples))
    elif row["device"] == "cpu":
        row["device_mem_note"] = "cpu run: no device memory"
    else:
        row["device_mem_note"] = (f"not measured: {row['backend']} allocates device memory outside torch's "
                                  "allocator (use nvidia-smi or Nsight for it)")
    if expected is not None:
        row["agreement"] = agreement(out, expected, ref.name)


def _skip(rows: list[dict], base: dict, parts, batches, visibles, reason: str) -> None:
    for part in parts:
        for b in batches:
            for k in visibles:
                row = _empty_row(base["backend"], base["precision"], base["device"], part, b, k)
                row.update(status="skipped", reason=reason)
                rows.append(row)


def run_benchmark(bundle, config: BenchConfig, progress: bool = True) -> dict:
    """Run every combination of ``config`` on ``bundle`` (a Bundle or a path); returns the results dict.

    Unavailable combinations (a backend or device missing here, a precision the bundle lacks, a decoder
    part on an encoder-only bundle) become rows with status "skipped" and the reason; a row whose run
    raised becomes status "failed" with the error. The function itself raises only for bad input.
    """
    from tqdm import tqdm

    from mae_deploy.bundle import Bundle

    config.validate()
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    visibles = visible_counts(bundle.num_patches, config.visible, config.mask_ratios)
    threads = config.threads or default_threads()
    load_start = _load_average()
    cpu_share = CpuShare()
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    work = _Workloads(bundle, config.seed)
    ref = _compute_reference(bundle, config, work, visibles, threads, progress)

    rows: list[dict] = []
    runners: list[dict] = []
    rss = _PeakRss()
    total = len(config.backends) * len(config.precisions) * len(config.parts) * len(config.batch_sizes) * len(visibles)
    bar = tqdm(total=total, desc="bench", disable=not progress, leave=False)
    for backend in config.backends:
        for precision in config.precisions:
            base = {"backend": backend, "precision": precision, "device": config.device}
            entry = dict.fromkeys(RUNNER_KEYS)
            entry.update(base)
            runners.append(entry)
            try:
                runner, build_s = _build_runner(bundle, backend, precision, config.device, threads,
                                                config.checkpoint, config.parts, max(config.batch_sizes))
            except (MaeDeployError, ImportError) as e:
                reason = f"{backend} {precision} on {config.device} unavailable: {e}"
                entry.update(status="skipped", reason=reason)
                _skip(rows, base, config.parts, config.batch_sizes, visibles, reason)
                bar.update(len(config.parts) * len(config.batch_sizes) * len(visibles))
                continue
            info = runner.info
            threads_used = _runner_threads(info, backend)
            entry.update(status="ok", build_s=build_s, providers=list(info.providers), threads=threads_used,
                         details=_jsonable(info.details))
            try:
                for part in config.parts:
                    for b in config.batch_sizes:
                        for k in visibles:
                            row = _empty_row(backend, precision, config.device, part, b, k)
                            row.update(build_s=build_s, threads=threads_used)
                            rows.append(row)
                            bar.set_postfix_str(f"{backend} {precision} {part} b{b} k{k}")
                            if part != "encoder" and not runner.has_decoder:
                                row.update(status="skipped", reason="the bundle has no decoder (encoder-only)")
                            else:
                                try:
                                    _bench_row(row, runner, part, work, ref, config, rss)
                                except Exception as e:  # one failing row (e.g. out of memory) must not lose the rest
                                    row.update(status="failed", reason=f"{type(e).__name__}: {e}")
                            bar.update(1)
                entry["providers"] = list(runner.info.providers)  # sessions created lazily show up now
            finally:
                runner.close()
                gc.collect()
    bar.close()
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "mae-deploy bench",
        "mae_deploy_version": __version__,
        "created": created,
        "bundle": {
            "path": str(bundle.path), "name": bundle.name, "num_patches": bundle.num_patches,
            "image_size": bundle.image_size, "patch_size": bundle.patch_size, "embed_dim": bundle.embed_dim,
            "graphs": [{"part": g.part, "precision": g.precision, "file": g.file} for g in bundle.graphs],
        },
        "config": {**_jsonable(asdict(config)), "visible_counts": visibles, "threads": threads,
                   "iters": config.effective_iters},
        "machine": machine_info(),
        "reference": ref.describe(),
        "runners": runners,
        "rows": rows,
        "load_average": {"start": load_start, "end": _load_average(), "other_cpu_share": cpu_share.others()},
    }


def _jsonable(x: Any) -> Any:
    """Tuples to lists, paths to strings, anything else JSON cannot hold to its repr."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, np.generic):
        return x.item()
    return repr(x)


# --------------------------------------------------------------------------------------------------
# Results files: validation, JSON, CSV, Markdown, plot
# --------------------------------------------------------------------------------------------------


def validate_results(d: Any, where: str = "results") -> dict:
    """Check the keys of docs/bench-schema.md; InputError names what is missing or wrong."""
    if not isinstance(d, dict):
        raise InputError(f"{where} is not a JSON object")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise InputError(
            f"{where} has schema_version {d.get('schema_version')!r}; this mae-deploy reads {SCHEMA_VERSION} "
            "(is it a `mae-deploy bench --out` file?)"
        )
    missing = [k for k in TOP_KEYS if k not in d]
    if missing:
        raise InputError(f"{where} lacks {missing}")
    if not isinstance(d["rows"], list):
        raise InputError(f"{where}: 'rows' is not a list")
    for i, row in enumerate(d["rows"]):
        if not isinstance(row, dict):
            raise InputError(f"{where}: rows[{i}] is not an object")
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise InputError(f"{where}: rows[{i}] lacks {missing}")
        if row["status"] not in ("ok", "skipped", "failed"):
            raise InputError(f"{where}: rows[{i}] has status {row['status']!r}")
        if row["status"] == "ok":
            lat = row["latency_ms"]
            if not isinstance(lat, dict) or any(not isinstance(lat.get(s), (int, float)) for s in STATS):
                raise InputError(f"{where}: rows[{i}] latency_ms lacks some of {list(STATS)}")
    for i, r in enumerate(d["runners"]):
        missing = [k for k in RUNNER_KEYS if k not in r]
        if missing:
            raise InputError(f"{where}: runners[{i}] lacks {missing}")
    return d


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a results JSON written by :func:`write_json`."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise InputError(f"results file {p} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read results file {p}: {e}") from e
    return validate_results(d, str(p))


def _atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    p = Path(path)
    if p.parent and not p.parent.exists():
        raise InputError(f"cannot write {p}: directory {p.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_json(results: dict, path: str | os.PathLike) -> Path:
    return _atomic_write(path, (json.dumps(results, indent=2, allow_nan=True) + "\n").encode())


CSV_COLUMNS = (
    "backend", "precision", "device", "part", "batch", "visible", "status", "reason", "warmup", "iterations",
    *(f"{s}_ms" for s in STATS), "first_call_ms", "throughput_ips",
    *(f"gpu_{s}_ms" for s in ("p50", "mean")), "peak_rss_mb", "rss_scope", "peak_device_mem_mb",
    "build_s", "intra_op_threads", "inter_op_threads", "reference", "max_abs_diff", "mean_abs_diff", "cosine",
)


def csv_rows(results: dict) -> list[dict]:
    """One flat dict per row, keys CSV_COLUMNS."""
    out = []
    for r in results["rows"]:
        lat, gpu, agr, thr = r["latency_ms"] or {}, r["gpu_compute_ms"] or {}, r["agreement"] or {}, r["threads"] or {}
        flat = {k: r.get(k) for k in CSV_COLUMNS if k in r}
        flat.update({f"{s}_ms": lat.get(s) for s in STATS})
        flat.update({f"gpu_{s}_ms": gpu.get(s) for s in ("p50", "mean")})
        flat.update(intra_op_threads=thr.get("intra_op"), inter_op_threads=thr.get("inter_op"))
        flat.update({k: agr.get(k) for k in ("reference", "max_abs_diff", "mean_abs_diff", "cosine")})
        out.append(flat)
    return out


def write_csv(results: dict, path: str | os.PathLike) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for flat in csv_rows(results):
        w.writerow({k: ("" if v is None else v) for k, v in flat.items()})
    return _atomic_write(path, buf.getvalue().encode())


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}"


def _fmt_sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _machine_line(results: dict) -> str:
    m = results["machine"]
    gpu = "; ".join(f"{g['name']} (driver {g['driver']})" for g in m.get("gpus") or []) or "no GPU"
    flags = f" [{' '.join(m['cpu_flags'])}]" if m.get("cpu_flags") else ""
    return (f"{m['cpu_model']}{flags}, {m.get('cores')} cores / {m.get('threads')} threads "
            f"({m.get('cpus_allowed')} allowed), {gpu}")


def markdown_table(results: dict) -> str:
    """A Markdown table of the rows, with a header saying when, where and against what reference."""
    cfg, ref = results["config"], results["reference"]
    libs = ", ".join(f"{k} {v}" for k, v in results["machine"]["libraries"].items())
    lines = [
        f"Measured {results['created']} on {_machine_line(results)}; {libs}.",
        f"Threads pinned to {cfg['threads']}; warm-up {cfg['warmup']}; "
        + (f"{cfg['iters']} iterations" if cfg.get("iters") else f"{cfg['duration']} s per row")
        + f"; reference: {ref['name'] or 'none'}"
        + (f" ({ref['note']})" if ref.get("note") else "") + ".",
        "",
        "| backend | precision | part | batch | visible | p50 ms | p90 ms | p99 ms | mean ms | min ms | max ms "
        "| images/s | peak RSS MB | build s | max abs diff | cosine | status |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- |",
    ]
    for r in results["rows"]:
        lat, agr = r["latency_ms"] or {}, r["agreement"] or {}
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['part']} | {r['batch']} | {r['visible']} | "
            + " | ".join(_fmt(lat.get(s)) for s in ("p50", "p90", "p99", "mean", "min", "max"))
            + f" | {_fmt(r['throughput_ips'], 1)} | {_fmt(r['peak_rss_mb'], 0)} | {_fmt(r['build_s'])} | "
            f"{_fmt_sci(agr.get('max_abs_diff'))} | {_fmt(agr.get('cosine'), 6)} | {status.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(results: dict, path: str | os.PathLike) -> Path:
    return _atomic_write(path, ("# mae-deploy bench\n\n" + markdown_table(results)).encode())


def format_summary(results: dict) -> str:
    """Console table in the spirit of trtexec's performance summary."""
    cfg, ref, b = results["config"], results["reference"], results["bundle"]
    iters = f"{cfg['iters']} iterations" if cfg.get("iters") else f"{cfg['duration']} s per row"
    la = results.get("load_average") or {}
    lines = [
        f"=== Performance summary: {b['name']} (L={b['num_patches']}), {results['created']} ===",
        f"machine   {_machine_line(results)}",
        f"threads   pinned to {cfg['threads']} (ORT intra-op {cfg['threads']}, inter-op 1; torch {cfg['threads']})",
        f"timing    wall-clock per call, warm-up {cfg['warmup']} excluded, {iters}; latency in ms",
        f"reference {ref['name'] or 'none'}" + (f": {ref['note']}" if ref.get("note") else ""),
    ]
    if la.get("other_cpu_share") is not None:
        share = la["other_cpu_share"]
        lines.append(f"other CPU {100 * share:.0f} % of the machine used by other processes during the run"
                     + (" (contended: latencies are pessimistic)" if share > 0.05 else ""))
    head = (f"{'backend':<7} {'prec':<5} {'part':<11} {'batch':>5} {'vis':>4} | {'p50':>8} {'p90':>8} {'p99':>8} "
            f"{'mean':>8} {'min':>8} {'max':>8} {'cv%':>5} | {'img/s':>8} {'RSS MB':>7} {'build s':>7} | "
            f"{'max|d|':>7} {'cosine':>8}")
    lines += [head, "-" * len(head)]
    rows = results["rows"]
    i = 0
    while i < len(rows):
        r = rows[i]
        key = f"{r['backend']:<7} {r['precision']:<5} {r['part']:<11} {r['batch']:>5} {r['visible']:>4} |"
        if r["status"] != "ok":
            # A runner that could not be built skips all its rows for one reason: say it once.
            j = i
            while (j + 1 < len(rows) and rows[j + 1]["status"] == r["status"] and rows[j + 1]["reason"] == r["reason"]
                   and (rows[j + 1]["backend"], rows[j + 1]["precision"]) == (r["backend"], r["precision"])):
                j += 1
            if j > i:
                key = f"{r['backend']:<7} {r['precision']:<5} {'(' + str(j - i + 1) + ' rows)':<22} |"
            lines.append(f"{key} {r['status']}: {r['reason']}")
            i = j + 1
            continue
        lat, agr = r["latency_ms"], r["agreement"] or {}
        cv = 100 * lat["std"] / lat["mean"] if lat["mean"] else 0.0
        lines.append(
            f"{key} " + " ".join(f"{lat[s]:>8.2f}" for s in ("p50", "p90", "p99", "mean", "min", "max"))
            + f" {cv:>5.0f} | {r['throughput_ips']:>8.1f} {r['peak_rss_mb']:>7.0f} {_fmt(r['build_s']):>7} | "
            f"{_fmt_sci(agr.get('max_abs_diff')):>7} {_fmt(agr.get('cosine'), 5):>8}"
        )
        i += 1
        if r.get("gpu_compute_ms"):
            g = r["gpu_compute_ms"]
            lines.append(f"{'':<38}GPU compute (CUDA events): p50 {g['p50']:.3f} mean {g['mean']:.3f} ms; "
                         f"peak device memory {_fmt(r['peak_device_mem_mb'], 0)} MB")
    return "\n".join(lines)


def write_plot(results: dict, path: str | os.PathLike) -> Path:
    """PNG: latency (p50) vs batch size per backend/precision, and encoder latency vs visible tokens."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependency("matplotlib", "bench --plot", "pip install 'mae-deploy[plot]'") from e
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)

    part = next((p for p in PARTS if any(r["part"] == p for r in ok)), None)
    if part is not None:
        vis = max(r["visible"] for r in ok if r["part"] == part)
        for (be, pr) in dict.fromkeys((r["backend"], r["precision"]) for r in ok):
            pts = sorted((r["batch"], r["latency_ms"]["p50"]) for r in ok
                         if (r["backend"], r["precision"], r["part"], r["visible"]) == (be, pr, part, vis))
            if pts:
                ax1.plot(*zip(*pts, strict=True), marker="o", label=f"{be} {pr}")
                for xb, yv in pts:  # values on the points: a log axis over less than a decade has few ticks
                    ax1.annotate(f"{yv:.3g}", (xb, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax1.set_title(f"{part} latency vs batch ({vis} visible tokens)")
        ax1.set_xscale("log", base=2)
        ax1.set_yscale("log")  # backends and precisions differ by multiples: ratios read as distances
        batches = sorted({r["batch"] for r in ok})
        ax1.set_xticks(batches, [str(b) for b in batches])
        ax1.minorticks_off()
        ax1.legend()
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("p50 latency (ms)")

    enc = [r for r in ok if r["part"] == "encoder"]
    if enc:
        batch = max(r["batch"] for r in enc)
        for (be, pr) in dict.fromkeys((r["backend"], r["precision"]) for r in enc):
            pts = sorted((r["visible"], r["latency_ms"]["p50"]) for r in enc
                         if (r["backend"], r["precision"], r["batch"]) == (be, pr, batch))
            if pts:
                ax2.plot(*zip(*pts, strict=True), marker="o", label=f"{be} {pr}")
        ax2.set_title(f"encoder latency vs visible tokens (batch {batch})")
        ax2.legend()
    ax2.set_xlabel("visible tokens")
    ax2.set_ylabel("p50 latency (ms)")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"mae-deploy bench: {results['bundle']['name']}, {results['machine']['cpu_model']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# Compare
# --------------------------------------------------------------------------------------------------


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY_FIELDS)


def compare_results(new: dict, old: dict) -> dict:
    """Per-row ratios new/old for rows measured ("ok") in both, matched by backend/precision/part/batch/visible.

    ``p50_ratio`` and ``mean_ratio`` below 1 mean the new run is faster; ``throughput_ratio`` above 1 too.
    """
    def measured(results: dict) -> dict[tuple, dict]:
        return {row_key(r): r for r in results["rows"] if r["status"] == "ok"}

    n, o = measured(new), measured(old)
    rows = []
    for key, nr in n.items():
        if key not in o:
            continue
        orow = o[key]
        rows.append({
            **dict(zip(KEY_FIELDS, key, strict=True)),
            "old_p50_ms": orow["latency_ms"]["p50"], "new_p50_ms": nr["latency_ms"]["p50"],
            "p50_ratio": nr["latency_ms"]["p50"] / orow["latency_ms"]["p50"],
            "mean_ratio": nr["latency_ms"]["mean"] / orow["latency_ms"]["mean"],
            "throughput_ratio": nr["throughput_ips"] / orow["throughput_ips"],
        })
    notes = []
    om, nm = old["machine"].get("cpu_model"), new["machine"].get("cpu_model")
    if om != nm:
        notes.append(f"the runs are from different CPUs ({om} vs {nm})")
    return {
        "rows": rows,
        "only_new": [dict(zip(KEY_FIELDS, k, strict=True)) for k in n if k not in o],
        "only_old": [dict(zip(KEY_FIELDS, k, strict=True)) for k in o if k not in n],
        "notes": notes,
    }


def format_compare(cmp: dict, old_name: str = "old") -> str:
    head = (f"{'backend':<7} {'prec':<5} {'part':<11} {'batch':>5} {'vis':>4} | {'old p50':>9} {'new p50':>9} "
            f"{'p50 new/old':>11} {'mean new/old':>12} {'img/s new/old':>13}")
    lines = [f"=== Compared with {old_name} (ratios below 1 in latency = faster now) ===", head, "-" * len(head)]
    for r in cmp["rows"]:
        lines.append(
            f"{r['backend']:<7} {r['precision']:<5} {r['part']:<11} {r['batch']:>5} {r['visible']:>4} | "
            f"{r['old_p50_ms']:>9.2f} {r['new_p50_ms']:>9.2f} {r['p50_ratio']:>11.3f} {r['mean_ratio']:>12.3f} "
            f"{r['throughput_ratio']:>13.3f}"
        )
    if not cmp["rows"]:
        lines.append("(no measured row matches: compare runs with the same backends/precisions/parts/batches/visible)")
    for what, label in (("only_new", "only in this run"), ("only_old", f"only in {old_name}")):
        if cmp[what]:
            keys = ["/".join(str(v) for v in k.values()) for k in cmp[what]]
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            lines.append(f"{label} ({len(keys)}): {', '.join(keys[:8])}{more}")
    lines += [f"note: {n}" for n in cmp["notes"]]
    return "\n".join(lines)


def write_outputs(results: dict, json_path: str | None = None, csv_path: str | None = None,
                  markdown_path: str | None = None, plot_path: str | None = None) -> list[str]:
    """Write the requested files (None skips one); returns the paths written."""
    written = []
    for path, writer in ((json_path, write_json), (csv_path, write_csv), (markdown_path, write_markdown),
                         (plot_path, write_plot)):
        if path:
            written.append(str(writer(results, path)))
    return written
