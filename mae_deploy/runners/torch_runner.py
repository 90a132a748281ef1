"""PyTorch reference backend: the model every other backend is compared with.

torch and ``training`` are imported inside :class:`TorchRunner` (never at module import), so the rest of
mae_deploy stays torch-free. Weights come from the bundle's ``reference/`` native checkpoint (or the
export's source checkpoint), or from ``checkpoint=`` (any format ``training.checkpoints`` reads).

Precision: ``fp32``, or ``bf16`` through autocast (CPU or CUDA); ``fp16`` autocast on CUDA only.
Not run on this project's machines: the CUDA device (no GPU here).
"""

from __future__ import annotations

import os

import numpy as np

from mae_deploy.bundle import Bundle
from mae_deploy.errors import BundleError, DeviceUnavailable, InputError, MissingDependency
from mae_deploy.masking import check_pixel_values
from mae_deploy.names import DECODER, ENCODER
from mae_deploy.runners.base import BaseRunner, RunnerInfo, check_threads

_ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")


class TorchRunner(BaseRunner):
    """Encode/decode with the PyTorch model (the reference implementation).

    ``threads``: torch's intra-op thread count (``torch.set_num_threads``, process-wide); None leaves it.
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        precision: str = "fp32",
        checkpoint: str | os.PathLike | None = None,
        threads: int | None = None,
    ) -> None:
        threads = check_threads(threads)
        try:
            import torch
        except ImportError as e:
            raise MissingDependency("torch", "the torch backend", "pip install 'mae-deploy[torch]'") from e
        from training.checkpoints import load_model
        from training.model import MaskedAutoencoderViT, VisionTransformer

        self.torch = torch
        self.bundle = bundle
        if precision not in ("fp32", "bf16", "fp16"):
            raise InputError(f"the torch backend runs fp32, bf16 or fp16 (CUDA), not {precision!r}")
        if device == "cpu":
            self._device = torch.device("cpu")
        elif device == "cuda" or device.startswith("cuda:"):
            if not torch.cuda.is_available():
                raise DeviceUnavailable(f"--device {device}: PyTorch sees no CUDA device here; use --device cpu")
            self._device = torch.device(device)
        else:
            raise InputError(f"unknown torch device {device!r}; use cpu, cuda or cuda:N")
        if precision == "fp16" and self._device.type != "cuda":
            raise InputError("fp16 autocast needs --device cuda; on CPU use bf16 or fp32")
        if threads is not None:
            torch.set_num_threads(threads)
        self.device, self.precision = device, precision

        self.checkpoint = checkpoint if checkpoint is not None else bundle.reference_checkpoint()
        model, ckpt = load_model(self.checkpoint)
        if not isinstance(model, (MaskedAutoencoderViT, VisionTransformer)):
            raise BundleError(f"{self.checkpoint} holds neither an MAE nor a ViT classifier")
        cfg, arch = ckpt.config, bundle.architecture
        diffs = [f"{k} {getattr(cfg, k)} vs {arch[k]}" for k in _ARCH_KEYS if k in arch and getattr(cfg, k) != arch[k]]
        if diffs:
            raise BundleError(
                f"checkpoint {self.checkpoint} does not match bundle {bundle.path}: {', '.join(diffs)}"
            )
        self.model = model.to(self._device).eval()
        # The checkpoint, not the bundle, decides which parts exist here.
        self._specs = {ENCODER: self.checkpoint,
                       DECODER: self.checkpoint if getattr(model, "has_decoder", False) else None}

    def _missing_part(self, part: str) -> None:
        raise BundleError(f"checkpoint {self.checkpoint} has no {part}; reconstruction needs one")

    def _autocast(self):
        torch = self.torch
        if self.precision == "fp32":
            return torch.autocast(self._device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self._device.type, dtype=dtype)

    def _to_numpy(self, t) -> np.ndarray:
        return t.float().cpu().numpy().astype(np.float32, copy=False)

    def _encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode(), self._autocast():
            latent = self.model.forward_encoder(
                torch.from_numpy(pixel_values).to(self._device), torch.from_numpy(ids_keep).to(self._device)
            )
        return self._to_numpy(latent)

    def _decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode(), self._autocast():
            pred = self.model.forward_decoder(
                torch.from_numpy(latent).to(self._device), torch.from_numpy(ids_restore).to(self._device)
            )
        return self._to_numpy(pred)

    def classify(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values float32 [N,C,H,W] -> logits [N,num_classes]: the reference classifier (pool, norm, head)."""
        from training.model import VisionTransformer

        if not isinstance(self.model, VisionTransformer) or self.model.num_classes == 0:
            raise BundleError(f"checkpoint {self.checkpoint} has no classification head; classification needs a "
                              "fine-tuned or linear-probe checkpoint")
        b, torch = self.bundle, self.torch
        x = check_pixel_values(pixel_values, b.in_chans, b.image_size)
        with torch.inference_mode(), self._autocast():
            logits = self.model(torch.from_numpy(x).to(self._device))
        return self._to_numpy(logits)

    @property
    def info(self) -> RunnerInfo:
        torch = self.torch
        details = {"torch": torch.__version__, "checkpoint": str(self.checkpoint), "threads": torch.get_num_threads()}
        if self._device.type == "cuda":
            details["gpu"] = torch.cuda.get_device_name(self._device)
        return RunnerInfo("torch", self.device, self.precision, ("torch",), details)

    def close(self) -> None:
        self.model = None
