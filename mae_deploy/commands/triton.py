"""`triton`: write a Triton Inference Server model repository for a bundle."""

from __future__ import annotations

import click

from mae_deploy.errors import InputError


def _int_list(value: str | None, what: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {value!r}") from None


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Model repository directory to write.")
@click.option(
    "--kind",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="Instance kind of the ONNX models (Python preprocessing always runs on CPU).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default="fp32",
    show_default=True,
    help="Graph variant served; with --tensorrt, fp16 is TensorRT's FP16 mode on the fp32 graph.",
)
@click.option("--max-batch-size", type=int, default=64, show_default=True, help="Triton max_batch_size (>= 1).")
@click.option("--instances", type=int, default=1, show_default=True, help="Instances per model.")
@click.option(
    "--preferred-batch-sizes",
    default=None,
    help="Dynamic batcher's preferred sizes, e.g. 8,16,32 [default: those of 8,16,32 <= max batch].",
)
@click.option(
    "--max-queue-delay-us",
    type=int,
    default=500,
    show_default=True,
    help="Longest wait (microseconds) for the dynamic batcher to fill a batch.",
)
@click.option("--tensorrt", is_flag=True, help="Use the onnxruntime backend's TensorRT accelerator (needs --kind gpu).")
@click.option(
    "--pool",
    type=click.Choice(["cls", "mean"]),
    default="cls",
    show_default=True,
    help="Pooling of the mae_features ensemble.",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Class names, one per line, for the classifier (replaces those in mae.json).",
)
@click.option(
    "--models",
    default=None,
    help="Comma-separated subset of encoder,decoder,classifier,features,classify "
    "[default: all the bundle's graphs allow].",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing repository written by mae-deploy.")
def triton(
    bundle_dir,
    out_dir,
    kind,
    precision,
    max_batch_size,
    instances,
    preferred_batch_sizes,
    max_queue_delay_us,
    tensorrt,
    pool,
    labels,
    models,
    overwrite,
) -> None:
    """Write a Triton Inference Server model repository for BUNDLE into --out.

    \b
    Models: mae_encoder, mae_decoder, mae_classifier (ONNX, onnxruntime backend), mae_preprocess and
    mae_pool (Python backend running mae-deploy's own preprocessing and pooling), and the ensembles
    mae_features (image bytes -> pooled features) and mae_classify (image bytes -> logits, with labels).
    The repository is written atomically. Its configs are checked against Triton's schema by mae-deploy's
    tests; mae-deploy has not run them in a live Triton. Triton's Python environment needs mae-deploy installed.
    \b
    Exit codes: 0 written; 3 bad option, a bundle without a graph a model needs, missing class names,
    or --out exists (pass --overwrite).
    """
    from mae_deploy.triton import write_repository
    from mae_deploy.triton.repository import docker_command

    report = write_repository(
        bundle_dir,
        out_dir,
        kind=kind,
        precision=precision,
        max_batch_size=max_batch_size,
        instances=instances,
        preferred_batch_sizes=_int_list(preferred_batch_sizes, "--preferred-batch-sizes"),
        max_queue_delay_us=max_queue_delay_us,
        tensorrt=tensorrt,
        pool=pool,
        labels=labels,
        models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
        overwrite=overwrite,
    )
    click.echo(str(report))
    click.echo(f"serve it (README: 'Deploying on Triton'):\n  {docker_command(report.path, kind == 'gpu')}")


COMMANDS = [triton]
