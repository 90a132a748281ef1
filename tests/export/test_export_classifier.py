"""Classifier export (issue #12): classifier.onnx from linear-probe and fine-tuned checkpoints, class names."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from export.bundle_writer import export_bundle
from export.verify import ort_session, top1_agreement
from mae_deploy.bundle import Bundle
from mae_deploy.cli import main
from mae_deploy.errors import BundleError
from mae_deploy.names import CLASSIFIER, CLASSIFIER_INPUTS, CLASSIFIER_OUTPUTS
from training.checkpoints import load_checkpoint, save_native
from training.linprobe import fold_probe_head
from training.model import VisionTransformer, create_model

NUM_CLASSES = 5
NAMES = ["cat", "dog", "owl", "eel", "yak"]


def _encoder_weights(gp: bool) -> tuple:
    """A test MAE's encoder weights (norms perturbed so every weight matters) and its config."""
    torch.manual_seed(0)
    mae = create_model("mae_vit_test").eval()
    with torch.no_grad():
        for name, p in mae.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    sd = {
        k: v
        for k, v in mae.state_dict().items()
        if not k.startswith(("decoder", "mask_token")) and not (gp and k.startswith("norm."))
    }
    return sd, replace(mae.config, decoder_depth=0)


def _probe() -> tuple[nn.Module, VisionTransformer]:
    """A linear probe as linprobe trains it (cls token, BatchNorm without affine + Linear) and its folded form."""
    sd, cfg = _encoder_weights(gp=False)
    probe = VisionTransformer(cfg, NUM_CLASSES, global_pool=False)
    probe.load_state_dict(sd, strict=False)
    probe.head = nn.Sequential(nn.BatchNorm1d(cfg.embed_dim, affine=False, eps=1e-6), probe.head)
    with torch.no_grad():
        probe.head[0].running_mean.normal_(0, 0.3)
        probe.head[0].running_var.uniform_(0.5, 2.0)
        probe.head[1].weight.normal_(0, 0.5)
        probe.head[1].bias.normal_(0, 0.1)
    probe.eval()
    return probe, fold_probe_head(probe)


def _finetuned() -> VisionTransformer:
    sd, cfg = _encoder_weights(gp=True)
    model = VisionTransformer(cfg, NUM_CLASSES, global_pool=True)
    model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
        model.fc_norm.weight.add_(torch.randn_like(model.fc_norm.weight) * 0.1)
    return model.eval()


def _images(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _cli(*args: str):
    return CliRunner().invoke(main, ["export", *args])


@pytest.fixture(scope="module")
def probe_models():
    return _probe()


@pytest.fixture(scope="module")
def probe_ckpt(probe_models, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("probe") / "model"
    save_native(
        probe_models[1],
        d,
        class_names=NAMES,
        source={"format": "mae-deploy linprobe", "note": "linear probe; BatchNorm folded into head"},
    )
    return d


@pytest.fixture(scope="module")
def probe_bundle(probe_ckpt, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bundles") / "probe"
    r = _cli(str(probe_ckpt), "--out", str(out), "--precision", "fp16,int8")
    assert r.exit_code == 0, r.output
    return out, r.output


def test_linear_probe_classifier_matches_the_unfolded_probe(probe_bundle, probe_models):
    """classifier.onnx = cls token + encoder norm + (BatchNorm folded into) the head, any batch size."""
    out, _ = probe_bundle
    probe, _ = probe_models
    session = ort_session(out / "classifier.onnx")
    for n in (1, 4, 7):
        x = _images(n, seed=n)
        with torch.no_grad():
            ref = probe(torch.from_numpy(x)).numpy()
        logits = session.run(None, {"pixel_values": x})[0]
        assert logits.shape == (n, NUM_CLASSES)
        np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_classifier_graph_signature(probe_bundle):
    out, _ = probe_bundle
    proto = onnx.load(str(out / "classifier.onnx"))
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    assert tuple(i.name for i in inputs) == CLASSIFIER_INPUTS == ("pixel_values",)
    assert tuple(o.name for o in proto.graph.output) == CLASSIFIER_OUTPUTS == ("logits",)
    dims = [d.dim_param or d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 32]
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == ["batch", 5]
    assert not {n.op_type for n in proto.graph.node} & {"BatchNormalization", "TopK", "ScatterND"}


def test_bundle_exposes_classifier_class_names_and_parity(probe_bundle):
    out, text = probe_bundle
    b = Bundle.load(out)
    assert b.has_classifier and b.class_names == NAMES and b.class_names_source == "checkpoint"
    assert b.classifier_graph().file == "classifier.onnx"
    assert {g.precision for g in b.graphs if g.part == CLASSIFIER} == {"fp32", "fp16", "int8"}
    assert b.manifest["architecture"]["num_classes"] == NUM_CLASSES
    fp32 = b.classifier_graph("fp32").parity
    assert fp32["passed"] and fp32["max_abs_diff"] <= 1e-4 and sum(c["batch"] for c in fp32["cases"]) == 12
    for precision in ("fp16", "int8"):
        p = b.classifier_graph(precision).parity
        assert p["passed"] and p["top1_agreement"] >= p["threshold"]["min_top1_agreement"]
        assert p["min_logit_cosine"] >= p["threshold"]["min_logit_cosine"]
    assert b.graph("classifier", "int8").file == "classifier.int8.onnx"
    assert "classifier.int8.onnx" in text and "logit cosine" in text


def test_finetuned_global_pool_classifier_and_labels_file(tmp_path):
    """Global average pool + fc_norm + head; --labels overrides; the encoder graph is still there."""
    model = _finetuned()
    ckpt = tmp_path / "ft"
    save_native(model, ckpt, class_names=NAMES)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"n{i}" for i in range(NUM_CLASSES)) + "\n\n")
    out = tmp_path / "b"
    r = _cli(str(ckpt), "--out", str(out), "--labels", str(labels))
    assert r.exit_code == 0, r.output
    b = Bundle.load(out)
    assert b.class_names == [f"n{i}" for i in range(NUM_CLASSES)] and b.class_names_source == "labels-file"
    assert [g.part for g in b.graphs] == ["encoder", CLASSIFIER]
    x = _images(3)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_session(out / "classifier.onnx").run(None, {"pixel_values": x})[0], ref, atol=1e-4)


