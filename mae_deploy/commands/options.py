"""Click options that several commands share, defined once."""

from __future__ import annotations

import click

from mae_deploy.errors import InputError
from mae_deploy.names import RUNTIME_PRECISIONS

precision_option = click.option(
    "--precision",
    type=click.Choice(RUNTIME_PRECISIONS),
    default="fp32",
    show_default=True,
    help="ort / openvino / trt: the bundle's graph variant (fp32, fp16, int8, int8-qdq, int8-nncf; openvino: also "
    "bf16); torch: autocast of the reference weights (fp32, bf16, fp16 on CUDA). A backend refuses what it "
    "does not run, saying what it does.",
)

compile_option = click.option(
    "--compile",
    "compile_model",
    is_flag=True,
    help="--backend torch: run the model through torch.compile (CUDA graphs on a GPU). The first batch of each "
    "shape compiles (seconds to a minute); a fixed batch size and mask ratio then run without launch "
    "overhead.",
)


def compile_runner_opts(backend: str | tuple[str, ...], compile_model: bool) -> dict:
    """Runner options for ``--compile``: {} when off; an InputError when no torch backend would use it."""
    if not compile_model:
        return {}
    backends = (backend,) if isinstance(backend, str) else tuple(backend)
    if "torch" not in backends:
        raise InputError("--compile compiles the PyTorch model: use it with --backend torch")
    return {"compile": True}
