"""Backends behind the one :class:`~mae_deploy.runners.base.Runner` interface.

``create_runner`` picks one by name and imports it lazily, so choosing ``ort`` never imports torch,
TensorRT or OpenVINO, and a missing optional package only matters to the backend that needs it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

from mae_deploy.errors import InputError
from mae_deploy.names import BACKENDS, DIAGNOSTIC_BACKENDS
from mae_deploy.runners.base import BaseRunner, Runner, RunnerInfo, check_threads

__all__ = ["BACKENDS", "BaseRunner", "Runner", "RunnerInfo", "create_runner"]


def _runner_class(backend: str) -> Callable[..., BaseRunner]:
    if backend == "ort":
        from mae_deploy.runners.ort import OrtRunner

        return OrtRunner
    if backend == "trt":
        from mae_deploy.runners.trt import TrtRunner

        return TrtRunner
    if backend == "openvino":
        from mae_deploy.runners.openvino import OpenVinoRunner

        return OpenVinoRunner
    if backend == "null":
        from mae_deploy.runners.null import NullRunner

        return NullRunner
    from mae_deploy.runners.torch_runner import TorchRunner

    return TorchRunner


def create_runner(
    bundle, backend: str = "ort", device: str = "cpu", precision: str = "fp32", *, threads: int | None = None, **opts
) -> Runner:
    """A runner for ``bundle`` (a :class:`~mae_deploy.bundle.Bundle` or a bundle path).

    backend ``ort``: ONNX Runtime (device cpu, cuda[:N] or tensorrt[:N]); ``trt``: TensorRT's own API
    (device cuda[:N]); ``openvino``: OpenVINO on the CPU (fp32, bf16, int8 from a Q/DQ graph); ``torch``:
    the PyTorch reference (device cpu or cuda[:N]; ``checkpoint=`` overrides the bundle's reference weights).
    ``null`` (a diagnostic, not in ``BACKENDS``): zeros at once, for measuring the pipeline around a model.

    ``threads`` is one option for every backend: ORT's intra-op threads, ``torch.set_num_threads``,
    OpenVINO's INFERENCE_NUM_THREADS; the trt backend has none and refuses it (InputError, exit 3).
    ``opts`` go to the backend's constructor (an unknown one is an InputError naming the backend).
    """
    if backend not in BACKENDS and backend not in DIAGNOSTIC_BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    threads = check_threads(threads)
    if isinstance(bundle, (str, os.PathLike)):
        from mae_deploy.bundle import Bundle

        bundle = Bundle.load(bundle)
    cls = _runner_class(backend)
    params = inspect.signature(cls).parameters
    accepted = set(params) - {"self", "bundle"}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(opts) - accepted)
    if unknown and not takes_any:
        raise InputError(
            f"the {backend} backend has no option {', '.join(unknown)}; it takes: {', '.join(sorted(accepted))}"
        )
    return cls(bundle, device=device, precision=precision, threads=threads, **opts)
