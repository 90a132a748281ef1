"""Datasets and transforms for pretraining, fine-tuning and linear probing.

Data are ImageFolder directories (``root/<class>/<image>``), split as ``data_path/train`` and
``data_path/val`` like the official code. The transforms are the official recipes built from torchvision:

- pretraining: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip;
- fine-tuning: RandomResizedCrop(bicubic) + flip + RandAugment + random erasing, Mixup/CutMix with label
  smoothing on the batch;
- linear probing: RandomResizedCrop(bicubic) + flip;
- evaluation: resize the shorter side to size / 0.875 (bicubic) and centre-crop (crop 1.0 above 224 px).

Normalisation uses the ImageNet statistics for RGB and 0.5 / 0.5 for single-channel data, the same as the
bundles ``mae-deploy export`` writes, so exported features match training.

:func:`write_digits_imagefolder` writes scikit-learn's handwritten digits (1797 real 8x8 scans that ship
inside scikit-learn, no download) as such a directory: the built-in dataset for the demo and the tests.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T2

from mae_deploy.errors import InputError
from mae_deploy.fileio import atomic_write, atomic_write_json
from mae_deploy.names import IMAGE_EXTENSIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = InterpolationMode.BICUBIC


def channel_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: ImageNet's for RGB, 0.5/0.5 otherwise (what exported bundles use)."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * in_chans, (0.5,) * in_chans


def _normalize(in_chans: int) -> list:
    mean, std = channel_stats(in_chans)
    return [transforms.ToTensor(), transforms.Normalize(mean, std)]


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def pretrain_transform(input_size: int, in_chans: int = 3) -> Callable:
    """The official pretraining augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + flip."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC),
            transforms.RandomHorizontalFlip(),
            *_normalize(in_chans),
        ]
    )


def eval_transform(input_size: int, in_chans: int = 3) -> Callable:
    """Shorter side to size / crop_pct (bicubic), centre crop; crop_pct 0.875 up to 224 px, else 1.0."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose(
        [
            transforms.Resize(int(input_size / crop_pct), interpolation=BICUBIC),
            transforms.CenterCrop(input_size),
            *_normalize(in_chans),
        ]
    )


def parse_rand_augment(spec: str) -> dict:
    """timm-style 'rand-m9-mstd0.5-inc1' -> torchvision RandAugment kwargs (num_ops, magnitude).

    torchvision's RandAugment has no magnitude noise (mstd) or 'increasing' op set (inc); those parts of
    the spec are accepted and ignored, which the fine-tuning log says.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise InputError(f"--aa {spec!r}: only RandAugment specs 'rand-m<M>-n<N>...' are supported (or 'none')")
    kwargs = {"num_ops": 2, "magnitude": 9}
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)([\d.]+)", part)
        if not m:
            raise InputError(f"--aa {spec!r}: cannot read the part {part!r}")
        key, value = m.groups()
        if key == "m":
            kwargs["magnitude"] = int(float(value))
        elif key == "n":
            kwargs["num_ops"] = int(value)
        elif key not in ("mstd", "inc", "mmax", "w", "p"):
            raise InputError(f"--aa {spec!r}: unknown RandAugment option {key!r}")
    return kwargs


def finetune_transform(
    input_size: int,
    in_chans: int = 3,
    aa: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    remode: str = "pixel",
    color_jitter: float | None = None,
) -> Callable:
    """The fine-tuning augmentation: RandomResizedCrop(bicubic) + flip (+ColorJitter) + RandAugment, then
    random erasing (``remode`` pixel: per-pixel normal noise; const: zeros) with probability ``reprob``."""
    ops: list = [
        transforms.RandomResizedCrop(input_size, interpolation=BICUBIC),
        transforms.RandomHorizontalFlip(),
    ]
    if color_jitter:
        ops.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
    if aa and aa.lower() != "none":
        ops.append(transforms.RandAugment(interpolation=BICUBIC, **parse_rand_augment(aa)))
    ops += _normalize(in_chans)
    if reprob > 0:
        if remode not in ("pixel", "const"):
            raise InputError(f"--remode {remode!r}: choose 'pixel' (random normal pixels) or 'const' (zeros)")
        ops.append(transforms.RandomErasing(p=reprob, value="random" if remode == "pixel" else 0))
    return transforms.Compose(ops)


