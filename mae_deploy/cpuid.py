"""The CPU features this process is shown by the ``cpuid`` instruction: what the inference engines read.

``/proc/cpuinfo`` says what the CPU and the kernel offer. The engines (oneDNN in OpenVINO and PyTorch, MLAS in
ONNX Runtime, MKL) execute ``cpuid`` themselves to pick their kernels, so a process whose ``cpuid`` is masked
(``benchmarks/emulate_isa.py``: Linux's CPUID faulting, an older CPU emulated on a newer one) runs other
kernels than /proc/cpuinfo suggests. The bench's int8 ISA is taken from both (``machine.cpu_model_and_flags``).

How: on x86-64 Linux, 27 bytes of machine code in an executable page, called through ctypes (what py-cpuinfo
does in a subprocess). Where that cannot run (another OS or architecture, a policy that forbids writable
executable memory) ``visible_flags`` is None and /proc/cpuinfo alone decides.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import sys

# void cpuid(uint32_t leaf /* edi */, uint32_t subleaf /* esi */, uint32_t out[4] /* rdx */), System V ABI:
# push rbx; mov r8, rdx; mov eax, edi; mov ecx, esi; cpuid; mov [r8], eax; mov [r8+4], ebx;
# mov [r8+8], ecx; mov [r8+12], edx; pop rbx; ret
_CODE = bytes.fromhex("53 4989d0 89f8 89f1 0fa2 418900 41895804 41894808 4189500c 5b c3".replace(" ", ""))

# The flags that decide ViT speed on a CPU, in the order reports list them:
# name (as /proc/cpuinfo spells it) -> (leaf, subleaf, register index eax=0 .. edx=3, bit)
FEATURE_BITS = {
    "avx2": (7, 0, 1, 5),
    "avx_vnni": (7, 1, 0, 4),
    "avx512f": (7, 0, 1, 16),
    "avx512_vnni": (7, 0, 2, 11),
    "avx512_bf16": (7, 1, 0, 5),
    "amx_tile": (7, 0, 3, 24),
    "amx_int8": (7, 0, 3, 25),
    "amx_bf16": (7, 0, 3, 22),
}


class _Cpuid:
    """The ``cpuid`` instruction as a Python call (keeps its executable page alive)."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        proto = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))
        self._call = proto(address)

    def __call__(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        self._call(leaf, subleaf, out)
        return out[0], out[1], out[2], out[3]


def flags_from_registers(registers: dict[tuple[int, int], tuple[int, int, int, int]]) -> set[str]:
    """The ``FEATURE_BITS`` flags set in ``registers`` ((leaf, subleaf) -> eax, ebx, ecx, edx)."""
    return {
        name
        for name, (leaf, sub, reg, bit) in FEATURE_BITS.items()
        if (leaf, sub) in registers and registers[(leaf, sub)][reg] >> bit & 1
    }


@functools.cache
def visible_flags() -> frozenset[str] | None:
    """The ``FEATURE_BITS`` flags ``cpuid`` shows this process; None where it cannot be executed from here."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        cpuid = _Cpuid()
    except (OSError, ValueError, TypeError):  # no writable executable memory under this policy
        return None
    registers = {}
    max_leaf = cpuid(0)[0]
    if max_leaf >= 7:
        registers[(7, 0)] = cpuid(7, 0)
        if registers[(7, 0)][0] >= 1:  # leaf 7's eax: the highest subleaf
            registers[(7, 1)] = cpuid(7, 1)
    return frozenset(flags_from_registers(registers))
