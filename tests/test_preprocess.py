"""Preprocessing: the official evaluation transform, every image mode, arrays, unreadable files, bombs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from mae_deploy.errors import InputError
from mae_deploy.preprocess import Preprocessor, check_min_side, source_size, to_rgb

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _pixels(x: np.ndarray) -> np.ndarray:
    """Normalised (N, C, H, W) -> 0..255 (N, H, W, C) floats."""
    return ((x.transpose(0, 2, 3, 1) * STD + MEAN) * 255.0).astype(np.float64)


@pytest.fixture
def pre() -> Preprocessor:
    return Preprocessor(image_size=32)


def _photo(size=(60, 40)) -> Image.Image:
    """A non-square image with structure (so resizing and cropping errors show)."""
    skimage = pytest.importorskip("skimage")
    return Image.fromarray(skimage.data.coffee()).resize(size, Image.Resampling.BILINEAR)


@pytest.mark.parametrize("resize", ["shorter_side_crop", "direct"])
@pytest.mark.parametrize("size", [(60, 40), (40, 61), (36, 36)])
def test_matches_torchvision_eval_transform(resize, size):
    tv = pytest.importorskip("torchvision.transforms")
    img = _photo(size)
    if resize == "direct":
        ref = tv.Compose([tv.Resize((32, 32), interpolation=tv.InterpolationMode.BICUBIC)])
    else:
        ref = tv.Compose([tv.Resize(int(32 / 0.875), interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(32)])
    ref = tv.Compose([ref, tv.ToTensor(), tv.Normalize(MEAN.tolist(), STD.tolist())])
    ours = Preprocessor(image_size=32, resize=resize)([img])
    assert ours.shape == (1, 3, 32, 32) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[0], ref(img).numpy(), atol=1e-6)


def test_224_photo_matches_torchvision():
    tv = pytest.importorskip("torchvision.transforms")
    skimage = pytest.importorskip("skimage")
    img = Image.fromarray(skimage.data.chelsea())  # 451 x 300
    ref = tv.Compose(
        [
            tv.Resize(256, interpolation=tv.InterpolationMode.BICUBIC),
            tv.CenterCrop(224),
            tv.ToTensor(),
            tv.Normalize(MEAN.tolist(), STD.tolist()),
        ]
    )
    np.testing.assert_allclose(Preprocessor(224)(img)[0], ref(img).numpy(), atol=1e-6)


def test_from_config_and_batches(pre, tmp_path):
    p = Preprocessor.from_config({"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0})
    white = Image.new("RGB", (50, 40), "white")
    np.testing.assert_allclose(p(white), 1.0)  # (1 - 0.5) / 0.5
    white.save(tmp_path / "w.png")
    arr = np.full((20, 30, 3), 255, np.uint8)
    batch = p([white, tmp_path / "w.png", str(tmp_path / "w.png"), arr])
    assert batch.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(batch, 1.0)


def test_mode_L_and_1(pre):
    gray = pre(Image.new("L", (40, 40), 128))
    assert gray.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(_pixels(gray), 128, atol=1e-3)
    np.testing.assert_allclose(_pixels(pre(Image.new("1", (40, 40), 1))), 255, atol=1e-3)


def test_alpha_is_composited_on_white(pre):
    transparent = Image.new("LA", (40, 40), (0, 0))  # black but fully transparent -> white
    np.testing.assert_allclose(_pixels(pre(transparent)), 255, atol=1e-3)
    half_red = Image.new("RGBA", (40, 40), (255, 0, 0, 128))
    px = _pixels(pre(half_red))[0, 16, 16]
    np.testing.assert_allclose(px, [255, 127, 127], atol=1.5)


def test_palette_with_and_without_transparency(pre, tmp_path):
    p = Image.new("P", (40, 40), 0)
    p.putpalette([0, 0, 255] + [255, 0, 0] * 255)  # index 0 blue, the rest red
    np.testing.assert_allclose(_pixels(pre(p))[0, 10, 10], [0, 0, 255], atol=1e-3)
    p.paste(1, (0, 0, 20, 40))  # left half red, right half index 0
    p.save(tmp_path / "t.png", transparency=0)  # index 0 transparent
    img = pre.load_image(tmp_path / "t.png")
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == (255, 0, 0) and img.getpixel((35, 5)) == (255, 255, 255)


def test_cmyk(pre, tmp_path):
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # no cyan/black: red
    px = _pixels(pre(tmp_path / "c.jpg"))[0, 16, 16]
    assert px[0] > 240 and px[1] < 15 and px[2] < 15


def test_16_bit_greyscale_is_scaled_not_clipped(pre, tmp_path):
    a = np.full((40, 40), 128 * 257, np.uint16)
    a[:, 20:] = 65535
    Image.fromarray(a).save(tmp_path / "g16.png")
    loaded = Image.open(tmp_path / "g16.png")
    assert loaded.mode.startswith("I")  # I;16 (or I on older Pillow): 16-bit data
    img = pre.load_image(tmp_path / "g16.png")
    assert img.getpixel((5, 5)) == (128, 128, 128)  # Pillow's own convert would give 255 (clipped)
    assert img.getpixel((35, 5)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32))).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.fromarray(np.full((4, 4), 1000, np.int32))).getpixel((0, 0)) == (4, 4, 4)


def test_exif_orientation_is_applied(pre, tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left edge becomes the top
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    loaded = pre.load_image(tmp_path / "r.jpg")
    assert loaded.size == (20, 40)
    top, bottom = np.asarray(loaded)[3, 10], np.asarray(loaded)[36, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_uses_the_first_frame(pre, tmp_path):
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp_path / "a.gif").n_frames == 3
    x = pre(tmp_path / "a.gif")
    assert x.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(_pixels(x)[0, 16, 16], [255, 0, 0], atol=1.5)


def test_single_channel_models():
    p = Preprocessor(image_size=32, mean=[0.5], std=[0.25], in_chans=1)
    x = p([Image.new("RGB", (40, 40), (255, 255, 255)), np.zeros((40, 40), np.uint8)])
    assert x.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(x[0], 2.0)  # (1 - 0.5) / 0.25
    np.testing.assert_allclose(x[1], -2.0)


def test_arrays(pre):
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgba = np.zeros((40, 50, 4), np.uint8)  # transparent -> white
    gray = np.full((40, 50, 1), 255, np.uint8)
    x = pre([rgb, rgba, gray])
    np.testing.assert_allclose(_pixels(x)[0], 0, atol=1e-3)
    np.testing.assert_allclose(_pixels(x)[1:], 255, atol=1e-3)
    with pytest.raises(InputError, match="has dtype float32; image arrays must be uint8 HWC"):
        pre(np.zeros((40, 50, 3), np.float32))
    with pytest.raises(InputError, match=r"has shape \(40, 50, 2\); expected"):
        pre(np.zeros((40, 50, 2), np.uint8))
    with pytest.raises(InputError, match="expected an image path, PIL image or uint8 array, got int"):
        pre([3])
    with pytest.raises(InputError, match="no images given"):
        pre([])


def test_unreadable_images_name_the_path(pre, tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a JPEG")
    with pytest.raises(InputError, match=f"cannot read image {tmp_path / 'notes.jpg'}: not an image format"):
        pre([tmp_path / "notes.jpg"])
    with pytest.raises(InputError, match=f"image {tmp_path / 'missing.png'} does not exist"):
        pre([tmp_path / "missing.png"])
    _photo((64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"cannot read image {tmp_path / 'cut.jpg'}: .*truncated"):
        pre.load_image(tmp_path / "cut.jpg")
    with pytest.raises(InputError, match="is a directory"):
        pre.load_image(tmp_path)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (the pixel data is irrelevant: it is never decoded)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused(pre, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(30000, 30000))
    with pytest.raises(InputError, match="bomb.png is a decompression bomb"):
        pre.load_image(bomb)
    small_limit = Preprocessor(image_size=32, max_pixels=1000)
    _photo((40, 40)).save(tmp_path / "ok.png")
    with pytest.raises(InputError, match=r"ok.png is 40x40 = 1600 pixels, above the limit of 1000 \(a possible decomp"):
        small_limit.load_image(tmp_path / "ok.png")


def test_min_side(tmp_path):
    p = Preprocessor(image_size=32, min_side=16)
    Image.new("RGB", (100, 8)).save(tmp_path / "strip.png")
    with pytest.raises(InputError, match="strip.png is 100x8 pixels; its shorter side is below the minimum of 16"):
        p.load_image(tmp_path / "strip.png")
    check_min_side(Image.new("RGB", (16, 16)), 16)  # at the limit: fine


def test_bad_settings():
    with pytest.raises(InputError, match="resize must be one of"):
        Preprocessor(32, resize="stretch")
    with pytest.raises(InputError, match=r"crop_pct must be in \(0, 1\]"):
        Preprocessor(32, crop_pct=1.5)
    with pytest.raises(InputError, match="mean and std need 3 values each"):
        Preprocessor(32, mean=[0.5])


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_normalize_is_bit_identical_to_the_textbook_formula(mode):
    """The in-place normalisation must not change a single bit of (x / 255 - mean) / std in float32."""
    chans = 3 if mode == "RGB" else 1
    pre = Preprocessor(224, in_chans=chans, mean=[0.485, 0.456, 0.406][:chans], std=[0.229, 0.224, 0.225][:chans])
    img = _photo((224, 224)).convert(mode)
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    want = (a - pre.mean) / pre.std
    got = pre.normalize(img)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (chans, 224, 224)
    assert np.array_equal(got, want)


def test_denormalize_inverts_normalize(pre):
    img = _photo((32, 32))
    x = pre.normalize(img)
    np.testing.assert_allclose(pre.denormalize(x) * 255, np.asarray(img).transpose(2, 0, 1), atol=1e-3)


def test_real_photo_path(tmp_path: Path):
    skimage = pytest.importorskip("skimage")
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "astronaut.png")
    x = Preprocessor(224)([tmp_path / "astronaut.png"])
    assert x.shape == (1, 3, 224, 224)
    assert -2.2 < x.min() < -1.5 and 2.0 < x.max() < 2.7  # normalised ImageNet range


# -- fast downscaling (draft decoding + reduce-before-resize) vs the exact path ----------------------------


def _big_photo(path: Path, name: str = "astronaut", size=(1600, 1200), **save) -> Path:
    """A scikit-image photo upscaled with LANCZOS and saved (JPEG quality 90 unless told)."""
    skimage = pytest.importorskip("skimage")
    img = Image.fromarray(getattr(skimage.data, name)()).resize(size, Image.Resampling.LANCZOS)
    img.save(path, **({"quality": 90} if path.suffix == ".jpg" else {"compress_level": 1}), **save)
    return path


def _old_path(path: Path, size: int = 224, crop_pct: float = 0.875, direct: bool = False) -> np.ndarray:
    """The preprocessing as it was before the fast path: full decode, EXIF, RGB, bicubic, crop, normalise."""
    with Image.open(path) as im:
        im.load()
        img = ImageOps.exif_transpose(im).convert("RGB")
    if direct:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    else:
        short, (w, h) = int(size / crop_pct), img.size
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    a = np.asarray(img, dtype=np.float32) / 255.0
    return ((a.transpose(2, 0, 1) - MEAN.reshape(3, 1, 1)) / STD.reshape(3, 1, 1))[None]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Three real photos at about 2 MP (JPEG q90), large enough for draft scale 2 at 224 px."""
    d = tmp_path_factory.mktemp("photos")
    sizes = {"astronaut": (1400, 1400), "coffee": (1800, 1200), "chelsea": (1200, 1800)}  # chelsea: portrait
    return [_big_photo(d / f"{n}.jpg", n, s) for n, s in sizes.items()]


