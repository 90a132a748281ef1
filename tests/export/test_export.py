"""ONNX export (issue #3): graphs, symbolic dims, verification, variants, atomic bundles, CLI errors."""

from __future__ import annotations

import functools
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
import onnx
import pytest
import torch
from click.testing import CliRunner

import export.bundle_writer as bundle_writer
from export.bundle_writer import export_bundle
from export.onnx_export import FORBIDDEN_OPS, check_graph_file, forbidden_ops
from export.staging import ExportLock
from export.verify import ort_session, verify_fp32
from export.wrappers import resize_model
from mae_deploy.bundle import Bundle, sha256_file
from mae_deploy.cli import main
from mae_deploy.errors import InputError, VerificationError
from training.checkpoints import load_model, save_native
from training.model import create_model, interpolate_pos_embed

L_TEST = 16  # mae_vit_test: 32 px, patch 8


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    m = create_model("mae_vit_test", **overrides).eval()
    with torch.no_grad():  # random init leaves LayerNorms at identity: perturb so every weight matters
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _masks(batch: int, visible: int, num_patches: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shuffle = np.stack([rng.permutation(num_patches) for _ in range(batch)]).astype(np.int64)
    return np.ascontiguousarray(shuffle[:, :visible]), np.argsort(shuffle, axis=1).astype(np.int64)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _cli(*args: str):
    return CliRunner().invoke(main, ["export", *args])


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "native"
    save_native(_model(), d)
    return d


@pytest.fixture(scope="module")
def cli_bundle(ckpt_dir, tmp_path_factory) -> tuple[Path, str]:
    """The main bundle, made through the CLI: fp32 + fp16 + int8, encoder + decoder, reference weights."""
    out = tmp_path_factory.mktemp("bundles") / "b"
    r = _cli(str(ckpt_dir), "--out", str(out), "--precision", "int8,fp16", "--reference-weights")
    assert r.exit_code == 0, r.output
    return out, r.output


# ---------------------------------------------------------------------------------------------------
# The main bundle
# ---------------------------------------------------------------------------------------------------


def test_cli_prints_files_sizes_parity_and_time(cli_bundle):
    out, text = cli_bundle
    for name in ("encoder.onnx", "decoder.onnx", "encoder.int8.onnx", "decoder.fp16.onnx", "mae.json"):
        assert name in text
    assert " KB" in text  # sizes
    assert "parity against PyTorch fp32" in text and "feature cosine" in text and "recon rel err" in text
    assert "b3/v16" in text  # per-case max |diff|
    assert "done in" in text
    assert "FAILED" not in text


def test_graph_signatures_and_symbolic_dim_names(cli_bundle):
    out, _ = cli_bundle
    enc = onnx.load(str(out / "encoder.onnx"))
    assert [i.name for i in enc.graph.input] == ["pixel_values", "ids_keep"]
    assert [o.name for o in enc.graph.output] == ["latent", "pooled_cls", "pooled_mean"]
    assert _dims(enc.graph.input[0]) == ["batch", 3, 32, 32]
    assert _dims(enc.graph.input[1]) == ["batch", "visible"]
    assert _dims(enc.graph.output[0]) == ["batch", "visible+1", 32]
    assert _dims(enc.graph.output[1]) == _dims(enc.graph.output[2]) == ["batch", 32]  # pooled: (N, D)
    assert enc.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert enc.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    dec = onnx.load(str(out / "decoder.onnx"))
    assert [i.name for i in dec.graph.input] == ["latent", "ids_restore"]
    assert [o.name for o in dec.graph.output] == ["pred"]
    assert _dims(dec.graph.input[0]) == ["batch", "visible+1", 32]
    assert _dims(dec.graph.input[1]) == ["batch", L_TEST]
    assert _dims(dec.graph.output[0]) == ["batch", L_TEST, 8 * 8 * 3]
    # Variants keep the float32 boundary, so runners feed them the same arrays.
    for f in ("encoder.fp16.onnx", "encoder.int8.onnx", "decoder.fp16.onnx", "decoder.int8.onnx"):
        p = onnx.load(str(out / f))
        assert all(
            v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
            for v in [*p.graph.input, *p.graph.output]
        ), f
        assert _dims(p.graph.input[0])[0] == "batch"


def test_every_file_passes_full_checker_and_holds_no_forbidden_ops(cli_bundle):
    out, _ = cli_bundle
    files = sorted(out.glob("*.onnx"))
    assert len(files) == 6
    for f in files:
        onnx.checker.check_model(str(f), full_check=True)
        assert forbidden_ops(onnx.load(str(f))) == [], f
        check_graph_file(f)


def test_forbidden_op_check_catches_topk_and_scatter(tmp_path):
    """The check above could fail: a graph with TopK and ScatterND is reported and rejected."""
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    v = h.make_tensor_value_info("v", onnx.TensorProto.FLOAT, [2])
    i = h.make_tensor_value_info("i", onnx.TensorProto.INT64, [2])
    s = h.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [4])
    k = h.make_tensor("k", onnx.TensorProto.INT64, [1], [2])
    idx = h.make_tensor("idx", onnx.TensorProto.INT64, [2, 1], [0, 1])
    g = h.make_graph(
        [h.make_node("TopK", ["x", "k"], ["v", "i"]), h.make_node("ScatterND", ["x", "idx", "v"], ["s"])],
        "bad",
        [x],
        [v, i, s],
        initializer=[k, idx],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 20)])
    assert forbidden_ops(m) == ["ScatterND", "TopK"]
    assert {"RandomUniform", "RandomNormal", "Multinomial", "ScatterElements"} <= FORBIDDEN_OPS
    onnx.save(m, tmp_path / "bad.onnx")
    with pytest.raises(VerificationError, match="TopK"):
        check_graph_file(tmp_path / "bad.onnx")


