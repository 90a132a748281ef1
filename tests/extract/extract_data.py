"""Shared data for the extraction tests: 330+ images (crops of scikit-image's photos as JPEG and PNG, every
unusual mode, every broken kind), a tiny exported bundle and one clean reference run.

The builders behind tests/extract/conftest.py's ``extract_images``, ``extract_bundle_dir``,
``extract_other_stats_bundle_dir`` and ``extract_clean_run`` fixtures, and the constants the tests check against.
"""

from __future__ import annotations

import io
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_deploy.bundle import MANIFEST_NAME, write_manifest

skimage_data = pytest.importorskip("skimage.data")

REPO = Path(__file__).resolve().parents[2]
# The settings of the reference run; the killed/resumed run must use the same ones.
RUN = {"batch_size": 4, "shard_size": 12, "workers": 1}
BROKEN = {  # file name -> the reason errors.jsonl must give
    "broken/truncated.jpg": "truncated",
    "broken/corrupt.png": "corrupt",
    "broken/zero.jpg": "empty",
    "broken/text.jpg": "not_an_image",
    "broken/tiny.png": "too_small",
    "broken/bomb.png": "decompression_bomb",
}
# Pairs that must give identical features: (unusual file, plain twin with the pixels the model should see).
TWINS = {
    "odd/exif_rot.png": "odd/exif_rot_twin.png",
    "odd/gray16.png": "odd/gray16_twin.png",
    "odd/anim.gif": "odd/anim_twin.png",
    "odd/rgba_opaque.png": "odd/rgba_opaque_twin.png",
}


# ------------------------------------------------------------------------------------------------
# Data and bundles (once per session)
# ------------------------------------------------------------------------------------------------


def _photos() -> list[np.ndarray]:
    names = [
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "immunohistochemistry",
        "colorwheel",
        "camera",
        "coins",
        "moon",
        "text",
    ]
    return [getattr(skimage_data, n)() for n in names]


def _bomb_png(path: Path, width: int = 10_000, height: int = 9_000) -> None:
    """A valid all-black greyscale PNG above Pillow's default limit (89.5 M pixels), ~90 KB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def make_images(root: Path) -> dict:
    rng = np.random.default_rng(0)
    photos = _photos()
    good = []
    for i in range(320):
        a = photos[i % len(photos)]
        h, w = int(rng.integers(24, 160)), int(rng.integers(24, 160))
        y, x = int(rng.integers(0, a.shape[0] - h)), int(rng.integers(0, a.shape[1] - w))
        crop = Image.fromarray(np.ascontiguousarray(a[y : y + h, x : x + w]))
        sub = ["", "a", "a/b", "c"][i % 4]
        ext = [".jpg", ".png", ".JPG", ".jpeg", ".PNG"][i % 5]
        rel = f"{sub}/img{i:04d}{ext}".lstrip("/")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if ext.lower() in (".jpg", ".jpeg"):
            crop.save(root / rel, quality=int(rng.integers(60, 96)))
        else:
            crop.save(root / rel)
        good.append(rel)

    odd = root / "odd"
    odd.mkdir()
    astro = Image.fromarray(skimage_data.astronaut()).resize((96, 80))
    # EXIF orientation 6 (rotate 90 CW to display): stored rotated the other way, twin stored upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    astro.transpose(Image.Transpose.ROTATE_90).save(odd / "exif_rot.png", exif=exif)
    astro.save(odd / "exif_rot_twin.png")
    g8 = np.asarray(astro.convert("L"))
    Image.fromarray(g8.astype(np.uint16) * 257).save(odd / "gray16.png")  # 16-bit, v*257 -> 8-bit v
    Image.fromarray(g8).save(odd / "gray16_twin.png")
    frames = [astro.quantize(64), Image.fromarray(skimage_data.coffee()).resize((96, 80)).quantize(64)]
    frames[0].save(odd / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].convert("RGB").save(odd / "anim_twin.png")
    rgba = astro.convert("RGBA")
    rgba.save(odd / "rgba_opaque.png")
    astro.save(odd / "rgba_opaque_twin.png")
    logo = Image.fromarray(skimage_data.logo())  # RGBA with real transparency
    logo.resize((80, 80)).save(odd / "rgba.png")
    astro.convert("CMYK").save(odd / "cmyk.jpg")
    astro.convert("P", palette=Image.Palette.ADAPTIVE).save(odd / "palette.png")
    pt = astro.convert("P", palette=Image.Palette.ADAPTIVE)
    pt.info["transparency"] = 0
    pt.save(odd / "palette_transparent.png", transparency=0)
    astro.convert("L").save(odd / "gray.jpg")
    astro.convert("LA").save(odd / "gray_alpha.png")
    Image.fromarray(skimage_data.horse()).resize((64, 52)).save(odd / "bilevel.png")
    astro.save(odd / "tiff.TIF")
    astro.save(odd / "bitmap.bmp")
    astro.save(odd / "web.webp")
    astro.save(odd / "pixmap.ppm")
    astro.convert("L").save(odd / "graymap.pgm")
    good += sorted(p.relative_to(root).as_posix() for p in odd.iterdir())

    broken = root / "broken"
    broken.mkdir()
    buf = io.BytesIO()
    astro.save(buf, format="JPEG", quality=90)
    (broken / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    astro.save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT") + 40
    data[at : at + 64] = bytes(rng.integers(0, 256, 64, dtype=np.uint8))  # garbage in the compressed pixels
    (broken / "corrupt.png").write_bytes(bytes(data))
    (broken / "zero.jpg").write_bytes(b"")
    (broken / "text.jpg").write_text("this is not an image\n")
    astro.resize((10, 12)).save(broken / "tiny.png")
    _bomb_png(broken / "bomb.png")
    # Not inputs: other extensions and hidden files.
    (root / "notes.txt").write_text("ignored")
    astro.save(root / ".hidden.jpg")
    return {"good": good, "broken": list(BROKEN)}


def export_extract_bundle(out: Path) -> Path:
    """mae_vit_test's encoder (LayerNorms perturbed) exported to ``out``."""
    torch = pytest.importorskip("torch")
    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model("mae_vit_test").eval()
    with torch.no_grad():  # move LayerNorms off identity so every part of the graph matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    export_bundle(model, out, parts=["encoder"], verify=False, progress=None)
    return out


def other_stats_copy(bundle: Path, out: Path) -> Path:
    """The same graph with other preprocessing statistics: features differ, so a resume must be refused."""
    shutil.copytree(bundle, out)
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["preprocessing"]["mean"] = [0.5, 0.5, 0.5]
    write_manifest(out, m)
    return out


def result_files(d: Path) -> dict[str, bytes]:
    """Every result file but the manifest (which holds timings) and hidden files (the lock), by name."""
    return {
        p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "manifest.json" and not p.name.startswith(".")
    }
