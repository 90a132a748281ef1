"""`bench`: latency per backend, precision, part, batch size and visible-token count (mae_deploy.bench)."""

from __future__ import annotations

from pathlib import Path

import click

from mae_deploy.bench import BACKENDS, PARTS, PRECISIONS
from mae_deploy.commands.options import COMPILE_HELP
from mae_deploy.names import COMPILING_BACKENDS


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("empty list; give comma-separated values")
    return items


def _names(ctx, param, value):
    return tuple(_split(value)) if value is not None else None


def compiled_backends(value: str | None, backends) -> tuple[str, ...]:
    """--compile's backends: none, every compiling backend of the run ("all"), or the ones listed."""
    if value is None:
        return ()
    if value == "all":
        chosen = tuple(b for b in backends if b in COMPILING_BACKENDS)
        if not chosen:
            raise click.UsageError(
                f"--compile compiles the {' and '.join(COMPILING_BACKENDS)} backends, and this run has neither"
            )
        return chosen
    return tuple(_split(value) or ())


def _ints(ctx, param, value):
    items = _split(value)
    if items is None:
        return None
    try:
        return tuple(int(v) for v in items)
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from e


def _floats(ctx, param, value):
    items = _split(value)
    if items is None:
        return None
    try:
        return tuple(float(v) for v in items)
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from e


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--backends",
    default="ort",
    show_default=True,
    callback=_names,
    help=f"Comma-separated backends: {', '.join(BACKENDS)}. One whose package or device is missing "
    "here becomes skipped rows.",
)
@click.option(
    "--precisions",
    default="fp32",
    show_default=True,
    callback=_names,
    help=f"Comma-separated precisions: {', '.join(PRECISIONS)} (variants the bundle lacks are skipped).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--parts",
    default="encoder",
    show_default=True,
    callback=_names,
    help=f"Comma-separated parts: {', '.join(PARTS)} (reconstruct = encode + decode).",
)
@click.option("--batch-sizes", default="1", show_default=True, callback=_ints, help="Comma-separated batch sizes.")
@click.option(
    "--visible",
    default=None,
    callback=_ints,
    help="Comma-separated visible-token counts (1..L). Default: all tokens and 25 % (mask ratio 0.75).",
)
@click.option(
    "--mask-ratios",
    default=None,
    callback=_floats,
    help="Comma-separated mask ratios instead of --visible; K = int(L * (1 - ratio)).",
)
@click.option("--warmup", default=3, show_default=True, type=int, help="Warm-up calls per row, excluded.")
@click.option("--iters", default=None, type=int, help="Timed calls per row (default 20).")
@click.option("--duration", default=None, type=float, help="Seconds per row instead of --iters.")
@click.option(
    "--threads",
    default=None,
    type=int,
    help="CPU threads, pinned and recorded (ORT intra-op, torch). Default: the physical cores available.",
)
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(exists=True),
    help="Weights for the torch backend and the torch fp32 reference (default: the bundle's reference/).",
)
@click.option(
    "--reference/--no-reference",
    default=True,
    show_default=True,
    help="Check every row's output against torch fp32 (or ORT fp32 when no weights are at hand).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random inputs and masks (>= 0).")
