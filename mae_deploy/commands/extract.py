"""`extract`: batch feature extraction over a directory, glob or list of images (resumable, sharded)."""

from __future__ import annotations

import click

from mae_deploy.commands.options import compile_option, compile_runner_opts, precision_option
from mae_deploy.errors import PartialFailure
from mae_deploy.names import BACKENDS, DECODERS, POOLS


@click.command()
@click.argument("source")
@click.option(
    "--bundle",
    "bundle_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Bundle directory (from `mae-deploy export`).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(),
    help="Output directory: shards, index, manifest.json, errors.jsonl. Rerun into it to resume.",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True, help="Inference backend.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (ort also: tensorrt).")
@precision_option
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per inference call."
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Decode processes [default: cores - 1, at least 1, at most 8]; 0 decodes in a thread.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Inference threads, mapped by each backend [default: the backend's own, all cores].",
)
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    default="cls",
    show_default=True,
    help="cls token, mean of patch tokens, or all tokens (N x (L+1) x D).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Stored feature dtype.",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=None,
    help="Inputs per shard [default: 10000, fewer for tokens so a shard stays under 256 MiB].",
)
@click.option(
    "--num-parts",
    "--num-shards",
    "num_parts",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Split SOURCE into this many contiguous parts (one per launcher task) ... [--num-shards: the older name]",
)
@click.option(
    "--part-index",
    "--shard-index",
    "part_index",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="... and process this part (e.g. $SLURM_ARRAY_TASK_ID, $JOB_COMPLETION_INDEX).",
)
@click.option("--strict", is_flag=True, help="Stop at the first input that fails (exit 3) instead of listing it.")
@click.option(
    "--min-side",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Images whose shorter side is below this many pixels fail as too_small.",
)
@click.option(
    "--exact-resize",
    is_flag=True,
    help="Decode and resize every image at full size; by default images at least twice the model's "
    "input are JPEG-draft-decoded and box-reduced first (feature cosine 0.999999, see "
    "benchmarks/RESULTS.md). Recorded in the manifest.",
)
@click.option(
    "--decoder",
    type=click.Choice(DECODERS),
    default=None,
    help="pil: Pillow in the decode workers (the exact reference); torch: JPEG batches decoded, resized and "
    "normalised on the runner's device (nvJPEG on CUDA), other files through PIL [default: torch on "
    "cuda/tensorrt devices, pil on the CPU]. Recorded in the manifest.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=0),
    default=None,
    help="Larger images fail as decompression_bomb [default: Pillow's limit, 89,478,485]; 0: no limit.",
)
@compile_option
@click.option("--no-progress", is_flag=True, help="No progress bar (the summary is still printed).")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: decode processes + one runner here; ray: Ray Data (decode tasks, encoder actor pool).",
)
@click.option(
    "--ray-address",
    default=None,
    help="--engine ray: auto, HOST:PORT or ray://HOST:PORT of a running cluster [default: start a local "
    "Ray, or join $RAY_ADDRESS].",
)
@click.option(
    "--actors",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="--engine ray: encoder actors (one runner each).",
)
@click.option(
    "--gpus-per-actor",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="--engine ray: GPUs per encoder actor (1 for --device cuda when not given).",
)
@click.option(
    "--cpus-per-actor",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="--engine ray: CPUs per encoder actor (also its inference threads on --device cpu).",
)
@click.option(
    "--image-column",
    default=None,
    help="Parquet SOURCE: the column of image bytes [default: the first image struct {bytes, path} or binary column].",
)
@click.option(
    "--id-column",
    default=None,
    help="Parquet SOURCE: the column whose value is a row's path in the index [default: FILE#ROW].",
)
def extract(source, bundle_dir, out_dir, no_progress, image_column, id_column, compile_model, **options) -> None:
    """Extract encoder features of every image in SOURCE into sharded .npy files.

    \b
    SOURCE is a directory (searched recursively for jpg jpeg png bmp gif tif tiff webp ppm pgm, any case),
    a glob ('imgs/**/*.jpg', quoted) or a text file with one path per line; WebDataset .tar shards (one,
    a brace list 'shards-{000000..000127}.tar', a glob, a directory or a list of them: row path
    SHARD#KEY.EXT); Parquet files with an image column (one, a directory, a glob: row path FILE#ROW or
    --id-column); or any of these behind s3://, gs://, http(s)://. Every input gets a stable row.
    \b
    OUT gets shard-00000.npy (N x D, or N x (L+1) x D for --pool tokens) with shard-00000.index.jsonl
    ({"row", "path"} per feature row), manifest.json and errors.jsonl ({"row", "path", "reason", "message"}).
    Each shard is written atomically; killed jobs resume from the last finished shard when the same command
    is run again, with a result identical to an uninterrupted run. Read results with
    mae_deploy.open_features(OUT) (or a list / glob of the parts' OUT directories).
    \b
    Exit codes: 0 all inputs succeeded; 4 the job finished but some inputs failed (see errors.jsonl);
    3 bad options, empty source, OUT unwritable, OUT holds another job or is in use by a running one, or
    --strict stopped at a failure. A rerun also checks every finished shard's sha256 and recomputes damaged ones.
    6 --engine ray without Ray installed; 7 a --ray-address, source URL or bucket that cannot be reached.
    \b
    --engine ray writes the same OUT; on a cluster, SOURCE, the bundle and OUT must be on storage that
    every node mounts at the same path.
    """
    from mae_deploy.extract import ExtractOptions, extract_features
    from mae_deploy.sources import list_source

    # The other options are named as ExtractOptions' fields: the command only builds the options object.
    opts = ExtractOptions(
        progress=not no_progress, runner_opts=compile_runner_opts(options["backend"], compile_model), **options
    )
    src = list_source(source, image_column=image_column, id_column=id_column)
    summary = extract_features(src, bundle_dir, out_dir, opts)
    click.echo(str(summary))
    if not summary.ok:
        raise PartialFailure(f"{summary.failed} of {summary.inputs} inputs failed; see {summary.out_dir}/errors.jsonl")


COMMANDS = [extract]
