"""Fixtures of the runner tests: TensorRT and cuda-python fakes and their bundles."""

from __future__ import annotations

from pathlib import Path

import pytest

from mae_deploy.bundle import Bundle

pytest.register_assert_rewrite("trt_fakes")

# ------------------------------------------------------------------------------------------------
# TensorRT and cuda-python fakes (trt_fakes.py) and their bundles
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def installed_trt_fakes(monkeypatch):
    """FakeTrt (10.x) and FakeCudart installed as ``tensorrt`` and ``cuda.bindings.runtime``: (trt, cudart)."""
    from trt_fakes import FakeCudart, FakeTrt, install

    cudart = FakeCudart()
    trt = FakeTrt("10.13.1", cudart)
    install(monkeypatch, trt, cudart)
    return trt, cudart


@pytest.fixture(scope="module")
def trt_bundle_dir(tmp_path_factory) -> Path:
    """mae_vit_test with fp32 and fp16 graphs, exported by the real exporter (once per module)."""
    from trt_fakes import export_trt_bundle

    return export_trt_bundle(tmp_path_factory.mktemp("trt") / "bundle")


@pytest.fixture(scope="module")
def trt_bundle(trt_bundle_dir) -> Bundle:
    """``trt_bundle_dir`` loaded."""
    return Bundle.load(trt_bundle_dir)


@pytest.fixture(scope="module")
def trt_fp32_only_bundle(tmp_path_factory, trt_bundle_dir) -> Bundle:
    """``trt_bundle_dir`` without its fp16 graphs, loaded."""
    from trt_fakes import fp32_only_copy

    return fp32_only_copy(trt_bundle_dir, tmp_path_factory.mktemp("trt32") / "bundle")
