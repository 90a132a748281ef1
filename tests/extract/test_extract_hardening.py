"""Extraction defects of issue #10, each with the test that failed before the fix.

One writer per output directory, a decode worker that dies while the parent hands it work, damaged shards,
use after close, unwritable outputs, FIFOs and devices as inputs, Ctrl-C, file modes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from extract_data import REPO, RUN, result_files
from PIL import Image

from mae_deploy.errors import InputError
from mae_deploy.extract import ERRORS_NAME, LOCK_NAME, MANIFEST_NAME, extract_features, index_name, open_features
from mae_deploy.extract.layout import file_sha256, shard_name

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _cli_cmd(root: Path, bundle: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mae_deploy.cli",
        "extract",
        str(root),
        "--bundle",
        str(bundle),
        "--out",
        str(out),
        "--batch-size",
        str(RUN["batch_size"]),
        "--shard-size",
        str(RUN["shard_size"]),
        "--workers",
        str(RUN["workers"]),
        "--no-progress",
        *extra,
    ]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, f"extract ended before {what}: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, f"no {path.name} within 60 s"
        time.sleep(0.005)


# ------------------------------------------------------------------------------------------------
# One writer per --out
# ------------------------------------------------------------------------------------------------


def test_a_second_job_into_the_same_out_is_refused_with_the_holders_pid(
    extract_clean_run, extract_images, extract_bundle_dir, tmp_path
):
    """Two processes: while the first writes, the second (other settings) exits 3 naming it; nothing mixes."""
    root, _ = extract_images
    ref_dir, _ = extract_clean_run
    out = tmp_path / "shared"
    first = _start(_cli_cmd(root, extract_bundle_dir, out))
    try:
        _wait_for(out / index_name(1), first, "the second job could start")
        # Paused, the first job keeps its lock (as a slow job would) however long the second takes to start:
        # without this, a quiet machine let the first finish before the second's imports were done.
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(
            _cli_cmd(root, extract_bundle_dir, out, "--pool", "mean"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        still_running = first.poll() is None
    finally:
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=120)
    assert still_running, "the first job must still hold the directory when the second starts"
    assert second.returncode == 3, second.stderr
    assert f"in use by process {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode in (0, 4), first.stderr.read().decode()
    assert result_files(out) == result_files(ref_dir)  # the first job's output, untouched by the second
    assert json.loads((out / MANIFEST_NAME).read_text())["settings"]["pool"] == "cls"


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from mae_deploy.extract.lock import "
            "OutputLock; OutputLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        from mae_deploy.extract.lock import OutputLock

        with pytest.raises(InputError, match=f"in use by process {holder.pid}"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(tmp_path) as lock:  # the OS released it with the process
        assert lock.held and (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())


# ------------------------------------------------------------------------------------------------
# Decode workers that die while work is handed to them
# ------------------------------------------------------------------------------------------------


def test_a_send_to_a_dead_worker_requeues_the_work_and_replaces_it(extract_images, extract_bundle_dir):
    """A worker already dead when the parent sends it a task: BrokenPipeError used to end the job."""
    from mae_deploy.bundle import Bundle
    from mae_deploy.extract.workers import DecodeWorkers, Task

    root, made = extract_images
    b = Bundle.load(extract_bundle_dir)
    paths = [str(root / r) for r in made["good"][:12]]
    tasks = [Task(0, [(i, paths[i]) for i in range(j, j + 4)], j == 8) for j in (0, 4, 8)]
    args = {
        "preprocessing": b.preprocessing,
        "in_chans": b.in_chans,
        "min_side": 16,
        "max_pixels": 0,
        "transfer": "uint8",
    }
    pool = DecodeWorkers(iter(tasks), args, 0, workers=1, max_in_flight=4)
    try:
        [victim] = pool._pool
        victim.proc.kill()
        victim.proc.join()
        results = list(pool)
    finally:
        pool.close()
    assert [t.items for t, _ in results] == [t.items for t in tasks]
    assert all(d.failures == [] and d.rows == [i for i, _ in t.items] for t, d in results)
    assert pool.restarts >= 1


# ------------------------------------------------------------------------------------------------
# Damaged shards: checksums in the manifest, verified on a rerun, named by open_features
# ------------------------------------------------------------------------------------------------


def test_every_shard_sha256_is_in_the_manifest(extract_clean_run):
    out, summary = extract_clean_run
    shards = json.loads((out / MANIFEST_NAME).read_text())["shards"]
    assert sorted(shards, key=int) == [str(k) for k in range(summary.shards)]
    for k, rec in shards.items():
        assert rec["sha256"] == file_sha256(out / shard_name(int(k)))
        assert rec["index_sha256"] == file_sha256(out / index_name(int(k)))


def test_a_damaged_shard_is_named_by_open_features_and_recomputed_by_a_rerun(
    extract_clean_run, extract_images, extract_bundle_dir, tmp_path
):
    root, _ = extract_images
    ref_dir, _ = extract_clean_run
    out = tmp_path / "damaged"
    shutil.copytree(ref_dir, out)
    truncated, altered = out / shard_name(2), out / shard_name(5)
    truncated.write_bytes(truncated.read_bytes()[:-7])
    data = bytearray(altered.read_bytes())
    data[-3] ^= 0xFF  # same size, one feature value changed
    altered.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{truncated}.*truncated"):
        open_features(out)
    truncated.write_bytes((ref_dir / shard_name(2)).read_bytes())
    open_features(out)  # sizes and indexes check out; only the checksum can tell
    with pytest.raises(InputError, match=f"{altered}.*sha256"):
        open_features(out, verify=True)
    truncated.write_bytes(truncated.read_bytes()[:-7])

    summary = extract_features(root, extract_bundle_dir, out, progress=False, **RUN)
    assert summary.processed == 2 * RUN["shard_size"]  # only the two damaged shards
    assert len(summary.repaired) == 2 and "recomputed a damaged shard" in str(summary)
    assert result_files(out) == result_files(ref_dir)  # errors.jsonl back in row order too
    open_features(out, verify=True)


# ------------------------------------------------------------------------------------------------
# Use after close, unwritable outputs, odd inputs, Ctrl-C, modes, threads
# ------------------------------------------------------------------------------------------------


def test_extract_after_close_raises(extract_bundle_dir, extract_images):
    from mae_deploy.features import FeatureExtractor

    root, made = extract_images
    fx = FeatureExtractor(extract_bundle_dir)
    fx.extract(root / made["good"][0])
    fx.close()
    with pytest.raises(RuntimeError, match="closed"):
        fx.extract(root / made["good"][0])


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_unwritable_out_is_exit_3_before_any_work(extract_images, extract_bundle_dir, tmp_path, where):
    from click.testing import CliRunner

    from mae_deploy.cli import main

    root, _ = extract_images
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "feats" if where == "under_a_file" else Path("/proc/mae-deploy-feats")
    r = CliRunner().invoke(
        main, ["extract", str(root / "odd"), "--bundle", str(extract_bundle_dir), "--out", str(out), "--no-progress"]
    )
    assert r.exit_code == 3, r.output
    assert "cannot write --out" in r.output or "not writable" in r.output
    assert not out.exists()


def test_a_fifo_or_a_device_is_not_a_regular_file(extract_images, extract_bundle_dir, tmp_path):
    root, made = extract_images
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{root / made['good'][0]}\n{fifo}\n/dev/zero\n")
    s = extract_features(lst, extract_bundle_dir, tmp_path / "out", progress=False, workers=0)
    assert s.features == 1 and s.failures_by_reason == {"unreadable": 2}
    errors = [json.loads(x) for x in (tmp_path / "out" / ERRORS_NAME).read_text().splitlines()]
    assert all("not a regular file" in e["message"] and "empty" not in e["message"] for e in errors)
    for source in (fifo, "/dev/zero"):
        with pytest.raises(InputError, match="not a regular file"):
            extract_features(source, extract_bundle_dir, tmp_path / "never", progress=False)


def test_ctrl_c_exits_130_and_leaves_a_resumable_directory(
    extract_clean_run, extract_images, extract_bundle_dir, tmp_path
):
    psutil = pytest.importorskip("psutil")
    root, _ = extract_images
    ref_dir, _ = extract_clean_run
    out = tmp_path / "interrupted"
    # As an interactive shell starts it: Ctrl-C handled, whatever disposition this test process passes on (a
    # child inherits an ignored or blocked SIGINT, and then a well-behaved CLI rightly does not stop).
    cmd = _cli_cmd(root, extract_bundle_dir, out)
    interactive = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
        "sys.argv = ['mae-deploy', *sys.argv[1:]]; runpy.run_module('mae_deploy.cli', run_name='__main__')"
    )
    proc = _start([cmd[0], "-c", interactive, *cmd[3:]])
    try:
        _wait_for(out / index_name(1), proc, "it could be interrupted")
        # Stopped at once, the job cannot finish before Ctrl-C arrives: inference runs ahead of the shard writer,
        # and on a loaded machine the rest of the shards were once committed while this process waited for the
        # CPU between seeing shard 1 and signalling (the job then exited 4, complete).
        proc.send_signal(signal.SIGSTOP)
        assert proc.poll() is None, "the job finished before it could be stopped"
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)  # pending while stopped: delivered first thing on SIGCONT
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, proc.stderr.read().decode()
    assert json.loads((out / MANIFEST_NAME).read_text())["status"] == "interrupted"
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive  # decode workers were stopped, not orphaned
    summary = extract_features(root, extract_bundle_dir, out, progress=False, **RUN)  # the lock is free; it resumes
    assert summary.processed < summary.inputs
    assert result_files(out) == result_files(ref_dir)


def test_files_are_written_0644(extract_clean_run):
    out, _ = extract_clean_run
    umask = os.umask(0o022)
    os.umask(umask)
    for p in out.iterdir():
        if p.name != LOCK_NAME:
            assert stat.S_IMODE(p.stat().st_mode) == 0o644 & ~umask, p.name


def test_threads_is_one_runner_option(extract_images, extract_bundle_dir, tmp_path):
    root, _ = extract_images
    s = extract_features(root / "odd", extract_bundle_dir, tmp_path / "out", progress=False, workers=0, threads=1)
    run = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["runs"][-1]
    assert s.features > 0 and run["runner"]["backend"] == "ort"
    np.testing.assert_equal(len(open_features(tmp_path / "out")), s.features)


def test_exact_resize_reaches_the_decoders_and_binds_the_job(extract_bundle_dir, tmp_path):
    """--exact-resize gives the exact preprocessing's features, is in the manifest, and a resume must match it."""
    from skimage import data

    from mae_deploy.bundle import Bundle
    from mae_deploy.features import FeatureExtractor
    from mae_deploy.preprocess import Preprocessor

    b = Bundle.load(extract_bundle_dir)
    src = tmp_path / "big"
    src.mkdir()
    # A photo several times the model's input: the default path draft-decodes it, the exact one does not.
    Image.fromarray(data.astronaut()).resize((1600, 1600)).save(src / "astronaut.jpg", quality=90)
    feats = {}
    for exact in (False, True):
        out = tmp_path / f"out-{exact}"
        extract_features(src, extract_bundle_dir, out, workers=1, exact_resize=exact, progress=False)
        assert json.loads((out / MANIFEST_NAME).read_text())["settings"]["exact_resize"] is exact
        feats[exact] = np.asarray(open_features(out)[0])
        pre = Preprocessor.from_bundle(b, exact_resize=exact)
        with FeatureExtractor(b, preprocessor=pre) as fx:
            np.testing.assert_allclose(feats[exact], fx.extract(src / "astronaut.jpg")[0], atol=1e-5)
    assert not np.array_equal(feats[False], feats[True])  # the flag changed what the encoder saw
    with pytest.raises(InputError, match="exact_resize"):
        extract_features(src, extract_bundle_dir, tmp_path / "out-False", workers=0, exact_resize=True, progress=False)
