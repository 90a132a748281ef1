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
from mae_deploy.masking import check_decode_inputs, check_encode_inputs
from mae_deploy.runners.base import RunnerInfo

_ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")


class TorchRunner:
    """Encode/decode with the PyTorch model (the reference implementation)."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        precision: str = "fp32",
        checkpoint: str | os.PathLike | None = None,
        threads: int | None = None,
    ) -> None:
        try:
            import torch
        except ImportError as e:
            raise MissingDependency("torch", "the torch backend", "pip install 'mae-deploy[torch]'") from e
        from training.checkpoints import load_model
        from training.model import MaskedAutoencoderViT

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
        if threads:
            torch.set_num_threads(threads)
        self.device, self.precision = device, precision

        self.checkpoint = checkpoint if checkpoint is not None else bundle.reference_checkpoint()
        model, ckpt = load_model(self.checkpoint)
        if not isinstance(model, MaskedAutoencoderViT):
            raise BundleError(f"{self.checkpoint} is a classifier checkpoint; the torch runner needs an MAE")
        cfg, arch = ckpt.config, bundle.architecture
        diffs = [f"{k} {getattr(cfg, k)} vs {arch[k]}" for k in _ARCH_KEYS if k in arch and getattr(cfg, k) != arch[k]]
        if diffs:
            raise BundleError(
                f"checkpoint {self.checkpoint} does not match bundle {bundle.path}: {', '.join(diffs)}"
            )
        self.model = model.to(self._device).eval()
        self._has_decoder = bool(model.has_decoder)

    def _autocast(self):
        torch = self.torch
        if self.precision == "fp32":
            return torch.autocast(self._device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self._device.type, dtype=dtype)

    def _to_numpy(self, t) -> np.ndarray:
        return t.float().cpu().numpy().astype(np.float32, copy=False)

    def encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        b, torch = self.bundle, self.torch
        x, ids = check_encode_inputs(
            pixel_values, ids_keep, in_chans=b.in_chans, image_size=b.image_size, num_patches=b.num_patches
        )
        with torch.inference_mode(), self._autocast():
            latent = self.model.forward_encoder(
                torch.from_numpy(x).to(self._device), torch.from_numpy(ids).to(self._device)
            )
        return self._to_numpy(latent)

    def decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        b, torch = self.bundle, self.torch
        if not self._has_decoder:
            raise BundleError(f"checkpoint {self.checkpoint} has no decoder; reconstruction needs one")
        x, ids = check_decode_inputs(latent, ids_restore, embed_dim=b.embed_dim, num_patches=b.num_patches)
        with torch.inference_mode(), self._autocast():
            pred = self.model.forward_decoder(
                torch.from_numpy(x).to(self._device), torch.from_numpy(ids).to(self._device)
            )
        return self._to_numpy(pred)

    @property
    def has_decoder(self) -> bool:
        return self._has_decoder

    @property
    def info(self) -> RunnerInfo:
        torch = self.torch
        details = {"torch": torch.__version__, "checkpoint": str(self.checkpoint), "threads": torch.get_num_threads()}
        if self._device.type == "cuda":
            details["gpu"] = torch.cuda.get_device_name(self._device)
        return RunnerInfo("torch", self.device, self.precision, ("torch",), details)

    def close(self) -> None:
        self.model = None

    def __enter__(self) -> TorchRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
