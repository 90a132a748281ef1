"""`reconstruct`: the torch-free runtime from the command line (feature extraction is `extract`)."""

from __future__ import annotations

from pathlib import Path

import click

from mae_deploy.commands.options import precision_option
from mae_deploy.names import BACKENDS, IMAGE_EXTENSIONS


def _expand(paths: tuple[Path, ...]) -> list[Path]:
    """Files as given; a directory contributes its image files (by extension, sorted, not recursive)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            out.append(p)
    return out


def _output_names(paths: list[Path]) -> list[str]:
    """<stem>.png, with -2, -3 ... when two inputs share a stem (a/x.jpg and b/x.png)."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0) + 1
        seen[p.stem] = n
        names.append(f"{p.stem}.png" if n == 1 else f"{p.stem}-{n}.png")
    return names


def _save_png_atomic(image, dst: Path) -> None:
    from mae_deploy.fileio import atomic_write

    atomic_write(dst, lambda f: image.save(f, format="PNG"))


def _runner_opts(backend: str, checkpoint: str | None) -> dict:
    opts: dict = {}
    if checkpoint:
        from mae_deploy.errors import InputError

        if backend != "torch":
            raise InputError("--checkpoint only applies to --backend torch (other backends run the bundle's graphs)")
        opts["checkpoint"] = checkpoint
    return opts


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--bundle",
    "-b",
    "bundle_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle directory (from `mae-deploy export`); it needs a decoder.",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),  # checked by check_writable: exit 3
    help="Directory for the PNG grids (created if missing; existing files are replaced).",
)
@click.option(
    "--mask-ratio",
    default=0.75,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Fraction of patches removed before encoding.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Mask seed; every image gets the same mask for a given seed."
)
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True, help="Inference backend.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="cpu, cuda[:N], or tensorrt[:N] (ort only). A GPU that does not work is an error, never a CPU fall-back.",
)
@precision_option
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: the library's).")
@click.option(
    "--checkpoint",
    type=click.Path(exists=True),
    default=None,
    help="torch backend only: weights to use instead of the bundle's reference checkpoint.",
)
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files.")
@click.option(
    "--exact-resize",
    is_flag=True,
    help="Decode and resize every image at full size; by default images at least twice the model's "
    "input are JPEG-draft-decoded and box-reduced first (feature cosine 0.999999, see "
    "benchmarks/RESULTS.md).",
)
def reconstruct(
    images, bundle_path, out, mask_ratio, seed, backend, device, precision, threads, checkpoint, no_verify, exact_resize
):
    """Mask, encode, decode: one PNG per image with the official demo's four panels.

    \b
    IMAGES are image files or directories of them. Each output OUT/<name>.png shows
    original | masked | reconstruction | reconstruction + visible, under a title naming the
    model, mask ratio and seed.

    \b
    Example:
      mae-deploy reconstruct photo.jpg more/ --bundle bundle/ --out recon/ --mask-ratio 0.75 --seed 0
    """
    from tqdm import tqdm

    from mae_deploy.bundle import Bundle
    from mae_deploy.errors import InputError, PartialFailure
    from mae_deploy.fileio import check_writable
    from mae_deploy.preprocess import Preprocessor
    from mae_deploy.reconstruct import Reconstructor, check_seed

    check_seed(seed, "--seed")
    check_writable(out, what="--out", directory=True)  # before any work: a path under a file, /proc, read-only
    paths = _expand(images)
    if not paths:
        raise InputError(f"no image files in {', '.join(map(str, images))}")
    bundle = Bundle.load(bundle_path, verify=not no_verify)
    with Reconstructor(
        bundle,
        backend=backend,
        device=device,
        precision=precision,
        threads=threads,
        preprocessor=Preprocessor.from_bundle(bundle, exact_resize=exact_resize),
        **_runner_opts(backend, checkpoint),
    ) as rec:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create output directory {out}: {e}") from e
        wrote, failed = [], []
        jobs = list(zip(paths, _output_names(paths), strict=True))
        for path, name in tqdm(jobs, desc="reconstruct", unit="img", disable=None):
            try:
                grid = rec.reconstruct([path], mask_ratio=mask_ratio, seed=seed)[0].grid_image()
            except InputError as e:  # one bad image does not stop the others
                failed.append(e)
                continue
            dst = out / name
            _save_png_atomic(grid, dst)
            wrote.append(f"wrote {dst} ({grid.width}x{grid.height})")
        info = rec.runner.info
    for line in wrote:
        click.echo(line)
    providers = f" [{', '.join(info.providers)}]" if info.providers else ""
    click.echo(f"{len(wrote)} of {len(paths)} images on {info.backend}/{info.device}{providers}, {info.precision}")
    for err in failed:
        click.secho(f"failed: {err}", fg="red", err=True)
    if failed and not wrote:
        raise failed[0] if len(failed) == 1 else InputError(f"all {len(failed)} images failed; first: {failed[0]}")
    if failed:
        raise PartialFailure(f"{len(failed)} of {len(paths)} images could not be reconstructed (listed above)")


COMMANDS = [reconstruct]
