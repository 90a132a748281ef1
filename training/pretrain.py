"""MAE pretraining, the official recipe: ``python -m training.pretrain`` or ``mae-deploy pretrain``.

Usage, the recipe and where we differ from the official script: ``options.PRETRAIN_USAGE`` (shown by
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
from training.distributed import cleanup, init_distributed, train_sampler
from training.model import MaskedAutoencoderViT, create_model, random_masking


class MaskTokenMAE(MaskedAutoencoderViT):
    """Baseline of the paper's Table 1c: the encoder processes all L tokens, removed patches replaced by
    a learned ``encoder_mask_token`` (plus their position embedding); the decoder then needs no mask
    tokens of its own. Same loss on the removed patches."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.normal_(self.encoder_mask_token, std=0.02)
        if self.has_decoder:
            self.mask_token.requires_grad_(False)  # unused: the encoder already fills every position

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        _, _, mask = random_masking(imgs.shape[0], self.config.num_patches, mask_ratio, noise=noise, device=imgs.device)
        x = self.patch_embed(imgs)  # (N,L,D)
        x = torch.where(mask.bool()[..., None], self.encoder_mask_token.to(x.dtype), x) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x)) + self.decoder_pos_embed  # (N,1+L,Dd), tokens already in order
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return self.forward_loss(imgs, pred, mask.to(pred.dtype)), pred, mask

    def as_mae(self) -> MaskedAutoencoderViT:
        """The same weights in the standard architecture (the encoder mask token dropped), for export."""
        plain = MaskedAutoencoderViT(self.config)
        plain.load_state_dict({k: v for k, v in self.state_dict().items() if k != "encoder_mask_token"})
        return plain


def get_args_parser() -> argparse.ArgumentParser:
    return options.pretrain_parser()


def main(args: argparse.Namespace) -> None:
    loop.check_run_args(args)  # bad options fail here, before data, model or process group
    info = init_distributed(args.device)
    try:
        train(args, info)
    finally:
        cleanup()


def train(args: argparse.Namespace, info) -> None:
    say, device, precision, out = loop.start_run(args, info)

    # Data: the official augmentation, in the workers or (--gpu_decode) on the device; the sampler's order
    # depends only on (seed, epoch).
    train_dir = data.split_dir(args.data_path, "train")
    pin = args.pin_mem and device.type == "cuda"
    if args.gpu_decode:
        from training import gpu_data

        dataset = gpu_data.EncodedImageFolder(train_dir, args.in_chans, log=say)
        sampler = train_sampler(dataset, info, args.seed)
        loader = gpu_data.device_decoded_loader(
            dataset, sampler, args.batch_size, args.num_workers, pin, args.input_size, args.in_chans, device
        )
    else:
        dataset = data.image_folder(
            train_dir, data.pretrain_transform(args.input_size, args.in_chans), args.in_chans, log=say
        )
        sampler = train_sampler(dataset, info, args.seed)
        loader = torch.utils.data.DataLoader(
            dataset,
            sampler=sampler,
            batch_size=args.batch_size,
            drop_last=True,
            num_workers=args.num_workers,
            pin_memory=pin,
        )

    # Model and optimizer.
    name = loop.registry_name(args.model)
    model = create_model(name, img_size=args.input_size, in_chans=args.in_chans, norm_pix_loss=args.norm_pix_loss)
    if args.mask_token_encoder:
        model = MaskTokenMAE(model.config)
    if not model.has_decoder:
        raise InputError(f"--model {name} has no decoder; pretraining needs one")
    model.to(device)
    eff_batch = args.batch_size * args.accum_iter * info.world_size
    if args.lr is None:
        args.lr = optim.effective_lr(args.blr, args.batch_size, args.accum_iter, info.world_size)
    optimizer = optim.make_adamw(
        optim.param_groups_weight_decay(model, args.weight_decay), args.lr, device, betas=(0.9, 0.95)
    )
    scaler = loop.make_scaler(precision, device)
    # DDP under torchrun, then torch.compile with --compile; `model` stays the eager module (checkpoints).
    ddp = prepare_model(model, info, args.compile, args.compile_mode, args.accum_iter)

    start = loop.resume_path(args.resume, out)
    extra = {}
    if start is not None:
        args.start_epoch, extra = loop.load_training_checkpoint(start, model, optimizer, scaler, info)
        say(f"resumed from {start}: continuing at epoch {args.start_epoch}")
    metrics = loop.MetricsLog(out, args.log_dir, info)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(
        f"pretraining {name}{' (mask-token encoder baseline)' if args.mask_token_encoder else ''}: "
        f"{n_params / 1e6:.2f}M parameters, {len(dataset)} images, {len(loader)} steps/epoch, "
        f"{info.world_size} process(es) on {device}, {precision}{compile_note(ddp)}"
    )
    say(
        f"lr {args.lr:.3e} (blr {args.blr:.3e} x effective batch {eff_batch} / 256), "
        f"epochs {args.epochs}, warm-up {args.warmup_epochs}; images decoded and augmented "
        + (
            f"on {device} (--gpu_decode)"
            if args.gpu_decode
            else f"by {args.num_workers} CPU worker(s)"
            if args.num_workers
            else "in this process"
        )
    )

    def set_lr(epoch: float) -> float:
        return optim.adjust_learning_rate(optimizer, epoch, args.lr, args.min_lr, args.epochs, args.warmup_epochs)

    num_patches = model.config.num_patches

    def compute_loss(samples: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
        # The masking noise is drawn here, in eager mode, with the same call random_masking makes: a
        # compiled model would draw other numbers (inductor's own RNG), and this way compiled and eager
        # runs, and resumed ones, see the same masks.
        noise = torch.rand(samples.shape[0], num_patches, device=samples.device)
        return ddp(samples, mask_ratio=args.mask_ratio, noise=noise)[0]

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
        metrics=metrics,
    )
    for epoch in range(args.start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        kept = str(last) if last and last.exists() else None
        stats = loop.train_one_epoch(step, loader, epoch, kept, desc=f"pretrain {epoch + 1}/{args.epochs}")
        if out is not None:
            loop.save_training_checkpoint(last, ddp, optimizer, scaler, epoch, args, info, extra)
            if info.is_main and (epoch % args.save_freq == 0 or epoch + 1 == args.epochs):
                loop.keep_checkpoint(last, epoch)
        record = {"epoch": epoch, **stats}
        metrics.epoch(record)
        say(loop.format_record(record))
    metrics.close()

    if out is not None and info.is_main:
        from training.checkpoints import save_native

        final = model.as_mae() if isinstance(model, MaskTokenMAE) else model
        source = {
            "format": "mae-deploy pretrain",
            "epochs": args.epochs,
            "model": name,
            "mask_token_encoder": bool(args.mask_token_encoder),
            "data_path": str(args.data_path),
        }
        save_native(final.cpu(), out / "model", source=source, overwrite=True)
        say(
            f"done in {time.perf_counter() - t0:.1f}s; native checkpoint: {out / 'model'} "
            f"(next: mae-deploy export {out / 'model'} --out bundle/)"
        )


def cli(argv: list[str] | None = None) -> None:
    loop.run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
