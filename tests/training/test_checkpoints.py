"""Checkpoint interop: Hugging Face, timm and official layouts, native format, hostile files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_deploy.errors import CheckpointError
from training.checkpoints import (
    convert,
    detect_format,
    load_checkpoint,
    load_model,
    save_native,
    save_official,
)
from training.hf_layout import official_to_hf
from training.model import MaskedAutoencoderViT, VisionTransformer, create_model, get_config, random_masking

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

HF_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
    num_channels=3,
    decoder_hidden_size=24,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=3,
    decoder_intermediate_size=96,
    mask_ratio=0.75,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple[Path, object]:
    torch.manual_seed(0)
    cfg = transformers.ViTMAEConfig(**HF_TINY, norm_pix_loss=True)
    model = transformers.ViTMAEForPreTraining(cfg).eval()
    # Random init leaves LayerNorms at identity; perturb so the test sees every weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("hf") / "vitmae"
    model.save_pretrained(d)
    return d, model


def test_hf_parity_latent_pred_loss(hf_dir):
    d, hf = hf_dir
    assert detect_format(d) == "hf"
    ours, ckpt = load_model(d)
    assert ckpt.config.norm_eps == 1e-12 and ckpt.config.norm_pix_loss
    assert ckpt.config.decoder_num_heads == 3
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        latent_hf = hf.vit(pixel_values=imgs, noise=noise).last_hidden_state
        ids_keep, ids_restore, mask = random_masking(3, 16, 0.75, noise=noise)
        latent = ours.forward_encoder(imgs, ids_keep)
        pred = ours.forward_decoder(latent, ids_restore)
        loss = ours.forward_loss(imgs, pred, mask)
    assert torch.equal(mask, out.mask)
    assert (latent - latent_hf).abs().max() <= 1e-5
    assert (pred - out.logits).abs().max() <= 1e-5
    assert abs(loss.item() - out.loss.item()) <= 1e-5


def test_hf_roundtrip_keys(hf_dir):
    d, hf = hf_dir
    ckpt = load_checkpoint(d)
    back = official_to_hf(ckpt.state_dict)
    saved = {k: v for k, v in hf.state_dict().items()}
    from safetensors.torch import load_file

    on_disk = load_file(str(d / "model.safetensors"))
    # transformers 5 saves decoder layers under another name; compare on the encoder and top-level keys.
    for k, v in back.items():
        if k.startswith("vit.") or "decoder_layers" not in k:
            assert k in on_disk, k
            assert torch.equal(v, on_disk[k]), k
    assert saved  # the HF model itself is alive


def test_timm_features_parity(tmp_path):
    torch.manual_seed(1)
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "norm" in name or name in ("cls_token", "pos_embed"):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "timm_vit.pth"
    torch.save(tm.state_dict(), path)
    ours, ckpt = load_model(path)
    assert ckpt.format == "timm" and ckpt.parts == ["encoder"]
    assert ckpt.config.num_heads == 3 and ckpt.config.img_size == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tm.forward_features(x)
        got = ours.forward_encoder(x)
    assert (ref - got).abs().max() <= 1e-5
    assert any("reconstruction needs a decoder" in n for n in ckpt.notes)


def test_timm_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    m = create_model("mae_vit_test", decoder_depth=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    ckpt = load_checkpoint(tmp_path / "enc.safetensors")
    assert ckpt.format == "timm" and ckpt.config.name == "mae_vit_test"


def _same_outputs(a: MaskedAutoencoderViT, b: MaskedAutoencoderViT) -> None:
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        la, pa, ma = a(x, 0.75, noise)
        lb, pb, mb = b(x, 0.75, noise)
    assert torch.equal(pa, pb) and torch.equal(la, lb) and torch.equal(ma, mb)


def test_official_roundtrip_and_native(tmp_path):
    torch.manual_seed(2)
    m = create_model("mae_vit_test", norm_pix_loss=True).eval()
    pth = save_official(m, tmp_path / "mae_pretrain_vit_test_full.pth")
    assert detect_format(pth) == "official"
    native = tmp_path / "native"
    ckpt = convert(pth, native)
    assert ckpt.format == "official" and ckpt.parts == ["encoder", "decoder"]
    assert ckpt.config.norm_pix_loss is True
    back, ck2 = load_model(native)
    assert ck2.format == "native" and ck2.config == ckpt.config
    sd_a, sd_b = m.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    _same_outputs(m, back)
    # native -> official -> native again is the identity too
    pth2 = save_official(back, tmp_path / "again.pth")
    again, _ = load_model(pth2, norm_pix_loss=True)
    _same_outputs(m, again)
    meta = json.loads((native / "config.json").read_text())
    assert meta["format"] == "mae-deploy-checkpoint" and meta["source"]["format"] == "official"


def test_native_refuses_overwrite(tmp_path):
    m = create_model("mae_vit_test")
    save_native(m, tmp_path / "n")
    with pytest.raises(CheckpointError, match="already exists"):
        save_native(m, tmp_path / "n")
    save_native(m, tmp_path / "n", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert (tmp_path / "n").stat().st_mode & 0o055 == 0o055  # readable by others, unlike a mkdtemp dir


def test_visualize_checkpoint_predicts_raw_pixels(tmp_path):
    m = create_model("mae_vit_test")
    pth = save_official(m, tmp_path / "mae_visualize_vit_test.pth")
    assert load_checkpoint(pth).config.norm_pix_loss is False


def test_encoder_only_checkpoint_notes_decoder(tmp_path):
    m = create_model("mae_vit_test", decoder_depth=0)
    pth = save_official(m, tmp_path / "mae_pretrain_vit_test.pth")
    ckpt = load_checkpoint(pth)
    assert ckpt.parts == ["encoder"]
    assert any("reconstruction needs a decoder" in n for n in ckpt.notes)


def test_finetuned_checkpoint_loads_as_classifier(tmp_path):
    cfg = get_config("mae_vit_test")
    clf = VisionTransformer(cfg, num_classes=7, global_pool=True)
    pth = save_official(clf, tmp_path / "mae_finetuned_vit_test.pth")
    model, ckpt = load_model(pth)
    assert isinstance(model, VisionTransformer) and ckpt.num_classes == 7 and ckpt.global_pool
    assert ckpt.parts == ["encoder", "head"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), clf.eval()(x))


def test_training_checkpoint_with_args_and_optimizer(tmp_path):
    import argparse

    m = create_model("mae_vit_test")
    opt = torch.optim.AdamW(m.parameters())
    args = argparse.Namespace(model="mae_vit_test", norm_pix_loss=False, blr=1.5e-4)
    torch.save(
        {"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "args": args, "scaler": {}},
        tmp_path / "checkpoint-3.pth",
    )
    ckpt = load_checkpoint(tmp_path / "checkpoint-3.pth")
    assert ckpt.config.name == "mae_vit_test" and ckpt.config.norm_pix_loss is False
    assert any("epoch 3" in n for n in ckpt.notes)


def test_ddp_prefix_is_stripped(tmp_path):
    m = create_model("mae_vit_test")
    torch.save({"model": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "ddp.pth")
    assert load_checkpoint(tmp_path / "ddp.pth").config.name == "mae_vit_test"


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_truncated_and_garbage_files(tmp_path):
    m = create_model("mae_vit_test")
    pth = save_official(m, tmp_path / "full.pth")
    data = pth.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "text.pth")
    (tmp_path / "garbled.pth").write_bytes(b"\x80\x04\x95garbage bytes here")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as e:
        load_checkpoint(tmp_path / "garbled.pth")
    assert "references code" not in str(e.value)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")


def test_not_mae_and_mismatched_keys(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="does not look like an MAE/ViT checkpoint"):
        load_checkpoint(tmp_path / "resnet.pth")
    sd = create_model("mae_vit_test").state_dict()
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    sd["blocks.0.norm1.weight"] = torch.zeros(5)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "missing keys: blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys: blocks.0.extra.weight" in msg
    assert "blocks.0.norm1.weight (5,)" in msg


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process: exit code and streams as a shell sees them."""
    return subprocess.run([sys.executable, "-m", "mae_deploy.cli", *args], capture_output=True, text=True)


