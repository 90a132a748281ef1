"""The FastAPI application: middleware (request ids, API key, body limit, metrics, logs), errors, routes.

``create_app(service)`` is used as is by the local uvicorn server and by each Ray Serve replica. Every
failure is JSON: ``{"error": {"code", "message"}}`` under /v1 and elsewhere, ``{"error": "<message>"}``
under /v2 (the KServe v2 form tritonclient reads), never a bare 500 page.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager

from mae_deploy.serve.errors import ApiError, payload_too_large
from mae_deploy.serve.metrics import server_timing, start_timing
from mae_deploy.serve.service import ModelService

log = logging.getLogger("mae_deploy.serve")
REQUEST_ID = "X-Request-ID"
REPLICA = "X-Replica"
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer: counted, never sent
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Probes and docs answer without a key (a load balancer's health check carries none; docs hold no data).
_OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/v2/health/live",
        "/v2/health/ready",
        "/docs",
        "/openapi.json",
        "/docs/oauth2-redirect",
        "/redoc",
    }
)


def error_response(e: ApiError, path: str, request_id: str | None = None):
    from fastapi.responses import JSONResponse

    headers = dict(e.headers)
    if request_id:
        headers[REQUEST_ID] = request_id
    return JSONResponse(e.body(v2=path.startswith("/v2")), status_code=e.status, headers=headers)


class BodyLimit:
    """ASGI middleware: the body must stay within ``limit`` bytes (413, by Content-Length or while streaming)
    and arrive within ``timeout_s`` of the request's start (408, and the connection is closed: a client that
    declares 100 bytes, sends 2 and goes silent must not hold a connection for as long as it likes)."""

    def __init__(self, app, limit: int, timeout_s: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    def _too_large(self, size: int | str) -> ApiError:
        return payload_too_large(
            f"the body has {size} bytes, above this server's --max-body-mb of {self.limit / 2**20:g} MiB"
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = error_response(self._too_large(int(length)), scope["path"])
            return await response(scope, receive, send)
        start = scope.get("state", {}).get("start", time.monotonic())
        slow = functools.partial(_body_timeout, self.timeout_s, length.decode() if length else None)
        await self.app(scope, _BodyReceive(receive, self.limit, self._too_large, start + self.timeout_s, slow), send)


def _body_timeout(timeout_s: float, declared: str | None, received: int) -> ApiError:
    of = f" of the {declared} declared" if declared else ""
    return ApiError(
        408,
        "request_timeout",
        f"the request body did not arrive within the server's --timeout-s of "
        f"{timeout_s:g} s ({received} bytes{of} came); send the whole body at once",
        {"Connection": "close"},
    )  # the rest of the body may still come: never read it as a request


class _BodyReceive:
    """An ASGI receive that counts body bytes (413 once past the limit, for chunked uploads) and waits for them
    only until the request's deadline (408)."""

    def __init__(
        self,
        receive,
        limit: int,
        too_large: Callable[[str], ApiError],
        deadline: float,
        too_slow: Callable[[int], ApiError],
    ) -> None:
        self.receive, self.limit, self.too_large = receive, limit, too_large
        self.deadline, self.too_slow = deadline, too_slow
        self.seen = 0
        self.complete = False  # the whole body is in: later receives wait for a disconnect, with no deadline

    async def __call__(self):
        if self.complete:
            return await self.receive()
        try:
            message = await asyncio.wait_for(self.receive(), max(0.0, self.deadline - time.monotonic()))
        except (asyncio.TimeoutError, TimeoutError):
            raise self.too_slow(self.seen) from None
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                raise self.too_large(f"more than {self.limit}")
            self.complete = not message.get("more_body", False)
        return message


def _client_key(headers) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


