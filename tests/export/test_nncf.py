"""The NNCF int8 variant (issue #25): what it quantises, what stays float, how export lists and verifies it, and
which graph the OpenVINO runner runs for int8."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from runtime_fixtures import _perturbed_model

from export.bundle_writer import export_bundle
from export.nncf_int8 import (
    dequantized_tensors,
    float_matmuls,
    float_stages,
    pixel_embedding_convs,
    pixel_range,
    set_input_range,
    to_int8_nncf,
    unsigned_asymmetric_activations,
)
from export.verify import ort_session
from mae_deploy.bundle import Bundle
from mae_deploy.errors import InputError, MissingDependency
from mae_deploy.names import INT8_NNCF, INT8_QDQ

COUNT = 10


def _model():
    return _perturbed_model("mae_vit_test", seed=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Smooth gradients with a blob each: image-like inputs for a 32 px model."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:48, 0:48] / 48.0
    for i in range(COUNT):
        c = rng.random((3, 3))
        img = np.stack(
            [
                c[k, 0] * xx + c[k, 1] * yy + c[k, 2] * np.exp(-((xx - 0.5) ** 2 + (yy - 0.4) ** 2) * 9)
                for k in range(3)
            ],
            axis=-1,
        )
        Image.fromarray((np.clip(img / img.max(), 0, 1) * 255).astype(np.uint8)).save(d / f"p{i}.png")
    return d


@pytest.fixture(scope="module")
def nncf_bundle(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nncf") / "b"
    export_bundle(
        _model(),
        out,
        precisions=("fp32", INT8_QDQ, INT8_NNCF),
        calibration=photos,
        calibration_count=COUNT,
        progress=None,
    )
    return out


def _producers(g: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in g.node for o in n.output}


def test_nncf_variant_is_listed_verified_and_calibrated(nncf_bundle, photos):
    b = Bundle.load(nncf_bundle)
    for part in ("encoder", "decoder"):
        g = b.graph(part, INT8_NNCF)
        assert g.file == f"{part}.{INT8_NNCF}.onnx" and g.parity["passed"]
        assert g.parity["inputs"] == "calibration images"
    entry = next(x for x in b.manifest["graphs"] if x["part"] == "encoder" and x["precision"] == INT8_NNCF)
    q = entry["quantization"]
    assert q["quantizer"] == "nncf" and q["format"] == "qdq" and q["smooth_quant"] is True
    assert q["calibration"]["images"] == COUNT and q["calibration"]["source"] == str(photos)
    # What stayed float is read from the graph: attention's softmax @ v (NNCF leaves v float), one per block.
    assert len(q["float_matmuls"]) == b.manifest["architecture"]["depth"]
    assert b.graph("encoder", INT8_NNCF).parity["min_feature_cosine"] >= 0.99


def test_int8_is_followed_through_layout_ops_and_not_through_compute():
    from onnx import TensorProto, helper

    node = helper.make_node
    graph = helper.make_graph(
        [
            node("DequantizeLinear", ["a8", "s"], ["a"]),
            node("DequantizeLinear", ["b8", "s"], ["b"]),
            node("Reshape", ["b", "shape"], ["b2"]),
            node("Transpose", ["b2"], ["bt"], perm=[1, 0]),
            node("MatMul", ["a", "bt"], ["ab"], name="int8_matmul"),
            node("Softmax", ["ab"], ["p"]),
            node("MatMul", ["p", "bt"], ["out"], name="float_matmul"),
        ],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.INT8, None) for n in ("a8", "b8")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph)
    assert {"a", "b", "b2", "bt"} <= dequantized_tensors(model) and "p" not in dequantized_tensors(model)
    assert float_matmuls(model) == ["float_matmul"]


def test_asymmetric_activations_become_uint8_with_the_same_values():
    from onnx import TensorProto, helper, numpy_helper

    node, init = helper.make_node, numpy_helper.from_array
    graph = helper.make_graph(
        [
            node("QuantizeLinear", ["x", "s", "zp_asym"], ["xq"]),
            node("DequantizeLinear", ["xq", "s", "zp_asym"], ["xd"]),
            node("QuantizeLinear", ["x", "s", "zp_sym"], ["yq"]),
            node("DequantizeLinear", ["yq", "s", "zp_sym"], ["yd"]),
            node("DequantizeLinear", ["w8", "s", "zp_w"], ["w"]),
            node("MatMul", ["xd", "w"], ["a"]),
            node("MatMul", ["yd", "w"], ["b"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("xd", "a", "b")],
        [
            init(np.array(0.05, np.float32), "s"),
            init(np.array(-80, np.int8), "zp_asym"),
            init(np.array(0, np.int8), "zp_sym"),
            init(np.array(-3, np.int8), "zp_w"),  # a weight's zero point is never touched
            init(np.arange(16, dtype=np.int8).reshape(4, 4), "w8"),
        ],
    )
    graph.value_info.append(helper.make_tensor_value_info("xq", TensorProto.INT8, [2, 4]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.linspace(-3, 11, 8, dtype=np.float32).reshape(2, 4)  # beyond both ends of [-2.4, 10.35]
    before = ort_session_from(model).run(None, {"x": x})
    assert unsigned_asymmetric_activations(model) == 1
    zps = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("zp")}
    assert zps["zp_asym"].dtype == np.uint8 and zps["zp_asym"] == 48
    assert zps["zp_sym"].dtype == np.int8 and zps["zp_w"].dtype == np.int8 and zps["zp_w"] == -3
    assert "xq" not in {v.name for v in model.graph.value_info}
    onnx.checker.check_model(model, full_check=True)
    after = ort_session_from(model).run(None, {"x": x})
    np.testing.assert_array_equal(after[0], before[0])  # the same real values, clipped at the same ends
    assert after[0].min() == pytest.approx(-2.4) and after[0].max() == pytest.approx(10.35)
    for b, a in zip(before[1:], after[1:], strict=True):  # the MatMuls: other int8 kernels, same sums
        np.testing.assert_allclose(a, b, rtol=1e-6)


def ort_session_from(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_block_matmuls_are_int8_and_the_ends_stay_float(nncf_bundle):
    model = onnx.load(str(nncf_bundle / f"encoder.{INT8_NNCF}.onnx"))
    g = model.graph
    prod = _producers(g)
    matmuls = [n for n in g.node if n.op_type == "MatMul"]
    int8 = [n for n in matmuls if all(i in dequantized_tensors(model) for i in n.input)]
    # Per block: q, k, v, q @ k^T, proj, fc1, fc2 in int8; softmax @ v has a float v.
    depth = 2
    assert len(int8) == 7 * depth and len(matmuls) == 8 * depth
    assert float_matmuls(model) == [n.name for n in matmuls if n not in int8]
    # The patch-embedding Conv is int8 (pixels and weights); the rest of the embedding stage and everything
    # after the final norm are not quantised.
    conv = next(n for n in g.node if n.op_type == "Conv")
    assert [prod[i].op_type for i in conv.input[:2]] == ["DequantizeLinear", "DequantizeLinear"]
    fp32 = onnx.load(str(nncf_bundle / "encoder.onnx"), load_external_data=False)
    final = set(float_stages(fp32)) - set(pixel_embedding_convs(fp32))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.name in final for n in g.node)
    for out in g.output:  # every output is written by a float op, not a DequantizeLinear
        assert prod[out.name].op_type != "DequantizeLinear"
    # Asymmetric activation quantisers are uint8 (what VNNI multiplies), symmetric ones and weights int8.
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    zero_points = [inits[n.input[2]] for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert any(z.dtype == np.uint8 for z in zero_points)
    assert all(z.dtype == np.uint8 or not z.any() for z in zero_points)


def test_the_pixel_quantiser_spans_every_normalised_image(nncf_bundle):
    """Not the calibration's min/max: a pixel the calibration images never reached is not clipped."""
    b = Bundle.load(nncf_bundle)
    low, high = pixel_range(b.preprocessing["mean"], b.preprocessing["std"])
    mean, std = np.array(b.preprocessing["mean"]), np.array(b.preprocessing["std"])
    assert low == pytest.approx(min(-mean / std)) and high == pytest.approx(max((1 - mean) / std))
    g = onnx.load(str(nncf_bundle / f"encoder.{INT8_NNCF}.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    (q,) = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "pixel_values"]
    scale, zp = float(inits[q.input[1]]), inits[q.input[2]]
    info = np.iinfo(zp.dtype)
    assert (int(info.min) - int(zp)) * scale == pytest.approx(low, abs=scale / 2)
    assert (int(info.max) - int(zp)) * scale == pytest.approx(high, abs=scale / 2)
    # Black and white in every channel, through the graph: the patch embedding sees them within one step.
    s = ort_session(nncf_bundle / f"encoder.{INT8_NNCF}.onnx")
    f = ort_session(nncf_bundle / "encoder.onnx")
    ids = np.tile(np.arange(16, dtype=np.int64), (2, 1))
    x = np.stack([np.broadcast_to((v - mean) / std, (32, 32, 3)).transpose(2, 0, 1) for v in (0.0, 1.0)])
    feed = {"pixel_values": x.astype(np.float32), "ids_keep": ids}
    a, b_ = s.run(["latent"], feed)[0], f.run(["latent"], feed)[0]
    pa, pb = a[:, 1:].mean(1), b_[:, 1:].mean(1)
    assert (np.sum(pa * pb, 1) / np.linalg.norm(pa, axis=1) / np.linalg.norm(pb, axis=1)).min() > 0.99


def test_set_input_range_keeps_the_zero_point_type():
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
    ]
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(3), "z")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("x", "y")]
    m = helper.make_model(helper.make_graph(nodes, "g", [io[0]], [io[1]], inits))
    assert set_input_range(m, "x", -1.0, 4.1) == 1
    got = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert got["z"].dtype == np.uint8 and float(got["s"]) == pytest.approx(5.1 / 255)
    assert (0 - int(got["z"])) * float(got["s"]) == pytest.approx(-1.0, abs=float(got["s"]) / 2)
    assert set_input_range(m, "other", 0.0, 1.0) == 0
    # A DequantizeLinear with initializers of its own gets the same range.
    m.graph.node[1].input[1:] = ["s2", "z2"]
    own = [numpy_helper.from_array(np.float32(1), "s2"), numpy_helper.from_array(np.uint8(0), "z2")]
    m.graph.initializer.extend(own)
    set_input_range(m, "x", -2.0, 3.1)
    got = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert got["s2"] == got["s"] == np.float32(5.1 / 255) and got["z2"] == got["z"]


