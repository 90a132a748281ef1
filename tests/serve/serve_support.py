"""Support for the serving tests (no tests here): live servers on 127.0.0.1, a gated runner, test images.

``LiveServer`` runs the real app on uvicorn in a thread, on a socket bound to a free port of 127.0.0.1;
``CliServer`` runs ``python -m mae_deploy.cli serve`` in a subprocess. Every wait is bounded in time.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A distinct small RGB JPEG per seed (noise over a gradient, so features differ between images)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
    a = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one Prometheus metric in the text format."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def batches_over_one(metrics_text: str, part: str = "encoder") -> float:
    """Runner calls of ``part`` that held more than one row (from the batch-size histogram); ``encoder`` counts
    the pooled encoder calls (``encoder:cls``, ``encoder:mean``) too."""
    buckets = metric_values(metrics_text, "mae_serve_batch_size_bucket")
    count = metric_values(metrics_text, "mae_serve_batch_size_count")
    parts = {part, *(f"{part}:{pool}" for pool in ("cls", "mean"))} if part == "encoder" else {part}
    total = sum(count.get(f'{{part="{p}"}}', 0.0) for p in parts)
    ones = sum(buckets.get(f'{{le="1.0",part="{p}"}}', 0.0) for p in parts)
    return total - ones


def wait_until(predicate, timeout: float = WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class GatedRunner:
    """A real runner whose encoder calls wait while ``gate`` is closed (overload and timeout tests)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = 0
        self.held_rows = 0  # rows of the call(s) waiting at the gate

    @property
    def info(self):
        return self.runner.info

    @property
    def has_decoder(self) -> bool:
        return self.runner.has_decoder

    def load(self):
        return self.runner.load()

    def _wait(self, rows: int) -> None:
        self.waiting += 1
        self.held_rows += rows
        self.gate.wait(WAIT_S)
        self.held_rows -= rows
        self.waiting -= 1

    def encode(self, pixel_values, ids_keep):
        self._wait(len(pixel_values))
        return self.runner.encode(pixel_values, ids_keep)

    def encode_pooled(self, pixel_values, ids_keep, pool):
        self._wait(len(pixel_values))
        return self.runner.encode_pooled(pixel_values, ids_keep, pool)

    def decode(self, latent, ids_restore):
        return self.runner.decode(latent, ids_restore)

    def close(self) -> None:
        self.runner.close()


class LiveServer:
    """The app on a real uvicorn server in a thread, listening on a free port of 127.0.0.1."""

    def __init__(self, config, runner=None) -> None:
        import uvicorn

        from mae_deploy.serve.app import create_app
        from mae_deploy.serve.connections import uvicorn_config
        from mae_deploy.serve.service import ModelService

        self.service = ModelService(config, runner=runner)
        self.app = create_app(self.service)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # the production server's uvicorn settings (idle connections bounded by --timeout-s)
        self.server = uvicorn.Server(
            uvicorn_config(self.app, config.timeout_s, log_config=None, access_log=False, lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started and self.service.state == "ready", what="the server to be ready")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        self.sock.close()


class CliServer:
    """``mae-deploy serve`` in a subprocess on a free port; stderr goes to ``log``."""

    def __init__(self, bundle: Path, log: Path, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "mae_deploy.cli",
            "serve",
            str(bundle),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        self._log_file = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_ready(self) -> CliServer:
        import httpx

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, what=f"{self.url}/readyz")
        return self

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(WAIT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(WAIT_S)
            self._log_file.close()
