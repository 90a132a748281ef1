"""The trt runner's execute path, its GPU-path rules and the build-engine command, on fakes of tensorrt and
cuda-python (tests/runners/trt_fakes.py): buffers, chunking, the cache, cudaSetDevice on every entry point,
close() under each part's lock, stream handles, and the errors a user sees without a GPU.
"""

from __future__ import annotations

import re
import sys
import threading
import types

import numpy as np
import pytest
from click.testing import CliRunner
from trt_fakes import (
    ENGINE_MAGIC,
    FakeCudart,
    FakeTrt,
    install,
)

from mae_deploy.errors import BundleError, DeviceUnavailable, InputError, MissingDependency
from mae_deploy.masking import random_masking
from mae_deploy.runners import create_runner
from mae_deploy.runners import trt as T


def _invoke(args: list[str]):
    from mae_deploy.cli import main  # imported here: a broken command module fails its tests, not collection

    return CliRunner().invoke(main, args)


def test_build_engine_command_without_tensorrt(trt_bundle_dir):
    res = _invoke(["build-engine", str(trt_bundle_dir)])
    assert res.exit_code == 6
    assert "error: the trt backend needs the package 'tensorrt'" in res.output
    assert "pip install 'mae-deploy[trt]'" in res.output


def test_missing_cuda_python_names_the_extra(monkeypatch, trt_bundle):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt("10.13.1"))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` fail like an absent package
    with pytest.raises(MissingDependency, match=r"needs the package 'cuda-python'.*mae-deploy\[trt\]"):
        T.TrtRunner(trt_bundle)


def test_real_cuda_python_without_a_gpu_is_device_unavailable():
    """cuda-python is installed here (a torch dependency) but there is no driver: the real call fails."""
    cudart = T.import_cudart()
    with pytest.raises(DeviceUnavailable, match="no usable CUDA device for the trt backend"):
        T.cuda_device_name(cudart, 0)


def test_device_errors(monkeypatch, trt_bundle):
    install(monkeypatch, FakeTrt("10.13.1"), FakeCudart(devices=0))
    with pytest.raises(DeviceUnavailable, match="needs a CUDA GPU and none is visible"):
        T.TrtRunner(trt_bundle)
    install(monkeypatch, FakeTrt("10.13.1"), FakeCudart(devices=1))
    with pytest.raises(DeviceUnavailable, match=r"cuda:3 does not exist: 1 CUDA device\(s\) visible"):
        T.TrtRunner(trt_bundle, device="cuda:3")
    with pytest.raises(InputError, match="runs on cuda or cuda:N, not 'cpu'"):
        T.TrtRunner(trt_bundle, device="cpu")
    with pytest.raises(InputError, match="int8 graphs are ONNX Runtime dynamic quantisation"):
        T.TrtRunner(trt_bundle, precision="int8")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt("8.6.1"))
    with pytest.raises(T.UnsupportedTensorRT, match="TensorRT 8.6.1 is installed"):
        T.TrtRunner(trt_bundle)


# --------------------------------------------------------------------------------------------------
# The runner's execute path (fake tensorrt + fake CUDA)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort_reference(trt_bundle):
    from mae_deploy.runners.ort import OrtRunner

    return OrtRunner(trt_bundle, device="cpu")


def test_runner_matches_onnxruntime_and_reuses_max_sized_buffers(
    installed_trt_fakes, trt_bundle, ort_reference, tmp_path
):
    trt, cudart = installed_trt_fakes
    rng = np.random.default_rng(0)
    runner = create_runner(trt_bundle, "trt", device="cuda", cache_dir=tmp_path, max_batch=4, progress=False)
    assert runner.has_decoder and runner.info.details["gpu"] == "Fake GPU 80GB (sm_90)"
    x = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    ids_keep, ids_restore, _ = random_masking(6, 16, 0.75, rng)
    latent = runner.encode(x, ids_keep)  # batch 6 > max 4: two chunks
    np.testing.assert_allclose(latent, ort_reference.encode(x, ids_keep), rtol=0, atol=1e-6)
    pred = runner.decode(latent, ids_restore)
    np.testing.assert_allclose(pred, ort_reference.decode(latent, ids_restore), rtol=0, atol=1e-6)
    full = runner.encode(x[:2], np.tile(np.arange(16), (2, 1)))  # feature extraction: every token visible
    assert full.shape == (2, 17, 32)

    # Buffers: one per tensor, sized for the profile's max shapes, allocated once.
    mallocs = sorted(n for c, n in [c[:2] for c in cudart.calls] if c == "cudaMalloc")
    assert mallocs == sorted(
        [
            4 * 3 * 32 * 32 * 4,
            4 * 16 * 8,
            4 * 17 * 32 * 4,  # encoder: pixels, ids, latent,
            4 * 32 * 4,
            4 * 32 * 4,  # pooled_cls, pooled_mean
            4 * 17 * 32 * 4,
            4 * 16 * 8,
            4 * 16 * 192 * 4,
        ]
    )  # decoder: latent, ids, pred
    # Pooled features: only (N, D) is copied back, from the engine's pooled output.
    feats = runner.encode_pooled(x[:2], np.tile(np.arange(16), (2, 1)), "mean")
    np.testing.assert_allclose(feats, full[:, 1:].mean(axis=1), rtol=0, atol=1e-6)
    last_copy_back = [c for c in cudart.calls if c[:2] == ("cudaMemcpyAsync", 2)][-1]
    assert last_copy_back[2] == 2 * 32 * 4  # (2, D) float32, not the (2, 17, D) latent
    ctx = runner.session("encoder").context
    shapes = [e[2] for e in ctx.log if e[0] == "set_input_shape" and e[1] == "ids_keep"]
    assert shapes == [(4, 16), (4, 4), (2, 4), (2, 16), (2, 16)]  # max (sizing), then every call's real shape
    info = runner.info
    assert info.backend == "trt" and info.providers == ("tensorrt",)
    assert info.details["built"] == {"encoder": True, "decoder": True}
    assert info.details["api_generation"] == 10 and info.details["sessions"] == ["decoder", "encoder"]
    runner.close()
    assert cudart.memory == {} and cudart.streams == set()  # every buffer and stream released

    # A second runner with the same options finds the cached engines.
    again = T.TrtRunner(trt_bundle, cache_dir=tmp_path, max_batch=4, progress=False).load()
    assert again.info.details["built"] == {"encoder": False, "decoder": False}
    np.testing.assert_allclose(again.encode(x, ids_keep), latent, atol=1e-6)
    again.close()


def test_runner_validates_and_enforces_the_profile(installed_trt_fakes, trt_bundle, tmp_path):
    runner = T.TrtRunner(trt_bundle, cache_dir=tmp_path, max_visible="L/4", progress=False)
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(InputError, match="built for 1..4 visible tokens, but this call has 16"):
        runner.encode(x, np.tile(np.arange(16), (2, 1)))
    with pytest.raises(InputError, match="ids_keep row 1 has duplicate index 3"):
        runner.encode(x, np.array([[0, 1], [3, 3]]))
    with pytest.raises(InputError, match="batch mismatch"):
        runner.decode(np.zeros((2, 3, 32), np.float32), np.arange(16)[None])
    with pytest.raises(InputError, match="latent has width 8 but the model's encoder width is 32"):
        runner.decode(np.zeros((1, 3, 8), np.float32), np.arange(16)[None])
    assert runner.info.details["sessions"] == []  # nothing was built for invalid calls
    runner.close()


def test_runner_rebuilds_a_corrupt_cached_engine(installed_trt_fakes, trt_bundle, tmp_path):
    first = T.TrtRunner(trt_bundle, cache_dir=tmp_path, max_batch=2, progress=False)
    path = first.engine("encoder").paths.engine
    path.write_bytes(b"truncated engine")
    second = T.TrtRunner(trt_bundle, cache_dir=tmp_path, max_batch=2, progress=False)
    out = second.encode(np.zeros((1, 3, 32, 32), np.float32), np.array([[0, 5]]))
    assert out.shape == (1, 3, 32) and second.info.details["built"]["encoder"] is True
    assert path.read_bytes().startswith(ENGINE_MAGIC)
    second.close()


def test_runner_on_tensorrt_11_uses_the_fp16_variant(
    monkeypatch, trt_bundle, trt_fp32_only_bundle, ort_reference, tmp_path
):
    cudart = FakeCudart()
    install(monkeypatch, FakeTrt("11.4.0.106", cudart), cudart)
    runner = T.TrtRunner(trt_bundle, precision="fp16", cache_dir=tmp_path, progress=False)
    assert runner.info.details["graphs"] == {"encoder": "encoder.fp16.onnx", "decoder": "decoder.fp16.onnx"}
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.tile(np.arange(16), (2, 1))
    a, b = runner.encode(x, ids).mean(1), ort_reference.encode(x, ids).mean(1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999  # the fp16 graph really ran (float16 inside), close to fp32
    runner.close()
    with pytest.raises(BundleError, match="re-export with `mae-deploy export CHECKPOINT --out DIR --precision fp16`"):
        T.TrtRunner(trt_fp32_only_bundle, precision="fp16", cache_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# build-engine command (fake tensorrt)
# --------------------------------------------------------------------------------------------------


def test_build_engine_command(installed_trt_fakes, trt_bundle_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ["build-engine", str(trt_bundle_dir), "--cache-dir", str(cache), "--max-batch", "4", "--opt-visible", "L/4"]
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "TensorRT 10.13.1 (API 10) on Fake GPU 80GB (sm_90)" in out
    assert "profile: batch 1..4 (opt 4), visible tokens 1..16 (opt 4) of L=16" in out
    assert "encoder (fp32, from encoder.onnx): built in" in out and "decoder (fp32, from decoder.onnx): built in" in out
    assert "ids_keep      min 1x1            opt 4x4            max 4x16" in out
    assert "latent        min 1x2x32         opt 4x5x32         max 4x17x32" in out
    engines = sorted(cache.glob("*.engine"))
    assert len(engines) == 2 and all(str(e) in out for e in engines)
    again = _invoke(args + ["--parts", "encoder"])
    assert again.exit_code == 0 and "encoder (fp32, from encoder.onnx): already cached" in again.output
    assert "decoder (" not in again.output  # --parts encoder: the decoder is neither built nor listed


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--parts", "encoder,head"], "--parts takes encoder and/or decoder"),
        (["--opt-visible", "99"], "visible-token count 99 must be in 1..16"),
        (["--max-batch", "2", "--opt-batch", "4"], r"opt_batch 4 must be in 1..max_batch \(2\)"),
        (["--workspace-gb", "0"], "workspace must be positive"),
    ],
)
def test_build_engine_command_errors(installed_trt_fakes, trt_bundle_dir, tmp_path, extra, message):
    res = _invoke(["build-engine", str(trt_bundle_dir), "--cache-dir", str(tmp_path), *extra])
    assert res.exit_code == 3, res.output
    assert re.search(message, res.output)


# --------------------------------------------------------------------------------------------------
# GPU-path rules: threads, stream handles, cudaSetDevice on every entry point, close() under the locks
# --------------------------------------------------------------------------------------------------


def test_threads_is_refused_with_a_reason(installed_trt_fakes, trt_bundle, tmp_path):
    with pytest.raises(InputError, match="the trt backend has no CPU thread count") as e:
        create_runner(trt_bundle, "trt", device="cuda", threads=2, cache_dir=tmp_path)
    assert e.value.exit_code == 3
    with pytest.raises(InputError, match="no CPU thread count"):
        T.TrtRunner(trt_bundle, threads=1)


class _Stream:
    def __init__(self, handle):
        self.handle = handle

    def __int__(self):
        return self.handle

    def getPtr(self):  # noqa: N802 - cuda-python's name
        raise AssertionError("getPtr() is the address of the handle, never the handle")


def test_stream_handle_prefers_cuda_pythons_native_handle(monkeypatch):
    utils = types.ModuleType("cuda.bindings.utils")
    utils.get_cuda_native_handle = lambda s: (
        s.handle + 1 if isinstance(s, _Stream) else (_ for _ in ()).throw(TypeError("Unknown type"))
    )
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", utils)
    assert T.stream_handle(_Stream(0x5000)) == 0x5001  # the documented getter wins
    assert T.stream_handle(0x7000) == 0x7000  # not a cuda-python type: int() of it
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)  # cuda-python before 12.9: no utils
    assert T.stream_handle(_Stream(0x5000)) == 0x5000


def _run_in_thread(fn):
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_every_entry_point_sets_the_device_on_the_calling_thread(monkeypatch, trt_bundle, tmp_path):
    """The current CUDA device is per thread: a first call from another thread must not build on device 0."""
    cudart = FakeCudart(devices=2)
    trt = FakeTrt("10.13.1", cudart)
    install(monkeypatch, trt, cudart)
    runner = T.TrtRunner(trt_bundle, device="cuda:1", cache_dir=tmp_path, max_batch=2, progress=False)
    _run_in_thread(lambda: runner.engine("encoder"))
    assert trt.build_devices == [1]
    _run_in_thread(lambda: runner.session("decoder"))  # builds the decoder and allocates its buffers
    assert trt.build_devices == [1, 1]
    assert {c[2] for c in cudart.calls if c[0] == "cudaMalloc"} == {1}
    x = np.zeros((1, 3, 32, 32), np.float32)
    out = _run_in_thread(lambda: runner.encode(x, np.array([[0, 5]])))
    assert out.shape == (1, 3, 32) and {c[2] for c in cudart.calls if c[0] == "cudaMalloc"} == {1}
    runner.close()


class _RecordingLock:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def __enter__(self):
        self.log.append(("acquire", self.name))

    def __exit__(self, *exc):
        self.log.append(("release", self.name))


def test_close_takes_each_parts_lock(installed_trt_fakes, trt_bundle, tmp_path):
    runner = T.TrtRunner(trt_bundle, cache_dir=tmp_path, max_batch=2, progress=False).load()
    _, cudart = installed_trt_fakes
    sessions = dict(runner._sessions)
    log = []
    closed = []
    for part, sess in sessions.items():
        original = sess.close
        sess.close = lambda part=part, original=original: (log.append(("close", part)), original())
    runner._locks = {p: _RecordingLock(p, log) for p in runner._locks}
    runner.close()
    assert log == [
        ("acquire", "encoder"),
        ("close", "encoder"),
        ("release", "encoder"),
        ("acquire", "decoder"),
        ("close", "decoder"),
        ("release", "decoder"),
    ]
    assert runner.info.details["sessions"] == [] and cudart.memory == {} and not closed
    runner.close()  # a second close is harmless
