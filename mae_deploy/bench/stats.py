"""The clock and the statistics: timed calls, latency percentiles, agreement with a reference output."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import numpy as np

from mae_deploy.errors import InputError
from mae_deploy.pooling import pool_latent

STATS = ("p50", "p90", "p99", "mean", "min", "max", "std")


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted samples, linear interpolation between closest ranks.

    The same definition as ``numpy.percentile(..., method="linear")``: position (n-1)*q/100, interpolated
    between its two neighbours.
    """
    n = len(sorted_samples)
    if n == 0:
        raise InputError("percentile of no samples")
    if not 0 <= q <= 100:
        raise InputError(f"percentile q must be in [0, 100], got {q}")
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * frac)


def latency_stats(samples_ms: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max/std (population) of latency samples in milliseconds."""
    s = sorted(float(x) for x in samples_ms)
    if not s:
        raise InputError("no latency samples")
    mean = sum(s) / len(s)
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / len(s))
    return {
        "p50": percentile(s, 50),
        "p90": percentile(s, 90),
        "p99": percentile(s, 99),
        "mean": mean,
        "min": s[0],
        "max": s[-1],
        "std": std,
    }


def lowest_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest per-image cosine similarity of ``a`` and ``b`` (N, ...), each image flattened."""
    a = a.astype(np.float64).reshape(a.shape[0], -1)
    b = b.astype(np.float64).reshape(b.shape[0], -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # Two all-zero images agree perfectly; one zero and one not share no direction.
    cos = np.where(
        norms > 0,
        (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0),
        np.where(np.linalg.norm(a - b, axis=1) == 0, 1.0, 0.0),
    )
    return float(np.clip(cos, -1.0, 1.0).min())  # rounding can land a hair outside [-1, 1]


def agreement(output: np.ndarray, reference: np.ndarray, reference_name: str | None, pooled: bool = False) -> dict:
    """Max/mean absolute difference and the lowest per-image cosine similarity against the reference.

    ``pooled`` (encoder latents, (N, 1+K, D)): also the lowest per-image cosine of the mean-pooled features
    (``pooling.pool_latent(..., "mean")``), what users of MAE features judge a variant by; else None.
    """
    if output.shape != reference.shape:
        raise InputError(f"output shape {output.shape} differs from the reference's {reference.shape}")
    if pooled and output.ndim != 3:
        raise InputError(f"pooled agreement needs encoder latents (N, 1+K, D), got shape {output.shape}")
    diff = np.abs(output.astype(np.float64) - reference.astype(np.float64))
    finite = bool(np.isfinite(output).all())
    nan = float("nan")
    pooled_cos = None
    if pooled:
        pooled_cos = lowest_cosine(pool_latent(output, "mean"), pool_latent(reference, "mean")) if finite else nan
    return {
        "reference": reference_name,
        "max_abs_diff": float(diff.max()) if finite else nan,
        "mean_abs_diff": float(diff.mean()) if finite else nan,
        "cosine": lowest_cosine(output, reference) if finite else nan,
        "pooled_cosine": pooled_cos,
    }


def time_calls(
    fn: Callable[[], object], warmup: int, iters: int | None, duration: float | None
) -> tuple[list[float], float]:
    """Call ``fn`` ``warmup`` times untimed-for-statistics, then ``iters`` times (or for ``duration``
    seconds, at least once); returns (latencies in ms, the very first call's latency in ms)."""
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter_ns()
        fn()
        if first is None:
            first = (time.perf_counter_ns() - t0) / 1e6
    samples: list[float] = []
    was_enabled = gc.isenabled()
    # Collect the young generations only: a full collection costs ~0.35 s with torch loaded (13 of the 20 s
    # of a 36-row run), and gc.disable() below is what keeps collections out of the samples.
    gc.collect(1)
    gc.disable()  # a collection in the middle of a call would land in one sample at random
    try:
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - t0) / 1e6)
            if iters is not None:
                if len(samples) >= iters:
                    break
            elif time.perf_counter() - start >= cast(float, duration):  # iters None: duration is given
                break
    finally:
        if was_enabled:
            gc.enable()
    return samples, (first if first is not None else samples[0])
