"""Triton Inference Server model repositories from a bundle (``mae-deploy triton``).

- :mod:`~mae_deploy.triton.repository`: :func:`write_repository`, the layout and its atomic write;
- :mod:`~mae_deploy.triton.configs`: the config.pbtxt of each model (ONNX, Python backend, ensembles);
- :mod:`~mae_deploy.triton.pbtxt`: the protobuf text-format writer;
- :mod:`~mae_deploy.triton.python_backend`: the preprocessing and pooling models the generated model.py import.

Schema-checked with tritonclient's ``model_config_pb2`` in the tests (a live Triton: docs/verification.md).
"""

from __future__ import annotations

from mae_deploy.triton.repository import RepositoryReport, write_repository

__all__ = ["RepositoryReport", "write_repository"]
