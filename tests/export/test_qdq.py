"""The statically calibrated Q/DQ int8 variant (issue #14 item 2): what it quantises, what it leaves float,
how mae.json lists it and how a runner finds it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from export.calibration import load_calibration, part_feeds
from export.verify import ort_session
from mae_deploy.bundle import Bundle
from mae_deploy.cli import main
from mae_deploy.errors import BundleError, InputError
from mae_deploy.names import INT8_QDQ
from training.checkpoints import save_native
from training.model import create_model

COUNT = 12


def _model():
    torch.manual_seed(0)
    m = create_model("mae_vit_test").eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    """Smooth colour images of different sizes (what a photo looks like to a 32 px model), and one broken file."""
    d = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(COUNT + 4):
        h, w = rng.integers(24, 80, size=2)
        base = rng.random((4, 4, 3)) * 255
        im = Image.fromarray(base.astype(np.uint8)).resize((int(w), int(h)), Image.BICUBIC)
        im.save(d / f"img{i:02d}.png")
    (d / "zz_broken.jpg").write_bytes(b"not a jpeg")  # sorts last: never an evenly spaced pick
    return d


@pytest.fixture(scope="module")
def qdq_bundle(calib_dir, tmp_path_factory) -> tuple[Path, str]:
    ckpt = tmp_path_factory.mktemp("ckpt") / "native"
    save_native(_model(), ckpt)
    out = tmp_path_factory.mktemp("bundles") / "b"
    r = CliRunner().invoke(
        main,
        [
            "export",
            str(ckpt),
            "--out",
            str(out),
            "--precision",
            "int8,int8-qdq",
            "--calibration",
            str(calib_dir),
            "--calibration-count",
            str(COUNT),
        ],
    )
    assert r.exit_code == 0, r.output
    return out, r.output


def _producers(g: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in g.node for o in n.output}


def test_qdq_graph_quantises_weight_matmuls_only(qdq_bundle):
    out, _ = qdq_bundle
    g = onnx.load(str(out / "encoder.int8-qdq.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul"} & set(ops)  # explicit Q/DQ only
    assert {"LayerNormalization", "Softmax"} <= set(ops)
    prod = _producers(g)
    inits = {t.name: t for t in g.initializer}
    quantised, float_matmuls = 0, 0
    for n in g.node:
        if n.op_type != "MatMul":
            continue
        src = [prod.get(i) for i in n.input]
        if all(p is not None and p.op_type == "DequantizeLinear" for p in src):
            quantised += 1
            w_dq = src[1]
            assert w_dq.input[0] in inits and inits[w_dq.input[0]].data_type == onnx.TensorProto.INT8
            scale = inits[w_dq.input[1]]
            assert len(scale.dims) == 1 and scale.dims[0] > 1  # per output channel
            zero = onnx.numpy_helper.to_array(inits[w_dq.input[2]]) if len(w_dq.input) > 2 else np.zeros(1)
            assert not zero.any()  # symmetric: what TensorRT requires
        else:
            float_matmuls += 1
    assert quantised == 12  # q, k, v, proj, fc1, fc2 x 2 blocks
    assert float_matmuls == 4  # q @ k^T and attn @ v x 2 blocks stay float
    for n in g.node:  # LayerNorm and Softmax read float tensors, not dequantised int8 ones straight away
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert n.input[0] in {v for v in prod} or n.input[0] in {i.name for i in g.input}


def test_qdq_variant_listed_verified_and_found_by_runners(qdq_bundle, calib_dir):
    out, text = qdq_bundle
    b = Bundle.load(out)
    for part in ("encoder", "decoder"):
        g = b.graph(part, INT8_QDQ)
        assert g.file == f"{part}.{INT8_QDQ}.onnx" and g.parity["passed"]
        assert b.int8_graph(part, qdq=True) == g
        assert b.int8_graph(part, qdq=False).precision == "int8"  # ORT CPU keeps the dynamic graph
    q = b.manifest["graphs"][[x["precision"] for x in b.manifest["graphs"]].index(INT8_QDQ)]["quantization"]
    assert q["method"] == "static" and q["format"] == "qdq"
    assert q["calibration"]["images"] == COUNT and q["calibration"]["source"] == str(calib_dir)
    assert b.graph("encoder", INT8_QDQ).parity["min_feature_cosine"] >= 0.99
    assert "encoder.int8-qdq.onnx" in text and "calibration: 12 images" in text
    # Given images, the dynamic int8 variant is judged on them too, not on noise.
    for part in ("encoder", "decoder"):
        assert b.graph(part, INT8_QDQ).parity["inputs"] == "calibration images"
        assert b.graph(part, "int8").parity["inputs"] == "calibration images"


def test_without_images_int8_is_judged_on_noise(tmp_path):
    from export.bundle_writer import export_bundle

    b = export_bundle(_model(), tmp_path / "b", precisions="int8", parts="encoder", progress=None).bundle
    parity = Bundle.load(b).graph("encoder", "int8").parity
    assert parity["passed"] and "inputs" not in parity


def test_qdq_encoder_serves_any_visible_count(qdq_bundle):
    out, _ = qdq_bundle
    s = ort_session(out / "encoder.int8-qdq.onnx")
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for k in (1, 4, 16):
        ids = np.stack([np.random.default_rng(i).permutation(16)[:k] for i in range(2)]).astype(np.int64)
        assert s.run(None, {"pixel_values": x, "ids_keep": ids})[0].shape == (2, k + 1, 32)


def test_int8_graph_for_explicit_backends_needs_the_qdq_variant(tmp_path):
    from export.bundle_writer import export_bundle

    b = Bundle.load(
        export_bundle(_model(), tmp_path / "b", precisions="int8", parts="encoder", verify=False, progress=None).bundle
    )
    with pytest.raises(BundleError, match="--precision int8-qdq --calibration"):
        b.int8_graph("encoder", qdq=True)
    assert b.int8_graph("encoder").precision == "int8"


def test_calibration_images_go_through_the_bundle_preprocessing(calib_dir):
    from export.bundle_writer import default_preprocessing
    from mae_deploy.preprocess import Preprocessor

    pre = default_preprocessing(32, 3)
    calib = load_calibration(calib_dir, pre, 3, count=5)
    assert calib.pixel_values.shape == (5, 3, 32, 32)
    first = sorted(p for p in calib_dir.iterdir())[0]
    np.testing.assert_array_equal(calib.pixel_values[0], Preprocessor.from_config(pre, in_chans=3)(first)[0])
    feeds = part_feeds("encoder", calib, 16)
    assert feeds[0]["ids_keep"].shape == (5, 16)
    all_of_them = load_calibration(calib_dir, pre, 3, count=1000)
    assert len(all_of_them.pixel_values) == COUNT + 4 and len(all_of_them.skipped) == 1  # zz_broken.jpg


@pytest.mark.parametrize(
    "args, message",
    [
        (["--precision", "int8-qdq"], "pass --calibration DIR"),
        (["--precision", "int8-qdq", "--calibration", "{calib}", "--calibration-count", "0"], "--calibration-count"),
    ],
)
def test_qdq_bad_input_is_exit_2_or_3(calib_dir, tmp_path, args, message):
    ckpt = tmp_path / "c"
    save_native(_model(), ckpt)
    args = [a.replace("{calib}", str(calib_dir)) for a in args]
    r = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(tmp_path / "b"), *args])
    assert r.exit_code in (2, 3) and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_calibration_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        load_calibration(tmp_path / "empty", {"image_size": 32}, 3)
