"""The OpenVINO backend: parity with ONNX Runtime on the test bundle, precisions, options and errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import types
import warnings

import numpy as np
import pytest
from PIL import Image
from runtime_fixtures import missing_dependency_output

from mae_deploy import Bundle, FeatureExtractor, Reconstructor, create_runner, random_masking
from mae_deploy.errors import BundleError, DeviceUnavailable, InputError
from mae_deploy.runners import Runner
from mae_deploy.runners import openvino as ovr

ov = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def ort(loaded_tiny_bundle):
    with create_runner(loaded_tiny_bundle, "ort", threads=1) as r:
        yield r


@pytest.fixture(scope="module")
def ovino(loaded_tiny_bundle):
    with create_runner(loaded_tiny_bundle, "openvino", threads=1) as r:
        yield r


def _pooled_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.mean(1), b.mean(1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


@pytest.mark.parametrize("visible", [1, 4, 16])
@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_matches_onnxruntime_for_any_batch_and_visible_count(ort, ovino, batch, visible):
    """One compiled model serves every batch and visible count (both dims dynamic), within 1e-4 of ORT."""
    x = np.random.default_rng(visible).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    ids_keep, ids_restore, _ = random_masking(batch, 16, 1 - visible / 16, rng=batch)
    lat_ov, lat_ort = ovino.encode(x, ids_keep), ort.encode(x, ids_keep)
    assert lat_ov.shape == (batch, visible + 1, 32) and lat_ov.dtype == np.float32
    np.testing.assert_allclose(lat_ov, lat_ort, rtol=0, atol=1e-4)
    pred_ov, pred_ort = ovino.decode(lat_ort, ids_restore), ort.decode(lat_ort, ids_restore)
    assert pred_ov.shape == (batch, 16, 192)
    np.testing.assert_allclose(pred_ov, pred_ort, rtol=0, atol=1e-4)
    assert np.abs(lat_ov).max() > 0.1  # not vacuous


def test_outputs_are_copies_not_views_of_the_request(ovino):
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.tile(np.arange(16), (2, 1))
    first = ovino.encode(x, ids)
    kept = first.copy()
    ovino.encode(-x, ids)  # the next call overwrites the request's output tensor
    np.testing.assert_array_equal(first, kept)


def test_pipelines_run_on_openvino(loaded_tiny_bundle, ort):
    skimage = pytest.importorskip("skimage")
    photos = [skimage.data.astronaut(), skimage.data.coffee()]
    with FeatureExtractor(loaded_tiny_bundle, backend="openvino", pool="mean", threads=1) as fx:
        a = fx.extract(photos)
    b = FeatureExtractor(loaded_tiny_bundle, pool="mean", runner=ort).extract(photos)
    np.testing.assert_allclose(a, b, atol=1e-4)
    with Reconstructor(loaded_tiny_bundle, backend="openvino", threads=1) as rec:
        ra = rec.reconstruct(photos[:1], mask_ratio=0.75, seed=3)[0]
    rb = Reconstructor(loaded_tiny_bundle, runner=ort).reconstruct(photos[:1], mask_ratio=0.75, seed=3)[0]
    np.testing.assert_allclose(ra.pred, rb.pred, atol=1e-4)
    np.testing.assert_array_equal(ra.mask, rb.mask)


def test_info_reports_what_openvino_compiled(loaded_tiny_bundle):
    r = create_runner(loaded_tiny_bundle, "openvino", threads=1, hint="throughput")
    assert isinstance(r, Runner) and r.has_decoder
    assert r.info.details["sessions"] == []  # compiled lazily
    r.load(("encoder",))
    info = r.info
    assert info.backend == "openvino" and info.device == "cpu" and info.precision == "fp32"
    assert info.providers == ("openvino:CPU",) and info.details["sessions"] == ["encoder"]
    compiled = info.details["compiled"]["encoder"]
    assert compiled["INFERENCE_NUM_THREADS"] == "1" and compiled["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert compiled["INFERENCE_PRECISION_HINT"] == "f32"  # fp32 said explicitly (bf16 CPUs default to bf16)
    assert info.details["graphs"] == {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
    r.close()
    assert r.info.details["sessions"] == []


def test_compile_runs_each_shape_on_its_own_static_model(loaded_tiny_bundle, monkeypatch):
    monkeypatch.setattr(ovr, "STATIC_SHAPES_KEPT", 2)
    x = np.random.default_rng(4).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with (
        create_runner(loaded_tiny_bundle, "openvino", threads=1) as dynamic,
        create_runner(loaded_tiny_bundle, "openvino", threads=1, compile=True) as compiled,
    ):
        for b, k in ((2, 16), (3, 4), (2, 16), (1, 8)):
            ids = np.stack([np.random.default_rng(i).permutation(16)[:k] for i in range(b)])
            np.testing.assert_allclose(compiled.encode(x[:b], ids), dynamic.encode(x[:b], ids), atol=1e-5)
        details = compiled.info.details
        assert details["compile"] is True and dynamic.info.details["static_shapes"] == []
        assert details["sessions"] == []  # the dynamic model was never compiled beside the static ones
        # Least recently used first; (3, 4) was the oldest when (1, 8) came, so it went.
        assert [(s["part"], s["ids_keep"]) for s in details["static_shapes"]] == [
            ("encoder", [2, 16]),
            ("encoder", [1, 8]),
        ]
        assert details["static_shapes"][0]["pixel_values"] == [2, 3, 32, 32]
        compiled.close()
        assert compiled.info.details["static_shapes"] == []


def test_concurrent_calls_on_one_runner_agree(ovino, ort):
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    ids = np.tile(np.arange(16), (2, 1))
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = ovino.encode(xs[i], ids)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i], ort.encode(x, ids), atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Precisions
# --------------------------------------------------------------------------------------------------


def test_bf16_runs_where_the_cpu_has_it_and_is_exit_7_where_not(loaded_tiny_bundle, ort):
    """Both outcomes are checked: bf16 close to fp32 on a bf16 CPU, a clear exit 7 elsewhere."""
    core = ov.Core()
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.tile(np.arange(16), (2, 1))
    if ovr.cpu_supports_bf16(core):
        with create_runner(loaded_tiny_bundle, "openvino", precision="bf16", threads=1) as r:
            a = r.encode(x, ids)
            assert r.info.details["compiled"]["encoder"]["INFERENCE_PRECISION_HINT"] == "bf16"
        b = ort.encode(x, ids)
        assert _pooled_cosine(a, b) > 0.99 and np.abs(a - b).max() > 1e-5  # really bf16, still close
    else:
        with pytest.raises(
            DeviceUnavailable, match="bf16 on openvino needs a CPU with bf16 instructions .*use --precision fp32"
        ) as e:
            create_runner(loaded_tiny_bundle, "openvino", precision="bf16")
        assert e.value.exit_code == 7
        assert "FP32" in str(e.value)  # names what the CPU does offer


def test_bf16_maps_to_the_inference_precision_hint(loaded_tiny_bundle, monkeypatch):
    monkeypatch.setattr(ovr, "cpu_supports_bf16", lambda core: True)
    r = ovr.OpenVinoRunner(loaded_tiny_bundle, precision="bf16", threads=2, hint="latency", num_streams=1)
    assert r.config == {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16",
        "INFERENCE_NUM_THREADS": "2",
        "NUM_STREAMS": "1",
    }
    assert r.info.details["graphs"]["encoder"] == "encoder.onnx"  # bf16 is a hint on the fp32 graph


@pytest.mark.parametrize("precision", ["int8", "int8-nncf", "int8-qdq"])
def test_int8_runs_its_float_ops_in_bf16_only_where_the_cpu_has_bf16(precision):
    assert ovr.compile_config(precision, 2, "latency", None, bf16_cpu=True)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert ovr.compile_config(precision, 2, "latency", None, bf16_cpu=False)["INFERENCE_PRECISION_HINT"] == "f32"
    # fp32 stays f32 on any CPU; bf16 is bf16 (refused earlier where the CPU lacks it).
    assert ovr.inference_precision("fp32", bf16_cpu=True) == "f32"
    assert ovr.inference_precision("bf16", bf16_cpu=False) == "bf16"


def test_cpu_supports_bf16_reads_the_optimization_capabilities():
    def core(*caps):
        return types.SimpleNamespace(get_property=lambda dev, key: list(caps))

    assert ovr.cpu_supports_bf16(core("FP32", "BF16", "INT8"))
    assert not ovr.cpu_supports_bf16(core("FP32", "INT8", "BIN", "EXPORT_IMPORT"))


def _stub_bundle(**precisions):
    return types.SimpleNamespace(path="B", precisions=lambda part: precisions.get(part, []))


def test_int8_uses_the_qdq_graph_and_explains_when_there_is_none(loaded_tiny_bundle):
    assert ovr.graph_precision(_stub_bundle(encoder=["fp32", "int8", "int8-qdq"]), "encoder", "int8") == "int8-qdq"
    # A decoder without a Q/DQ variant runs fp32, as ORT does for a missing decoder precision.
    assert (
        ovr.graph_precision(_stub_bundle(encoder=["fp32", "int8-qdq"], decoder=["fp32"]), "decoder", "int8") == "fp32"
    )
    assert ovr.graph_precision(_stub_bundle(encoder=["fp32"]), "decoder", "int8") is None  # no decoder at all
    assert ovr.graph_precision(_stub_bundle(encoder=["fp32", "int8"]), "encoder", "bf16") == "fp32"
    with pytest.raises(
        InputError,
        match=r"has no encoder graph at int8-qdq \(it has: fp32, int8; its int8 is "
        r"ONNX Runtime dynamic quantisation.*--precision int8-qdq --calibration",
    ):
        ovr.graph_precision(_stub_bundle(encoder=["fp32", "int8"]), "encoder", "int8")
    with pytest.raises(InputError, match="has no encoder graph at int8-qdq") as e:
        create_runner(loaded_tiny_bundle, "openvino", precision="int8")
    assert e.value.exit_code == 3


# --------------------------------------------------------------------------------------------------
# Options and errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"device": "cuda"}, "the openvino backend runs on cpu, not 'cuda'"),
        ({"precision": "fp16"}, "runs fp32, bf16, int8, not 'fp16'"),
        ({"hint": "fast"}, r"hint must be one of \['latency', 'throughput'\]"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"num_streams": -1}, "num_streams must be a positive integer"),
        ({"max_batch": 4}, "the openvino backend has no option max_batch"),
    ],
)
def test_bad_options_are_input_errors(loaded_tiny_bundle, kwargs, message):
    with pytest.raises(InputError, match=message):
        create_runner(loaded_tiny_bundle, "openvino", **kwargs)


def test_validation_and_encoder_only_bundle(ovino, encoder_only_bundle):
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(InputError, match="ids_keep row 1 has duplicate index 3"):
        ovino.encode(x, np.array([[0, 1], [3, 3]]))
    with pytest.raises(InputError, match="batch mismatch"):
        ovino.decode(np.zeros((2, 3, 32), np.float32), np.arange(16)[None])
    with create_runner(encoder_only_bundle, "openvino") as r:
        assert not r.has_decoder and r.encode(x, np.tile(np.arange(16), (2, 1))).shape == (2, 17, 32)
        with pytest.raises(BundleError, match="has no decoder"):
            r.decode(np.zeros((1, 2, 32), np.float32), np.arange(16)[None])


def test_a_corrupt_graph_is_a_bundle_error(tiny_bundle, tmp_path):
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    (dst / "encoder.onnx").write_bytes(b"not an onnx file")
    # In a fresh process: in the full suite (after many OpenVINO models in one process) OpenVINO's reader
    # crashed the whole pytest process on this file; alone it raises. Unresolved: see the session note.
    code = (
        "from mae_deploy import create_runner\nfrom mae_deploy.bundle import Bundle\n"
        "from mae_deploy.errors import BundleError\n"
        f"r = create_runner(Bundle.load({str(dst)!r}, verify=False), 'openvino')\n"
        "try:\n    r.load()\nexcept BundleError as e:\n    print('BundleError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("BundleError") and "OpenVINO cannot read" in out.stdout
    assert "encoder.onnx" in out.stdout


def test_missing_openvino_says_what_to_install(tiny_bundle):
    out = missing_dependency_output(tiny_bundle, "openvino", "openvino")
    assert out.startswith("6 ") and "pip install 'mae-deploy[openvino]'" in out


def test_openvino_module_imports_neither_openvino_nor_torch():
    code = "import sys, mae_deploy.runners.openvino\nprint([m for m in ('openvino', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reconstruct_command_takes_backend_openvino(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from mae_deploy.cli import main

    img = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)).save(img)
    res = CliRunner().invoke(
        main,
        [
            "reconstruct",
            str(img),
            "--bundle",
            str(tiny_bundle),
            "--out",
            str(tmp_path / "out"),
            "--backend",
            "openvino",
            "--threads",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "on openvino/cpu [openvino:CPU], fp32" in res.output and (tmp_path / "out" / "a.png").is_file()


def test_extract_with_compile_on_openvino_gives_the_same_features(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from mae_deploy import open_features
    from mae_deploy.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):  # batch 2: shapes (2, ...) and the last (1, ...) each get their own compiled model
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    common = ["--bundle", str(tiny_bundle), "--backend", "openvino", "--threads", "1", "--batch-size", "2"]
    for name, extra in (("dynamic", []), ("compiled", ["--compile"])):
        args = ["extract", str(images), "--out", str(tmp_path / name), "--workers", "0", "--no-progress", *common]
        res = CliRunner().invoke(main, [*args, *extra])
        assert res.exit_code == 0, res.output
    np.testing.assert_allclose(
        np.asarray(open_features(tmp_path / "compiled")), np.asarray(open_features(tmp_path / "dynamic")), atol=1e-5
    )


# --------------------------------------------------------------------------------------------------
# int8 end to end: a bundle exported with the Q/DQ variant
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qdq_bundle(tmp_path_factory) -> Bundle:
    """The test model exported by the real exporter with the statically calibrated Q/DQ variant."""
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    root = tmp_path_factory.mktemp("qdq")
    rng = np.random.default_rng(0)
    (root / "calib").mkdir()
    for i in range(8):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(root / "calib" / f"{i}.png")
    torch.manual_seed(0)
    export_bundle(
        create_model("mae_vit_test").eval(),
        root / "bundle",
        precisions=("fp32", "int8-qdq"),
        calibration=root / "calib",
        calibration_count=8,
        verify=False,
        progress=None,
    )
    return Bundle.load(root / "bundle")


@pytest.mark.parametrize(
    ("shown", "slower"),
    [
        ({"avx2"}, True),
        ({"avx2", "avx_vnni"}, False),
        ({"avx2", "avx512f", "avx512_vnni"}, False),
        ({"avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"}, False),
        (set(), False),  # not even AVX2: nothing measured, nothing said
    ],
)
def test_int8_slower_than_fp32_only_on_avx2_alone(monkeypatch, shown, slower):
    monkeypatch.setattr(ovr, "visible_flags", lambda: frozenset(shown))
    assert ovr.int8_slower_than_fp32() is slower
    monkeypatch.setattr(ovr, "visible_flags", lambda: None)  # cpuid unreadable: no claim either way
    assert not ovr.int8_slower_than_fp32()


def test_int8_on_an_avx2_cpu_warns_and_points_to_ort(qdq_bundle, monkeypatch):
    monkeypatch.setattr(ovr, "visible_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(RuntimeWarning, match="slower than openvino fp32.*--backend ort --precision int8"):
        create_runner(qdq_bundle, "openvino", precision="int8", threads=1).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 on the same CPU: nothing to say
        create_runner(qdq_bundle, "openvino", precision="fp32", threads=1).close()


def test_int8_runs_the_qdq_graph_close_to_fp32(qdq_bundle):
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ids = np.tile(np.arange(16), (3, 1))
    with (
        create_runner(qdq_bundle, "openvino", precision="int8", threads=1) as q,
        create_runner(qdq_bundle, "openvino", threads=1) as f,
    ):
        a, b = q.encode(x, ids), f.encode(x, ids)
        graphs = q.info.details["graphs"]
    assert graphs["encoder"] == qdq_bundle.graph("encoder", "int8-qdq").file != "encoder.onnx"
    assert _pooled_cosine(a, b) > 0.98 and np.abs(a - b).max() > 1e-4  # quantised, still close
