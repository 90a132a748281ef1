"""`mae-deploy serve`: the runtime behind an HTTP endpoint, micro-batched, on uvicorn or Ray Serve.

Modules (FastAPI, uvicorn, prometheus-client and Ray are imported only by the modules that need them):

- ``config``: :class:`ServeConfig`, the limits and settings, checked once;
- ``batcher``: :class:`MicroBatcher`, concurrent requests' rows run together on one runner thread;
- ``images``: image bytes out of request bodies, decoded as the offline Preprocessor does;
- ``protocol_v2``: the KServe v2 / Open Inference Protocol codec (JSON and binary tensors);
- ``metrics``: Prometheus counters and histograms;
- ``service``: :class:`ModelService`, the runner + batcher + the jobs (features, reconstruct, v2 infer);
- ``app``, ``routes_v1``, ``routes_v2``: the FastAPI app, middleware and endpoints;
- ``server``: uvicorn, logging, SIGTERM drain; ``ray_app``: the same app on Ray Serve replicas.
"""

from mae_deploy.serve.config import ServeConfig

__all__ = ["ServeConfig"]
