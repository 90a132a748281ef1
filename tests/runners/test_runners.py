"""Runners: ORT and the torch reference agree (features, reconstructions); device and dependency errors."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image
from runtime_fixtures import missing_dependency_output

from mae_deploy import Bundle, FeatureExtractor, Reconstructor, create_runner, random_masking
from mae_deploy.errors import BundleError, DeviceUnavailable, InputError
from mae_deploy.runners import Runner
from mae_deploy.runners.base import BaseRunner, RunnerInfo, run_in_chunks
from mae_deploy.runners.ort import OrtRunner, check_providers
from mae_deploy.runners.trt import OrtTrtSetup, derive_profile, ort_trt_provider_options

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ort_runner(loaded_tiny_bundle):
    return create_runner(loaded_tiny_bundle, "ort", intra_op_threads=1)


@pytest.fixture(scope="module")
def torch_runner(loaded_tiny_bundle):
    return create_runner(loaded_tiny_bundle, "torch")


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    skimage = pytest.importorskip("skimage")
    return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]


def test_runners_implement_the_interface(ort_runner, torch_runner):
    for r in (ort_runner, torch_runner):
        assert isinstance(r, Runner) and r.has_decoder
    assert torch_runner.info.backend == "torch" and torch_runner.info.device == "cpu"


@pytest.mark.parametrize("visible", [1, 5, 16])
def test_encode_decode_agree_for_every_visible_count(ort_runner, torch_runner, visible):
    x = np.random.default_rng(visible).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ids_keep, ids_restore, _ = random_masking(3, 16, 1 - visible / 16, rng=visible)
    assert ids_keep.shape == (3, visible)
    lat_ort, lat_ref = ort_runner.encode(x, ids_keep), torch_runner.encode(x, ids_keep)
    assert lat_ort.shape == (3, visible + 1, 32) and lat_ort.dtype == np.float32
    np.testing.assert_allclose(lat_ort, lat_ref, atol=2e-5)
    pred_ort, pred_ref = ort_runner.decode(lat_ort, ids_restore), torch_runner.decode(lat_ref, ids_restore)
    assert pred_ort.shape == (3, 16, 192)
    np.testing.assert_allclose(pred_ort, pred_ref, atol=2e-5)


@pytest.mark.parametrize("pool", ["cls", "mean", "tokens"])
def test_features_agree(loaded_tiny_bundle, ort_runner, torch_runner, photos, pool):
    ort_fx = FeatureExtractor(loaded_tiny_bundle, pool=pool, batch_size=2, runner=ort_runner)
    ref_fx = FeatureExtractor(loaded_tiny_bundle, pool=pool, runner=torch_runner)
    a, b = ort_fx.extract(photos), ref_fx.extract(photos)
    assert a.shape == ((3, 17, 32) if pool == "tokens" else (3, 32)) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=2e-5)
    # Different photos give different features (the test would pass vacuously on constant output).
    assert np.abs(a[0] - a[1]).max() > 1e-2


def test_feature_pools_and_inputs(loaded_tiny_bundle, ort_runner, photos, tmp_path):
    tokens = FeatureExtractor(loaded_tiny_bundle, pool="tokens", runner=ort_runner).extract(photos)
    cls = FeatureExtractor(loaded_tiny_bundle, pool="cls", runner=ort_runner).extract(photos)
    mean = FeatureExtractor(loaded_tiny_bundle, pool="mean", runner=ort_runner).extract(photos)
    np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-6)
    np.testing.assert_allclose(mean, tokens[:, 1:].mean(1), atol=1e-6)
    # Paths, PIL images, a single array and an (N, H, W, C) stack all give the same features.
    paths = []
    for i, p in enumerate(photos):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    fx = FeatureExtractor(loaded_tiny_bundle, runner=ort_runner, batch_size=1)
    np.testing.assert_allclose(fx.extract(paths), cls, atol=1e-6)
    np.testing.assert_allclose(fx.extract([Image.fromarray(p) for p in photos]), cls, atol=1e-6)
    np.testing.assert_allclose(fx.extract(photos[1]), cls[1:2], atol=1e-6)
    same = np.stack([photos[2][:300, :300]] * 2)
    assert fx.extract(same).shape == (2, 32)
    with pytest.raises(InputError, match="pool must be one of"):
        FeatureExtractor(loaded_tiny_bundle, pool="max", runner=ort_runner)


def test_reconstructions_agree(loaded_tiny_bundle, ort_runner, torch_runner, photos):
    a = Reconstructor(loaded_tiny_bundle, runner=ort_runner).reconstruct(photos, mask_ratio=0.75, seed=3)
    b = Reconstructor(loaded_tiny_bundle, runner=torch_runner).reconstruct(photos, mask_ratio=0.75, seed=3)
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_allclose(ra.pred, rb.pred, atol=2e-5)
        assert np.abs(ra.reconstruction.astype(int) - rb.reconstruction.astype(int)).max() <= 1
        np.testing.assert_array_equal(ra.mask, rb.mask)
        assert ra.mask.sum() == 12 and not ra.norm_pix


def test_norm_pix_reconstructions_agree_and_say_so(norm_pix_bundle, photos):
    b = Bundle.load(norm_pix_bundle)
    assert b.norm_pix_loss
    with create_runner(b, "ort", intra_op_threads=1) as o, create_runner(b, "torch") as t:
        ra = Reconstructor(b, runner=o).reconstruct(photos[:2], seed=0)
        rb = Reconstructor(b, runner=t).reconstruct(photos[:2], seed=0)
    assert ra[0].norm_pix and "norm-pix" in ra[0].title()
    np.testing.assert_allclose(ra[0].pred, rb[0].pred, atol=2e-5)
    assert np.abs(ra[1].reconstruction.astype(int) - rb[1].reconstruction.astype(int)).max() <= 1


def test_ort_reports_the_providers_it_really_uses(loaded_tiny_bundle):
    r = OrtRunner(loaded_tiny_bundle, intra_op_threads=1)
    assert r.info.providers == ()  # no session yet: nothing is claimed
    r.load(("encoder",))
    assert r.info.providers == ("CPUExecutionProvider",)
    assert r.info.details["sessions"] == ["encoder"]  # the decoder is created only when needed
    assert r.info.details["graphs"] == {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}


def test_ort_io_binding_path_gives_the_same_result(loaded_tiny_bundle, ort_runner):
    bound = OrtRunner(loaded_tiny_bundle, intra_op_threads=1, io_binding=True, graph_optimization="basic")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids_keep, ids_restore, _ = random_masking(2, 16, 0.5, rng=0)
    np.testing.assert_allclose(bound.encode(x, ids_keep), ort_runner.encode(x, ids_keep), atol=1e-5)
    lat = ort_runner.encode(x, ids_keep)
    np.testing.assert_allclose(bound.decode(lat, ids_restore), ort_runner.decode(lat, ids_restore), atol=1e-5)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "tensorrt"])
def test_gpu_request_without_a_gpu_provider_is_an_error(loaded_tiny_bundle, device):
    with pytest.raises(DeviceUnavailable, match=f"has no .*ExecutionProvider .*--device {device} cannot run"):
        OrtRunner(loaded_tiny_bundle, device=device)


def test_silent_fallback_is_detected():
    with pytest.raises(
        DeviceUnavailable, match="asked for CUDAExecutionProvider, but ONNX Runtime fell back to CPUExecutionProvider"
    ):
        check_providers("cuda", "CUDAExecutionProvider", ["CPUExecutionProvider"], session=True)
    check_providers("cuda", "CUDAExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"], session=True)


def test_a_fallback_names_the_cuda_libraries_that_cannot_load():
    from mae_deploy.runners.ort import cuda_libraries, unloadable_libraries

    assert cuda_libraries("13") == [
        "libcudart.so.13",
        "libcublas.so.13",
        "libcublasLt.so.13",
        "libcufft.so.12",
        "libcudnn.so.9",
    ]
    assert cuda_libraries("12")[3] == "libcufft.so.11"
    assert unloadable_libraries(["libc.so.6", "libmae-deploy-nonexistent.so.1"]) == ["libmae-deploy-nonexistent.so.1"]
    with pytest.raises(DeviceUnavailable, match="cannot be loaded: libcudnn.so.9; .*LD_LIBRARY_PATH"):
        check_providers(
            "cuda", "CUDAExecutionProvider", ["CPUExecutionProvider"], session=True, missing_libraries=["libcudnn.so.9"]
        )
    with pytest.raises(DeviceUnavailable, match="log says which"):
        check_providers("cuda", "CUDAExecutionProvider", ["CPUExecutionProvider"], session=True, missing_libraries=[])


def test_tensorrt_ep_profile_covers_batch_and_visible_tokens(tmp_path):
    # What OrtRunner hands ONNX Runtime's TensorRT EP (built by the trt module, one definition).
    profile = derive_profile(196, 224, 3, max_batch=64, opt_batch=8, opt_visible=49, embed_dim=768)
    enc = ort_trt_provider_options(profile, tmp_path, fp16=False, part="encoder")
    assert enc["trt_profile_min_shapes"] == "pixel_values:1x3x224x224,ids_keep:1x1"
    assert enc["trt_profile_opt_shapes"] == "pixel_values:8x3x224x224,ids_keep:8x49"
    assert enc["trt_profile_max_shapes"] == "pixel_values:64x3x224x224,ids_keep:64x196"
    dec = ort_trt_provider_options(profile, tmp_path, fp16=True, part="decoder")
    assert dec["trt_profile_min_shapes"] == "latent:1x2x768,ids_restore:1x196"
    assert dec["trt_profile_max_shapes"] == "latent:64x197x768,ids_restore:64x196"
    assert dec["trt_fp16_enable"] is True and dec["trt_engine_cache_path"] == str(tmp_path)
    with pytest.raises(InputError, match="opt_batch"):
        derive_profile(196, 224, 3, max_batch=64, opt_batch=65, opt_visible=49, embed_dim=768)


def test_runner_options_are_checked(loaded_tiny_bundle):
    with pytest.raises(InputError, match="unknown backend 'onnx'; choose one of: ort, trt, torch, openvino"):
        create_runner(loaded_tiny_bundle, "onnx")
    with pytest.raises(InputError, match="unknown ort device 'gpu'"):
        OrtRunner(loaded_tiny_bundle, device="gpu")
    with pytest.raises(InputError, match="graph_optimization must be one of"):
        OrtRunner(loaded_tiny_bundle, graph_optimization="max")
    with pytest.raises(BundleError, match="no encoder graph at precision int8; it has: encoder fp32, decoder fp32"):
        OrtRunner(loaded_tiny_bundle, precision="int8")
    with pytest.raises(InputError, match="intra_op_threads must be a positive integer, got 0"):
        OrtRunner(loaded_tiny_bundle, intra_op_threads=0)
    with pytest.raises(InputError, match="threads=2 and intra_op_threads=3 disagree"):
        OrtRunner(loaded_tiny_bundle, threads=2, intra_op_threads=3)
    with pytest.raises(InputError, match="the ort backend has no option max_batch; it takes: .*intra_op_threads"):
        create_runner(loaded_tiny_bundle, "ort", max_batch=4)


def test_trt_backend_is_dispatched_lazily(loaded_tiny_bundle, monkeypatch):
    calls = []

    class FakeTrtRunner:
        def __init__(self, b, device, precision, **opts):
            calls.append((b, device, precision, opts))

    monkeypatch.setitem(sys.modules, "mae_deploy.runners.trt", types.SimpleNamespace(TrtRunner=FakeTrtRunner))
    r = create_runner(loaded_tiny_bundle, "trt", device="cuda:1", precision="fp16", max_batch=32)
    assert isinstance(r, FakeTrtRunner)
    assert calls == [
        (loaded_tiny_bundle, "cuda:1", "fp16", {"threads": None, "max_batch": 32})
    ]  # threads goes to every backend


def test_runners_validate_before_running(ort_runner, torch_runner):
    x = np.zeros((2, 3, 32, 32), np.float32)
    for r in (ort_runner, torch_runner):
        with pytest.raises(InputError, match="ids_keep row 1 has duplicate index 3"):
            r.encode(x, np.array([[0, 1], [3, 3]]))
        with pytest.raises(InputError, match="ids_keep row 0 has index 16 out of range"):
            r.encode(x, np.array([[16], [0]]))
        with pytest.raises(InputError, match="pixel_values must have rank 4"):
            r.encode(x[0], np.array([[0]]))
        with pytest.raises(InputError, match="batch mismatch"):
            r.decode(np.zeros((2, 3, 32), np.float32), np.arange(16)[None])


def test_encoder_only_bundle(encoder_only_bundle, photos):
    b = Bundle.load(encoder_only_bundle)
    with FeatureExtractor(b, intra_op_threads=1) as fx:
        assert fx.extract(photos[:1]).shape == (1, 32)
        assert not fx.runner.has_decoder
        with pytest.raises(BundleError, match="has no decoder"):
            fx.runner.decode(np.zeros((1, 2, 32), np.float32), np.arange(16)[None])
    with pytest.raises(BundleError, match="has no decoder .*reconstruction needs one"):
        Reconstructor(b)


def test_torch_runner_options(loaded_tiny_bundle, tmp_path, torch_runner):
    with pytest.raises(DeviceUnavailable, match="PyTorch sees no CUDA device"):
        create_runner(loaded_tiny_bundle, "torch", device="cuda")
    with pytest.raises(InputError, match="fp16 autocast needs --device cuda"):
        create_runner(loaded_tiny_bundle, "torch", precision="fp16")
    # bf16 autocast: close to fp32 but not identical (it really runs in bf16).
    bf16 = create_runner(loaded_tiny_bundle, "torch", precision="bf16")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.tile(np.arange(16), (2, 1))
    a, b = bf16.encode(x, ids), torch_runner.encode(x, ids)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99 and np.abs(a - b).max() > 1e-4
    # A checkpoint of another architecture is refused.
    from training.checkpoints import save_native
    from training.model import create_model

    save_native(create_model("mae_vit_tiny_patch4"), tmp_path / "other")
    with pytest.raises(BundleError, match="does not match bundle .*patch_size 4 vs 8"):
        create_runner(loaded_tiny_bundle, "torch", checkpoint=tmp_path / "other")


def test_missing_onnxruntime_says_what_to_install(tiny_bundle):
    out = missing_dependency_output(tiny_bundle, "onnxruntime", "ort")
    assert out.startswith("6 ") and "pip install 'mae-deploy[cpu]'" in out


# --------------------------------------------------------------------------------------------------
# threads: one option for every backend
# --------------------------------------------------------------------------------------------------


def test_threads_reach_every_cpu_backend(loaded_tiny_bundle):
    import torch

    before = torch.get_num_threads()
    try:
        with create_runner(loaded_tiny_bundle, "ort", threads=1) as r:
            assert r.info.details["intra_op_threads"] == 1
        with create_runner(
            loaded_tiny_bundle, "ort", intra_op_threads=1, threads=1
        ) as r:  # the same count twice is fine
            assert r.info.details["intra_op_threads"] == 1
        with create_runner(loaded_tiny_bundle, "torch", threads=1) as r:
            assert r.info.details["threads"] == 1 == torch.get_num_threads()
        with create_runner(loaded_tiny_bundle, "openvino", threads=1) as r:
            r.load(("encoder",))
            assert r.info.details["compiled"]["encoder"]["INFERENCE_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [0, -2, "2", 1.5, True])
def test_bad_thread_counts_are_input_errors(loaded_tiny_bundle, threads):
    for backend in ("ort", "torch", "openvino", "trt"):
        with pytest.raises(InputError, match=f"threads must be a positive integer, got {threads!r}"):
            create_runner(loaded_tiny_bundle, backend, threads=threads)


def test_trt_refuses_threads_before_needing_tensorrt(loaded_tiny_bundle):
    """--backend trt --threads N is exit 3 with a reason (it was a TypeError), even where TensorRT is absent."""
    with pytest.raises(
        InputError, match="the trt backend has no CPU thread count .*threads=4 cannot apply; drop --threads"
    ) as e:
        create_runner(loaded_tiny_bundle, "trt", device="cuda", threads=4)
    assert e.value.exit_code == 3
    # What the reconstruct/extract commands pass for a non-ort backend reaches the same check.
    with pytest.raises(InputError, match="no CPU thread count"):
        create_runner(loaded_tiny_bundle, "trt", device="cuda", **{"threads": 2})


@pytest.mark.parametrize("command", ["reconstruct", "extract"])
def test_cli_trt_with_threads_is_exit_3(tiny_bundle, tmp_path, command):
    from click.testing import CliRunner

    from mae_deploy.cli import main

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    args = {
        "reconstruct": ["reconstruct", str(img), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "o")],
        "extract": ["extract", str(tmp_path), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "f")],
    }[command]
    res = CliRunner().invoke(main, [*args, "--backend", "trt", "--device", "cuda", "--threads", "2"])
    assert res.exit_code == 3, res.output
    assert "no CPU thread count" in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------------------------------------
# BaseRunner: validation, parts, load() and the context manager, once for every backend
# --------------------------------------------------------------------------------------------------


class EchoRunner(BaseRunner):
    """A backend of a few lines: what BaseRunner leaves to a backend, recorded."""

    def __init__(self, bundle, decoder: bool = True):
        self.bundle = bundle
        self._specs = {"encoder": "enc", "decoder": "dec" if decoder else None}
        self.calls, self.loaded, self.closed = [], [], 0

    def _encode(self, x, ids):
        self.calls.append(("encode", x.dtype, ids.dtype, x.flags.c_contiguous))
        return np.zeros((x.shape[0], ids.shape[1] + 1, self.bundle.embed_dim), np.float32)

    def _decode(self, latent, ids):
        self.calls.append(("decode", latent.dtype, ids.dtype, latent.flags.c_contiguous))
        return np.zeros((latent.shape[0], ids.shape[1], self.bundle.patch_dim), np.float32)

    def _load(self, part):
        self.loaded.append(part)

    def close(self):
        self.closed += 1

    info = RunnerInfo("echo", "cpu", "fp32")


def test_base_runner_validates_and_converts_once(loaded_tiny_bundle):
    r = EchoRunner(loaded_tiny_bundle)
    assert isinstance(r, Runner) and r.has_decoder
    x = np.zeros((2, 3, 32, 32), np.float64)[..., ::-1]  # float64, not contiguous: converted for the backend
    assert r.encode(x, np.array([[0, 1], [2, 3]], np.int32)).shape == (2, 3, 32)
    assert r.calls == [("encode", np.float32, np.int64, True)]
    r.decode(np.zeros((2, 3, 32), np.float32), np.tile(np.arange(16), (2, 1)))
    assert r.calls[-1] == ("decode", np.float32, np.int64, True)
    with pytest.raises(InputError, match="ids_keep row 1 has duplicate index 3"):
        r.encode(x, np.array([[0, 1], [3, 3]]))
    with pytest.raises(InputError, match="ids_restore"):
        r.decode(np.zeros((2, 3, 32), np.float32), np.zeros((2, 16), np.int64))
    assert len(r.calls) == 2  # invalid calls never reach the backend


def test_base_runner_parts_load_and_context(loaded_tiny_bundle):
    r = EchoRunner(loaded_tiny_bundle, decoder=False)
    assert not r.has_decoder and r.load() is r and r.loaded == ["encoder"]  # only the parts it has
    with pytest.raises(BundleError, match="has no decoder"):
        r.decode(np.zeros((1, 2, 32), np.float32), np.arange(16)[None])
    with pytest.raises(InputError, match="unknown part 'head'"):
        r.load(("head",))
    r._specs["classifier"] = "cls"  # a backend's extra graph (ORT's classifier) loads like the others
    assert r.load(("classifier",)).loaded == ["encoder", "classifier"]
    with r as same:
        assert same is r
    assert r.closed == 1


def test_every_backend_is_a_base_runner():
    from mae_deploy.runners.openvino import OpenVinoRunner
    from mae_deploy.runners.torch_runner import TorchRunner
    from mae_deploy.runners.trt import TrtRunner

    for cls in (OrtRunner, TorchRunner, TrtRunner, OpenVinoRunner):
        assert issubclass(cls, BaseRunner)
        assert "encode" not in vars(cls) and "decode" not in vars(cls) and "__enter__" not in vars(cls)


def test_run_in_chunks_splits_only_above_the_step():
    seen = []

    def run(feeds):
        seen.append(feeds["a"].shape[0])
        return feeds["a"] * 2

    a = np.arange(7)[:, None]
    np.testing.assert_array_equal(run_in_chunks(run, {"a": a}, 3), a * 2)
    assert seen == [3, 3, 1]
    run_in_chunks(run, {"a": a[:3]}, 3)
    assert seen[-1] == 3 and len(seen) == 4


def test_ort_tensorrt_provider_splits_batches_above_its_profile(loaded_tiny_bundle, ort_runner, tmp_path):
    """ORT's TensorRT provider gets TrtRunner's chunking (checked here on the CPU provider)."""
    r = OrtRunner(loaded_tiny_bundle, threads=1)
    r.trt = OrtTrtSetup.for_bundle(loaded_tiny_bundle, "fp32", max_batch=2, cache_root=tmp_path, detect=lambda: None)
    batches = []
    original = r._run_once
    r._run_once = lambda part, feeds, out=None: (
        batches.append(len(feeds["pixel_values" if part == "encoder" else "latent"])) or original(part, feeds, out)
    )
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    ids_keep, ids_restore, _ = random_masking(5, 16, 0.75, rng=0)
    np.testing.assert_allclose(r.encode(x, ids_keep), ort_runner.encode(x, ids_keep), atol=1e-5)
    assert batches == [2, 2, 1]
