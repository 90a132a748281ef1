"""`bench` and bad input: a corrupt graph, unreadable weights, unwritable outputs, a negative seed are exit 3
before the benchmark runs; skipped rows are only for what this machine lacks. Plus the package's shape:
backend names from mae_deploy.names, public names across modules, one atomic-write helper, `make bench`."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mae_deploy import bench, names
from mae_deploy.bundle import sha256_file
from mae_deploy.cli import main
from mae_deploy.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
OWN_FILES = [
    *sorted((ROOT / "mae_deploy" / "bench").glob("*.py")),
    ROOT / "mae_deploy" / "commands" / "bench.py",
    ROOT / "benchmarks" / "peers.py",
    ROOT / "benchmarks" / "bench_export_cpu.py",
    ROOT / "benchmarks" / "run_all.py",
]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """mae_vit_test (L=16) with fp32 + int8 graphs and reference weights."""
    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bench_inputs") / "bundle"
    export_bundle(
        create_model("mae_vit_test").eval(),
        out,
        precisions=("fp32", "int8"),
        reference_weights=True,
        verify=False,
        progress=None,
    )
    return out


def _bench(*args: str):
    return CliRunner().invoke(
        main, ["bench", *args, "--iters", "1", "--warmup", "0", "--visible", "16", "--no-peak", "--quiet"]
    )


def test_a_corrupt_graph_is_bad_input_not_unavailable(bundle_dir, tmp_path):
    """A graph ONNX Runtime cannot parse (its sha256 recorded, so the bundle check passes) is exit 3."""
    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    (bad / "encoder.int8.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 40)
    manifest = json.loads((bad / "mae.json").read_text())
    manifest["files"]["encoder.int8.onnx"] = sha256_file(bad / "encoder.int8.onnx")
    (bad / "mae.json").write_text(json.dumps(manifest))
    r = _bench(str(bad), "--precisions", "fp32,int8", "--no-reference")
    assert r.exit_code == 3, r.output
    assert "encoder.int8.onnx" in r.output and "Traceback" not in r.output


def test_an_unreadable_checkpoint_is_bad_input(bundle_dir, tmp_path):
    junk = tmp_path / "weights.pth"
    junk.write_bytes(b"this is not a checkpoint\n" * 10)
    for extra in ([], ["--backends", "torch", "--no-reference"]):  # via the reference, and via the torch rows
        r = _bench(str(bundle_dir), "--checkpoint", str(junk), *extra)
        assert r.exit_code == 3, r.output
        assert str(junk) in r.output and "Traceback" not in r.output


def test_unreadable_reference_weights_in_the_bundle_say_what_to_do(bundle_dir, tmp_path):
    bad = tmp_path / "badref"
    shutil.copytree(bundle_dir, bad)
    (bad / "reference" / "model.safetensors").write_bytes(b"\x00" * 64)
    manifest = json.loads((bad / "mae.json").read_text())
    manifest["files"]["reference/model.safetensors"] = sha256_file(bad / "reference" / "model.safetensors")
    (bad / "mae.json").write_text(json.dumps(manifest))
    r = _bench(str(bad))
    assert r.exit_code == 3, r.output
    assert "reference" in r.output and "--checkpoint" in r.output and "--no-reference" in r.output
    assert _bench(str(bad), "--no-reference").exit_code == 0  # ORT rows need no weights


def test_what_this_machine_or_bundle_lacks_is_still_skipped(bundle_dir, tmp_path):
    """torch int8 (not offered), ORT bf16 (not in the bundle), trt (no package here): skipped, reasons given."""
    r = CliRunner().invoke(
        main,
        [
            "bench",
            str(bundle_dir),
            "--backends",
            "ort,torch,trt",
            "--precisions",
            "fp32,int8,bf16",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--visible",
            "16",
            "--no-peak",
            "--quiet",
            "--out",
            str(tmp_path / "r.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    rows = {(x["backend"], x["precision"]): x for x in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert rows[("torch", "int8")]["status"] == "skipped" and "not int8" in rows[("torch", "int8")]["reason"]
    assert rows[("ort", "bf16")]["status"] == "skipped" and "bf16" in rows[("ort", "bf16")]["reason"]
    assert rows[("trt", "fp32")]["status"] == "skipped" and "unavailable" in rows[("trt", "fp32")]["reason"]
    assert rows[("ort", "int8")]["status"] == "ok" and rows[("torch", "bf16")]["status"] == "ok"


@pytest.mark.parametrize(
    "option, path",
    [
        ("--out", "{file}/r.json"),  # a path under a file
        ("--csv", "{file}/sub/r.csv"),
        ("--markdown", "{dir}"),  # a directory, not a file name
        ("--plot", "/proc/bench.png"),  # a filesystem that takes no new files
    ],
)
def test_unwritable_outputs_fail_before_the_benchmark_runs(bundle_dir, tmp_path, monkeypatch, option, path):
    (tmp_path / "a_file").write_text("x")
    target = path.format(file=tmp_path / "a_file", dir=tmp_path)

    def must_not_run(*a, **k):
        raise AssertionError("the benchmark ran before its outputs were checked")

    monkeypatch.setattr(bench, "run_benchmark", must_not_run)
    r = _bench(str(bundle_dir), option, target)
    assert r.exit_code == 3, r.output
    assert option in r.output and "Traceback" not in r.output


def test_outputs_in_a_new_directory_are_written(bundle_dir, tmp_path):
    out = tmp_path / "new" / "dir"
    r = _bench(str(bundle_dir), "--out", str(out / "r.json"), "--csv", str(out / "r.csv"), "--no-reference")
    assert r.exit_code == 0, r.output
    assert bench.load_results(out / "r.json")["rows"] and (out / "r.csv").is_file()


def test_a_negative_seed_is_bad_input(bundle_dir):
    r = _bench(str(bundle_dir), "--seed", "-1")
    assert r.exit_code == 3, r.output
    assert "seed -1" in r.output and "rows failed" not in r.output
    with pytest.raises(InputError, match="seed -1"):
        bench.BenchConfig(seed=-1).validate()


def test_every_backend_in_names_is_offered(bundle_dir):
    assert bench.BACKENDS == names.BACKENDS
    assert set(names.GRAPH_PRECISIONS) <= set(bench.PRECISIONS)  # int8-qdq too: let the numbers pick per backend
    r = CliRunner().invoke(main, ["bench", "--help"])
    for backend in names.BACKENDS:
        assert backend in r.output
    # openvino is no unknown name: it runs here or is skipped with the missing package named.
    r = _bench(str(bundle_dir), "--backends", "openvino", "--no-reference")
    assert r.exit_code in (0, 7), r.output
    assert "unknown backend" not in r.output


def _imported_names(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    ]


def test_only_public_names_cross_module_boundaries():
    users = [
        *OWN_FILES,
        *sorted((ROOT / "benchmarks").glob("*.py")),
        *sorted((ROOT / "tests" / "bench").glob("test_bench*.py")),
    ]
    private = [
        f"{p.relative_to(ROOT)}: from {mod} import {name}"
        for p in users
        for mod, name in _imported_names(p)
        if mod.startswith("mae_deploy") and name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_no_local_atomic_write_helpers():
    """Writes go through mae_deploy.fileio: no mkstemp + os.replace copies in the benchmark's files."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in OWN_FILES
        if re.search(r"\bmkstemp\(|\bos\.replace\(|def (_?atomic_write|write_atomic)\b", p.read_text())
    ]
    assert offenders == []


def test_make_bench_runs_a_script_that_exists():
    target = re.search(r"^bench:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    script = re.search(r"(benchmarks/\S+\.py)", target).group(1)
    assert (ROOT / script).is_file()
    out = subprocess.run(
        [sys.executable, str(ROOT / script), "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    ran = re.findall(r"^=== (\S+\.py)", out.stdout, re.M)
    assert ran and all((ROOT / "benchmarks" / name).is_file() for name in ran)
    assert "peers.py" in ran and "bench_export_cpu.py" in ran
    helptext = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    ).stdout
    assert all(name in helptext for name in ran)  # --help says what it runs
