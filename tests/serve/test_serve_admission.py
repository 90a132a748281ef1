"""Admission by decoded size (issue #24, item 4): big images are 413 / 503 at once, and memory comes back.

Six concurrent 16-bit PNGs used to decode together (each through float64 arrays, ~29 bytes per pixel), all
past the deadline, and the process kept the memory afterwards. Now each request's decode cost is counted
against --max-decode-mb before decoding: over it alone, 413; beside what is decoding, 503 with Retry-After;
the budget is given back when decoding ends, and so is the memory.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from serve_support import LiveServer, jpeg_bytes, wait_until

httpx = pytest.importorskip("httpx")

from mae_deploy.preprocess import Preprocessor  # noqa: E402
from mae_deploy.serve import service as service_module  # noqa: E402
from mae_deploy.serve.admission import WIDE_BYTES, decode_cost  # noqa: E402
from mae_deploy.serve.config import ServeConfig  # noqa: E402

MiB = 2**20


def png16(side: int) -> bytes:
    """A side x side 16-bit greyscale PNG (a gradient: small on the wire, large once decoded)."""
    a = np.add.outer(np.arange(side, dtype=np.uint32), np.arange(side, dtype=np.uint32)) * 7 % 65536
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint16)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def rgb_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def post(url: str, data: bytes, content_type: str = "image/png"):
    return httpx.post(f"{url}/v1/features", content=data, headers={"Content-Type": content_type}, timeout=120)


def test_decode_cost_reads_the_header_only(tiny_bundle):
    from mae_deploy.bundle import Bundle

    pre = Preprocessor.from_bundle(Bundle.load(tiny_bundle))
    assert decode_cost(png16(300), pre) == 300 * 300 * WIDE_BYTES
    assert decode_cost(rgb_png(200), pre) == 200 * 200 * 8
    assert decode_cost(b"not an image", pre) == 0
    big_jpeg = jpeg_bytes(0, (1600, 1200))  # draft-decoded by 8 for a 32-pixel model: its reduced size counts
    assert decode_cost(big_jpeg, pre) == 200 * 150 * 8


def test_one_request_over_the_budget_is_413_at_once(tiny_bundle):
    with LiveServer(ServeConfig(bundle=str(tiny_bundle), max_decode_mb=2)) as s:
        r = post(s.url, png16(300))  # 300^2 x 32 B = 2.7 MiB
        assert r.status_code == 413 and "--max-decode-mb" in r.json()["error"]["message"]
        assert post(s.url, png16(200)).status_code == 200  # 1.2 MiB fits
        assert s.service.decode_budget.in_flight == 0


def test_a_request_that_does_not_fit_beside_decodes_in_flight_is_503_and_the_budget_comes_back(
    tiny_bundle, monkeypatch
):
    """The first big image's decode is held at a gate: the second big one is refused at once, a small one is
    admitted; once the gate opens, the first is answered and the second fits again."""
    gate, holding = threading.Event(), threading.Event()
    real = service_module.preprocess
    big = png16(400)  # 400^2 x 32 B = 4.9 MiB of the 8

    def gated(blobs, pre):
        if blobs[0] == big:
            holding.set()
            gate.wait(60)
        return real(blobs, pre)

    monkeypatch.setattr(service_module, "preprocess", gated)
    with LiveServer(ServeConfig(bundle=str(tiny_bundle), max_decode_mb=8)) as s, ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, s.url, big)
        assert holding.wait(60)
        second = post(s.url, big)
        assert second.status_code == 503 and second.headers["Retry-After"] == "1"
        assert "--max-decode-mb" in second.json()["error"]["message"]
        assert post(s.url, jpeg_bytes(1), "image/jpeg").status_code == 200  # small: fits beside it
        gate.set()
        assert first.result(60).status_code == 200
        wait_until(lambda: s.service.decode_budget.in_flight == 0, what="the budget to be given back")
        assert post(s.url, big).status_code == 200


def test_concurrent_big_pngs_get_answers_and_the_memory_back(tiny_bundle):
    """Six 16-bit PNGs at once (the issue's case, at 1/30 of the pixels): every one is answered 200 or 503
    (never 504 or 500), at least one 200, the memory held during the burst stays within the budget's
    reach, and the process's memory afterwards is back near where it started."""
    blob = png16(1700)  # 2.9 MP: ~88 MiB to decode
    budget_mb = 200
    with LiveServer(ServeConfig(bundle=str(tiny_bundle), max_decode_mb=budget_mb, timeout_s=60)) as s:
        assert post(s.url, jpeg_bytes(2), "image/jpeg").status_code == 200
        base = rss_bytes()
        peak, done = [base], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(6) as pool:
            statuses = [r.status_code for r in pool.map(lambda _: post(s.url, blob), range(6))]
        done.set()
        sampler.join(10)
        wait_until(lambda: s.service.decode_budget.in_flight == 0, what="the budget to be given back")
        after = rss_bytes()
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1, statuses
    assert statuses.count(503) >= 1, statuses  # six do not fit in 200 MiB at ~88 MiB each
    assert peak[0] - base < (budget_mb + 100) * MiB, (peak[0] - base) / MiB
    assert after - base < 100 * MiB, (after - base) / MiB
