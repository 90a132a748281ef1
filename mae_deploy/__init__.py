"""mae-deploy runtime: torch-free bundle loading, preprocessing, runners and pipelines.

Importing this package never imports torch (tested): production images install it without PyTorch.
The public names below are imported on first use, so ``import mae_deploy`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it (imported lazily by __getattr__). Add new exports here.
_LAZY = {
    "Bundle": "mae_deploy.bundle",
    "write_manifest": "mae_deploy.bundle",
    "Preprocessor": "mae_deploy.preprocess",
    "random_masking": "mae_deploy.masking",
    "create_runner": "mae_deploy.runners",
    "FeatureExtractor": "mae_deploy.features",
    "Reconstructor": "mae_deploy.reconstruct",
    "extract_features": "mae_deploy.extract",
    "open_features": "mae_deploy.extract",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'mae_deploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