def linprobe_transform(input_size: int, in_chans: int = 3) -> Callable:
    """The official linear-probing augmentation: RandomResizedCrop(bicubic) + flip."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(input_size, interpolation=BICUBIC),
            transforms.RandomHorizontalFlip(),
            *_normalize(in_chans),
        ]
    )


# --------------------------------------------------------------------------------------------------
# Mixup / CutMix with label smoothing
# --------------------------------------------------------------------------------------------------


class MixupCutmix:
    """Batch-level Mixup / CutMix (torchvision v2) with label smoothing, like the official fine-tuning.

    With probability ``prob`` a batch is mixed: by CutMix with probability ``switch_prob`` when both are
    on, else by Mixup. Targets come back as (N, num_classes) soft labels; smoothing is applied to the
    mixed one-hot targets, which equals smoothing each one-hot before mixing (the mix is linear).
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        smoothing: float = 0.1,
    ) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes = num_classes
        self.prob = prob
        self.smoothing = smoothing
        mix = [T2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []
        cut = [T2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else []
        if mix and cut:
            self.mixer = T2.RandomChoice(mix + cut, p=[1 - switch_prob, switch_prob])
        else:
            self.mixer = (mix + cut)[0]

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prob >= 1.0 or float(torch.rand(())) < self.prob:
            images, soft = self.mixer(images, targets)
        else:
            soft = torch.nn.functional.one_hot(targets, self.num_classes).to(images.dtype)
        off = self.smoothing / self.num_classes
        return images, soft * (1.0 - self.smoothing) + off


# --------------------------------------------------------------------------------------------------
# ImageFolder datasets
# --------------------------------------------------------------------------------------------------


def _load_image(path: str, mode: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError, zlib.error ...
        raise InputError(f"cannot decode image {path} ({e}); remove or replace it and --resume auto") from None


class ImageHeaderCheck:
    """``is_valid_file`` for ImageFolder: an image extension and a header Pillow identifies (read without
    decoding the pixels, so the scan costs one small read per file). Files that fail are kept in
    ``rejected`` as (path, reason), so a run skips and reports them instead of stopping mid-epoch."""

    def __init__(self) -> None:
        self.rejected: list[tuple[str, str]] = []

    def __call__(self, path: str) -> bool:
        if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
            return False
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018 - the header is parsed by open; size proves it gave dimensions
        except Exception as e:  # noqa: BLE001 - as in _load_image: any failure to parse the header
            self.rejected.append((path, str(e).splitlines()[0] if str(e) else type(e).__name__))
            return False
        return True


def _listing(rejected: list[tuple[str, str]], n: int = 5) -> str:
    more = f" ... and {len(rejected) - n} more" if len(rejected) > n else ""
    return "; ".join(f"{p} ({why})" for p, why in rejected[:n]) + more


def image_folder(
    root: str | os.PathLike, transform: Callable | None, in_chans: int = 3, log: Callable[[str], None] | None = print
) -> datasets.ImageFolder:
    """An ImageFolder whose images are loaded as RGB (3 channels) or L (1 channel).

    Files that are not decodable images are skipped and counted (``log`` names the first ones; the dataset's
    ``skipped`` attribute lists them all); a folder with none left is an InputError naming them.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"data directory {root} does not exist; expected <root>/<class>/<image> folders "
            "(write the built-in digits with `mae-deploy data digits DIR`)"
        )
    if in_chans not in (1, 3):
        raise InputError(f"--in_chans {in_chans}: image folders hold 1-channel (L) or 3-channel (RGB) images")
    check = ImageHeaderCheck()
    try:
        # allow_empty: a class folder whose files are all undecodable stays a class (its index is kept).
        ds = datasets.ImageFolder(
            str(root),
            transform=transform,
            is_valid_file=check,
            allow_empty=True,
            loader=partial(_load_image, mode="RGB" if in_chans == 3 else "L"),
        )
    except (FileNotFoundError, OSError) as e:
        raise InputError(f"{root} is not an ImageFolder directory (<root>/<class>/<image>): {e}") from None
    if len(ds) == 0:
        unread = (
            f"; {len(check.rejected)} file(s) could not be read: {_listing(check.rejected)}"
            if check.rejected
            else f" (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
        raise InputError(f"{root} holds no decodable image{unread}")
    ds.skipped = check.rejected
    if check.rejected and log is not None:
        log(
            f"note: skipped {len(check.rejected)} file(s) in {root} that are not decodable images: "
            f"{_listing(check.rejected)}"
        )
    return ds


def split_dir(data_path: str | os.PathLike, split: str) -> Path:
    """``data_path/split`` (the official layout); ``data_path`` itself for 'train' when it has no train/."""
    base = Path(data_path)
    candidate = base / split
    if candidate.is_dir():
        return candidate
    if split == "train" and base.is_dir() and not (base / "val").exists():
        return base
    if not base.is_dir():
        raise InputError(
            f"--data_path {base} does not exist (write the built-in digits with `mae-deploy data digits DIR`)"
        )
    need = "train/ (or the class folders directly)" if split == "train" else f"{split}/"
    raise InputError(f"{candidate} does not exist: --data_path must hold {need} as ImageFolder directories")


# --------------------------------------------------------------------------------------------------
# The built-in dataset: scikit-learn's handwritten digits as an ImageFolder
# --------------------------------------------------------------------------------------------------

DIGITS_MARKER = "digits.json"


def write_digits_imagefolder(
    root: str | os.PathLike,
    size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    per_class: int | None = None,
    progress: bool = False,
) -> dict:
    """Write scikit-learn's 1797 handwritten digits as ``root/{train,val}/<digit>/<index>.png``.

    Each 8x8 scan (values 0-16, ink bright on black) is scaled to 0-255 and upscaled to ``size`` x ``size``
    (bicubic), 8-bit greyscale PNG. The split is stratified and fixed by ``seed``; ``per_class`` keeps only
    the first images of each digit (small sets for tests). Each file is written atomically and existing ones
    are kept, so an interrupted run resumes; ``root/digits.json`` marks a finished set and records its
    settings. Returns that record.
    """
    from sklearn.datasets import load_digits

    if size < 8:
        raise InputError(f"size {size} is below the digits' native 8 px")
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(root)
    settings = {"size": size, "val_fraction": val_fraction, "seed": seed, "per_class": per_class}
    marker = root / DIGITS_MARKER
    if marker.exists():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in settings} == settings:
            return done
        raise InputError(
            f"{root} already holds digits written with other settings ({marker}); choose another directory or delete it"
        )
    if root.exists() and any(p for p in root.iterdir() if p.name not in ("train", "val")):
        raise InputError(f"{root} exists and holds other files; give an empty or new directory")

    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    jobs = []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        if per_class is not None:
            idx = idx[:per_class]
        idx = rng.permutation(idx)
        n_val = max(1, int(round(len(idx) * val_fraction)))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            for i in sorted(part.tolist()):
                jobs.append((root / split / str(digit) / f"{i:04d}.png", images[i]))
                counts[split] += 1

    from tqdm import tqdm

    for dst, img in tqdm(jobs, desc="digits", unit="img", disable=not progress):
        if dst.exists():
            continue  # finished by an earlier, interrupted run
        dst.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        im = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC)
        atomic_write(dst, partial(im.save, format="PNG"))

    record = {
        **settings,
        "root": str(root),
        "classes": [str(d) for d in range(10)],
        **counts,
        "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
    }
    atomic_write_json(marker, record)
    return record