def test_pooled_outputs_stay_consistent_with_the_latent(nncf_bundle):
    s = ort_session(nncf_bundle / f"encoder.{INT8_NNCF}.onnx")
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    for k in (1, 4, 16):
        ids = np.stack([np.random.default_rng(i).permutation(16)[:k] for i in range(3)]).astype(np.int64)
        latent, cls, mean = s.run(["latent", "pooled_cls", "pooled_mean"], {"pixel_values": x, "ids_keep": ids})
        assert latent.shape == (3, k + 1, 32)
        np.testing.assert_allclose(cls, latent[:, 0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(mean, latent[:, 1:].mean(axis=1), rtol=0, atol=1e-5)


def test_openvino_int8_runs_the_nncf_graph(nncf_bundle):
    pytest.importorskip("openvino", reason="the openvino extra is part of the dev install")
    from mae_deploy.runners import create_runner
    from mae_deploy.runners.openvino import graph_precision

    b = Bundle.load(nncf_bundle)
    assert graph_precision(b, "encoder", "int8") == INT8_NNCF
    assert graph_precision(b, "encoder", INT8_QDQ) == INT8_QDQ
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.tile(np.arange(16, dtype=np.int64), (2, 1))
    ref = create_runner(b, backend="openvino", device="cpu", precision="fp32", threads=1).encode(x, ids)
    with create_runner(b, backend="openvino", device="cpu", precision="int8", threads=1) as r:
        got = r.encode(x, ids)
        assert r.info.details["graphs"]["encoder"] == f"encoder.{INT8_NNCF}.onnx"
    f, g = ref[:, 1:].mean(1), got[:, 1:].mean(1)
    assert (np.sum(f * g, 1) / np.linalg.norm(f, axis=1) / np.linalg.norm(g, axis=1)).min() >= 0.99


def test_openvino_names_the_missing_nncf_graph(tmp_path):
    from mae_deploy.runners.openvino import graph_precision

    b = Bundle.load(export_bundle(_model(), tmp_path / "b", parts="encoder", verify=False, progress=None).bundle)
    with pytest.raises(InputError, match=f"no encoder graph at {INT8_NNCF}.*--precision {INT8_NNCF} --calibration"):
        graph_precision(b, "encoder", INT8_NNCF)


def test_float_helpers_on_a_small_graph():
    from onnx import TensorProto, helper

    t = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("x", "y")]
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="embed"),
        helper.make_node("LayerNormalization", ["a", "s"], ["b"], name="ln0"),
        helper.make_node("MatMul", ["b", "b"], ["c"], name="mm"),
        helper.make_node("LayerNormalization", ["c", "s"], ["d"], name="ln1"),
        helper.make_node("ReduceMean", ["d"], ["y"], name="pool"),
    ]
    g = helper.make_graph(nodes, "g", [t[0]], [t[1]], [helper.make_tensor("s", TensorProto.FLOAT, [2], [1, 1])])
    m = helper.make_model(g)
    assert float_stages(m) == ["embed", "ln1", "pool"]
    assert float_matmuls(m) == ["mm"]


def test_nncf_needs_images_and_the_package(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="--calibration DIR"):
        to_int8_nncf(tmp_path / "x.onnx", tmp_path / "y.onnx", [])
    with pytest.raises(InputError, match="int8-nncf is calibrated on real images"):
        export_bundle(_model(), tmp_path / "b", precisions=INT8_NNCF, progress=None)
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(MissingDependency, match=r"mae-deploy\[nncf\]"):
        to_int8_nncf(tmp_path / "x.onnx", tmp_path / "y.onnx", [{"x": np.zeros(1)}])
