"""Run the app on uvicorn: logging (text or JSON, with request ids), SIGTERM drain, exit codes.

SIGTERM (and Ctrl-C): readiness turns 503 at once, the listening socket closes, requests in flight are
answered (up to ``--timeout-s`` more), then the runner stops and the process exits 0. A model that fails to
load stops the server with that error's exit code (3 bad bundle, 6 missing package, 7 device unavailable).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from typing import Any

from mae_deploy.errors import InputError, MaeDeployError, MissingDependency
from mae_deploy.serve.config import ServeConfig

log = logging.getLogger("mae_deploy.serve")
SERVE_EXTRA = "pip install 'mae-deploy[serve]'"


def require(module: str, package: str | None = None, extra: str = "serve") -> Any:
    """``import module`` or MissingDependency naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(
            package or module,
            f"mae-deploy serve{' --ray' if extra == 'ray' else ''}",
            f"pip install 'mae-deploy[{extra}]'",
        ) from e


def require_app_deps() -> None:
    """The app's own packages (the serve extra), checked before anything loads: local and Ray Serve alike."""
    require("fastapi")
    require("prometheus_client", "prometheus-client")
    require("multipart", "python-multipart")
    require("orjson")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from mae_deploy.serve.app import request_id_var

        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message and any structured extras."""

    _EXTRAS = ("status", "path", "ms")

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        doc.update({k: getattr(record, k) for k in self._EXTRAS if hasattr(record, k)})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(fmt: str) -> None:
    """Server logs on stderr; every line carries the request id it belongs to ('-' outside requests)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    for name in ("mae_deploy.serve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _ignore_sigterm(signum, frame) -> None:
    """After a drain, uvicorn re-raises the signal it caught; this handler makes that a normal exit (0)."""


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8080, runner=None) -> None:
    """Serve ``config`` on host:port until SIGTERM/SIGINT (blocking). Raises the load error, if any."""
    require("uvicorn")
    require_app_deps()
    import uvicorn

    from mae_deploy.serve.app import create_app
    from mae_deploy.serve.connections import uvicorn_config
    from mae_deploy.serve.service import ModelService

    configure_logging(config.log_format)
    service = ModelService(config, runner=runner)
    if runner is None:
        service.runner = service.make_runner()  # bad backend/device/precision fail here, before binding

    class _Server(uvicorn.Server):
        """uvicorn's server, with readiness turned off the moment a shutdown signal arrives."""

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                log.info("signal %s: draining (no new connections; finishing requests in flight)", sig)
            service.start_draining()
            super().handle_exit(sig, frame)

    failure: list[BaseException] = []

    def on_load_failed(e: BaseException) -> None:
        failure.append(e)
        server.should_exit = True

    app = create_app(service, on_load_failed=on_load_failed)
    uconfig = uvicorn_config(
        app,
        config.timeout_s,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=config.timeout_s + 5,
    )
    server = _Server(uconfig)
    previous = signal.signal(signal.SIGTERM, _ignore_sigterm)
    try:
        log.info("serving %s on http://%s:%d (ready once /readyz answers 200)", config.bundle, host, port)
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind
        raise InputError(
            f"cannot listen on {host}:{port} (in use, or not an address of this machine); pick another --host/--port"
        ) from e
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failure:
        err = failure[0]
        if isinstance(err, MaeDeployError):
            raise err
        raise MaeDeployError(f"the model failed to load: {type(err).__name__}: {err}") from err
    if not server.started:
        raise MaeDeployError(f"the server could not start on {host}:{port} (is the port in use? see the log above)")
