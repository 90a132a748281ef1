"""GPU: what leaves the device is what the caller asked for (pooled outputs, CUDA tensors in and out, the
compiled torch runner), against the PyTorch fp32 CPU result. Skips where CUDA / onnxruntime-gpu are missing."""

from __future__ import annotations

import numpy as np
import pytest

from mae_deploy.bundle import Bundle
from mae_deploy.pooling import pool_latent

pytestmark = pytest.mark.gpu


def _ref_pooled(cpu_reference, pool: str) -> np.ndarray:
    return pool_latent(cpu_reference["latent"], pool)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_ort_cuda_pooled_output_from_numpy_and_from_a_cuda_tensor(
    ort_cuda, cuda_torch, gpu_tiny_bundle, tiny_inputs, cpu_reference, pool
):
    from mae_deploy.runners.ort import OrtRunner

    torch = cuda_torch
    with OrtRunner(Bundle.load(gpu_tiny_bundle), device="cuda") as r:
        want = _ref_pooled(cpu_reference, pool)
        got = r.encode_pooled(tiny_inputs["x"], tiny_inputs["ids_keep"], pool)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-2
        x = torch.from_numpy(tiny_inputs["x"]).cuda()
        on_device = r.encode_pooled(x, tiny_inputs["ids_keep"], pool)
        assert isinstance(on_device, torch.Tensor) and on_device.is_cuda and on_device.shape == want.shape
        np.testing.assert_allclose(on_device.cpu().numpy(), got, rtol=0, atol=1e-5)
        latent = r.encode(x, torch.from_numpy(tiny_inputs["ids_keep"]).cuda())
        assert latent.is_cuda and np.abs(latent.cpu().numpy() - cpu_reference["latent"]).max() <= 1e-2


def test_ort_cuda_fp16_graph_pooled(ort_cuda, gpu_tiny_bundle, tiny_inputs, cpu_reference):
    from mae_deploy.runners.ort import OrtRunner

    with OrtRunner(Bundle.load(gpu_tiny_bundle), device="cuda", precision="fp16") as r:
        got = r.encode_pooled(tiny_inputs["x"], tiny_inputs["ids_keep"], "mean")
        want = _ref_pooled(cpu_reference, "mean")
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() >= 0.999 and np.abs(got - want).max() > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_torch_cuda_tensors_stay_on_the_device(cuda_torch, gpu_tiny_bundle, tiny_inputs, cpu_reference, precision):
    from mae_deploy.runners.torch_runner import TorchRunner

    torch = cuda_torch
    with TorchRunner(Bundle.load(gpu_tiny_bundle), device="cuda", precision=precision) as r:
        x = torch.from_numpy(tiny_inputs["x"]).cuda()
        out = r.encode_pooled(x, tiny_inputs["ids_keep"], "cls")
        assert out.is_cuda and out.dtype == torch.float32
        got, want = out.cpu().numpy(), _ref_pooled(cpu_reference, "cls")
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() >= (0.9999 if precision == "fp32" else 0.99)


def test_torch_pinned_staging_keeps_calls_apart(cuda_torch, gpu_tiny_bundle, tiny_inputs):
    """Back-to-back numpy calls through the reused pinned buffers each see their own input."""
    from mae_deploy.runners.torch_runner import TorchRunner

    x = tiny_inputs["x"]
    with (
        TorchRunner(Bundle.load(gpu_tiny_bundle), device="cuda") as r,
        TorchRunner(Bundle.load(gpu_tiny_bundle), device="cpu") as cpu,
    ):
        outs = [r.encode_pooled(x * s, tiny_inputs["ids_keep"], "mean") for s in (1.0, -1.0, 0.5, 2.0)]
        for s, got in zip((1.0, -1.0, 0.5, 2.0), outs, strict=True):
            assert np.abs(got - cpu.encode_pooled(x * s, tiny_inputs["ids_keep"], "mean")).max() <= 1e-2


def test_torch_compiled_on_cuda_equals_eager(cuda_torch, gpu_tiny_bundle, tiny_inputs):
    """compile=True (CUDA graphs via reduce-overhead): the same features, and outputs that a later replay
    does not overwrite."""
    from mae_deploy.runners.torch_runner import TorchRunner

    torch = cuda_torch
    b = Bundle.load(gpu_tiny_bundle)
    x = torch.from_numpy(tiny_inputs["x"]).cuda()
    with TorchRunner(b, device="cuda") as eager, TorchRunner(b, device="cuda", compile=True) as comp:
        first = comp.encode_pooled(x, tiny_inputs["all"], "cls")
        second = comp.encode_pooled(-x, tiny_inputs["all"], "cls")
        for got, inp in ((first, x), (second, -x)):
            want = eager.encode_pooled(inp, tiny_inputs["all"], "cls")
            assert (got - want).abs().max().item() <= 1e-2
