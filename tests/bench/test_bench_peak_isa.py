"""The int8 instruction set a benchmark names (issue #25 item 3): int8 speed depends on it more than on the graph."""

from __future__ import annotations

import pytest

from mae_deploy.bench.machine import cpu_model_and_flags, int8_isa, machine_info
from mae_deploy.bench.report import machine_line


@pytest.mark.parametrize(
    ("flags", "isa"),
    [
        (["avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"], "AMX"),
        (["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], "AVX-512 VNNI"),
        (["avx2", "avx_vnni"], "AVX-VNNI"),
        (["avx2", "avx512f", "avx_vnni"], "AVX-VNNI"),
        (["avx2", "avx512f"], "AVX-512 (no VNNI)"),
        (["avx2"], "AVX2 (no VNNI)"),
        ([], "no AVX2"),
    ],
)
def test_int8_isa_is_the_best_present(flags, isa):
    assert int8_isa(flags) == isa


def test_machine_info_and_its_line_name_the_int8_isa():
    m = machine_info(libraries=())
    assert m["int8_isa"] == int8_isa(cpu_model_and_flags()[1])
    assert f"int8 on {m['int8_isa']}" in machine_line({"machine": m})
