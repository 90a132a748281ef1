"""What the three training scripts share: precision, the epoch loop, evaluation, checkpoints, metrics.

Training checkpoints (``checkpoint-<epoch>.pth``, ``checkpoint-last.pth``, ``checkpoint-best.pth``) use the
official layout ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` plus the RNG states of every
process (python, numpy, torch, CUDA) and the sampler's (seed, epoch), so ``--resume`` continues exactly:
on CPU the losses after resuming equal those of an uninterrupted run. They are written atomically (temp
file, then rename) by rank 0 only, and ``training.checkpoints.load_checkpoint`` reads them like any
official checkpoint. A non-finite loss raises :class:`NonFiniteLossError` before anything else is
written, so the last checkpoint on disk is the last good one.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mae_deploy.errors import DeviceUnavailable, InputError, MaeDeployError
from mae_deploy.fileio import atomic_write
from training.compiled import begin_step, eager_module, plain_state_dict
from training.distributed import DistInfo, all_gather_objects, all_reduce_mean, all_reduce_sum
from training.options import PRECISIONS, check_args


class NonFiniteLossError(MaeDeployError):
    """The loss became NaN or infinite; training stopped and no checkpoint was written after it."""


# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a GPU that has it (no grad scaler, fp32's range), else fp16 with a grad scaler
    (the official recipe) on CUDA; fp32 on CPU."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs a CUDA GPU (fp16 with a grad scaler); on CPU use bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or GPU, fp16 autocast on GPU, nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (GPU only); bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


# --------------------------------------------------------------------------------------------------
# Checks before a run starts
# --------------------------------------------------------------------------------------------------


def check_run_args(args) -> None:
    """Everything a recipe can refuse before it loads data or builds a model: option ranges (exit 3,
    options.check_args), the device (exit 7 when CUDA is asked for and missing), the --resume file,
    and --input_size against the registry model's patch size when no checkpoint decides it."""
    check_args(args)
    check_device(args.device)
    if args.resume and args.resume != "auto":
        from training.checkpoints import check_checkpoint_file

        check_checkpoint_file(args.resume, "--resume checkpoint")
    if getattr(args, "finetune", ""):
        return  # the checkpoint decides the architecture; build_classifier checks the size against it
    from training.model import MODEL_CONFIGS

    cfg = MODEL_CONFIGS[registry_name(args.model)]
    if args.input_size % cfg.patch_size:
        lower = max(cfg.patch_size, args.input_size // cfg.patch_size * cfg.patch_size)
        raise InputError(
            f"--input_size {args.input_size} is not a multiple of {cfg.name}'s patch size "
            f"{cfg.patch_size}; use e.g. {lower}"
        )
    patches = (args.input_size // cfg.patch_size) ** 2
    if hasattr(args, "mask_ratio") and int(patches * (1 - args.mask_ratio)) < 1:
        raise InputError(f"--mask_ratio {args.mask_ratio:g} leaves no visible patch of {patches}; lower it")


def check_device(name: str) -> None:
    """DeviceUnavailable (exit 7) for a CUDA device this machine does not have; never a CPU fall-back."""
    if name in ("auto", "cpu"):
        return
    device = torch.device(name)
    if not torch.cuda.is_available():
        build = "a CPU-only PyTorch build" if torch.version.cuda is None else "no CUDA device answers"
        raise DeviceUnavailable(f"--device {name}: CUDA is not available here ({build}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# --------------------------------------------------------------------------------------------------
# Seeds and RNG states
# --------------------------------------------------------------------------------------------------


def start_run(args, info: DistInfo) -> tuple[Callable[..., None], torch.device, str, Path | None]:
    """The prologue every recipe shares: (say, device, precision, output dir or None).

    ``say`` prints on rank 0 only; seeds differ per rank; the output dir is created on rank 0.
    """
    say = print if info.is_main else (lambda *_a, **_k: None)
    precision = resolve_precision(args.precision, info.device)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official scripts: the fastest patch-embed conv per shape
    seed_everything(args.seed + info.rank)
    out = Path(args.output_dir) if args.output_dir else None
    if out is not None and info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return say, info.device, precision, out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """This process's python, numpy, torch and CUDA RNG states, as tensors and plain values only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------------


def _plain_args(args: object) -> dict:
    """argparse values that are plain data (what weights-only loading accepts)."""
    ok = (str, int, float, bool, type(None))
    return {
        k: v
        for k, v in vars(args).items()
        if isinstance(v, ok) or (isinstance(v, (list, tuple)) and all(isinstance(x, ok) for x in v))
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The eager model inside DistributedDataParallel and torch.compile wrappers."""
    return eager_module(model)


def save_training_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    args: object,
    info: DistInfo,
    extra: dict | None = None,
) -> Path | None:
    """Write the resumable state after ``epoch`` atomically (rank 0 writes; every rank must call this,
    because the RNG states of all processes are gathered)."""
    rng = all_gather_objects(capture_rng())
    if not info.is_main:
        return None
    path = Path(path)
    state = {
        "model": plain_state_dict(model),  # no `_orig_mod.` / `module.`: loads into eager and compiled runs
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "args": _plain_args(args),
        "rng": rng,
        "sampler": {"seed": int(getattr(args, "seed", 0)), "epoch": epoch},
        "extra": extra or {},
    }
    return atomic_write(path, lambda f: torch.save(state, f), durable=True)


def resume_path(resume: str, output_dir: str | os.PathLike | None) -> Path | None:
    """``--resume`` value -> checkpoint path: '' none; 'auto' the output dir's checkpoint-last.pth if any."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(output_dir or ".") / "checkpoint-last.pth"
        return last if last.exists() else None
    path = Path(resume)
    if not path.exists():
        raise InputError(f"--resume {resume}: no such checkpoint")
    return path


def load_training_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    info: DistInfo,
) -> tuple[int, dict]:
    """Restore model, optimizer, scaler and this process's RNG state; returns (next epoch, extra)."""
    from training.checkpoints import check_checkpoint_file

    check_checkpoint_file(path, "training checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"cannot read the training checkpoint {path}: {reason}; is it truncated?") from None
    if not isinstance(state, dict) or "model" not in state or "optimizer" not in state:
        raise InputError(
            f"{path} is not a training checkpoint (no model/optimizer state); to start from "
            "pretrained weights use --finetune instead of --resume"
        )
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as e:
        raise InputError(
            f"{path} does not fit this model (was it written with another --model?): {str(e).splitlines()[0]}"
        ) from None
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = state.get("rng") or []
    if len(rng) == info.world_size:
        restore_rng(rng[info.rank])
    elif info.is_main:
        print(
            f"note: {path} was written by {len(rng)} process(es), this run has {info.world_size}: "
            "random states are not restored, so the run continues but not bit-exactly"
        )
    return int(state["epoch"]) + 1, dict(state.get("extra") or {})


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


class MetricsLog:
    """Rank 0 appends one JSON line per epoch to ``output_dir/metrics.jsonl`` and, when ``log_dir`` is
    given and the tensorboard package is installed, writes TensorBoard scalars there."""

    def __init__(self, output_dir: str | os.PathLike | None, log_dir: str | None, info: DistInfo) -> None:
        self.enabled = info.is_main and output_dir is not None
        self.path = Path(output_dir) / "metrics.jsonl" if output_dir else None
        self.writer = None
        if info.is_main and log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "note: TensorBoard logging needs the tensorboard package (pip install tensorboard); "
                    "writing metrics.jsonl only"
                )
            else:
                os.makedirs(log_dir, exist_ok=True)
                self.writer = SummaryWriter(log_dir=log_dir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def epoch(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"epoch/{k}", v, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------------------------------
# One epoch of training, and evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingStep:
    """How every optimisation step of a run goes, fixed before its first epoch (the recipes build one).

    ``compute_loss(samples, targets)`` runs the model; ``set_lr(fractional epoch)`` sets and returns the lr;
    ``batch_transform`` (e.g. Mixup) maps each batch first; ``scaler`` for fp16 on a GPU; gradients are
    accumulated over ``accum_iter`` batches and clipped to ``clip_grad`` when given.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    set_lr: Callable[[float], float]
    info: DistInfo
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None
    accum_iter: int = 1
    clip_grad: float | None = None
    metrics: MetricsLog | None = None
    batch_transform: Callable | None = None


def train_one_epoch(step: TrainingStep, loader, epoch: int, last_checkpoint: str | None = None, desc: str = "") -> dict:
    """One pass over ``loader``: per-iteration lr, autocast, gradient accumulation, optional clipping (as
    ``step`` says); returns the mean loss and last lr.

    Losses are averaged over processes every iteration, so all of them stop together when one becomes
    non-finite (``last_checkpoint`` is named in that error).
    """
    model, optimizer, compute_loss, set_lr, info = step.model, step.optimizer, step.compute_loss, step.set_lr, step.info
    precision, scaler, accum_iter, clip_grad = step.precision, step.scaler, step.accum_iter, step.clip_grad
    metrics, batch_transform = step.metrics, step.batch_transform
    from tqdm import tqdm

    device = info.device
    steps = len(loader)
    if steps == 0:
        raise InputError("the training set yields no full batch: lower --batch_size or add images")
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total, lr = 0.0, 0.0
    bar = tqdm(
        total=steps,
        desc=desc or f"epoch {epoch}",
        unit="it",
        disable=None if info.is_main else True,
        leave=False,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    for it, (samples, targets) in enumerate(batches(loader)):
        begin_step(model)
        if it % accum_iter == 0:
            lr = set_lr(epoch + it / steps)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if batch_transform is not None:
            samples, targets = batch_transform(samples, targets)
        with autocast(device, precision):
            loss = compute_loss(samples, targets)
        loss_value = all_reduce_mean(float(loss.detach()), device)
        if not math.isfinite(loss_value):
            bar.close()
            kept = (
                f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"loss is {loss_value} at epoch {epoch}, iteration {it} (lr {lr:.3g}); training stopped and "
                f"{kept}. Lower --blr, raise --warmup_epochs or use --precision fp32, then --resume it"
            )
        update = (it + 1) % accum_iter == 0
        # Gradients of DDP processes are averaged only on the step that updates.
        sync = model.no_sync() if (info.distributed and not update and hasattr(model, "no_sync")) else nullcontext()
        with sync:
            scaled = loss / accum_iter
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if update:
            if scaler is not None:  # fp16 on GPU
                if clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                if clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if metrics is not None:
                step = epoch * steps + it
                metrics.scalar("train/loss", loss_value, step)
                metrics.scalar("train/lr", lr, step)
        total += loss_value
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        bar.update()
    bar.close()
    return {"train_loss": total / steps, "lr": lr, "epoch_time_s": time.perf_counter() - t0}


def batches(loader):
    """Iterate ``loader``; an InputError raised in a DataLoader worker (an image that cannot be decoded)
    comes back with its own message, not wrapped in the worker's traceback."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except InputError as e:
            msg = str(e)
            if "Original Traceback" in msg:
                msg = msg.rstrip().splitlines()[-1].split("InputError: ", 1)[-1]
            raise InputError(msg) from None
        yield batch


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DistInfo, precision: str = "fp32") -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy, exact over all processes."""
    model.eval()
    device = info.device
    correct1 = correct5 = loss_sum = count = 0.0
    for samples, targets in batches(loader):
        begin_step(model)
        samples, targets = samples.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(samples)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        correct1 += float(hits[:, 0].sum())
        correct5 += float(hits.any(dim=1).sum())
        count += targets.shape[0]
    correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count], device)
    if count == 0:
        raise InputError("the validation set is empty")
    return {
        "acc1": 100.0 * correct1 / count,
        "acc5": 100.0 * correct5 / count,
        "loss": loss_sum / count,
        "count": int(count),
    }


def format_record(record: dict) -> str:
    """'epoch 3  train_loss 0.4123  lr 1.20e-04 ...' for the console."""
    parts = []
    for k, v in record.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.3e}" if k == "lr" else f"{k} {v:.4f}" if "loss" in k else f"{k} {v:.2f}")
        else:
            parts.append(f"{k} {v}")
    return "  ".join(parts)


def registry_name(name: str) -> str:
    """'vit_base_patch16' (fine-tuning names) or 'mae_vit_base_patch16' -> the registry name."""
    from training.model import MODEL_CONFIGS

    for candidate in (name, f"mae_{name}"):
        if candidate in MODEL_CONFIGS:
            return candidate
    raise InputError(f"unknown --model {name!r}; available: {', '.join(sorted(MODEL_CONFIGS))}")


def keep_checkpoint(last: Path, epoch: int | str) -> Path:
    """Keep a copy of checkpoint-last.pth as checkpoint-<epoch>.pth (a hard link where possible)."""
    import shutil

    dst = last.with_name(f"checkpoint-{epoch}.pth")
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:
        shutil.copyfile(last, tmp)
    os.replace(tmp, dst)
    return dst


@dataclass
class ClassifierData:
    """The labelled ImageFolder splits of fine-tuning and linear probing, and their loaders."""

    in_chans: int
    train_set: object  # training.data.image_folder's dataset (``.classes``)
    val_set: object
    nb_classes: int
    sampler: torch.utils.data.DistributedSampler  # set_epoch each epoch
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader


def classifier_data(args, info: DistInfo, device: torch.device, train_transform: Callable) -> ClassifierData:
    """``args.data_path``'s train/ and val/ splits with the channel count a ``--finetune`` checkpoint decides.

    ``train_transform(in_chans)`` is the command's training augmentation; val uses the eval transform. The
    train loader shards and shuffles (drop_last), val is sharded without padding.
    """
    from training import data
    from training.distributed import ShardSampler, train_sampler

    in_chans = args.in_chans
    if args.finetune:
        from training.checkpoints import load_checkpoint

        in_chans = load_checkpoint(args.finetune).config.in_chans
    train_set = data.image_folder(data.split_dir(args.data_path, "train"), train_transform(in_chans), in_chans)
    val_set = data.image_folder(
        data.split_dir(args.data_path, "val"), data.eval_transform(args.input_size, in_chans), in_chans
    )
    nb_classes = args.nb_classes or len(train_set.classes)
    if nb_classes < len(train_set.classes):
        raise InputError(f"--nb_classes {nb_classes} but {args.data_path} has {len(train_set.classes)} classes")
    sampler = train_sampler(train_set, info, args.seed)
    pin = args.pin_mem and device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        train_set,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=pin,
        drop_last=True,
    )
    val_loader = torch.utils.data.DataLoader(
        val_set,
        sampler=ShardSampler(val_set, info),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=pin,
    )
    return ClassifierData(in_chans, train_set, val_set, nb_classes, sampler, loader, val_loader)


def build_classifier(
    finetune: str,
    model_name: str,
    num_classes: int,
    global_pool: bool,
    input_size: int,
    in_chans: int = 3,
    drop_path: float = 0.0,
    log: Callable[[str], None] = print,
):
    """A ViT classifier at ``input_size``: from ``finetune`` (any checkpoint format training.checkpoints
    reads; position embeddings interpolated bicubically for another grid) or at random init from the
    registry. Decoder weights and, with global pooling, the encoder's final norm are dropped; a head
    of another shape is re-initialised, as in the official fine-tuning."""
    from dataclasses import replace

    from training.model import VisionTransformer, get_config, interpolate_pos_embed

    if not finetune:
        cfg = get_config(registry_name(model_name), img_size=input_size, in_chans=in_chans, decoder_depth=0)
        log(f"no --finetune checkpoint: {cfg.name} at random init")
        return VisionTransformer(cfg, num_classes, global_pool=global_pool, drop_path_rate=drop_path)

    from training.checkpoints import load_checkpoint

    ckpt = load_checkpoint(finetune)
    ckpt.require_finite()
    if input_size % ckpt.config.patch_size:  # before replace(): MAEConfig would refuse it as a ValueError
        raise InputError(
            f"--input_size {input_size} is not a multiple of the checkpoint's patch size {ckpt.config.patch_size}"
        )
    cfg = replace(ckpt.config, img_size=input_size, decoder_depth=0)
    model = VisionTransformer(cfg, num_classes, global_pool=global_pool, drop_path_rate=drop_path)
    target = model.state_dict()
    sd = {k: v for k, v in ckpt.state_dict.items() if k in target}
    dropped = sorted(k for k in ckpt.state_dict if k not in target)
    for k in ("head.weight", "head.bias"):
        if k in sd and sd[k].shape != target[k].shape:
            log(f"removing {k} of shape {tuple(sd[k].shape)} (this run has {num_classes} classes)")
            del sd[k]
    if sd["pos_embed"].shape != target["pos_embed"].shape:
        old = ckpt.config.grid_size
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], cfg.grid_size)
        log(f"position embeddings interpolated (bicubic) from a {old}x{old} to a {cfg.grid_size}x{cfg.grid_size} grid")
    missing, _ = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    allowed = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    if set(missing) - allowed:
        raise InputError(f"{finetune} lacks encoder weights: {sorted(set(missing) - allowed)[:5]}")
    log(
        f"loaded {ckpt.format} checkpoint {finetune} ({cfg.name}, dim {cfg.embed_dim}, depth {cfg.depth})"
        + (
            f"; not used: {len(dropped)} tensors ({', '.join(sorted({k.split('.')[0] for k in dropped}))})"
            if dropped
            else ""
        )
    )
    return model


def run_cli(main: Callable, parser, argv: list[str] | None) -> None:
    """Parse ``argv`` and run ``main(args)``; a MaeDeployError ends with its message and exit code."""
    import sys

    args = parser.parse_args(argv)
    try:
        main(args)
    except MaeDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C); --resume auto continues from the last finished epoch", file=sys.stderr)
        sys.exit(130)
