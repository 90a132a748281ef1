"""``--compile``: how the training recipes wrap a model for data-parallel training and torch.compile, and how
they get the plain model back for checkpoints.

- Order: DistributedDataParallel first, then ``torch.compile`` (the order PyTorch documents for DDP with
  TorchDynamo: its DDPOptimizer splits the graph at DDP's gradient buckets, so all-reduce still overlaps
  the backward).
- ``--compile_mode auto``: ``reduce-overhead`` (inductor + CUDA graph trees) on one GPU with
  ``--accum_iter 1``: the mask ratio fixes the visible count and ``drop_last`` the batch, so every step
  has the same shapes and a replay replaces hundreds of kernel launches, which is what MAE's 50-token
  sequences lose most time to. ``default`` everywhere else: the CPU has no CUDA graphs; under DDP the
  graph is cut at every gradient bucket with all-reduces between the pieces; with gradient accumulation a
  ``.grad`` written by one replay would be added to by the next while it still lives in the graphs' pool.
- Checkpoints hold the eager module's state dict (:func:`plain_state_dict`): no ``_orig_mod.`` or
  ``module.`` prefixes, so a compiled run's ``checkpoint-*.pth`` and ``model/`` load wherever an eager
  one does, and ``--resume`` works across compiled and eager runs.
"""

from __future__ import annotations

import torch
from torch import nn

from mae_deploy.errors import InputError
from training.distributed import DistInfo
from training.options import COMPILE_MODES

_COMPILED_PREFIX = "_orig_mod."


def resolve_compile_mode(mode: str, device: torch.device, distributed: bool, accum_iter: int) -> str:
    """``auto`` -> ``reduce-overhead`` on one CUDA device with accum_iter 1, else ``default``; others as given."""
    if mode not in COMPILE_MODES:
        raise InputError(f"--compile_mode {mode!r}: choose from {', '.join(COMPILE_MODES)}")
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" and not distributed and accum_iter == 1 else "default"


def prepare_model(
    model: nn.Module, info: DistInfo, compile: bool = False, mode: str = "auto", accum_iter: int = 1
) -> nn.Module:
    """The module a recipe calls: ``model`` itself, wrapped in DDP under torchrun, then compiled with
    ``compile``. ``model`` stays the eager module that owns the parameters (checkpoints, export)."""
    wrapped = model
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if not compile:
        return wrapped
    resolved = resolve_compile_mode(mode, info.device, info.distributed, accum_iter)
    compiled = torch.compile(wrapped, mode=resolved)
    compiled.compile_mode = resolved  # for compile_note
    return compiled


def compile_note(model: nn.Module) -> str:
    """', compiled (reduce-overhead)' for the run's log line; '' for an eager model."""
    return f", compiled ({getattr(model, 'compile_mode', 'default')})" if is_compiled(model) else ""


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile`` returns."""
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


def eager_module(model: nn.Module) -> nn.Module:
    """The module inside any torch.compile and DistributedDataParallel wrappers, in either order."""
    while True:
        if is_compiled(model):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The eager module's state dict; ``_orig_mod.`` is also dropped inside keys, where a submodule (e.g.
    one block) was compiled on its own."""
    return {k.replace(_COMPILED_PREFIX, ""): v for k, v in eager_module(model).state_dict().items()}


def begin_step(model: nn.Module) -> None:
    """Tell CUDA graph trees that a new training iteration starts, so the previous replay's outputs
    (the loss that was already read) may be overwritten; nothing for an eager model."""
    if is_compiled(model):
        torch.compiler.cudagraph_mark_step_begin()
