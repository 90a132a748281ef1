"""``--decoder torch`` in the local engine: a worker's batch (PIL-decoded rows + encoded JPEGs) -> one model
input on the runner's device, in row order.

Workers send JPEGs encoded (:func:`~mae_deploy.extract.decode.device_decodable`) and decode the rest with
PIL. Here the JPEGs are decoded as one batch on the device; a JPEG the device decoder rejects is decoded
with PIL in this process (it is rare), so it is extracted or fails with the same errors.jsonl reason as
under ``--decoder pil``.
"""

from __future__ import annotations

import numpy as np

from mae_deploy.extract.decode import Decoded, Decoder


def torch_device(device: str) -> str:
    """The torch device of a runner's device name (``tensorrt:1`` is CUDA device 1)."""
    return "cuda" + device[len("tensorrt") :] if device.startswith("tensorrt") else device


class DeviceBatcher:
    """Decoded batches -> (rows, float32 (N, C, S, S) torch tensor on the device, failures)."""

    def __init__(self, decoder_args: dict, device: str) -> None:
        from mae_deploy.decode_torch import TorchJpegDecoder

        # The PIL fall-back decodes whole images in this process; its output is normalised float32.
        self.pil = Decoder(**{**decoder_args, "transfer": "float32", "device_jpeg": False})
        self.jpeg = TorchJpegDecoder(self.pil.pre, torch_device(device))
        self.torch = self.jpeg.torch

    def assemble(self, items: list[tuple[int, str]], dec: Decoded, transfer: str):
        """(rows, pixels or None, failures) of one batch; ``transfer`` is how ``dec.pixels`` came (the PIL rows)."""
        torch, device = self.torch, self.jpeg.device
        rows, parts, failures = list(dec.rows), [], list(dec.failures)
        if dec.pixels is not None:
            parts.append(self._host_to_device(dec.pixels, transfer))
        if dec.encoded:
            pixels, ok = self.jpeg.decode([data for _, data in dec.encoded])
            rows += [dec.encoded[i][0] for i in ok]
            parts.append(pixels)
            rejected = set(range(len(dec.encoded))) - set(ok)
            if rejected:
                paths = dict(items)
                again = self.pil.decode_batch([(dec.encoded[i][0], paths[dec.encoded[i][0]]) for i in sorted(rejected)])
                rows += again.rows
                failures += again.failures
                if again.pixels is not None:
                    parts.append(torch.from_numpy(again.pixels).to(device))
        if not rows:
            return [], None, failures
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        order = np.argsort(rows, kind="stable")
        if (order != np.arange(len(rows))).any():
            x = x[torch.as_tensor(order, device=device)]
        failures.sort()
        return [rows[i] for i in order], x, failures

    def _host_to_device(self, pixels: np.ndarray, transfer: str):
        """Worker-decoded rows: normalised float32 as they are, or uint8 normalised on the device."""
        torch = self.torch
        if transfer == "float32":
            return torch.from_numpy(np.ascontiguousarray(pixels)).to(self.jpeg.device)
        t = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.jpeg.device)
        t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
        return (t.float() / 255.0 - self.jpeg.mean) / self.jpeg.std
