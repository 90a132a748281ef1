"""Reconstruction: mask an image, encode the visible patches, decode every patch, back to pixels.

The result holds the four panels of the official MAE demo (original | masked | reconstruction |
reconstruction + visible) and draws them as one grid image with a title row.

Masks: with a ``seed``, every image gets the mask drawn from ``numpy.random.default_rng(seed)``, so an
image's result does not depend on which other images share its batch or command line.

Norm-pix models (``bundle.norm_pix_loss``) predict each patch normalised by its own mean and variance.
To show pixels, the predictions are de-normalised with the statistics of the corresponding input patch
(:func:`mae_deploy.patches.denormalize_norm_pix`); for masked patches these statistics come from the
original image, which the model never saw. Results say so (``Reconstruction.norm_pix``, and the title).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mae_deploy.bundle import Bundle
from mae_deploy.errors import InputError
from mae_deploy.masking import random_masking
from mae_deploy.patches import denormalize_norm_pix, mask_to_pixels, patchify, unpatchify
from mae_deploy.pipeline import Pipeline
from mae_deploy.preprocess import ImageLike, Preprocessor
from mae_deploy.runners import Runner

PANEL_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")
MIN_PANEL = 224  # small models' panels are enlarged (nearest neighbour) to at least this many pixels
PAD = 8
TITLE_HEIGHT = 28
LABEL_HEIGHT = 20


MAX_SEED = 2**63 - 1


def check_seed(seed: object, what: str = "seed") -> int:
    """A mask seed is an integer from 0 to 2**63 - 1 (what numpy's generators take); else InputError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"{what} must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def grid_size(panel: int) -> tuple[int, int]:
    """(width, height) of :meth:`Reconstruction.grid_image` for a panel of ``panel`` pixels."""
    return 4 * panel + 5 * PAD, TITLE_HEIGHT + LABEL_HEIGHT + panel + PAD


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats (C, H, W) -> uint8 (H, W, C), or (H, W) for one channel."""
    a = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return a[:, :, 0] if a.shape[2] == 1 else a


@dataclass
class Reconstruction:
    """One image's reconstruction. Images are uint8 (H, W, C) ((H, W) for 1-channel models)."""

    original: np.ndarray  # the model's input (converted, resized, cropped), before normalisation
    reconstruction: np.ndarray  # every patch as predicted by the decoder, in pixels
    mask: np.ndarray  # (L,) float32, 1 = removed (hidden from the encoder)
    pred: np.ndarray  # (L, p*p*C) raw decoder output (normalised pixels, per patch if norm_pix)
    mask_ratio: float
    seed: int
    norm_pix: bool  # predictions were de-normalised with each input patch's own mean and variance
    model: str
    patch_size: int
    fill: tuple[int, ...]  # colour of removed patches in the "masked" panel (the preprocessing mean)
    source: str = ""

    @property
    def pixel_mask(self) -> np.ndarray:
        """(H, W) bool, True where the patch was removed."""
        return mask_to_pixels(self.mask[None], self.patch_size)[0] > 0.5

    def masked(self) -> np.ndarray:
        """The original with removed patches filled with the mean colour (what the official demo shows)."""
        out = self.original.copy()
        out[self.pixel_mask] = self.fill if out.ndim == 3 else self.fill[0]
        return out

    def pasted(self) -> np.ndarray:
        """The reconstruction where patches were removed, the original where they were visible."""
        m = self.pixel_mask if self.original.ndim == 2 else self.pixel_mask[:, :, None]
        return np.where(m, self.reconstruction, self.original)

    def panels(self) -> list[tuple[str, Image.Image]]:
        """The official demo's four panels as (title, PIL image)."""
        imgs = (self.original, self.masked(), self.reconstruction, self.pasted())
        return [(t, Image.fromarray(a)) for t, a in zip(PANEL_TITLES, imgs, strict=True)]

    def title(self) -> str:
        t = f"{self.model} | mask ratio {self.mask_ratio:g} | seed {self.seed}"
        if self.norm_pix:
            t += " | norm-pix: de-normalised with each patch's own mean/var"
        return t

    def grid_image(self, panel_size: int | None = None) -> Image.Image:
        """The four panels side by side under a title row naming model, mask ratio and seed (RGB)."""
        size = self.original.shape[0]
        panel = panel_size or size * max(1, math.ceil(MIN_PANEL / size))
        width, height = grid_size(panel)
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        title_font, label_font = _font(16), _font(13)
        title = self.title()
        while title and draw.textlength(title, font=title_font) > width - 2 * PAD:
            title = title[:-2] + "…"
        draw.text((PAD, 6), title, fill="black", font=title_font)
        for i, (label, img) in enumerate(self.panels()):
            x = PAD + i * (panel + PAD)
            draw.text((x, TITLE_HEIGHT + 2), label, fill=(60, 60, 60), font=label_font)
            big = img.convert("RGB").resize((panel, panel), Image.Resampling.NEAREST)
            canvas.paste(big, (x, TITLE_HEIGHT + LABEL_HEIGHT))
        return canvas


class Reconstructor(Pipeline):
    """Reconstructions through any runner (``backend``/``device``/``precision``, or an existing ``runner``)."""

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        backend: str = "ort",
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 8,
        runner: Runner | None = None,
        preprocessor: Preprocessor | None = None,
        **runner_opts,
    ) -> None:
        super().__init__(bundle, backend, device, precision, batch_size, runner, preprocessor, runner_opts)

    def _check_bundle(self) -> None:
        self.bundle.graph("decoder")  # encoder-only bundles fail here with the bundle's own message

    def predict_pixels(
        self, pixel_values: np.ndarray, ids_keep: np.ndarray, ids_restore: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (N, C, H, W) input + mask -> ([0, 1] images (N, C, H, W), raw decoder output (N, L, p*p*C))."""
        self._check_open()
        b = self.bundle
        pred = self.runner.decode(self.runner.encode(pixel_values, ids_keep), ids_restore)
        if b.norm_pix_loss:
            pred = denormalize_norm_pix(pred, patchify(pixel_values, b.patch_size))
        return self.preprocessor.denormalize(unpatchify(pred, b.patch_size, b.in_chans)), pred

    def reconstruct(
        self, images: ImageLike | Iterable[ImageLike], mask_ratio: float = 0.75, seed: int | None = 0
    ) -> list[Reconstruction]:
        """One image or several -> one :class:`Reconstruction` each (``seed=None``: a fresh random seed)."""
        if isinstance(images, (str, os.PathLike, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        ):
            images = [images]
        images = list(images)
        if not images:
            raise InputError("no images given")
        seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else check_seed(seed)
        if not 0.0 <= mask_ratio < 1.0:
            raise InputError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        b = self.bundle
        ids_keep, ids_restore, mask = random_masking(1, b.num_patches, mask_ratio, rng=seed)
        fill = tuple(int(round(v * 255)) for v in self.preprocessor.mean.ravel())
        out: list[Reconstruction] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            sources = [_source(im, start + i) for i, im in enumerate(chunk)]
            model_imgs = [self.preprocessor.model_image(im, source=s) for im, s in zip(chunk, sources, strict=True)]
            x = np.stack([self.preprocessor.normalize(im) for im in model_imgs]).astype(np.float32)
            n = len(chunk)
            recon, pred = self.predict_pixels(x, np.repeat(ids_keep, n, 0), np.repeat(ids_restore, n, 0))
            for i in range(n):
                out.append(
                    Reconstruction(
                        original=np.asarray(model_imgs[i]).copy(),
                        reconstruction=_to_uint8(recon[i]),
                        mask=mask[0].copy(),
                        pred=pred[i],
                        mask_ratio=mask_ratio,
                        seed=seed,
                        norm_pix=b.norm_pix_loss,
                        model=b.name,
                        patch_size=b.patch_size,
                        fill=fill,
                        source=sources[i],
                    )
                )
        return out

    __call__ = reconstruct


def _source(item: object, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return f"image #{index}"
