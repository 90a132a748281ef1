"""``serve --decoder torch``: a request's JPEGs decoded, resized and normalised by torch on the runner's device.

The request's whole RGB / greyscale JPEGs (:func:`~mae_deploy.extract.decode.device_decodable`) are decoded as
one batch by :class:`~mae_deploy.decode_torch.TorchJpegDecoder` (nvJPEG on CUDA); other formats, and JPEGs the
device decoder rejects, take the PIL path, which decodes them or fails them with the same 400 as under
``--decoder pil``. The result is one float32 torch tensor on the device, in request order, which goes to the
runner as it is (runners take DLPack tensors); only the encoded bytes cross the bus.
"""

from __future__ import annotations

from mae_deploy.preprocess import Preprocessor
from mae_deploy.serve.images import model_input, source_name


class DeviceImageDecoder:
    """Image bytes -> float32 (N, C, S, S) torch tensor on ``device`` (a runner's device name)."""

    def __init__(self, preprocessor: Preprocessor, device: str) -> None:
        from mae_deploy.decode_torch import TorchJpegDecoder
        from mae_deploy.extract.device_decode import torch_device

        self.pre = preprocessor
        self.jpeg = TorchJpegDecoder(preprocessor, torch_device(device))
        self.torch = self.jpeg.torch

    def __call__(self, blobs: list[bytes]):
        from mae_deploy.extract.decode import device_decodable

        torch, n = self.torch, len(blobs)
        limit = self.pre._limit() or 0  # the Preprocessor's decompression-bomb limit: above it, PIL's 400
        jpegs = [i for i, b in enumerate(blobs) if device_decodable(b, limit, 1)]
        pixels, ok = self.jpeg.decode([blobs[i] for i in jpegs])
        on_device = [jpegs[i] for i in ok]
        rest = sorted(set(range(n)) - set(on_device))
        s = self.pre.image_size
        out = torch.empty((n, self.pre.in_chans, s, s), dtype=torch.float32, device=self.jpeg.device)
        if on_device:
            out[on_device] = pixels
        for i in rest:  # PIL: other formats, rejects; the same errors as --decoder pil
            out[i] = torch.from_numpy(model_input(blobs[i], self.pre, source_name(i, n))).to(self.jpeg.device)
        return out
