"""ViT-B/16 through the runtime: the ORT and torch runners agree on features and reconstructions."""

from __future__ import annotations

import numpy as np
import pytest

from mae_deploy.features import FeatureExtractor
from mae_deploy.reconstruct import Reconstructor
from mae_deploy.runners import create_runner

skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]


@pytest.fixture(scope="module")
def runners(vit_base_bundle):
    ort = create_runner(vit_base_bundle, "ort")
    torch_ = create_runner(vit_base_bundle, "torch")
    yield ort, torch_
    ort.close()
    torch_.close()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_base_features_ort_equals_torch(vit_base_bundle, runners, photos, pool):
    ort, torch_ = runners
    a = FeatureExtractor(vit_base_bundle, pool=pool, runner=ort).extract(photos)
    b = FeatureExtractor(vit_base_bundle, pool=pool, runner=torch_).extract(photos)
    assert a.shape == b.shape == (3, 768)
    assert np.abs(a - b).max() <= 1e-4
    assert _cos(a, b).min() >= 0.99999


def test_vit_base_reconstruction_ort_equals_torch(vit_base_bundle, runners, photos):
    ort, torch_ = runners
    ra = Reconstructor(vit_base_bundle, runner=ort).reconstruct(photos[:2], mask_ratio=0.75, seed=3)
    rb = Reconstructor(vit_base_bundle, runner=torch_).reconstruct(photos[:2], mask_ratio=0.75, seed=3)
    for x, y in zip(ra, rb, strict=True):
        assert x.pred.shape == (196, 768) and x.mask.sum() == 196 - 49
        assert np.array_equal(x.mask, y.mask)
        assert np.abs(x.pred - y.pred).max() <= 1e-4
        # uint8 pixels may differ by one level where a value sits on a rounding boundary
        assert np.abs(x.reconstruction.astype(int) - y.reconstruction.astype(int)).max() <= 1
