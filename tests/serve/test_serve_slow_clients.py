"""Slow and vanishing clients (issue #24, item 3), over raw sockets to a live server on 127.0.0.1.

A body that stops coming is a 408 within --timeout-s and its connection is closed; connections that send no
request, or half of its headers, are closed within --timeout-s; a client that hangs up mid-body is one quiet
log line and a 499 in the metrics, not an ERROR with a traceback counted as a 500. Every socket read is
bounded (READ_S), so a server that holds a connection fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest
from serve_support import LiveServer, jpeg_bytes, metric_values, wait_until

httpx = pytest.importorskip("httpx")

from mae_deploy.serve.config import ServeConfig  # noqa: E402

TIMEOUT_S = 1.0  # the server's --timeout-s
READ_S = 15.0  # how long a test waits for the server to answer or close: far above TIMEOUT_S


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with LiveServer(ServeConfig(bundle=str(tiny_bundle), timeout_s=TIMEOUT_S)) as s:
        yield s


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=READ_S)
    sock.settimeout(READ_S)
    return sock


def headers(path: str, length: int, content_type: str = "image/jpeg") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_and_body(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


@pytest.mark.parametrize(
    ("path", "content_type"), [("/v1/features", "image/jpeg"), ("/v2/models/encoder/infer", "application/json")]
)
def test_a_body_that_stops_coming_is_408_and_the_connection_closes(server, path, content_type):
    with connect(server) as sock:
        t0 = time.monotonic()
        sock.sendall(headers(path, 100, content_type) + b"\xff\xd8")  # 2 of the 100 bytes, then silence
        raw = read_until_closed(sock)
        waited = time.monotonic() - t0
    status, fields, body = status_and_body(raw)
    assert status == 408 and fields["connection"] == "close"
    error = json.loads(body)["error"]
    message = error if isinstance(error, str) else error["message"]
    assert "--timeout-s of 1 s" in message and "2 bytes of the 100 declared" in message
    assert waited < READ_S  # closed by the server, not by the test's own socket timeout


def test_many_stalled_bodies_are_all_closed_and_the_server_serves_on(server):
    socks = [connect(server) for _ in range(40)]
    try:
        for s in socks:
            s.sendall(headers("/v1/features", 100) + b"\xff\xd8")
        statuses = [status_and_body(read_until_closed(s))[0] for s in socks]
    finally:
        for s in socks:
            s.close()
    assert statuses == [408] * len(socks)
    r = httpx.post(
        f"{server.url}/v1/features", content=jpeg_bytes(0), headers={"Content-Type": "image/jpeg"}, timeout=READ_S
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    "sent", [b"", b"POST /v1/features HTTP/1.1\r\nHost: 127.0.0.1\r\n"], ids=["nothing", "half the headers"]
)
def test_a_connection_without_a_whole_request_is_closed(server, sent):
    with connect(server) as sock:
        sock.sendall(sent)
        assert read_until_closed(sock) == b""  # closed without an answer: there was no request to answer


def test_an_idle_connection_after_a_response_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw = read_until_closed(sock)  # keep-alive: closed once idle, not held open
    assert raw.startswith(b"HTTP/1.1 200")


def test_a_client_that_hangs_up_mid_body_is_a_quiet_499(server, caplog):
    def count(text: str, status: str) -> float:
        return metric_values(text, "mae_serve_requests_total").get(
            f'{{endpoint="/v1/features",status="{status}"}}', 0.0
        )

    before = httpx.get(f"{server.url}/metrics", timeout=READ_S).text
    caplog.set_level(logging.INFO, logger="mae_deploy.serve")
    for _ in range(5):
        with connect(server) as sock:
            sock.sendall(headers("/v1/features", 10_000) + b"\xff\xd8" * 100)
    wait_until(
        lambda: count(httpx.get(f"{server.url}/metrics", timeout=READ_S).text, "499") >= count(before, "499") + 5,
        timeout=READ_S,
        what="five 499s counted",
    )
    after = httpx.get(f"{server.url}/metrics", timeout=READ_S).text
    assert count(after, "500") == count(before, "500")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info]
    quiet = [r for r in caplog.records if "client closed the connection" in r.getMessage()]
    assert len(quiet) == 5
