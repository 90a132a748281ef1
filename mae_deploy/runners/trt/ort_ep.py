"""ONNX Runtime's TensorRT execution provider: its options, its graphs and its engine-cache folders.

The profile is the trt package's one definition (:mod:`.profile`), so ``--backend ort --device tensorrt`` and
``--backend trt`` accept the same shapes. Pure: imports neither onnxruntime nor tensorrt.

Unrun on this project's machines (no GPU): ONNX Runtime's own TensorRT build. What is tested on the CPU:
the options, the graph choice per TensorRT generation and the cache layout (tests/runners/test_trt_logic.py), and
that OrtRunner splits batches above the profile (tests/runners/test_runners.py).

- fp16: ``trt_fp16_enable`` is a weak-typing builder flag, which TensorRT 11 removed; there the option has
  no effect and fp16 would silently build fp32. So on 11 the provider gets the bundle's fp16 graph, exactly
  as :func:`.api.select_graph` gives the trt backend; on 10 the fp32 graph and the flag. When the TensorRT
  version cannot be found, the fp16 graph is used if the bundle has one (right on both generations).
- One engine-cache folder per profile (and precision): ONNX Runtime names cached engines after the graph,
  not the profile, so two runners with different profiles in one folder would rebuild or load each other's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae_deploy.errors import BundleError, InputError
from mae_deploy.names import DECODER, ENCODER
from mae_deploy.runners.trt.api import installed_trt_generation, select_graph
from mae_deploy.runners.trt.profile import TrtProfile, format_shape, profile_for_bundle

DEFAULT_MAX_BATCH = 64


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mae-deploy" / "ort-trt"


def profile_cache_dir(root: str | os.PathLike, profile: TrtProfile, precision: str) -> Path:
    """``<root>/<precision>-b<max batch>-v<min>-<max>-<hash>``: one folder per profile and precision."""
    key = hashlib.sha256(json.dumps(profile.as_dict(), sort_keys=True).encode()).hexdigest()[:12]
    p = profile
    return Path(root) / f"{precision}-b{p.max_batch}-v{p.min_visible}-{p.max_visible}-{key}"


def ort_trt_graph(bundle, part: str, precision: str, generation: int | None):
    """The graph spec ORT's TensorRT provider runs for ``part`` at ``precision`` (see the module docstring)."""
    if precision == "fp16":
        if generation is not None:
            return select_graph(bundle, part, "fp16", generation)
        if "fp16" in bundle.precisions(part):
            return bundle.graph(part, "fp16")
        return bundle.graph(part, "fp32")
    return bundle.graph(part, precision)


def ort_trt_provider_options(
    profile: TrtProfile,
    cache_dir: str | os.PathLike,
    fp16: bool,
    part: str = ENCODER,
    device_id: int = 0,
) -> dict[str, Any]:
    """Provider options for ONNX Runtime's TensorrtExecutionProvider running ``part`` over ``profile``.

    Shapes are ORT's strings (``"pixel_values:1x3x224x224,ids_keep:1x1"``); engine and timing caches are
    enabled under ``cache_dir``. ``fp16`` sets ``trt_fp16_enable`` (effective on TensorRT 10 only).
    """
    shapes = profile.shapes(part)

    def corner(i: int) -> str:
        return ",".join(f"{name}:{format_shape(s[i])}" for name, s in shapes.items())

    cache = str(Path(cache_dir))
    return {
        "device_id": int(device_id),
        "trt_fp16_enable": bool(fp16),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": corner(0),
        "trt_profile_opt_shapes": corner(1),
        "trt_profile_max_shapes": corner(2),
    }


@dataclass(frozen=True)
class OrtTrtSetup:
    """What OrtRunner needs for ``--device tensorrt``: the profile, the graphs, the cache folder."""

    profile: TrtProfile
    precision: str
    generation: int | None
    specs: dict  # {part: GraphSpec or None}
    cache_dir: Path

    @classmethod
    def for_bundle(
        cls,
        bundle,
        precision: str,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        opt_batch: int | None = None,
        opt_visible: int | str | None = None,
        cache_root: str | os.PathLike | None = None,
        generation: int | None = None,
        detect=installed_trt_generation,
    ) -> OrtTrtSetup:
        """Resolve the profile and graphs now, so a bad option or a missing fp16 graph fails before any work."""
        if precision not in ("fp32", "fp16", "int8"):
            raise InputError(f"--device tensorrt runs fp32, fp16 or int8, not {precision!r}")
        if generation is not None and generation not in (10, 11):
            raise InputError(f"trt_generation must be 10 or 11, got {generation!r}")
        gen = generation if generation is not None else detect()
        profile = profile_for_bundle(bundle, max_batch=max_batch, opt_batch=opt_batch, opt_visible=opt_visible)
        specs = {ENCODER: ort_trt_graph(bundle, ENCODER, precision, gen)}
        try:
            specs[DECODER] = ort_trt_graph(bundle, DECODER, precision, gen) if bundle.has_decoder else None
        except BundleError:
            if precision == "fp16":
                raise
            specs[DECODER] = bundle.graph(DECODER, "fp32")  # e.g. an int8 encoder beside an fp32 decoder
        root = Path(cache_root) if cache_root else default_cache_root()
        return cls(profile, precision, gen, specs, profile_cache_dir(root, profile, precision))

    def fp16_flag(self, part: str) -> bool:
        """trt_fp16_enable: only where the fp32 graph runs at fp16 (TensorRT 10's weak typing)."""
        spec = self.specs.get(part)
        return self.precision == "fp16" and spec is not None and spec.precision == "fp32"

    def provider_options(self, part: str, device_id: int) -> dict[str, Any]:
        """The provider options for ``part``; creates the cache folder."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(
                f"cannot create the TensorRT engine cache {self.cache_dir}: {e}; pass trt_cache_dir="
            ) from e
        return ort_trt_provider_options(self.profile, self.cache_dir, self.fp16_flag(part), part, device_id)

    def describe(self) -> dict:
        return {
            "generation": self.generation,
            "profile": self.profile.as_dict(),
            "cache_dir": str(self.cache_dir),
            "fp16_flag": {p: self.fp16_flag(p) for p, s in self.specs.items() if s is not None},
        }
