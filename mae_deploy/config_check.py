"""The one check of an MAE architecture block and of a preprocessing block, before anything is built.

``config.json`` of a native checkpoint (read by ``training.checkpoints``), ``mae.json`` of a bundle (read
by :class:`mae_deploy.bundle.Bundle`) and :class:`training.model.MAEConfig` itself all pass through
:func:`check_architecture`, so a depth of -1 or "four", a patch size of 0 or an image size of 1e9 is
one clear error (exit 3) naming the file and the field, never a traceback, a NaN feature or an
allocation that eats the machine's memory. The caps are far above any published MAE (ViT-H/14 at
448 px has 1024 patches, width 1280, depth 32) and keep a typo from asking for terabytes.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from mae_deploy.errors import InputError

MAX_IMG_SIZE = 8192
MAX_PATCHES = 65536  # a 256 x 256 grid
MAX_WIDTH = 16384
MAX_DEPTH = 512
MAX_CHANNELS = 64
MAX_MLP_RATIO = 64.0
MAX_CLASSES = 1_000_000

# Every field a written config holds; ``name`` alone may be missing ("custom").
REQUIRED_FIELDS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "mlp_ratio",
    "norm_eps",
    "qkv_bias",
    "norm_pix_loss",
)
OPTIONAL_FIELDS = ("name", "num_classes", "global_pool")


def _int(arch: dict, key: str, lo: int, hi: int, where: str, error: type[Exception]) -> int:
    v = arch[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise error(f"{where}: {key} must be an integer from {lo} to {hi}, got {v!r}")
    if not lo <= int(v) <= hi:
        raise error(f"{where}: {key} must be from {lo} to {hi}, got {v}")
    return int(v)


def _float(arch: dict, key: str, lo: float, hi: float, where: str, error: type[Exception]) -> float:
    """A finite number in (lo, hi] (lo excluded: ratios and epsilons of 0 make no model)."""
    v = arch[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise error(f"{where}: {key} must be a number above {lo:g} and at most {hi:g}, got {v!r}")
    if not lo < float(v) <= hi:
        raise error(f"{where}: {key} must be above {lo:g} and at most {hi:g}, got {v:g}")
    return float(v)


def _bool(arch: dict, key: str, where: str, error: type[Exception]) -> bool:
    v = arch[key]
    if not isinstance(v, bool):
        raise error(f"{where}: {key} must be true or false, got {v!r}")
    return v


def check_architecture(arch: Any, where: str, error: type[Exception] = InputError) -> dict:
    """Check every field of an architecture block (types, ranges, divisibility); returns it as a dict.

    ``where`` names the file (or option) in messages; ``error`` is the exception class raised
    (CheckpointError / BundleError for files, ValueError for :class:`training.model.MAEConfig`).
    """
    if not isinstance(arch, dict):
        raise error(f"{where}: 'architecture' must be a JSON object, got {type(arch).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in arch]
    if missing:
        raise error(f"{where}: architecture lacks {', '.join(missing)}; re-export or re-convert the checkpoint")
    if "name" in arch and not isinstance(arch["name"], str):
        raise error(f"{where}: name must be a string, got {arch['name']!r}")
    img = _int(arch, "img_size", 1, MAX_IMG_SIZE, where, error)
    patch = _int(arch, "patch_size", 1, img, where, error)
    if img % patch:
        raise error(f"{where}: image size {img} is not divisible by patch size {patch}; pick a multiple of {patch}")
    if (img // patch) ** 2 > MAX_PATCHES:
        raise error(
            f"{where}: {img}px with patch size {patch} gives {(img // patch) ** 2} patches (at most {MAX_PATCHES})"
        )
    _int(arch, "in_chans", 1, MAX_CHANNELS, where, error)
    _width(arch, "embed_dim", "depth", "num_heads", 1, where, error)
    decoder_depth = _int(arch, "decoder_depth", 0, MAX_DEPTH, where, error)
    if decoder_depth:
        _width(arch, "decoder_embed_dim", "decoder_depth", "decoder_num_heads", 1, where, error)
    _float(arch, "mlp_ratio", 0.0, MAX_MLP_RATIO, where, error)
    if int(arch["embed_dim"] * arch["mlp_ratio"]) < 1:
        raise error(f"{where}: mlp_ratio {arch['mlp_ratio']:g} leaves no hidden units at width {arch['embed_dim']}")
    _float(arch, "norm_eps", 0.0, 0.1, where, error)
    _bool(arch, "qkv_bias", where, error)
    _bool(arch, "norm_pix_loss", where, error)
    if "num_classes" in arch:
        _int(arch, "num_classes", 0, MAX_CLASSES, where, error)
    if "global_pool" in arch:
        _bool(arch, "global_pool", where, error)
    return dict(arch)


def _width(arch: dict, dim: str, depth: str, heads: str, min_depth: int, where: str, error: type[Exception]) -> None:
    d = _int(arch, dim, 4, MAX_WIDTH, where, error)
    _int(arch, depth, min_depth, MAX_DEPTH, where, error)
    h = _int(arch, heads, 1, d, where, error)
    if d % h:
        raise error(f"{where}: {dim} {d} is not divisible by {heads} {h}")
    if d % 4:
        raise error(f"{where}: {dim} {d} must be divisible by 4 for 2-D sin-cos position embeddings")


def check_preprocessing(
    pre: Any, in_chans: int, img_size: int, where: str, error: type[Exception] = InputError
) -> dict:
    """Check a bundle's preprocessing block: mean and std present, one finite value per channel, std > 0."""
    if not isinstance(pre, dict):
        raise error(f"{where}: 'preprocessing' must be a JSON object, got {type(pre).__name__}")
    size = pre.get("image_size", img_size)
    if size != img_size:
        raise error(f"{where}: preprocessing.image_size {size!r} differs from the graph's input size {img_size}")
    for key in ("mean", "std"):
        if key not in pre:
            raise error(f"{where}: preprocessing lacks '{key}' (one value per channel); re-export the bundle")
        vals = pre[key]
        if not isinstance(vals, list) or len(vals) != in_chans:
            n = len(vals) if isinstance(vals, list) else type(vals).__name__
            raise error(f"{where}: preprocessing.{key} has {n} values for {in_chans} channels")
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise error(f"{where}: preprocessing.{key} holds {v!r}; every value must be a finite number")
    if any(v <= 0 for v in pre["std"]):
        raise error(
            f"{where}: preprocessing.std {pre['std']} must be above 0 for every channel "
            "(a std of 0 divides by zero and gives NaN features)"
        )
    crop = pre.get("crop_pct", 1.0)
    if isinstance(crop, bool) or not isinstance(crop, numbers.Real) or not 0 < float(crop) <= 1:
        raise error(f"{where}: preprocessing.crop_pct must be above 0 and at most 1, got {crop!r}")
    return dict(pre)
