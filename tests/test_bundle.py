"""Bundle loading: format checks, file presence, sha256 verification, graph lookup, reference weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mae_deploy.bundle import Bundle, GraphSpec, sha256_file, write_manifest
from mae_deploy.errors import BundleError


@pytest.fixture
def copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b"))


def _edit(bundle: Path, **changes) -> None:
    m = json.loads((bundle / "mae.json").read_text())
    m.update(changes)
    (bundle / "mae.json").write_text(json.dumps(m))


def test_load_reads_the_manifest(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    assert (b.name, b.image_size, b.patch_size, b.in_chans, b.embed_dim) == ("mae_vit_test", 32, 8, 3, 32)
    assert (b.num_patches, b.grid_size, b.patch_dim) == (16, 4, 192)
    assert b.has_decoder and not b.norm_pix_loss
    assert b.preprocessing["crop_pct"] == 0.875 and b.preprocessing["image_size"] == 32
    enc = b.graph("encoder")
    assert isinstance(enc, GraphSpec) and enc.input_names == ("pixel_values", "ids_keep")
    assert enc.outputs[0].shape == ("batch", "visible+1", 32)
    assert b.graph_path("decoder") == tiny_bundle / "decoder.onnx"
    assert b.reference_checkpoint() == tiny_bundle / "reference"
    # The manifest lists every file but itself, reference weights included.
    assert set(b.manifest["files"]) == {
        "encoder.onnx",
        "decoder.onnx",
        "reference/config.json",
        "reference/model.safetensors",
    }
    assert Bundle.load(tiny_bundle / "mae.json").path == tiny_bundle  # the manifest path works too


def test_tampered_file_fails_the_hash_check(copy):
    data = bytearray((copy / "encoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="bundle file encoder.onnx is corrupt or was modified: sha256"):
        Bundle.load(copy)
    Bundle.load(copy, verify=False)  # skipping verification only checks presence


def test_tampered_reference_weights_fail_too(copy):
    with open(copy / "reference" / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="reference/model.safetensors is corrupt"):
        Bundle.load(copy)


def test_missing_file(copy):
    (copy / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="is missing decoder.onnx; copy the whole bundle directory"):
        Bundle.load(copy, verify=False)


def test_format_and_version_checks(copy, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="is not a bundle: it has no mae.json"):
        Bundle.load(tmp_path / "empty")
    _edit(copy, format_version=2)
    with pytest.raises(BundleError, match="format_version 2, newer than this mae-deploy reads .1.; upgrade"):
        Bundle.load(copy)
    _edit(copy, format_version=1, format="something-else")
    with pytest.raises(BundleError, match="is not a mae-deploy bundle manifest"):
        Bundle.load(copy)
    (copy / "mae.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read .*mae.json"):
        Bundle.load(copy)


def test_manifest_paths_must_stay_inside_the_bundle(copy):
    m = json.loads((copy / "mae.json").read_text())
    m["graphs"][0]["file"] = "../elsewhere/encoder.onnx"
    (copy / "mae.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="'../elsewhere/encoder.onnx', which is not a path inside the bundle"):
        Bundle.load(copy)


def test_graph_lookup_lists_what_exists(tiny_bundle, encoder_only_bundle):
    b = Bundle.load(tiny_bundle)
    with pytest.raises(BundleError, match="no encoder graph at precision int8; it has: encoder fp32, decoder fp32"):
        b.graph("encoder", "int8")
    e = Bundle.load(encoder_only_bundle)
    assert not e.has_decoder
    with pytest.raises(BundleError, match="has no decoder .*encoder-only.*export a \\*_full or mae_visualize_"):
        e.graph("decoder")


def test_reference_checkpoint_fallbacks(copy, tmp_path):
    shutil.move(copy / "reference", tmp_path / "ref")
    m = json.loads((copy / "mae.json").read_text())
    m["source"] = {"checkpoint": str(tmp_path / "ref")}
    write_manifest(copy, m)
    b = Bundle.load(copy)
    assert b.reference_checkpoint() == tmp_path / "ref"
    shutil.rmtree(tmp_path / "ref")
    with pytest.raises(BundleError, match="no reference weights .* re-export with reference weights"):
        b.reference_checkpoint()


def test_write_manifest_hashes_every_file_and_checks_the_manifest(copy):
    m = json.loads((copy / "mae.json").read_text())
    (copy / "notes.txt").write_text("hello")
    (copy / ".tmp-partial").write_text("ignored")
    path = write_manifest(copy, m)
    files = json.loads(path.read_text())["files"]
    assert files["notes.txt"] == sha256_file(copy / "notes.txt")
    assert ".tmp-partial" not in files and "mae.json" not in files
    assert not [p for p in copy.iterdir() if p.name.startswith(".mae.json")]  # no temp file left
    bad = dict(m, preprocessing={**m["preprocessing"], "image_size": 64})
    with pytest.raises(BundleError, match="preprocessing.image_size 64 differs from the graph's input size 32"):
        write_manifest(copy, bad)
    bad = dict(m, graphs=[{"part": "head", "file": "encoder.onnx"}])
    with pytest.raises(BundleError, match="graphs\\[0\\] has part 'head'"):
        write_manifest(copy, bad)


def test_sha256_file_reads_in_chunks(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_size=1000) == hashlib.sha256(data).hexdigest()