@pytest.fixture(scope="module")
def small_224_bundle(tmp_path_factory) -> Path:
    """A small random-init MAE at 224 px (patch 16, 196 tokens, width 32) exported to a bundle."""
    torch = pytest.importorskip("torch")
    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model("mae_vit_test", img_size=224, patch_size=16).eval()
    out = tmp_path_factory.mktemp("small224") / "bundle"
    export_bundle(model, out, parts=["encoder"], verify=False, progress=None)
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_draft_decoding_keeps_twice_the_target(photos):
    fast, exact = Preprocessor(224), Preprocessor(224, exact_resize=True)
    for path in photos:
        full = exact.load_image(path)
        drafted = fast.load_image(path)
        assert full.size == Image.open(path).size and source_size(full) == full.size
        assert drafted.size == tuple((s + 1) // 2 for s in full.size)  # DCT scale 1/2 (2 MP -> >= 512 short side)
        assert min(drafted.size) >= 2 * 256 and source_size(drafted) == full.size


def test_fast_path_close_to_exact_features_and_pixels(photos, small_224_bundle):
    from mae_deploy.features import FeatureExtractor

    exact = Preprocessor.from_config({"image_size": 224}, exact_resize=True)
    fast = Preprocessor.from_config({"image_size": 224})
    assert not fast.exact_resize
    xe, xf = exact(photos), fast(photos)
    assert np.abs(xe - xf).max() < 0.2  # normalised units (~11 levels of 255); measured up to 0.12
    assert np.abs(xe - xf).mean() < 0.01
    with FeatureExtractor(small_224_bundle, pool="tokens") as fx:
        te, tf = fx.extract_pixels(xe), fx.extract_pixels(xf)
    assert _cos(te[:, 1:].mean(1), tf[:, 1:].mean(1)).min() >= 0.999
    assert _cos(te[:, 0], tf[:, 0]).min() >= 0.999
    assert _cos(te[:, 1:], tf[:, 1:]).min() >= 0.99  # every one of the 196 tokens


@pytest.mark.parametrize("resize", ["shorter_side_crop", "direct"])
def test_exact_flag_is_bit_identical_to_the_old_path(photos, resize, tmp_path):
    exact = Preprocessor(224, resize=resize, exact_resize=True)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _big_photo(rotated, "coffee", (1800, 1200), exif=exif)
    png = _big_photo(tmp_path / "big.png", "chelsea", (1500, 1000))
    for path in [*photos, rotated, png]:
        assert np.array_equal(exact(path), _old_path(path, direct=resize == "direct")), path


def test_small_images_are_unaffected(tmp_path):
    """Below twice the target the fast path is the exact path, bit for bit (JPEG and not)."""
    skimage = pytest.importorskip("skimage")
    fast, exact = Preprocessor(224), Preprocessor(224, exact_resize=True)
    paths = [
        _big_photo(tmp_path / "just_below.jpg", "coffee", (766, 511)),  # 511 < 2 x 256
        _big_photo(tmp_path / "below.png", "astronaut", (500, 500)),
    ]
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "chelsea.jpg", quality=90)  # 451 x 300
    paths.append(tmp_path / "chelsea.jpg")
    for path in paths:
        assert fast.load_image(path).size == Image.open(path).size
        assert np.array_equal(fast(path), exact(path)), path
        assert np.array_equal(fast(path), _old_path(path)), path
    in_memory = Image.fromarray(skimage.data.astronaut()).resize((400, 300))
    assert np.array_equal(fast(in_memory), exact(in_memory))


