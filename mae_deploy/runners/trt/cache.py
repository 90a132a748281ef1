"""The engine cache: keys, file layout and the record of a cached engine.

Engines are keyed by the graph's sha256 (its external data included), the TensorRT version, the GPU, the
profile, the precision and the build options (:func:`engine_cache_key`) and stored as
``<cache>/<part>-<precision>-<key>.engine`` with a JSON sidecar saying what built it. One timing cache per
TensorRT version and GPU is shared by every build (:func:`timing_cache_path`), so a second model or profile
builds faster. Default cache: ``$XDG_CACHE_HOME/mae-deploy/trt`` (``~/.cache/mae-deploy/trt``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae_deploy.errors import BundleError
from mae_deploy.runners.trt.profile import TrtProfile

# Bump when the meaning of a cached engine changes (build policy, key fields): old entries are then ignored.
ENGINE_KEY_VERSION = 1


def _canonical(value: Any) -> Any:
    """JSON-ready, order-independent form (dataclasses and tuples become dicts and lists)."""
    if isinstance(value, TrtProfile):
        return value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def engine_cache_key(
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    profile: TrtProfile | Mapping,
    precision: str,
    options: Mapping | None = None,
) -> str:
    """A stable hex key for an engine: the same inputs give the same key whatever the dict ordering.

    Anything that makes a cached engine wrong or different goes in: the graph's bytes, the TensorRT version
    (engines are not portable across versions), the GPU (nor across GPU models), the profile, the precision
    and the build options (tf32, workspace).
    """
    payload = {
        "key_version": ENGINE_KEY_VERSION,
        "onnx_sha256": str(onnx_sha256),
        "tensorrt": str(trt_version),
        "gpu": str(gpu_name),
        "profile": _canonical(profile),
        "precision": str(precision),
        "options": _canonical(options or {}),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def graph_sha256(bundle, spec) -> str:
    """The sha256 that identifies a graph: its file's (from mae.json), combined with its external data's."""
    files = bundle.manifest.get("files") or {}
    if spec.file not in files:
        raise BundleError(f"{spec.file} is not listed in mae.json 'files'; re-export the bundle")
    if not spec.external_data:
        return str(files[spec.file])
    h = hashlib.sha256()
    for rel in (spec.file, *sorted(spec.external_data)):
        h.update(f"{rel}:{files.get(rel, 'missing')}\n".encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mae-deploy" / "trt"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


@dataclass(frozen=True)
class EnginePaths:
    engine: Path
    sidecar: Path


def engine_paths(cache_dir: str | os.PathLike, part: str, precision: str, key: str) -> EnginePaths:
    """``<cache>/<part>-<precision>-<key[:24]>.engine`` and its ``.json`` sidecar."""
    stem = f"{part}-{precision}-{key[:24]}"
    d = Path(cache_dir)
    return EnginePaths(d / f"{stem}.engine", d / f"{stem}.json")


def timing_cache_path(cache_dir: str | os.PathLike, trt_version: str, gpu_name: str) -> Path:
    """One timing cache per TensorRT version and GPU, shared by every model and profile built there."""
    return Path(cache_dir) / f"timing-trt{_slug(trt_version)}-{_slug(gpu_name)}.cache"


@dataclass
class CachedEngine:
    """An engine file in the cache (just built, or found there)."""

    part: str
    precision: str
    key: str
    paths: EnginePaths
    built: bool
    build_seconds: float | None
    graph_file: str

    def read(self) -> bytes:
        return self.paths.engine.read_bytes()

    def sidecar(self) -> dict:
        try:
            return json.loads(self.paths.sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
