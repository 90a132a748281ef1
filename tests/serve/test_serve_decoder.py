"""``serve --decoder torch``: JPEGs decoded by torch on the runner's device (the CPU here), features within
cosine 0.999 of ``--decoder pil`` on real photos; other formats and broken JPEGs take the PIL path, with the
same answers and the same errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from serve_support import LiveServer

httpx = pytest.importorskip("httpx")
pytest.importorskip("torchvision")
skdata = pytest.importorskip("skimage.data")

from mae_deploy.serve.config import ServeConfig  # noqa: E402


def encoded(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


PHOTOS = {name: encoded(getattr(skdata, name)(), "JPEG") for name in ("astronaut", "coffee", "chelsea", "camera")}


@pytest.fixture(scope="module")
def servers(tiny_bundle):
    with (
        LiveServer(ServeConfig(bundle=str(tiny_bundle), decoder="pil")) as pil,
        LiveServer(ServeConfig(bundle=str(tiny_bundle), decoder="torch")) as dev,
    ):
        yield pil, dev


def features(url: str, blobs: list[bytes], pool: str):
    files = [("file", (f"i{i}", b, "application/octet-stream")) for i, b in enumerate(blobs)]
    return httpx.post(f"{url}/v1/features?pool={pool}", files=files, timeout=60)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_torch_decoder_is_in_use(servers):
    pil, dev = servers
    assert dev.service.device_images is not None and pil.service.device_images is None


@pytest.mark.parametrize("pool", ["cls", "mean", "tokens"])
def test_torch_decoded_photos_match_pil_within_cosine_0999(servers, pool):
    pil, dev = servers
    blobs = list(PHOTOS.values())
    got = [
        np.array([d["embedding"] for d in features(s.url, blobs, pool).json()["data"]], np.float32) for s in (pil, dev)
    ]
    sims = cosine(*got)
    assert sims.min() > 0.999, dict(zip(PHOTOS, sims.round(6), strict=True))
    assert not np.array_equal(got[0], got[1])  # really another decoder, not the PIL path twice


def test_png_and_jpeg_mixed_keep_their_order_and_pngs_equal_pil(servers):
    pil, dev = servers
    png = encoded(skdata.chelsea(), "PNG")
    blobs = [png, PHOTOS["coffee"], png]
    got = [
        np.array([d["embedding"] for d in features(s.url, blobs, "mean").json()["data"]], np.float32)
        for s in (pil, dev)
    ]
    np.testing.assert_allclose(got[1][[0, 2]], got[0][[0, 2]], atol=1e-5, rtol=0)  # PNGs: the PIL path
    assert cosine(got[0][1:2], got[1][1:2])[0] > 0.999


@pytest.mark.parametrize(
    "blob",
    [PHOTOS["coffee"][:3000], b"\xff\xd8" + b"\0" * 100 + b"\xff\xd9", b"junk"],
    ids=["truncated", "broken", "not an image"],
)
def test_bad_images_are_the_same_400_under_both_decoders(servers, blob):
    answers = [features(s.url, [PHOTOS["camera"], blob], "cls") for s in servers]
    assert [r.status_code for r in answers] == [400, 400]
    assert json.loads(answers[0].text) == json.loads(answers[1].text)


def test_default_decoder_follows_the_device():
    assert ServeConfig(bundle="b").image_decoder == "pil"
    assert ServeConfig(bundle="b", device="cuda:0").image_decoder == "torch"
    assert ServeConfig(bundle="b", device="cuda", decoder="pil").image_decoder == "pil"
