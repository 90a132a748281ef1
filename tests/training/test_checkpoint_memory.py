"""Loading a .pth keeps one copy of the weights (issue #24 item 6): the model's parameters are the file's
memory-mapped pages, not a heap copy beside a second one in the returned checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoints import load_model, save_official
from training.model import create_model


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.fixture(scope="module")
def model_and_pth(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("mae_vit_test").eval()
    return model, save_official(model, tmp_path_factory.mktemp("ckpt") / "mae_test.pth").resolve()


def test_the_parameters_are_the_mapped_file_not_a_copy(model_and_pth):
    model, pth = model_and_pth
    loaded, ckpt = load_model(pth)
    ranges = _mapped_ranges(pth)
    assert ranges, f"{pth} is not memory-mapped"
    for name, p in loaded.named_parameters():
        ptr = p.untyped_storage().data_ptr()
        assert any(a <= ptr < b for a, b in ranges), f"{name} was copied out of the mapped file"
        assert ptr == ckpt.state_dict[name].untyped_storage().data_ptr()  # one copy, shared with the checkpoint
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert loaded.pos_embed.requires_grad is False and loaded.blocks[0].attn.qkv.weight.requires_grad is True
    x = torch.randn(2, 3, 32, 32)
    ids = torch.arange(loaded.config.num_patches).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_encoder(x, ids), model.forward_encoder(x, ids), rtol=0, atol=0)


def test_writing_to_a_parameter_leaves_the_file_alone(model_and_pth):
    _, pth = model_and_pth
    before = pth.read_bytes()
    loaded, _ = load_model(pth)
    with torch.no_grad():
        loaded.pos_embed.add_(1.0)  # copy-on-write pages: the checkpoint on disk must not change
    assert pth.read_bytes() == before


def test_legacy_and_half_precision_files_still_load(model_and_pth, tmp_path):
    model, _ = model_and_pth
    legacy = tmp_path / "legacy.pth"  # the pre-zip format cannot be memory-mapped: read whole instead
    torch.save({"model": model.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    half = tmp_path / "half.pth"
    torch.save({"model": {k: v.half() for k, v in model.state_dict().items()}}, half)
    for path, atol in ((legacy, 0.0), (half, 1e-2)):
        loaded, _ = load_model(path)
        for k, v in loaded.state_dict().items():
            assert v.dtype == torch.float32
            torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=atol)
