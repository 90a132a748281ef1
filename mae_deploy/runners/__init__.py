"""Backends behind the one :class:`~mae_deploy.runners.base.Runner` interface.

``create_runner`` picks one by name and imports it lazily, so choosing ``ort`` never imports torch or
TensorRT, and a missing optional package only matters to the backend that needs it.
"""

from __future__ import annotations

import os

from mae_deploy.errors import InputError
from mae_deploy.runners.base import Runner, RunnerInfo

BACKENDS = ("ort", "trt", "torch")

__all__ = ["BACKENDS", "Runner", "RunnerInfo", "create_runner"]


def create_runner(bundle, backend: str = "ort", device: str = "cpu", precision: str = "fp32", **opts) -> Runner:
    """A runner for ``bundle`` (a :class:`~mae_deploy.bundle.Bundle` or a bundle path).

    backend ``ort``: ONNX Runtime (device cpu, cuda[:N] or tensorrt[:N]); ``trt``: TensorRT's own API
    (device cuda[:N]); ``torch``: the PyTorch reference (device cpu or cuda[:N]; ``checkpoint=`` overrides
    the bundle's reference weights). ``opts`` go to the backend's constructor.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if isinstance(bundle, (str, os.PathLike)):
        from mae_deploy.bundle import Bundle

        bundle = Bundle.load(bundle)
    if backend == "ort":
        from mae_deploy.runners.ort import OrtRunner

        return OrtRunner(bundle, device=device, precision=precision, **opts)
    if backend == "trt":
        from mae_deploy.runners.trt import TrtRunner

        return TrtRunner(bundle, device=device, precision=precision, **opts)
    from mae_deploy.runners.torch_runner import TorchRunner

    return TorchRunner(bundle, device=device, precision=precision, **opts)
