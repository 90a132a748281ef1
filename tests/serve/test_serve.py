"""`mae-deploy serve`'s app on a real uvicorn server (in a thread, 127.0.0.1, free port), over real HTTP.

Concurrency and batching, equality with the offline pipelines, every bad input, overload (503), timeout
(504), the API key (401), request ids and metrics.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from serve_support import GatedRunner, LiveServer, batches_over_one, jpeg_bytes, metric_values, wait_until

httpx = pytest.importorskip("httpx")

from mae_deploy.features import FeatureExtractor  # noqa: E402
from mae_deploy.runners import create_runner  # noqa: E402
from mae_deploy.serve.config import ServeConfig  # noqa: E402
from mae_deploy.serve.metrics import parse_server_timing  # noqa: E402

N_CONCURRENT = 16


def offline_features(bundle, blobs: list[bytes], tmp_path, pool: str = "cls") -> np.ndarray:
    paths = []
    for i, b in enumerate(blobs):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(b)
        paths.append(p)
    with FeatureExtractor(bundle, pool=pool) as fx:
        return fx.extract(paths)


def post_image(client, url: str, data: bytes, **kw):
    return client.post(url, content=data, headers={"Content-Type": "image/jpeg", **kw.pop("headers", {})}, **kw)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with LiveServer(ServeConfig(bundle=str(tiny_bundle), max_body_mb=1, max_images_per_request=4)) as s:
        yield s


@pytest.fixture
def client():
    with httpx.Client(timeout=30) as c:
        yield c


def test_concurrent_requests_batched_and_equal_to_offline(tiny_bundle, tmp_path):
    """16 requests at once are all answered, equal FeatureExtractor, and share runner calls.

    The runner's first call is held until every other request is queued, so batching is certain, not a
    matter of timing; the batch-size histogram then shows calls with more than one image.
    """
    blobs = [jpeg_bytes(i, (40 + i, 36 + 2 * i)) for i in range(N_CONCURRENT)]
    expected = offline_features(tiny_bundle, blobs, tmp_path, "mean")
    gated = GatedRunner(create_runner(tiny_bundle))
    with LiveServer(ServeConfig(bundle=str(tiny_bundle)), runner=gated) as s, httpx.Client(timeout=60) as c:
        gated.gate.clear()
        with ThreadPoolExecutor(N_CONCURRENT) as pool:
            futures = [pool.submit(post_image, c, f"{s.url}/v1/features?pool=mean", b) for b in blobs]
            # the first batch may hold one request or a few that arrived together; the rest wait in the queue
            wait_until(
                lambda: gated.waiting == 1 and gated.held_rows + s.service.batcher.queued_rows == N_CONCURRENT,
                what="one batch in the runner and the other requests queued",
            )
            gated.gate.set()
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * N_CONCURRENT
        got = np.array([r.json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        text = c.get(f"{s.url}/metrics").text
        assert batches_over_one(text) >= 1
        assert metric_values(text, "mae_serve_images_total")['{endpoint="/v1/features"}'] == N_CONCURRENT


def test_body_formats_and_pools(server, client, tiny_bundle, tmp_path):
    blobs = [jpeg_bytes(100 + i) for i in range(3)]
    expected = offline_features(tiny_bundle, blobs, tmp_path, "cls")
    files = [("file", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
    r = client.post(f"{server.url}/v1/features", files=files)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"] == "mae_vit_test" and doc["pool"] == "cls" and doc["dim"] == 32
    assert [d["index"] for d in doc["data"]] == [0, 1, 2]
    np.testing.assert_allclose([d["embedding"] for d in doc["data"]], expected, atol=1e-5, rtol=0)

    body = {"images": [base64.b64encode(b).decode() for b in blobs]}
    r = client.post(f"{server.url}/v1/features?pool=cls", json=body, headers={"Accept": "application/x-npy"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), expected, atol=1e-5, rtol=0)

    r = client.post(
        f"{server.url}/v1/features?pool=tokens", content=blobs[0], headers={"Content-Type": "application/octet-stream"}
    )
    tokens = offline_features(tiny_bundle, blobs[:1], tmp_path, "tokens")
    np.testing.assert_allclose(np.array(r.json()["data"][0]["embedding"]), tokens[0], atol=1e-5, rtol=0)


def test_server_timing_says_where_the_time_went(server, client):
    r = post_image(client, f"{server.url}/v1/features", jpeg_bytes(7))
    assert r.status_code == 200
    t = parse_server_timing(r.headers["Server-Timing"])
    assert set(t) == {"preprocess", "infer", "runner", "total"}
    assert all(v > 0 for v in t.values())
    assert t["runner"] <= t["infer"]  # the call is inside the wait for it
    assert t["preprocess"] + t["infer"] <= t["total"]  # sequential parts of one request
    health = parse_server_timing(client.get(f"{server.url}/healthz").headers["Server-Timing"])
    assert set(health) == {"total"}  # no model work, no model entries


def test_models_health_and_request_ids(server, client):
    assert client.get(f"{server.url}/healthz").status_code == 200
    assert client.get(f"{server.url}/readyz").json()["status"] == "ready"
    card = client.get(f"{server.url}/v1/models").json()["data"][0]
    assert card["id"] == "mae_vit_test" and card["parts"] == ["decoder", "encoder"]
    assert card["feature_dims"] == {"cls": [32], "mean": [32], "tokens": [17, 32]}
    assert card["preprocessing"]["image_size"] == 32
    r = client.get(f"{server.url}/v1/models", headers={"X-Request-ID": "my-trace.42"})
    assert r.headers["X-Request-ID"] == "my-trace.42"
    generated = client.get(f"{server.url}/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert len(generated.headers["X-Request-ID"]) == 32 and " " not in generated.headers["X-Request-ID"]
    assert client.get(f"{server.url}/docs").status_code == 200
    assert "/v1/features" in client.get(f"{server.url}/openapi.json").json()["paths"]


def test_reconstruct_equals_offline_picture(server, client, tiny_bundle, tmp_path):
    from mae_deploy.reconstruct import Reconstructor

    blob = jpeg_bytes(7, (64, 48))
    (tmp_path / "r.jpg").write_bytes(blob)
    with Reconstructor(tiny_bundle) as rec:
        result = rec.reconstruct([tmp_path / "r.jpg"], mask_ratio=0.5, seed=3)[0]
    r = post_image(client, f"{server.url}/v1/reconstruct?mask_ratio=0.5&seed=3", blob)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(result.grid_image()))
    r = post_image(client, f"{server.url}/v1/reconstruct?mask_ratio=0.5&seed=3&format=npz", blob)
    arrays = np.load(io.BytesIO(r.content))
    np.testing.assert_array_equal(arrays["mask"], result.mask)
    np.testing.assert_allclose(arrays["pred"], result.pred, atol=1e-5, rtol=0)
    assert arrays["ids_keep"].shape == (8,) and arrays["ids_restore"].shape == (16,)


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (CRC fixed) over a tiny image: a decompression bomb."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("not_an_image", 400, "bad_image"),
        ("truncated", 400, "bad_image"),
        ("empty", 400, "no_images"),
        ("bomb", 400, "decompression_bomb"),
        ("wrong_type", 415, "unsupported_media_type"),
        ("too_large", 413, "payload_too_large"),
        ("too_large_chunked", 413, "payload_too_large"),
        ("too_many", 413, "payload_too_large"),
        ("bad_base64", 400, "bad_base64"),
        ("bad_json", 400, "bad_json"),
        ("path_not_read", 400, "bad_base64"),
        ("bad_pool", 400, "bad_request"),
        ("bad_mask_ratio", 400, "bad_request"),
        ("unknown_route", 404, "not_found"),
    ],
)
def test_bad_input_is_a_json_error(server, client, kind, status, code):
    url = f"{server.url}/v1/features"
    good = jpeg_bytes(1)
    jpeg = {"Content-Type": "image/jpeg"}
    requests = {
        "not_an_image": lambda: client.post(url, content=b"hello, not an image", headers=jpeg),
        "truncated": lambda: client.post(url, content=good[: len(good) // 2], headers=jpeg),
        "empty": lambda: client.post(url, content=b"", headers=jpeg),
        "bomb": lambda: client.post(url, content=_png_with_size(20000, 20000), headers={"Content-Type": "image/png"}),
        "wrong_type": lambda: client.post(url, content=good, headers={"Content-Type": "text/plain"}),
        "too_large": lambda: client.post(url, content=b"\xff" * (2 << 20), headers=jpeg),
        "too_large_chunked": lambda: client.post(url, content=iter([b"\xff" * (512 << 10)] * 4), headers=jpeg),
        "too_many": lambda: client.post(url, files=[("f", (f"{i}.jpg", good, "image/jpeg")) for i in range(5)]),
        "bad_base64": lambda: client.post(url, json={"images": ["not base64!"]}),
        "bad_json": lambda: client.post(url, content=b"{", headers={"Content-Type": "application/json"}),
        "path_not_read": lambda: client.post(url, json={"images": ["/etc/passwd"]}),
        "bad_pool": lambda: client.post(f"{url}?pool=max", content=good, headers=jpeg),
        "bad_mask_ratio": lambda: client.post(
            f"{server.url}/v1/reconstruct?mask_ratio=1.5", content=good, headers=jpeg
        ),
        "unknown_route": lambda: client.get(f"{server.url}/v1/nothing"),
    }
    r = requests[kind]()
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert r.headers["X-Request-ID"]
    assert client.get(f"{server.url}/readyz").status_code == 200  # the server lives on


class _BuggyRunner(GatedRunner):
    """A runner whose next encoder call, once armed (``failed = False``), fails the way a bug would."""

    def __init__(self, runner) -> None:
        super().__init__(runner)
        self.failed = True  # disarmed: the warm-up at load must pass

    def _wait(self, rows: int) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("simulated bug")
        super()._wait(rows)


def test_a_bug_is_a_json_500_and_the_server_lives_on(tiny_bundle, caplog):
    runner = _BuggyRunner(create_runner(tiny_bundle))
    with LiveServer(ServeConfig(bundle=str(tiny_bundle)), runner=runner) as s, httpx.Client(timeout=30) as c:
        runner.failed = False  # arm it
        r = post_image(c, f"{s.url}/v1/features", jpeg_bytes(1), headers={"X-Request-ID": "bug-1"})
        assert r.status_code == 500
        assert r.json()["error"] == {"code": "internal", "message": "internal error: RuntimeError"}
        assert r.headers["X-Request-ID"] == "bug-1" and r.headers["X-Replica"] and r.headers["Server-Timing"]
        assert post_image(c, f"{s.url}/v1/features", jpeg_bytes(1)).status_code == 200
        assert 'status="500"' in c.get(f"{s.url}/metrics").text
    assert "simulated bug" in caplog.text  # the traceback is logged for whoever runs the server


def test_overload_is_503_with_retry_after(tiny_bundle):
    gated = GatedRunner(create_runner(tiny_bundle))
    config = ServeConfig(bundle=str(tiny_bundle), max_queue=2, max_batch_size=1)
    with LiveServer(config, runner=gated) as s, httpx.Client(timeout=60) as c, ThreadPoolExecutor(3) as pool:
        gated.gate.clear()
        first = pool.submit(post_image, c, f"{s.url}/v1/features", jpeg_bytes(0))
        wait_until(lambda: gated.waiting == 1, what="the first request in the runner")
        queued = [pool.submit(post_image, c, f"{s.url}/v1/features", jpeg_bytes(i)) for i in (1, 2)]
        wait_until(lambda: s.service.batcher.queued_rows == 2, what="two requests queued")
        r = post_image(c, f"{s.url}/v1/features", jpeg_bytes(3))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        gated.gate.set()
        assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]


def test_timeout_is_504_and_the_server_recovers(tiny_bundle):
    gated = GatedRunner(create_runner(tiny_bundle))
    config = ServeConfig(bundle=str(tiny_bundle), timeout_s=0.3)
    with LiveServer(config, runner=gated) as s, httpx.Client(timeout=60) as c:
        gated.gate.clear()
        r = post_image(c, f"{s.url}/v1/features", jpeg_bytes(0))
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        gated.gate.set()
        wait_until(lambda: gated.waiting == 0, what="the held batch to finish")
        assert post_image(c, f"{s.url}/v1/features", jpeg_bytes(1)).status_code == 200
        text = c.get(f"{s.url}/metrics").text
        assert metric_values(text, "mae_serve_requests_total")['{endpoint="/v1/features",status="504"}'] == 1


def test_api_key(tiny_bundle, monkeypatch):
    monkeypatch.setenv("MAE_TEST_KEY", "s3cret")
    config = ServeConfig(bundle=str(tiny_bundle), api_key_env="MAE_TEST_KEY")
    with LiveServer(config) as s, httpx.Client(timeout=30) as c:
        url = f"{s.url}/v1/features"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cret-not"}):
            r = post_image(c, url, jpeg_bytes(0), headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        assert post_image(c, url, jpeg_bytes(0), headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert post_image(c, url, jpeg_bytes(0), headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get(f"{s.url}/healthz").status_code == 200  # probes need no key
        assert c.get(f"{s.url}/readyz").status_code == 200
        assert c.get(f"{s.url}/metrics").status_code == 401


def test_api_key_env_must_be_set(tiny_bundle, monkeypatch):
    from mae_deploy.errors import InputError

    monkeypatch.delenv("MAE_TEST_UNSET_KEY", raising=False)
    with pytest.raises(InputError, match="MAE_TEST_UNSET_KEY"):
        ServeConfig(bundle=str(tiny_bundle), api_key_env="MAE_TEST_UNSET_KEY")


def test_readyz_is_503_until_loaded_and_while_draining(tiny_bundle):
    loaded = threading.Event()

    class SlowLoad(GatedRunner):
        def load(self):
            loaded.wait(30)
            return self.runner.load()

    runner = SlowLoad(create_runner(tiny_bundle))
    server = LiveServer(ServeConfig(bundle=str(tiny_bundle)), runner=runner)
    server.thread.start()
    try:
        with httpx.Client(timeout=30) as c:
            wait_until(lambda: server.server.started, what="uvicorn to start")
            assert c.get(f"{server.url}/healthz").status_code == 200
            r = c.get(f"{server.url}/readyz")
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            assert post_image(c, f"{server.url}/v1/features", jpeg_bytes(0)).status_code == 503
            loaded.set()
            wait_until(lambda: c.get(f"{server.url}/readyz").status_code == 200, what="readiness")
            server.service.start_draining()
            assert c.get(f"{server.url}/readyz").status_code == 503
            assert c.get(f"{server.url}/v2/health/ready").status_code == 503
    finally:
        loaded.set()
        server.__exit__(None, None, None)


def test_a_lone_small_image_is_preprocessed_inline_and_the_rest_on_threads(tiny_bundle, monkeypatch):
    """Where decoding runs: inline for a lone image small once decoded (no thread hop); on the decoding threads
    when another request is in flight or the decoded image is large, so the event loop keeps accepting."""
    import asyncio

    from mae_deploy.serve import service as service_mod

    threads: list[str] = []
    real = service_mod.preprocess

    def recording(blobs, preprocessor):
        threads.append(threading.current_thread().name)
        return real(blobs, preprocessor)

    monkeypatch.setattr(service_mod, "preprocess", recording)
    svc = service_mod.ModelService(ServeConfig(bundle=str(tiny_bundle)))
    svc.load()
    from mae_deploy.serve.admission import decode_cost

    small = jpeg_bytes(0)
    buf = io.BytesIO()  # large once decoded (a JPEG this size would be draft-decoded small): 600^2 RGB PNG
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)).save(buf, "PNG")
    large = buf.getvalue()
    costs = [decode_cost(b, svc.preprocessor) for b in (small, large)]
    assert costs[1] > service_mod.INLINE_MAX_DECODE_BYTES >= costs[0]

    async def scenario():
        deadline = svc.deadline(time.monotonic())
        lone = await svc.features([small], "cls", deadline)
        await svc.features([large], "cls", deadline)
        await svc.features([small, small], "cls", deadline)
        together = await asyncio.gather(*(svc.features([small], "cls", deadline) for _ in range(2)))
        return lone, together

    try:
        lone, together = asyncio.run(scenario())
    finally:
        svc.close()
    main = threading.current_thread().name
    assert threads[0] == main  # lone and small: on the loop
    assert threads[1].startswith("mae-decode") and threads[2].startswith("mae-decode")  # large; two images
    assert any(t.startswith("mae-decode") for t in threads[3:5])  # the second of two in flight
    np.testing.assert_array_equal(together[0], lone)  # the same image gives the same features either way
