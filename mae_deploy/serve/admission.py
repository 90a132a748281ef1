"""Admission by decoded size: the memory images take while they decode, against ``--max-decode-mb``.

Counting requests or images is not enough: six 9400x9400 16-bit PNGs (515 KB each on the wire, under the
pixel limit) need gigabytes while they decode, and six at once on two cores all ran past the deadline.
So before decoding, each image's header is read (microseconds) and its decode cost estimated in bytes; a
request whose images alone exceed the budget is a 413, one that does not fit beside the decodes in flight a
503 with Retry-After, at once, and the admitted ones finish in time. The budget is given back when the
decoding work ends (finished, failed, or cancelled before it started), not when the request gives up:
a request that timed out while its image still decodes keeps holding the memory it uses.

glibc keeps freed memory in per-thread arenas; after a large decode the process would keep gigabytes it
no longer uses, so large decodes end with ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import threading
from collections.abc import Sequence

from PIL import Image

from mae_deploy.preprocess import Preprocessor
from mae_deploy.serve.errors import overloaded, payload_too_large

# Peak bytes per decoded pixel while Preprocessor.load_image and resize_crop hold an image of that mode: the
# decoded image plus the copies its conversion to RGB / L makes (16-bit and float greyscale go through float64
# arrays: 25-29 bytes per pixel measured on 4000^2 and 9400^2 PNGs; RGBA is composited on white: ~16).
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SMALL_MODES = ("1", "L", "P")
WIDE_BYTES, ALPHA_BYTES, SMALL_BYTES, OTHER_BYTES = 32, 16, 5, 8
TRIM_MIN_BYTES = 64 * 2**20  # decodes at least this large give their memory back to the system when done


def decode_cost(data: bytes, preprocessor: Preprocessor) -> int:
    """Estimated peak bytes of decoding ``data`` (0 for what will fail at once: no header, over max_pixels)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            limit = preprocessor._limit()  # the Preprocessor's own decompression-bomb limit
            if limit and w * h > limit:
                return 0  # refused before decoding, with its own message
            preprocessor._draft(im)  # a JPEG that would be draft-decoded costs its reduced size
            w, h = im.size
            mode = im.mode
            alpha = "transparency" in im.info
    except Exception:  # noqa: BLE001 (unreadable: the decoder will say why, without decoding anything)
        return 0
    if mode in _WIDE_MODES:
        per_pixel = WIDE_BYTES
    elif mode in _ALPHA_MODES or alpha:
        per_pixel = ALPHA_BYTES
    elif mode in _SMALL_MODES:
        per_pixel = SMALL_BYTES
    else:
        per_pixel = OTHER_BYTES
    return w * h * per_pixel


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


class DecodeBudget:
    """Bytes of decoding in flight, at most ``limit``; thread-safe (released from the decoding threads)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def reserve(self, costs: Sequence[int]) -> int:
        """Reserve the sum of ``costs`` (one per image) or raise 413 (it can never fit) / 503 (not now)."""
        total = sum(costs)
        if total > self.limit:
            biggest = max(range(len(costs)), key=costs.__getitem__)
            which = "its image" if len(costs) == 1 else f"its images (image {biggest}: {_mib(costs[biggest])})"
            raise payload_too_large(
                f"the request needs about {_mib(total)} to decode {which}, above this server's --max-decode-mb of "
                f"{_mib(self.limit)}; send smaller images (fewer pixels, 8-bit) or fewer per request"
            )
        with self._lock:
            if self.in_flight + total > self.limit:
                raise overloaded(
                    f"the server is decoding {_mib(self.in_flight)} of images; this request's {_mib(total)} would "
                    f"exceed --max-decode-mb of {_mib(self.limit)}; retry shortly",
                    retry_after_s=1,
                )
            self.in_flight += total
        return total

    def release(self, reserved: int) -> None:
        with self._lock:
            self.in_flight -= reserved


def _load_trim():
    """glibc's malloc_trim, or None elsewhere (musl, macOS: nothing to call)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_malloc_trim = _load_trim()


def give_back_memory(decoded: int) -> None:
    """After a decode of ``decoded`` bytes: return the freed heap to the system (glibc keeps it otherwise)."""
    if decoded >= TRIM_MIN_BYTES and _malloc_trim is not None:
        _malloc_trim(0)
