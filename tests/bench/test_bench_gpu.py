"""benchmarks/bench_gpu.py (what scripts/gpu_check.sh runs on a GPU) in its CPU smoke mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402

pytest.importorskip("torch")


def test_smoke_run_measures_device_only_and_runner_rows(tmp_path):
    out = tmp_path / "gpu.json"
    assert (
        bench_gpu.main(
            [
                "--device",
                "cpu",
                "--model",
                "mae_vit_test",
                "--batch-sizes",
                "2,3",
                "--iters",
                "2",
                "--rounds",
                "1",
                "--warmup",
                "1",
                "--no-compile",
                "--no-peers",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    kinds = {(r["path"], r["precision"], r["kind"], r["batch"]) for r in res["rows"]}
    for batch in (2, 3):
        assert {
            ("torch eager", "bf16", "device-only", batch),
            ("torch eager", "bf16", "runner", batch),
            ("ort cpu", "fp32", "device-only", batch),
            ("ort cpu", "fp32", "runner", batch),
        } <= kinds
    for r in res["rows"]:
        assert r["ms"] > 0 and r["img_s"] == pytest.approx(r["batch"] / r["ms"] * 1e3)
        if r["kind"] == "runner":  # each runner row is judged against the same path's device-only row
            assert r["share"] > 0
    assert res["verdicts"]["fastest"]["img_s"] == max(r["img_s"] for r in res["rows"])
    # --from-json makes the table again without measuring (what scripts/gpu_check.sh does last).
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    bench_gpu.RESULTS, saved = results, bench_gpu.RESULTS
    try:
        assert bench_gpu.main(["--from-json", str(out), "--append"]) == 0
    finally:
        bench_gpu.RESULTS = saved
    assert "| ort cpu | fp32 | 3 | runner |" in results.read_text()


def test_gpu_check_says_what_is_missing_without_cuda():
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: scripts/gpu_check.sh would run for real")
    r = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--no-append"],
        capture_output=True,
        text=True,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": "/tmp/gpu-check-test"},
        timeout=120,
    )
    assert r.returncode == 7 and "no CUDA device" in r.stderr
    r = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 3 and "unknown option --bogus" in r.stderr


def test_the_table_lands_in_its_own_section(tmp_path):
    res = {
        "date": "2026-12-04 00:00",
        "gpu": "NVIDIA H200",
        "model": "m",
        "versions": {"torch": "2.11"},
        "rows": [
            {"path": "ort cuda", "precision": "fp16", "kind": "device-only", "batch": 64, "ms": 5.0, "img_s": 12800.0},
            {"path": "ort cuda", "precision": "fp16", "kind": "runner", "batch": 64, "ms": 6.0, "img_s": 10666.7},
            {"path": "timm", "precision": "bf16", "kind": "device-only", "batch": 64, "ms": 8.0, "img_s": 8000.0},
        ],
    }
    bench_gpu._add_ratios(res["rows"])
    res["verdicts"] = bench_gpu._verdicts(res["rows"])
    assert res["verdicts"]["runner_share_batch64_min"] == pytest.approx(5 / 6)
    assert res["verdicts"]["fastest_vs_timm"] == pytest.approx(1.6)
    f = tmp_path / "RESULTS.md"
    f.write_text("# Benchmark results\n\n## Other\n\nbody\n")
    table = bench_gpu.markdown(
        res,
        bench_gpu._extract_summary(
            {
                "pipeline_img_s": 5400.0,
                "model_only_img_s": 6000.0,
                "pipeline": {"decoder": "torch", "precision": "fp16", "pipeline_vs_model": 0.9},
            }
        ),
        "| model | MAE ms |\n|---|---:|\n| ViT-L/16 | 55.0 |\n",
    )
    bench_gpu.append_section(table, f)
    bench_gpu.append_section(table, f)
    text = f.read_text()
    assert text.count(bench_gpu.SECTION) == 1 and text.count("NVIDIA H200") == 2
    assert text.startswith("# Benchmark results\n\n## Other\n\nbody\n")
    assert "| ort cuda | fp16 | 64 | runner | 6.00 | 10,667 | 0.83 |" in text
    assert "1.60x timm" in text and "pipeline_img_s 5,400" in text and "pipeline_vs_model 0.90 (goal 0.85)" in text
    assert "| ViT-L/16 | 55.0 |" in text
