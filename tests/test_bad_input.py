"""Every bad input is exit 3 (7 for a missing device, 130 for Ctrl-C) with the culprit named, never a
traceback: checkpoints, config.json / mae.json, training options, reconstruct and convert outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mae_deploy.bundle import Bundle
from mae_deploy.cli import main
from mae_deploy.errors import BundleError, CheckpointError
from training import checkpoints
from training.checkpoints import load_checkpoint, save_native, save_official
from training.data import write_digits_imagefolder
from training.model import create_model

TINY = ["--model", "mae_vit_test", "--input_size", "32", "--num_workers", "0", "--device", "cpu"]


def _run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _fails(r, code: int, *culprits: str) -> None:
    """Exit ``code`` with every culprit in the message and no traceback."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output, r.output
    for c in culprits:
        assert c in r.output, (c, r.output)


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_native(create_model("mae_vit_test"), tmp_path_factory.mktemp("native") / "ckpt")


@pytest.fixture
def native_copy(native, tmp_path) -> Path:
    return Path(shutil.copytree(native, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "d"
    write_digits_imagefolder(root, size=32, per_class=4)
    return root


# --------------------------------------------------------------------------------------------------
# Checkpoint files: empty, not regular, NaN weights
# --------------------------------------------------------------------------------------------------


def test_an_empty_pth_is_named_by_every_command_that_reads_one(tmp_path, tiny_bundle):
    empty = tmp_path / "mae_pretrain_vit_base.pth"
    empty.touch()
    for args in (
        ("info", empty),
        ("convert", empty, tmp_path / "dst"),
        ("export", empty, "--out", tmp_path / "b"),
        (
            "reconstruct",
            tmp_path / "x.png",
            "--bundle",
            tiny_bundle,
            "--out",
            tmp_path / "r",
            "--backend",
            "torch",
            "--checkpoint",
            empty,
        ),
        ("pretrain", *TINY, "--resume", empty, "--output_dir", tmp_path / "run"),
    ):
        _fails(_run(*args), 3, str(empty), "empty (0 bytes)")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "b").exists()


def test_a_fifo_or_a_device_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)  # reading it would block forever
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(CheckpointError, match="is not a regular file") as e:
            load_checkpoint(path)
        assert "empty" not in str(e.value)
    _fails(_run("info", fifo), 3, str(fifo), "not a regular file")


def test_nan_weights_are_named_by_info_and_refused_by_convert(tmp_path):
    model = create_model("mae_vit_test")
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[0, 0] = float("nan")
        model.decoder_pred.bias[3] = float("inf")
    src = save_official(model, tmp_path / "mae_full.pth")
    assert load_checkpoint(src).nonfinite == ["blocks.1.attn.qkv.weight", "decoder_pred.bias"]
    r = _run("info", src)
    _fails(r, 3, "blocks.1.attn.qkv.weight", "decoder_pred.bias", "NaN or inf")
    assert "parameters" in r.output  # described first, then refused
    _fails(_run("convert", src, tmp_path / "dst"), 3, "blocks.1.attn.qkv.weight", "decoder_pred.bias")
    assert not (tmp_path / "dst").exists()


# --------------------------------------------------------------------------------------------------
# config.json and mae.json: one validator, every field
# --------------------------------------------------------------------------------------------------

BAD_ARCH = [
    ("depth", -1, "depth must be from 1"),
    ("depth", "four", "depth must be an integer"),
    ("depth", 1e9, "depth must be an integer"),
    ("depth", 10**9, "depth must be from 1 to 512"),
    ("num_heads", 0, "num_heads must be from 1"),
    ("patch_size", 0, "patch_size must be from 1"),
    ("mlp_ratio", -4, "mlp_ratio must be above 0"),
    ("img_size", 1e9, "img_size must be an integer"),
    ("img_size", 10**9, "img_size must be from 1 to 8192"),
    ("embed_dim", "abc", "embed_dim must be an integer"),
    ("num_heads", 5, "embed_dim 32 is not divisible by num_heads 5"),
    ("img_size", 36, "image size 36 is not divisible by patch size 8"),
    ("norm_eps", float("nan"), "norm_eps must be a number"),
    ("qkv_bias", "yes", "qkv_bias must be true or false"),
]


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize(("field", "value", "message"), BAD_ARCH)
def test_config_json_fields_are_checked_before_anything_is_built(native_copy, monkeypatch, field, value, message):
    _edit_json(native_copy / "config.json", lambda d: d["architecture"].update({field: value}))
    monkeypatch.setattr(checkpoints, "build_model", _never)
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(native_copy)
    assert "config.json" in str(e.value)


