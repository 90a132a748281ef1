"""Tiny bundles for the runtime tests, exported here with torch.onnx until export/ offers export_bundle.

The builders behind tests/conftest.py's ``tiny_bundle``, ``norm_pix_bundle``, ``encoder_only_bundle`` and
``classifier_bundle`` fixtures. Bundles are built once per test session (cached in this module, and shared with
the other processes of the run through the graph cache's folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from graph_cache import build_once

from mae_deploy.bundle import MANIFEST_NAME, write_manifest

_CACHE: dict[str, Path] = {}


def _perturbed_model(name: str, seed: int):
    """A registry model whose LayerNorms and biases are not at their identity/zero init, so tests see them."""
    import torch

    from training.model import create_model

    torch.manual_seed(seed)
    model = create_model(name).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _export_graphs(model, dst: Path) -> list[dict]:
    import torch
    from torch import nn
    from torch.export import Dim

    cfg = model.config
    L, C, S, D = cfg.num_patches, cfg.in_chans, cfg.img_size, cfg.embed_dim

    class Enc(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values, ids_keep):
            return self.m.forward_encoder(pixel_values, ids_keep)

    class Dec(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latent, ids_restore):
            return self.m.forward_decoder(latent, ids_restore)

    batch, visible = Dim("batch", min=1, max=4096), Dim("visible", min=1, max=L)
    pv = torch.randn(2, C, S, S)
    ids_keep = torch.stack([torch.randperm(L)[: L // 4 + 1] for _ in range(2)])
    ids_restore = torch.stack([torch.randperm(L) for _ in range(2)])
    latent = torch.randn(2, L // 4 + 2, D)
    graphs = []
    jobs = [
        (
            "encoder",
            Enc(model),
            (pv, ids_keep),
            ("pixel_values", "ids_keep"),
            "latent",
            {"pixel_values": {0: batch}, "ids_keep": {0: batch, 1: visible}},
        ),
        (
            "decoder",
            Dec(model),
            (latent, ids_restore),
            ("latent", "ids_restore"),
            "pred",
            {"latent": {0: batch, 1: visible + 1}, "ids_restore": {0: batch}},
        ),
    ]
    for part, module, args, inputs, output, dyn in jobs:
        f = dst / f"{part}.onnx"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name")  # pixel_values and ids_keep share `batch`
            torch.onnx.export(
                module.eval(),
                args,
                str(f),
                input_names=list(inputs),
                output_names=[output],
                dynamic_shapes=dyn,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        shapes = {
            "pixel_values": ["batch", C, S, S],
            "ids_keep": ["batch", "visible"],
            "latent": ["batch", "visible+1", D],
            "ids_restore": ["batch", L],
            "pred": ["batch", L, cfg.patch_dim],
        }
        graphs.append(
            {
                "part": part,
                "precision": "fp32",
                "file": f.name,
                "external_data": [],
                "inputs": [
                    {"name": n, "dtype": "int64" if n.startswith("ids") else "float32", "shape": shapes[n]}
                    for n in inputs
                ],
                "outputs": [{"name": output, "dtype": "float32", "shape": shapes[output]}],
            }
        )
    return graphs


def export_tiny_bundle(dst: Path, name: str = "mae_vit_test", seed: int = 0) -> Path:
    """Export ``name`` (random init, perturbed) to a bundle at ``dst`` with reference/ weights."""
    from training.checkpoints import save_native

    dst.mkdir(parents=True)
    model = _perturbed_model(name, seed)
    graphs = _export_graphs(model, dst)
    save_native(model, dst / "reference")
    cfg = model.config
    manifest = {
        "architecture": cfg.to_dict(),
        "preprocessing": {
            "image_size": cfg.img_size,
            "resize": "shorter_side_crop",
            "crop_pct": 0.875,
            "interpolation": "bicubic",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        "norm_pix_loss": cfg.norm_pix_loss,
        "opset": 20,
        "graphs": graphs,
        "source": {"checkpoint": None, "format": "random-init test model"},
    }
    write_manifest(dst, manifest)
    return dst


def derived_bundle(src: Path, dst: Path, *, norm_pix: bool | None = None, drop_decoder: bool = False) -> Path:
    """A copy of ``src`` with another norm_pix_loss flag or without its decoder (graphs unchanged otherwise).

    norm-pix only changes how predictions are turned into pixels, so the same graphs serve as a norm-pix
    model's; the reference checkpoint is re-saved with the same flag so the torch runner agrees.
    """
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST_NAME).read_text())
    if norm_pix is not None:
        m["norm_pix_loss"] = norm_pix
        m["architecture"]["norm_pix_loss"] = norm_pix
        cfg_path = dst / "reference" / "config.json"
        ref = json.loads(cfg_path.read_text())
        ref["architecture"]["norm_pix_loss"] = norm_pix
        cfg_path.write_text(json.dumps(ref, indent=2))
    if drop_decoder:
        m["graphs"] = [g for g in m["graphs"] if g["part"] != "decoder"]
        (dst / "decoder.onnx").unlink()
    write_manifest(dst, m)
    return dst


def cached_bundle(tmp_path_factory, key: str, make) -> Path:
    """``make(dst)`` once per session for ``key``: later calls get the same folder."""
    if key not in _CACHE or not _CACHE[key].exists():
        _CACHE[key] = _shared(make, tmp_path_factory.mktemp("bundles") / key, key)
    return _CACHE[key]


def _shared(make, dst: Path, key: str) -> Path:
    """``make(dst)``, or a copy of the bundle another process of this run made (the graph cache's folder: the
    xdist workers and the nested OpenVINO run each need the tiny bundle, ~10 s of exporting)."""
    root = os.environ.get("MAE_TEST_GRAPH_CACHE")
    if not root or os.environ.get("MAE_TEST_REAL_EXPORTS"):
        return make(dst)
    entry = build_once(Path(root) / f"bundle-{key}", lambda tmp: make(tmp / "bundle"))
    shutil.copytree(entry / "bundle", dst)
    return dst


def tiny_classifier(num_classes: int = 5, in_chans: int = 3, seed: int = 0, global_pool: bool = False):
    """A mae_vit_test ViT classifier (random init, norms/biases/head perturbed so tests see them)."""
    import torch

    from training.model import VisionTransformer, get_config

    torch.manual_seed(seed)
    model = VisionTransformer(
        get_config("mae_vit_test", in_chans=in_chans), num_classes=num_classes, global_pool=global_pool
    ).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        model.head.weight.normal_(0.0, 0.5)
    return model


def export_classifier_bundle(dst: Path, model=None, labels=None, precisions: str = "fp32,int8") -> Path:
    """A classifier bundle (encoder + classifier graphs, reference weights) through the real export.

    The parity grid is skipped: a 32-wide model quantises too coarsely for export's int8 thresholds, and the
    tests that use these bundles compare the runtimes with PyTorch themselves.
    """
    from export.bundle_writer import export_bundle

    model = model if model is not None else tiny_classifier()
    export_bundle(model, dst, precisions=precisions, reference_weights=True, labels=labels, progress=None, verify=False)
    return dst


def missing_dependency_output(bundle: Path, module: str, backend: str) -> str:
    """``create_runner(bundle, backend)`` in a fresh process where ``module`` cannot be imported: what it prints
    for the MissingDependency it must raise (``"<exit code> <message>"``)."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from mae_deploy import create_runner\n"
        "from mae_deploy.errors import MissingDependency\n"
        f"try:\n    create_runner({str(bundle)!r}, {backend!r})\n"
        "except MissingDependency as e:\n    print(e.exit_code, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout
