"""Linear probing, the official recipe: ``python -m training.linprobe`` or ``mae-deploy linprobe``.

Usage, the recipe and where we differ from the official script: ``options.LINPROBE_USAGE`` (shown by
``--help``; kept in the torch-free training/options.py so ``--help`` never imports torch).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from training import data, loop, optim, options
from training.compiled import compile_note, prepare_model
from training.distributed import cleanup, init_distributed
from training.model import VisionTransformer


def get_args_parser() -> argparse.ArgumentParser:
    return options.linprobe_parser()


def fold_probe_head(model: VisionTransformer) -> VisionTransformer:
    """The probe (frozen encoder, BatchNorm without affine, Linear) as a plain classifier whose Linear
    head includes the BatchNorm's running statistics: same outputs in eval mode, native-format keys."""
    bn, linear = model.head[0], model.head[1]
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    plain = VisionTransformer(model.config, linear.out_features, global_pool=model.global_pool)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    sd["head.weight"] = linear.weight * inv_std[None, :]
    sd["head.bias"] = linear.bias - (linear.weight * (bn.running_mean * inv_std)[None, :]).sum(dim=1)
    plain.load_state_dict({k: v.detach().cpu() for k, v in sd.items()})
    return plain.eval()


def main(args: argparse.Namespace) -> None:
    loop.check_run_args(args)  # bad options fail here, before data, model or process group
    info = init_distributed(args.device)
    try:
        train(args, info)
    finally:
        cleanup()


def train(args: argparse.Namespace, info) -> None:
    say, device, precision, out = loop.start_run(args, info)

    # A checkpoint decides the channel count the data must be read with.
    d = loop.classifier_data(args, info, device, lambda in_chans: data.linprobe_transform(args.input_size, in_chans))
    in_chans, train_set, val_set, nb_classes = d.in_chans, d.train_set, d.val_set, d.nb_classes
    sampler, loader, val_loader = d.sampler, d.loader, d.val_loader

    model = loop.build_classifier(
        args.finetune, args.model, nb_classes, args.global_pool, args.input_size, in_chans, log=say
    )
    # The probe: BatchNorm without affine + linear head (std 0.01 init); everything else frozen.
    nn.init.trunc_normal_(model.head.weight, std=0.01)
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.")
    model.to(device)
    eff_batch = args.batch_size * args.accum_iter * info.world_size
    if args.lr is None:
        args.lr = optim.effective_lr(args.blr, args.batch_size, args.accum_iter, info.world_size)
    optimizer = optim.LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # DDP under torchrun, then torch.compile with --compile; `model` stays the eager module (checkpoints).
    ddp = prepare_model(model, info, args.compile, args.compile_mode, args.accum_iter)

    start = loop.resume_path(args.resume, out)
    extra = {"best_acc1": 0.0}
    if start is not None:
        args.start_epoch, extra = loop.load_training_checkpoint(start, model, optimizer, None, info)
        say(f"resumed from {start}: continuing at epoch {args.start_epoch}")
    if args.eval:
        test = loop.evaluate(ddp, val_loader, info, precision)
        say(loop.format_record({f"test_{k}": v for k, v in test.items()}))
        return
    metrics = loop.MetricsLog(out, args.log_dir, info)
    say(
        f"linear probe: {len(train_set)} train / {len(val_set)} val images, {nb_classes} classes, "
        f"{'mean-pool' if args.global_pool else 'cls-token'} features, lr {args.lr:.3e} "
        f"(blr {args.blr:.3e} x {eff_batch} / 256), {args.epochs} epochs, {precision} on {device}{compile_note(ddp)}"
    )

    criterion = nn.CrossEntropyLoss()

    def set_lr(epoch: float) -> float:
        return optim.adjust_learning_rate(optimizer, epoch, args.lr, args.min_lr, args.epochs, args.warmup_epochs)

    def compute_loss(samples: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return criterion(ddp(samples), targets)

    last = out / "checkpoint-last.pth" if out else None
    t0 = time.perf_counter()
    step = loop.TrainingStep(
        ddp, optimizer, compute_loss, set_lr, info, precision=precision, accum_iter=args.accum_iter, metrics=metrics
    )
    for epoch in range(args.start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        kept = str(last) if last and last.exists() else None
        stats = loop.train_one_epoch(step, loader, epoch, kept, desc=f"linprobe {epoch + 1}/{args.epochs}")
        test = loop.evaluate(ddp, val_loader, info, precision)
        extra["best_acc1"] = max(extra.get("best_acc1", 0.0), test["acc1"])
        if out is not None:
            loop.save_training_checkpoint(last, ddp, optimizer, None, epoch, args, info, extra)
            if info.is_main and (epoch % args.save_freq == 0 or epoch + 1 == args.epochs):
                loop.keep_checkpoint(last, epoch)
        record = {"epoch": epoch, **stats, **{f"test_{k}": v for k, v in test.items()}, "best_acc1": extra["best_acc1"]}
        metrics.epoch(record)
        say(loop.format_record(record))
    metrics.close()

    if out is not None and info.is_main:
        from training.checkpoints import save_native

        source = {
            "format": "mae-deploy linprobe",
            "finetune": args.finetune or None,
            "epochs": args.epochs,
            "note": "linear probe; BatchNorm folded into head",
        }
        save_native(
            fold_probe_head(model.cpu()), out / "model", source=source, overwrite=True, class_names=train_set.classes
        )
        say(
            f"done in {time.perf_counter() - t0:.1f}s; best top-1 {extra['best_acc1']:.2f}%; "
            f"native classifier: {out / 'model'}"
        )


def cli(argv: list[str] | None = None) -> None:
    loop.run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
