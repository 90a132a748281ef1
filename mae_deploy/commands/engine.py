"""`build-engine`: TensorRT engines for a bundle, built ahead of time into the engine cache.

Unrun on this project's machines (no GPU, no TensorRT): the CPU tests drive it through a fake TensorRT and
check its error messages; tests/gpu/ builds real engines where TensorRT exists.
"""

from __future__ import annotations

import time

import click


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@click.command("build-engine")
@click.argument("bundle", type=click.Path(exists=True))
@click.option(
    "--max-batch",
    type=int,
    default=32,
    show_default=True,
    help="Largest batch the engine takes (bigger batches run in chunks of this size).",
)
@click.option(
    "--opt-batch", type=int, default=None, help="Batch size TensorRT tunes kernels for. Default: min(8, max batch)."
)
@click.option(
    "--opt-visible",
    default="L",
    show_default=True,
    help="Visible tokens TensorRT tunes for: a number, L (all patches: feature extraction) or "
    "L/4 (mask ratio 0.75: reconstruction).",
)
@click.option("--min-visible", default="1", show_default=True, help="Fewest visible tokens the engine takes.")
@click.option("--max-visible", default="L", show_default=True, help="Most visible tokens the engine takes.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="fp16: TensorRT 10 uses its FP16 flag on the fp32 graph; TensorRT 11 needs the bundle's "
    "fp16 ONNX (export with --precision fp16).",
)
@click.option("--parts", default=None, help="Comma-separated: encoder, decoder. Default: every part the bundle has.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Engine cache directory. Default: ~/.cache/mae-deploy/trt (XDG_CACHE_HOME respected).",
)
@click.option("--workspace-gb", type=float, default=4.0, show_default=True, help="Builder workspace limit (GiB).")
@click.option(
    "--tf32/--no-tf32",
    default=False,
    show_default=True,
    help="Allow TF32 math in fp32 engines (faster on Ampere+, ~1e-3 relative error).",
)
@click.option("--device", default="cuda", show_default=True, help="cuda or cuda:N: the GPU to build for.")
@click.option("--rebuild", is_flag=True, help="Build even when the cache already holds a matching engine.")
def build_engine_cmd(
    bundle: str,
    max_batch: int,
    opt_batch: int | None,
    opt_visible: str,
    min_visible: str,
    max_visible: str,
    precision: str,
    parts: str | None,
    cache_dir: str | None,
    workspace_gb: float,
    tf32: bool,
    device: str,
    rebuild: bool,
) -> None:
    """Build TensorRT engines for BUNDLE ahead of time and print where they are cached.

    One optimization profile covers batch 1..--max-batch and --min-visible..--max-visible visible tokens.
    Later `--backend trt` runs with the same options load these engines in seconds instead of building them.
    Engines are keyed by the graph's sha256, the TensorRT version, the GPU, the profile and the precision,
    so a changed bundle, driver stack or GPU gets a new engine rather than a wrong one.

    \b
    Example:
      mae-deploy build-engine bundle/ --max-batch 64 --opt-batch 32 --precision fp16
      mae-deploy extract images/ --bundle bundle/ --backend trt --device cuda --out feats/
    """
    from mae_deploy.bundle import Bundle
    from mae_deploy.errors import InputError
    from mae_deploy.runners.trt import PARTS, TrtRunner, format_shape

    b = Bundle.load(bundle)
    if parts is None:
        wanted = [p for p in PARTS if p == "encoder" or b.has_decoder]
    else:
        wanted = [p.strip() for p in parts.split(",") if p.strip()]
        bad = [p for p in wanted if p not in PARTS]
        if bad or not wanted:
            raise InputError(f"--parts takes encoder and/or decoder, got {parts!r}")
    runner = TrtRunner(
        b,
        device=device,
        precision=precision,
        max_batch=max_batch,
        opt_batch=opt_batch,
        opt_visible=opt_visible,
        min_visible=min_visible,
        max_visible=max_visible,
        cache_dir=cache_dir,
        workspace_gb=workspace_gb,
        tf32=tf32,
        rebuild=rebuild,
        progress=True,
    )
    info = runner.info.details
    click.echo(f"TensorRT {info['tensorrt']} (API {info['api_generation']}) on {info['gpu']}")
    click.echo(f"profile: {runner.profile.describe()}")
    total = time.perf_counter()
    for part in wanted:
        t0 = time.perf_counter()
        eng = runner.engine(part)
        took = time.perf_counter() - t0
        state = f"built in {eng.build_seconds:.1f}s" if eng.built else f"already cached (found in {took:.2f}s)"
        size = eng.paths.engine.stat().st_size
        click.echo(f"\n{part} ({precision}, from {eng.graph_file}): {state}")
        click.echo(f"  engine  {eng.paths.engine}  ({_fmt_bytes(size)})")
        click.echo(f"  sidecar {eng.paths.sidecar}")
        for name, (lo, opt, hi) in runner.profile.shapes(part).items():
            click.echo(f"  {name:<13} min {format_shape(lo):<14} opt {format_shape(opt):<14} max {format_shape(hi)}")
    click.echo(f"\ndone in {time.perf_counter() - total:.1f}s")
    runner.close()


COMMANDS = [build_engine_cmd]