def test_no_names_anywhere_gives_class_indices(tmp_path):
    _, folded = _probe()
    b = Bundle.load(export_bundle(folded, tmp_path / "b", verify=False, progress=None).bundle)
    assert b.class_names == [f"class_{i}" for i in range(NUM_CLASSES)] and b.class_names_source == "generated"


@pytest.mark.parametrize(
    "content, message",
    [
        ("a\nb\n", "has 2 class names but the classifier head has 5"),
        ("a\n\nb\nc\nd\ne\n", "line 2 is blank"),
        ("a\nb\nc\nd\na\n", "class 0 and class 4 both 'a'"),
        ("", "is empty"),
    ],
)
def test_bad_labels_file_is_exit_3(probe_ckpt, tmp_path, content, message):
    labels = tmp_path / "labels.txt"
    labels.write_text(content)
    r = _cli(str(probe_ckpt), "--out", str(tmp_path / "b"), "--labels", str(labels), "--skip-verify")
    assert r.exit_code == 3, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_labels_without_a_head_and_parts_classifier_without_a_head_are_exit_3(tmp_path):
    ckpt = tmp_path / "mae"
    save_native(create_model("mae_vit_test").eval(), ckpt)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\n")
    r = _cli(str(ckpt), "--out", str(tmp_path / "b"), "--labels", str(labels))
    assert r.exit_code == 3 and "no classifier graph" in r.output
    r = _cli(str(ckpt), "--out", str(tmp_path / "b"), "--parts", "encoder,classifier")
    assert r.exit_code == 3 and "no classification head" in r.output


def test_a_bundle_without_classifier_says_so(probe_bundle, tmp_path):
    b = Bundle.load(
        export_bundle(create_model("mae_vit_test").eval(), tmp_path / "b", verify=False, progress=None).bundle
    )
    assert not b.has_classifier and b.class_names is None
    with pytest.raises(BundleError, match="no classifier graph"):
        b.classifier_graph()


def test_native_checkpoint_records_class_names(probe_models, tmp_path):
    save_native(probe_models[1], tmp_path / "m", class_names=NAMES)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["head"]["class_names"] == NAMES
    assert load_checkpoint(tmp_path / "m").class_names == NAMES


def test_top1_agreement_counts_near_ties_as_agreeing():
    ref = np.array([[5.0, 4.99, 0.0], [5.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    out = np.array([[4.0, 4.5, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    # row 0: 4.99 is within 1 % of the range of the best -> tie, agreed; row 1: a real flip; row 2: all tied
    assert top1_agreement(out, ref).tolist() == [True, False, True]
