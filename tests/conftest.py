"""Every fixture more than one test module uses, in one place: the tests reach them by name, never by import.

Sections: the run itself (graph cache, file order), the runtime tests' bundles, services (S3, Ray), the extraction
and sources data, and the TensorRT fakes. Fixture names say what they give (``extract_bundle_dir`` is a Path,
``trt_bundle`` a loaded Bundle); the helper modules next to this file hold the builders and the plain helpers that
test modules import (``from trt_fakes import FakeTrt``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before their first import: a failed assert inside a helper reports its values.
pytest.register_assert_rewrite("extract_data", "graph_cache", "runtime_fixtures", "sources_data", "trt_fakes")

from graph_cache import GraphCache  # noqa: E402
from runtime_fixtures import cached_bundle, derived_bundle, export_classifier_bundle, export_tiny_bundle  # noqa: E402

from mae_deploy.bundle import Bundle  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Bundles of the runtime tests (once per session, whichever modules use them)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """mae_vit_test (32px, patch 8, L=16, dim 32) with encoder, decoder and reference weights."""
    return cached_bundle(tmp_path_factory, "mae_vit_test", export_tiny_bundle)


@pytest.fixture(scope="module")
def loaded_tiny_bundle(tiny_bundle) -> Bundle:
    """``tiny_bundle`` loaded."""
    return Bundle.load(tiny_bundle)


@pytest.fixture(scope="session")
def norm_pix_bundle(tmp_path_factory, tiny_bundle) -> Path:
    """``tiny_bundle``'s graphs as a norm-pix model's."""
    return cached_bundle(
        tmp_path_factory, "mae_vit_test_normpix", lambda d: derived_bundle(tiny_bundle, d, norm_pix=True)
    )


@pytest.fixture(scope="session")
def encoder_only_bundle(tmp_path_factory, tiny_bundle) -> Path:
    """``tiny_bundle`` without its decoder."""
    return cached_bundle(
        tmp_path_factory, "mae_vit_test_enc", lambda d: derived_bundle(tiny_bundle, d, drop_decoder=True)
    )


@pytest.fixture(scope="session")
def classifier_bundle(tmp_path_factory) -> Path:
    """mae_vit_test classifier, 5 classes named cat/dog/bird/fish/frog, fp32 + int8, reference weights."""
    labels = ["cat", "dog", "bird", "fish", "frog"]
    return cached_bundle(tmp_path_factory, "mae_vit_test_cls", lambda d: export_classifier_bundle(d, labels=labels))


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


# ------------------------------------------------------------------------------------------------
# Services
# ------------------------------------------------------------------------------------------------


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
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": url,
        "AWS_CONFIG_FILE": nowhere,
        "AWS_SHARED_CREDENTIALS_FILE": nowhere,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
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


# ------------------------------------------------------------------------------------------------
# Extraction and sources data (extract_data.py and sources_data.py build them; both need scikit-image, which
# the compat venv lacks, so they are imported where a fixture is first used)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def extract_images(tmp_path_factory) -> tuple[Path, dict]:
    """330+ images (crops of scikit-image's photos, every unusual mode, every broken kind): (root, names)."""
    from extract_data import make_images

    root = tmp_path_factory.mktemp("extract_images")
    return root, make_images(root)


@pytest.fixture(scope="session")
def extract_bundle_dir(tmp_path_factory) -> Path:
    """mae_vit_test's encoder with perturbed LayerNorms, exported by the real exporter."""
    from extract_data import export_extract_bundle

    return export_extract_bundle(tmp_path_factory.mktemp("extract_bundle") / "bundle")


@pytest.fixture(scope="session")
def extract_other_stats_bundle_dir(tmp_path_factory, extract_bundle_dir) -> Path:
    """``extract_bundle_dir`` with other preprocessing statistics: a resume into its output must be refused."""
    from extract_data import other_stats_copy

    return other_stats_copy(extract_bundle_dir, tmp_path_factory.mktemp("extract_bundle2") / "bundle")


@pytest.fixture(scope="session")
def extract_clean_run(tmp_path_factory, extract_images, extract_bundle_dir):
    """One uninterrupted extraction of ``extract_images`` with extract_data.RUN: (out dir, summary)."""
    from extract_data import RUN

    from mae_deploy.extract import extract_features

    root, _ = extract_images
    out = tmp_path_factory.mktemp("extract_clean") / "out"
    summary = extract_features(root, extract_bundle_dir, out, progress=False, **RUN)
    return out, summary


@pytest.fixture(scope="session")
def source_data(tmp_path_factory) -> dict:
    """The same images as a folder, as WebDataset shards and as Parquet files (see sources_data.write_source_data)."""
    from sources_data import write_source_data

    return write_source_data(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="session")
def broken_source_data(tmp_path_factory, source_data) -> dict:
    """A shard and a Parquet file with good, corrupt, missing and cut-off samples."""
    from sources_data import write_broken_data

    return write_broken_data(tmp_path_factory.mktemp("sources_broken"), source_data)


@pytest.fixture(scope="session")
def s3_source_data(s3_endpoint, source_data) -> dict:
    """``source_data``'s shards and Parquet files uploaded to ``s3_endpoint``; their URLs."""
    from sources_data import upload_to_s3

    return upload_to_s3(source_data)


# ------------------------------------------------------------------------------------------------
# TensorRT and cuda-python fakes (trt_fakes.py) and their bundles
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def installed_trt_fakes(monkeypatch):
    """FakeTrt (10.x) and FakeCudart installed as ``tensorrt`` and ``cuda.bindings.runtime``: (trt, cudart)."""
    from trt_fakes import FakeCudart, FakeTrt, install

    cudart = FakeCudart()
    trt = FakeTrt("10.13.1", cudart)
    install(monkeypatch, trt, cudart)
    return trt, cudart


@pytest.fixture(scope="module")
def trt_bundle_dir(tmp_path_factory) -> Path:
    """mae_vit_test with fp32 and fp16 graphs, exported by the real exporter (once per module)."""
    from trt_fakes import export_trt_bundle

    return export_trt_bundle(tmp_path_factory.mktemp("trt") / "bundle")


@pytest.fixture(scope="module")
def trt_bundle(trt_bundle_dir) -> Bundle:
    """``trt_bundle_dir`` loaded."""
    return Bundle.load(trt_bundle_dir)


@pytest.fixture(scope="module")
def trt_fp32_only_bundle(tmp_path_factory, trt_bundle_dir) -> Bundle:
    """``trt_bundle_dir`` without its fp16 graphs, loaded."""
    from trt_fakes import fp32_only_copy

    return fp32_only_copy(trt_bundle_dir, tmp_path_factory.mktemp("trt32") / "bundle")


# ------------------------------------------------------------------------------------------------
# The run: graph cache shared by the processes of one run, longest files first
# ------------------------------------------------------------------------------------------------

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
