"""Run a command as if this CPU stopped at an older instruction set: AVX-512 VNNI (with or without BF16) or AVX2.

    .venv/bin/python benchmarks/emulate_isa.py avx2 -- .venv/bin/mae-deploy bench bundle/ --precisions fp32,int8
    .venv/bin/python benchmarks/emulate_isa.py avx512-vnni -- .venv/bin/python benchmarks/bench_int8_cpu.py ...

int8 speed depends on the instruction set more than on anything else (AMX, AVX-512 VNNI and AVX2 without VNNI
run the same graph several times apart), and the CPU a user deploys on is often older than the one a number
was taken on. This builds ``cpuid_mask.c`` (with the C compiler here, cached beside it under
``benchmarks/.cache``) and runs the command with it preloaded: every engine (oneDNN in OpenVINO and PyTorch,
ONNX Runtime's MLAS, MKL) is shown a cpuid without the hidden instruction sets and picks the kernels that CPU
would run; ``mae-deploy bench`` then names the emulated int8 ISA in its rows (it reads cpuid too).

An emulation: the same cores, caches, clocks and memory, other kernels. It says which kernels win on the older
instruction set and how far apart they are on this core, not what a real CPU of that kind measures; write
"(emulated)" beside every number taken this way. Needs x86-64 Linux with CPUID faulting (``cpuid_fault`` in
/proc/cpuinfo) and a C compiler (``cc``). A program's own SIGSEGV handler (``python -X faulthandler``,
pytest) keeps working: the mask answers its sigaction()/signal() calls and passes it every fault that is
not a cpuid.

Exit codes: 3 the emulation cannot run here (the reason is printed); otherwise the command's own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "cpuid_mask.c"
# CPUID_MASK_ISA -> the int8 ISA it leaves (cpuid_mask.c says what each hides)
ISAS = {"avx512-bf16": "AVX-512 VNNI", "avx512-vnni": "AVX-512 VNNI", "avx2": "AVX2 (no VNNI)"}


class EmulationUnavailable(RuntimeError):
    """This machine cannot mask cpuid (the message says why and what would)."""


def check_machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> None:
    """Raise EmulationUnavailable unless this is x86-64 Linux with CPUID faulting and a C compiler."""
    if not sys.platform.startswith("linux"):
        raise EmulationUnavailable(f"cpuid masking needs Linux (this is {sys.platform})")
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError as e:
        raise EmulationUnavailable(f"cannot read {cpuinfo}: {e}") from e
    if "cpuid_fault" not in flags.split():
        raise EmulationUnavailable(
            "this CPU or hypervisor has no CPUID faulting (no cpuid_fault in /proc/cpuinfo): measure on a real "
            "CPU of that kind instead"
        )
    if shutil.which("cc") is None:
        raise EmulationUnavailable("no C compiler (cc) to build cpuid_mask.c: install gcc or clang")


def build(cache: Path = HERE / ".cache") -> Path:
    """The shared library built from ``cpuid_mask.c`` (rebuilt when the source is newer; atomic)."""
    lib = cache / "libcpuid_mask.so"
    if lib.exists() and lib.stat().st_mtime >= SOURCE.stat().st_mtime:
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        done = subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-ldl"], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise EmulationUnavailable(f"cc could not build {SOURCE.name}:\n{done.stderr}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def environment(isa: str, lib: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the mask preloaded for ``isa``."""
    if isa not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r}: one of {', '.join(ISAS)}")
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(lib), env.get("LD_PRELOAD", "")]))
    env["CPUID_MASK_ISA"] = isa
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s ISA -- COMMAND [ARG ...]")
    ap.add_argument("isa", choices=sorted(ISAS), help="the instruction set to stop at")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given: emulate_isa.py ISA -- COMMAND [ARG ...]")
    try:
        check_machine()
        lib = build()
    except EmulationUnavailable as e:
        print(f"emulate_isa: {e}", file=sys.stderr)
        return 3
    return subprocess.run(command, env=environment(args.isa, lib)).returncode


if __name__ == "__main__":
    sys.exit(main())