def _route_label(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestFrame:
    """ASGI middleware around every request: request id, API key, X-Replica, Server-Timing, metrics, a log line.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs the route in a
    second task and streams the response through a memory channel, which cost about a millisecond of
    the ~5 ms per-request budget of a lone request (issue #11).
    """

    def __init__(
        self, app, service: ModelService, replica: str, request_id: Callable[[], str | None] | None = None
    ) -> None:
        self.app, self.service, self.replica, self.request_id = app, service, replica, request_id

    def _denied(self, scope, headers) -> bool:
        key = self.service.config.api_key
        if not key:
            return False
        return scope["path"] not in _OPEN_PATHS and not hmac.compare_digest(
            (_client_key(headers) or "").encode(), key.encode()
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers, MutableHeaders
        from starlette.requests import ClientDisconnect

        start = time.monotonic()
        headers = Headers(scope=scope)
        given = headers.get(REQUEST_ID, "")
        rid = (self.request_id() if self.request_id else None) or (
            given if _CLIENT_ID.match(given) else uuid.uuid4().hex
        )
        token = request_id_var.set(rid)
        state = scope.setdefault("state", {})  # what routes read as request.state.start / .request_id
        state["start"], state["request_id"] = start, rid
        timings = start_timing()  # the route runs in this task's context: it fills the same dict
        sent = {"status": 500, "started": False}

        async def framed_send(message) -> None:
            if message["type"] == "http.response.start":
                sent["status"], sent["started"] = message["status"], True
                out = MutableHeaders(scope=message)
                if self.request_id is None:
                    out[REQUEST_ID] = rid
                out[REPLICA] = self.replica
                timings["total"] = (time.monotonic() - start) * 1000
                out["Server-Timing"] = server_timing(timings)
            await send(message)

        path = scope["path"]
        try:
            if self._denied(scope, headers):
                await error_response(
                    ApiError(
                        401,
                        "unauthorized",
                        "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                        {"WWW-Authenticate": "Bearer"},
                    ),
                    path,
                )(scope, receive, framed_send)
            else:
                try:
                    await self.app(scope, receive, framed_send)
                except ClientDisconnect:  # the client hung up mid-body: nobody to answer, nothing of ours wrong
                    sent["status"] = CLIENT_CLOSED
                except Exception as e:  # a bug: answer JSON, log the traceback, keep serving
                    log.exception("internal error on %s", path)
                    if sent["started"]:  # the status line is out: nothing else can be said to this client
                        raise
                    await error_response(ApiError(500, "internal", f"internal error: {type(e).__name__}"), path)(
                        scope, receive, framed_send
                    )
            seconds = time.monotonic() - start
            status = sent["status"]
            self.service.metrics.request_done(_route_label(scope), status, seconds)
            what = " (the client closed the connection)" if status == CLIENT_CLOSED else ""
            log.info(
                "%s %s -> %d in %.1f ms%s",
                scope["method"],
                path,
                status,
                seconds * 1000,
                what,
                extra={"status": status, "path": path, "ms": round(seconds * 1000, 2)},
            )
        finally:
            request_id_var.reset(token)


def create_app(
    service: ModelService,
    replica: str | None = None,
    on_load_failed: Callable[[BaseException], None] | None = None,
    request_id: Callable[[], str | None] | None = None,
):
    """The app for ``service``; ``replica`` names this process in the X-Replica header of every response.

    ``request_id``: where a front proxy already assigns request ids and returns them in X-Request-ID (Ray
    Serve), a function giving the current one; the app then logs it and does not add the header twice.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from mae_deploy.serve.routes_v1 import router as v1_router
    from mae_deploy.serve.routes_v2 import router as v2_router

    config = service.config
    replica = replica or f"{socket.gethostname()}:{os.getpid()}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if service.state == "loading":  # load in the background: /healthz answers while the model loads
            task = asyncio.create_task(_load(service, on_load_failed))
        try:
            yield
        finally:
            service.start_draining()
            if task is not None and not task.done():
                await asyncio.wait([task], timeout=config.timeout_s)
            await asyncio.to_thread(service.close)

    app = FastAPI(
        title="mae-deploy serve",
        version="1",
        description="Masked Autoencoder features and reconstructions over HTTP, micro-batched; KServe v2 "
        "(Open Inference Protocol) under /v2 for tensor clients such as tritonclient.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.replica = replica

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(
            ApiError(e.status_code, codes.get(e.status_code, "bad_request"), str(e.detail)), request.url.path
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors()]
        return error_response(ApiError(400, "bad_request", "; ".join(parts)), request.url.path)

    app.add_middleware(BodyLimit, limit=config.max_body_bytes, timeout_s=config.timeout_s)

    app.add_middleware(RequestFrame, service=service, replica=replica, request_id=request_id)  # outermost

    app.include_router(v1_router)
    app.include_router(v2_router)
    return app


async def _load(service: ModelService, on_load_failed) -> None:
    try:
        await asyncio.to_thread(service.load)
    except BaseException as e:  # noqa: BLE001 (reported; the server then exits with the error's code)
        log.error("the model failed to load: %s", e)
        if on_load_failed is not None:
            on_load_failed(e)