def test_non_jpeg_inputs_are_decoded_in_full(photos, tmp_path):
    """PNG (and every non-JPEG format) has no draft mode: full decode; only the resize is reduced first."""
    png = _big_photo(tmp_path / "big.png", "coffee", (2400, 1600))
    fast, exact = Preprocessor(224), Preprocessor(224, exact_resize=True)
    img = fast.load_image(png)
    assert img.size == (2400, 1600) and source_size(img) == img.size
    xe, xf = exact(png), fast(png)
    assert not np.array_equal(xe, xf)  # 6x the target: box-reduced 3x, then bicubic
    assert np.abs(xe - xf).max() < 0.2


def test_exif_rotation_with_draft_decoding(tmp_path):
    """The draft scale applies to the stored orientation; the geometry uses the full, rotated size."""
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn: the stored 1800 x 1200 displays as 1200 x 1800
    path = _big_photo(tmp_path / "r.jpg", "coffee", (1800, 1200), exif=exif)
    fast, exact = Preprocessor(224), Preprocessor(224, exact_resize=True)
    img = fast.load_image(path)
    assert img.size == (600, 900) and source_size(img) == (1200, 1800)
    assert exact.load_image(path).size == (1200, 1800)
    assert np.abs(fast(path) - exact(path)).max() < 0.2


