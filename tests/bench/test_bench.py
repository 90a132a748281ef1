"""`mae-deploy bench`: statistics, results files (JSON/CSV/Markdown/PNG), compare, and option errors."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mae_deploy import bench
from mae_deploy.bench import (
    KEY_FIELDS,
    ROW_KEYS,
    RUNNER_KEYS,
    TOP_KEYS,
    BenchConfig,
    agreement,
    compare_results,
    format_compare,
    latency_stats,
    percentile,
    time_calls,
    validate_results,
    visible_counts,
)
from mae_deploy.cli import main
from mae_deploy.errors import InputError, MissingDependency

DOC = Path(__file__).resolve().parents[2] / "docs" / "bench-schema.md"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """mae_vit_test (L=16) with fp32 + int8 graphs and reference weights, exported the product's way."""
    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model("mae_vit_test").eval()
    out = tmp_path_factory.mktemp("bench") / "bundle"
    export_bundle(model, out, precisions=("fp32", "int8"), reference_weights=True, verify=False, progress=None)
    return out


@pytest.fixture(scope="module")
def run_dir(bundle_dir, tmp_path_factory) -> tuple[Path, object]:
    """One CLI run over every backend x precision x part, two batches, two visible counts; all four files."""
    d = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(bundle_dir),
            "--backends",
            "torch,ort,trt",
            "--precisions",
            "fp32,int8",
            "--parts",
            "encoder,decoder,reconstruct",
            "--batch-sizes",
            "1,2",
            "--visible",
            "16,4",
            "--warmup",
            "1",
            "--iters",
            "3",
            "--threads",
            "1",
            "--out",
            str(d / "r.json"),
            "--csv",
            str(d / "r.csv"),
            "--markdown",
            str(d / "r.md"),
            "--plot",
            str(d / "r.png"),
        ],
    )
    return d, result


# ---------------------------------------------------------------------------------------------- statistics


def test_percentile_known_samples():
    s = [10.0, 20.0, 30.0, 40.0]
    assert percentile(s, 0) == 10.0
    assert percentile(s, 50) == pytest.approx(25.0)
    assert percentile(s, 90) == pytest.approx(37.0)  # position 2.7: 30 + 0.7 * 10
    assert percentile(s, 99) == pytest.approx(39.7)
    assert percentile(s, 100) == 40.0
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(InputError):
        percentile([], 50)
    with pytest.raises(InputError):
        percentile(s, 101)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 101])
def test_percentile_matches_numpy_linear(n):
    samples = np.sort(np.random.default_rng(n).exponential(5.0, n))
    for q in (0, 1, 10, 25, 50, 75, 90, 95, 99, 99.9, 100):
        assert percentile(samples.tolist(), q) == pytest.approx(np.percentile(samples, q, method="linear"), rel=1e-12)


def test_latency_stats_on_known_samples():
    st = latency_stats([4.0, 1.0, 3.0, 2.0])  # unsorted on purpose
    assert (st["min"], st["max"], st["mean"]) == (1.0, 4.0, 2.5)
    assert st["p50"] == pytest.approx(2.5)
    assert st["p90"] == pytest.approx(3.7)
    assert st["std"] == pytest.approx(np.std([1, 2, 3, 4]))


def test_agreement_metrics():
    ref = np.arange(1, 13, dtype=np.float32).reshape(2, 2, 3)
    same = agreement(ref.copy(), ref, "r")
    assert same["max_abs_diff"] == 0 and same["cosine"] == pytest.approx(1.0)
    assert same["pooled_cosine"] is None  # only encoder rows pool (pooled=True)
    flipped = ref.copy()
    flipped[1] *= -1  # one image pointing the other way must show, not be averaged away
    a = agreement(flipped, ref, "r")
    assert a["cosine"] == pytest.approx(-1.0)
    assert a["max_abs_diff"] == pytest.approx(24.0)
    with pytest.raises(InputError, match="shape"):
        agreement(ref[:1], ref, "r")


