"""ViT-B/16 through the runtime: the ORT and torch runners agree on features and reconstructions."""

from __future__ import annotations

import numpy as np
import onnx
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


def test_vit_base_encoder_serves_every_visible_count_and_batch(vit_base_bundle, runners):
    """One encoder file, symbolic batch and visible: visible 49 and 196 at batch 1 and 8 equal PyTorch."""
    enc = onnx.load(str(vit_base_bundle / "encoder.onnx"), load_external_data=False)
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (enc.graph.input[1], enc.graph.output[0])
    ]
    assert dims == [["batch", "visible"], ["batch", "visible+1", 768]]
    ort, torch_ = runners
    rng = np.random.default_rng(0)
    x8 = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
    for batch in (1, 8):
        for visible in (49, 196):
            ids_keep = np.stack([rng.permutation(196)[:visible] for _ in range(batch)]).astype(np.int64)
            out = ort.encode(x8[:batch], ids_keep)
            assert out.shape == (batch, visible + 1, 768)
            assert np.abs(out - torch_.encode(x8[:batch], ids_keep)).max() <= 1e-4, (batch, visible)
