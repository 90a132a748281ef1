"""`mae-deploy serve --ray`: the same FastAPI app on Ray Serve replicas, each with its own runner and batcher.

Each replica builds a :class:`ModelService` (runner, warm-up, micro-batcher) in its constructor and serves
:func:`create_app` through ``serve.ingress`` (the app is built on the replica, after the constructor). Ray
Serve's proxy spreads requests over replicas; every response names its replica in ``X-Replica``. Ray is
imported only here.

GPUs (``gpus_per_replica``) are passed to Ray as the replica's resource request.
"""

from __future__ import annotations

import logging
import signal
import threading

from mae_deploy.ray_cluster import connect
from mae_deploy.serve.config import ServeConfig

log = logging.getLogger("mae_deploy.serve")
APP_NAME = "mae-deploy"


def _replica_name() -> str:
    from ray import serve

    ctx = serve.get_replica_context()
    rid = getattr(ctx, "replica_id", None)
    return str(getattr(rid, "unique_id", None) or rid or getattr(ctx, "replica_tag", "replica"))


def _ray_request_id() -> str | None:
    """The id Ray Serve's proxy gave this request (it returns it in X-Request-ID itself)."""
    try:
        from ray.serve.context import _get_serve_request_context  # no public accessor in Ray 2.x

        return _get_serve_request_context().request_id or None
    except (ImportError, AttributeError):
        return None


class MaeReplica:
    """One Ray Serve replica: loads the model in its constructor; Ray builds the app afterwards."""

    def __init__(self, config: ServeConfig) -> None:
        from mae_deploy.serve.service import ModelService

        self.service = ModelService(config)
        self.service.load()
        self.name = _replica_name()

    def __serve_build_asgi_app__(self):
        from mae_deploy.serve.app import create_app

        return create_app(self.service, replica=self.name, request_id=_ray_request_id)


def build_deployment(
    config: ServeConfig, replicas: int = 1, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0
):
    """The bound Ray Serve application (pass it to ``serve.run``)."""
    from mae_deploy.serve.server import require

    require("ray", "ray[serve]", extra="ray")
    from ray import serve

    actor: dict[str, object] = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        actor["num_gpus"] = gpus_per_replica
    if config.api_key_env:  # replicas on other machines do not inherit this shell's environment
        actor["runtime_env"] = {"env_vars": {config.api_key_env: config.api_key}}
    ingress = serve.ingress()(MaeReplica)
    deployment = serve.deployment(
        name="MaeDeploy", num_replicas=replicas, ray_actor_options=actor, max_ongoing_requests=max(config.max_queue, 8)
    )(ingress)
    return deployment.bind(config)


def deploy(
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    gpus_per_replica: float = 0.0,
    cpus_per_replica: float = 1.0,
):
    """Start Ray Serve's HTTP proxy on host:port and deploy ``replicas`` replicas (Ray must be initialised)."""
    from ray import serve
    from ray.exceptions import ActorDiedError

    http_options = {"host": host, "port": port}
    try:
        serve.start(http_options=http_options)
    except ActorDiedError:
        # Ray Serve's controller replaces a proxy that misses its first ready check (5 s: a loaded machine,
        # seen in this project's test suite), but serve.start waits on the replaced actor and raises. The
        # controller is up and starts the new proxy itself: connect to it instead of failing the deployment.
        log.warning("Ray Serve restarted its HTTP proxy during start-up; connecting to the running controller")
        serve.start(http_options=http_options)
    app = build_deployment(config, replicas, gpus_per_replica, cpus_per_replica)
    return serve.run(app, name=APP_NAME, route_prefix="/")


def run_on_ray(
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    replicas: int = 1,
    address: str | None = None,
    gpus_per_replica: float = 0.0,
    cpus_per_replica: float = 1.0,
) -> None:
    """Blocking: join (or start) Ray, deploy, wait for SIGTERM/SIGINT, then shut the deployment down."""
    from mae_deploy.serve.server import configure_logging, require, require_app_deps

    ray = require("ray", "ray[serve]", extra="ray")
    require_app_deps()
    from ray import serve

    configure_logging(config.log_format)
    from mae_deploy.bundle import Bundle

    Bundle.load(config.bundle, verify=config.verify_bundle)  # a bad bundle fails here (exit 3), not in a replica
    connect(ray, address)  # an address that does not answer: exit 7 in seconds, naming it
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deploy(config, host, port, replicas, gpus_per_replica, cpus_per_replica)
        log.info("Ray Serve: %d replica(s) of %s on http://%s:%d", replicas, config.bundle, host, port)
        stop.wait()
        log.info("stopping: draining the Ray Serve deployment")
    finally:
        serve.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)
