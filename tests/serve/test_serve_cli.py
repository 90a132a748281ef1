"""`mae-deploy serve` as a user runs it: a subprocess on a free port of 127.0.0.1.

Concurrent requests batched and equal to offline features, SIGTERM drain (in-flight requests answered,
exit 0), and the exit codes of a bad bundle, an unset key variable and a missing package.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_support import ROOT, WAIT_S, CliServer, batches_over_one, jpeg_bytes, metric_values, wait_until
from test_serve import N_CONCURRENT, offline_features, post_image

httpx = pytest.importorskip("httpx")


def test_cli_server_batches_concurrent_requests(tiny_bundle, tmp_path):
    """16 requests sent at once to the CLI server (which holds a partial batch up to 2 s for company)."""
    blobs = [jpeg_bytes(200 + i) for i in range(N_CONCURRENT)]
    expected = offline_features(tiny_bundle, blobs, tmp_path, "cls")
    server = CliServer(tiny_bundle, tmp_path / "server.log", "--max-delay-ms", "2000", "--log-format", "json")
    try:
        server.wait_ready()
        barrier = threading.Barrier(N_CONCURRENT)
        with httpx.Client(timeout=WAIT_S) as c, ThreadPoolExecutor(N_CONCURRENT) as pool:

            def send(blob: bytes):
                barrier.wait(WAIT_S)
                return post_image(c, f"{server.url}/v1/features", blob)

            responses = list(pool.map(send, blobs))
            assert [r.status_code for r in responses] == [200] * N_CONCURRENT
            got = np.array([r.json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
            assert batches_over_one(c.get(f"{server.url}/metrics").text) >= 1
        assert server.stop() == 0
    finally:
        server.stop()
    log = server.log.read_text()
    rid = responses[0].headers["X-Request-ID"]
    assert f'"request_id": "{rid}"' in log  # the JSON log line of that request carries its id


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_bundle, tmp_path):
    """A request held in the queue when SIGTERM arrives is answered at once (the drain stops holding partial
    batches for --max-delay-ms, here far longer than the test waits); exit code 0."""
    server = CliServer(tiny_bundle, tmp_path / "server.log", "--max-delay-ms", "600000")
    try:
        server.wait_ready()
        with httpx.Client(timeout=WAIT_S) as c, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post_image, c, f"{server.url}/v1/features", jpeg_bytes(1))

            def queued() -> bool:
                text = httpx.get(f"{server.url}/metrics", timeout=5).text
                return metric_values(text, "mae_serve_queue_depth").get("", 0) == 1

            wait_until(queued, what="the request to wait in the queue")
            server.proc.send_signal(signal.SIGTERM)
            r = in_flight.result(WAIT_S)
            assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32
        assert server.proc.wait(WAIT_S) == 0
    finally:
        server.stop()
    log = server.log.read_text()
    assert "draining" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def _cli(*args: str, env: dict | None = None, pre: str = "") -> subprocess.CompletedProcess:
    code = f"{pre}import sys; from mae_deploy.cli import main; sys.argv = ['mae-deploy', *sys.argv[1:]]; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S, env=env
    )


def test_bad_bundle_and_unset_key_variable_exit_3(tmp_path, tiny_bundle):
    r = _cli("serve", str(tmp_path / "missing"), "--port", "1")
    assert r.returncode == 3 and "does not exist" in r.stderr
    r = _cli("serve", str(tiny_bundle), "--api-key-env", "MAE_SURELY_UNSET_VARIABLE")
    assert r.returncode == 3 and "MAE_SURELY_UNSET_VARIABLE" in r.stderr


def test_missing_fastapi_exits_6_with_the_install_line(tiny_bundle):
    r = _cli("serve", str(tiny_bundle), pre="import sys; sys.modules['fastapi'] = None; ")
    assert r.returncode == 6, r.stderr
    assert "pip install 'mae-deploy[serve]'" in r.stderr and "Traceback" not in r.stderr


def test_an_unreachable_ray_address_is_exit_7_in_seconds(tiny_bundle):
    # ray.init alone retries such an address for minutes; the shared probe answers at once, naming it.
    pytest.importorskip("ray")
    r = _cli("serve", str(tiny_bundle), "--ray", "--ray-address", "127.0.0.1:1", "--port", "1")
    assert r.returncode == 7, r.stderr
    assert "127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr
