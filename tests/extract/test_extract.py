"""Batch extraction (issue #5): sources, bad files, resume after SIGKILL, parts, open_features, exit codes.

One set of 330+ images (crops of scikit-image's photos as JPEG and PNG, every unusual mode, every broken
kind) is made once per session; one clean run of it is the reference the other runs are compared with.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from extract_data import BROKEN, REPO, RUN, TWINS, result_files
from PIL import Image

from mae_deploy.errors import InputError, PartialFailure
from mae_deploy.extract import (
    ERRORS_NAME,
    LOCK_NAME,
    classify_failure,
    extract_features,
    index_name,
    open_features,
    shard_name,
)
from mae_deploy.sources import IMAGE_EXTENSIONS, list_source, split_rows

# workers=0 decodes in this process, where Pillow warns about the bomb just before it fails as one.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def test_directory_listing_is_recursive_sorted_and_case_insensitive(extract_images):
    root, made = extract_images
    src = list_source(root)
    rel = [Path(p).relative_to(root).as_posix() for p in src.paths]
    assert sorted(rel) == sorted(made["good"] + made["broken"])  # no notes.txt, no .hidden.jpg
    assert rel == sorted(rel)
    assert all(os.path.isabs(p) for p in src.paths)
    assert {".JPG", ".PNG", ".TIF"} <= {Path(p).suffix for p in src.paths}
    assert list_source(root).fingerprint == src.fingerprint
    assert len(src) > 300


def test_glob_list_file_and_single_file(extract_images, tmp_path):
    root, _ = extract_images
    g = list_source(str(root / "**" / "*.png"))
    assert g.kind == "glob" and g.paths == tuple(sorted(g.paths))
    assert all(p.endswith(".png") for p in g.paths) and len(g.paths) > 50
    # A list: file order is row order, relative paths are relative to the list's directory.
    lst = tmp_path / "list.txt"
    rels = [os.path.relpath(root / "odd" / "gray.jpg", tmp_path), "# a comment", "", str(root / "img0000.jpg")]
    lst.write_text("\n".join(rels) + "\n")
    s = list_source(lst)
    assert s.kind == "list" and s.paths == (str(root / "odd" / "gray.jpg"), str(root / "img0000.jpg"))
    assert list_source(root / "img0000.jpg").paths == (str(root / "img0000.jpg"),)


def test_empty_or_missing_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="holds no images"):
        list_source(tmp_path / "empty")
    with pytest.raises(InputError, match="matches no files"):
        list_source(str(tmp_path / "*.jpg"))
    with pytest.raises(InputError, match="does not exist"):
        list_source(tmp_path / "missing")
    (tmp_path / "list.txt").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="is empty"):
        list_source(tmp_path / "list.txt")


@pytest.mark.parametrize("n,s", [(10, 3), (7, 7), (3, 5), (1000, 16)])
def test_split_rows_is_contiguous_balanced_and_complete(n, s):
    parts = [split_rows(n, s, i) for i in range(s)]
    assert [r for p in parts for r in p] == list(range(n))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    with pytest.raises(InputError, match="part-index"):
        split_rows(n, s, s)


def test_classify_failure_reasons():
    assert classify_failure(Image.DecompressionBombError("x")) == "decompression_bomb"
    assert classify_failure(InputError("a.jpg")) == "corrupt"
    e = InputError("cannot read")
    e.__cause__ = FileNotFoundError("gone")
    assert classify_failure(e) == "unreadable"
    assert classify_failure(OSError("image file is truncated (3 bytes not processed)")) == "truncated"


# ------------------------------------------------------------------------------------------------
# The reference run: every good image with the right features, every broken one with its reason
# ------------------------------------------------------------------------------------------------


def test_clean_run_has_every_good_image_with_the_right_features(extract_clean_run, extract_images, extract_bundle_dir):
    from mae_deploy.features import FeatureExtractor

    root, made = extract_images
    out, summary = extract_clean_run
    feats = open_features(out)
    good = [str(root / r) for r in made["good"]]
    assert sorted(feats.paths) == sorted(good)
    assert feats.shape == (len(good), 32) and feats.dtype == np.float32
    assert summary.features == len(good) and summary.failed == len(BROKEN) and summary.complete
    assert summary.inputs == len(good) + len(BROKEN) and summary.shards == -(-summary.inputs // RUN["shard_size"])
    # Rows are global source rows, ascending, and map back to the source listing.
    src = list_source(root)
    assert [src.paths[r] for r in feats.rows] == feats.paths
    assert np.all(np.diff(feats.rows) > 0)
    with FeatureExtractor(extract_bundle_dir, pool="cls", batch_size=64) as fx:
        ref = fx.extract(feats.paths)
    np.testing.assert_allclose(np.asarray(feats), ref, rtol=1e-5, atol=1e-5)
    # Unusual files are processed like their plain twins (EXIF applied, 16-bit scaled, first frame, alpha).
    for odd, twin in TWINS.items():
        a, b = feats[feats.index_of(root / odd)], feats[feats.index_of(root / twin)]
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=odd)


def test_clean_run_lists_every_broken_input_with_its_reason(extract_clean_run, extract_images):
    root, _ = extract_images
    out, summary = extract_clean_run
    errors = [json.loads(line) for line in (out / ERRORS_NAME).read_text().splitlines()]
    got = {Path(e["path"]).relative_to(root).as_posix(): e["reason"] for e in errors}
    assert got == BROKEN
    assert all(e["message"] and isinstance(e["row"], int) for e in errors)
    assert "decompression bomb" in next(e["message"] for e in errors if e["reason"] == "decompression_bomb")
    assert summary.failures_by_reason == {r: 1 for r in BROKEN.values()}
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["counts"] == {
        "inputs": summary.inputs,
        "features": summary.features,
        "failed": len(BROKEN),
        "failed_by_reason": summary.failures_by_reason,
        "shards": summary.shards,
    }
    assert m["bundle"]["fingerprint"] and m["source"]["fingerprint"] == list_source(root).fingerprint
    assert {"numpy", "pillow", "onnxruntime", "mae_deploy"} <= set(m["versions"])
    assert m["runs"][-1]["images"] == summary.inputs and "inference_s" in m["runs"][-1]["timings"]
    # Shards: every index line belongs to a feature row.
    for k in range(summary.shards):
        n = len((out / index_name(k)).read_text().splitlines())
        assert np.load(out / shard_name(k)).shape == (n, 32)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [LOCK_NAME]  # no temp files left


def test_summary_text(extract_clean_run):
    _, summary = extract_clean_run
    text = str(summary)
    assert f"{summary.features} extracted, {len(BROKEN)} failed" in text and "img/s" in text
    assert "errors.jsonl" in text
    with pytest.raises(PartialFailure) as e:
        summary.raise_for_failures()
    assert e.value.exit_code == 4


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------


def test_sigkill_midway_then_resume_equals_clean_run(extract_clean_run, extract_images, extract_bundle_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    root, _ = extract_images
    ref_dir, ref = extract_clean_run
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "mae_deploy.cli",
        "extract",
        str(root),
        "--bundle",
        str(extract_bundle_dir),
        "--out",
        str(out),
        "--batch-size",
        str(RUN["batch_size"]),
        "--shard-size",
        str(RUN["shard_size"]),
        "--workers",
        str(RUN["workers"]),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children = []
    try:
        deadline = time.monotonic() + 60
        while not (out / index_name(3)).exists():  # kill once a few shards are committed
            assert proc.poll() is None, f"extract ended before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no shard was committed within 60 s"
            children = children or psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.002)
        children = children or psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    committed = sum(1 for k in range(ref.shards) if (out / index_name(k)).exists())
    assert 4 <= committed < ref.shards, "the kill must land in the middle of the job"
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    # Orphaned decode workers notice the dead parent and exit.
    assert children, "the job should have had a decode worker"
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive

    summary = extract_features(root, extract_bundle_dir, out, progress=False, **RUN)
    assert summary.processed < summary.inputs  # it resumed rather than starting over
    assert summary.features == ref.features and summary.failed == ref.failed
    assert result_files(out) == result_files(ref_dir)  # features, indexes and errors.jsonl byte for byte
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_resume_discards_partial_writes_and_matches(extract_clean_run, extract_images, extract_bundle_dir, tmp_path):
    """A crash between commits leaves temp files, a shard without index and extra error lines."""
    root, _ = extract_images
    ref_dir, ref = extract_clean_run
    out = tmp_path / "crashed"
    shutil.copytree(ref_dir, out)
    last_good = ref.shards // 2
    for k in range(last_good, ref.shards):
        (out / index_name(k)).unlink()  # shards >= last_good are not committed...
    (out / f".{shard_name(last_good)}.123.tmp").write_bytes(b"partial")  # ...one was being written
    with open(out / ERRORS_NAME, "ab") as f:
        f.write(b'{"row": 99999, "path": "x", "reason": "corru')  # a line cut short
    m = json.loads((out / "manifest.json").read_text())
    m["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    summary = extract_features(root, extract_bundle_dir, out, progress=False, **RUN)
    first_left = last_good * RUN["shard_size"]
    assert summary.processed == summary.inputs - first_left
    assert result_files(out) == result_files(ref_dir)


def test_rerun_of_a_finished_job_does_nothing(extract_clean_run, extract_images, extract_bundle_dir):
    root, _ = extract_images
    out, ref = extract_clean_run
    before = result_files(out)
    summary = extract_features(root, extract_bundle_dir, out, progress=False, **RUN)
    assert summary.processed == 0 and summary.features == ref.features and summary.failed == ref.failed
    assert result_files(out) == before


def test_mismatched_resume_is_refused(
    extract_clean_run, extract_images, extract_bundle_dir, extract_other_stats_bundle_dir, tmp_path
):
    root, _ = extract_images
    out, _ = extract_clean_run
    with pytest.raises(InputError, match=r"different job[\s\S]*pool: was 'cls', now 'mean'"):
        extract_features(root, extract_bundle_dir, out, progress=False, pool="mean", **RUN)
    with pytest.raises(InputError, match=r"dtype: was 'float32', now 'float16'"):
        extract_features(root, extract_bundle_dir, out, progress=False, dtype="float16", **RUN)
    with pytest.raises(InputError, match=r"bundle: was .*fingerprint"):
        extract_features(root, extract_other_stats_bundle_dir, out, progress=False, **RUN)
    with pytest.raises(InputError, match=r"source: was .*odd"):
        extract_features(root / "odd", extract_bundle_dir, out, progress=False, **RUN)
    with pytest.raises(InputError, match="shard_size: was 12, now 5"):
        extract_features(root, extract_bundle_dir, out, progress=False, **{**RUN, "shard_size": 5})
    # A directory that is not an extraction output is never written into.
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty and holds no manifest.json"):
        extract_features(root / "odd", extract_bundle_dir, stranger, progress=False)
    assert sorted(p.name for p in stranger.iterdir()) == ["precious.txt"]


def test_source_that_changed_is_refused(extract_images, extract_bundle_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(extract_images[0] / "odd", src)
    out = tmp_path / "out"
    extract_features(src, extract_bundle_dir, out, progress=False, workers=0)
    (src / "new.png").write_bytes((src / "gray16_twin.png").read_bytes())
    with pytest.raises(InputError, match="its files changed"):
        extract_features(src, extract_bundle_dir, out, progress=False, workers=0)


# ------------------------------------------------------------------------------------------------
# Scale-out and reading
# ------------------------------------------------------------------------------------------------


def test_parts_together_equal_a_single_run(extract_clean_run, extract_images, extract_bundle_dir, tmp_path):
    root, _ = extract_images
    ref_dir, ref = extract_clean_run
    dirs = []
    for i in range(3):
        d = tmp_path / f"part-{i}"
        s = extract_features(
            root,
            extract_bundle_dir,
            d,
            progress=False,
            num_parts=3,
            part_index=i,
            batch_size=8,
            shard_size=40,
            workers=0,
        )
        assert s.inputs == len(split_rows(ref.inputs, 3, i))
        dirs.append(d)
    whole = open_features(ref_dir)
    for parts in (open_features(dirs[::-1]), open_features(str(tmp_path / "part-*"))):
        assert parts.paths == whole.paths
        np.testing.assert_array_equal(parts.rows, whole.rows)
        np.testing.assert_allclose(np.asarray(parts), np.asarray(whole), rtol=1e-5, atol=1e-6)
    errors = [json.loads(line) for d in dirs for line in (d / ERRORS_NAME).read_text().splitlines()]
    assert [(e["row"], e["reason"]) for e in errors] == [
        (e["row"], e["reason"]) for e in map(json.loads, (ref_dir / ERRORS_NAME).read_text().splitlines())
    ]
    with pytest.raises(InputError, match="both part 1"):
        open_features([dirs[1], dirs[1]])
    with pytest.raises(InputError, match="not parts of the same job"):
        open_features([dirs[0], ref_dir])


def test_open_features_indexing(extract_clean_run):
    out, _ = extract_clean_run
    f = open_features(out)
    full = np.concatenate(
        [np.load(out / shard_name(k)) for k in range(len(f.shards) + 10) if (out / shard_name(k)).exists()]
    )
    assert len(f) == len(full) and len(f.shards) > 5 and isinstance(f.shards[0], np.memmap)
    np.testing.assert_array_equal(np.asarray(f), full)
    np.testing.assert_array_equal(f[5], full[5])
    np.testing.assert_array_equal(f[-1], full[-1])
    np.testing.assert_array_equal(f[7:53], full[7:53])  # crosses shards
    np.testing.assert_array_equal(f[::17], full[::17])
    idx = np.array([40, 3, 3, len(full) - 1])
    np.testing.assert_array_equal(f[idx], full[idx])
    mask = np.zeros(len(full), bool)
    mask[[1, 50, 200]] = True
    np.testing.assert_array_equal(f[mask], full[mask])
    s, j = f.locate(30)
    np.testing.assert_array_equal(f.shards[s][j], full[30])
    assert f.index_of(f.paths[30]) == 30
    with pytest.raises(IndexError):
        f[len(full)]


def test_tokens_float16_in_a_thread(extract_images, extract_bundle_dir, tmp_path):
    from mae_deploy.features import FeatureExtractor

    root, _ = extract_images
    out = tmp_path / "tok"
    summary = extract_features(
        root / "odd",
        extract_bundle_dir,
        out,
        progress=False,
        pool="tokens",
        dtype="float16",
        workers=0,
        transfer="float32",
        batch_size=5,
    )
    f = open_features(out)
    assert f.shape == (summary.features, 17, 32) and f.dtype == np.float16 and f.shards[0].dtype == np.float16
    with FeatureExtractor(extract_bundle_dir, pool="tokens") as fx:
        ref = fx.extract(f.paths)
    np.testing.assert_allclose(np.asarray(f).astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def test_incomplete_output_needs_allow_incomplete(extract_clean_run, tmp_path):
    src, _ = extract_clean_run
    out = tmp_path / "partial"
    shutil.copytree(src, out)
    m = json.loads((out / "manifest.json").read_text())
    m["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    (out / index_name(2)).unlink()
    with pytest.raises(InputError, match="not complete"):
        open_features(out)
    f = open_features(out, allow_incomplete=True)
    assert len(f) == sum(len(np.load(out / shard_name(k))) for k in (0, 1))  # stops at the first gap


def test_empty_part_is_an_empty_complete_output(extract_images, extract_bundle_dir, tmp_path):
    root, _ = extract_images
    lst = tmp_path / "two.txt"
    lst.write_text(f"{root / 'img0000.jpg'}\n{root / 'img0001.png'}\n")
    s = extract_features(lst, extract_bundle_dir, tmp_path / "p2", progress=False, num_parts=3, part_index=0, workers=0)
    assert s.inputs == 0 and s.ok
    assert len(open_features(tmp_path / "p2")) == 0


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _cli(*args: str):
    from mae_deploy.cli import main

    return CliRunner().invoke(main, ["extract", *args])


def test_cli_exit_codes(extract_images, extract_bundle_dir, tmp_path):
    root, _ = extract_images
    ok = _cli(
        str(root / "odd"),
        "--bundle",
        str(extract_bundle_dir),
        "--out",
        str(tmp_path / "ok"),
        "--workers",
        "0",
        "--no-progress",
    )
    assert ok.exit_code == 0, ok.output
    assert "extracted, 0 failed" in ok.output and "img/s" in ok.output

    partial = _cli(
        str(root / "broken"),
        "--bundle",
        str(extract_bundle_dir),
        "--out",
        str(tmp_path / "bad"),
        "--workers",
        "0",
        "--no-progress",
    )
    assert partial.exit_code == 4, partial.output
    assert f"{len(BROKEN)} of {len(BROKEN)} inputs failed" in partial.output

    strict_out = tmp_path / "strict"
    strict = _cli(
        str(root / "broken"),
        "--bundle",
        str(extract_bundle_dir),
        "--out",
        str(strict_out),
        "--strict",
        "--workers",
        "0",
        "--no-progress",
    )
    assert strict.exit_code == 3 and "--strict: stopped at row 0" in strict.output
    lines = (strict_out / ERRORS_NAME).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["reason"] == BROKEN["broken/bomb.png"]  # the first, sorted

    (tmp_path / "none").mkdir()
    empty = _cli(str(tmp_path / "none"), "--bundle", str(extract_bundle_dir), "--out", str(tmp_path / "e"))
    assert empty.exit_code == 3 and "holds no images" in empty.output

    help_ = _cli("--help")
    assert help_.exit_code == 0 and "--num-parts" in help_.output and "Exit codes" in help_.output
    assert "--num-shards" in help_.output  # the older name still works


def test_supported_extensions_are_documented():
    from mae_deploy.commands.extract import extract

    for ext in IMAGE_EXTENSIONS:
        assert ext.lstrip(".") in extract.help


# ------------------------------------------------------------------------------------------------
# Decode workers that die
# ------------------------------------------------------------------------------------------------


def test_a_killed_worker_is_replaced_and_nothing_is_lost(
    extract_clean_run, extract_images, extract_bundle_dir, tmp_path
):
    """SIGKILL one decode worker mid-job (as the OOM killer would): the result is still the clean run's."""
    import threading

    psutil = pytest.importorskip("psutil")
    root, _ = extract_images
    ref_dir, _ = extract_clean_run
    out = tmp_path / "worker_killed"
    result = {}

    def run():
        try:
            result["summary"] = extract_features(root, extract_bundle_dir, out, progress=False, **{**RUN, "workers": 2})
        except BaseException as e:  # re-raised below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while not (out / index_name(2)).exists() and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    workers = [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]
    assert workers and t.is_alive(), "the job must still be running with its workers"
    workers[0].kill()
    t.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result_files(out) == result_files(ref_dir)
    run_record = json.loads((out / "manifest.json").read_text())["runs"][-1]
    assert run_record["decode_worker_restarts"] >= 1


def _crash_on_marked_files(self, row, path):
    if "crash" in os.path.basename(path):
        os.kill(os.getpid(), signal.SIGSEGV)  # what a crashing image decoder does to its process
    return _original_decode_one(self, row, path)


_original_decode_one = None


def test_an_image_that_crashes_the_decoder_fails_alone(extract_images, extract_bundle_dir, tmp_path, monkeypatch):
    """The crashing file is found by decoding its batch again image by image; the rest are extracted."""
    global _original_decode_one
    import mae_deploy.extract.decode as ex

    root, _ = extract_images
    src = tmp_path / "src"
    src.mkdir()
    plain = sorted(root.glob("img00*"))[:6]
    for p in plain[:5]:
        shutil.copy(p, src / p.name)
    shutil.copy(plain[5], src / "img0003_crash.jpg")  # sorts into the middle of the first batch
    _original_decode_one = ex.Decoder.decode_one
    monkeypatch.setattr(ex.Decoder, "decode_one", _crash_on_marked_files)
    # fork: the workers inherit the patched decoder (spawned ones would import the real one).
    s = extract_features(
        src, extract_bundle_dir, tmp_path / "out", progress=False, workers=1, batch_size=4, start_method="fork"
    )
    assert s.failures_by_reason == {"decoder_crashed": 1} and s.features == 5
    errors = [json.loads(line) for line in (tmp_path / "out" / ERRORS_NAME).read_text().splitlines()]
    assert [Path(e["path"]).name for e in errors] == ["img0003_crash.jpg"]
    assert "SIGSEGV" in errors[0]["message"]
    run_record = json.loads((tmp_path / "out" / "manifest.json").read_text())["runs"][-1]
    assert run_record["decode_worker_restarts"] == 2  # the batch, then the image alone
    monkeypatch.undo()
    from mae_deploy.features import FeatureExtractor

    f = open_features(tmp_path / "out")
    with FeatureExtractor(extract_bundle_dir) as fx:
        np.testing.assert_allclose(np.asarray(f), fx.extract(f.paths), rtol=1e-5, atol=1e-5)
