"""The int8 ISA a bench row names is what cpuid shows the engines, and benchmarks/emulate_isa.py hides some.

The emulation tests start real processes under the cpuid mask (LD_PRELOAD, CPUID faulting) and ask the
engines themselves (PyTorch's ATen capability, OpenVINO's optimisation capabilities) what they were shown.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mae_deploy.bench import machine
from mae_deploy.cpuid import FEATURE_BITS, flags_from_registers, visible_flags

ROOT = Path(__file__).resolve().parents[2]


def _emulate_isa():
    spec = importlib.util.spec_from_file_location("emulate_isa", ROOT / "benchmarks" / "emulate_isa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _proc_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    line = next(x for x in text.splitlines() if x.startswith("flags"))
    return set(line.split(":", 1)[1].split())


def test_flags_from_registers_reads_each_bit():
    registers = {(7, 0): (1, 1 << 5 | 1 << 16, 1 << 11, 1 << 25), (7, 1): (1 << 4, 0, 0, 0)}
    assert flags_from_registers(registers) == {"avx2", "avx512f", "avx512_vnni", "amx_int8", "avx_vnni"}
    assert flags_from_registers({(7, 0): (0, 1 << 5, 0, 0)}) == {"avx2"}  # no subleaf 1: its flags absent
    assert flags_from_registers({}) == set()


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="cpuid is executed on x86-64 Linux"
)
def test_cpuid_shows_what_proc_cpuinfo_lists():
    shown = visible_flags()
    assert shown is not None
    listed = _proc_flags() & set(FEATURE_BITS)
    assert "avx2" in shown or "avx2" not in listed
    assert listed <= shown  # the kernel can hide a feature cpuid shows (AMX without support), not add one


def test_machine_flags_need_both_sources(monkeypatch):
    monkeypatch.setattr(machine, "visible_flags", lambda: frozenset({"avx2"}))
    _, flags = machine.cpu_model_and_flags()
    assert set(flags) <= {"avx2"}
    monkeypatch.setattr(machine, "visible_flags", lambda: None)  # no cpuid here: /proc/cpuinfo alone
    _, flags = machine.cpu_model_and_flags()
    if Path("/proc/cpuinfo").exists():
        assert set(flags) == _proc_flags() & set(FEATURE_BITS)


def test_emulate_isa_refuses_a_machine_without_cpuid_faulting(tmp_path):
    emulate_isa = _emulate_isa()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f\n")
    if sys.platform.startswith("linux"):
        with pytest.raises(emulate_isa.EmulationUnavailable, match="cpuid_fault"):
            emulate_isa.check_machine(cpuinfo)
    with pytest.raises(ValueError, match="avx2"):
        emulate_isa.environment("sse2", tmp_path / "lib.so", {})
    env = emulate_isa.environment("avx2", tmp_path / "lib.so", {"LD_PRELOAD": "/other.so"})
    assert env["LD_PRELOAD"] == f"{tmp_path / 'lib.so'} /other.so" and env["CPUID_MASK_ISA"] == "avx2"


def test_emulate_isa_cli_needs_a_command(capsys):
    with pytest.raises(SystemExit) as e:
        _emulate_isa().main(["avx2"])
    assert e.value.code == 2 and "no command" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shim():
    emulate_isa = _emulate_isa()
    try:
        emulate_isa.check_machine()
    except emulate_isa.EmulationUnavailable as e:
        pytest.skip(f"cpuid cannot be masked on this machine: {e}")
    return emulate_isa


_SEEN = """
import json, openvino, torch
from mae_deploy.bench.machine import machine_info
m = machine_info(libraries=())
print(json.dumps({"int8_isa": m["int8_isa"], "flags": m["cpu_flags"], "aten": torch.backends.cpu.get_cpu_capability(),
                  "openvino": openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}))
"""


def _seen(shim, isa: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "emulate_isa.py"), isa, "--", sys.executable, "-c", _SEEN],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_under_avx2_every_engine_is_shown_avx2(shim):
    seen = _seen(shim, "avx2")
    assert seen["int8_isa"] == "AVX2 (no VNNI)"
    assert seen["flags"] == (["avx2"] if "avx2" in _proc_flags() else [])
    assert seen["aten"] == "AVX2"  # PyTorch's kernels: from cpuid, so masked
    assert "BF16" not in seen["openvino"]  # OpenVINO's CPU plugin: the same


@pytest.mark.parametrize(("isa", "bf16"), [("avx512-vnni", False), ("avx512-bf16", True)])
def test_under_avx512_amx_is_hidden_and_bf16_as_asked(shim, isa, bf16):
    listed = _proc_flags()
    if not {"avx512_vnni", "avx512_bf16"} <= listed:
        pytest.skip("this CPU has no AVX-512 VNNI and BF16 to keep")
    seen = _seen(shim, isa)
    assert seen["int8_isa"] == "AVX-512 VNNI"
    assert not {"amx_int8", "amx_tile", "amx_bf16", "avx_vnni"} & set(seen["flags"])
    assert ("avx512_bf16" in seen["flags"]) is bf16
    assert seen["aten"] == "AVX512" and ("BF16" in seen["openvino"]) is bf16


def _masked(shim, code: str, *flags: str) -> subprocess.CompletedProcess:
    lib = shim.build()
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        env=shim.environment("avx2", lib),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_program_with_its_own_segv_handler_still_gets_the_mask(shim):
    """Python's faulthandler (pytest turns it on) installs a SIGSEGV handler before torch runs cpuid."""
    done = _masked(shim, "import torch; print(torch.backends.cpu.get_cpu_capability())", "-X", "faulthandler")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["AVX2"]


def test_a_thread_that_blocks_every_signal_still_gets_the_mask(shim):
    """A cpuid fault while SIGSEGV is blocked would kill the process; the mask keeps SIGSEGV unblocked."""
    code = (
        "import signal; signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals)); "
        "from mae_deploy.cpuid import visible_flags; print(sorted(visible_flags()))"
    )
    done = _masked(shim, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['avx2']"


@pytest.mark.parametrize("flags", [(), ("-X", "faulthandler")])
def test_a_real_fault_still_kills_the_process(shim, flags):
    """The mask handles cpuid only: any other SIGSEGV ends the process as it would without it."""
    done = _masked(shim, "import ctypes; ctypes.string_at(0)", *flags)
    assert done.returncode == -11
    assert ("Fatal Python error: Segmentation fault" in done.stderr) == bool(flags)  # the program's handler ran
