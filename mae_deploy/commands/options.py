"""Click options that several commands share, defined once."""

from __future__ import annotations

import click

from mae_deploy.errors import InputError
from mae_deploy.names import COMPILING_BACKENDS, RUNTIME_PRECISIONS

precision_option = click.option(
    "--precision",
    type=click.Choice(RUNTIME_PRECISIONS),
    default="fp32",
    show_default=True,
    help="ort / openvino / trt: the bundle's graph variant (fp32, fp16, int8, int8-qdq, int8-nncf; openvino: also "
    "bf16); torch: autocast of the reference weights (fp32, bf16, fp16 on CUDA). A backend refuses what it "
    "does not run, saying what it does.",
)

COMPILE_HELP = (
    "--backend torch: run the model through torch.compile (CUDA graphs on a GPU); --backend openvino: compile "
    "the graph for each input shape (batch, visible) it meets, static shapes being faster (8 most recent "
    "kept). The first batch of each shape compiles (a second to a minute); a fixed batch size and mask "
    "ratio then run faster."
)
compile_option = click.option("--compile", "compile_model", is_flag=True, help=COMPILE_HELP)


def compile_runner_opts(backend: str, compile_model: bool) -> dict:
    """Runner options for ``--compile``: {} when off; an InputError for a backend that does not compile."""
    if not compile_model:
        return {}
    if backend not in COMPILING_BACKENDS:
        raise InputError(
            f"--compile compiles the model for {' or '.join(COMPILING_BACKENDS)}: use it with --backend torch "
            f"or --backend openvino, not {backend}"
        )
    return {"compile": True}