def test_time_calls_counts_warmup_and_iterations():
    calls = []
    samples, first = time_calls(lambda: calls.append(1), warmup=2, iters=5, duration=None)
    assert len(samples) == 5 and len(calls) == 7
    assert first >= 0 and all(s >= 0 for s in samples)
    calls.clear()
    samples, _ = time_calls(lambda: calls.append(1), warmup=0, iters=None, duration=0.01)
    assert len(samples) >= 1 and len(calls) == len(samples)


def test_cpu_share_sees_another_busy_process():
    import subprocess

    share = bench.CpuShare()
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1: pass"])
    busy.wait()
    # One busy process for ~1 s on os.cpu_count() CPUs: at least a fair part of one CPU went to it.
    assert share.others() > 0.3 / (os.cpu_count() or 1)


def test_visible_counts_and_config_validation():
    assert visible_counts(196) == [196, 49]
    assert visible_counts(196, mask_ratios=[0.0, 0.75, 0.9]) == [196, 49, 19]
    assert visible_counts(16, visible=[16, 4, 4]) == [16, 4]
    with pytest.raises(InputError, match="outside 1..16"):
        visible_counts(16, visible=[17])
    with pytest.raises(InputError, match="not both"):
        visible_counts(16, visible=[4], mask_ratios=[0.5])
    with pytest.raises(InputError, match="mask ratio 1.0"):
        visible_counts(16, mask_ratios=[1.0])
    for kwargs, msg in [
        ({"backends": ("onnx",)}, "unknown backend 'onnx'"),
        ({"precisions": ("int4",)}, "unknown precision 'int4'"),
        ({"parts": ("head",)}, "unknown part 'head'"),
        ({"batch_sizes": (1, 0)}, "batch size 0"),
        ({"iters": 0}, "at least 1"),
        ({"iters": 3, "duration": 1.0}, "not both"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
    ]:
        with pytest.raises(InputError, match=msg):
            BenchConfig(**kwargs).validate()


# ---------------------------------------------------------------------------------------------- schema doc


def _doc_keys(section: str) -> list[str]:
    """Backticked first-column keys of the table under '## <section>' in docs/bench-schema.md."""
    text = DOC.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_0-9]+)` \|", body, re.M)


def test_schema_doc_lists_the_keys_the_code_writes():
    from mae_deploy.bench.peak import PROBE_KEYS
    from mae_deploy.bench.schema import INPUT_KEYS

    assert _doc_keys("Top level") == list(TOP_KEYS)
    assert _doc_keys("rows[]") == list(ROW_KEYS)
    assert _doc_keys("runners[]") == list(RUNNER_KEYS)
    assert _doc_keys("peaks[]") == list(PROBE_KEYS)
    for section, keys in [
        ("compute", bench.COMPUTE_KEYS),
        ("agreement", bench.AGREEMENT_KEYS),
        ("inputs", INPUT_KEYS),
    ]:
        body = DOC.read_text().split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
        assert re.findall(r"^\| `([a-z_0-9]+)` \|", body, re.M) == list(keys), section
    assert f"schema_version {bench.SCHEMA_VERSION})" in DOC.read_text()


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow  # every backend x precision x part, end to end
def test_bench_writes_well_formed_results(run_dir, bundle_dir):
    d, result = run_dir
    assert result.exit_code == 0, result.output
    assert "Performance summary" in result.output
    data = json.loads((d / "r.json").read_text())
    validate_results(data)
    assert list(data) == list(TOP_KEYS)
    rows = data["rows"]
    assert len(rows) == 3 * 2 * 3 * 2 * 2
    assert all(list(r) == list(ROW_KEYS) for r in rows)
    assert data["config"]["threads"] == 1 and data["config"]["visible_counts"] == [16, 4]
    assert data["machine"]["cpu_model"] and data["machine"]["libraries"]["onnxruntime"]
    assert data["reference"]["name"] == "torch-fp32"
    assert 0 <= data["load_average"]["other_cpu_share"] <= 1

    by = {
        (r["backend"], r["precision"]): [
            x for x in rows if (x["backend"], x["precision"]) == (r["backend"], r["precision"])
        ]
        for r in rows
    }
    for key in [("torch", "fp32"), ("ort", "fp32"), ("ort", "int8")]:
        assert all(r["status"] == "ok" for r in by[key]), key
    for key in [("torch", "int8"), ("trt", "fp32"), ("trt", "int8")]:
        assert all(r["status"] == "skipped" and r["reason"] for r in by[key]), key
    assert "trt" in by[("trt", "fp32")][0]["reason"]

    for r in (r for r in rows if r["status"] == "ok"):
        lat = r["latency_ms"]
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["iterations"] == 3 and r["warmup"] == 1
        assert r["throughput_ips"] == pytest.approx(r["batch"] * 1000 / lat["mean"])
        assert r["peak_rss_mb"] > 0 and r["rss_scope"] in ("row", "process")
        assert r["peak_device_mem_mb"] is None and "cpu" in r["device_mem_note"]
        assert r["build_s"] > 0 and r["threads"]["intra_op"] == 1
        agr = r["agreement"]
        assert agr["reference"] == "torch-fp32"
        if r["precision"] == "fp32":
            assert agr["max_abs_diff"] < 1e-4 and agr["cosine"] > 0.99999
        else:  # int8 really differs from the reference, and not by much
            assert 0 < agr["max_abs_diff"] and agr["cosine"] > 0.9
        if r["part"] == "encoder":  # the mean of the patch tokens, as users of the features pool them
            assert agr["pooled_cosine"] > (0.99999 if r["precision"] == "fp32" else 0.9)
        else:
            assert agr["pooled_cosine"] is None
    assert data["inputs"]["pixels"] == "seeded noise" and data["config"]["images"] is None
    peaks = {(p["backend"], p["precision"]): p for p in data["peaks"]}
    assert set(peaks) == {("torch", "fp32"), ("ort", "fp32"), ("ort", "int8")}  # one probe per runner built
    assert all(p["status"] == "ok" and p["peak"] > 0 for p in peaks.values())
    arch = json.loads((bundle_dir / "mae.json").read_text())["architecture"]
    for r in (r for r in rows if r["status"] == "ok"):
        c = r["compute"]
        assert c["flops"] == bench.part_flops(arch, r["part"], r["batch"], r["visible"])
        assert c["achieved"] == pytest.approx(c["flops"] / r["latency_ms"]["p50"] / 1e6)
        assert c["peak"] == peaks[(r["backend"], r["precision"])]["peak"]
        assert c["fraction_of_peak"] == pytest.approx(c["achieved"] / c["peak"])
        assert c["unit"] == ("GOP/s" if r["precision"] == "int8" else "GFLOP/s")
    assert "%peak" in result.output and "% of this machine's fp32 peak" in result.output
    assert "% of this machine's int8 peak" in (d / "r.md").read_text()
    ort = next(x for x in data["runners"] if x["backend"] == "ort" and x["precision"] == "int8")
    assert ort["providers"] == ["CPUExecutionProvider"]
    assert ort["threads"] == {"intra_op": 1, "inter_op": 1}
    assert ort["details"]["graphs"] == {"encoder": "encoder.int8.onnx", "decoder": "decoder.int8.onnx"}

    with open(d / "r.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and list(table[0]) == list(bench.CSV_COLUMNS)
    first_ok = next(i for i, r in enumerate(rows) if r["status"] == "ok")
    assert float(table[first_ok]["p50_ms"]) == pytest.approx(rows[first_ok]["latency_ms"]["p50"])

    md = (d / "r.md").read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| backend |"))
    assert len([line for line in md[header + 2 :] if line.startswith("| ")]) == len(rows)

    from PIL import Image

    with Image.open(d / "r.png") as im:
        assert im.format == "PNG" and im.size == (1100, 450)


def test_build_time_covers_the_sessions_each_part_needs(bundle_dir):
    results = bench.run_benchmark(
        bundle_dir,
        BenchConfig(parts=("reconstruct",), visible=(4,), iters=1, warmup=0, reference=False),
        progress=False,
    )
    (runner,) = results["runners"]
    assert runner["details"]["sessions"] == ["decoder", "encoder"]  # built before timing, not in the first call
    assert results["rows"][0]["agreement"] is None and results["reference"]["name"] is None


def test_encoder_only_bundle_without_weights_uses_ort_reference(tmp_path):
    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(1)
    out = tmp_path / "enc"
    export_bundle(create_model("mae_vit_test").eval(), out, parts="encoder", verify=False, progress=None)
    results = bench.run_benchmark(
        out,
        BenchConfig(backends=("ort", "torch"), parts=("encoder", "decoder"), visible=(8,), iters=2, warmup=0),
        progress=False,
    )
    assert results["reference"]["name"] == "ort-fp32"
    assert "torch fp32 reference unavailable" in results["reference"]["note"]
    rows = {(r["backend"], r["part"]): r for r in results["rows"]}
    assert rows[("ort", "encoder")]["status"] == "ok"
    assert rows[("ort", "encoder")]["agreement"]["max_abs_diff"] == 0.0  # ORT fp32 against itself
    assert rows[("ort", "decoder")]["status"] == "skipped" and "no decoder" in rows[("ort", "decoder")]["reason"]
    assert rows[("torch", "encoder")]["status"] == "skipped"
    assert "reference" in rows[("torch", "encoder")]["reason"]


# ---------------------------------------------------------------------------------------------- compare


def _results(rows: list[tuple], cpu: str = "cpu A") -> dict:
    """A minimal valid results file: rows are (backend, precision, part, batch, visible, p50, mean)."""
    out = []
    for backend, precision, part, b, k, p50, mean in rows:
        row = dict.fromkeys(ROW_KEYS)
        row.update(
            backend=backend,
            precision=precision,
            device="cpu",
            part=part,
            batch=b,
            visible=k,
            status="ok",
            latency_ms={"p50": p50, "p90": p50, "p99": p50, "mean": mean, "min": p50, "max": p50, "std": 0.0},
            throughput_ips=b * 1000 / mean,
        )
        out.append(row)
    d = dict.fromkeys(TOP_KEYS)
    d.update(schema_version=bench.SCHEMA_VERSION, machine={"cpu_model": cpu}, runners=[], rows=out)
    return d


def test_compare_ratios_on_hand_made_results(tmp_path):
    old = _results(
        [
            ("ort", "fp32", "encoder", 1, 196, 10.0, 12.0),
            ("ort", "int8", "encoder", 1, 196, 8.0, 8.0),
            ("torch", "fp32", "encoder", 1, 196, 50.0, 50.0),
        ],
        cpu="cpu A",
    )
    new = _results(
        [
            ("ort", "fp32", "encoder", 1, 196, 5.0, 6.0),
            ("ort", "int8", "encoder", 1, 196, 10.0, 10.0),
            ("ort", "fp32", "encoder", 8, 196, 30.0, 30.0),
        ],
        cpu="cpu B",
    )
    (tmp_path / "old.json").write_text(json.dumps(old))
    cmp = compare_results(new, bench.load_results(tmp_path / "old.json"))
    ratios = {tuple(r[k] for k in KEY_FIELDS): r for r in cmp["rows"]}
    fp32 = ratios[("ort", "fp32", "encoder", 1, 196)]
    assert fp32["p50_ratio"] == pytest.approx(0.5)
    assert fp32["mean_ratio"] == pytest.approx(0.5)
    assert fp32["throughput_ratio"] == pytest.approx(2.0)
    assert ratios[("ort", "int8", "encoder", 1, 196)]["p50_ratio"] == pytest.approx(1.25)
    assert len(cmp["rows"]) == 2
    assert cmp["only_new"] == [dict(zip(KEY_FIELDS, ("ort", "fp32", "encoder", 8, 196), strict=True))]
    assert cmp["only_old"] == [dict(zip(KEY_FIELDS, ("torch", "fp32", "encoder", 1, 196), strict=True))]
    assert any("different CPUs" in n for n in cmp["notes"])
    text = format_compare(cmp, "old.json")
    assert "0.500" in text and "2.000" in text and "1.250" in text


def test_schema_version_1_files_still_compare(tmp_path):
    """Version 2 added `peaks` and rows' `compute`; a version-1 file (without them) still loads for --compare."""
    old = _results([("ort", "fp32", "encoder", 1, 196, 10.0, 10.0)])
    old["schema_version"] = 1
    del old["peaks"]
    for row in old["rows"]:
        del row["compute"]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    new = _results([("ort", "fp32", "encoder", 1, 196, 5.0, 5.0)])
    cmp = compare_results(new, bench.load_results(tmp_path / "v1.json"))
    assert cmp["rows"][0]["p50_ratio"] == pytest.approx(0.5)
    del new["peaks"]  # a version-2 file must have them
    with pytest.raises(InputError, match="peaks"):
        validate_results(new)


def test_cli_compare_against_earlier_run(run_dir, bundle_dir):
    d, _ = run_dir
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(bundle_dir),
            "--parts",
            "encoder",
            "--batch-sizes",
            "1",
            "--visible",
            "16",
            "--iters",
            "2",
            "--no-reference",
            "--quiet",
            "--compare",
            str(d / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("ort     fp32  encoder         1   16"))
    ratio = float(line.split()[-3])
    assert ratio > 0


# ---------------------------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--backends", "onnx"], 3, "unknown backend 'onnx'"),
        (["--visible", "17"], 3, "visible token count 17 is outside 1..16"),
        (["--batch-sizes", "0"], 3, "batch size 0"),
        (["--batch-sizes", "one"], 2, "not a comma-separated list of integers"),
        (["--visible", "4", "--mask-ratios", "0.5"], 2, "not both"),
        (["--iters", "3", "--duration", "1"], 2, "not both"),
        (["--mask-ratios", "1.0"], 3, "mask ratio 1.0"),
        (["--backends", "trt"], 7, "no row could run here"),
    ],
)
def test_bad_options_error_clearly(bundle_dir, args, code, message):
    iters = [] if "--iters" in args else ["--iters", "1"]
    result = CliRunner().invoke(main, ["bench", str(bundle_dir), "--no-reference", "--quiet", *iters, *args])
    assert result.exit_code == code, result.output
    assert message in result.output


def test_missing_bundle_and_bad_compare_file_fail_before_running(tmp_path, bundle_dir):
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "nope")])
    assert r.exit_code == 3 and "does not exist" in r.output
    (tmp_path / "old.json").write_text(json.dumps({"schema_version": 99}))
    r = CliRunner().invoke(main, ["bench", str(bundle_dir), "--compare", str(tmp_path / "old.json")])
    assert r.exit_code == 3 and "schema_version 99" in r.output


def test_plot_without_matplotlib_is_a_missing_dependency(monkeypatch, bundle_dir, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(MissingDependency, match=r"mae-deploy\[plot\]"):
        bench.write_plot(_results([("ort", "fp32", "encoder", 1, 16, 1.0, 1.0)]), tmp_path / "x.png")
    r = CliRunner().invoke(main, ["bench", str(bundle_dir), "--plot", str(tmp_path / "x.png")])
    assert r.exit_code == 6 and "matplotlib" in r.output
    assert not (tmp_path / "x.png").exists()
