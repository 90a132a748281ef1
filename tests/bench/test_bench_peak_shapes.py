"""The peak is the best of several GEMM shapes, the model's own first (issue #25 item 2); int8 rows name their ISA."""

from __future__ import annotations

import copy

import pytest
import torch

from mae_deploy.bench import BenchConfig, format_summary, markdown_table, run_benchmark, validate_results
from mae_deploy.bench.peak import SHAPE_KEYS, compute, model_shapes, probe_name, probe_peak, probe_shapes
from mae_deploy.bench.run import row_isa
from mae_deploy.errors import InputError

VIT_B = {
    "img_size": 224,
    "patch_size": 16,
    "in_chans": 3,
    "embed_dim": 768,
    "depth": 12,
    "mlp_ratio": 4.0,
    "decoder_embed_dim": 512,
    "decoder_depth": 8,
}


def _mkn(shapes: list[dict]) -> dict[str, tuple[int, int, int]]:
    return {s["what"]: (s["m"], s["k"], s["n"]) for s in shapes}


def test_vit_b_own_shapes_at_batch_8():
    enc = _mkn(model_shapes(VIT_B, batch=8, visible=196))
    assert enc == {
        "encoder qkv": (1576, 768, 2304),
        "encoder proj": (1576, 768, 768),
        "encoder fc1": (1576, 768, 3072),
        "encoder fc2": (1576, 3072, 768),
        "patch embedding": (1568, 768, 768),
    }
    both = _mkn(model_shapes(VIT_B, batch=8, visible=49, decoder=True))
    assert both["encoder qkv"] == (400, 768, 2304)  # 8 x (49 + 1) tokens
    assert both["decoder fc1"] == (1576, 512, 2048)  # the decoder always sees L + 1 tokens
    shapes = probe_shapes("cpu", model_shapes(VIT_B, batch=8, visible=196))
    assert [s["what"] for s in shapes[-2:]] == ["generic", "generic"]  # the model's own come first
    assert len({(s["m"], s["k"], s["n"]) for s in shapes}) == len(shapes)
    assert probe_shapes("cpu", [{"m": 1024, "k": 1024, "n": 1024, "what": "x"}])[0]["what"] == "x"  # no duplicate
    with pytest.raises(InputError, match="lacks"):
        model_shapes({"img_size": 224}, 1, 1)


