"""PyTorch reference backend: the model every other backend is compared with.

torch and ``training`` are imported inside :class:`TorchRunner` (never at module import), so the rest of
mae_deploy stays torch-free. Weights come from the bundle's ``reference/`` native checkpoint (or the
export's source checkpoint), or from ``checkpoint=`` (any format ``training.checkpoints`` reads).

Precision: ``fp32``, or ``bf16`` through autocast (CPU or CUDA); ``fp16`` autocast on CUDA only. The torch
backend needs no ONNX graph of that precision: it runs the reference weights.

On CUDA, numpy inputs are staged through pinned host buffers reused across calls and copied without
blocking; pooling happens on the device, so ``encode_pooled`` copies back (N, D). Tensors already on the
device (torch, or CuPy through DLPack) are used where they are, and the result stays there.

``compile=True`` runs the encoder and decoder through ``torch.compile`` (inductor; on CUDA with CUDA graphs,
``mode="reduce-overhead"``, which pays where shapes repeat: a fixed batch size and mask ratio). The first
call of each new shape compiles (seconds to a minute); later calls reuse it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from mae_deploy.bundle import Bundle
from mae_deploy.errors import BundleError, DeviceUnavailable, InputError, MissingDependency
from mae_deploy.masking import check_pixel_values
from mae_deploy.names import DECODER, ENCODER, TORCH_PRECISIONS
from mae_deploy.runners.base import BaseRunner, RunnerInfo, check_threads

if TYPE_CHECKING:
    import torch

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
        compile: bool = False,
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
        if precision not in TORCH_PRECISIONS:
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
            raise BundleError(f"checkpoint {self.checkpoint} does not match bundle {bundle.path}: {', '.join(diffs)}")
        self.model = model.to(self._device).eval()
        # The checkpoint, not the bundle, decides which parts exist here.
        self._specs = {
            ENCODER: self.checkpoint,
            DECODER: self.checkpoint if getattr(model, "has_decoder", False) else None,
        }
        self.compiled = bool(compile)
        self._forward_encoder: Callable[..., Any] = self.model.forward_encoder
        self._forward_decoder: Callable[..., Any] | None = getattr(self.model, "forward_decoder", None)
        if self.compiled:
            # CUDA graphs replay fixed shapes with no launch overhead: MAE's short sequences need that.
            mode = "reduce-overhead" if self._device.type == "cuda" else None
            self._forward_encoder = torch.compile(self.model.forward_encoder, mode=mode)
            if self._forward_decoder is not None:
                self._forward_decoder = torch.compile(self._forward_decoder, mode=mode)
        self._pinned: dict[str, torch.Tensor] = {}  # name -> reusable pinned host buffer (CUDA only)

    def _missing_part(self, part: str) -> NoReturn:
        raise BundleError(f"checkpoint {self.checkpoint} has no {part}; reconstruction needs one")

    def _autocast(self):
        torch = self.torch
        if self.precision == "fp32":
            return torch.autocast(self._device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self._device.type, dtype=dtype)

    def _to_numpy(self, t) -> np.ndarray:
        return t.float().cpu().numpy().astype(np.float32, copy=False)

    def _to_device(self, name: str, arr: np.ndarray):
        """A numpy array on this runner's device; on CUDA through a reused pinned buffer, without blocking."""
        torch = self.torch
        src = torch.from_numpy(arr)
        if self._device.type != "cuda":
            return src
        buf = self._pinned.get(name)
        if buf is None or buf.numel() < src.numel() or buf.dtype != src.dtype:
            buf = torch.empty(src.numel(), dtype=src.dtype, pin_memory=True)
            self._pinned[name] = buf
        staged = buf[: src.numel()].view(src.shape)
        # The previous call's copy out of this buffer has finished: every call ends by synchronising.
        staged.copy_(src)
        return staged.to(self._device, non_blocking=True)

    def _to_host(self, t) -> np.ndarray:
        """A float32 numpy copy of a device result (synchronises, so pinned buffers can be reused)."""
        return self._to_numpy(t)

    def _pool(self, latent, pool: str | None):
        if pool == "cls":
            return latent[:, 0]
        if pool == "mean":
            return latent[:, 1:].mean(dim=1)
        return latent

    def _run_encoder(self, x, ids, pool: str | None):
        torch = self.torch
        with torch.inference_mode():
            with self._autocast():
                latent = self._forward_encoder(x, ids)
            # Pooled in float32 (a bf16 mean over 196 tokens loses digits), on the device.
            out = self._pool(latent.float(), pool)
            if self.compiled and self._device.type == "cuda":
                out = out.clone()  # a CUDA-graph replay overwrites its outputs (and views of them)
        return out

    def _encode(self, pixel_values: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
        x, ids = self._to_device("pixel_values", pixel_values), self._to_device("ids_keep", ids_keep)
        return self._to_host(self._run_encoder(x, ids, None))

    def _encode_pooled(self, pixel_values: np.ndarray, ids_keep: np.ndarray, pool: str) -> np.ndarray:
        x, ids = self._to_device("pixel_values", pixel_values), self._to_device("ids_keep", ids_keep)
        return self._to_host(self._run_encoder(x, ids, pool))

    def _encode_device(self, pixels, ids_keep: np.ndarray, pool: str | None):
        """A torch tensor (or any DLPack tensor) used where it is; the result is a tensor on that device."""
        torch = self.torch
        x = pixels.obj if pixels.library == "torch" else torch.from_dlpack(pixels.obj)
        if x.device != self._device:
            x = x.to(self._device)
        # ids through pageable memory: a synchronous copy, so no pinned buffer is rewritten under a pending one.
        out = self._run_encoder(x, torch.from_numpy(ids_keep).to(self._device), pool)
        if pixels.library == "torch":
            return out if out.device == pixels.obj.device else out.to(pixels.obj.device)
        return pixels.like(self._to_host(out)) if not pixels.on_gpu else _from_torch(pixels, out)

    def _decode(self, latent: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        torch = self.torch
        x, ids = self._to_device("latent", latent), self._to_device("ids_restore", ids_restore)
        with torch.inference_mode(), self._autocast():
            assert self._forward_decoder is not None  # decode() checked has_decoder
            pred = self._forward_decoder(x, ids)
        return self._to_host(pred)

    def classify(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values float32 [N,C,H,W] -> logits [N,num_classes]: the reference classifier (pool, norm, head)."""
        from training.model import VisionTransformer

        if not isinstance(self.model, VisionTransformer) or self.model.num_classes == 0:
            raise BundleError(
                f"checkpoint {self.checkpoint} has no classification head; classification needs a "
                "fine-tuned or linear-probe checkpoint"
            )
        b, torch = self.bundle, self.torch
        x = check_pixel_values(pixel_values, b.in_chans, b.image_size)
        with torch.inference_mode(), self._autocast():
            logits = self.model(self._to_device("pixel_values", x))
        return self._to_numpy(logits)

    @property
    def info(self) -> RunnerInfo:
        torch = self.torch
        details = {
            "torch": torch.__version__,
            "checkpoint": str(self.checkpoint),
            "threads": torch.get_num_threads(),
            "compiled": self.compiled,
        }
        if self._device.type == "cuda":
            details["gpu"] = torch.cuda.get_device_name(self._device)
        return RunnerInfo("torch", self.device, self.precision, ("torch",), details)

    def close(self) -> None:
        # References dropped so the model's memory can be freed; the runner is not used after close().
        self.model = None  # type: ignore[assignment]
        self._forward_encoder = self._forward_decoder = None  # type: ignore[assignment]
        self._pinned.clear()


def _from_torch(pixels, out):
    """A torch result as a tensor of the caller's library (CuPy and other DLPack consumers)."""
    if pixels.library == "cupy":
        import cupy

        return cupy.from_dlpack(out)
    return out