def test_other_jpeg_flavours_are_draft_decoded(tmp_path):
    """CMYK, progressive and multi-picture (MPO) JPEGs: all draft-decoded, all close to exact."""
    skimage = pytest.importorskip("skimage")
    base = Image.fromarray(skimage.data.astronaut()).resize((1600, 1200), Image.Resampling.LANCZOS)
    base.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    base.save(tmp_path / "progressive.jpg", quality=90, progressive=True)
    base.save(tmp_path / "two.mpo", save_all=True, append_images=[Image.new("RGB", (1600, 1200), "red")])
    fast, exact = Preprocessor(224), Preprocessor(224, exact_resize=True)
    for name in ("cmyk.jpg", "progressive.jpg", "two.mpo"):
        img = fast.load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (800, 600) and source_size(img) == (1600, 1200), name
        assert np.abs(fast(tmp_path / name) - exact(tmp_path / name)).max() < 0.2, name


def test_limits_judge_the_full_image_not_the_draft(photos):
    w, h = Image.open(photos[1]).size  # 1800 x 1200, draft-decoded to 900 x 600
    with pytest.raises(InputError, match="above the limit of 1000000"):
        Preprocessor(224, max_pixels=1_000_000).load_image(photos[1])  # refused before decoding
    p = Preprocessor(224, min_side=1000)  # the draft's 600 px would fail; the photo's 1200 px pass
    img = p.load_image(photos[1])
    assert img.size == (900, 600)
    check_min_side(img, 1000)  # what the extraction worker calls after load_image
    with pytest.raises(InputError, match=f"is {w}x{h} pixels; its shorter side is below the minimum of 1300"):
        Preprocessor(224, min_side=1300).load_image(photos[1])


