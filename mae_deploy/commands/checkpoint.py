"""`convert` and `info`: checkpoints in any supported format."""

from __future__ import annotations

import json
import time

import click

_HINTS = [
    click.option("--num-heads", type=int, default=None, help="Encoder heads, when the weights cannot tell."),
    click.option("--decoder-num-heads", type=int, default=None, help="Decoder heads, when the weights cannot tell."),
    click.option(
        "--norm-pix-loss/--no-norm-pix-loss",
        default=None,
        help="Whether the decoder predicts per-patch normalised pixels (default: read or guessed from the file).",
    ),
]


def hint_options(f):
    """--num-heads, --decoder-num-heads, --norm-pix-loss: what a checkpoint's weights cannot tell (convert,
    info, export)."""
    for opt in reversed(_HINTS):
        f = opt(f)
    return f


def _describe(ckpt) -> dict:
    cfg = ckpt.config
    counts = ckpt.parameter_counts()
    return {
        "source": ckpt.source,
        "format": ckpt.format,
        "architecture": cfg.to_dict(),
        "num_patches": cfg.num_patches,
        "parts": ckpt.parts,
        "head": {"num_classes": ckpt.num_classes, "global_pool": ckpt.global_pool} if ckpt.is_classifier else None,
        "parameters": {**counts, "total": sum(counts.values())},
        "notes": ckpt.notes,
        "nonfinite_tensors": ckpt.nonfinite,
    }


@click.command()
@click.argument("src", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@hint_options
def info(src: str, as_json: bool, num_heads, decoder_num_heads, norm_pix_loss) -> None:
    """Describe a checkpoint: format, architecture, parts present, parameter counts.

    SRC is an official .pth, a Hugging Face ViTMAE directory, a timm state dict or a native checkpoint.
    """
    from training.checkpoints import load_checkpoint

    ckpt = load_checkpoint(src, num_heads=num_heads, decoder_num_heads=decoder_num_heads, norm_pix_loss=norm_pix_loss)
    d = _describe(ckpt)
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        _print_description(src, d)
    if ckpt.nonfinite:  # described above, then exit 3: a script checking files must notice
        from mae_deploy.errors import CheckpointError

        raise CheckpointError(ckpt.nonfinite_message())


def _print_description(src: str, d: dict) -> None:
    a = d["architecture"]
    click.echo(f"{src}")
    click.echo(f"  format        {d['format']}")
    click.echo(
        f"  architecture  {a['name']}: {a['img_size']}px, patch {a['patch_size']}, {a['in_chans']} channels, "
        f"{d['num_patches']} patches"
    )
    click.echo(
        f"  encoder       dim {a['embed_dim']}, depth {a['depth']}, heads {a['num_heads']}, "
        f"mlp {a['mlp_ratio']:g}, eps {a['norm_eps']:g}"
    )
    if "decoder" in d["parts"]:
        click.echo(
            f"  decoder       dim {a['decoder_embed_dim']}, depth {a['decoder_depth']}, "
            f"heads {a['decoder_num_heads']}, target {'norm-pix' if a['norm_pix_loss'] else 'raw pixels'}"
        )
    if d["head"]:
        pool = "global average pool + fc_norm" if d["head"]["global_pool"] else "cls token"
        click.echo(f"  head          {d['head']['num_classes']} classes, {pool}")
    click.echo(f"  parts         {', '.join(d['parts'])}")
    params = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in d["parameters"].items())
    click.echo(f"  parameters    {params}")
    for note in d["notes"]:
        click.echo(f"  note: {note}")


@click.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@hint_options
def convert(src: str, dst: str, overwrite: bool, num_heads, decoder_num_heads, norm_pix_loss) -> None:
    """Convert SRC (official .pth, Hugging Face ViTMAE dir, timm state dict) to a native checkpoint DST.

    DST is a directory with config.json + model.safetensors, written atomically.
    """
    from training.checkpoints import convert as do_convert

    t0 = time.perf_counter()
    ckpt = do_convert(
        src,
        dst,
        overwrite=overwrite,
        num_heads=num_heads,
        decoder_num_heads=decoder_num_heads,
        norm_pix_loss=norm_pix_loss,
    )
    total = sum(ckpt.parameter_counts().values())
    click.echo(
        f"converted {src} ({ckpt.format}, {ckpt.config.name}, {', '.join(ckpt.parts)}, "
        f"{total / 1e6:.2f}M parameters) -> {dst} in {time.perf_counter() - t0:.1f}s"
    )
    for note in ckpt.notes:
        click.echo(f"note: {note}")


COMMANDS = [convert, info]
