"""`mae-deploy reconstruct` on real photos, the panels it draws, its errors, and that it never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mae_deploy.cli import main
from mae_deploy.preprocess import Preprocessor
from mae_deploy.reconstruct import LABEL_HEIGHT, PAD, PANEL_TITLES, TITLE_HEIGHT, Reconstructor, grid_size

# mae_vit_test is 32 px: panels are enlarged 7x to 224; four panels and five gaps of 8 px.
EXPECTED_SIZE = (4 * 224 + 5 * 8, 28 + 20 + 224 + 8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    skimage = pytest.importorskip("skimage")
    d = tmp_path_factory.mktemp("photos")
    out = []
    for name, ext in (("astronaut", "png"), ("coffee", "jpg"), ("chelsea", "png")):
        Image.fromarray(getattr(skimage.data, name)()).save(d / f"{name}.{ext}")
        out.append(d / f"{name}.{ext}")
    return out


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_reconstruct_writes_one_png_per_photo(tiny_bundle, photos, tmp_path):
    r = _run("reconstruct", *photos, "--bundle", tiny_bundle, "--out", tmp_path / "out", "--threads", "1")
    assert r.exit_code == 0, r.output
    assert grid_size(224) == EXPECTED_SIZE
    for p in photos:
        dst = tmp_path / "out" / f"{p.stem}.png"
        assert f"wrote {dst} ({EXPECTED_SIZE[0]}x{EXPECTED_SIZE[1]})" in r.output
        with Image.open(dst) as im:
            im.verify()  # a valid PNG
        with Image.open(dst) as im:
            assert im.format == "PNG" and im.size == EXPECTED_SIZE and im.mode == "RGB"
    assert "3 of 3 images on ort/cpu [CPUExecutionProvider], fp32" in r.output
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.startswith(".")]  # no temp files left


def test_grid_panels_show_original_masked_reconstruction_and_paste(tiny_bundle, photos, tmp_path):
    rec = Reconstructor(tiny_bundle, intra_op_threads=1).reconstruct(photos[0], mask_ratio=0.75, seed=5)[0]
    model_img = np.asarray(Preprocessor(32).model_image(photos[0]))
    np.testing.assert_array_equal(rec.original, model_img)
    titles = [t for t, _ in rec.panels()]
    assert titles == list(PANEL_TITLES)
    removed = rec.pixel_mask
    assert removed.mean() == 0.75
    masked, pasted = rec.masked(), rec.pasted()
    assert (masked[removed] == rec.fill).all() and (masked[~removed] == model_img[~removed]).all()
    assert (pasted[removed] == rec.reconstruction[removed]).all() and (pasted[~removed] == model_img[~removed]).all()
    grid = np.asarray(rec.grid_image())
    assert grid.shape == (EXPECTED_SIZE[1], EXPECTED_SIZE[0], 3)
    top = TITLE_HEIGHT + LABEL_HEIGHT
    for i, (_, panel) in enumerate(rec.panels()):
        x = PAD + i * (224 + PAD)
        big = np.asarray(panel.resize((224, 224), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(grid[top : top + 224, x : x + 224], big)
    assert (grid[:TITLE_HEIGHT] < 128).any()  # the title text is drawn
    assert rec.title() == "mae_vit_test | mask ratio 0.75 | seed 5"


def test_same_seed_same_output_other_seed_other_mask(tiny_bundle, photos, tmp_path):
    rec = Reconstructor(tiny_bundle, intra_op_threads=1)
    a = rec.reconstruct(photos, seed=1)
    b = rec.reconstruct(photos[1], seed=1)[0]
    c = rec.reconstruct(photos[1], seed=2)[0]
    np.testing.assert_array_equal(a[1].reconstruction, b.reconstruction)  # independent of the batch
    np.testing.assert_array_equal(a[0].mask, a[2].mask)  # one mask per seed
    assert not np.array_equal(b.mask, c.mask)
    assert rec.reconstruct(photos[0], seed=None)[0].seed >= 0  # a fresh seed, recorded


def test_torch_backend_cli_gives_the_same_picture(tiny_bundle, photos, tmp_path):
    pytest.importorskip("torch")
    for backend in ("ort", "torch"):
        r = _run(
            "reconstruct",
            photos[2],
            "-b",
            tiny_bundle,
            "-o",
            tmp_path / backend,
            "--backend",
            backend,
            "--seed",
            "4",
            "--mask-ratio",
            "0.5",
        )
        assert r.exit_code == 0, r.output
    a = np.asarray(Image.open(tmp_path / "ort" / "chelsea.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "torch" / "chelsea.png")).astype(int)
    assert np.abs(a - b).max() <= 1


def test_bad_inputs_and_partial_failures(tiny_bundle, encoder_only_bundle, photos, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    r = _run("reconstruct", photos[0], bad, "-b", tiny_bundle, "-o", tmp_path / "o")
    assert r.exit_code == 4
    assert f"cannot read image {bad}" in r.output and "1 of 2 images could not be reconstructed" in r.output
    assert (tmp_path / "o" / "astronaut.png").exists()
    r = _run("reconstruct", bad, "-b", tiny_bundle, "-o", tmp_path / "o2")
    assert r.exit_code == 3 and f"cannot read image {bad}" in r.output
    r = _run("reconstruct", photos[0], "-b", encoder_only_bundle, "-o", tmp_path / "o3")
    assert r.exit_code == 3 and "has no decoder" in r.output
    r = _run("reconstruct", photos[0], "-b", tiny_bundle, "-o", tmp_path / "o4", "--device", "cuda")
    assert r.exit_code == 7 and "CUDAExecutionProvider" in r.output
    r = _run("reconstruct", photos[0], "-b", tiny_bundle, "-o", tmp_path / "o5", "--mask-ratio", "1.0")
    assert r.exit_code == 2
    r = _run("reconstruct", photos[0], "-b", tiny_bundle, "-o", tmp_path / "o6", "--checkpoint", tiny_bundle)
    assert r.exit_code == 3 and "--checkpoint only applies to --backend torch" in r.output


def test_directories_and_duplicate_names(tiny_bundle, photos, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    Image.open(photos[0]).save(other / "astronaut.jpg")
    r = _run("reconstruct", photos[0].parent, other, "-b", tiny_bundle, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "astronaut-2.png",
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
    ]


_NO_TORCH = """
import sys
import mae_deploy
from mae_deploy.cli import main
main(["reconstruct", {photo!r}, "--bundle", {bundle!r}, "--out", {out!r}, "--backend", "ort"], standalone_mode=False)
fx = mae_deploy.FeatureExtractor({bundle!r}, pool="mean")
assert fx.extract([{photo!r}]).shape == (1, 32)
mae_deploy.random_masking(1, 16, 0.5, rng=0)
print("torch" in sys.modules, "training" in sys.modules)
"""


def test_runtime_never_imports_torch(tiny_bundle, photos, tmp_path):
    code = _NO_TORCH.format(photo=str(photos[1]), bundle=str(tiny_bundle), out=str(tmp_path / "o"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False"
    assert (tmp_path / "o" / "coffee.png").exists()


def test_single_channel_panels():
    from mae_deploy.reconstruct import Reconstruction

    orig = np.full((16, 16), 200, np.uint8)
    recon = np.full((16, 16), 50, np.uint8)
    mask = np.array([1, 0, 0, 1], np.float32)  # 2x2 grid of 8-px patches
    r = Reconstruction(orig, recon, mask, np.zeros((4, 64), np.float32), 0.5, 0, False, "gray", 8, (128,))
    assert r.masked()[0, 0] == 128 and r.masked()[0, 15] == 200
    assert r.pasted()[15, 15] == 50 and r.pasted()[15, 0] == 200
    grid = r.grid_image()
    assert grid.mode == "RGB" and grid.size == grid_size(224)  # 16 px panels enlarged 14x
