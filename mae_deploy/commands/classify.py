"""`classify` (top-k labels of images) and `eval` (accuracy of a bundle's classifier per precision)."""

from __future__ import annotations

import click

from mae_deploy.commands.options import precision_option
from mae_deploy.errors import InputError, PartialFailure, VerificationError
from mae_deploy.names import BACKENDS, DECODERS, GRAPH_PRECISIONS, TORCH_PRECISIONS

decoder_option = click.option(
    "--decoder",
    type=click.Choice(DECODERS),
    default=None,
    help="pil: Pillow, the exact reference; torch: JPEG batches decoded, resized and normalised on the runner's "
    "device (nvJPEG on CUDA), other files through PIL [default: torch on cuda devices, pil on the CPU].",
)


def _runner_opts(backend: str, threads: int | None) -> dict:
    if not threads:
        return {}
    return {"intra_op_threads": threads} if backend == "ort" else {"threads": threads}


@click.command()
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--bundle",
    "bundle_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Bundle directory with a classifier graph (export of a fine-tuned / linear-probe checkpoint).",
)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Labels per image.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write predictions to a .jsonl or .csv file (default: print them).",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True, help="Inference backend.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (ort also: tensorrt).")
@precision_option
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per inference call."
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads [default: all cores].")
@decoder_option
@click.option(
    "--image-column",
    default=None,
    help="Parquet SOURCE: the column of image bytes [default: the first image or binary column].",
)
@click.option(
    "--id-column", default=None, help="Parquet SOURCE: the column whose value names a row [default: FILE#ROW]."
)
def classify(
    images,
    bundle_dir,
    top_k,
    out_path,
    backend,
    device,
    precision,
    batch_size,
    threads,
    decoder,
    image_column,
    id_column,
) -> None:
    """Top-k labels of IMAGES with the bundle's classifier.

    \b
    IMAGES: one or more SOURCEs, as `extract` takes them: image files, directories (searched recursively),
    quoted globs, text files of paths, WebDataset .tar shards (rows SHARD#KEY.EXT), Parquet files with an
    image column (rows FILE#ROW), or any of these behind s3://, gs://, http(s)://. An image that cannot be
    read is listed (with the reason) and the rest go on.
    \b
    Exit codes: 0 every image classified; 4 some images could not be read (listed); 3 bad options or a
    bundle without a classifier.
    """
    from mae_deploy.classify import Classifier, classify_files, write_predictions
    from mae_deploy.fileio import check_writable
    from mae_deploy.sources import list_source

    if out_path:
        check_writable(out_path, what="--out")
    sources = [list_source(spec, image_column=image_column, id_column=id_column) for spec in images]
    with Classifier(
        bundle_dir,
        backend=backend,
        device=device,
        precision=precision,
        batch_size=batch_size,
        **_runner_opts(backend, threads),
    ) as clf:
        records = classify_files(clf, sources, top_k, decoder=decoder)
    failed = [r for r in records if "error" in r]
    if out_path:
        write_predictions(records, out_path)
        click.echo(f"{len(records) - len(failed)} images classified -> {out_path}")
    else:
        for r in records:
            if "predictions" in r:
                labels = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in r["predictions"])
                click.echo(f"{r['path']}\t{labels}")
    for r in failed:
        click.echo(f"failed: {r['path']}: {r['error']}", err=True)
    if failed:
        raise PartialFailure(f"{len(failed)} of {len(records)} images could not be read (listed above)")


@click.command(name="eval")
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(exists=True, file_okay=False))
@click.argument("image_folder", metavar="SOURCE")
@click.option(
    "--precisions",
    default=None,
    help="Comma-separated classifier precisions to score [default: every one the bundle has].",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True, help="Inference backend.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (ort also: tensorrt).")
@click.option(
    "--reference/--no-reference",
    default=None,
    help="Add the PyTorch model's row [default: when the bundle has reference weights and torch].",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads [default: all cores].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the confusion matrices as a picture (.png, .svg, .pdf).",
)
@click.option(
    "--max-top1-drop",
    type=float,
    default=None,
    help="Fail (exit 5) when a precision's top-1 is more than this many points below the first one's.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@decoder_option
@click.option(
    "--label-column", default=None, help="Parquet SOURCE: the column of class indices (or names) [default: label]."
)
@click.option(
    "--image-column",
    default=None,
    help="Parquet SOURCE: the column of image bytes [default: the first image or binary column].",
)
def eval_cmd(
    bundle_dir,
    image_folder,
    precisions,
    backend,
    device,
    reference,
    batch_size,
    threads,
    out_path,
    plot_path,
    max_top1_drop,
    no_progress,
    decoder,
    label_column,
    image_column,
) -> None:
    """Top-1 / top-5 of the bundle's classifier at each precision on a labelled SOURCE.

    \b
    SOURCE: an ImageFolder, ROOT/<class name>/<images> (e.g. the digits' val/; folder names are matched to
    the classifier's class names); WebDataset .tar shards whose samples have a .cls member (the class
    index); or Parquet files with a label column (--label-column: class indices, or names as strings);
    local or behind s3://, gs://, http(s)://. Every model classifies the same decoded images; the PyTorch
    model (reference weights) is added when the bundle has them. The first row is the baseline of the
    other rows' changes.
    \b
    Exit codes: 0 every image scored; 4 scored, but some images could not be read (listed, left out of every
    score); 5 --max-top1-drop exceeded; 3 bad input (no classifier, unknown class folders).
    """
    from mae_deploy.evaluate import evaluate, plot_confusion
    from mae_deploy.fileio import atomic_write_json, check_writable

    for p in (out_path, plot_path):
        if p:
            check_writable(p, what="output")
    wanted = [p.strip() for p in precisions.split(",") if p.strip()] if precisions else None
    # The torch backend autocasts the reference weights (fp32, bf16, fp16 on CUDA); other backends run graphs.
    allowed = TORCH_PRECISIONS if backend == "torch" else GRAPH_PRECISIONS
    for p in wanted or ():
        if p not in allowed:
            raise InputError(
                f"--precisions: unknown precision {p!r} for --backend {backend}; choose from {', '.join(allowed)}"
            )
    report = evaluate(
        bundle_dir,
        image_folder,
        wanted,
        backend=backend,
        device=device,
        reference=reference,
        batch_size=batch_size,
        progress=not no_progress,
        runner_opts=_runner_opts(backend, threads),
        decoder=decoder,
        label_column=label_column,
        image_column=image_column,
    )
    click.echo(report.table())
    for note in report.notes:
        click.echo(f"note: {note}")
    if out_path:
        atomic_write_json(out_path, report.as_dict())
        click.echo(f"results -> {out_path}")
    if plot_path:
        click.echo(f"confusion matrices -> {plot_confusion(report, plot_path)}")
    if max_top1_drop is not None:
        base = report.scores[0]
        worse = [s for s in report.scores[1:] if base.top1 - s.top1 > max_top1_drop]
        if worse:
            raise VerificationError(
                f"top-1 more than {max_top1_drop} points below {base.name} ({base.top1:.2f} %): "
                + ", ".join(f"{s.name} {s.top1:.2f} %" for s in worse)
                + "; re-export that precision (for int8: calibrate on more data, or keep fp32/fp16)"
            )
    for f in report.failed:
        click.echo(f"failed: {f['path']}: {f['message']}", err=True)
    if report.failed:  # the same rule as classify: a score that left inputs out is not a clean run
        total = report.images + len(report.failed)
        raise PartialFailure(
            f"{len(report.failed)} of {total} images could not be read (listed above) and were left out of every score"
        )


COMMANDS = [classify, eval_cmd]
