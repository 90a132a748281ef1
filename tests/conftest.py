"""Session-wide fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def vit_base_bundle(tmp_path_factory) -> Path:
    """A random-init ViT-B/16 MAE (encoder + decoder) exported once, with reference weights.

    The parity grid is skipped here (verify=False): the tests that use it compare against PyTorch
    themselves, at the batch/visible counts they care about.
    """
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16", norm_pix_loss=True).eval()
    out = tmp_path_factory.mktemp("vitb") / "bundle"
    export_bundle(model, out, verify=False, reference_weights=True, progress=None)
    return out
