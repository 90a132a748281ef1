"""Building engines: parse the ONNX, configure the builder per TensorRT generation, build, and cache.

Unrun on this project's machines (no GPU, no TensorRT): checked against a recording fake ``tensorrt``
module (tests/runners/test_trt_logic.py); tests/gpu/ builds real engines where TensorRT exists.

Writes go through :mod:`mae_deploy.fileio` (engine, then sidecar, then the shared timing cache, each
atomic), so a concurrent build of the same key by another process only costs time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mae_deploy.errors import BundleError, DeviceUnavailable, InputError
from mae_deploy.fileio import atomic_write, atomic_write_json
from mae_deploy.runners.trt.api import CAPABILITIES, PRECISIONS, import_tensorrt, select_graph, trt_api_generation
from mae_deploy.runners.trt.cache import (
    ENGINE_KEY_VERSION,
    CachedEngine,
    default_cache_dir,
    engine_cache_key,
    engine_paths,
    graph_sha256,
    timing_cache_path,
)
from mae_deploy.runners.trt.profile import Shape, TrtProfile

DEFAULT_WORKSPACE_GB = 4.0


class EngineBuildError(DeviceUnavailable):
    """TensorRT could not parse or build a graph on this machine."""


@dataclass
class BuildResult:
    engine: bytes
    timing_cache: bytes | None
    seconds: float
    generation: int
    network_flags: int
    builder_flags: list[str] = field(default_factory=list)
    fp32_layers: list[str] = field(default_factory=list)  # layers pinned to fp32 in an fp16 build
    inputs: list[str] = field(default_factory=list)


class BuildProgress:
    """A tqdm bar over TensorRT's build phases: it follows the outermost phase's steps and names the current one.

    Every callback swallows its own errors (and remembers the first): an exception inside a TensorRT
    progress callback cancels the build, whose error would then blame the workspace.
    """

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar = None
        self.top: str | None = None
        self.error: str | None = None

    def _failed(self, e: Exception) -> None:
        self.error = self.error or f"{type(e).__name__}: {e}"
        self.bar = None

    def phase_start(self, phase_name, parent_phase, num_steps) -> None:
        try:
            if parent_phase is None and self.bar is None:
                from tqdm import tqdm

                self.top = phase_name
                self.bar = tqdm(total=max(int(num_steps), 1), desc=self.desc, unit="step", leave=False)
            if self.bar is not None:
                self.bar.set_postfix_str(str(phase_name)[:40], refresh=False)
        except Exception as e:
            self._failed(e)

    def step_complete(self, phase_name, step) -> bool:
        try:
            if self.bar is not None and phase_name == self.top:
                self.bar.update(1)
        except Exception as e:
            self._failed(e)
        return True  # False would cancel the build

    def phase_finish(self, phase_name) -> None:
        try:
            if phase_name == self.top and self.bar is not None:
                self.bar.close()
                self.bar = None
        except Exception as e:
            self._failed(e)


def _progress_monitor(trt, desc: str):
    """A :class:`BuildProgress` that is also TensorRT's IProgressMonitor (10.0+), or None where there is none."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    cls = type("TrtBuildProgress", (BuildProgress, base), {"__init__": _monitor_init})
    return cls(desc)


def _monitor_init(self, desc: str) -> None:
    # pybind11 trampolines need the base constructor called explicitly (the TensorRT class, known at run time)
    type(self).__bases__[1].__init__(self)  # type: ignore[misc]
    BuildProgress.__init__(self, desc)


def _pin_fp32_layers(trt, network) -> list[str]:
    """In a weakly typed fp16 build, keep normalisation and softmax layers in fp32.

    Their reductions (variance, exp-sum) are where fp16 overflows or loses precision, and they are a small
    share of the time; the bundle's fp16 ONNX variant keeps LayerNormalization and Softmax in fp32 too.
    """
    wanted = {getattr(trt.LayerType, n) for n in ("NORMALIZATION", "SOFTMAX") if hasattr(trt.LayerType, n)}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in wanted:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    return pinned


