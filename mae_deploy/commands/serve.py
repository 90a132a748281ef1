"""`serve`: put a bundle behind an HTTP endpoint (FastAPI + uvicorn, or Ray Serve with --ray)."""

from __future__ import annotations

import click

from mae_deploy.commands.options import compile_option, compile_runner_opts, precision_option
from mae_deploy.names import BACKENDS, DECODERS


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 exposes the server to the network."
)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda[:N] or tensorrt[:N] (ort).")
@precision_option
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Runner CPU threads [default: library's].")
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Most images in one runner call.",
)
@click.option(
    "--max-delay-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Hold a partial batch this long for more company (0: run what is queued at once).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Images waiting for the runner; more are refused with 503 + Retry-After.",
)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=20.0,
    show_default=True,
    help="Larger request bodies are refused with 413.",
)
@click.option("--max-images-per-request", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--max-decode-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=1024.0,
    show_default=True,
    help="Memory for images being decoded at once, estimated from their headers before decoding; a request "
    "beyond it is refused with 503 + Retry-After (413 when it alone exceeds it).",
)
@click.option(
    "--decoder",
    type=click.Choice(DECODERS),
    default=None,
    help="pil: Pillow on the decoding threads (the exact reference); torch: JPEGs decoded, resized and "
    "normalised on the runner's device (nvJPEG on CUDA), other images through PIL [default: torch on "
    "cuda/tensorrt devices, pil on the CPU].",
)
@click.option(
    "--timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="A request not answered within this many seconds gets 504.",
)
@click.option(
    "--api-key-env",
    default=None,
    metavar="VAR",
    help="Require the key held in this environment variable (Authorization: Bearer KEY or X-API-Key).",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files at start.")
@click.option("--ray", "use_ray", is_flag=True, help="Deploy on Ray Serve instead of a local uvicorn server.")
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Ray Serve replicas, each with its own runner and batcher.",
)
@click.option("--ray-address", default=None, help="Ray cluster to join ('auto': the running one) [default: local].")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--cpus-per-replica", type=click.FloatRange(min=0), default=1.0, show_default=True)
@compile_option
def serve(
    bundle,
    host,
    port,
    backend,
    device,
    precision,
    threads,
    max_batch_size,
    max_delay_ms,
    max_queue,
    max_body_mb,
    max_images_per_request,
    max_decode_mb,
    decoder,
    timeout_s,
    api_key_env,
    log_format,
    no_verify,
    use_ray,
    replicas,
    ray_address,
    gpus_per_replica,
    cpus_per_replica,
    compile_model,
) -> None:
    """Serve BUNDLE over HTTP: features, reconstructions and KServe v2 inference, micro-batched.

    \b
    Endpoints: GET /healthz /readyz /metrics /docs /v1/models; POST /v1/features?pool=cls|mean|tokens,
    /v1/reconstruct?mask_ratio=0.75&seed=0[&format=npz]; KServe v2 under /v2 (tritonclient.http works).
    \b
    Examples:
      mae-deploy serve bundle/ --port 8080
      curl -s --data-binary @cat.jpg -H 'Content-Type: image/jpeg' localhost:8080/v1/features?pool=cls
      mae-deploy serve bundle/ --ray --replicas 4 --ray-address auto
    \b
    SIGTERM drains: readiness turns 503, requests in flight are answered, exit 0.
    """
    from mae_deploy.serve.config import ServeConfig

    config = ServeConfig(
        bundle=bundle,
        backend=backend,
        device=device,
        precision=precision,
        threads=threads,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        max_body_mb=max_body_mb,
        max_images_per_request=max_images_per_request,
        max_decode_mb=max_decode_mb,
        decoder=decoder,
        timeout_s=timeout_s,
        api_key_env=api_key_env,
        log_format=log_format,
        verify_bundle=not no_verify,
        runner_opts=compile_runner_opts(backend, compile_model),
    )
    if use_ray:
        from mae_deploy.serve.ray_app import run_on_ray

        run_on_ray(
            config,
            host=host,
            port=port,
            replicas=replicas,
            address=ray_address,
            gpus_per_replica=gpus_per_replica,
            cpus_per_replica=cpus_per_replica,
        )
        return
    from mae_deploy.serve.server import run_server

    run_server(config, host=host, port=port)


COMMANDS = [serve]