@click.option(
    "--images",
    default=None,
    help="Feed these images instead of seeded noise: a folder, glob or list file (what `extract` takes), "
    "preprocessed as the bundle says, in the listing's order (sorted for a folder or glob) and cycled to fill "
    "each batch. int8 variants are calibrated on real images: judge their agreement on real images too.",
)
@click.option(
    "--peak/--no-peak",
    default=True,
    show_default=True,
    help="Probe each backend's MatMul peak per precision (the best of several GEMM shapes, the bundle's "
    "own first; 1-3.5 s each) and show each row's share of it.",
)
@click.option("--out", "out_json", default=None, type=click.Path(path_type=Path), help="Results JSON.")
@click.option("--csv", "out_csv", default=None, type=click.Path(path_type=Path), help="Results CSV.")
@click.option("--markdown", "out_md", default=None, type=click.Path(path_type=Path), help="Results Markdown table.")
@click.option(
    "--plot",
    "out_png",
    default=None,
    type=click.Path(path_type=Path),
    help="PNG: latency vs batch and encoder latency vs visible tokens (needs mae-deploy[plot]).",
)
@click.option(
    "--compare",
    "compare_path",
    default=None,
    type=click.Path(path_type=Path),
    help="An earlier results JSON: print per-row latency and throughput ratios against it.",
)
@click.option(
    "--compile",
    "compile_model",
    is_flag=False,
    flag_value="all",
    default=None,
    metavar="[BACKENDS]",
    help=COMPILE_HELP + " Alone: every backend of the run that compiles; with a list (--compile openvino): those "
    "only, so the others run as they are (e.g. PyTorch eager beside a compiled OpenVINO).",
)
@click.option("--quiet", is_flag=True, help="No progress bar and no table (files are still written).")
def bench(
    bundle: Path,
    backends,
    precisions,
    device,
    parts,
    batch_sizes,
    visible,
    mask_ratios,
    warmup,
    iters,
    duration,
    threads,
    checkpoint,
    reference,
    seed,
    images,
    peak,
    out_json,
    out_csv,
    out_md,
    out_png,
    compare_path,
    compile_model,
    quiet,
) -> None:
    """Measure latency for every backend x precision x part x batch size x visible-token count.

    \b
    Each row: latency p50/p90/p99/mean/min/max (ms, warm-up excluded), images/s, GFLOP/s (GOP/s for
    int8) and its share of the same engine's MatMul peak probed in this run ("87 % of this machine's
    fp32 peak"), peak host RSS, peak device memory (torch on CUDA), runner build time (separate from
    inference), and agreement with the torch fp32 reference (max abs diff, lowest per-image cosine, and
    for encoder rows the lowest cosine of the mean-pooled features) so a fast wrong backend cannot look
    good. Inputs are seeded noise, or real images with --images. The JSON format is docs/bench-schema.md.

    \b
    Examples:
      mae-deploy bench bundle/ --backends torch,ort --precisions fp32,int8 --batch-sizes 1,8 --out r.json
      mae-deploy bench bundle/ --parts encoder --visible 49,98,147,196 --plot enc.png
      mae-deploy bench bundle/ --compare r.json          # ratios against an earlier run
      mae-deploy bench bundle/ --precisions fp32,int8 --images val/  # agreement on real images

    Exit codes: 3 bad input (unknown backend, visible > L, batch 0, seed < 0, a graph that cannot be
    loaded, an unreadable --checkpoint, an --images source with no readable image, an output path that
    cannot be written: all found before the run), 4 some rows failed, 6 --plot without matplotlib, 7 no
    row could run here (all skipped).
    """
    from mae_deploy.bench import (
        BenchConfig,
        check_outputs,
        compare_results,
        format_compare,
        format_summary,
        load_results,
        run_benchmark,
        write_outputs,
    )
    from mae_deploy.errors import DeviceUnavailable, MissingDependency, PartialFailure

    if visible is not None and mask_ratios is not None:
        raise click.UsageError("give --visible or --mask-ratios, not both")
    if iters is not None and duration is not None:
        raise click.UsageError("give --iters or --duration, not both")
    config = BenchConfig(
        backends=backends,
        precisions=precisions,
        device=device,
        parts=parts,
        batch_sizes=batch_sizes,
        visible=visible,
        mask_ratios=mask_ratios,
        warmup=warmup,
        iters=iters,
        duration=duration,
        threads=threads,
        checkpoint=checkpoint,
        reference=reference,
        seed=seed,
        images=images,
        peak=peak,
        compile=compiled_backends(compile_model, backends or BACKENDS),
    )
    config.validate()
    # Fail before the (possibly long) run, not after it.
    check_outputs(**{"--out": out_json, "--csv": out_csv, "--markdown": out_md, "--plot": out_png})
    old = load_results(compare_path) if compare_path else None
    if out_png:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise MissingDependency("matplotlib", "bench --plot", "pip install 'mae-deploy[plot]'") from e

    results = run_benchmark(bundle, config, progress=not quiet)
    written = write_outputs(
        results, out_json and str(out_json), out_csv and str(out_csv), out_md and str(out_md), out_png and str(out_png)
    )
    if not quiet:
        click.echo(format_summary(results))
        for path in written:
            click.echo(f"wrote {path}")
    if old is not None:
        click.echo(format_compare(compare_results(results, old), str(compare_path)))

    rows = results["rows"]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        first = failed[0]
        raise PartialFailure(
            f"{len(failed)} of {len(rows)} rows failed, e.g. {first['backend']} {first['precision']} {first['part']} "
            f"batch {first['batch']} visible {first['visible']}: {first['reason']}"
        )
    if rows and all(r["status"] == "skipped" for r in rows):
        reasons = sorted({r["reason"] for r in rows})
        raise DeviceUnavailable(f"no row could run here: {'; '.join(reasons)}")


COMMANDS = [bench]
