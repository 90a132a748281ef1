"""``--compile``: compiled pretraining follows the eager run step by step, and its checkpoints are the eager
layout (resume across compiled and eager runs, identical native model)."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mae_deploy.errors import InputError
from training import loop, pretrain
from training.checkpoints import load_model, save_native
from training.compiled import compile_note, eager_module, plain_state_dict, resolve_compile_mode
from training.data import write_digits_imagefolder
from training.model import create_model

ROOT = Path(__file__).resolve().parents[2]
# The digits demo's model and recipe (scripts/demo.py), on a smaller set: 80 train images, 5 steps/epoch.
DEMO = [
    "--model",
    "mae_vit_tiny_patch4",
    "--in_chans",
    "1",
    "--input_size",
    "32",
    "--norm_pix_loss",
    "--mask_ratio",
    "0.75",
    "--batch_size",
    "16",
    "--blr",
    "2e-3",
    "--warmup_epochs",
    "1",
    "--num_workers",
    "0",
    "--device",
    "cpu",
    "--save_freq",
    "1",
]


@pytest.fixture(scope="module")
def demo_digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "d"
    write_digits_imagefolder(root, size=32, per_class=10)
    return root


def _pretrain(digits: Path, out: Path, epochs: int, *extra: str, monkeypatch) -> list[float]:
    """Run pretraining; returns the loss of every step (as the epoch loop saw it)."""
    seen: list[float] = []

    def record(value: float, _device) -> float:
        seen.append(value)
        return value

    monkeypatch.setattr(loop, "all_reduce_mean", record)
    args = pretrain.get_args_parser().parse_args(
        [*DEMO, "--epochs", str(epochs), "--data_path", str(digits), "--output_dir", str(out), *extra]
    )
    pretrain.main(args)
    return seen


def _epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # one cold inductor compile on the CPU (~40 s on 2 cores): scheduled among the long files
def test_compiled_pretraining_follows_eager_and_writes_eager_checkpoints(demo_digits, tmp_path, monkeypatch, capsys):
    eager_out, compiled_out = tmp_path / "eager", tmp_path / "compiled"
    eager = _pretrain(demo_digits, eager_out, 2, monkeypatch=monkeypatch)
    compiled = _pretrain(demo_digits, compiled_out, 2, "--compile", monkeypatch=monkeypatch)
    assert "compiled (default)" in capsys.readouterr().out  # CPU: no CUDA graphs
    assert len(eager) == len(compiled) == 10
    # Same seed, same masks (drawn outside the compiled model): only kernel rounding differs.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3, atol=0.0)
    assert eager[-1] < eager[0]  # the steps really train

    # The compiled run's checkpoints are the eager layout.
    state_e = torch.load(eager_out / "checkpoint-last.pth", weights_only=True)
    state_c = torch.load(compiled_out / "checkpoint-1.pth", weights_only=True)
    assert not [k for k in state_c["model"] if "_orig_mod" in k or k.startswith("module.")]
    assert list(state_c["model"]) == list(state_e["model"])
    assert state_c["optimizer"]["param_groups"][1]["params"] == state_e["optimizer"]["param_groups"][1]["params"]
    model_c, ckpt = load_model(compiled_out / "model")
    assert ckpt.format == "native" and ckpt.config.norm_pix_loss and ckpt.config.in_chans == 1
    assert set(model_c.state_dict()) == set(load_model(eager_out / "model")[0].state_dict())

    # --resume auto across kinds: the eager run continues compiled and the compiled one eager.
    to_compiled = _pretrain(demo_digits, eager_out, 3, "--resume", "auto", "--compile", monkeypatch=monkeypatch)
    to_eager = _pretrain(demo_digits, compiled_out, 3, "--resume", "auto", monkeypatch=monkeypatch)
    assert _epochs(eager_out) == _epochs(compiled_out) == [0, 1, 2]
    assert len(to_compiled) == len(to_eager) == 5
    torch.testing.assert_close(torch.tensor(to_compiled), torch.tensor(to_eager), rtol=1e-3, atol=0.0)


def test_native_model_of_a_compiled_module_is_the_eager_one(tmp_path):
    torch.manual_seed(0)
    model = create_model("mae_vit_test")
    compiled = torch.compile(model)  # compiles lazily, on the first call: nothing is compiled here
    model.blocks[0] = torch.compile(model.blocks[0])  # a block compiled on its own adds `_orig_mod.` inside keys
    assert "blocks.0._orig_mod.attn.qkv.weight" in model.state_dict()
    plain = plain_state_dict(compiled)
    assert eager_module(compiled) is model and "blocks.0.attn.qkv.weight" in plain
    assert not [k for k in plain if "_orig_mod" in k]
    reference = create_model("mae_vit_test")
    reference.load_state_dict(plain)
    save_native(reference, tmp_path / "from_compiled")
    model.blocks[0] = model.blocks[0]._orig_mod
    save_native(model, tmp_path / "eager")
    for name in ("config.json", "model.safetensors"):
        assert filecmp.cmp(tmp_path / "from_compiled" / name, tmp_path / "eager" / name, shallow=False), name
    assert compile_note(compiled) == ", compiled (default)" and compile_note(model) == ""


def test_compile_mode_auto_uses_cuda_graphs_only_where_shapes_and_buffers_repeat():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_compile_mode("auto", cuda, distributed=False, accum_iter=1) == "reduce-overhead"
    assert resolve_compile_mode("auto", cuda, distributed=True, accum_iter=1) == "default"
    assert resolve_compile_mode("auto", cuda, distributed=False, accum_iter=4) == "default"
    assert resolve_compile_mode("auto", cpu, distributed=False, accum_iter=1) == "default"
    assert resolve_compile_mode("max-autotune", cpu, distributed=True, accum_iter=4) == "max-autotune"
    with pytest.raises(InputError, match="--compile_mode 'fast'"):
        resolve_compile_mode("fast", cpu, distributed=False, accum_iter=1)


def test_auto_precision_is_bf16_on_gpus_that_have_it(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loop.resolve_precision("auto", cuda) == "bf16"
    assert loop.make_scaler("bf16", cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert loop.resolve_precision("auto", cuda) == "fp16"  # pre-Ampere: the official fp16 + grad scaler
    assert loop.resolve_precision("fp16", cuda) == "fp16"
    assert loop.resolve_precision("auto", torch.device("cpu")) == "fp32"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_pretrain_gpu", ROOT / "benchmarks" / "bench_pretrain_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_pretrain_benchmark_smoke_run_on_cpu(tmp_path):
    bench = _load_bench()
    report = bench.main(
        [
            "--device",
            "cpu",
            "--models",
            "tiny",
            "--decoder-depths",
            "2",
            "1",
            "--modes",
            "eager",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--budget-s",
            "0",
            "--profile",
            str(tmp_path / "prof"),
            "--json",
            str(tmp_path / "r.json"),
            "--loader-images",
            "24",
            "--loader-workers",
            "0",
            "--loader-size",
            "32",
            "--markdown",
            str(tmp_path / "r.md"),
        ]
    )
    assert json.loads((tmp_path / "r.json").read_text())["configs"][0]["decoder_depth"] == 2
    (config,) = report["configs"]  # --budget-s 0: the first configuration runs, the next is skipped
    assert report["skipped"] == ["tiny (test) decoder 1 (would end near " + report["skipped"][0].split("near ")[1]]
    rows = {r["variant"]: r for r in config["rows"]}
    assert set(rows) == {"MAE eager", "[M] eager"}
    # The [M] encoder sees all 16 tokens instead of 4: more work per step, counted, not assumed.
    assert rows["[M] eager"]["gflop_per_step"] > 1.3 * rows["MAE eager"]["gflop_per_step"] > 0
    assert config["ratio_eager"] == pytest.approx(rows["[M] eager"]["ms_per_step"] / rows["MAE eager"]["ms_per_step"])
    assert config["paper_table2"] is None and bench.PAPER_TABLE2[("large", 8)] == 2.8
    for r in rows.values():
        assert sum(r["profile"]["share"].values()) == pytest.approx(1.0) and r["profile"]["launches_per_step"] > 0
    assert sorted(p.name for p in (tmp_path / "prof" / "tiny_dec2").iterdir()) == ["MAE_eager.txt", "mtok_eager.txt"]
    loader = report["loader"]
    assert loader["images"] == 24 and min(loader["images_per_s"].values()) > 0
    text = (tmp_path / "r.md").read_text()
    assert "| tiny (test), dec 2, 8 | MAE eager |" in text and "paper Table 2" in text and "skipped" in text
    assert "decoded on the device (--gpu_decode" in text