def _cli_here(*args: str) -> subprocess.CompletedProcess:
    """The same command in this process (click's runner): no interpreter and torch start-up per call."""
    from click.testing import CliRunner

    from mae_deploy.cli import main

    r = CliRunner().invoke(main, list(args))
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def test_cli_convert_and_info_all_kinds(tmp_path, hf_dir):
    d, _ = hf_dir
    pth = save_official(create_model("mae_vit_test"), tmp_path / "m_full.pth")
    r = _cli("convert", str(d), str(tmp_path / "from_hf"))
    assert r.returncode == 0, r.stderr
    r = _cli_here("convert", str(pth), str(tmp_path / "from_pth"))
    assert r.returncode == 0, r.stderr
    for src, fmt in ((d, "hf"), (pth, "official"), (tmp_path / "from_hf", "native")):
        r = _cli_here("info", str(src), "--json")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["format"] == fmt and info["parts"] == ["encoder", "decoder"]
        assert info["parameters"]["total"] > 0
    r = _cli_here("info", str(pth))
    assert "mae_vit_test" in r.stdout and "norm-pix" in r.stdout
    # The HF directory converted to native loads back identically.
    a, _ = load_model(d)
    b, _ = load_model(tmp_path / "from_hf")
    _same_outputs_any(a, b)
    # Refused without --overwrite, with exit code 3 and a one-line message.
    r = _cli("convert", str(pth), str(tmp_path / "from_pth"))
    assert r.returncode == 3 and "already exists" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 10)
    r = _cli_here("info", str(tmp_path / "junk.pth"))
    assert r.returncode == 3 and "error:" in r.stderr and "Traceback" not in r.stderr


def _same_outputs_any(a, b) -> None:
    cfg = a.config
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    noise = torch.rand(2, cfg.num_patches)
    with torch.no_grad():
        assert torch.equal(a(x, 0.75, noise)[1], b(x, 0.75, noise)[1])
