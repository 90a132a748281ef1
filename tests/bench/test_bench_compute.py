"""FLOP counts (hand count for ViT-B/16, torch's own counter) and the MatMul peak probes of `bench`."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mae_deploy.bench import (
    PeakProbes,
    classifier_flops,
    decoder_flops,
    encoder_flops,
    part_flops,
    probe_peak,
)
from mae_deploy.bench.peak import PROBE_KEYS, compute
from mae_deploy.errors import InputError
from training.model import VisionTransformer, create_model, get_config

VIT_B = {
    "img_size": 224,
    "patch_size": 16,
    "in_chans": 3,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "decoder_embed_dim": 512,
    "decoder_depth": 8,
    "decoder_num_heads": 16,
}


def test_vit_b16_encoder_hand_count():
    # By hand, multiply-accumulates (MACs) for one 224x224 image, all 196 patches + cls = 197 tokens:
    patch_embed = 196 * (16 * 16 * 3) * 768  # 115,605,504
    qkv = 197 * 768 * (3 * 768)  # 348,585,984
    scores = 197 * 197 * 768  # Q K^T over 12 heads of 64: 29,805,312
    weighted = 197 * 197 * 768  # A V: 29,805,312
    proj = 197 * 768 * 768  # 116,195,328
    mlp = 2 * 197 * 768 * 3072  # 929,562,624
    macs = patch_embed + 12 * (qkv + scores + weighted + proj + mlp)
    assert macs == 17_563_060_224  # the "17.6 GFLOPs" of the ViT tables are MACs
    assert encoder_flops(VIT_B, 196) == 2 * macs == 35_126_120_448
    assert encoder_flops(VIT_B) == encoder_flops(VIT_B, 196)
    # MAE's reconstruction quarter: patch embedding still sees every patch, blocks see 50 tokens.
    assert encoder_flops(VIT_B, 49) == 2 * (
        patch_embed + 12 * (50 * 768 * 2304 + 2 * 50 * 50 * 768 + 50 * 768 * 768 + 2 * 50 * 768 * 3072)
    )
    assert part_flops(VIT_B, "encoder", 8, 196) == 8 * 35_126_120_448
    assert part_flops(VIT_B, "reconstruct", 2, 49) == 2 * (encoder_flops(VIT_B, 49) + decoder_flops(VIT_B, 49))


def _torch_count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("mae_vit_test", {}),
        ("mae_vit_tiny_patch4", {}),
        ("mae_vit_base_patch16", {"depth": 2, "decoder_depth": 1}),  # ViT-B widths, shallow: quick to build
    ],
)
def test_formula_matches_torch_flop_counter(name, overrides):
    """torch.utils.flop_counter counts 2 per MAC of every matmul/linear/conv/attention, on meta tensors."""
    cfg = get_config(name, **overrides)
    arch = asdict(cfg)
    model = create_model(cfg).to("meta")
    L = cfg.num_patches
    for k in (L, max(1, L // 4)):
        x = torch.empty(2, cfg.in_chans, cfg.img_size, cfg.img_size, device="meta")
        keep = torch.zeros(2, k, dtype=torch.long, device="meta")
        restore = torch.zeros(2, L, dtype=torch.long, device="meta")
        latent = model.forward_encoder(x, keep)
        assert _torch_count(partial(model.forward_encoder, x, keep)) == part_flops(arch, "encoder", 2, k)
        assert _torch_count(partial(model.forward_decoder, latent, restore)) == part_flops(arch, "decoder", 2, k)
    clf = VisionTransformer(cfg, num_classes=10).to("meta")
    x = torch.empty(1, cfg.in_chans, cfg.img_size, cfg.img_size, device="meta")
    assert _torch_count(partial(clf, x)) == classifier_flops(arch, 10)


def test_flops_refuse_what_they_cannot_count():
    with pytest.raises(InputError, match="visible token count 197"):
        encoder_flops(VIT_B, 197)
    with pytest.raises(InputError, match="no decoder"):
        decoder_flops({**VIT_B, "decoder_depth": 0}, 49)
    with pytest.raises(InputError, match="lacks"):
        encoder_flops({"img_size": 224})


@pytest.mark.parametrize(
    "backend, precision, op",
    [
        ("ort", "fp32", "MatMul x4"),
        ("ort", "int8", "MatMulInteger"),
        ("ort", "int8-qdq", "Q/DQ MatMul x4"),
        ("openvino", "fp32", "MatMul x4"),
        ("openvino", "int8-nncf", "Q/DQ MatMul x4"),
        ("torch", "fp32", "matmul"),
    ],
)
def test_peak_probe_runs_the_same_engine(backend, precision, op):
    p = probe_peak(backend, precision, "cpu", threads=1, size=256, seconds=0.05)
    assert list(p) == list(PROBE_KEYS)
    assert p["status"] == "ok", p["reason"]
    assert p["op"] == op and p["peak"] > 0 and p["calls"] >= 3 and p["size"] == 256
    assert p["unit"] == ("GOP/s" if precision.startswith("int8") else "GFLOP/s")


def test_qdq_probe_is_a_chain_of_int8_products_counted_in_full(monkeypatch):
    import onnxruntime as ort

    from mae_deploy.bench import peak

    data, a, op, products = peak._onnx_matmul(8, 16, 24, "int8-qdq")
    assert (op, products) == (f"Q/DQ MatMul x{peak.CHAIN}", peak.CHAIN)
    (y,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"A": a})
    assert y.shape == (8, 16 if peak.CHAIN % 2 == 0 else 24)  # K -> N -> K ...: each product feeds the next
    # A float chain keeps its values near 1 (no overflow however long), and feeds each product to the next.
    data, a, op, products = peak._onnx_matmul(64, 256, 512, "fp32")
    assert (op, products) == (f"MatMul x{peak.CHAIN}", peak.CHAIN)
    (y,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"A": a})
    assert y.shape == (64, 256 if peak.CHAIN % 2 == 0 else 512) and 0.3 < float(np.std(y)) < 3
    # The rate counts every product of the chain: a call of 4 products in 1 ms is 4x one product's rate.
    monkeypatch.setattr(peak, "_time_shape", lambda call, seconds, max_calls: (1e-3, 3, 0.01))
    monkeypatch.setitem(
        peak._PROBES, "ort", lambda precision, device, threads, m, k, n: peak.ProbeCall(lambda: None, "fake", 4)
    )
    p = probe_peak("ort", "int8-qdq", "cpu", threads=1, size=100)
    assert p["peak"] == pytest.approx(4 * 2 * 100**3 / 1e-3 / 1e9)


def test_confirm_keeps_the_faster_probe(monkeypatch):
    from mae_deploy.bench import peak

    made = iter([100.0, 300.0, 50.0])

    def fake(backend, precision, device, threads):
        return {
            **dict.fromkeys(PROBE_KEYS),
            "backend": backend,
            "precision": precision,
            "device": device,
            "status": "ok",
            "peak": next(made),
            "calls": 3,
            "seconds": 0.4,
            "op": "MatMul",
            "size": 8,
        }

    monkeypatch.setattr(peak, "probe_peak", fake)
    probes = PeakProbes(threads=1)
    assert probes.get("ort", "fp32", "cpu")["peak"] == 100.0
    assert probes.confirm("ort", "fp32", "cpu")["peak"] == 300.0  # a burst of load hit the first probe
    assert probes.confirm("ort", "fp32", "cpu")["peak"] == 300.0  # a slower later probe does not lower it
    assert probes.results()[0]["calls"] == 9


def test_peak_probe_without_an_engine_says_why():
    trt = probe_peak("trt", "fp32", "cuda", threads=1)
    assert trt["status"] == "skipped" and "no peak probe for the trt backend" in trt["reason"]
    torch_int8 = probe_peak("torch", "int8", "cpu", threads=1, size=64)
    assert torch_int8["status"] == "skipped" and "no int8" in torch_int8["reason"]


def test_probes_are_cached_per_run_and_rows_get_their_share():
    probes = PeakProbes(threads=1)
    first = probes.get("ort", "fp32", "cpu")
    assert probes.get("ort", "fp32", "cpu") is first and len(probes.results()) == 1
    assert PeakProbes(threads=1, enabled=False).get("ort", "fp32", "cpu") is None

    probe = {**first, "peak": 400.0, "status": "ok", "op": "MatMul", "size": 1024}
    confirmed = probes.confirm("ort", "fp32", "cpu")  # probed again; the faster of the two is kept
    assert confirmed["status"] == "ok" and confirmed["calls"] >= 6
    assert probes.get("ort", "fp32", "cpu") is confirmed and len(probes.results()) == 1
    c = compute(35_126_120_448 * 8, 800.0, probe, "fp32")  # ViT-B batch 8 in 800 ms
    assert c["achieved"] == pytest.approx(351.26, rel=1e-4)
    assert c["fraction_of_peak"] == pytest.approx(351.26 / 400, rel=1e-4)
    assert c["unit"] == "GFLOP/s" and c["peak_probe"] == "ort fp32 MatMul 1024^3" and c["note"] is None
    off = compute(1000, 1.0, None, "int8")
    assert off["unit"] == "GOP/s" and off["fraction_of_peak"] is None and "--no-peak" in off["note"]
