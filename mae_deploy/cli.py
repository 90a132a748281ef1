"""`mae-deploy` command line: a thin layer over the Python API.

Each group of commands lives in ``mae_deploy/commands/<module>.py`` and exposes ``COMMANDS``. Command
modules must stay torch-free at import time (``mae-deploy --help`` never imports torch); commands that
need PyTorch import ``training``/``export`` inside the function body.
"""

from __future__ import annotations

import importlib
import sys

import click

from mae_deploy import __version__
from mae_deploy.errors import MaeDeployError

# Modules under mae_deploy/commands/, each exposing COMMANDS: list[click.Command].
_COMMAND_MODULES = [
    "train",  # data digits, pretrain, finetune, linprobe
    "checkpoint",  # convert, info
    "export",  # export
    "runtime",  # reconstruct
    "bench",  # bench
    "extract",  # extract (batch feature extraction)
    "engine",  # build-engine (TensorRT engines ahead of time)
    "serve",  # serve (HTTP: FastAPI + uvicorn, or Ray Serve)
    "classify",  # classify, eval (a bundle's classifier)
    "triton",  # triton (a Triton Inference Server model repository)
]


# 128 + SIGINT, what shells report for a command stopped by Ctrl-C (1 is reserved for bugs).
EXIT_INTERRUPTED = 130


class _Main(click.Group):
    """Turns MaeDeployError into a one-line message and its documented exit code, Ctrl-C into 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MaeDeployError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.secho(
                "\ninterrupted (Ctrl-C); finished outputs are kept, a rerun resumes where supported", fg="red", err=True
            )
            sys.exit(EXIT_INTERRUPTED)

    def list_commands(self, ctx: click.Context) -> list[str]:
        # Keep the order in which command modules register (workflow order), not alphabetical.
        return list(self.commands)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mae-deploy")
def main() -> None:
    """Masked Autoencoders from PyTorch checkpoints to ONNX Runtime / TensorRT inference.

    \b
    Typical flow:
      mae-deploy convert mae_pretrain_vit_base_full.pth ckpt/   # any checkpoint -> native
      mae-deploy export ckpt/ --out bundle/                      # -> encoder.onnx + decoder.onnx
      mae-deploy reconstruct photo.jpg --bundle bundle/ --out recon/
      mae-deploy extract images/ --bundle bundle/ --out features/

    Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input, 4 some inputs failed,
    5 export verification failed, 6 missing optional package, 7 device/backend unavailable,
    130 interrupted (Ctrl-C).
    """


for _name in _COMMAND_MODULES:
    for _cmd in importlib.import_module(f"mae_deploy.commands.{_name}").COMMANDS:
        main.add_command(_cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
