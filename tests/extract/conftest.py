"""Fixtures of the extraction and sources tests: the images and bundle of the extraction runs, the sources'
data (folder, shards, Parquet, broken ones), an S3 server on 127.0.0.1 and a local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

# Before their first import: a failed assert inside a helper reports its values.
pytest.register_assert_rewrite("extract_data", "sources_data")

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
