"""`extract --engine ray` (issue #13) on a real local Ray (ray.init(num_cpus=2), started once for the module).

The same folder of real photos mixed with broken and odd files as the local engine's tests: the Ray engine
must give the same paths, rows and errors.jsonl, and features within 1e-5 (in fact byte-identical: both
engines run the same ONNX graph through the same ORT CPU kernels, whose per-image results do not depend
on which other images share the batch). Each Ray test costs seconds, so there are few of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from extract_data import BROKEN, REPO, RUN, result_files

from mae_deploy.errors import InputError
from mae_deploy.extract import ERRORS_NAME, MANIFEST_NAME, extract_features, index_name, open_features

pytestmark = [
    pytest.mark.slow,  # a local Ray instance per test
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning", "ignore::DeprecationWarning"),
]
RAY_RUN = {"batch_size": RUN["batch_size"], "shard_size": RUN["shard_size"], "engine": "ray"}


def test_missing_ray_is_exit_6_with_the_install_line(extract_images, extract_bundle_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mae_deploy.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    root, _ = extract_images
    r = CliRunner().invoke(
        main,
        [
            "extract",
            str(root / "odd"),
            "--bundle",
            str(extract_bundle_dir),
            "--out",
            str(tmp_path / "out"),
            "--engine",
            "ray",
            "--no-progress",
        ],
    )
    assert r.exit_code == 6, r.output
    assert "pip install 'mae-deploy[ray]'" in r.output


def test_an_unreachable_ray_address_is_exit_7_naming_it(extract_images, extract_bundle_dir, tmp_path):
    root, _ = extract_images
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mae_deploy.cli",
            "extract",
            str(root / "odd"),
            "--bundle",
            str(extract_bundle_dir),
            "--out",
            str(tmp_path / "out"),
            "--engine",
            "ray",
            "--ray-address",
            "127.0.0.1:1",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 7, r.stderr
    assert "127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr


def test_ray_gives_the_local_engines_output(ray_local, extract_clean_run, extract_images, extract_bundle_dir, tmp_path):
    root, _ = extract_images
    ref_dir, ref = extract_clean_run
    out = tmp_path / "ray"
    s = extract_features(root, extract_bundle_dir, out, progress=False, **RAY_RUN)
    assert (s.features, s.failed, s.failures_by_reason, s.shards) == (
        ref.features,
        ref.failed,
        ref.failures_by_reason,
        ref.shards,
    )
    a, b = open_features(out), open_features(ref_dir)
    assert a.paths == b.paths and np.array_equal(a.rows, b.rows)
    assert (out / ERRORS_NAME).read_bytes() == (ref_dir / ERRORS_NAME).read_bytes()
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert result_files(out) == result_files(ref_dir)  # byte-identical shards (see the module docstring)
    run = json.loads((out / MANIFEST_NAME).read_text())["runs"][-1]
    assert run["engine"] == "ray" and run["actors"] == 1
    assert run["ray"]["cluster_resources"]["CPU"] == 2


def test_sigkill_of_the_driver_then_the_same_command_gives_the_clean_result(
    ray_local, extract_clean_run, extract_images, extract_bundle_dir, tmp_path
):
    root, _ = extract_images
    ref_dir, _ = extract_clean_run
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "mae_deploy.cli",
        "extract",
        str(root),
        "--bundle",
        str(extract_bundle_dir),
        "--out",
        str(out),
        "--batch-size",
        str(RUN["batch_size"]),
        "--shard-size",
        str(RUN["shard_size"]),
        "--engine",
        "ray",
        "--ray-address",
        ray_local,
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (out / index_name(3)).exists():
            assert proc.poll() is None, f"extract ended before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no shard was committed within 300 s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    committed = sum(1 for k in range(100) if (out / index_name(k)).exists())
    assert 4 <= committed < open_features(ref_dir).manifests[0]["counts"]["shards"]
    s = extract_features(root, extract_bundle_dir, out, progress=False, **RAY_RUN)
    assert 0 < s.processed < s.inputs  # it resumed
    assert result_files(out) == result_files(ref_dir)
    assert json.loads((out / MANIFEST_NAME).read_text())["status"] == "complete"


def test_strict_stops_at_the_first_broken_file(
    ray_local, extract_clean_run, extract_images, extract_bundle_dir, tmp_path
):
    root, _ = extract_images
    ref_dir, _ = extract_clean_run
    first = json.loads((ref_dir / ERRORS_NAME).read_text().splitlines()[0])
    out = tmp_path / "strict"
    with pytest.raises(InputError, match=f"--strict: stopped at row {first['row']} "):
        extract_features(root, extract_bundle_dir, out, progress=False, strict=True, **RAY_RUN)
    assert [json.loads(x)["row"] for x in (out / ERRORS_NAME).read_text().splitlines()] == [first["row"]]
    assert first["path"].endswith(tuple(BROKEN))
    assert json.loads((out / MANIFEST_NAME).read_text())["status"] == "interrupted"


def test_tokens_pooling_on_ray_equals_local(ray_local, extract_images, extract_bundle_dir, tmp_path):
    root, _ = extract_images
    local = extract_features(
        root / "odd",
        extract_bundle_dir,
        tmp_path / "local",
        progress=False,
        pool="tokens",
        dtype="float16",
        workers=0,
        batch_size=4,
    )
    ray = extract_features(
        root / "odd",
        extract_bundle_dir,
        tmp_path / "ray",
        progress=False,
        pool="tokens",
        dtype="float16",
        engine="ray",
        batch_size=4,
    )
    assert ray.feature_shape == local.feature_shape == (17, 32)
    a, b = open_features(tmp_path / "ray"), open_features(tmp_path / "local")
    assert a.paths == b.paths and a.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_file_name_that_is_not_utf8_gives_the_same_result_on_both_engines(
    ray_local, extract_images, extract_bundle_dir, tmp_path
):
    import shutil

    root, _ = extract_images
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(root / "odd" / "exif_rot_twin.png", src / "plain.png")
    shutil.copy(root / "odd" / "exif_rot_twin.png", os.fsdecode(bytes(src) + b"/bad\xff.png"))
    (src / os.fsdecode(b"broken\xfe.png")).write_bytes(b"\x89PNG not really")  # its failure names it too
    local = extract_features(src, extract_bundle_dir, tmp_path / "local", progress=False, workers=0, batch_size=4)
    ray = extract_features(src, extract_bundle_dir, tmp_path / "ray", progress=False, engine="ray", batch_size=4)
    assert (ray.features, ray.failed) == (local.features, local.failed) == (2, 1)
    a, b = open_features(tmp_path / "ray"), open_features(tmp_path / "local")
    assert a.paths == b.paths and any(p.endswith(os.fsdecode(b"bad\xff.png")) for p in a.paths)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "ray" / ERRORS_NAME).read_bytes() == (tmp_path / "local" / ERRORS_NAME).read_bytes()


def test_an_unreachable_ray_address_from_the_environment_is_exit_7_naming_it(
    extract_images, extract_bundle_dir, tmp_path
):
    root, _ = extract_images
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mae_deploy.cli",
            "extract",
            str(root / "odd"),
            "--bundle",
            str(extract_bundle_dir),
            "--out",
            str(tmp_path / "out"),
            "--engine",
            "ray",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"},
    )
    assert r.returncode == 7, r.stderr
    assert "127.0.0.1:1" in r.stderr and "RAY_ADDRESS" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("option", ["--gpus-per-actor", "--cpus-per-actor"])
def test_a_resource_that_is_not_a_number_is_exit_3(extract_images, extract_bundle_dir, tmp_path, option):
    from click.testing import CliRunner

    from mae_deploy.cli import main

    root, _ = extract_images
    r = CliRunner().invoke(
        main,
        [
            "extract",
            str(root / "odd"),
            "--bundle",
            str(extract_bundle_dir),
            "--out",
            str(tmp_path / "out"),
            "--engine",
            "ray",
            option,
            "nan",
            "--no-progress",
        ],
    )
    assert r.exit_code == 3, r.output
    assert f"{option} must be a finite number" in r.output and not (tmp_path / "out").exists()