def test_an_edited_draft_is_taken_at_its_own_size(photos):
    """The recorded full size applies only to the untouched draft: a crop of it is an ordinary image."""
    fast = Preprocessor(224)
    img = fast.load_image(photos[1])
    crop = img.crop((0, 0, 600, 600))
    assert source_size(crop) == (600, 600)
    assert np.array_equal(fast(crop), Preprocessor(224, exact_resize=True)(crop))  # 600 < 2 x 256: exact path


def test_truncated_jpeg_is_refused_on_the_draft_path_too(photos, tmp_path):
    data = photos[1].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"cannot read image {tmp_path / 'cut.jpg'}: .*truncated"):
        Preprocessor(224).load_image(tmp_path / "cut.jpg")


def test_reconstruct_cli_exact_resize_flag(tiny_bundle, tmp_path):
    """--exact-resize reaches the preprocessing: the big JPEG's grid changes, the small image's does not."""
    from click.testing import CliRunner

    from mae_deploy.cli import main
    from mae_deploy.reconstruct import Reconstructor

    big = _big_photo(tmp_path / "big.jpg", "coffee", (600, 400))  # 400 px >= 2 x 36: draft-decoded at 1/4
    small = _big_photo(tmp_path / "small.jpg", "coffee", (90, 60))  # below 2x the target
    grids = {}
    for flag in ([], ["--exact-resize"]):
        out = tmp_path / ("exact" if flag else "fast")
        r = CliRunner().invoke(
            main,
            [
                "reconstruct",
                str(big),
                str(small),
                "--bundle",
                str(tiny_bundle),
                "--out",
                str(out),
                "--threads",
                "1",
                *flag,
            ],
        )
        assert r.exit_code == 0, r.output
        grids[bool(flag)] = {n: np.asarray(Image.open(out / f"{n}.png")) for n in ("big", "small")}
    assert not np.array_equal(grids[True]["big"], grids[False]["big"])
    assert np.array_equal(grids[True]["small"], grids[False]["small"])
    exact = Preprocessor(32, exact_resize=True)
    with Reconstructor(tiny_bundle, preprocessor=exact, threads=1) as rec:
        want = np.asarray(rec.reconstruct([big], mask_ratio=0.75, seed=0)[0].grid_image())
    assert np.array_equal(grids[True]["big"], want)
