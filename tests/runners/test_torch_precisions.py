"""The torch backend runs the reference weights at fp32 / bf16 (fp16 on CUDA) in every command, with no ONNX
graph of that precision in the bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_fixtures import export_classifier_bundle, export_tiny_bundle, tiny_classifier

from mae_deploy import open_features
from mae_deploy.cli import main
from mae_deploy.evaluate import evaluate
from mae_deploy.serve.config import ServeConfig
from mae_deploy.serve.service import ModelService

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def torch_tiny_bundle(tmp_path_factory):
    return export_tiny_bundle(tmp_path_factory.mktemp("tp") / "bundle")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return d


def _extract(images, bundle, out, *args) -> object:
    return CliRunner().invoke(
        main,
        ["extract", str(images), "--bundle", str(bundle), "--out", str(out), "--workers", "0", "--no-progress", *args],
    )


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_extract_with_torch_bf16_needs_no_bf16_graph(images, torch_tiny_bundle, tmp_path):
    assert "bf16" not in {g["precision"] for g in json.loads((torch_tiny_bundle / "mae.json").read_text())["graphs"]}
    r = _extract(images, torch_tiny_bundle, tmp_path / "fp32", "--backend", "torch")
    assert r.exit_code == 0, r.output
    r = _extract(images, torch_tiny_bundle, tmp_path / "bf16", "--backend", "torch", "--precision", "bf16")
    assert r.exit_code == 0, r.output
    fp32, bf16 = open_features(tmp_path / "fp32"), open_features(tmp_path / "bf16")
    assert fp32.paths == bf16.paths and len(fp32) == 5
    cos = _cosines(np.asarray(fp32, np.float64), np.asarray(bf16, np.float64))
    assert cos.min() > 0.99 and not np.array_equal(np.asarray(fp32), np.asarray(bf16))
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert manifest["bundle"]["precision"] == "bf16"
    # The job's identity binds the precision: resuming into the fp32 directory at bf16 is refused.
    assert (
        manifest["bundle"]["fingerprint"]
        != json.loads((tmp_path / "fp32" / "manifest.json").read_text())["bundle"]["fingerprint"]
    )


def test_a_graph_backend_still_needs_the_graph(images, torch_tiny_bundle, tmp_path):
    r = _extract(images, torch_tiny_bundle, tmp_path / "out", "--backend", "ort", "--precision", "bf16")
    assert r.exit_code == 3 and "bf16" in r.output


def test_eval_scores_torch_bf16_without_a_bf16_classifier_graph(tmp_path):
    from training.data import write_digits_imagefolder

    root = tmp_path / "digits"
    write_digits_imagefolder(root, size=32, per_class=3, seed=0)
    b = export_classifier_bundle(
        tmp_path / "bundle",
        model=tiny_classifier(num_classes=10, in_chans=1),
        labels=[str(d) for d in range(10)],
        precisions="fp32",
    )
    report = evaluate(b, root / "val", ["fp32", "bf16"], backend="torch")
    assert [s.name for s in report.scores] == ["torch fp32", "torch bf16"]
    r = CliRunner().invoke(
        main, ["eval", str(b), str(root / "val"), "--backend", "torch", "--precisions", "bf16", "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert "torch bf16" in r.output


def test_serve_loads_torch_bf16(torch_tiny_bundle):
    service = ModelService(ServeConfig(bundle=str(torch_tiny_bundle), backend="torch", precision="bf16"))
    service.load()
    try:
        assert service.runner.info.precision == "bf16"
        assert service.graph_metadata("encoder")["outputs"][0]["name"] == "latent"
    finally:
        service.close()


def test_compile_is_an_option_of_extract_bench_and_serve(images, torch_tiny_bundle, tmp_path):
    r = _extract(images, torch_tiny_bundle, tmp_path / "c", "--backend", "torch", "--compile")
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(
        np.asarray(open_features(tmp_path / "c")),
        np.asarray(_eager(images, torch_tiny_bundle, tmp_path)),
        rtol=1e-4,
        atol=1e-4,
    )
    r = _extract(images, torch_tiny_bundle, tmp_path / "o", "--backend", "ort", "--compile")
    assert r.exit_code == 3 and "--compile compiles the model for torch or openvino" in r.output
    r = CliRunner().invoke(
        main,
        [
            "bench",
            str(torch_tiny_bundle),
            "--backends",
            "torch",
            "--compile",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--no-peak",
            "--no-reference",
            "--out",
            str(tmp_path / "b.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    runner = json.loads((tmp_path / "b.json").read_text())["runners"][0]
    assert runner["details"]["compiled"] is True
    for cmd in ("bench", "serve"):
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert "--compile" in r.output


def _eager(images, bundle, tmp_path):
    assert _extract(images, bundle, tmp_path / "e", "--backend", "torch").exit_code == 0
    return open_features(tmp_path / "e")
