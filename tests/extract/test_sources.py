"""Sources without a model: listing and planning of each kind, WebDataset's conventions, Parquet's image
column, the readers (also after pickling, as workers get them), and what a bad source exits with."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import pytest
from sources_data import N_IMAGES, PER_SHARD

from mae_deploy.errors import InputError, SourceUnreachable
from mae_deploy.sources import Failure, list_source


def _read_all(src) -> list:
    out = []
    for row, path in enumerate(src.paths):
        try:
            out.append(src.reader.read(row, path))
        except Failure as f:
            out.append((f.reason, f.message))
    return out


def test_shards_folder_and_parquet_list_the_same_images_in_the_same_order(source_data):
    expected = [data for _, _, data in source_data["images"]]
    folder = list_source(source_data["folder"])
    shards = list_source(source_data["shard_spec"])
    parquet = list_source(source_data["parquet"])
    assert (folder.kind, shards.kind, parquet.kind) == ("directory", "webdataset", "parquet")
    for src in (folder, shards, parquet):
        assert _read_all(src) == expected
    shard0 = str(source_data["shards"] / "train-000000.tar")
    assert shards.paths[0] == f"{shard0}#s00000.jpg"  # SHARD#KEY.EXT, the image member chosen by extension
    assert shards.paths[PER_SHARD * 2].endswith("train-000002.tar#s00012.jpg")  # after its .txt member
    assert parquet.paths[0] == f"{source_data['parquet'] / 'part-0.parquet'}#0"
    assert parquet.paths[N_IMAGES // 2] == f"{source_data['parquet'] / 'part-1.parquet'}#0"


def test_a_list_file_or_glob_of_shards_and_the_id_column(source_data, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text(
        "# shards, relative to this file\n"
        + "".join(f"{os.path.relpath(source_data['shards'], tmp_path)}/train-00000{i}.tar\n" for i in (2, 0))
    )
    src = list_source(listing)
    assert src.kind == "webdataset" and len(src) == 2 * PER_SHARD
    assert src.paths[0].endswith("train-000002.tar#s00012.jpg")  # the list's order is the row order
    assert list_source(str(source_data["shards"] / "*.tar")).paths == list_source(source_data["shard_spec"]).paths
    by_id = list_source(source_data["parquet"], id_column="id")
    assert list(by_id.paths) == [key for key, _, _ in source_data["images"]]
    assert by_id.fingerprint != list_source(source_data["parquet"]).fingerprint


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset_keys_meta_members_and_compound_extensions(tmp_path):
    shard = tmp_path / "x.tar"
    shard.write_bytes(
        _tar(
            [
                ("__index__", b"meta"),  # metadata member: skipped
                ("d/a.seg.png", b"SEG"),
                ("d/a.JPG", b"JPG"),  # key d/a: the exact image extension wins (case-insensitive)
                ("b.mask.png", b"MASK"),
                ("b.json", b"{}"),  # key b: only a compound image extension
                ("c.txt", b"caption"),  # key c: no image
                ("noext", b"?"),  # no extension: not a sample member
            ]
        )
    )
    src = list_source(shard)
    assert [p.split("#", 1)[1] for p in src.paths] == ["d/a.JPG", "b.mask.png", "c"]
    assert _read_all(src)[:2] == [b"JPG", b"MASK"]
    reason, message = _read_all(src)[2]
    assert reason == "missing_image" and "c" in message and "jpg" in message


def test_a_truncated_shard_keeps_the_members_before_the_cut_and_the_cut_one_fails(broken_source_data):
    src = pickle.loads(pickle.dumps(list_source(broken_source_data["shard"])))  # as a decode worker receives it
    names = [p.split("#", 1)[1] for p in src.paths]
    assert names == ["a-good.jpg", "b-corrupt.jpg", "c-noimage", "d-cut.jpg"]
    got = _read_all(src)
    assert isinstance(got[0], bytes) and isinstance(got[1], bytes)  # bytes are read; decoding fails later
    assert got[2][0] == "missing_image"
    assert got[3][0] == "truncated" and "ends inside this member" in got[3][1]


def test_parquet_image_column_default_explicit_and_refused(broken_source_data, source_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = list_source(broken_source_data["parquet"])  # a plain binary column
    got = _read_all(src)
    assert isinstance(got[0], bytes) and got[1][0] == "missing_image" and isinstance(got[2], bytes)
    p = tmp_path / "two.parquet"
    pq.write_table(pa.table({"caption": ["a"], "thumb": [b"T"], "image": [{"bytes": b"I", "path": "x"}]}), p)
    assert _read_all(list_source(p)) == [b"T"]  # the first image-like column
    assert _read_all(list_source(p, image_column="image")) == [b"I"]
    assert list_source(p).fingerprint != list_source(p, image_column="image").fingerprint
    with pytest.raises(InputError, match=r"'caption' of .* is string, not image bytes"):
        list_source(p, image_column="caption")
    with pytest.raises(InputError, match=r"'nope' is not a column .*caption \(string\), thumb \(binary\)"):
        list_source(p, image_column="nope")
    with pytest.raises(InputError, match="apply to Parquet sources"):
        list_source(source_data["shard_spec"], image_column="image")


def test_bad_sources_fail_at_planning_with_exit_3_or_7(source_data, tmp_path, s3_source_data):
    not_tar = tmp_path / "fake.tar"
    not_tar.write_text("not a tar\n" * 200)
    with pytest.raises(InputError, match="is not a tar file"):
        list_source(not_tar)
    with pytest.raises(InputError, match=r"train-000003.tar does not exist"):
        list_source(str(source_data["shards"] / "train-{000000..000009}.tar"))
    with pytest.raises(InputError, match="does not exist"):
        list_source(f"s3://{s3_source_data['bucket']}/shards/missing.tar")
    with pytest.raises(SourceUnreachable, match="bucket s3://no-such-bucket"):
        list_source("s3://no-such-bucket/shards/x.tar")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(SourceUnreachable, match=f"cannot reach http://127.0.0.1:{closed}/x.tar"):
        list_source(f"http://127.0.0.1:{closed}/x.tar")


def test_s3_sources_list_and_read_like_local_ones(s3_source_data, source_data):
    local = list_source(source_data["shard_spec"])
    remote = list_source(s3_source_data["shard_spec"])
    assert [p.split("#")[1] for p in remote.paths] == [p.split("#")[1] for p in local.paths]
    assert remote.paths[0] == "s3://mae-sources/shards/train-000000.tar#s00000.jpg"
    assert _read_all(pickle.loads(pickle.dumps(remote))) == _read_all(local)
    pq_remote = list_source(s3_source_data["parquet"])  # a prefix holding Parquet files
    assert pq_remote.kind == "parquet" and _read_all(pq_remote) == _read_all(list_source(source_data["parquet"]))


def test_an_imagefolder_packed_as_shards_and_parquet_reads_back_in_its_order(source_data, tmp_path):
    from mae_deploy.sources.pack import write_parquet, write_shards

    root = tmp_path / "folder"
    for i, (key, ext, data) in enumerate(source_data["images"][:7]):
        (root / ("cat", "dog")[i % 2]).mkdir(parents=True, exist_ok=True)
        (root / ("cat", "dog")[i % 2] / f"{key}.{ext}").write_bytes(data)
    assert len(write_shards(root, tmp_path / "wds", per_shard=3)) == 3
    write_parquet(root, tmp_path / "pq", per_file=4, row_group=2)
    folder, shards, parquet = (list_source(p) for p in (root, tmp_path / "wds", tmp_path / "pq"))
    assert _read_all(folder) == _read_all(shards) == _read_all(parquet)
    assert shards.paths[0].endswith("shard-000000.tar#cat/s00000.jpg")
