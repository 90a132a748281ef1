"""One optimization profile over batch and visible tokens, shared by the trt backend and ORT's TensorRT provider.

``pixel_values`` and ``ids_keep`` share ``batch``; ``latent`` has ``visible + 1`` tokens; ``ids_restore`` is
``[batch, L]`` (:meth:`TrtProfile.shapes`). Batches above the profile's max are run in chunks by the
runners; visible counts outside it are an error that says how to rebuild. Pure logic: no TensorRT needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from mae_deploy.errors import InputError
from mae_deploy.runners.trt.api import PARTS

DEFAULT_MAX_BATCH = 32
DEFAULT_OPT_BATCH = 8

Shape = tuple[int, ...]


def parse_visible(spec: int | str, num_patches: int) -> int:
    """A visible-token count from an int or from 'L' / 'L/4' (floor, at least 1); checked to be in 1..L."""
    L = num_patches
    if isinstance(spec, str):
        s = spec.strip().replace(" ", "")
        if s.isdigit():
            value = int(s)
        elif s == "L":
            value = L
        elif m := re.fullmatch(r"L/(\d+)", s):
            d = int(m.group(1))
            if d == 0:
                raise InputError(f"visible-token count {spec!r} divides by zero")
            value = max(1, L // d)
        else:
            raise InputError(f"visible-token count {spec!r} is not a number, 'L' or 'L/N' (L = {L} patches)")
    else:
        value = int(spec)
    if not 1 <= value <= L:
        raise InputError(f"visible-token count {value} must be in 1..{L} (the model has L = {L} patches)")
    return value


@dataclass(frozen=True)
class TrtProfile:
    """One optimization profile over batch and visible tokens, for both parts of a bundle.

    Batch runs 1..max_batch (optimised for opt_batch), visible tokens min_visible..max_visible (optimised
    for opt_visible). :meth:`shapes` turns it into the (min, opt, max) shape of every graph input.
    """

    num_patches: int
    image_size: int
    in_chans: int
    embed_dim: int
    max_batch: int
    opt_batch: int
    min_visible: int
    opt_visible: int
    max_visible: int
    min_batch: int = 1

    def shapes(self, part: str) -> dict[str, tuple[Shape, Shape, Shape]]:
        """{input name: (min, opt, max)} for ``part`` ('encoder' or 'decoder')."""
        c, s, L, d = self.in_chans, self.image_size, self.num_patches, self.embed_dim
        corners = (
            (self.min_batch, self.min_visible),
            (self.opt_batch, self.opt_visible),
            (self.max_batch, self.max_visible),
        )

        def at_corners(shape: Callable[[int, int], Shape]) -> tuple[Shape, Shape, Shape]:
            lo, opt, hi = (shape(b, k) for b, k in corners)
            return lo, opt, hi

        if part == "encoder":
            return {
                "pixel_values": at_corners(lambda b, _: (b, c, s, s)),
                "ids_keep": at_corners(lambda b, k: (b, k)),
            }
        if part == "decoder":
            return {
                "latent": at_corners(lambda b, k: (b, k + 1, d)),  # cls token + visible tokens
                "ids_restore": at_corners(lambda b, _: (b, L)),
            }
        raise InputError(f"unknown part {part!r}; expected one of {list(PARTS)}")

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"batch {self.min_batch}..{self.max_batch} (opt {self.opt_batch}), visible tokens "
            f"{self.min_visible}..{self.max_visible} (opt {self.opt_visible}) of L={self.num_patches}"
        )

    def check_call(self, part: str, batch: int, visible: int) -> None:
        """InputError unless ``visible`` lies in the profile (batch is chunked by the runner, never refused)."""
        if not self.min_visible <= visible <= self.max_visible:
            raise InputError(
                f"the TensorRT {part} engine was built for {self.min_visible}..{self.max_visible} visible tokens, "
                f"but this call has {visible}; rebuild with --min-visible/--max-visible covering it "
                f"(runner options min_visible=/max_visible=)"
            )
        if batch < self.min_batch:
            raise InputError(f"batch {batch} is below the engine profile's minimum batch {self.min_batch}")


def derive_profile(
    num_patches: int,
    image_size: int,
    in_chans: int,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    opt_visible: int | str | None = None,
    min_visible: int | str = 1,
    *,
    embed_dim: int,
    max_visible: int | str | None = None,
) -> TrtProfile:
    """The optimization profile for a bundle: batch 1..max_batch, visible min_visible..max_visible.

    Defaults: opt_batch = min(8, max_batch); max_visible = L (feature extraction); opt_visible = max_visible.
    For reconstruction-heavy use pass opt_visible='L/4' (mask ratio 0.75). Visible counts may be ints or
    'L' / 'L/N'. Every bad combination is an InputError naming the value and the allowed range.
    """
    for name, v in (
        ("num_patches", num_patches),
        ("image_size", image_size),
        ("in_chans", in_chans),
        ("embed_dim", embed_dim),
    ):
        if int(v) < 1:
            raise InputError(f"{name} must be positive, got {v}")
    L = int(num_patches)
    if int(max_batch) < 1:
        raise InputError(f"max_batch must be at least 1, got {max_batch}")
    max_batch = int(max_batch)
    opt_batch = min(DEFAULT_OPT_BATCH, max_batch) if opt_batch is None else int(opt_batch)
    if not 1 <= opt_batch <= max_batch:
        raise InputError(f"opt_batch {opt_batch} must be in 1..max_batch ({max_batch})")
    lo = parse_visible(min_visible, L)
    hi = L if max_visible is None else parse_visible(max_visible, L)
    if lo > hi:
        raise InputError(f"min_visible {lo} is above max_visible {hi}")
    opt = hi if opt_visible is None else parse_visible(opt_visible, L)
    if not lo <= opt <= hi:
        raise InputError(f"opt_visible {opt} must be in min_visible..max_visible ({lo}..{hi})")
    return TrtProfile(
        num_patches=L,
        image_size=int(image_size),
        in_chans=int(in_chans),
        embed_dim=int(embed_dim),
        max_batch=max_batch,
        opt_batch=opt_batch,
        min_visible=lo,
        opt_visible=opt,
        max_visible=hi,
    )


def profile_for_bundle(bundle, **kwargs) -> TrtProfile:
    """:func:`derive_profile` with the bundle's L, image size, channels and encoder width."""
    return derive_profile(bundle.num_patches, bundle.image_size, bundle.in_chans, embed_dim=bundle.embed_dim, **kwargs)


def format_shape(shape: Shape) -> str:
    return "x".join(str(int(d)) for d in shape)
