"""Data-parallel training under ``torchrun`` (DDP): gloo on CPU, nccl on GPU; a no-op without torchrun.

``torchrun --nproc_per_node N -m training.pretrain ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; this module
reads them, starts the process group, pins each process to its GPU, and gives the samplers, reductions
and rank-0 gating the scripts need. The tests run the gloo path with two CPU processes (the nccl / CUDA
path: docs/verification.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler

from mae_deploy.errors import InputError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; a requested GPU that is missing is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun (RANK/WORLD_SIZE set), else a single process."""
    dev = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over processes (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    return all_reduce_sum([value], device)[0] / dist.get_world_size()


def all_gather_objects(obj: object) -> list:
    """[obj of rank 0, obj of rank 1, ...] (``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_sampler(dataset: Dataset, info: DistInfo, seed: int) -> DistributedSampler:
    """Shuffling sampler whose order depends only on (seed, epoch): used with one process too, so a
    resumed run sees the same batches as an uninterrupted one (call ``set_epoch`` every epoch)."""
    return DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, without padding: an exact distributed
    evaluation (counts are summed over processes) where DistributedSampler would repeat samples."""

    def __init__(self, dataset: Dataset, info: DistInfo) -> None:
        self.indices = list(range(info.rank, len(dataset), info.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
