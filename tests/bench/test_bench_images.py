"""`bench --images`: real images as the pixel values (issue #25: int8 is calibrated on real images, so noise says
little), and the pooled-feature agreement of encoder rows (pooled cosine >= 0.999 is what users judge int8 by)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mae_deploy import bench
from mae_deploy.bench import BenchConfig, agreement, format_summary, markdown_table, run_benchmark, validate_results
from mae_deploy.bench.workloads import Workloads, load_images
from mae_deploy.cli import main
from mae_deploy.errors import InputError
from mae_deploy.preprocess import Preprocessor


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """Three readable images of different sizes and modes, and a corrupt one that sorts first."""
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    (d / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(d / "b.png")
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(d / "c.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (33, 33), np.uint8), mode="L").save(d / "d.png")
    return d


# ---------------------------------------------------------------------------------------------- pooled cosine


def test_pooled_cosine_is_the_mean_of_the_patch_tokens_not_the_flattened_latent():
    """Two images (N, 1+K, D) = (2, 3, 2) where the flattened cosine, the pooled cosine and a pooled cosine that
    wrongly kept the cls token all differ."""
    ref = np.array(
        [
            [[1, 0], [1, 0], [0, 1]],  # image 0: patch mean (0.5, 0.5)
            [[1, 0], [1, 0], [1, 0]],  # image 1: patch mean (1, 0)
        ],
        np.float32,
    )
    out = np.array(
        [
            [[0, 3], [0, 1], [1, 0]],  # another cls, the patches swapped: same patch mean, flattened cosine 0
            [[1, 0], [1, 0], [0, 1]],  # patch mean (0.5, 0.5): pooled cosine 1/sqrt(2)
        ],
        np.float32,
    )
    a = agreement(out, ref, "r", pooled=True)
    assert a["cosine"] == pytest.approx(0.0)
    assert a["pooled_cosine"] == pytest.approx(1 / math.sqrt(2))
    # With cls in the mean image 0 would be the lowest at 6/sqrt(85) = 0.65: not what pooled_cosine is.
    assert a["pooled_cosine"] != pytest.approx(6 / math.sqrt(85), abs=1e-3)
    assert agreement(out, ref, "r")["pooled_cosine"] is None  # decoder and reconstruct rows
    same = agreement(ref.copy(), ref, "r", pooled=True)
    for key in ("cosine", "pooled_cosine"):  # rounding may land below 1, never above
        assert same[key] == pytest.approx(1.0, abs=1e-12) and same[key] <= 1.0
    with pytest.raises(InputError, match="encoder latents"):
        agreement(ref[:, 0], ref[:, 0], "r", pooled=True)


# ---------------------------------------------------------------------------------------------- workloads


def test_images_are_preprocessed_as_the_bundle_says_and_cycled(loaded_tiny_bundle, image_dir):
    bundle = loaded_tiny_bundle
    images = load_images(bundle, str(image_dir), 8)
    assert len(images.pixel_values) == 3 and len(images.skipped) == 1 and "a.png" in images.skipped[0]
    expected = Preprocessor.from_bundle(bundle)([image_dir / n for n in ("b.png", "c.jpg", "d.png")])
    work = Workloads(bundle, 0, images)
    x = work.pixels(8)
    assert x.shape == (8, bundle.in_chans, bundle.image_size, bundle.image_size) and x.dtype == np.float32
    np.testing.assert_array_equal(x, expected[[0, 1, 2, 0, 1, 2, 0, 1]])
    np.testing.assert_array_equal(work.pixels(2), expected[:2])
    assert x.flags.c_contiguous
    assert work.describe() == {"pixels": "images", "source": str(image_dir), "images": 3, "skipped": 1, "seed": 0}
    # Only as many images as the largest batch are read.
    assert len(load_images(bundle, str(image_dir), 2).pixel_values) == 2


def test_without_images_the_pixels_are_the_seeded_noise_as_before(loaded_tiny_bundle):
    bundle = loaded_tiny_bundle
    work = Workloads(bundle, 5)
    shape = (4, bundle.in_chans, bundle.image_size, bundle.image_size)
    np.testing.assert_array_equal(work.pixels(4), np.random.default_rng([5, 4]).standard_normal(shape, np.float32))
    assert work.describe()["pixels"] == "seeded noise" and work.describe()["source"] is None


def test_a_glob_and_a_list_file_are_sources_too(loaded_tiny_bundle, image_dir, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image_dir / 'd.png'}\n{image_dir / 'b.png'}\n")
    pre = Preprocessor.from_bundle(loaded_tiny_bundle)
    by_list = load_images(loaded_tiny_bundle, str(listing), 4).pixel_values
    np.testing.assert_array_equal(by_list, pre([image_dir / "d.png", image_dir / "b.png"]))  # as listed
    by_glob = load_images(loaded_tiny_bundle, str(image_dir / "*.png"), 4)
    assert len(by_glob.pixel_values) == 2 and len(by_glob.skipped) == 1  # b.png, d.png; a.png unreadable


# ---------------------------------------------------------------------------------------------- end to end


def test_a_run_on_images_records_them_and_pooled_cosine(tiny_bundle, image_dir, tmp_path):
    results = run_benchmark(
        tiny_bundle,
        BenchConfig(
            backends=("ort", "torch"),
            parts=("encoder", "decoder"),
            batch_sizes=(4,),
            visible=(16, 4),
            iters=1,
            warmup=0,
            threads=1,
            peak=False,
            images=str(image_dir),
        ),
        progress=False,
    )
    validate_results(results)
    assert results["schema_version"] == bench.SCHEMA_VERSION
    assert results["config"]["images"] == str(image_dir)
    assert results["inputs"] == {"pixels": "images", "source": str(image_dir), "images": 3, "skipped": 1, "seed": 0}
    assert results["reference"]["name"] == "torch-fp32"
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    assert len(ok) == len(results["rows"]) == 2 * 2 * 2
    for r in ok:  # int8 rows: tests/bench/test_bench.py's end-to-end run
        pooled = r["agreement"]["pooled_cosine"]
        if r["part"] == "decoder":
            assert pooled is None
        else:  # torch and ORT fp32: the reference's model in the reference's precision
            assert -1.0 <= pooled <= 1.0 and pooled == pytest.approx(1.0, abs=1e-6)
    md = markdown_table(results)
    assert f"inputs: 3 images from {image_dir}, 1 unreadable passed over" in md
    assert "| cosine | pooled cosine | status |" in md
    assert f"inputs    3 images from {image_dir}" in format_summary(results)
    bench.write_csv(results, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        table = list(csv.DictReader(f))
    enc = next(t for t in table if t["part"] == "encoder" and t["status"] == "ok")
    dec = next(t for t in table if t["part"] == "decoder" and t["status"] == "ok")
    assert -1.0 <= float(enc["pooled_cosine"]) <= 1.0 and dec["pooled_cosine"] == ""


def test_ort_fp32_against_the_ort_reference_pools_to_exactly_one(tiny_bundle, monkeypatch):
    """Without torch the reference is ORT fp32, so the ORT fp32 encoder rows agree to the last bit; seeded noise."""
    from mae_deploy.bench import workloads

    monkeypatch.setattr(workloads, "torch_not_offered", lambda *a, **k: "torch unavailable (test)")
    results = run_benchmark(
        tiny_bundle,
        BenchConfig(parts=("encoder",), visible=(16, 4), iters=1, warmup=0, threads=1, peak=False),
        progress=False,
    )
    assert results["reference"]["name"] == "ort-fp32"
    assert results["inputs"]["pixels"] == "seeded noise"
    for r in results["rows"]:
        agr = r["agreement"]
        assert agr["max_abs_diff"] == 0.0 and agr["pooled_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert "inputs: seeded standard-normal noise (seed 0)" in markdown_table(results)


# ---------------------------------------------------------------------------------------------- bad input


def _bench(bundle: Path, images: str):
    return CliRunner().invoke(
        main,
        ["bench", str(bundle), "--images", images, "--iters", "1", "--warmup", "0", "--visible", "16", "--no-peak"],
    )


def test_bad_images_are_exit_3_naming_the_path_and_what_to_pass(tiny_bundle, tmp_path, monkeypatch):
    def must_not_run(*a, **k):
        raise AssertionError("the benchmark ran before --images was checked")

    missing = tmp_path / "nope"
    monkeypatch.setattr(bench, "run_benchmark", must_not_run)
    r = _bench(tiny_bundle, str(missing))
    assert r.exit_code == 3, r.output
    assert f"--images: source {missing} does not exist; give a directory, a glob or a text file" in r.output
    assert "Traceback" not in r.output
    no_images = tmp_path / "empty"
    no_images.mkdir()
    (no_images / "notes.txt").write_text("no images here")
    r = _bench(tiny_bundle, str(no_images))
    assert r.exit_code == 3 and f"--images: directory {no_images} holds no images" in r.output, r.output
    with pytest.raises(InputError, match="--images: source .* does not exist"):
        BenchConfig(images=str(missing)).validate()


def test_a_source_with_no_readable_image_is_exit_3_before_the_run(tiny_bundle, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"\xff\xd8 truncated")
    r = _bench(tiny_bundle, str(broken))
    assert r.exit_code == 3, r.output
    assert f"--images {broken}: " in r.output and "folder, glob or list file of images" in r.output
    assert "none of its 1 files is a readable image" in r.output and "x.jpg" in r.output
    assert "Performance summary" not in r.output and "Traceback" not in r.output


def test_images_in_a_results_file_round_trip(tiny_bundle, image_dir, tmp_path):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny_bundle),
            "--images",
            str(image_dir),
            "--batch-sizes",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--visible",
            "16",
            "--no-peak",
            "--no-reference",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    data = bench.load_results(out)
    assert data["inputs"]["images"] == 2 and data["inputs"]["source"] == str(image_dir)
    assert json.loads(out.read_text())["config"]["images"] == str(image_dir)
    assert f"inputs    2 images from {image_dir}" in r.output
