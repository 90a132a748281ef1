"""Image loading and preprocessing that matches the official MAE evaluation transform.

Pipeline: open -> first frame of an animation -> EXIF orientation applied -> any mode to 8-bit RGB
(or L for single-channel models) -> shorter side resized to image_size / crop_pct (bicubic) and a
centre crop of image_size (or a direct resize to image_size x image_size) -> [0, 1] -> (x - mean) / std
-> float32 NCHW. This equals torchvision's Resize(int(size / crop_pct), BICUBIC) + CenterCrop(size) +
ToTensor() + Normalize(mean, std) on the same PIL image (tested).

Mode conversion:

- images with transparency (LA, RGBA, PA, P with a transparency entry) are composited on white,
  so transparent regions become white rather than whatever colour the invisible pixels happen to hold;
- 16-bit greyscale (I;16, I;16B, ...) is scaled to 8 bits (v / 257, rounded), not clipped at 255 as
  Pillow's own convert() does; 32-bit integer images (mode I) are treated as 16-bit when any value exceeds
  255, and float images (mode F) as [0, 1] when no value exceeds 1, otherwise as [0, 255];
- CMYK and the rest use Pillow's conversion.

Fast downscaling (the default; ``exact_resize=True`` or the CLI's ``--exact-resize`` turns it off). Most of
the time spent on a 12-megapixel JPEG goes into decoding every pixel and filtering them all down to 256.
When an image is at least ``REDUCE_GAP`` (2) times the resize target, the fast path

- decodes JPEGs with Pillow's draft mode: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain while
  decoding, keeping the image at least ``REDUCE_GAP`` times the resize target;
- resizes only the crop's box of the (possibly draft-decoded) image, with ``reducing_gap=REDUCE_GAP``
  (an integer box reduction first, then the bicubic filter over the last factor of at least 2).

The geometry (shorter side, centre crop) is computed from the full-size image, so the model sees the same
region either way. Images below 2x the target take the exact path unchanged (bit-identical). Measured by
benchmarks/bench_decode.py (benchmarks/RESULTS.md): see the "Decode and preprocess" section there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mae_deploy.errors import InputError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]  # noqa: UP007 (a runtime alias: py3.10 needs Union)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
RESIZE_MODES = ("shorter_side_crop", "direct")
_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")
_INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# The fast path reduces cheaply (DCT scaling, box reduction) to no less than REDUCE_GAP x the resize target
# and leaves the rest to the exact filter; 2 keeps pixels within a few levels of the exact path.
REDUCE_GAP = 2.0
_JPEG_FORMATS = ("JPEG", "MPO")  # formats whose decoder scales in the DCT domain (Image.draft)
_SOURCE = "mae_deploy.source"  # info key of a draft-decoded image: its full-size geometry (see source_size)


def source_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the full-size image ``image`` was draft-decoded from; ``image.size`` otherwise."""
    src = image.info.get(_SOURCE)
    if isinstance(src, dict) and tuple(src.get("decoded", ())) == image.size:
        return tuple(src["size"])
    return image.size


def _draft_scale(image: Image.Image) -> int:
    """The DCT scale (1, 2, 4 or 8) a draft decode used; 1 for a full decode."""
    src = image.info.get(_SOURCE)
    if isinstance(src, dict) and tuple(src.get("decoded", ())) == image.size:
        return int(src["scale"])
    return 1


def check_min_side(image: Image.Image, min_side: int, source: str = "image") -> None:
    """InputError when the image's shorter side is below ``min_side`` pixels (thumbnails, 1x1 trackers).

    A draft-decoded image is judged by its full size (:func:`source_size`), not the reduced decode.
    """
    w, h = source_size(image)
    if min(w, h) < min_side:
        raise InputError(f"{source} is {w}x{h} pixels; its shorter side is below the minimum of {min_side}")


def _alpha_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _scale_16_to_8(a: np.ndarray) -> np.ndarray:
    """0..65535 integers -> round(a / 257) as uint8, in integers: 4 bytes a pixel, not float64's 8 plus
    temporaries (a 9400^2 16-bit PNG held 25-29 bytes a pixel). No ties: a * 255 / 65535 is never x.5."""
    b = a.astype(np.uint32)
    b *= 255
    b += 32767
    b //= 65535
    return b.astype(np.uint8)