def test_config_json_without_architecture_or_a_field(native_copy):
    _edit_json(native_copy / "config.json", lambda d: d["architecture"].pop("depth"))
    with pytest.raises(CheckpointError, match="architecture lacks depth"):
        load_checkpoint(native_copy)
    _edit_json(native_copy / "config.json", lambda d: d.pop("architecture"))
    _fails(_run("info", native_copy), 3, "config.json lacks 'architecture'")


def _never(*_a, **_k):
    raise AssertionError("a model was built before the config was checked against the weights")


def test_a_config_that_disagrees_with_the_weights_fails_before_allocating(native_copy, monkeypatch):
    # Within the caps, but not what model.safetensors holds: refused from the safetensors header alone.
    _edit_json(native_copy / "config.json", lambda d: d["architecture"].update(depth=500, embed_dim=64))
    monkeypatch.setattr(checkpoints, "build_model", _never)
    monkeypatch.setattr(checkpoints, "_load_safetensors", _never)
    with pytest.raises(CheckpointError, match="does not match the weights") as e:
        load_checkpoint(native_copy)
    assert "depth is 500 but the weights hold 2 blocks" in str(e.value)
    assert "patch_embed.proj.weight is (32, 3, 8, 8), config.json implies (64, 3, 8, 8)" in str(e.value)


