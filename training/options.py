"""Command-line options of the training scripts, named and defaulted as in the official MAE scripts.

Kept free of torch so that ``mae-deploy pretrain --help`` (and every other ``--help``) answers without
importing PyTorch. ``training.pretrain`` / ``finetune`` / ``linprobe`` build their parsers here.
"""

from __future__ import annotations

import argparse

from mae_deploy.names import TRAINING_PRECISIONS as PRECISIONS

# torch.compile modes; 'auto' is resolved by training.compiled.resolve_compile_mode.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Output, resume, device and distributed options of the official scripts, plus --precision."""
    g = parser.add_argument_group("output, resume and devices")
    g.add_argument(
        "--output_dir",
        default="./output_dir",
        help="where checkpoints, metrics.jsonl and the final native model (model/) go; '' saves nothing",
    )
    g.add_argument(
        "--log_dir", default=None, help="write TensorBoard events here (needs the tensorboard package); default: none"
    )
    g.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto = cuda when available")
    g.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto = bf16 autocast on GPUs that have bf16 (Ampere and later), else fp16 with a grad "
        "scaler (the official recipe), fp32 on CPU; bf16 autocasts on CPU or GPU",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (inductor) for training and evaluation; checkpoints and model/ "
        "stay in the eager layout, so --resume works across compiled and eager runs",
    )
    g.add_argument(
        "--compile_mode",
        default="auto",
        choices=COMPILE_MODES,
        help="with --compile: auto = reduce-overhead (CUDA graphs) on one GPU with --accum_iter 1, "
        "else default (no CUDA graphs)",
    )
    g.add_argument("--seed", default=0, type=int)
    g.add_argument(
        "--resume",
        default="",
        help="training checkpoint to continue from; 'auto' = output_dir/checkpoint-last.pth if present",
    )
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch (set by --resume)")
    g.add_argument(
        "--save_freq",
        default=20,
        type=int,
        help="keep checkpoint-<epoch>.pth every N epochs and at the end (checkpoint-last.pth is updated every epoch)",
    )
    g.add_argument("--num_workers", default=10, type=int)
    g.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader (GPU transfers)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    d = parser.add_argument_group("distributed (set by torchrun; accepted for compatibility)")
    d.add_argument("--world_size", default=1, type=int, help="number of processes (torchrun sets WORLD_SIZE)")
    d.add_argument("--local_rank", default=-1, type=int)
    d.add_argument("--dist_on_itp", action="store_true")
    d.add_argument("--dist_url", default="env://", help="only env:// (torchrun) is supported")


PRETRAIN_USAGE = """MAE pretraining, the official recipe: ``python -m training.pretrain`` or ``mae-deploy pretrain``.

    python -m training.pretrain --model mae_vit_base_patch16 --norm_pix_loss --batch_size 64 \\
        --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --data_path /imagenet
    torchrun --nproc_per_node 8 -m training.pretrain ...   (DDP: one process per GPU, or CPU processes)

AdamW (0.9, 0.95), weight decay except norms, biases and tokens; lr = blr x effective batch / 256 with a
per-iteration linear warm-up and half-cycle cosine; RandomResizedCrop(0.2-1) + flip; loss on the masked
patches. The final model is written as a native checkpoint (``output_dir/model``) for ``mae-deploy export``.

``--mask_token_encoder`` trains the paper's baseline (Table 1c, "encoder w/ [M]"): the encoder sees all
patches, the removed ones replaced by a learned mask token; it is about 2x slower per step
(benchmarks/RESULTS.md).
"""


def pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m training.pretrain", description=PRETRAIN_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch_size", default=64, type=int, help="batch size per process (GPU)")
    p.add_argument("--epochs", default=400, type=int)
    p.add_argument("--accum_iter", default=1, type=int, help="accumulate gradients over N batches per step")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="mae_vit_large_patch16", help="registry name, e.g. mae_vit_base_patch16")
    m.add_argument("--input_size", default=224, type=int, help="image size")
    m.add_argument("--in_chans", default=3, type=int, help="image channels: 3 (RGB) or 1 (greyscale)")
    m.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    m.add_argument("--norm_pix_loss", action="store_true", help="predict per-patch normalised pixels")
    m.set_defaults(norm_pix_loss=False)
    m.add_argument(
        "--mask_token_encoder",
        action="store_true",
        help="baseline: the encoder sees all tokens, removed ones as mask tokens (Table 1c)",
    )
    p.add_argument(
        "--gpu_decode",
        action="store_true",
        help="workers only read files; the training process decodes each batch on --device (JPEG: "
        "nvJPEG on a GPU) and crops, flips and normalises there (the same augmentation)",
    )
    o = p.add_argument_group("optimizer")
    o.add_argument("--weight_decay", type=float, default=0.05)
    o.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute lr (default: blr x batch / 256)")
    o.add_argument("--blr", type=float, default=1e-3, metavar="LR", help="base lr: lr = blr x effective batch / 256")
    o.add_argument("--min_lr", type=float, default=0.0, metavar="LR", help="lower lr bound of the cosine")
    o.add_argument("--warmup_epochs", type=int, default=40, metavar="N")
    p.add_argument(
        "--data_path",
        default="/datasets01/imagenet_full_size/061417/",
        help="ImageFolder root with train/ (or the class folders directly)",
    )
    add_run_args(p)
    return p


FINETUNE_USAGE = """End-to-end fine-tuning, the official recipe:
``python -m training.finetune`` or ``mae-deploy finetune``.

    python -m training.finetune --finetune mae_pretrain_vit_base.pth --model vit_base_patch16 \\
        --batch_size 32 --accum_iter 4 --epochs 100 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 \\
        --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval --data_path /imagenet

``--finetune`` takes a native checkpoint, an official .pth, a Hugging Face ViTMAE directory or a timm state
dict; position embeddings are interpolated (bicubic) when ``--input_size`` gives another grid. AdamW with
layer-wise lr decay (official layer ids), drop path, RandAugment and random erasing (torchvision), Mixup /
CutMix with label smoothing, global average pooling + fc_norm (or ``--cls_token``). Top-1/top-5 on
``data_path/val`` every epoch; the best epoch is kept as ``checkpoint-best.pth`` and ``model-best/`` and
the last as ``model/`` (native checkpoints).

Differences from timm's augmentation that torchvision cannot express: RandAugment ignores the 'mstd' and
'inc' parts of ``--aa``; random erasing erases one box (``--recount 1``) with 'pixel' or 'const' fill.
"""


def finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m training.finetune", description=FINETUNE_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch_size", default=64, type=int, help="batch size per process (GPU)")
    p.add_argument("--epochs", default=50, type=int)
    p.add_argument("--accum_iter", default=1, type=int, help="accumulate gradients over N batches per step")
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default="vit_large_patch16",
        help="architecture at random init when no --finetune is given (the checkpoint's otherwise)",
    )
    m.add_argument("--input_size", default=224, type=int, help="image size")
    m.add_argument("--in_chans", default=3, type=int, help="image channels without --finetune: 3 or 1")
    m.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="drop path (stochastic depth) rate")
    o = p.add_argument_group("optimizer")
    o.add_argument("--clip_grad", type=float, default=None, metavar="NORM", help="clip gradient norm (default: off)")
    o.add_argument("--weight_decay", type=float, default=0.05)
    o.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute lr (default: blr x batch / 256)")
    o.add_argument("--blr", type=float, default=1e-3, metavar="LR", help="base lr: lr = blr x effective batch / 256")
    o.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay")
    o.add_argument("--min_lr", type=float, default=1e-6, metavar="LR")
    o.add_argument("--warmup_epochs", type=int, default=5, metavar="N")
    a = p.add_argument_group("augmentation")
    a.add_argument("--color_jitter", type=float, default=None, metavar="PCT", help="color jitter (used when no --aa)")
    a.add_argument(
        "--aa",
        type=str,
        default="rand-m9-mstd0.5-inc1",
        metavar="NAME",
        help="RandAugment spec 'rand-m<magnitude>-n<ops>', or 'none'",
    )
    a.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    a.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erasing probability")
    a.add_argument("--remode", type=str, default="pixel", help="random erasing fill: pixel or const")
    a.add_argument("--recount", type=int, default=1, help="random erase count (torchvision: 1)")
    a.add_argument("--resplit", action="store_true", default=False, help="not supported (timm only)")
    a.add_argument("--mixup", type=float, default=0, help="mixup alpha, on if > 0")
    a.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, on if > 0")
    a.add_argument("--cutmix_minmax", type=float, nargs="+", default=None, help="not supported (timm only)")
    a.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixing a batch")
    a.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix when both are on")
    a.add_argument("--mixup_mode", type=str, default="batch", help="only 'batch' (one lambda per batch)")
    f = p.add_argument_group("checkpoint and head")
    f.add_argument("--finetune", default="", help="pretrained checkpoint (any supported format)")
    f.add_argument("--global_pool", action="store_true", help="global average pool + fc_norm (default)")
    f.add_argument("--cls_token", action="store_false", dest="global_pool", help="use the cls token instead")
    p.set_defaults(global_pool=True)
    p.add_argument(
        "--data_path", default="/datasets01/imagenet_full_size/061417/", help="ImageFolder root with train/ and val/"
    )
    p.add_argument(
        "--nb_classes",
        default=None,
        type=int,
        help="number of classes (official default 1000; here: the class folders in train/)",
    )
    p.add_argument("--eval", action="store_true", help="evaluate --resume / --finetune only")
    p.add_argument(
        "--dist_eval",
        action="store_true",
        help="accepted for compatibility: evaluation is always sharded exactly over processes",
    )
    add_run_args(p)
    return p


LINPROBE_USAGE = """Linear probing, the official recipe: ``python -m training.linprobe`` or ``mae-deploy linprobe``.

    python -m training.linprobe --finetune output_dir/model --model vit_base_patch16 --batch_size 512 \\
        --epochs 90 --blr 0.1 --weight_decay 0.0 --data_path /imagenet

The encoder from ``--finetune`` (a native checkpoint, official .pth, Hugging Face ViTMAE directory or timm
state dict) is frozen; a BatchNorm without affine parameters and a linear head are trained with LARS
(lr = blr x effective batch / 256, warm-up then cosine). Features are the cls token after the encoder's
norm (default, as in the paper) or, with ``--global_pool``, the mean patch token after a LayerNorm.
Without ``--finetune`` the encoder is at random init: the baseline a pretrained encoder should beat.

Top-1/top-5 on ``data_path/val`` every epoch; the final classifier is written as a native checkpoint
(``output_dir/model``) with the BatchNorm folded into the linear head.
"""