def _wide_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float greyscale -> 8-bit L, scaled rather than clipped."""
    a = np.asarray(im)
    if im.mode in _INT16_MODES:
        return Image.fromarray(_scale_16_to_8(a), mode="L")
    if im.mode == "I":
        if a.max(initial=0) > 255:
            return Image.fromarray(_scale_16_to_8(np.clip(a, 0, 65535)), mode="L")
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")
    a = a.astype(np.float64)  # "F"
    if np.nanmax(a, initial=0) <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(np.nan_to_num(np.rint(a)), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the rules)."""
    if im.mode == "RGB":
        return im
    if im.mode in _INT16_MODES or im.mode in ("I", "F"):
        return _wide_to_l(im).convert("RGB")
    if im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        return _alpha_on_white(im)
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(f"image mode {im.mode} cannot be converted to RGB: {e}") from e


class Preprocessor:
    """Images (paths, PIL images, uint8 HWC arrays) -> normalised float32 (N, C, H, W) batches.

    Build it from a bundle (``Preprocessor.from_bundle(bundle)``) so the model's own settings are used.
    ``max_pixels`` guards against decompression bombs (default: Pillow's ``Image.MAX_IMAGE_PIXELS``);
    ``min_side`` rejects images whose shorter side is smaller (default 1: accept everything).
    ``exact_resize=False`` (default) lets images at least twice the target size be draft-decoded (JPEG) and
    box-reduced before the bicubic filter (module docstring); ``True`` keeps the exact full-size path.
    """

    def __init__(
        self,
        image_size: int,
        resize: str = "shorter_side_crop",
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        in_chans: int = 3,
        max_pixels: int | None = None,
        min_side: int = 1,
        exact_resize: bool = False,
    ) -> None:
        if resize not in RESIZE_MODES:
            raise InputError(f"resize must be one of {list(RESIZE_MODES)}, got {resize!r}")
        if interpolation not in _RESAMPLE:
            raise InputError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        if not 0.0 < crop_pct <= 1.0:
            raise InputError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if in_chans not in (1, 3):
            raise InputError(f"only 1- and 3-channel models are supported, got in_chans={in_chans}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise InputError(f"mean and std need {in_chans} values each, got {list(mean)} and {list(std)}")
        self.image_size = int(image_size)
        self.resize = resize
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.in_chans = in_chans
        self.mean = np.asarray(mean, dtype=np.float32).reshape(in_chans, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(in_chans, 1, 1)
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.exact_resize = bool(exact_resize)

    @classmethod
    def from_config(cls, config: dict, in_chans: int = 3, **overrides) -> Preprocessor:
        """From a bundle's ``preprocessing`` block (``exact_resize`` and the limits come as overrides)."""
        keys = ("image_size", "resize", "crop_pct", "interpolation", "mean", "std")
        kwargs = {k: config[k] for k in keys if k in config}
        return cls(**{**kwargs, "in_chans": in_chans, **overrides})

    @classmethod
    def from_bundle(cls, bundle, **overrides) -> Preprocessor:
        return cls.from_config(bundle.preprocessing, in_chans=bundle.in_chans, **overrides)

    # -- loading --------------------------------------------------------------------------------
    def _limit(self) -> int | None:
        return Image.MAX_IMAGE_PIXELS if self.max_pixels is None else self.max_pixels

    def load_image(self, path: str | os.PathLike | IO[bytes]) -> Image.Image:
        """Open an image file (a path, or a binary file named by its ``str``): first frame, EXIF orientation
        applied, RGB (or L), decoded.

        On the fast path (``exact_resize=False``) a JPEG at least twice the target size comes back
        draft-decoded (reduced by 2, 4 or 8, still >= 2x the target); :func:`source_size` gives its full size,
        and :meth:`resize_crop` and :func:`check_min_side` use that.
        """
        try:
            with Image.open(path) as im:
                w, h = im.size
                limit = self._limit()
                if limit and w * h > limit:
                    raise InputError(
                        f"{path} is {w}x{h} = {w * h} pixels, above the limit of {limit} (a possible decompression "
                        "bomb); raise max_pixels if the image is trusted"
                    )
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)  # animated GIF/WebP/APNG: the first frame
                scale = self._draft(im)
                im.load()
                oriented = self._oriented(im)
                if scale > 1:
                    _mark_source(oriented, im, (w, h), scale)
                out = self.convert(oriented, source=str(path))
                if scale > 1:
                    out.info[_SOURCE] = oriented.info[_SOURCE]  # mode conversion may drop info
                return out
        except Image.DecompressionBombError as e:
            raise InputError(f"{path} is a decompression bomb (its header declares too many pixels): {e}") from e
        except FileNotFoundError as e:
            raise InputError(f"image {path} does not exist") from e
        except IsADirectoryError as e:
            raise InputError(f"{path} is a directory, not an image") from e
        except UnidentifiedImageError as e:
            raise InputError(f"cannot read image {path}: not an image format Pillow recognises") from e
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data surfaces as these
            raise InputError(f"cannot read image {path}: {e}") from e

    def _target_short_side(self) -> int:
        """Shorter side of the image just before the crop (image_size for a direct resize)."""
        return self.image_size if self.resize == "direct" else int(self.image_size / self.crop_pct)

    def _draft(self, im: Image.Image) -> int:
        """Ask a JPEG decoder to scale in the DCT domain, down to >= REDUCE_GAP x the target; the scale used."""
        if self.exact_resize or im.format not in _JPEG_FORMATS:
            return 1
        need = math.ceil(REDUCE_GAP * self._target_short_side())
        full_w = im.size[0]
        drafted = im.draft(im.mode, (need, need))  # both sides must stay >= need: orientation does not matter
        return round(full_w / drafted[1][2]) if drafted else 1

    @staticmethod
    def _oriented(im: Image.Image) -> Image.Image:
        try:
            return ImageOps.exif_transpose(im)
        except (ValueError, TypeError, KeyError, SyntaxError):  # a malformed EXIF block: keep the pixels as stored
            return im

    def convert(self, im: Image.Image, source: str = "image") -> Image.Image:
        """Mode conversion to what the model takes: RGB, or L for in_chans 1; checks ``min_side``."""
        check_min_side(im, self.min_side, source)
        rgb = to_rgb(im)
        return rgb.convert("L") if self.in_chans == 1 else rgb

    def to_image(self, item: ImageLike, source: str | None = None) -> Image.Image:
        """A path, PIL image or uint8 array (H,W), (H,W,1), (H,W,3) or (H,W,4) -> RGB/L PIL image."""
        if isinstance(item, (str, os.PathLike)):
            return self.load_image(item)
        if isinstance(item, Image.Image):
            return self.convert(self._oriented(item), source=source or "image")
        if isinstance(item, np.ndarray):
            return self.convert(self._array_to_pil(item, source or "array"), source=source or "array")
        raise InputError(f"expected an image path, PIL image or uint8 array, got {type(item).__name__}")

    @staticmethod
    def _array_to_pil(a: np.ndarray, source: str) -> Image.Image:
        if a.dtype != np.uint8:
            raise InputError(
                f"{source} has dtype {a.dtype}; image arrays must be uint8 HWC "
                "(e.g. (x * 255).round().astype(np.uint8))"
            )
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim == 2:
            return Image.fromarray(a, mode="L")
        if a.ndim == 3 and a.shape[2] in (3, 4):
            return Image.fromarray(np.ascontiguousarray(a), mode="RGB" if a.shape[2] == 3 else "RGBA")
        raise InputError(f"{source} has shape {a.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8")

    # -- geometry and normalisation -------------------------------------------------------------
    def _geometry(self, w: int, h: int) -> tuple[int, int, int, int]:
        """(resized width, resized height, crop left, crop top) for a w x h image."""
        size = self.image_size
        if self.resize == "direct":
            return size, size, 0, 0
        short = int(size / self.crop_pct)
        # torchvision's Resize(int): shorter side to `short`, longer side int(short * long / short_side).
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))

    def resize_crop(self, im: Image.Image) -> Image.Image:
        """Resize (shorter side to image_size/crop_pct, then centre crop; or direct) to image_size^2."""
        if not self.exact_resize:
            fast = self._fast_resize_crop(im)
            if fast is not None:
                return fast
        size, resample = self.image_size, _RESAMPLE[self.interpolation]
        if self.resize == "direct":
            return im.resize((size, size), resample)
        w, h = im.size
        new_w, new_h, left, top = self._geometry(w, h)
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), resample)
        return im.crop((left, top, left + size, top + size))

    def _fast_resize_crop(self, im: Image.Image) -> Image.Image | None:
        """Only the crop's box, box-reduced to >= REDUCE_GAP x then filtered; None below 2x (exact path)."""
        full_w, full_h = source_size(im)
        scale = _draft_scale(im)
        new_w, new_h, left, top = self._geometry(full_w, full_h)
        if scale == 1 and max(full_w / new_w, full_h / new_h) < REDUCE_GAP:
            return None
        size = self.image_size
        fx, fy = full_w / new_w / scale, full_h / new_h / scale  # resized pixel -> decoded pixel
        box = (left * fx, top * fy, (left + size) * fx, (top + size) * fy)
        return im.resize((size, size), _RESAMPLE[self.interpolation], box=box, reducing_gap=REDUCE_GAP)

    def normalize(self, im: Image.Image | np.ndarray) -> np.ndarray:
        """A model-sized RGB/L image -> (C, H, W) float32, (x/255 - mean) / std."""
        a = np.asarray(im)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        # The same float32 operations in the same order as (x / 255 - mean) / std, so the values are
        # bit-identical; done in place on one contiguous (C, H, W) copy: ~13x faster than three temporaries
        # over a transposed view (2.5 -> 0.19 ms for 224x224 RGB here; decode + preprocess of a 0.2 MP JPEG
        # 147 -> 164 images/s per core). It runs once per image on every path (serving, extraction).
        x = np.array(a, dtype=np.float32, order="C")
        x /= np.float32(255.0)
        x -= self.mean
        x /= self.std
        return x

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`normalize` for (C,H,W) or (N,C,H,W): values in [0, 1] units, not clipped."""
        return x * self.std + self.mean

    def model_image(self, item: ImageLike, source: str | None = None) -> Image.Image:
        """The image exactly as the model sees it (converted, resized, cropped), before normalisation."""
        return self.resize_crop(self.to_image(item, source))

    def __call__(self, images: ImageLike | Iterable[ImageLike]) -> np.ndarray:
        """One image or an iterable of them -> float32 (N, C, image_size, image_size)."""
        if isinstance(images, (str, os.PathLike, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        ):
            images = [images]
        arrays = [self.normalize(self.model_image(im, source=_describe(im, i))) for i, im in enumerate(images)]
        if not arrays:
            raise InputError("no images given")
        return np.stack(arrays).astype(np.float32, copy=False)


def _mark_source(oriented: Image.Image, decoded: Image.Image, full_size: tuple[int, int], scale: int) -> None:
    """Record on a draft-decoded, oriented image the full size it stands for (in the oriented frame)."""
    w, h = full_size
    if oriented.size != decoded.size or (oriented.width == oriented.height and _transposes(decoded)):
        w, h = h, w  # EXIF orientation swapped width and height
    oriented.info[_SOURCE] = {"size": (w, h), "decoded": oriented.size, "scale": scale}


def _transposes(im: Image.Image) -> bool:
    """Whether the EXIF orientation of ``im`` swaps width and height (5-8: a quarter turn, maybe mirrored)."""
    try:
        return im.getexif().get(0x0112) in (5, 6, 7, 8)
    except (ValueError, TypeError, KeyError, SyntaxError, OSError):
        return False


def _describe(item: object, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(Path(item))
    return f"image #{index} ({type(item).__name__})"
