"""Session-wide fixtures shared by several test modules."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from graph_cache import GraphCache


@pytest.fixture(scope="session")
def vit_base_bundle(tmp_path_factory) -> Path:
    """A random-init ViT-B/16 MAE (encoder + decoder) exported once, with reference weights.

    The parity grid is skipped here (verify=False): the tests that use it compare against PyTorch
    themselves, at the batch/visible counts they care about.
    """
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16", norm_pix_loss=True).eval()
    out = tmp_path_factory.mktemp("vitb") / "bundle"
    export_bundle(model, out, verify=False, reference_weights=True, progress=None)
    return out


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """An S3-compatible server (moto's standalone server, as s3fs's own tests use) on 127.0.0.1 for the session.

    The environment points botocore / s3fs at it with dummy credentials (inherited by decode worker processes
    and by a Ray started afterwards) and is restored when the session ends; the server is stopped then too.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")  # no profile of this machine's user takes part
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL_S3": url, "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere,
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        mp.setenv(k, v)
    yield url
    mp.undo()
    server.stop()


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (2 CPUs: one encoder actor, one decode task at a time)."""
    import ray

    for attempt in range(3):  # a raylet that starts slowly on a busy machine times out after 30 s
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


_CACHE_ENV = "MAE_TEST_GRAPH_CACHE"
_DURATIONS = Path(__file__).resolve().parent / "durations.json"


def pytest_configure(config) -> None:
    """The first pytest process of a run (not an xdist worker, not a nested pytest) makes the graph cache's
    folder and names it in the environment, which the workers and nested runs inherit."""
    if os.environ.get(_CACHE_ENV) or hasattr(config, "workerinput"):
        return
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="mae-graph-cache-")
    config._mae_graph_cache_owner = True


def pytest_unconfigure(config) -> None:
    if getattr(config, "_mae_graph_cache_owner", False):
        shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def graph_cache():
    """In-process exports reuse graphs already exported this run for the same model and options (see
    tests/graph_cache.py); ``MAE_TEST_REAL_EXPORTS=1`` runs the real exporter for every one."""
    if os.environ.get("MAE_TEST_REAL_EXPORTS") or not os.environ.get(_CACHE_ENV):
        yield None
        return
    from export import bundle_writer

    cache = GraphCache(Path(os.environ[_CACHE_ENV]))
    mp = pytest.MonkeyPatch()
    mp.setattr(bundle_writer, "export_graph", functools.partial(cache.export_graph, bundle_writer.export_graph))
    yield cache
    mp.undo()


def pytest_collection_modifyitems(config, items) -> None:
    """Longest files first. ``-n 2 --dist loadfile`` hands out whole files in this order, and a long file
    picked up last keeps one worker busy while the other has nothing left. The lengths are measured
    (tests/durations.json, rewritten by tests/update_durations.py); a file not listed yet counts as long when it
    has a ``slow`` test, else as short."""
    seconds = json.loads(_DURATIONS.read_text()) if _DURATIONS.exists() else {}
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    root = Path(str(config.rootpath))

    def expected(item) -> float:
        name = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else str(item.path)
        return seconds.get(name, 60.0 if item.path in slow_files else 5.0)

    items.sort(key=lambda item: -expected(item))  # stable: the order within a file stays
