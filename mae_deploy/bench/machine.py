"""The machine a benchmark ran on: CPU model and flags, cores, GPUs, library versions, load, memory.

Read from /proc, the ``cpuid`` instruction and package metadata only: nothing here imports torch or an
inference engine.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from mae_deploy.cpuid import FEATURE_BITS, visible_flags

LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt", "openvino", "mae-deploy")
_CPU_FLAGS = tuple(FEATURE_BITS)
# The int8 instructions that decide int8 speed, best first: the same int8 graph runs ~2x apart between VNNI
# and AVX2 without it (16-bit saturating pair sums, vpmaddubsw), and AMX tiles are faster again.
_INT8_ISAS = (
    ("amx_int8", "AMX"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx512f", "AVX-512 (no VNNI)"),
    ("avx2", "AVX2 (no VNNI)"),
)


def int8_isa(flags: Iterable[str]) -> str:
    """The best int8 instruction set among the CPU ``flags``: AMX, AVX-512 VNNI, AVX-VNNI, AVX-512 or AVX2."""
    present = set(flags)
    return next((name for flag, name in _INT8_ISAS if flag in present), "no AVX2")


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


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """CPU model name and the SIMD/matrix flags that decide ViT speed, as this process's engines see them.

    A flag counts when /proc/cpuinfo lists it (the CPU has it and the kernel enabled it: AMX needs both) and
    ``cpuid`` shows it to this process (what oneDNN, MLAS and MKL read; less than /proc/cpuinfo says under a
    cpuid mask such as ``benchmarks/emulate_isa.py``). Either source alone where the other is unavailable.
    """
    model, flags = platform.processor() or platform.machine(), list[str]()
    shown = visible_flags()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, [x for x in _CPU_FLAGS if shown is not None and x in shown]
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    if m:
        model = m.group(1).strip()
    f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    if f:
        present = set(f.group(1).split())
        flags = [x for x in _CPU_FLAGS if x in present and (shown is None or x in shown)]
    return model, flags


def gpus() -> list[dict]:
    """GPUs as nvidia-smi reports them (name, driver, memory); [] without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return gpus


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """Installed versions (from package metadata: nothing is imported, so torch stays out)."""
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_info(libraries: Iterable[str] = LIBRARIES) -> dict:
    """CPU model and flags, cores, threads, memory, GPUs and driver, OS, Python and library versions."""
    model, flags = cpu_model_and_flags()
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        cores, memory_gb = None, None
    try:
        allowed: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "int8_isa": int8_isa(flags),
        "cores": cores,
        "threads": os.cpu_count(),
        "cpus_allowed": allowed,
        "memory_gb": memory_gb,
        "gpus": gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(libraries),
    }


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (they count this process's threads too); None off Unix."""
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


class PeakRss:
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
