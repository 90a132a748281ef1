"""What a benchmark runs: the option values, their checks, and the visible-token counts."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mae_deploy import names
from mae_deploy.errors import InputError

if TYPE_CHECKING:
    from mae_deploy.sources import Source

# Every backend the runners offer; one missing here (package or device) becomes skipped rows.
BACKENDS = names.BACKENDS
COMPILING_BACKENDS = names.COMPILING_BACKENDS
# The bundle's graph precisions (int8-qdq: the statically calibrated Q/DQ variant, which ORT can run beside its
# dynamic int8), plus bf16 (torch autocast; OpenVINO's inference-precision hint).
PRECISIONS = tuple(dict.fromkeys((*names.GRAPH_PRECISIONS, "bf16")))
PARTS = ("encoder", "decoder", "reconstruct")
KEY_FIELDS = ("backend", "precision", "part", "batch", "visible")


def visible_counts(
    num_patches: int, visible: Sequence[int] | None = None, mask_ratios: Sequence[float] | None = None
) -> list[int]:
    """The visible-token counts to run: ``visible`` as given, or K = int(L*(1-r)) per mask ratio.

    Neither given: all tokens (feature extraction) and the MAE training ratio 0.75 (reconstruction).
    """
    from mae_deploy.masking import num_visible

    if visible is not None and mask_ratios is not None:
        raise InputError("give visible counts or mask ratios, not both (--visible or --mask-ratios)")
    if visible is None and mask_ratios is None:
        mask_ratios = (0.0, 0.75)
    out: list[int] = []
    if visible is not None:
        for k in visible:
            if not 1 <= int(k) <= num_patches:
                raise InputError(
                    f"visible token count {k} is outside 1..{num_patches} (this model has L={num_patches} patches)"
                )
            out.append(int(k))
    else:
        assert mask_ratios is not None  # defaulted above when neither was given
        for r in mask_ratios:
            if not 0.0 <= r < 1.0:
                raise InputError(f"mask ratio {r} is outside [0, 1)")
            k = num_visible(num_patches, r)
            if k < 1:
                raise InputError(f"mask ratio {r} leaves no visible patch out of {num_patches}")
            out.append(k)
    return list(dict.fromkeys(out))  # unique, in the order given


def image_source(spec: str | os.PathLike) -> Source:
    """The listing of ``--images`` (any source ``extract`` takes); InputError names the path and what to pass."""
    from mae_deploy.sources import list_source

    try:
        return list_source(spec)
    except InputError as e:  # its message names the path and says what to give instead
        raise InputError(f"--images: {e}") from e


def _check_names(values: Sequence[str], allowed: Sequence[str], what: str) -> None:
    if not values:
        raise InputError(f"no {what} given; choose from: {', '.join(allowed)}")
    for v in values:
        if v not in allowed:
            raise InputError(f"unknown {what[:-1]} {v!r}; choose from: {', '.join(allowed)}")


@dataclass
class BenchConfig:
    """What to run. ``iters`` and ``duration`` exclude each other; neither means ``iters=20``."""

    backends: tuple[str, ...] = ("ort",)
    precisions: tuple[str, ...] = ("fp32",)
    device: str = "cpu"
    parts: tuple[str, ...] = ("encoder",)
    batch_sizes: tuple[int, ...] = (1,)
    visible: tuple[int, ...] | None = None
    mask_ratios: tuple[float, ...] | None = None
    warmup: int = 3
    iters: int | None = None
    duration: float | None = None
    threads: int | None = None
    checkpoint: str | None = None  # weights for the torch backend and the torch reference
    reference: bool = True  # compare outputs with the reference (costs one reference run per workload)
    seed: int = 0
    images: str | None = None  # a folder, glob or list file of images fed as pixel values (None: seeded noise)
    peak: bool = True  # probe each backend's MatMul peak and report the share of it each row reaches
    # Backends whose runners compile (torch: torch.compile; openvino: a model per input shape); the reference
    # stays eager.
    compile: tuple[str, ...] = ()

    def validate(self) -> None:
        """Check everything that does not need the bundle; InputError names the bad value."""
        _check_names(self.backends, BACKENDS, "backends")
        _check_names(self.precisions, PRECISIONS, "precisions")
        _check_names(self.parts, PARTS, "parts")
        for backend in self.compile:
            if backend not in COMPILING_BACKENDS or backend not in self.backends:
                raise InputError(
                    f"--compile {backend}: only the run's {' and '.join(COMPILING_BACKENDS)} backends compile "
                    f"(this run's backends: {', '.join(self.backends)})"
                )
        if not self.batch_sizes:
            raise InputError("no batch sizes given")
        for b in self.batch_sizes:
            if int(b) < 1:
                raise InputError(f"batch size {b} is not a positive integer; use e.g. --batch-sizes 1,8,32")
        if self.visible is not None and self.mask_ratios is not None:
            raise InputError("give visible counts or mask ratios, not both (--visible or --mask-ratios)")
        if self.iters is not None and self.duration is not None:
            raise InputError("give an iteration count or a duration, not both (--iters or --duration)")
        if self.iters is not None and self.iters < 1:
            raise InputError(f"iterations must be at least 1, got {self.iters}")
        if self.duration is not None and not self.duration > 0:
            raise InputError(f"duration must be positive seconds, got {self.duration}")
        if self.warmup < 0:
            raise InputError(f"warm-up iterations must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be at least 1, got {self.threads}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed {self.seed!r} is negative; give a seed >= 0 (e.g. --seed 0)")
        if not (self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise InputError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N")
        if self.checkpoint is not None and not Path(self.checkpoint).exists():
            raise InputError(f"--checkpoint {self.checkpoint} does not exist")
        if self.images is not None:
            image_source(self.images)

    @property
    def effective_iters(self) -> int | None:
        return self.iters if self.iters is not None or self.duration is not None else 20
