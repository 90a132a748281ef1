"""`pretrain`, `finetune`, `linprobe` (the training scripts' own options) and `data digits`.

The three training commands pass their arguments unchanged to ``python -m training.<script>``'s
argparse parser, so they take the official scripts' option names (``--blr``, ``--norm_pix_loss`` ...)
and ``mae-deploy pretrain --help`` lists them. torch is imported only when a command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def _run_script(module: str, args: tuple[str, ...]) -> None:
    import importlib

    from training import options  # argparse only: --help answers without importing torch

    parser = getattr(options, f"{module}_parser")()
    parser.prog = f"mae-deploy {module}"
    parsed = parser.parse_args(list(args))  # --help prints argparse's help and exits
    importlib.import_module(f"training.{module}").main(parsed)


@click.command(context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def pretrain(args: tuple[str, ...]) -> None:
    """Pretrain an MAE (official main_pretrain.py options; --help lists them).

    \b
    Example (built-in digits):
      mae-deploy data digits digits/
      mae-deploy pretrain --model mae_vit_tiny_patch4 --in_chans 1 --input_size 32 --norm_pix_loss \\
          --batch_size 64 --epochs 80 --warmup_epochs 5 --blr 2e-3 --data_path digits/ --output_dir run/
    Runs under torchrun too: torchrun --nproc_per_node 2 -m training.pretrain ...
    """
    _run_script("pretrain", args)


@click.command(context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def finetune(args: tuple[str, ...]) -> None:
    """Fine-tune a classifier from any checkpoint (official main_finetune.py options; --help lists them)."""
    _run_script("finetune", args)


@click.command(context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def linprobe(args: tuple[str, ...]) -> None:
    """Linear probe on a frozen encoder with LARS (official main_linprobe.py options; --help lists them)."""
    _run_script("linprobe", args)


@click.group()
def data() -> None:
    """Built-in datasets written as ImageFolder directories."""


@data.command("digits")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", default=32, show_default=True, type=click.IntRange(min=8), help="Image side in pixels.")
@click.option(
    "--val-fraction",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Fraction of each digit held out in val/.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the train/val split.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["folder", "webdataset", "parquet"]),
    default="folder",
    show_default=True,
    help="folder: <digit>/*.png; webdataset: .tar shards; parquet: an image column.",
)
def digits(directory: Path, size: int, val_fraction: float, seed: int, fmt: str) -> None:
    """Write scikit-learn's 1797 handwritten digits to DIRECTORY/{train,val}/.

    Real 8x8 scans (UCI optical digits, shipped inside scikit-learn: no download) upscaled to SIZE x SIZE
    greyscale PNGs, stratified split. --format folder (the default) writes <digit>/*.png; webdataset writes
    shard-000000.tar (KEY.png, KEY.cls, KEY.txt per sample); parquet writes part-00000.parquet (columns
    image {bytes, path}, label, class_name). Any of them is an `extract` SOURCE. Re-running completes an
    interrupted write and is otherwise a no-op.
    """
    import shutil

    from training.data import write_digits_imagefolder

    folder = directory if fmt == "folder" else directory / ".imagefolder"  # packed, then removed
    rec = write_digits_imagefolder(folder, size=size, val_fraction=val_fraction, seed=seed, progress=True)
    if fmt != "folder":
        from mae_deploy.sources.pack import write_parquet, write_shards

        pack = write_shards if fmt == "webdataset" else write_parquet
        for split in ("train", "val"):
            pack(folder / split, directory / split)
        shutil.rmtree(folder)
    click.echo(
        f"{directory}: {rec['train']} train + {rec['val']} val images, 10 classes, "
        f"{size}x{size} greyscale PNG, as {fmt}"
    )


COMMANDS = [pretrain, finetune, linprobe, data]
