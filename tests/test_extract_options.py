"""extract_features takes one ExtractOptions (what the CLI builds); keywords override its fields."""

from __future__ import annotations

import pytest

from mae_deploy.errors import InputError
from mae_deploy.extract import ExtractOptions, extract_features


def test_keywords_override_the_options_object():
    o = ExtractOptions(backend="torch", pool="mean")
    u = o.updated(pool="tokens", runner_opts=None)
    assert (u.backend, u.pool, u.runner_opts) == ("torch", "tokens", {}) and o.pool == "mean"


def test_an_unknown_option_is_named(tmp_path):
    with pytest.raises(InputError, match="no option bacth_size; it takes: .*batch_size"):
        extract_features(tmp_path, tmp_path, tmp_path / "out", bacth_size=8)


def test_every_cli_option_of_extract_is_an_options_field():
    """The command passes its options through by name: a new click option needs a field of the same name."""
    from dataclasses import fields

    from mae_deploy.commands.extract import extract

    own = {"source", "bundle_dir", "out_dir", "no_progress", "image_column", "id_column", "compile_model"}
    names = {p.name for p in extract.params} - own
    assert names <= {f.name for f in fields(ExtractOptions)}


def test_export_bundle_takes_one_options_object_too(tmp_path):
    from export.bundle_writer import ExportOptions, export_bundle

    o = ExportOptions(precisions="fp32,fp16", verify=False)
    assert o.updated(verify=True).verify and not o.verify
    with pytest.raises(InputError, match="export_bundle has no option precision; it takes: .*precisions"):
        export_bundle("missing.pth", tmp_path / "b", o, precision="fp16")
