"""The extraction pipeline's own capacity (issue #21): the null runner, shared-memory transfer, batch normalisation.

Speed is measured by benchmarks/bench_extract.py --runner null; here: the same images and failures whichever way
pixels travel, slots released and unlinked, the pipe fall-back when shared memory has no room.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from extract_data import RUN, result_files

from mae_deploy.bundle import Bundle
from mae_deploy.extract import extract_features
from mae_deploy.extract.decode import normalize_batch
from mae_deploy.extract.slots import SharedSlots
from mae_deploy.extract.workers import DecodeWorkers, Task
from mae_deploy.names import BACKENDS, DIAGNOSTIC_BACKENDS
from mae_deploy.preprocess import Preprocessor
from mae_deploy.runners import create_runner

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
MAX_PIXELS = 89_478_485  # Pillow's default: broken/bomb.png is above it


def _decoder_args(bundle: Bundle, transfer: str) -> dict:
    return {
        "preprocessing": bundle.preprocessing,
        "in_chans": bundle.in_chans,
        "min_side": 16,
        "max_pixels": MAX_PIXELS,
        "transfer": transfer,
    }


def _tasks(root, made, n_good: int = 14) -> list[Task]:
    """Batches of 4 mixing good images with every broken kind."""
    paths = [str(root / r) for r in made["good"][:n_good] + made["broken"]]
    rows = list(enumerate(paths))
    return [Task(0, rows[i : i + 4], i + 4 >= len(rows)) for i in range(0, len(rows), 4)]


def _decode_all(pool: DecodeWorkers) -> list[tuple[list, np.ndarray | None, list]]:
    """Every batch's rows, a copy of its pixels (views die with the next batch) and failures."""
    try:
        return [(d.rows, None if d.pixels is None else d.pixels.copy(), d.failures) for _, d in pool]
    finally:
        pool.close()


def test_the_null_runner_returns_zeros_of_the_encoder_shape_and_is_no_backend(extract_bundle_dir):
    b = Bundle.load(extract_bundle_dir)
    runner = create_runner(b, "null")
    x = np.zeros((3, b.in_chans, b.image_size, b.image_size), np.float32)
    ids = np.tile(np.arange(b.num_patches), (3, 1))
    latent = runner.encode(x, ids)
    assert latent.shape == (3, b.num_patches + 1, b.embed_dim) and not latent.any()
    assert runner.info.backend == "null" and "diagnostic" in runner.info.details
    with pytest.raises(Exception, match="pixel_values"):  # the usual input checks still run
        runner.encode(x[:, :, :8], ids)
    assert "null" in DIAGNOSTIC_BACKENDS and "null" not in BACKENDS  # never offered by --backend


@pytest.mark.parametrize("transfer", ["float32", "uint8"])
def test_shared_memory_delivers_what_pipes_deliver(extract_images, extract_bundle_dir, transfer):
    root, made = extract_images
    b = Bundle.load(extract_bundle_dir)
    args = _decoder_args(b, transfer)
    shm = DecodeWorkers(iter(_tasks(root, made)), args, MAX_PIXELS, workers=2, max_in_flight=3, batch_size=4)
    names = shm._slots.names
    assert shm.transport == "shared_memory" and len(names) == 4  # batches in flight + the one being consumed
    via_shm = _decode_all(shm)
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)  # unlinked on close
    pipe = DecodeWorkers(
        iter(_tasks(root, made)), args, MAX_PIXELS, workers=2, max_in_flight=3, batch_size=4, shared_memory=False
    )
    assert pipe.transport == "pipe"
    via_pipe = _decode_all(pipe)
    assert [r for r, _, _ in via_shm] == [r for r, _, _ in via_pipe]
    assert [f for _, _, f in via_shm] == [f for _, _, f in via_pipe]
    assert sum(len(f) for _, _, f in via_shm) == len(made["broken"])
    for (_, a, _), (_, c, _) in zip(via_shm, via_pipe, strict=True):
        assert (a is None and c is None) or (a.dtype == c.dtype and np.array_equal(a, c))


def test_no_room_for_slots_falls_back_to_pipes(extract_images, extract_bundle_dir, monkeypatch):
    root, made = extract_images
    monkeypatch.setattr(SharedSlots, "create", classmethod(lambda cls, count, nbytes: None))
    pool = DecodeWorkers(
        iter(_tasks(root, made, 4)),
        _decoder_args(Bundle.load(extract_bundle_dir), "float32"),
        MAX_PIXELS,
        workers=1,
        max_in_flight=2,
        batch_size=4,
    )
    assert pool.transport == "pipe"
    assert sum(len(r) for r, _, _ in _decode_all(pool)) == 4


def test_slots_that_do_not_fit_are_refused_not_left_to_crash_a_worker():
    # More than /dev/shm holds is "no slots" (checked before fallocate reserves the space).
    assert SharedSlots.create(2, 1 << 40) is None


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_batch_normalisation_is_bit_identical_to_the_per_image_one(mode):
    pre = Preprocessor(32, in_chans=1 if mode == "L" else 3, **({"mean": [0.5], "std": [0.25]} if mode == "L" else {}))
    shape = (5, 32, 32) if mode == "L" else (5, 32, 32, 3)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    expected = np.stack([pre.normalize(im) for im in pixels])
    got = normalize_batch(pre, pixels)
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, expected)


def test_every_transfer_and_transport_writes_the_same_output(
    extract_images, extract_bundle_dir, extract_clean_run, tmp_path, monkeypatch
):
    """uint8 (normalised by the parent) writes the default float32 run's output (workers normalise) byte for
    byte, and so do pipes."""
    import functools

    import mae_deploy.extract.local as local

    root, _ = extract_images
    ref_dir, _ = extract_clean_run
    s = extract_features(root, extract_bundle_dir, tmp_path / "u8", progress=False, transfer="uint8", **RUN)
    assert s.timings["first_batch_s"] > 0
    assert result_files(tmp_path / "u8") == result_files(ref_dir)
    monkeypatch.setattr(local, "DecodeWorkers", functools.partial(DecodeWorkers, shared_memory=False))
    extract_features(root, extract_bundle_dir, tmp_path / "pipe", progress=False, **RUN)
    assert result_files(tmp_path / "pipe") == result_files(ref_dir)
    manifest = json.loads((tmp_path / "pipe" / "manifest.json").read_text())
    assert manifest["runs"][-1]["transport"] == "pipe" and manifest["runs"][-1]["transfer"] == "float32"
