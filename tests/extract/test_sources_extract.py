"""Extraction from WebDataset shards and Parquet files, local and on S3 (a moto server on 127.0.0.1), on both
engines: the features equal the folder's for the same images, bad samples are errors.jsonl lines, a resumed
job's output is byte-identical, and planning exits 3 / 7 for bad options and unreachable buckets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from extract_data import result_files
from sources_data import N_IMAGES

from mae_deploy.cli import main
from mae_deploy.extract import ERRORS_NAME, MANIFEST_NAME, extract_features, index_name, open_features, shard_name

RUN = {"batch_size": 4, "shard_size": 5, "progress": False}


@pytest.fixture(scope="module")
def folder_run(source_data, extract_bundle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sources_folder") / "out"
    s = extract_features(source_data["folder"], extract_bundle_dir, out, workers=0, **RUN)
    assert s.features == N_IMAGES and s.failed == 0
    return out


def _same_features(out, reference) -> None:
    a, b = open_features(out), open_features(reference)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert np.array_equal(a.rows, b.rows)


def test_shards_and_parquet_give_the_folders_features(source_data, extract_bundle_dir, folder_run, tmp_path):
    shards = extract_features(
        source_data["shard_spec"], extract_bundle_dir, tmp_path / "wds", workers=1, **RUN
    )  # spawned
    parquet = extract_features(source_data["parquet"], extract_bundle_dir, tmp_path / "pq", workers=0, **RUN)
    for s, out in ((shards, tmp_path / "wds"), (parquet, tmp_path / "pq")):
        assert (s.features, s.failed) == (N_IMAGES, 0)
        _same_features(out, folder_run)
    f = open_features(tmp_path / "wds")
    path = f"{source_data['shards'] / 'train-000001.tar'}#s00007.png"
    assert f.paths[7] == path and f.index_of(path) == 7
    manifest = json.loads((tmp_path / "pq" / MANIFEST_NAME).read_text())
    assert manifest["source"]["kind"] == "parquet"


def test_s3_shards_and_parquet_give_the_folders_features(s3_source_data, extract_bundle_dir, folder_run, tmp_path):
    for name, spec in (("wds", s3_source_data["shard_spec"]), ("pq", s3_source_data["parquet"])):
        s = extract_features(spec, extract_bundle_dir, tmp_path / name, workers=1, **RUN)
        assert (s.features, s.failed) == (N_IMAGES, 0)
        _same_features(tmp_path / name, folder_run)
    f = open_features(tmp_path / "wds")
    assert f.paths[0] == "s3://mae-sources/shards/train-000000.tar#s00000.jpg" and f.index_of(f.paths[0]) == 0


def test_each_bad_sample_is_one_error_line_and_the_rest_goes_on(broken_source_data, extract_bundle_dir, tmp_path):
    s = extract_features(broken_source_data["shard"], extract_bundle_dir, tmp_path / "wds", workers=0, **RUN)
    errors = [json.loads(line) for line in (tmp_path / "wds" / ERRORS_NAME).read_text().splitlines()]
    assert s.features == 1
    assert [(e["path"].split("#")[1], e["reason"]) for e in errors] == [
        ("b-corrupt.jpg", "corrupt"),
        ("c-noimage", "missing_image"),
        ("d-cut.jpg", "truncated"),
    ]
    s = extract_features(broken_source_data["parquet"], extract_bundle_dir, tmp_path / "pq", workers=0, **RUN)
    errors = [json.loads(line) for line in (tmp_path / "pq" / ERRORS_NAME).read_text().splitlines()]
    assert s.features == 1
    assert [(e["path"].rsplit("#")[1], e["reason"]) for e in errors] == [("1", "missing_image"), ("2", "not_an_image")]


def test_a_resumed_job_is_byte_identical(s3_source_data, extract_bundle_dir, tmp_path):
    full = tmp_path / "full"
    extract_features(s3_source_data["shard_spec"], extract_bundle_dir, full, workers=0, **RUN)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for k in (1, 3):  # as if the job had been killed before these shards were committed
        (resumed / shard_name(k)).unlink()
        (resumed / index_name(k)).unlink()
    m = json.loads((resumed / MANIFEST_NAME).read_text())
    m["status"] = "interrupted"
    (resumed / MANIFEST_NAME).write_text(json.dumps(m))
    s = extract_features(s3_source_data["shard_spec"], extract_bundle_dir, resumed, workers=0, **RUN)
    assert s.processed == 5 + 3  # shards 1 (rows 5-9) and 3 (rows 15-17)
    assert result_files(resumed) == result_files(full)


def test_cli_columns_and_exit_codes(s3_source_data, source_data, extract_bundle_dir, tmp_path):
    runner = CliRunner()
    base = ["--bundle", str(extract_bundle_dir), "--batch-size", "4", "--workers", "0", "--no-progress"]
    res = runner.invoke(
        main,
        [
            "extract",
            s3_source_data["parquet"],
            "--out",
            str(tmp_path / "ids"),
            "--id-column",
            "id",
            "--image-column",
            "image",
            *base,
        ],
    )
    assert res.exit_code == 0, res.output
    assert open_features(tmp_path / "ids").paths == [key for key, _, _ in source_data["images"]]
    res = runner.invoke(main, ["extract", "s3://no-such-bucket/shards/", "--out", str(tmp_path / "o"), *base])
    assert res.exit_code == 7 and "s3://no-such-bucket" in res.output
    res = runner.invoke(
        main, ["extract", s3_source_data["shard_spec"], "--out", str(tmp_path / "o"), "--image-column", "jpg", *base]
    )
    assert res.exit_code == 3 and "apply to Parquet sources" in res.output


@pytest.mark.slow  # a local Ray instance
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_reads_s3_shards_in_parallel_tasks_with_the_local_result(
    s3_source_data, ray_local, extract_bundle_dir, tmp_path
):
    local = tmp_path / "local"
    extract_features(s3_source_data["shard_spec"], extract_bundle_dir, local, workers=0, **RUN)
    ray_out = tmp_path / "ray"
    s = extract_features(s3_source_data["shard_spec"], extract_bundle_dir, ray_out, engine="ray", **RUN)
    assert s.features == N_IMAGES
    assert result_files(ray_out) == result_files(local)
