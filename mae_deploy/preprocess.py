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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

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


def check_min_side(image: Image.Image, min_side: int, source: str = "image") -> None:
    """InputError when the image's shorter side is below ``min_side`` pixels (thumbnails, 1x1 trackers)."""
    w, h = image.size
    if min(w, h) < min_side:
        raise InputError(f"{source} is {w}x{h} pixels; its shorter side is below the minimum of {min_side}")


def _alpha_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _wide_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float greyscale -> 8-bit L, scaled rather than clipped."""
    a = np.asarray(im)
    if im.mode in _INT16_MODES:
        a = a.astype(np.float64) / 257.0
    elif im.mode == "I":
        a = a.astype(np.float64)
        if a.max(initial=0) > 255:
            a = np.clip(a, 0, 65535) / 257.0
    else:  # "F"
        a = a.astype(np.float64)
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

    @classmethod
    def from_config(cls, config: dict, in_chans: int = 3, **overrides) -> Preprocessor:
        """From a bundle's ``preprocessing`` block."""
        keys = ("image_size", "resize", "crop_pct", "interpolation", "mean", "std")
        kwargs = {k: config[k] for k in keys if k in config}
        return cls(**{**kwargs, "in_chans": in_chans, **overrides})

    @classmethod
    def from_bundle(cls, bundle, **overrides) -> Preprocessor:
        return cls.from_config(bundle.preprocessing, in_chans=bundle.in_chans, **overrides)

    # -- loading --------------------------------------------------------------------------------
    def _limit(self) -> int | None:
        return Image.MAX_IMAGE_PIXELS if self.max_pixels is None else self.max_pixels

    def load_image(self, path: str | os.PathLike) -> Image.Image:
        """Open an image file: first frame, EXIF orientation applied, RGB (or L), fully decoded."""
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
                im.load()
                return self.convert(self._oriented(im), source=str(path))
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
    def resize_crop(self, im: Image.Image) -> Image.Image:
        """Resize (shorter side to image_size/crop_pct, then centre crop; or direct) to image_size^2."""
        size, resample = self.image_size, _RESAMPLE[self.interpolation]
        if self.resize == "direct":
            return im.resize((size, size), resample)
        short = int(size / self.crop_pct)
        w, h = im.size
        # torchvision's Resize(int): shorter side to `short`, longer side int(short * long / short_side).
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), resample)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        return im.crop((left, top, left + size, top + size))

    def normalize(self, im: Image.Image) -> np.ndarray:
        """A model-sized RGB/L image -> (C, H, W) float32, (x/255 - mean) / std."""
        a = np.asarray(im, dtype=np.float32) / 255.0
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return (a - self.mean) / self.std

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


def _describe(item: object, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(Path(item))
    return f"image #{index} ({type(item).__name__})"
