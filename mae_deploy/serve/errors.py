"""HTTP errors of the server: a status, a stable machine-readable code and a message naming the culprit.

Every failure a client can cause or meet (bad image, too large, overload, timeout, auth) becomes an
:class:`ApiError`, answered as JSON ``{"error": {"code", "message"}}`` by /v1 routes and as the KServe v2
form ``{"error": "<message>"}`` by /v2 routes (what tritonclient and KServe clients parse).
"""

from __future__ import annotations

from mae_deploy.errors import InputError


class ApiError(Exception):
    """An error answered with ``status``; ``code`` is stable for clients to switch on."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self, v2: bool = False) -> dict:
        if v2:
            return {"error": f"{self.code}: {self.message}"}
        return {"error": {"code": self.code, "message": self.message}}


def bad_input(e: InputError, code: str = "bad_input") -> ApiError:
    """A runtime InputError (bad image, bad tensor) as a 400."""
    return ApiError(400, code, str(e))


def payload_too_large(message: str) -> ApiError:
    return ApiError(413, "payload_too_large", message)


def overloaded(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "overloaded", message, {"Retry-After": str(retry_after_s)})


def timed_out(timeout_s: float) -> ApiError:
    return ApiError(504, "timeout", f"the request waited longer than the server's --timeout-s of {timeout_s:g} s")


def not_ready(reason: str) -> ApiError:
    return ApiError(503, "not_ready", reason, {"Retry-After": "1"})