def linprobe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m training.linprobe", description=LINPROBE_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch_size", default=512, type=int, help="batch size per process (GPU)")
    p.add_argument("--epochs", default=90, type=int)
    p.add_argument("--accum_iter", default=1, type=int, help="accumulate gradients over N batches per step")
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default="vit_large_patch16",
        help="architecture at random init when no --finetune is given (the checkpoint's otherwise)",
    )
    m.add_argument("--input_size", default=224, type=int, help="image size")
    m.add_argument("--in_chans", default=3, type=int, help="image channels without --finetune: 3 or 1")
    o = p.add_argument_group("optimizer (LARS)")
    o.add_argument("--weight_decay", type=float, default=0.0)
    o.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute lr (default: blr x batch / 256)")
    o.add_argument("--blr", type=float, default=0.1, metavar="LR", help="base lr: lr = blr x effective batch / 256")
    o.add_argument("--min_lr", type=float, default=0.0, metavar="LR")
    o.add_argument("--warmup_epochs", type=int, default=10, metavar="N")
    f = p.add_argument_group("checkpoint and head")
    f.add_argument("--finetune", default="", help="pretrained checkpoint (any supported format)")
    f.add_argument("--global_pool", action="store_true", help="mean patch token instead of the cls token")
    f.add_argument("--cls_token", action="store_false", dest="global_pool", help="cls token features (default)")
    p.set_defaults(global_pool=False)
    p.add_argument(
        "--data_path", default="/datasets01/imagenet_full_size/061417/", help="ImageFolder root with train/ and val/"
    )
    p.add_argument(
        "--nb_classes",
        default=None,
        type=int,
        help="number of classes (official default 1000; here: the class folders in train/)",
    )
    p.add_argument("--eval", action="store_true", help="evaluate --resume / --finetune only")
    p.add_argument(
        "--dist_eval",
        action="store_true",
        help="accepted for compatibility: evaluation is always sharded exactly over processes",
    )
    add_run_args(p)
    return p


# --------------------------------------------------------------------------------------------------
# Checks every recipe shares, before anything is loaded (torch-free)
# --------------------------------------------------------------------------------------------------

# option -> (lowest, highest, lowest excluded, highest excluded); None = unbounded on that side.
_RANGES = {
    "batch_size": (1, None, False, False),
    "epochs": (1, None, False, False),
    "accum_iter": (1, None, False, False),
    "input_size": (1, 8192, False, False),
    "warmup_epochs": (0, None, False, False),
    "start_epoch": (0, None, False, False),
    "save_freq": (1, None, False, False),
    "num_workers": (0, None, False, False),
    "mask_ratio": (0.0, 1.0, False, True),
    "blr": (0.0, None, True, False),
    "lr": (0.0, None, True, False),
    "min_lr": (0.0, None, False, False),
    "weight_decay": (0.0, None, False, False),
    "drop_path": (0.0, 1.0, False, True),
    "layer_decay": (0.0, 1.0, True, False),
    "smoothing": (0.0, 1.0, False, True),
    "reprob": (0.0, 1.0, False, False),
    "mixup": (0.0, None, False, False),
    "cutmix": (0.0, None, False, False),
    "mixup_prob": (0.0, 1.0, False, False),
    "mixup_switch_prob": (0.0, 1.0, False, False),
    "clip_grad": (0.0, None, True, False),
    "color_jitter": (0.0, None, False, False),
    "nb_classes": (1, None, False, False),
}


def _bound(lo, hi, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'above' if lo_open else 'at least'} {lo:g}")
    if hi is not None:
        parts.append(f"{'below' if hi_open else 'at most'} {hi:g}")
    return " and ".join(parts)


def check_args(args: argparse.Namespace) -> None:
    """Range checks shared by pretrain, finetune and linprobe: an InputError (exit 3) naming the option
    before any data or model is loaded. Only the options a parser has are checked; None means unset."""
    import math

    from mae_deploy.errors import InputError

    for name, (lo, hi, lo_open, hi_open) in _RANGES.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        bad = isinstance(v, float) and not math.isfinite(v)
        bad = bad or (lo is not None and (v <= lo if lo_open else v < lo))
        bad = bad or (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            raise InputError(f"--{name} {v:g}: must be {_bound(lo, hi, lo_open, hi_open)}")
    if getattr(args, "in_chans", 3) not in (1, 3):
        raise InputError(f"--in_chans {args.in_chans}: image folders hold 1-channel (L) or 3-channel (RGB) images")
    device = str(getattr(args, "device", "auto"))
    kind, _, index = device.partition(":")
    if device not in ("auto", "cpu", "cuda") and not (kind == "cuda" and index.isdigit()):
        raise InputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if getattr(args, "output_dir", ""):
        from mae_deploy.fileio import check_writable

        check_writable(args.output_dir, what="--output_dir", directory=True)