def build_engine(
    onnx_path: str | os.PathLike,
    input_shapes: Mapping[str, tuple[Shape, Shape, Shape]],
    precision: str = "fp32",
    timing_cache: bytes | None = None,
    workspace: int = int(DEFAULT_WORKSPACE_GB * (1 << 30)),
    *,
    tf32: bool = False,
    trt=None,
    progress: bool = False,
    log_severity: str = "WARNING",
) -> BuildResult:
    """Parse ``onnx_path`` and build a serialized engine with one optimization profile.

    ``input_shapes``: {input: (min, opt, max)} for every network input (:meth:`TrtProfile.shapes`); an input
    it misses is an error. The file is parsed with ``parse_from_file`` so external weight data resolves
    relative to the model file. ``precision`` fp16 sets BuilderFlag.FP16 on TensorRT 10 (with LayerNorm and
    Softmax pinned to fp32); on TensorRT 11 there is no such flag and ``onnx_path`` must already be the fp16
    variant (see :func:`select_graph`). ``tf32`` False clears BuilderFlag.TF32 (TensorRT enables it by
    default) so fp32 means fp32. ``timing_cache`` (bytes) seeds the builder; the updated cache comes back
    in the result. ``trt``: the tensorrt module (tests pass a fake).
    """
    trt = trt or import_tensorrt()
    gen = trt_api_generation(trt.__version__)
    caps = CAPABILITIES[gen]
    if precision not in PRECISIONS:
        raise InputError(f"the trt backend builds fp32 or fp16 engines, not {precision!r}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BundleError(f"ONNX file {onnx_path} does not exist")

    logger = trt.Logger(getattr(trt.Logger, log_severity))
    builder = trt.Builder(logger)
    # Explicit batch is the only mode since 10 (EXPLICIT_BATCH is ignored there and gone in 11); strong
    # typing is implied in 11 and, on 10, would forbid the FP16 flag, so no creation flag is needed.
    network_flags = 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: " + ("; ".join(errors) or "no details"))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    builder_flags: list[str] = []
    pinned: list[str] = []
    if precision == "fp16" and caps.precision_builder_flags:
        config.set_flag(trt.BuilderFlag.FP16)
        builder_flags.append("FP16")
        pinned = _pin_fp32_layers(trt, network)
        if pinned:
            # "prefer": fall back (with a warning) where no fp32 kernel exists instead of failing the build.
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            builder_flags.append("PREFER_PRECISION_CONSTRAINTS")
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    elif tf32:
        builder_flags.append("TF32")

    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = [n for n in names if n not in input_shapes]
    if missing:
        raise BundleError(f"{onnx_path} has inputs {names}; the profile gives no shapes for {missing}")
    profile = builder.create_optimization_profile()
    for n in names:
        lo, opt, hi = input_shapes[n]
        profile.set_shape(n, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)

    # A seed TensorRT refuses (corrupt, or from another version or device) is dropped rather than failing
    # the build: the timing cache only saves time.
    try:
        seeded = bool(timing_cache) and bool(config.set_timing_cache(config.create_timing_cache(timing_cache), False))
    except Exception:
        seeded = False
    if not seeded:
        config.set_timing_cache(config.create_timing_cache(b""), False)

    monitor = _progress_monitor(trt, f"TensorRT build {onnx_path.name}") if progress else None
    if monitor is not None:
        config.progress_monitor = monitor

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT could not build an engine from {onnx_path} (its log above says why; a larger "
            "--workspace-gb or a smaller --max-batch often helps)"
        )
    new_cache = config.get_timing_cache()
    return BuildResult(
        engine=bytes(serialized),
        timing_cache=bytes(new_cache.serialize()) if new_cache is not None else None,
        seconds=seconds,
        generation=gen,
        network_flags=network_flags,
        builder_flags=builder_flags,
        fp32_layers=pinned,
        inputs=names,
    )


def get_or_build_engine(
    bundle,
    part: str,
    precision: str,
    profile: TrtProfile,
    *,
    gpu_name: str,
    cache_dir: str | os.PathLike | None = None,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    tf32: bool = False,
    rebuild: bool = False,
    trt=None,
    say: Callable[[str], None] | None = None,
    progress: bool = True,
) -> CachedEngine:
    """The cached engine for ``part`` (built now when absent or when ``rebuild``), with its sidecar.

    Writes are atomic (engine, then sidecar, then the shared timing cache), so a concurrent build of the
    same key by another process only costs time.
    """
    trt = trt or import_tensorrt()
    gen = trt_api_generation(trt.__version__)
    spec = select_graph(bundle, part, precision, gen)
    if workspace_gb <= 0:
        raise InputError(f"workspace must be positive (GiB), got {workspace_gb}")
    options = {"tf32": bool(tf32), "workspace_gb": float(workspace_gb)}
    onnx_sha = graph_sha256(bundle, spec)
    key = engine_cache_key(onnx_sha, trt.__version__, gpu_name, profile, precision, options)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    paths = engine_paths(cache, part, precision, key)
    if paths.engine.is_file() and not rebuild:
        return CachedEngine(part, precision, key, paths, built=False, build_seconds=None, graph_file=spec.file)

    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the engine cache directory {cache}: {e}; pass --cache-dir DIR") from e
    tpath = timing_cache_path(cache, trt.__version__, gpu_name)
    seed = tpath.read_bytes() if tpath.is_file() else None
    if say:
        say(
            f"building the TensorRT {part} engine ({precision}, {profile.describe()}) from {spec.file}; "
            "this takes a while once, then it is cached"
        )
    result = build_engine(
        bundle.path / spec.file,
        profile.shapes(part),
        precision,
        seed,
        int(workspace_gb * (1 << 30)),
        tf32=tf32,
        trt=trt,
        progress=progress,
    )
    atomic_write(paths.engine, result.engine)
    from mae_deploy import __version__

    sidecar = {
        "key": key,
        "key_version": ENGINE_KEY_VERSION,
        "part": part,
        "precision": precision,
        "graph": {
            "file": spec.file,
            "precision": spec.precision,
            "sha256": onnx_sha,
            "bundle": str(bundle.path),
            "model": bundle.name,
        },
        "tensorrt": trt.__version__,
        "api_generation": gen,
        "gpu": gpu_name,
        "profile": profile.as_dict(),
        "input_shapes": {n: [list(s) for s in v] for n, v in profile.shapes(part).items()},
        "options": options,
        "network_flags": result.network_flags,
        "builder_flags": result.builder_flags,
        "fp32_layers": len(result.fp32_layers),
        "timing_cache": {"path": str(tpath), "seeded": seed is not None},
        "build_seconds": round(result.seconds, 3),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mae_deploy": __version__,
    }
    atomic_write_json(paths.sidecar, sidecar)
    if result.timing_cache:
        atomic_write(tpath, result.timing_cache)
    return CachedEngine(part, precision, key, paths, built=True, build_seconds=result.seconds, graph_file=spec.file)
