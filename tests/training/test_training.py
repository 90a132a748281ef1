"""Training: the official recipes' formulas, pretraining, exact resume, DDP, fine-tuning, linear probing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mae_deploy.cli import main as cli
from mae_deploy.errors import InputError
from training import finetune, gpu_data, linprobe, pretrain
from training.checkpoints import load_model, save_native, save_official
from training.data import (
    MixupCutmix,
    channel_stats,
    image_folder,
    parse_rand_augment,
    pretrain_transform,
    write_digits_imagefolder,
)
from training.loop import NonFiniteLossError, build_classifier
from training.model import MaskedAutoencoderViT, VisionTransformer, create_model
from training.optim import (
    LARS,
    adjust_learning_rate,
    effective_lr,
    lr_at,
    param_groups_layer_decay,
    param_groups_weight_decay,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "mae_vit_test", "--input_size", "32", "--num_workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """12 real digits per class (100 train / 20 val), 32x32 greyscale."""
    root = tmp_path_factory.mktemp("digits") / "d"
    write_digits_imagefolder(root, size=32, per_class=12)
    return root


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _pretrain_args(digits: Path, out: Path, *extra: str):
    return pretrain.get_args_parser().parse_args(
        [
            *TINY,
            "--in_chans",
            "1",
            "--norm_pix_loss",
            "--batch_size",
            "16",
            "--blr",
            "5e-3",
            "--warmup_epochs",
            "1",
            "--data_path",
            str(digits),
            "--output_dir",
            str(out),
            *extra,
        ]
    )


# --------------------------------------------------------------------------------------------------
# Recipes: formulas on known values
# --------------------------------------------------------------------------------------------------


def test_lr_schedule_matches_the_official_formula():
    assert effective_lr(1.5e-4, 64, accum_iter=4, world_size=8) == pytest.approx(1.5e-4 * 2048 / 256)
    lr, min_lr = 1e-3, 1e-6
    assert lr_at(0.0, lr, min_lr, 10, 2) == 0.0
    assert lr_at(1.0, lr, min_lr, 10, 2) == pytest.approx(5e-4)  # half-way through the linear warm-up
    assert lr_at(2.0, lr, min_lr, 10, 2) == pytest.approx(lr)
    assert lr_at(6.0, lr, min_lr, 10, 2) == pytest.approx(min_lr + (lr - min_lr) * 0.5)  # cos(pi/2) = 0
    assert lr_at(4.0, lr, min_lr, 10, 2) == pytest.approx(min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(10.0, lr, min_lr, 10, 2) == pytest.approx(min_lr)
    model = VisionTransformer(create_model("mae_vit_test").config, num_classes=5)
    opt = torch.optim.AdamW(param_groups_layer_decay(model, 0.05, layer_decay=0.5), lr=1.0)
    base = adjust_learning_rate(opt, 1.0, lr, min_lr, 10, 2)
    assert base == pytest.approx(5e-4)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([5e-4 * 0.5**3, 5e-4 * 0.25, 5e-4 * 0.5, 5e-4])


def test_layer_decay_groups_use_the_official_layer_ids():
    model = VisionTransformer(create_model("mae_vit_test").config, num_classes=5)  # depth 2 -> num_layers 3
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    where = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert where["cls_token"] == (0.75**3, 0.0)
    assert where["pos_embed"] == (0.75**3, 0.0)
    assert where["patch_embed.proj.weight"] == (0.75**3, 0.05)
    assert where["patch_embed.proj.bias"] == (0.75**3, 0.0)
    assert where["blocks.0.attn.qkv.weight"] == (0.75**2, 0.05)
    assert where["blocks.0.norm1.weight"] == (0.75**2, 0.0)
    assert where["blocks.1.mlp.fc2.weight"] == (0.75, 0.05)
    assert where["fc_norm.weight"] == (1.0, 0.0)
    assert where["head.weight"] == (1.0, 0.05)
    assert where["head.bias"] == (1.0, 0.0)
    assert len(where) == sum(1 for p in model.parameters() if p.requires_grad)
    assert len(groups) == 8  # layers 0..3, each with decay and no-decay parameters


def test_pretraining_weight_decay_skips_norms_biases_and_tokens():
    model = create_model("mae_vit_test")
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "decoder_pred.bias"} <= set(no_decay["param_names"])
    assert {"blocks.0.attn.qkv.weight", "decoder_pred.weight", "patch_embed.proj.weight"} <= set(decay["param_names"])
    assert "pos_embed" not in no_decay["param_names"] + decay["param_names"]  # fixed sin-cos, not trained
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_lars_step_matches_its_formula():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3))
    w.grad, b.grad = torch.randn(3, 4), torch.randn(3)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    d = gw + 0.1 * w0
    d = d * (0.001 * w0.norm() / d.norm())
    torch.testing.assert_close(w.detach(), w0 - 0.5 * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # 1-D: no decay, no trust scaling
    opt.step()  # momentum: m = 0.9 m + d'
    w1 = w0 - 0.5 * d
    d2 = gw + 0.1 * w1
    d2 = d2 * (0.001 * w1.norm() / d2.norm())
    torch.testing.assert_close(w.detach(), w1 - 0.5 * (0.9 * d + d2))


def test_mixup_cutmix_targets_are_smoothed_distributions():
    torch.manual_seed(0)
    mix = MixupCutmix(num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1)
    images, targets = mix(torch.randn(8, 1, 32, 32), torch.arange(8))
    assert images.shape == (8, 1, 32, 32) and targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert targets.min() >= 0.01 - 1e-6 and targets.max() <= 0.91 + 1e-6
    assert (targets > 0.02).sum(1).ge(1).all()
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == {"num_ops": 2, "magnitude": 9}
    assert parse_rand_augment("rand-m7-n3") == {"num_ops": 3, "magnitude": 7}


def test_mask_token_baseline_encodes_all_tokens():
    torch.manual_seed(0)
    model = pretrain.MaskTokenMAE(create_model("mae_vit_test").config)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    loss, pred, mask = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
    loss.backward()
    assert seen == [(2, 1 + 16, 32)]  # cls + all L patches, not L/4
    assert pred.shape == (2, 16, 192) and mask.sum() == 2 * 12
    assert model.encoder_mask_token.grad.abs().sum() > 0
    assert set(model.as_mae().state_dict()) == set(create_model("mae_vit_test").state_dict())


# --------------------------------------------------------------------------------------------------
# Pretraining, resume, non-finite loss, DDP
# --------------------------------------------------------------------------------------------------


def test_tiny_pretraining_lowers_the_loss(digits, tmp_path):
    out = tmp_path / "run"
    pretrain.main(_pretrain_args(digits, out, "--epochs", "8"))
    trained, ckpt = load_model(out / "model")
    assert ckpt.format == "native" and ckpt.config.norm_pix_loss and ckpt.config.in_chans == 1
    torch.manual_seed(1)
    untrained = create_model(ckpt.config)
    imgs = torch.stack([pretrain_transform(32, 1)(Image.open(p)) for p in sorted((digits / "val").rglob("*.png"))])
    noise = torch.rand(imgs.shape[0], 16)
    with torch.no_grad():
        before = untrained(imgs, noise=noise)[0].item()
        after = trained(imgs, noise=noise)[0].item()
    assert after < 0.8 * before, (before, after)
    losses = [r["train_loss"] for r in _metrics(out)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert (out / "checkpoint-0.pth").exists() and (out / "checkpoint-7.pth").exists()


def test_mask_token_baseline_pretrains_and_exports_as_a_plain_mae(digits, tmp_path):
    out = tmp_path / "baseline"
    pretrain.main(_pretrain_args(digits, out, "--epochs", "1", "--mask_token_encoder"))
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert "encoder_mask_token" in state["model"]
    model, ckpt = load_model(out / "model")  # native: the standard architecture, mask token dropped
    assert torch.equal(model.cls_token, state["model"]["cls_token"])


def test_resume_continues_exactly(digits, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ("--epochs", "3", "--save_freq", "1", "--accum_iter", "2", "--precision", "bf16")
    pretrain.main(_pretrain_args(digits, a, *extra))
    pretrain.main(_pretrain_args(digits, b, *extra, "--resume", str(a / "checkpoint-0.pth")))
    full, resumed = _metrics(a), _metrics(b)
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full[1:]]  # bit-equal
    sa, sb = load_model(a / "model")[0].state_dict(), load_model(b / "model")[0].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(digits, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = MaskedAutoencoderViT.forward_loss

    def poisoned(self, imgs, pred, mask):
        calls["n"] += 1
        loss = real(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] > 8 else loss  # 6 steps per epoch: NaN in epoch 1

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, iteration 2.*checkpoint-last\.pth"):
        pretrain.main(_pretrain_args(digits, out, "--epochs", "3", "--save_freq", "1"))
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "model").exists() and not (out / "checkpoint-1.pth").exists()
    assert [r["epoch"] for r in _metrics(out)] == [0]


def test_two_process_ddp_on_gloo(digits, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.pretrain",
        *TINY,
        "--in_chans",
        "1",
        "--batch_size",
        "8",
        "--epochs",
        "2",
        "--warmup_epochs",
        "1",
        "--data_path",
        str(digits),
        "--output_dir",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) on cpu" in r.stdout and r.stdout.count("pretraining mae_vit_test") == 1  # rank 0 logs
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert [r["epoch"] for r in _metrics(out)] == [0, 1]  # one writer
    assert "6 steps/epoch" in r.stdout  # 100 images / (2 processes x 8), last partial batch dropped
    load_model(out / "model")


# --------------------------------------------------------------------------------------------------
# --gpu_decode: decoding and augmentation on the training device (run here on CPU tensors)
# --------------------------------------------------------------------------------------------------


def _photos(root: Path, n: int = 6) -> Path:
    """JPEGs of assorted sizes with smooth gradients and noise (photo-like, not flat)."""
    rng = np.random.default_rng(0)
    (root / "c0").mkdir(parents=True)
    for i in range(n):
        h, w = int(rng.integers(60, 300)), int(rng.integers(60, 300))
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 255 / w, y * 255 / h, (x + y) % 64 * 4], -1) + rng.normal(0, 10, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "c0" / f"{i}.jpg", quality=90)
    return root


@pytest.mark.parametrize("kind, in_chans, size", [("digits", 1, 32), ("jpeg", 3, 64), ("jpeg", 1, 48)])
def test_device_augmentation_is_the_cpu_transform(digits, tmp_path, kind, in_chans, size):
    root = digits / "val" if kind == "digits" else _photos(tmp_path / "photos")
    reference = image_folder(root, pretrain_transform(size, in_chans), in_chans, log=None)
    encoded = gpu_data.EncodedImageFolder(root, in_chans, log=None)
    assert encoded.samples == reference.samples and encoded.classes == reference.classes
    torch.manual_seed(5)
    expected = torch.stack([reference[i][0] for i in range(len(reference))])
    torch.manual_seed(5)
    data, labels, paths = gpu_data.collate_encoded([encoded[i] for i in range(len(encoded))])
    got = gpu_data.DeviceAugment(size, in_chans, "cpu")(data, paths)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert labels.tolist() == [t for _, t in reference.samples]
    # Same crop boxes and flips (one wrong box would differ by tens of levels); pixels within 2 of 255
    # levels (Pillow's and torchvision's bicubic round differently; JPEG colour/grey conversion).
    std = torch.tensor(channel_stats(in_chans)[1]).view(1, -1, 1, 1)
    levels = ((got - expected) * std * 255).abs()
    assert levels.max() <= 2.01 and levels.mean() < 0.1, (levels.max(), levels.mean())


def test_device_decode_names_a_file_it_cannot_decode(tmp_path):
    good = _photos(tmp_path / "p", n=1) / "c0" / "0.jpg"
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0" + b"\x00" * 64), dtype=torch.uint8)
    augment = gpu_data.DeviceAugment(32, 3, "cpu")
    data = [torch.frombuffer(bytearray(good.read_bytes()), dtype=torch.uint8), bad]
    with pytest.raises(InputError, match=r"cannot decode image /x/broken\.jpg .*--resume auto"):
        augment(data, [str(good), "/x/broken.jpg"])
    assert augment(data[:1], [str(good)]).shape == (1, 3, 32, 32)


def test_gpu_decode_pretraining_follows_the_cpu_path(digits, tmp_path, capsys):
    cpu, dev = tmp_path / "cpu", tmp_path / "dev"
    pretrain.main(_pretrain_args(digits, cpu, "--epochs", "2"))
    pretrain.main(_pretrain_args(digits, dev, "--epochs", "2", "--gpu_decode"))
    assert "decoded and augmented on cpu (--gpu_decode)" in capsys.readouterr().out
    # Same seed, same draws: the same crops, flips and masks; pixels within 2/255.
    for a, b in zip(_metrics(cpu), _metrics(dev), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-2)
    load_model(dev / "model")


# --------------------------------------------------------------------------------------------------
# Fine-tuning and linear probing from checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mae_checkpoints(tmp_path_factory):
    """One MAE (greyscale, perturbed norms) as an official .pth and as a native directory."""
    torch.manual_seed(3)
    mae = create_model("mae_vit_test", in_chans=1).eval()
    with torch.no_grad():
        for name, p in mae.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("ckpt")
    save_official(mae, d / "mae_pretrain_test.pth")
    save_native(mae, d / "native")
    return mae, d / "mae_pretrain_test.pth", d / "native"


def test_finetune_from_converted_checkpoints_starts_at_the_same_features(mae_checkpoints):
    mae, pth, native = mae_checkpoints
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        ref = mae.forward_encoder(x)[:, 0]
        for path in (pth, native):
            clf = build_classifier(str(path), "unused", 10, global_pool=False, input_size=32, log=lambda _m: None)
            torch.testing.assert_close(clf.eval().forward_features(x), ref, atol=1e-6, rtol=1e-5)
        bigger = build_classifier(str(pth), "unused", 10, global_pool=True, input_size=48, log=lambda _m: None)
    assert bigger.pos_embed.shape == (1, 1 + 36, 32)  # 4x4 grid interpolated to 6x6
    assert bigger.eval()(torch.randn(2, 1, 48, 48)).shape == (2, 10)


def test_finetune_runs_with_the_full_recipe(digits, mae_checkpoints, tmp_path, capsys):
    _, pth, _ = mae_checkpoints
    out = tmp_path / "ft"
    args = finetune.get_args_parser().parse_args(
        [
            *TINY,
            "--finetune",
            str(pth),
            "--batch_size",
            "16",
            "--epochs",
            "2",
            "--warmup_epochs",
            "1",
            "--mixup",
            "0.8",
            "--cutmix",
            "1.0",
            "--reprob",
            "0.25",
            "--clip_grad",
            "5",
            "--data_path",
            str(digits),
            "--output_dir",
            str(out),
            "--log_dir",
            str(tmp_path / "tb"),
        ]
    )
    finetune.main(args)
    records = _metrics(out)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(0 <= r["test_acc1"] <= r["test_acc5"] <= 100 and r["test_count"] == 20 for r in records)
    model, ckpt = load_model(out / "model")
    assert ckpt.is_classifier and ckpt.num_classes == 10 and ckpt.global_pool
    assert (out / "checkpoint-best.pth").exists() and (out / "model-best" / "config.json").exists()
    assert any((tmp_path / "tb").iterdir())  # TensorBoard events
    best = max(r["test_acc1"] for r in records)
    args = finetune.get_args_parser().parse_args(
        [
            *TINY,
            "--finetune",
            str(pth),
            "--eval",
            "--resume",
            str(out / "checkpoint-best.pth"),
            "--data_path",
            str(digits),
            "--output_dir",
            "",
        ]
    )
    finetune.main(args)
    assert f"test_acc1 {best:.2f}" in capsys.readouterr().out  # the kept checkpoint is the best epoch


def test_linprobe_freezes_the_encoder_and_folds_batchnorm(digits, mae_checkpoints, tmp_path):
    mae, _, native = mae_checkpoints
    out = tmp_path / "lp"
    linprobe.main(
        linprobe.get_args_parser().parse_args(
            [
                *TINY,
                "--finetune",
                str(native),
                "--batch_size",
                "16",
                "--epochs",
                "2",
                "--warmup_epochs",
                "1",
                "--blr",
                "10",
                "--data_path",
                str(digits),
                "--output_dir",
                str(out),
            ]
        )
    )
    probe, ckpt = load_model(out / "model")
    assert ckpt.num_classes == 10 and not ckpt.global_pool
    for k, v in mae.state_dict().items():
        if k.startswith(("blocks", "patch_embed", "cls_token", "norm")):
            assert torch.equal(probe.state_dict()[k], v), k  # frozen
    assert _metrics(out)[-1]["test_count"] == 20
    # Folding: BatchNorm (no affine) + Linear == one Linear, in eval mode.
    torch.manual_seed(0)
    clf = VisionTransformer(mae.config, 10)
    clf.head = torch.nn.Sequential(torch.nn.BatchNorm1d(32, affine=False, eps=1e-6), clf.head)
    clf.head[0].running_mean.normal_()
    clf.head[0].running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(linprobe.fold_probe_head(clf)(x), clf.eval()(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_cli_digits_writes_an_image_folder(tmp_path):
    d = tmp_path / "digits"
    r = CliRunner().invoke(cli, ["data", "digits", str(d)])
    assert r.exit_code == 0, r.output
    pngs = sorted(d.rglob("*.png"))
    assert len(pngs) == 1797
    assert sorted(p.name for p in (d / "train").iterdir()) == [str(i) for i in range(10)]
    assert len(list((d / "val").rglob("*.png"))) == 359
    with Image.open(pngs[0]) as im:
        assert im.size == (32, 32) and im.mode == "L"
    pngs[5].unlink()  # an interrupted write resumes; a finished one is a no-op
    (d / "digits.json").unlink()
    r = CliRunner().invoke(cli, ["data", "digits", str(d)])
    assert r.exit_code == 0 and len(list(d.rglob("*.png"))) == 1797
    r = CliRunner().invoke(cli, ["data", "digits", str(d), "--size", "16"])
    assert r.exit_code == 3 and "other settings" in r.output


def test_cli_training_commands_show_the_official_options():
    r = CliRunner().invoke(cli, ["pretrain", "--help"])
    assert r.exit_code == 0
    for opt in ("--blr", "--norm_pix_loss", "--accum_iter", "--mask_ratio", "--warmup_epochs", "--resume"):
        assert opt in r.output
    r = CliRunner().invoke(cli, ["finetune", "--help"])
    for opt in ("--layer_decay", "--drop_path", "--mixup", "--cutmix", "--smoothing", "--reprob", "--aa"):
        assert opt in r.output
    r = CliRunner().invoke(cli, ["linprobe", "--data_path", "/nonexistent", "--device", "cpu"])
    assert r.exit_code == 3 and "does not exist" in r.output
