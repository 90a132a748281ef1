"""`export`: a checkpoint to a bundle (ONNX graphs + mae.json), verified against PyTorch."""

from __future__ import annotations

import click

from mae_deploy.commands.checkpoint import hint_options


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--out", "-o", "out", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option(
    "--image-size",
    type=int,
    default=None,
    help="Input resolution of the graphs; position embeddings are interpolated (bicubic) when it "
    "differs from the checkpoint's. Must be a multiple of the patch size.",
)
@click.option("--opset", type=int, default=20, show_default=True, help="ONNX opset (17 or newer).")
@click.option(
    "--precision",
    "precision",
    default="fp32",
    show_default=True,
    help="Comma-separated: fp32 (always written), fp16 (GPU), int8 (CPU, dynamic quantisation), "
    "int8-qdq (static Q/DQ for TensorRT / OpenVINO; needs --calibration), int8-nncf (static "
    "Q/DQ by NNCF, q @ k^T in int8 too: OpenVINO's int8; needs --calibration and the nncf extra).",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True),
    default=None,
    help="Images to calibrate int8-qdq / int8-nncf on (directory, glob or list file), read through the "
    "bundle's preprocessing; every int8 variant (dynamic int8 too) is then verified on them instead of noise.",
)
@click.option(
    "--calibration-count",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="How many --calibration images to use (evenly spaced over the listing).",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Class names of a classifier checkpoint, one per line in class-index order; overrides the "
    "names the checkpoint records (none: class_0, class_1 ...).",
)
@click.option(
    "--parts",
    default=None,
    help="Comma-separated: encoder, decoder, classifier. Default: every part the checkpoint has "
    "(classifier.onnx for fine-tuned and linear-probe checkpoints).",
)
@click.option("--overwrite", is_flag=True, help="Replace BUNDLE if it exists (only a complete new one replaces it).")
@click.option(
    "--reference-weights",
    "--reference",
    "reference_weights",
    is_flag=True,
    help="Also store the weights as a native checkpoint in BUNDLE/reference/ (for --backend torch).",
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Weights in a side .onnx.data file. Default: only when over ~1.5 GB (ViT-H).",
)
@click.option(
    "--skip-verify",
    is_flag=True,
    hidden=True,
    help="Skip the parity grid (mae.json records it as skipped). For quick tests only.",
)
@hint_options
def export_cmd(
    checkpoint: str,
    out: str,
    image_size: int | None,
    opset: int,
    precision: str,
    calibration: str | None,
    calibration_count: int,
    labels: str | None,
    parts: str | None,
    overwrite: bool,
    reference_weights: bool,
    external_data: bool | None,
    skip_verify: bool,
    num_heads: int | None,
    decoder_num_heads: int | None,
    norm_pix_loss: bool | None,
) -> None:
    """Export CHECKPOINT to a bundle: encoder.onnx (+ decoder.onnx, + classifier.onnx) and mae.json.

    CHECKPOINT is a native checkpoint, an official .pth, a Hugging Face ViTMAE directory or a timm
    state dict. The graphs take the mask as indices (ids_keep, ids_restore) with symbolic `batch` and
    `visible` dims, so one encoder serves feature extraction (all patches) and reconstruction alike.

    \b
    Every graph is checked against PyTorch for batch 1, 3 x visible 1, L/4, L/2, L:
      fp32          max |diff| <= 1e-4          (else exit 5 and nothing is written)
      fp16 / int8   encoder: mean-pooled feature cosine >= 0.999 / 0.99
                    decoder: relative reconstruction error <= 0.01 / 0.1
                    classifier: logit cosine >= 0.999 / 0.99, top-1 agreement 100 % / 90 %
      int8-qdq/nncf as int8, on --calibration images instead of noise (int8 too, when given)
    The bundle is written atomically (temporary directory, then rename).
    """
    import time

    from export.bundle_writer import ExportOptions, export_bundle

    t0 = time.perf_counter()
    options = ExportOptions(
        image_size=image_size,
        opset=opset,
        precisions=precision,
        parts=parts,
        overwrite=overwrite,
        reference_weights=reference_weights,
        external_data=external_data,
        verify=not skip_verify,
        progress=click.echo,
        labels=labels,
        calibration=calibration,
        calibration_count=calibration_count,
        checkpoint_hints={
            "num_heads": num_heads,
            "decoder_num_heads": decoder_num_heads,
            "norm_pix_loss": norm_pix_loss,
        },
    )
    report = export_bundle(checkpoint, out, options)
    click.echo(f"\nwrote {report.bundle}:")
    for rel, size in sorted(report.files.items()):
        click.echo(f"  {rel:<34} {_fmt_bytes(size):>10}")
    click.echo("\nparity against PyTorch fp32:")
    click.echo(report.format_parity())
    cases = report.format_cases()
    if cases:
        click.echo("\nmax |diff| per case (b = batch, v = visible tokens):")
        click.echo(cases)
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"\ndone in {time.perf_counter() - t0:.1f}s")


COMMANDS = [export_cmd]
