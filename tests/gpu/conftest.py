"""Fixtures for the GPU smoke tests. Each skips, naming what is missing, where CUDA/TensorRT are absent.

Nothing here exports or imports anything heavy unless a CUDA device exists, so on CPU-only machines the
whole directory costs a torch import and a handful of skips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def cuda_torch():
    """torch with a working CUDA device, else skip saying which of the two is missing."""
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed (pip install 'mae-deploy[torch]')")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch.cuda.is_available() is False on this machine")
    try:  # a device can be listed and still not answer (driver too old for this CUDA, device busy or lost)
        torch.zeros(1, device="cuda").add_(1).cpu()
    except Exception as e:
        pytest.skip(f"CUDA device listed but not answering: {type(e).__name__}: {e}")
    return torch


@pytest.fixture(scope="session")
def gpu_name(cuda_torch) -> str:
    return cuda_torch.cuda.get_device_name(0)


@pytest.fixture(scope="session")
def tensorrt_ready(cuda_torch):
    """The tensorrt module (10+) and cuda-python, else skip with the runner's own one-line message."""
    from mae_deploy.errors import MaeDeployError
    from mae_deploy.runners.trt import cuda_device_name, import_cudart, import_tensorrt

    try:
        trt = import_tensorrt()
        # cuda-python must answer too: cuda-python 13 on a CUDA 12 driver imports fine, then every call fails.
        print(f"TensorRT {trt.__version__} on {cuda_device_name(import_cudart(), 0)}")
    except MaeDeployError as e:
        pytest.skip(f"TensorRT path not available: {e}")
    return trt


@pytest.fixture(scope="session")
def ort_cuda(cuda_torch):
    """onnxruntime with the CUDA execution provider, else skip naming onnxruntime-gpu."""
    try:
        import onnxruntime as ort
    except ImportError:
        pytest.skip("onnxruntime is not installed (pip install 'mae-deploy[gpu]')")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(
            f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
            f"({ort.get_available_providers()}); install onnxruntime-gpu: pip install 'mae-deploy[gpu]'"
        )
    _skip_unless_provider_answers(ort, "CUDAExecutionProvider")
    return ort


@pytest.fixture(scope="session")
def ort_tensorrt(ort_cuda):
    """onnxruntime with a TensorRT execution provider that really starts, else skip saying why."""
    if "TensorrtExecutionProvider" not in ort_cuda.get_available_providers():
        pytest.skip(f"onnxruntime {ort_cuda.__version__} here has no TensorrtExecutionProvider")
    _skip_unless_provider_answers(ort_cuda, "TensorrtExecutionProvider")
    return ort_cuda


def _skip_unless_provider_answers(ort, provider: str) -> None:
    """A provider can be listed and still fall back to the CPU when its libraries fail to load: try one."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=[provider, "CPUExecutionProvider"])
    except Exception as e:
        pytest.skip(f"{provider} listed but failed to start: {type(e).__name__}: {e}")
    if sess.get_providers()[0] != provider:
        pytest.skip(
            f"{provider} listed but ONNX Runtime fell back to {sess.get_providers()} (its libraries "
            "could not be loaded; ONNX Runtime's log says which)"
        )


def _export(model, out: Path) -> Path:
    from export.bundle_writer import export_bundle

    # fp16 variant: TensorRT 11 builds fp16 engines from it (strongly typed); verification is done by the tests.
    export_bundle(model, out, precisions=("fp32", "fp16"), reference_weights=True, verify=False, progress=None)
    return out


@pytest.fixture(scope="session")
def gpu_tiny_bundle(cuda_torch, tmp_path_factory) -> Path:
    """mae_vit_tiny_patch4 (32px, patch 4, L=64, dim 128, decoder 64x2), LayerNorms/biases perturbed so
    they matter, exported by export.export_bundle with an fp16 variant and reference weights."""
    from training.model import create_model

    cuda_torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4", norm_pix_loss=True).eval()
    with cuda_torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(cuda_torch.randn_like(p) * 0.1)
    return _export(model, tmp_path_factory.mktemp("gpu") / "tiny")


@pytest.fixture(scope="session")
def gpu_vitb_bundle(cuda_torch, tmp_path_factory) -> Path:
    """Random-init ViT-B/16 MAE with an fp16 variant (for the throughput measurement)."""
    from training.model import create_model

    cuda_torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16").eval()
    return _export(model, tmp_path_factory.mktemp("gpu") / "vitb")


@pytest.fixture(scope="session")
def trt_cache(tmp_path_factory) -> Path:
    """One engine cache for the session, so the cache-hit test finds the engines the parity tests built."""
    return tmp_path_factory.mktemp("trt-cache")


@pytest.fixture(scope="session")
def tiny_inputs(gpu_tiny_bundle):
    """Batch 5 (not a multiple of the engines' max batch 4: exercises chunking), mask ratio 0.75 and all visible."""
    from mae_deploy.bundle import Bundle
    from mae_deploy.masking import random_masking

    b = Bundle.load(gpu_tiny_bundle)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, b.in_chans, b.image_size, b.image_size)).astype(np.float32)
    ids_keep, ids_restore, _ = random_masking(5, b.num_patches, 0.75, rng)
    all_ids = np.tile(np.arange(b.num_patches, dtype=np.int64), (5, 1))
    return {"x": x, "ids_keep": ids_keep, "ids_restore": ids_restore, "all": all_ids}


@pytest.fixture(scope="session")
def cpu_reference(gpu_tiny_bundle, tiny_inputs):
    """The PyTorch fp32 CPU results every GPU backend is compared with."""
    from mae_deploy.bundle import Bundle
    from mae_deploy.runners.torch_runner import TorchRunner

    r = TorchRunner(Bundle.load(gpu_tiny_bundle), device="cpu")
    latent = r.encode(tiny_inputs["x"], tiny_inputs["ids_keep"])
    return {
        "latent": latent,
        "pred": r.decode(latent, tiny_inputs["ids_restore"]),
        "features": r.encode(tiny_inputs["x"], tiny_inputs["all"]),
    }
