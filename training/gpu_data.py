"""Pretraining batches decoded and augmented on the training device (``pretrain --gpu_decode``).

The DataLoader workers only read files (bytes); the training process then decodes a whole batch at once
(JPEG: ``torchvision.io.decode_jpeg(device=...)``, nvJPEG on a GPU; other formats on the host) and applies
the official pretraining augmentation on the device: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3,
bicubic, antialiased) + horizontal flip + normalisation. Host cores then only feed bytes, which is what
lets 16 cores keep up with a GPU that steps at thousands of images/s.

It is the same augmentation as ``data.pretrain_transform``: crop boxes and flips are drawn with
torchvision's own ``RandomResizedCrop.get_params`` and ``torch.rand(1) < 0.5``, in the same order per image,
and the resize is torchvision's antialiased bicubic on uint8 (made to match Pillow's), so on the CPU and
with ``--num_workers 0`` both paths produce the same crops and nearly the same pixels (tests). The code
runs on CPU tensors too, which is how the tests cover it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from mae_deploy.errors import InputError
from training.data import channel_stats, image_folder

_JPEG_MAGIC = b"\xff\xd8\xff"
Encoded = tuple[torch.Tensor, int, str]  # file bytes, class index, path


class EncodedImageFolder(Dataset):
    """An ImageFolder (same classes, same files, same skipped files) whose items are the raw file bytes:
    ``(uint8 tensor, class index, path)``."""

    def __init__(self, root: str | os.PathLike, in_chans: int = 3, log=print) -> None:
        folder = image_folder(root, transform=None, in_chans=in_chans, log=log)
        self.samples: list[tuple[str, int]] = list(folder.samples)
        self.classes: list[str] = list(folder.classes)
        self.skipped = folder.skipped

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        path, label = self.samples[index]
        with open(path, "rb") as f:
            data = f.read()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, path


def collate_encoded(batch: Sequence[Encoded]) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    """Encoded files stay a list (their lengths differ); labels become a tensor."""
    data, labels, paths = zip(*batch, strict=True)
    return list(data), torch.tensor(labels, dtype=torch.long), list(paths)


def is_jpeg(data: torch.Tensor) -> bool:
    return bytes(data[:3].tolist()) == _JPEG_MAGIC


class DeviceAugment:
    """Encoded images -> a normalised (N, C, S, S) float batch on ``device``, augmented as in pretraining."""

    def __init__(
        self,
        input_size: int,
        in_chans: int,
        device: torch.device | str,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size = [input_size, input_size]
        self.device = torch.device(device)
        self.scale, self.ratio = scale, ratio
        self.mode = ImageReadMode.RGB if in_chans == 3 else ImageReadMode.GRAY
        mean, std = channel_stats(in_chans)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255.0)

    def decode(self, data: list[torch.Tensor], paths: list[str]) -> list[torch.Tensor]:
        """(C, H, W) uint8 images on the device: JPEGs in one batched call, other formats on the host."""
        out: list[torch.Tensor | None] = [None] * len(data)
        jpeg = [i for i, d in enumerate(data) if is_jpeg(d)]
        if jpeg:
            try:
                decoded = decode_jpeg([data[i] for i in jpeg], mode=self.mode, device=self.device)
            except RuntimeError:
                decoded = [self._decode_one(decode_jpeg, data[i], paths[i]) for i in jpeg]  # name the bad file
            for i, img in zip(jpeg, decoded, strict=True):
                out[i] = img
        for i, d in enumerate(data):
            if out[i] is None:
                out[i] = self._decode_one(decode_image, d, paths[i]).to(self.device, non_blocking=True)
        return out

    def _decode_one(self, decoder, data: torch.Tensor, path: str) -> torch.Tensor:
        kwargs = {"device": self.device} if decoder is decode_jpeg else {}
        try:
            return decoder(data, mode=self.mode, **kwargs)
        except RuntimeError as e:
            raise InputError(
                f"cannot decode image {path} ({str(e).splitlines()[0]}); remove or replace it and --resume auto"
            ) from None

    def augment(self, images: list[torch.Tensor]) -> torch.Tensor:
        """RandomResizedCrop + flip per image (torchvision's draws, in its order), then one normalisation."""
        crops = []
        for img in images:
            top, left, h, w = RandomResizedCrop.get_params(img, self.scale, self.ratio)
            crop = TF.resized_crop(
                img, top, left, h, w, self.size, interpolation=InterpolationMode.BICUBIC, antialias=True
            )
            if torch.rand(1) < 0.5:  # RandomHorizontalFlip(p=0.5)'s draw
                crop = crop.flip(-1)
            crops.append(crop)
        batch = torch.stack(crops).float()
        return (batch - self.mean) * self.inv_std

    def __call__(self, data: list[torch.Tensor], paths: list[str]) -> torch.Tensor:
        return self.augment(self.decode(data, paths))


class DeviceDecodedLoader:
    """Wraps a DataLoader of encoded batches: yields (images on the device, labels) like a plain loader."""

    def __init__(self, loader: DataLoader, augment: DeviceAugment) -> None:
        self.loader, self.augment = loader, augment

    @property
    def sampler(self):
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for data, labels, paths in self.loader:
            yield self.augment(data, paths), labels


def device_decoded_loader(
    dataset: EncodedImageFolder,
    sampler,
    batch_size: int,
    num_workers: int,
    pin: bool,
    input_size: int,
    in_chans: int,
    device: torch.device,
) -> DeviceDecodedLoader:
    """The pretraining loader of ``--gpu_decode``: workers read bytes, ``device`` decodes and augments."""
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin,
        collate_fn=collate_encoded,
    )
    return DeviceDecodedLoader(loader, DeviceAugment(input_size, in_chans, device))
