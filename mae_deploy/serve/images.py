"""Images out of a request body, decoded the way the offline pipelines decode files.

Bodies: one image (``Content-Type: image/*`` or ``application/octet-stream``), ``multipart/form-data``
with one or more files, or JSON ``{"images": ["<base64>", ...]}``. Only bytes sent in the request are
read: a string that looks like a path is base64 that fails to decode, never a file on the server.

Decoding is :meth:`Preprocessor.load_image` on the request's bytes (first frame, EXIF orientation, mode
conversion, the decompression-bomb limit), so features served equal ``FeatureExtractor`` on the file.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from mae_deploy.errors import InputError
from mae_deploy.preprocess import Preprocessor
from mae_deploy.serve.errors import ApiError, bad_input, payload_too_large
from mae_deploy.serve.json_body import parse_json

RAW_TYPES = ("application/octet-stream",)
ACCEPTED = "image/*, application/octet-stream, multipart/form-data or application/json"


def media_type(content_type: str | None) -> str:
    """'Image/JPEG; charset=x' -> 'image/jpeg'."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_count(n: int, limit: int) -> None:
    if n == 0:
        raise ApiError(400, "no_images", "the request holds no image")
    if n > limit:
        raise payload_too_large(f"the request holds {n} images; this server takes at most {limit} per request")


def images_from_json(body: bytes, limit: int) -> list[bytes]:
    """``{"images": ["<base64>", ...]}`` -> raw image bytes."""
    doc = parse_json(body, "bad_json")
    items = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ApiError(400, "bad_json", 'expected a JSON object {"images": ["<base64 image>", ...]}')
    check_count(len(items), limit)
    out = []
    for i, s in enumerate(items):
        if s.startswith("data:") and "," in s:  # a data URL: data:image/png;base64,....
            s = s.split(",", 1)[1]
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, "bad_base64", f"images[{i}] is not valid base64 ({e}); send the file's bytes") from e
    return out


class _Upload(io.BytesIO):
    """Request bytes that name themselves in the Preprocessor's messages ("(request image 2)", not a repr)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def decode_image(data: bytes, preprocessor: Preprocessor, source: str) -> Image.Image:
    """Bytes -> the RGB/L image the model takes (before resize), exactly as ``Preprocessor.load_image``."""
    if not data:
        raise ApiError(400, "bad_image", f"{source} is empty")
    try:
        return preprocessor.load_image(_Upload(data, source))
    except InputError as e:
        code = "decompression_bomb" if "decompression bomb" in str(e) else "bad_image"
        raise bad_input(e, code) from e


def preprocess(blobs: list[bytes], preprocessor: Preprocessor):
    """Raw image bytes -> float32 (N, C, H, W), as the offline Preprocessor makes it from files."""
    import numpy as np

    arrays = [model_input(data, preprocessor, source_name(i, len(blobs))) for i, data in enumerate(blobs)]
    return np.stack(arrays).astype(np.float32, copy=False)


def source_name(index: int, count: int) -> str:
    """How error messages name image ``index`` of a request holding ``count``."""
    return "(request body)" if count == 1 else f"(request image {index})"


def model_input(data: bytes, preprocessor: Preprocessor, source: str):
    """Bytes -> one normalised (C, H, W) float32 array, as the offline Preprocessor makes it."""
    return preprocessor.normalize(preprocessor.resize_crop(decode_image(data, preprocessor, source)))
