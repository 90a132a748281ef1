"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Names: ``mae_serve_requests_total{endpoint,status}``, ``mae_serve_request_latency_seconds{endpoint}``,
``mae_serve_batch_size{part}`` (rows per runner call; ``part`` is ``encoder``, ``encoder:cls`` / ``encoder:mean`` for
features pooled by the runner, ``decoder``, ``classifier``), ``mae_serve_batch_latency_seconds{part}``,
``mae_serve_queue_depth`` (images waiting for the runner), ``mae_serve_images_total{endpoint}``.
``endpoint`` is the route template (``/v2/models/{name}/infer``), so labels stay few.

Per request, the W3C ``Server-Timing`` response header says where the time went: ``preprocess`` (decode
and preprocessing in a thread), ``infer`` (from queueing on the micro-batcher to the result: the wait for a
batch plus the runner call), ``runner`` (that runner call alone) and ``total`` (arrival to the response's
start). A client can tell the server's overhead from the model's time without access to the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_timings: ContextVar[dict[str, float] | None] = ContextVar("server_timing", default=None)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """The server's counters and histograms; also the micro-batcher's observer."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mae_serve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "mae_serve_request_latency_seconds",
            "Request latency (arrival to response)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mae_serve_batch_size", "Rows per runner call", ["part"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_latency = Histogram(
            "mae_serve_batch_latency_seconds", "Runner call duration", ["part"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Gauge("mae_serve_queue_depth", "Images waiting for the runner", registry=r)
        self.images = Counter("mae_serve_images", "Images processed", ["endpoint"], registry=r)

    # BatchObserver
    def batch_done(self, part: str, rows: int, seconds: float) -> None:
        self.batch_size.labels(part).observe(rows)
        self.batch_latency.labels(part).observe(seconds)

    def queue_depth(self, rows: int) -> None:
        self.queue.set(rows)

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def images_done(self, endpoint: str, n: int) -> None:
        self.images.labels(endpoint).inc(n)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def start_timing() -> dict[str, float]:
    """A fresh per-request timing record (the middleware calls this before the route runs)."""
    record: dict[str, float] = {}
    _timings.set(record)
    return record


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Add the block's wall time (ms) to the current request's Server-Timing entry ``name``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        add_timing(name, (time.perf_counter() - t0) * 1000)


def add_timing(name: str, ms: float) -> None:
    """Add ``ms`` to the current request's Server-Timing entry ``name`` (no-op outside a request)."""
    record = _timings.get()
    if record is not None:
        record[name] = record.get(name, 0.0) + ms


def server_timing(record: dict[str, float]) -> str:
    """``{"infer": 12.3}`` -> ``'infer;dur=12.30'`` (the header's syntax)."""
    return ", ".join(f"{name};dur={ms:.2f}" for name, ms in record.items())


def parse_server_timing(header: str) -> dict[str, float]:
    """The inverse, for clients: ``'preprocess;dur=1.20, infer;dur=3.40'`` -> ``{"preprocess": 1.2, "infer": 3.4}``."""
    out = {}
    for entry in header.split(","):
        name, _, dur = entry.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur)
    return out