def test_parity_report_in_mae_json(cli_bundle):
    out, _ = cli_bundle
    m = json.loads((out / "mae.json").read_text())
    assert m["format"] == "mae-deploy-bundle" and m["format_version"] == 1 and m["opset"] == 20
    graphs = {(g["part"], g["precision"]): g for g in m["graphs"]}
    assert set(graphs) == {(p, q) for p in ("encoder", "decoder") for q in ("fp32", "fp16", "int8")}
    grid = {(1, 1), (1, 4), (1, 8), (1, 16), (3, 1), (3, 4), (3, 8), (3, 16)}
    for (part, prec), g in graphs.items():
        p = g["parity"]
        assert p["passed"] is True and p["reference"] == "torch-fp32"
        assert {(c["batch"], c["visible"]) for c in p["cases"]} == grid
        assert p["max_abs_diff"] == max(c["max_abs_diff"] for c in p["cases"])
        if prec == "fp32":
            assert p["threshold"] == {"max_abs_diff": 1e-4}
            assert 0 < p["max_abs_diff"] <= 1e-4
        elif part == "encoder":
            assert p["min_feature_cosine"] >= p["threshold"]["min_feature_cosine"] >= 0.99
        else:
            assert 0 < p["max_recon_rel_err"] <= p["threshold"]["max_recon_rel_err"] <= 0.1
    # Variants differ from fp32 (they really are another precision), fp32 does not.
    assert (
        graphs[("encoder", "int8")]["parity"]["max_abs_diff"]
        > 100 * graphs[("encoder", "fp32")]["parity"]["max_abs_diff"]
    )


def test_manifest_metadata_and_bundle_loads(cli_bundle, ckpt_dir):
    out, _ = cli_bundle
    b = Bundle.load(out)  # hashes every file
    m = b.manifest
    assert b.precisions("encoder") == ["fp32", "fp16", "int8"] and b.has_decoder
    assert m["architecture"]["embed_dim"] == 32 and m["architecture"]["name"] == "mae_vit_test"
    assert m["num_patches"] == L_TEST and m["grid_size"] == 4
    pre = m["preprocessing"]
    assert pre["image_size"] == 32 and pre["resize"] == "shorter_side_crop" and pre["crop_pct"] == 0.875
    assert pre["interpolation"] == "bicubic" and pre["mean"] == [0.485, 0.456, 0.406]
    assert set(m["exporter"]) >= {"mae_deploy", "torch", "onnx", "onnxruntime", "onnxscript"}
    assert m["source"]["format"] == "native"
    assert m["source"]["sha256"] == sha256_file(ckpt_dir / "model.safetensors")
    assert m["files"]["encoder.int8.onnx"] == sha256_file(out / "encoder.int8.onnx")
    assert "reference/model.safetensors" in m["files"]
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp dirs left


