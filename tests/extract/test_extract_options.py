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


def test_parts_written_before_the_rename_still_open_and_resume(tmp_path, tiny_bundle):
    """Manifests that say num_shards / shard_index (the source split's older name) are read as num_parts /
    part_index: open_features orders them, and rerunning the same job resumes instead of refusing."""
    import json

    import numpy as np
    from PIL import Image

    from mae_deploy.extract import open_features

    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src / f"{i}.png")
    dirs = [tmp_path / f"part-{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        extract_features(src, tiny_bundle, d, num_parts=2, part_index=i, workers=0, progress=False)
        m = json.loads((d / "manifest.json").read_text())
        m["settings"]["num_shards"] = m["settings"].pop("num_parts")
        m["settings"]["shard_index"] = m["settings"].pop("part_index")
        (d / "manifest.json").write_text(json.dumps(m))
    feats = open_features(dirs[::-1])
    assert [p.rsplit("/", 1)[-1] for p in feats.paths] == [f"{i}.png" for i in range(6)]
    again = extract_features(src, tiny_bundle, dirs[1], num_parts=2, part_index=1, workers=0, progress=False)
    assert again.inputs == 3
