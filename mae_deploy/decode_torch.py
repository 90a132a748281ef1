"""JPEG batches decoded, resized, cropped and normalised by torch on the runner's device (``--decoder torch``).

On CUDA, ``torchvision.io.decode_jpeg(list_of_byte_tensors, device="cuda")`` decodes a whole batch with
nvJPEG, and the bicubic resize (antialiased, as Pillow filters), the centre crop and the normalisation run
there too: only the encoded bytes cross the bus, and the float32 batch is born on the device. On the CPU the
same code runs with libjpeg (what the tests exercise).

The geometry is the :class:`~mae_deploy.preprocess.Preprocessor`'s (shorter side to image_size / crop_pct,
centre crop; or a direct resize), from the full-size decode: no draft decoding. Pixels differ from Pillow's by
rounding (Pillow filters in 8-bit passes), so features agree with the exact PIL path to a cosine of ~0.9999,
not bit for bit; the PIL path stays the reference. Which files come here is decided by
:func:`mae_deploy.extract.decode.device_decodable` (baseline/progressive RGB or greyscale JPEGs, whole, within
the job's limits); a file the device decoder still rejects is reported back, for the PIL path to decode or
to fail with its usual reason.

torch and torchvision are imported when a :class:`TorchJpegDecoder` is made, never at module import.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from mae_deploy.errors import DeviceUnavailable, InputError, MissingDependency
from mae_deploy.preprocess import Preprocessor


def default_decoder(device: str) -> str:
    """``torch`` where the runner is on a GPU, ``pil`` on the CPU (Pillow with draft decoding is faster there)."""
    return "torch" if str(device).startswith(("cuda", "tensorrt")) else "pil"


class TorchJpegDecoder:
    """Encoded JPEGs -> float32 (N, C, S, S) normalised model input on ``device``, as torch tensors."""

    def __init__(self, pre: Preprocessor, device: str = "cpu") -> None:
        if pre.interpolation not in ("bicubic", "bilinear"):
            raise InputError(
                f"--decoder torch resizes bicubic or bilinear; this bundle's preprocessing asks for "
                f"{pre.interpolation!r}: use --decoder pil"
            )
        try:
            import torch
            import torchvision.io
            from torch.nn import functional
        except ImportError as e:
            raise MissingDependency("torchvision", "--decoder torch", "pip install 'mae-deploy[torch]'") from e
        self.torch, self.io, self.F = torch, torchvision.io, functional
        self.pre = pre
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"--decoder torch on {device}: PyTorch sees no CUDA device here; use --decoder pil or --device cpu"
            )
        self.mode = torchvision.io.ImageReadMode.GRAY if pre.in_chans == 1 else torchvision.io.ImageReadMode.RGB
        self.mean = torch.as_tensor(pre.mean, device=self.device).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(pre.std, device=self.device).reshape(1, -1, 1, 1)

    def decode(self, blobs: Sequence[bytes]):
        """(pixels, ok): pixels (len(ok), C, S, S) float32 on the device for the blobs whose index is in ``ok``
        (in order); the other blobs are ones the device decoder rejected."""
        images, ok = self._decode_all(blobs)
        if not ok:
            s = self.pre.image_size
            return self.torch.empty((0, self.pre.in_chans, s, s), device=self.device), ok
        return self.preprocess(images), ok

    def _decode_all(self, blobs: Sequence[bytes]) -> tuple[list, list[int]]:
        """One batched decode; when it fails, one image at a time, to find the ones it rejects."""
        torch = self.torch
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        if not data:
            return [], []
        try:
            return list(self._decode(data)), list(range(len(data)))
        except RuntimeError:
            pass
        images, ok = [], []
        for i, d in enumerate(data):
            try:
                images.append(self._decode([d])[0])
                ok.append(i)
            except RuntimeError:
                continue
        return images, ok

    def _decode(self, data: list):
        return self.io.decode_jpeg(data, mode=self.mode, device=self.device, apply_exif_orientation=True)

    def preprocess(self, images: Sequence) -> object:
        """uint8 (C, H, W) tensors of any sizes -> (N, C, S, S) float32 normalised, in the same order.

        Images of one size are resized together (a folder of 500x375 photos is one interpolate call).
        """
        torch = self.torch
        s = self.pre.image_size
        out = torch.empty((len(images), self.pre.in_chans, s, s), dtype=torch.float32, device=self.device)
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            by_size[(int(im.shape[-2]), int(im.shape[-1]))].append(i)
        for (h, w), idx in by_size.items():
            batch = torch.stack([images[i] for i in idx]).float()
            out[idx] = self._resize_crop(batch, w, h)
        out /= 255.0
        out -= self.mean
        out /= self.std
        return out

    def _resize_crop(self, batch, w: int, h: int):
        """(n, C, h, w) float in [0, 255] -> (n, C, S, S), rounded and clamped like Pillow's 8-bit output."""
        s = self.pre.image_size
        if self.pre.resize == "direct":
            new_w, new_h, left, top = s, s, 0, 0
        else:
            new_w, new_h, left, top = self.pre._geometry(w, h)  # the one definition of the geometry
        if (new_w, new_h) != (w, h):
            batch = self.F.interpolate(
                batch, size=(new_h, new_w), mode=self.pre.interpolation, antialias=True, align_corners=False
            )
        batch = batch[:, :, top : top + s, left : left + s]
        return batch.round_().clamp_(0, 255)
