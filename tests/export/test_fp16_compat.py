"""fp16 conversion of graphs whose float32-kept weights are shared (issue #21).

The dynamo exporter merges equal small initializers, so a fresh model's LayerNorms all read one weight
(ones) and one bias (zeros, shared with the Linear biases). ONNX Runtime 1.25-1.31's fp16 converter then
declared one Cast output once per LayerNorm: the graph was invalid (``onnx_ir`` SerdeError "redeclared").
These tests run under `make test` (ONNX Runtime 1.32, which shares the Cast itself; the per-reader Casts are
reproduced by wrapping its converter) and under `make compat` (ONNX Runtime 1.31, whose converter makes them).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime.transformers.float16 as ort_float16
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.bundle_writer import export_bundle
from export.precision import FP16_KEEP_FP32_OPS, to_fp16
from export.verify import ort_session
from mae_deploy.errors import VerificationError
from training.model import create_model

WEIGHT, BIAS = "norm.weight", "norm.bias"  # the names a deduplicated export leaves: the first user's


def _shared_weights_graph(path: Path) -> Path:
    """x -> Add(bias) -> LayerNorm(weight, bias) -> MatMul -> LayerNorm(weight, bias) -> y.

    ``weight`` is read by the two LayerNorms only (the converter keeps it float32); ``bias`` also by the
    Add (it becomes float16 and is cast back for the LayerNorms). Initializers are annotated in value_info,
    as the dynamo exporter writes them.
    """
    rng = np.random.default_rng(0)
    d = 8
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, d).astype(np.float32), WEIGHT),
        numpy_helper.from_array(rng.normal(0, 0.1, d).astype(np.float32), BIAS),
        numpy_helper.from_array(rng.normal(0, 0.3, (d, d)).astype(np.float32), "fc.weight"),
    ]
    nodes = [
        helper.make_node("Add", ["x", BIAS], ["a"], name="add"),
        helper.make_node("LayerNormalization", ["a", WEIGHT, BIAS], ["n1"], name="norm1", axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["n1", "fc.weight"], ["m"], name="fc"),
        helper.make_node("LayerNormalization", ["m", WEIGHT, BIAS], ["y"], name="norm2", axis=-1, epsilon=1e-6),
    ]
    annotations = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [d]) for n in (WEIGHT, BIAS)]
    annotations += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, d]) for n in ("a", "n1", "m")]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, d])],
        inits,
        value_info=annotations,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime the project supports
    onnx.save(model, str(path))
    return path


def _check_fp16_graph(path: Path) -> onnx.ModelProto:
    """Valid ONNX, every value written by one node, no Cast in front of a weight that stays float32."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    writers = Counter(o for n in model.graph.node for o in n.output)
    assert [v for v, k in writers.items() if k > 1] == []
    float32_weights = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    casts_of_float32 = [n.name for n in model.graph.node if n.op_type == "Cast" and n.input[0] in float32_weights]
    assert casts_of_float32 == []
    return model


def _repeated_casts(convert):
    """``convert_float_to_float16`` with every Cast written twice under the same names, as ONNX Runtime
    1.25-1.31 write one per reader of the value (1.32 shares one; 1.24 and older name them per reader)."""

    def convert_like_1_31(model, **kwargs):
        half = convert(model, **kwargs)
        casts = [n for n in half.graph.node if n.op_type == "Cast"]
        assert casts, "the converter made no Cast: nothing to repeat"
        half.graph.node.extend(onnx.NodeProto.FromString(n.SerializeToString()) for n in casts)
        return half

    return convert_like_1_31


def test_shared_float32_weight_converts_to_a_valid_graph_with_parity(tmp_path):
    src = _shared_weights_graph(tmp_path / "g.onnx")
    half = _check_fp16_graph(to_fp16(src, tmp_path / "g.fp16.onnx"))

    types = {t.name: t.data_type for t in half.graph.initializer}
    assert (types[WEIGHT], types[BIAS], types["fc.weight"]) == (
        TensorProto.FLOAT,
        TensorProto.FLOAT16,
        TensorProto.FLOAT16,
    )
    norms = [n for n in half.graph.node if n.op_type in FP16_KEEP_FP32_OPS]
    assert [n.input[1] for n in norms] == [WEIGHT, WEIGHT]  # the float32 weight itself, no Cast between
    # The fp16 bias reaches them through a Cast back to float32: one shared (ONNX Runtime >= 1.25) or one each.
    bias_casts = {n.output[0] for n in half.graph.node if n.op_type == "Cast" and n.input[0] == BIAS}
    assert {n.input[2] for n in norms} <= bias_casts and bias_casts

    x = np.random.default_rng(1).normal(0, 1, (2, 8)).astype(np.float32)
    ref = ort_session(src).run(None, {"x": x})[0]
    got = ort_session(tmp_path / "g.fp16.onnx").run(None, {"x": x})[0]
    assert got.dtype == np.float32 and np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()


def test_repeated_casts_of_onnxruntime_1_31_are_merged(tmp_path, monkeypatch):
    src = _shared_weights_graph(tmp_path / "g.onnx")
    shared = onnx.load(str(to_fp16(src, tmp_path / "shared.onnx")))
    monkeypatch.setattr(ort_float16, "convert_float_to_float16", _repeated_casts(ort_float16.convert_float_to_float16))
    merged = _check_fp16_graph(to_fp16(src, tmp_path / "merged.onnx"))
    assert list(merged.graph.node) == list(shared.graph.node)


def test_two_different_writers_of_one_value_are_an_error(tmp_path, monkeypatch):
    convert = ort_float16.convert_float_to_float16

    def clashing(model, **kwargs):
        half = convert(model, **kwargs)
        half.graph.node.append(helper.make_node("Identity", ["x"], [half.graph.node[0].output[0]], name="clash"))
        return half

    monkeypatch.setattr(ort_float16, "convert_float_to_float16", clashing)
    src = _shared_weights_graph(tmp_path / "g.onnx")
    with pytest.raises(VerificationError, match=r"two different nodes .*'clash'.* upgrade onnxruntime"):
        to_fp16(src, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_fresh_model_exports_fp16_with_parity(tmp_path):
    """The issue's case at test size: a freshly initialised model (LayerNorm weights all ones), whose export
    shares one LayerNorm weight between every LayerNorm; the export's own parity check passes."""
    torch.manual_seed(0)
    report = export_bundle(
        create_model("mae_vit_test").eval(), tmp_path / "b", precisions=("fp32", "fp16"), progress=None
    )
    fp32 = onnx.load(str(tmp_path / "b" / "encoder.onnx"))
    norm_weights = Counter(n.input[1] for n in fp32.graph.node if n.op_type == "LayerNormalization")
    assert max(norm_weights.values()) > 1, "the exporter no longer shares LayerNorm weights: see the docstring"
    for part in ("encoder", "decoder"):
        _check_fp16_graph(tmp_path / "b" / f"{part}.fp16.onnx")
    fp16_rows = [r for r in report.parity_rows() if r["precision"] == "fp16"]
    assert [r["result"] for r in fp16_rows] == ["ok", "ok"]
