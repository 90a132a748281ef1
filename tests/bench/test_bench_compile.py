"""``bench --compile [BACKENDS]``: which runners compile, checked before the run."""

from __future__ import annotations

import click
import pytest

from mae_deploy.bench import BenchConfig
from mae_deploy.bench.build import runner_options
from mae_deploy.commands.bench import compiled_backends
from mae_deploy.errors import InputError


def test_compile_alone_means_every_compiling_backend_of_the_run():
    assert compiled_backends(None, ("torch", "openvino")) == ()
    assert compiled_backends("all", ("ort", "torch", "openvino")) == ("torch", "openvino")
    assert compiled_backends("openvino", ("torch", "openvino")) == ("openvino",)  # torch stays eager
    with pytest.raises(click.UsageError, match="this run has neither"):
        compiled_backends("all", ("ort",))


@pytest.mark.parametrize("compile_, backends", [(("openvino",), ("ort", "torch")), (("ort",), ("ort",))])
def test_a_backend_that_does_not_compile_or_does_not_run_is_refused(compile_, backends):
    with pytest.raises(InputError, match=f"--compile {compile_[0]}: only the run's torch and openvino"):
        BenchConfig(backends=backends, compile=compile_).validate()


def test_openvino_and_torch_runners_get_the_compile_option():
    assert runner_options("openvino", 2, None, 8, True) == {"threads": 2, "compile": True}
    assert runner_options("openvino", 2, None, 8, False) == {"threads": 2}
    assert runner_options("torch", 2, None, 8, True)["compile"] is True
    assert "compile" not in runner_options("ort", 2, None, 8, True)