def test_variants_are_really_int8_and_fp16(cli_bundle):
    out, _ = cli_bundle
    q = onnx.load(str(out / "encoder.int8.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in q.graph.initializer)
    h = onnx.load(str(out / "encoder.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in h.graph.initializer)
    # LayerNorm and Softmax stay float32: their weights are float32 initializers.
    ln = [n for n in h.graph.node if n.op_type == "LayerNormalization"]
    inits = {t.name: t for t in h.graph.initializer}
    assert ln and all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT for n in ln if n.input[1] in inits)
    assert (out / "encoder.int8.onnx").stat().st_size < (out / "encoder.onnx").stat().st_size


def test_int8_holds_one_copy_of_the_weights_and_writes_the_same_graph(cli_bundle, tmp_path, monkeypatch):
    """The memory guard around quantize_dynamic skips only the library's redundant save-and-reload (issue #10:
    7.3 -> 3.1 GB for the ViT-H encoder), and the quantised graph is byte-identical to the library's own path."""
    import contextlib
    import importlib

    import export.precision as precision

    quantizer = importlib.import_module("onnxruntime.quantization.onnx_quantizer")
    real = quantizer.save_and_reload_model_with_shape_infer
    calls = []

    def spy(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(quantizer, "save_and_reload_model_with_shape_infer", spy)
    src = cli_bundle[0] / "encoder.onnx"
    guarded = precision.to_int8(src, tmp_path / "guarded.onnx")
    assert calls == [] and quantizer.save_and_reload_model_with_shape_infer is spy  # skipped, then restored
    with monkeypatch.context() as m:
        m.setattr(precision, "_one_copy_of_the_weights", lambda graph: contextlib.nullcontext())
        library = precision.to_int8(src, tmp_path / "library.onnx")
    assert calls == [1]

    def loaded(path: Path) -> onnx.ModelProto:
        m = onnx.load(str(path))
        for t in m.graph.initializer:  # the library's reload spells out the default data_location; same tensor
            if t.data_location == onnx.TensorProto.DEFAULT:
                t.ClearField("data_location")
        return m

    assert loaded(guarded) == loaded(library)  # every node, initializer, annotation and metadata entry

    gemm = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Gemm", ["x", "w"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
            [onnx.numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")],
        )
    )
    with precision._one_copy_of_the_weights(gemm):  # a Gemm is rewritten: the library must refresh the types
        assert quantizer.save_and_reload_model_with_shape_infer is spy


def test_one_encoder_file_serves_any_batch_and_visible(cli_bundle):
    """Sizes never seen at export time (batch 2, 5; visible 2, 13) run and match PyTorch."""
    out, _ = cli_bundle
    model, _ = load_model(out / "reference")
    enc, dec = ort_session(out / "encoder.onnx"), ort_session(out / "decoder.onnx")
    rng = np.random.default_rng(3)
    for batch, visible in [(2, 2), (5, 13), (1, L_TEST)]:
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        ids_keep, ids_restore = _masks(batch, visible, L_TEST)
        latent = enc.run(None, {"pixel_values": x, "ids_keep": ids_keep})[0]
        pred = dec.run(None, {"latent": latent, "ids_restore": ids_restore})[0]
        with torch.no_grad():
            lt = model.forward_encoder(torch.from_numpy(x), torch.from_numpy(ids_keep))
            pt = model.forward_decoder(lt, torch.from_numpy(ids_restore))
        assert latent.shape == (batch, visible + 1, 32) and pred.shape == (batch, L_TEST, 192)
        np.testing.assert_allclose(latent, lt.numpy(), atol=1e-4)
        np.testing.assert_allclose(pred, pt.numpy(), atol=1e-4)


def test_reference_weights_match_the_checkpoint(cli_bundle, ckpt_dir):
    out, _ = cli_bundle
    ref, _ = load_model(out / "reference")
    src, _ = load_model(ckpt_dir)
    for (k, a), (k2, b) in zip(ref.state_dict().items(), src.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Resolution, external data, encoder-only
# ---------------------------------------------------------------------------------------------------


def test_image_size_interpolates_position_embeddings(ckpt_dir, tmp_path):
    out = tmp_path / "b48"
    r = _cli(str(ckpt_dir), "--out", str(out), "--image-size", "48")
    assert r.exit_code == 0, r.output
    assert "interpolated" in r.output
    b = Bundle.load(out)
    assert b.image_size == 48 and b.num_patches == 36 and b.preprocessing["image_size"] == 48
    enc = onnx.load(str(out / "encoder.onnx"))
    assert _dims(enc.graph.input[0]) == ["batch", 3, 48, 48]
    dec = onnx.load(str(out / "decoder.onnx"))
    assert _dims(dec.graph.input[1]) == ["batch", 36]
    assert {c["visible"] for c in b.graph("encoder").parity["cases"]} == {1, 9, 18, 36}
    # Independent reference: the checkpoint's grids resized with the model module's bicubic interpolation.
    model, _ = load_model(ckpt_dir)
    expected = interpolate_pos_embed(model.pos_embed.detach(), 6)
    assert not torch.allclose(expected[:, 1:7], model.pos_embed[:, 1:7])  # it really changed
    resized = resize_model(model, 48)
    assert torch.equal(resized.pos_embed, expected)
    assert torch.equal(resized.decoder_pos_embed, interpolate_pos_embed(model.decoder_pos_embed.detach(), 6))
    assert model.config.img_size == 32 and model.pos_embed.shape[1] == 17  # the original is untouched
    x = np.random.default_rng(0).standard_normal((2, 3, 48, 48)).astype(np.float32)
    ids_keep, ids_restore = _masks(2, 9, 36)
    latent = ort_session(out / "encoder.onnx").run(None, {"pixel_values": x, "ids_keep": ids_keep})[0]
    with torch.no_grad():
        ref = resized.forward_encoder(torch.from_numpy(x), torch.from_numpy(ids_keep)).numpy()
    np.testing.assert_allclose(latent, ref, atol=1e-4)


def test_image_size_must_be_a_multiple_of_the_patch(ckpt_dir, tmp_path):
    r = _cli(str(ckpt_dir), "--out", str(tmp_path / "b"), "--image-size", "50")
    assert r.exit_code == 3
    assert "multiple of the patch size 8" in r.output
    assert not (tmp_path / "b").exists()


def test_external_data_is_relative_and_the_bundle_moves(tmp_path):
    """The ViT-H path (weights in .onnx.data), forced on the tiny model; then the bundle is moved."""
    model = _model(seed=5)
    rep = export_bundle(model, tmp_path / "ext", precisions=("fp32", "fp16", "int8"), external_data=True, progress=None)
    m = rep.manifest
    for g in m["graphs"]:
        assert g["external_data"] == [g["file"] + ".data"], g
        assert (tmp_path / "ext" / g["external_data"][0]).stat().st_size > 10_000
        assert g["file"] + ".data" in m["files"]
    proto = onnx.load(str(tmp_path / "ext" / "encoder.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"encoder.onnx.data"}
    enc_bytes = sum(v.numel() * 4 for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask")))
    assert (tmp_path / "ext" / "encoder.onnx.data").stat().st_size >= 0.9 * enc_bytes  # the weights are there

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / "ext", moved)
    shutil.rmtree(tmp_path / "ext")
    b = Bundle.load(moved)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids_keep, ids_restore = _masks(2, 4, L_TEST)
    latent = ort_session(b.graph_path("encoder")).run(None, {"pixel_values": x, "ids_keep": ids_keep})[0]
    pred = ort_session(b.graph_path("decoder")).run(None, {"latent": latent, "ids_restore": ids_restore})[0]
    latent8 = ort_session(b.graph_path("encoder", "int8")).run(None, {"pixel_values": x, "ids_keep": ids_keep})[0]
    latent16 = ort_session(b.graph_path("encoder", "fp16")).run(None, {"pixel_values": x, "ids_keep": ids_keep})[0]
    with torch.no_grad():
        lt = model.forward_encoder(torch.from_numpy(x), torch.from_numpy(ids_keep))
        pt = model.forward_decoder(lt, torch.from_numpy(ids_restore))
    np.testing.assert_allclose(latent, lt.numpy(), atol=1e-4)
    np.testing.assert_allclose(pred, pt.numpy(), atol=1e-4)
    for variant in (latent8, latent16):
        cos = (variant * lt.numpy()).sum() / np.linalg.norm(variant) / np.linalg.norm(lt.numpy())
        assert cos > 0.99


def test_encoder_only_official_checkpoint(tmp_path):
    """An official encoder-only .pth ({'model': ...} without decoder keys) gives an encoder-only bundle."""
    model = _model(seed=2, decoder_depth=0)
    torch.save({"model": model.state_dict()}, tmp_path / "mae_pretrain_vit_test.pth")
    r = _cli(str(tmp_path / "mae_pretrain_vit_test.pth"), "--out", str(tmp_path / "b"))
    assert r.exit_code == 0, r.output
    b = Bundle.load(tmp_path / "b")
    assert not b.has_decoder and [g.file for g in b.graphs] == ["encoder.onnx"]
    assert b.manifest["source"]["format"] == "official"
    r = _cli(str(tmp_path / "mae_pretrain_vit_test.pth"), "--out", str(tmp_path / "b2"), "--parts", "encoder,decoder")
    assert r.exit_code == 3 and "no decoder" in r.output


# ---------------------------------------------------------------------------------------------------
# Atomic writes, overwrite, failing verification
# ---------------------------------------------------------------------------------------------------


def test_existing_bundle_needs_overwrite_and_is_replaced_whole(ckpt_dir, tmp_path):
    out = tmp_path / "b"
    export_bundle(ckpt_dir, out, parts="encoder", progress=None)
    first = (out / "mae.json").read_text()
    with pytest.raises(InputError, match="--overwrite"):
        export_bundle(ckpt_dir, out, parts="encoder", progress=None)
    r = _cli(str(ckpt_dir), "--out", str(out), "--parts", "encoder")
    assert r.exit_code == 3 and "--overwrite" in r.output
    assert (out / "mae.json").read_text() == first
    export_bundle(ckpt_dir, out, precisions="int8", overwrite=True, progress=None)
    b = Bundle.load(out)
    assert b.precisions("encoder") == ["fp32", "int8"] and b.has_decoder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp or old dirs left


def test_failed_verification_leaves_nothing_and_keeps_the_old_bundle(ckpt_dir, tmp_path, monkeypatch):
    out = tmp_path / "b"
    export_bundle(ckpt_dir, out, parts="encoder", progress=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A threshold no real export meets (diffs are ~1e-6, never all exactly 0): the real check must fail.
    monkeypatch.setattr(bundle_writer, "verify_fp32", functools.partial(verify_fp32, threshold=0.0))
    r = _cli(str(ckpt_dir), "--out", str(out), "--overwrite")
    assert r.exit_code == 5, r.output
    assert "disagrees with PyTorch" in r.output and "no bundle was written" in r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = _cli(str(ckpt_dir), "--out", str(tmp_path / "new"))
    assert r.exit_code == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_killed_export_leaves_nothing_after_the_next_run(ckpt_dir, tmp_path):
    """kill -9 mid-export leaves its staging dir; the next export into the same --out removes it."""
    out = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mae_deploy.cli", "export", str(ckpt_dir), "--out", str(out)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while proc.poll() is None and not list(tmp_path.glob(".b.tmp-*")):
            time.sleep(0.02)
        assert proc.poll() is None, "the export ended before its staging directory was seen"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert list(tmp_path.glob(".b.tmp-*")) and not out.exists()
    r = _cli(str(ckpt_dir), "--out", str(out), "--parts", "encoder", "--skip-verify")
    assert r.exit_code == 0, r.output
    assert "left by an export that was killed" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging dir, no lock file


def test_a_second_export_into_the_same_out_is_refused(ckpt_dir, tmp_path):
    out = tmp_path / "b"
    with ExportLock(out):
        (tmp_path / ".b.tmp-running").mkdir()  # the running export's staging dir: must survive
        r = _cli(str(ckpt_dir), "--out", str(out), "--skip-verify")
        assert r.exit_code == 3, r.output
        assert f"another export into {out} is running (pid {os.getpid()})" in r.output
        assert (tmp_path / ".b.tmp-running").is_dir()
    r = _cli(str(ckpt_dir), "--out", str(out), "--skip-verify", "--parts", "encoder")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_bundle_files_are_0644_and_directories_0755(ckpt_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = export_bundle(
            ckpt_dir, tmp_path / "b", parts="encoder", verify=False, reference_weights=True, progress=None
        ).bundle
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for p in out.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


def test_nan_weights_are_named_and_not_blamed_on_the_opset(tmp_path):
    model = _model()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
        model.norm.bias[1] = float("inf")
    ckpt = tmp_path / "nan"
    save_native(model, ckpt)
    r = _cli(str(ckpt), "--out", str(tmp_path / "b"))
    assert r.exit_code == 3, r.output
    assert "blocks.0.attn.qkv.weight" in r.output and "norm.bias" in r.output
    assert "opset" not in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


# ---------------------------------------------------------------------------------------------------
# Clear errors through the CLI
# ---------------------------------------------------------------------------------------------------


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "mae_visualize_vit_base.pth"
    bad.write_bytes(b"\x80\x04not really a pickle" * 10)
    r = _cli(str(bad), "--out", str(tmp_path / "b"))
    assert r.exit_code == 3, r.output
    assert r.output.startswith("error: ") and str(bad.name) in r.output
    assert not (tmp_path / "b").exists()


def test_non_mae_checkpoint_is_a_clear_error(tmp_path):
    resnetish = {"conv1.weight": torch.randn(8, 3, 7, 7), "fc.weight": torch.randn(10, 8), "fc.bias": torch.zeros(10)}
    torch.save(resnetish, tmp_path / "resnet.pth")
    r = _cli(str(tmp_path / "resnet.pth"), "--out", str(tmp_path / "b"))
    assert r.exit_code == 3, r.output
    assert r.output.startswith("error: ") and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_unwritable_out_is_a_clear_error(ckpt_dir, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    r = _cli(str(ckpt_dir), "--out", str(tmp_path / "file.txt" / "bundle"))
    assert r.exit_code == 3, r.output
    assert "cannot create the parent directory" in r.output
    r = _cli(str(ckpt_dir), "--out", str(tmp_path / "file.txt"), "--overwrite")
    assert r.exit_code == 3 and "is a file" in r.output


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(ckpt_dir, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    r = _cli(str(ckpt_dir), "--out", str(tmp_path / "photos"), "--overwrite")
    assert r.exit_code == 3 and "not a bundle" in r.output
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"jpeg"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--parts", "decoder"], "needs the encoder"),
        (["--opset", "13"], "too old"),
    ],
)
def test_bad_options_are_clear_errors(ckpt_dir, tmp_path, args, message):
    r = _cli(str(ckpt_dir), "--out", str(tmp_path / "b"), *args)
    assert r.exit_code == 3, r.output
    assert message in r.output
    assert not (tmp_path / "b").exists()


def test_an_encoder_only_export_of_a_full_mae_has_a_reference_the_torch_runner_loads(tmp_path):
    # reference/ used to hold the decoder's weights under an encoder-only config: unloadable (bench: exit 3).
    from mae_deploy.features import FeatureExtractor

    model = _model()
    out = export_bundle(
        model, tmp_path / "b", parts="encoder", verify=False, reference_weights=True, progress=None
    ).bundle
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with FeatureExtractor(out, backend="torch", pool="mean") as ref, FeatureExtractor(out, pool="mean") as ort:
        np.testing.assert_allclose(ref.extract_pixels(x), ort.extract_pixels(x), atol=1e-4)


def test_the_test_graph_cache_keys_on_everything_a_graph_depends_on(tmp_path):
    """The suite's graph cache (tests/graph_cache.py) must never hand one model's graph to another."""
    from graph_cache import graph_key

    from training.model import VisionTransformer, get_config

    path = tmp_path / "encoder.onnx"
    base = graph_key(_model(), "encoder", path, 20, None)
    assert graph_key(_model(), "encoder", path, 20, None) == base  # same weights, same options
    changed = _model()
    with torch.no_grad():
        changed.blocks[0].attn.qkv.bias[0] += 1e-3
    others = [
        graph_key(changed, "encoder", path, 20, None),
        graph_key(_model(), "decoder", path, 20, None),
        graph_key(_model(), "encoder", tmp_path / "x.onnx", 20, None),
        graph_key(_model(), "encoder", path, 18, None),
        graph_key(_model(), "encoder", path, 20, True),
        graph_key(_model().train(), "encoder", path, 20, None),
    ]
    assert len({base, *others}) == 1 + len(others)
    torch.manual_seed(0)
    mean = VisionTransformer(get_config("mae_vit_test"), num_classes=3, global_pool=True)
    torch.manual_seed(0)
    cls = VisionTransformer(get_config("mae_vit_test"), num_classes=3, global_pool=False)
    assert graph_key(mean, "classifier", path, 20, None) != graph_key(cls, "classifier", path, 20, None)


@pytest.mark.parametrize("min_bytes, released", [(bundle_writer.RELEASE_MIN_BYTES, False), (0, True)])
def test_memory_is_released_between_stages_only_for_big_weights(tmp_path, monkeypatch, min_bytes, released):
    """A full collection costs ~0.4 s with torch loaded: worth it for ViT-H's gigabytes, not for 1 MB of weights."""
    calls = []
    monkeypatch.setattr(bundle_writer, "RELEASE_MIN_BYTES", min_bytes)
    monkeypatch.setattr(bundle_writer, "release_memory", lambda: calls.append(1))
    export_bundle(_model(), tmp_path / "b", parts=["encoder"], verify=False, progress=None)
    assert (len(calls) >= 2) is released  # after the graph and once the model is no longer needed
