"""End-to-end fine-tuning, the official recipe: ``python -m training.finetune`` or ``mae-deploy finetune``.

Usage, the recipe and where we differ from the official script: ``options.FINETUNE_USAGE`` (shown by
``--help``; kept in the torch-free training/options.py so ``--help`` never imports torch).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from mae_deploy.errors import InputError
from training import data, loop, optim, options
from training.compiled import compile_note, prepare_model
from training.distributed import cleanup, init_distributed


def get_args_parser() -> argparse.ArgumentParser:
    return options.finetune_parser()


def _check_unsupported(args: argparse.Namespace) -> None:
    if args.recount != 1 or args.resplit or args.cutmix_minmax or args.mixup_mode != "batch":
        raise InputError(
            "--recount > 1, --resplit, --cutmix_minmax and --mixup_mode other than 'batch' are timm "
            "features that torchvision's transforms do not have; leave them at their defaults"
        )


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1).mean()


def main(args: argparse.Namespace) -> None:
    loop.check_run_args(args)  # bad options fail here, before data, model or process group
    info = init_distributed(args.device)
    try:
        train(args, info)
    finally:
        cleanup()


def train(args: argparse.Namespace, info) -> None:
    _check_unsupported(args)
    say, device, precision, out = loop.start_run(args, info)

    # Data (a checkpoint decides the channel count).
    d = loop.classifier_data(
        args,
        info,
        device,
        lambda in_chans: data.finetune_transform(
            args.input_size,
            in_chans,
            aa=args.aa,
            reprob=args.reprob,
            remode=args.remode,
            color_jitter=args.color_jitter,
        ),
    )
    in_chans, train_set, val_set, nb_classes = d.in_chans, d.train_set, d.val_set, d.nb_classes
    sampler, loader, val_loader = d.sampler, d.loader, d.val_loader
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = data.MixupCutmix(
            nb_classes, args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing
        )

    # Model, layer-wise lr decay, AdamW.
    model = loop.build_classifier(
        args.finetune,
        args.model,
        nb_classes,
        args.global_pool,
        args.input_size,
        in_chans,
        drop_path=args.drop_path,
        log=say,
    )
    model.to(device)
    eff_batch = args.batch_size * args.accum_iter * info.world_size
    if args.lr is None:
        args.lr = optim.effective_lr(args.blr, args.batch_size, args.accum_iter, info.world_size)
    groups = optim.param_groups_layer_decay(model, args.weight_decay, args.layer_decay)
    optimizer = optim.make_adamw(groups, args.lr, device)
    scaler = loop.make_scaler(precision, device)
    # DDP under torchrun, then torch.compile with --compile; `model` stays the eager module (checkpoints).
    ddp = prepare_model(model, info, args.compile, args.compile_mode, args.accum_iter)

    if mixup is not None:
        criterion = soft_target_cross_entropy
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)

    start = loop.resume_path(args.resume, out)
    extra = {"best_acc1": 0.0}
    if start is not None:
        args.start_epoch, extra = loop.load_training_checkpoint(start, model, optimizer, scaler, info)
        say(f"resumed from {start}: continuing at epoch {args.start_epoch}")
    if args.eval:
        test = loop.evaluate(ddp, val_loader, info, precision)
        say(loop.format_record({f"test_{k}": v for k, v in test.items()}))
        return
    metrics = loop.MetricsLog(out, args.log_dir, info)
    say(
        f"fine-tuning: {len(train_set)} train / {len(val_set)} val images, {nb_classes} classes, "
        f"lr {args.lr:.3e} (blr {args.blr:.3e} x {eff_batch} / 256), layer decay {args.layer_decay}, "
        f"{args.epochs} epochs, {precision} on {device}{compile_note(ddp)}"
    )

    def set_lr(epoch: float) -> float:
        return optim.adjust_learning_rate(optimizer, epoch, args.lr, args.min_lr, args.epochs, args.warmup_epochs)

    def compute_loss(samples: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return criterion(ddp(samples), targets)

    last = out / "checkpoint-last.pth" if out else None
    t0 = time.perf_counter()
    step = loop.TrainingStep(
        ddp,
        optimizer,
        compute_loss,
        set_lr,
        info,
        precision=precision,
        scaler=scaler,
        accum_iter=args.accum_iter,
        clip_grad=args.clip_grad,
        metrics=metrics,
        batch_transform=mixup,
    )
    for epoch in range(args.start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        kept = str(last) if last and last.exists() else None
        stats = loop.train_one_epoch(step, loader, epoch, kept, desc=f"finetune {epoch + 1}/{args.epochs}")
        test = loop.evaluate(ddp, val_loader, info, precision)
        is_best = test["acc1"] > extra.get("best_acc1", 0.0)
        extra["best_acc1"] = max(extra.get("best_acc1", 0.0), test["acc1"])
        if out is not None:
            loop.save_training_checkpoint(last, ddp, optimizer, scaler, epoch, args, info, extra)
            if info.is_main and (epoch % args.save_freq == 0 or epoch + 1 == args.epochs):
                loop.keep_checkpoint(last, epoch)
            if info.is_main and is_best:
                from training.checkpoints import save_native

                loop.keep_checkpoint(last, "best")
                save_native(
                    model,
                    out / "model-best",
                    overwrite=True,
                    class_names=train_set.classes,
                    source={"format": "mae-deploy finetune", "epoch": epoch, "acc1": test["acc1"]},
                )
        record = {"epoch": epoch, **stats, **{f"test_{k}": v for k, v in test.items()}, "best_acc1": extra["best_acc1"]}
        metrics.epoch(record)
        say(loop.format_record(record))
    metrics.close()

    if out is not None and info.is_main:
        from training.checkpoints import save_native

        source = {"format": "mae-deploy finetune", "finetune": args.finetune or None, "epochs": args.epochs}
        save_native(model.cpu(), out / "model", source=source, overwrite=True, class_names=train_set.classes)
        say(
            f"done in {time.perf_counter() - t0:.1f}s; best top-1 {extra['best_acc1']:.2f}%; native classifier: "
            f"{out / 'model'} (best epoch: {out / 'model-best'})"
        )


def cli(argv: list[str] | None = None) -> None:
    loop.run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
