"""Path -> model-sized image, or a failure with its reason: what a decode worker (or a Ray task) runs.

One definition of decoding and preprocessing for every engine: the runtime's
:class:`~mae_deploy.preprocess.Preprocessor`, so extracted features equal ``FeatureExtractor``'s.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from mae_deploy.errors import InputError
from mae_deploy.sources.base import Failure, NamedBytes, RowReader

TRANSFERS = ("uint8", "float32")


def classify_failure(exc: BaseException) -> str:
    """A failure reason (one of FAILURE_REASONS) for an exception raised while loading an image."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    text = " ".join(str(e) for e in chain).lower()
    if any(isinstance(e, Image.DecompressionBombError) for e in chain) or "decompression bomb" in text:
        return "decompression_bomb"
    if any(isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) for e in chain):
        return "unreadable"
    if any(isinstance(e, UnidentifiedImageError) for e in chain):
        return "not_an_image"
    if "truncated" in text:
        return "truncated"
    return "corrupt"


@dataclass
class Decoded:
    """The result of decoding one batch: model-sized images of the good inputs, and the failures."""

    rows: list[int]
    pixels: np.ndarray | None  # uint8 (n, H, W[, C]) or float32 (n, C, H, W); None when n == 0
    failures: list[tuple[int, str, str]]  # (row, reason, message)
    decode_s: float = 0.0
    in_slot: bool = False  # pixels were written to the batch's shared-memory slot (pixels is None in transit)
    encoded: list[tuple[int, bytes]] = field(default_factory=list)  # (row, JPEG bytes) for the device decoder


def device_decodable(data: bytes, max_pixels: int, min_side: int) -> bool:
    """Whether ``--decoder torch`` takes these bytes: a whole RGB or greyscale JPEG within the job's limits.

    Everything else (other formats, CMYK, a missing end marker, too small, too many pixels, unreadable
    headers) takes the PIL path, which decodes it or fails it with the usual errors.jsonl reason. Only the
    header is parsed here (tens of microseconds).
    """
    if not data.startswith(b"\xff\xd8") or b"\xff\xd9" not in data[-32:]:  # truncated files end elsewhere
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return (
                im.format == "JPEG"
                and im.mode in ("RGB", "L")
                and min(w, h) >= min_side
                and (not max_pixels or w * h <= max_pixels)
            )
    except Exception:  # the PIL path will say what is wrong with it
        return False


class Decoder:
    """Row -> model-sized image: the source's reader gives the bytes, the runtime's Preprocessor decodes them
    (one definition of the preprocessing). ``reader`` None reads plain files."""

    def __init__(
        self,
        preprocessing: dict,
        in_chans: int,
        min_side: int,
        max_pixels: int,
        transfer: str,
        exact_resize: bool = False,
        reader: RowReader | None = None,
        device_jpeg: bool = False,
    ) -> None:
        from mae_deploy.preprocess import Preprocessor
        from mae_deploy.sources.files import FileReader

        self.pre = Preprocessor.from_config(
            preprocessing, in_chans=in_chans, max_pixels=max_pixels, min_side=1, exact_resize=exact_resize
        )
        self.min_side = min_side
        self.max_pixels = max_pixels
        self.transfer = transfer
        self.device_jpeg = device_jpeg  # --decoder torch: JPEGs go back encoded, for the runner's device
        self.reader = reader if reader is not None else FileReader()

    def read(self, row: int, path: str) -> bytes:
        """The encoded bytes of ``row`` (a file, a tar member, a Parquet value); Failure when it has none."""
        return self.reader.read(row, path)

    def decode_one(self, row: int, path: str) -> np.ndarray:
        return self.decode_bytes(self.read(row, path), path)

    def decode_bytes(self, data: bytes, path: str) -> np.ndarray:
        """A row's bytes -> its model-sized image (uint8 HWC or normalised float32 CHW, as ``transfer`` says)."""
        from mae_deploy.preprocess import check_min_side

        try:
            im = self.pre.load_image(NamedBytes(data, path))
        except Exception as e:  # any decoder error is this input's failure, never the job's
            raise Failure(classify_failure(e), str(e)) from e
        try:
            check_min_side(im, self.min_side, path)
        except InputError as e:
            raise Failure("too_small", str(e)) from e
        model_image = np.asarray(self.pre.resize_crop(im))
        return model_image if self.transfer == "uint8" else self.pre.normalize(model_image)

    def pixel_layout(self) -> tuple[tuple[int, ...], str]:
        """(shape, dtype) of one decoded image as this decoder's ``transfer`` delivers it."""
        s, c = self.pre.image_size, self.pre.in_chans
        if self.transfer == "float32":
            return (c, s, s), "float32"
        return ((s, s) if c == 1 else (s, s, c)), "uint8"

    def decode_batch(self, items: Sequence[tuple[int, str]], out: np.ndarray | None = None) -> Decoded:
        """Decode ``items``; with ``out`` (room for every item) the good images go there, in order, and the
        result's pixels are ``out[:n]``: a worker writes straight into shared memory, with no stacking copy."""
        t0 = time.perf_counter()
        rows: list[int] = []
        images: list[np.ndarray] = []
        failures: list[tuple[int, str, str]] = []
        encoded: list[tuple[int, bytes]] = []
        for row, path in items:
            try:
                if self.device_jpeg:
                    data = self.read(row, path)
                    if device_decodable(data, self.max_pixels, self.min_side):
                        encoded.append((row, data))
                        continue
                    image = self.decode_bytes(data, path)
                else:
                    image = self.decode_one(row, path)
                if out is None:
                    images.append(image)
                else:
                    out[len(rows)] = image
                rows.append(row)
            except Failure as f:
                failures.append((row, f.reason, f.message))
            except Exception as e:
                failures.append((row, classify_failure(e), str(e)))
        if out is not None:
            pixels = out[: len(rows)] if rows else None
        else:
            pixels = np.stack(images) if images else None
        return Decoded(rows, pixels, failures, time.perf_counter() - t0, encoded=encoded)


def normalize_batch(pre, pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W[, C]) model images -> float32 (N, C, H, W), bit-identical to ``pre.normalize`` per image.

    The same float32 operations in the same order, over the whole batch at once (1.6x the per-image loop).
    """
    a = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
    x = np.array(a, dtype=np.float32, order="C")
    x /= np.float32(255.0)
    x -= pre.mean
    x /= pre.std
    return x


def merge_decoded(parts: dict[int, Decoded], n_items: int) -> Decoded:
    """Single-image results (after a worker death) -> one batch result, in item order."""
    ordered = [parts[j] for j in range(n_items)]
    pixels = [d.pixels for d in ordered if d.pixels is not None]
    return Decoded(
        rows=[r for d in ordered for r in d.rows],
        pixels=np.concatenate(pixels) if pixels else None,
        failures=[f for d in ordered for f in d.failures],
        decode_s=sum(d.decode_s for d in ordered),
        encoded=[e for d in ordered for e in d.encoded],
    )