def test_peak_is_the_best_shape_and_every_shape_is_recorded():
    own = model_shapes({"img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 32, "depth": 2}, 2, 16)
    p = probe_peak("ort", "fp32", "cpu", threads=1, shapes=own, seconds=0.05)
    assert p["status"] == "ok", p["reason"]
    ran = [s for s in p["shapes"] if s["status"] == "ok"]
    assert [s["what"] for s in p["shapes"][:5]] == [s["what"] for s in own]
    assert all(list(s) == list(SHAPE_KEYS) for s in p["shapes"])
    assert all(s["rate"] > 0 and s["calls"] >= 3 for s in ran)
    best = max(ran, key=lambda s: s["rate"])
    assert p["peak"] == best["rate"] and p["shape"] == [best["m"], best["k"], best["n"]]
    assert p["size"] == (best["m"] if best["m"] == best["k"] == best["n"] else None)
    assert p["calls"] == sum(s["calls"] for s in ran)
    assert f"{best['m']}" in probe_name(p)


def test_the_budget_skips_shapes_that_would_not_fit():
    shapes = [{"m": 64, "k": 64, "n": 64, "what": "small"}, {"m": 512, "k": 512, "n": 512, "what": "big"}]
    p = probe_peak("ort", "fp32", "cpu", threads=1, shapes=shapes, seconds=0.01, budget_s=0.0)
    assert p["status"] == "ok" and p["budget_s"] == 0.0
    statuses = {s["what"]: s["status"] for s in p["shapes"]}
    assert statuses["small"] == "ok"  # the first shape always runs
    assert statuses["big"].startswith("skipped: over the probe's 0 s budget")
    assert p["shape"] == [64, 64, 64] and p["size"] == 64
    assert all(s["rate"] is None for s in p["shapes"] if s["status"] != "ok")


def test_a_share_above_the_peak_is_kept_and_said():
    probe = {
        "backend": "openvino",
        "precision": "int8",
        "op": "Q/DQ MatMul",
        "size": None,
        "status": "ok",
        "peak": 100.0,
        "shape": [1576, 768, 3072],
        "shapes": [{"m": 1576, "k": 768, "n": 3072, "what": "encoder fc1"}],
    }
    c = compute(2 * 10**9, 10.0, probe, "int8")  # 200 GOP/s against a 100 GOP/s peak
    assert c["fraction_of_peak"] == pytest.approx(2.0)
    assert "above the probed peak (200 %)" in c["note"]
    assert c["peak_probe"] == "openvino int8 Q/DQ MatMul 1576x768x3072 (encoder fc1)"
    assert compute(10**9, 10.0, probe, "int8")["note"] is None


def test_int8_rows_name_their_isa():
    from mae_deploy.bench.machine import cpu_model_and_flags, int8_isa

    isa = int8_isa(cpu_model_and_flags()[1])
    assert row_isa("int8", "cpu") == row_isa("int8-nncf", "cpu") == row_isa("int8-qdq", "cpu") == isa
    assert row_isa("fp32", "cpu") is None and row_isa("bf16", "cpu") is None
    assert row_isa("int8", "cuda") is None


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """ort fp32 + int8 on mae_vit_test (L=16), encoder, batch 2: a short real run."""
    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("peak_shapes") / "bundle"
    export_bundle(
        create_model("mae_vit_test").eval(),
        out,
        parts="encoder",
        precisions=("fp32", "int8"),
        verify=False,
        progress=None,
    )
    return run_benchmark(
        out,
        BenchConfig(
            backends=("ort",),
            precisions=("fp32", "int8"),
            batch_sizes=(2,),
            visible=(16, 4),
            iters=2,
            warmup=0,
            threads=1,
            reference=False,
        ),
        progress=False,
    )


def test_a_run_probes_its_own_shapes_and_labels_int8_rows(results):
    validate_results(results)
    assert results["schema_version"] >= 3  # 3 added shapes and int8_isa, which validate_results then requires
    for p in results["peaks"]:
        assert p["status"] == "ok"
        mkn = _mkn(p["shapes"])
        assert mkn["encoder qkv"] == (2 * 17, 32, 96)  # the largest batch and visible count of the run
        assert mkn["encoder fc2"] == (2 * 17, 128, 32)
        assert p["peak"] == max(s["rate"] for s in p["shapes"] if s["status"] == "ok")
    isa = results["machine"]["int8_isa"]
    for r in results["rows"]:
        assert r["status"] == "ok"
        assert r["int8_isa"] == (isa if r["precision"] == "int8" else None)
        assert r["compute"]["peak_probe"].startswith(f"ort {r['precision']} ")
        if r["compute"]["fraction_of_peak"] > 1:  # never hidden: the row says so
            assert "above the probed peak" in r["compute"]["note"]
    md = markdown_table(results)
    assert f"| ort | int8 | {isa} | encoder |" in md and "| ort | fp32 | - | encoder |" in md
    assert "Peak probes" in md and "encoder qkv" in md and "**" in md
    console = format_summary(results)
    int8_lines = [x for x in console.splitlines() if x.startswith("ort      int8")]
    assert int8_lines and all(x.endswith(f"| {isa}") for x in int8_lines)
    assert f"ort int8 on {isa}:" in console


def test_older_files_still_validate_and_new_ones_must_have_the_new_keys(results):
    old = copy.deepcopy(results)
    old["schema_version"] = 2
    for r in old["rows"]:
        del r["int8_isa"]
    for p in old["peaks"]:
        del p["shape"], p["shapes"], p["budget_s"]
    validate_results(old)
    markdown_table(old)  # a version-2 file still renders
    new = copy.deepcopy(results)
    del new["rows"][0]["int8_isa"]
    with pytest.raises(InputError, match="int8_isa"):
        validate_results(new)
    new = copy.deepcopy(results)
    del new["peaks"][0]["shapes"]
    with pytest.raises(InputError, match="shapes"):
        validate_results(new)