BAD_MANIFEST = [
    (lambda m: m.pop("architecture"), "lacks 'architecture'"),
    (lambda m: m["architecture"].update(depth=-1), "depth must be from 1"),
    (lambda m: m["architecture"].update(depth="four"), "depth must be an integer"),
    (lambda m: m["architecture"].update(num_heads=0), "num_heads must be from 1"),
    (lambda m: m["architecture"].update(patch_size=0), "patch_size must be from 1"),
    (lambda m: m["architecture"].update(mlp_ratio=-4), "mlp_ratio must be above 0"),
    (lambda m: m["architecture"].update(img_size=1e9), "img_size must be an integer"),
    (lambda m: m["architecture"].update(embed_dim="abc"), "embed_dim must be an integer"),
    (lambda m: m["preprocessing"].update(std=[0]), "preprocessing.std has 1 values for 3 channels"),
    (lambda m: m["preprocessing"].update(std=[0.2, 0.0, 0.2]), "must be above 0 for every channel"),
    (lambda m: m["preprocessing"].update(mean=[0.5, float("nan"), 0.5]), "every value must be a finite number"),
    (lambda m: m["preprocessing"].pop("mean"), "preprocessing lacks 'mean'"),
    (lambda m: m["preprocessing"].update(crop_pct=0), "crop_pct must be above 0"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_MANIFEST)
def test_mae_json_fields_are_checked_by_the_same_validator(tiny_bundle, tmp_path, edit, message):
    b = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    _edit_json(b / "mae.json", edit)
    with pytest.raises(BundleError, match=message):
        Bundle.load(b)


def test_mae_json_std_zero_is_exit_3_on_the_command_line(tiny_bundle, tmp_path):
    b = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    _edit_json(b / "mae.json", lambda m: m["preprocessing"].update(std=[0.0, 0.0, 0.0]))
    Image.new("RGB", (40, 40), "gray").save(tmp_path / "x.png")
    _fails(_run("reconstruct", tmp_path / "x.png", "--bundle", b, "--out", tmp_path / "r"), 3, "std", "NaN")


# --------------------------------------------------------------------------------------------------
# reconstruct and convert: bad seeds and unwritable outputs, refused before any work
# --------------------------------------------------------------------------------------------------


def test_reconstruct_seed_and_unwritable_out(tiny_bundle, tmp_path):
    Image.new("RGB", (40, 40), "gray").save(tmp_path / "x.png")
    _fails(
        _run("reconstruct", tmp_path / "x.png", "--bundle", tiny_bundle, "--out", tmp_path / "r", "--seed", "-1"),
        3,
        "--seed must be an integer from 0",
    )
    (tmp_path / "file").write_text("")
    missing = tmp_path / "no-such-bundle"  # the output is checked first: no bundle is even opened
    for out, why in (
        (tmp_path / "file" / "sub", "is a file, not a directory"),
        (tmp_path / "file", "exists and is not a directory"),
        (Path("/proc/mae-deploy-test"), "not writable"),
    ):
        _fails(_run("reconstruct", tmp_path / "x.png", "--bundle", missing, "--out", out), 3, str(out), why)


def test_convert_refuses_an_unwritable_destination_before_reading(native, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(checkpoints, "load_model", _never)
    _fails(_run("convert", native, tmp_path / "file" / "dst"), 3, "is a file, not a directory")
    _fails(_run("convert", native, "/proc/mae-deploy-test"), 3, "not writable")


# --------------------------------------------------------------------------------------------------
# Training options: one validation for pretrain, finetune and linprobe
# --------------------------------------------------------------------------------------------------

BAD_PRETRAIN = [
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--batch_size", "-4"], "--batch_size -4: must be at least 1"),
    (["--mask_ratio", "1.0"], "--mask_ratio 1: must be at least 0 and below 1"),
    (["--input_size", "30"], "--input_size 30 is not a multiple of mae_vit_test's patch size 8"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--epochs", "-1"], "--epochs -1: must be at least 1"),
    (["--blr", "nan"], "--blr nan"),
    (["--device", "tpu"], "--device 'tpu'"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_PRETRAIN)
def test_pretrain_options(digits, tmp_path, extra, message):
    out = tmp_path / "run"
    _fails(_run("pretrain", *TINY, "--data_path", digits, "--output_dir", out, *extra), 3, message)
    assert not out.exists()  # nothing written: no untrained weights with exit 0


def test_pretrain_output_dir_that_is_a_file(digits, tmp_path):
    (tmp_path / "f").write_text("")
    _fails(
        _run("pretrain", *TINY, "--data_path", digits, "--output_dir", tmp_path / "f"),
        3,
        "--output_dir",
        "exists and is not a directory",
    )


@pytest.mark.parametrize("command", ["pretrain", "finetune", "linprobe"])
def test_cuda_without_cuda_is_exit_7(digits, tmp_path, command):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    args = [a if a != "cpu" else device for a in TINY]
    _fails(_run(command, *args, "--data_path", digits, "--output_dir", tmp_path / "run"), 7, f"--device {device}")


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
def test_finetune_and_linprobe_share_the_checks(digits, tmp_path, command):
    _fails(_run(command, *TINY, "--data_path", digits, "--batch_size", "0"), 3, "--batch_size 0")
    _fails(_run(command, *TINY, "--data_path", digits, "--epochs", "-1"), 3, "--epochs -1")
    _fails(_run(command, *TINY, "--data_path", digits, "--input_size", "30"), 3, "--input_size 30")


def test_finetune_input_size_against_the_checkpoints_patch(digits, native, tmp_path):
    _fails(
        _run(
            "finetune",
            *TINY,
            "--finetune",
            native,
            "--data_path",
            digits,
            "--input_size",
            "30",
            "--output_dir",
            tmp_path / "run",
        ),
        3,
        "--input_size 30 is not a multiple of the checkpoint's patch size 8",
    )


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a png at all")
    return path


def test_undecodable_images_are_skipped_and_counted(digits, tmp_path):
    data = Path(shutil.copytree(digits / "train", tmp_path / "train"))
    bad = [_garbage(data / "3" / "zz-broken.png"), _garbage(data / "7" / "zz-empty.jpg")]
    out = tmp_path / "run"
    r = _run(
        "pretrain",
        *TINY,
        "--in_chans",
        "1",
        "--batch_size",
        "8",
        "--epochs",
        "1",
        "--warmup_epochs",
        "0",
        "--data_path",
        data,
        "--output_dir",
        out,
    )
    assert r.exit_code == 0, r.output
    assert "skipped 2 file(s)" in r.output and all(str(p) in r.output for p in bad)
    assert (out / "model" / "config.json").is_file()


def test_a_folder_of_only_undecodable_images_fails_up_front_with_the_list(tmp_path):
    for i in range(3):
        (tmp_path / "data" / "a").mkdir(parents=True, exist_ok=True)
        _garbage(tmp_path / "data" / "a" / f"{i}.png")
    _fails(
        _run("pretrain", *TINY, "--data_path", tmp_path / "data", "--output_dir", tmp_path / "run"),
        3,
        "holds no decodable image",
        "3 file(s) could not be read",
        "0.png",
    )


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_image_truncated_after_its_header_names_the_file(digits, tmp_path, workers):
    data = Path(shutil.copytree(digits / "train", tmp_path / "train"))
    victim = sorted((data / "5").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])  # the header survives; the pixels do not
    args = [a if a != "0" else workers for a in TINY]
    _fails(
        _run(
            "pretrain",
            *args,
            "--in_chans",
            "1",
            "--batch_size",
            "8",
            "--epochs",
            "1",
            "--data_path",
            data,
            "--output_dir",
            tmp_path / "run",
        ),
        3,
        "cannot decode image",
        str(victim),
    )


# --------------------------------------------------------------------------------------------------
# Ctrl-C, export hints, file modes
# --------------------------------------------------------------------------------------------------


def test_ctrl_c_exits_130_with_a_message(native, monkeypatch):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "load_checkpoint", interrupted)
    r = _run("info", native)
    assert r.exit_code == 130 and "interrupted" in r.output and "Traceback" not in r.output


def test_export_takes_the_same_hints_as_convert(tmp_path):
    # Width 40 is no released architecture: the heads cannot be read from the weights.
    from dataclasses import replace

    from training.model import MaskedAutoencoderViT, get_config

    cfg = replace(get_config("mae_vit_test"), embed_dim=40, num_heads=5, decoder_depth=0)
    src = save_official(MaskedAutoencoderViT(cfg), tmp_path / "odd.pth")
    r = _run("info", src)
    assert "Override with --num-heads" in r.output
    r = _run("export", src, "--out", tmp_path / "b", "--num-heads", "5", "--skip-verify")
    assert r.exit_code == 0, r.output
    assert Bundle.load(tmp_path / "b").architecture["num_heads"] == 5
    _fails(_run("export", src, "--out", tmp_path / "c", "--num-heads", "0"), 3, "num_heads must be a positive int")


def test_files_we_write_are_0644(native, tiny_bundle, digits, tmp_path):
    old = os.umask(0o022)
    try:
        dst = tmp_path / "conv"
        assert _run("convert", native, dst).exit_code == 0
        official = save_official(create_model("mae_vit_test"), tmp_path / "o.pth")
        Image.new("RGB", (40, 40), "gray").save(tmp_path / "x.png")
        assert _run("reconstruct", tmp_path / "x.png", "--bundle", tiny_bundle, "--out", tmp_path / "r").exit_code == 0
        run = tmp_path / "run"
        r = _run(
            "pretrain",
            *TINY,
            "--in_chans",
            "1",
            "--batch_size",
            "8",
            "--epochs",
            "1",
            "--data_path",
            digits / "train",
            "--output_dir",
            run,
        )
        assert r.exit_code == 0, r.output
        files = [
            dst / "config.json",
            dst / "model.safetensors",
            official,
            tmp_path / "r" / "x.png",
            run / "checkpoint-last.pth",
            run / "model" / "config.json",
        ]
        assert {str(f): oct(f.stat().st_mode & 0o777) for f in files} == {str(f): "0o644" for f in files}
    finally:
        os.umask(old)
