"""The runtime stays torch-free: production images install mae_deploy without PyTorch."""

from __future__ import annotations

import subprocess
import sys

_CHECK = """
import sys
import mae_deploy, mae_deploy.cli
from click.testing import CliRunner
r = CliRunner().invoke(mae_deploy.cli.main, ["--help"])
assert r.exit_code == 0, r.output
for name in mae_deploy.cli.main.commands:
    r = CliRunner().invoke(mae_deploy.cli.main, [name, "--help"])
    assert r.exit_code == 0, (name, r.output)
print("torch" in sys.modules)
"""


def test_import_and_help_do_not_import_torch():
    out = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_help_lists_every_command():
    import mae_deploy.cli

    out = subprocess.run([sys.executable, "-m", "mae_deploy.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in mae_deploy.cli.main.commands:
        assert name in out.stdout
