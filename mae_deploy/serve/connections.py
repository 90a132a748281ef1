"""Idle connections bounded in time: uvicorn's HTTP protocol with a deadline for each request's headers.

uvicorn closes a kept-alive connection that stays idle after a response (``timeout_keep_alive``), but a fresh
connection that sends nothing, or half of its headers, it keeps for as long as the client likes: a thousand
such connections hold a thousand sockets. Here the headers of every request (the first on a connection, and
each next one) must be complete within ``--timeout-s`` or the connection is closed. The body's own deadline
is :class:`mae_deploy.serve.app.BodyLimit`'s (a 408).

Only uvicorn's httptools protocol (its default where httptools is installed, as with ``uvicorn[standard]``)
has the hooks this needs; without httptools the server runs uvicorn's h11 protocol unchanged.
"""

from __future__ import annotations

import logging

log = logging.getLogger("mae_deploy.serve")


def bounded_http_protocol(header_timeout_s: float):
    """An HTTP protocol class for ``uvicorn.Config(http=...)``: httptools with the header deadline, or "h11"."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing: uvicorn falls back to h11 itself
        log.warning(
            "httptools is not installed: connections that send no request are not timed out; pip install httptools"
        )
        return "h11"

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        """httptools, with a timer from the connection (or the last response) to the next request's headers."""

        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            waiting = bool(self.pipeline)  # a pipelined request, its headers in, starts now: no deadline for it
            super().on_response_complete()
            if not waiting and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


def uvicorn_config(app, header_timeout_s: float, **kwargs):
    """``uvicorn.Config`` for ``app`` with idle connections bounded (see the module docstring)."""
    import uvicorn

    return uvicorn.Config(app, http=bounded_http_protocol(header_timeout_s), **kwargs)
