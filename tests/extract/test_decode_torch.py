"""``--decoder torch`` (issue #21): JPEG batches decoded and preprocessed by torch (the CUDA code, run on the CPU).

Features agree with the exact PIL path on real photos; every other file takes the PIL path with the same
errors.jsonl reasons; the decoder is in the manifest and binds a resume.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from extract_data import RUN
from PIL import Image

from mae_deploy.errors import InputError
from mae_deploy.extract import extract_features, open_features
from mae_deploy.extract.decode import device_decodable

pytest.importorskip("torchvision")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

PHOTOS = {
    "astronaut": (500, 375),
    "coffee": (375, 500),
    "chelsea": (451, 300),
    "rocket": (640, 427),
    "retina": (741, 497),
    "hubble_deep_field": (300, 300),
}


def _jpeg(a: np.ndarray, size: tuple[int, int], quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert("RGB").resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle224(tmp_path_factory):
    """A small encoder at 224x224 / patch 16: the resize and crop of real photos at the real scale."""
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bundle224") / "bundle"
    model = create_model("mae_vit_test", img_size=224, patch_size=16, embed_dim=64, depth=2).eval()
    export_bundle(model, out, parts=["encoder"], verify=False, progress=None)
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_features_of_real_photos_match_the_exact_pil_path(bundle224, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for name, size in PHOTOS.items():
        (src / f"{name}.jpg").write_bytes(_jpeg(getattr(skimage_data, name)(), size))
    exact = extract_features(
        src, bundle224, tmp_path / "exact", progress=False, exact_resize=True, workers=1, decoder="pil"
    )
    dev = extract_features(
        src, bundle224, tmp_path / "torch", progress=False, exact_resize=True, workers=1, decoder="torch"
    )
    assert exact.features == dev.features == len(PHOTOS)
    fa, fb = open_features(tmp_path / "exact"), open_features(tmp_path / "torch")
    a, b = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    cos = _cosines(a, b)
    assert cos.min() >= 0.999, dict(zip(PHOTOS, cos.round(6), strict=True))
    assert not np.array_equal(a, b)  # really another decoder, not the PIL path again


def test_pixels_are_within_rounding_of_pillows(bundle224):
    from mae_deploy.bundle import Bundle
    from mae_deploy.decode_torch import TorchJpegDecoder
    from mae_deploy.preprocess import Preprocessor

    pre = Preprocessor.from_bundle(Bundle.load(bundle224), exact_resize=True)
    blobs = [_jpeg(getattr(skimage_data, n)(), s) for n, s in PHOTOS.items()]
    x, ok = TorchJpegDecoder(pre).decode(blobs)
    assert ok == list(range(len(blobs)))
    ref = np.stack([pre.normalize(pre.model_image(Image.open(io.BytesIO(b)))) for b in blobs])
    levels = np.abs(x.numpy() - ref) * pre.std.reshape(1, -1, 1, 1) * 255  # back in 8-bit levels
    assert levels.mean() < 1.0 and np.percentile(levels, 99) < 4


def test_only_whole_rgb_or_grey_jpegs_within_limits_go_to_the_device():
    a = skimage_data.astronaut()
    good = _jpeg(a, (96, 80))
    buf = io.BytesIO()
    Image.fromarray(a).convert("CMYK").save(buf, format="JPEG")
    png = io.BytesIO()
    Image.fromarray(a).save(png, format="PNG")
    assert device_decodable(good, 0, 16)
    assert not device_decodable(good[: len(good) // 2], 0, 16)  # truncated: PIL says "truncated"
    assert not device_decodable(buf.getvalue(), 0, 16)  # CMYK
    assert not device_decodable(png.getvalue(), 0, 16)
    assert not device_decodable(good, 96 * 80 - 1, 16)  # above max_pixels: decompression_bomb from PIL
    assert not device_decodable(good, 0, 81)  # too_small from PIL
    assert not device_decodable(b"this is not an image", 0, 16)


def test_every_file_gets_the_same_outcome_and_reason_as_under_pil(
    extract_images, extract_bundle_dir, extract_clean_run, tmp_path, monkeypatch
):
    """The whole test folder (broken and odd files included); one JPEG the device decoder rejects."""
    import mae_deploy.decode_torch as dt

    root, made = extract_images
    ref_dir, ref = extract_clean_run
    rejected = (root / made["good"][0]).read_bytes()
    real = dt.TorchJpegDecoder._decode

    def fussy(self, data):
        if any(bytes(d.numpy()) == rejected for d in data):
            raise RuntimeError("nvjpeg: unsupported JPEG (a stand-in)")
        return real(self, data)

    monkeypatch.setattr(dt.TorchJpegDecoder, "_decode", fussy)
    s = extract_features(root, extract_bundle_dir, tmp_path / "out", progress=False, decoder="torch", **RUN)
    assert (s.features, s.failures_by_reason) == (ref.features, ref.failures_by_reason)
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    ref_errors = [json.loads(x) for x in (ref_dir / "errors.jsonl").read_text().splitlines()]
    assert [(e["path"], e["reason"]) for e in errors] == [(e["path"], e["reason"]) for e in ref_errors]
    got, want = open_features(tmp_path / "out"), open_features(ref_dir)
    assert list(got.paths) == list(want.paths)
    first = list(want.paths).index(str(root / made["good"][0]))
    assert np.array_equal(got[first], want[first])  # decoded by PIL after the rejection
    cos = _cosines(np.asarray(got, np.float64), np.asarray(want, np.float64))
    assert np.median(cos) > 0.99  # tiny 32-pixel model: the two resizers differ most at this scale
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["decoder"] == "torch" and manifest["runs"][-1]["decoder"] == "torch"


def test_the_decoder_binds_a_resume_and_defaults_by_device(extract_images, extract_bundle_dir, tmp_path):
    from mae_deploy.decode_torch import default_decoder

    root, made = extract_images
    one = tmp_path / "one.txt"
    one.write_text(str(root / made["good"][0]) + "\n")
    extract_features(one, extract_bundle_dir, tmp_path / "out", progress=False, workers=0, decoder="torch")
    with pytest.raises(InputError, match="decoder: was 'torch', now 'pil'"):
        extract_features(one, extract_bundle_dir, tmp_path / "out", progress=False, workers=0)  # cpu: pil by default
    assert [default_decoder(d) for d in ("cuda:1", "tensorrt", "cpu")] == ["torch", "torch", "pil"]
    with pytest.raises(InputError, match="--engine local"):
        extract_features(one, extract_bundle_dir, tmp_path / "ray", progress=False, engine="ray", decoder="torch")
    with pytest.raises(InputError, match="decoder must be one of"):
        extract_features(one, extract_bundle_dir, tmp_path / "bad", progress=False, decoder="nvjpeg")


def test_the_cli_takes_decoder(extract_images, extract_bundle_dir, tmp_path):
    from click.testing import CliRunner

    from mae_deploy.cli import main

    root, made = extract_images
    one = tmp_path / "one.txt"
    one.write_text(str(root / made["good"][0]) + "\n")
    r = CliRunner().invoke(
        main,
        [
            "extract",
            str(one),
            "--bundle",
            str(extract_bundle_dir),
            "--out",
            str(tmp_path / "out"),
            "--decoder",
            "torch",
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["decoder"] == "torch"
