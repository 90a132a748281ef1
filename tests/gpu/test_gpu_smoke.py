"""GPU smoke tests: the trt runner (fp32, fp16), ONNX Runtime's CUDA provider and the torch backend on CUDA
(fp32, bf16 autocast) against the PyTorch fp32 CPU result, plus a ViT-B/16 throughput record.

Runs only where CUDA (and, for the trt tests, TensorRT + cuda-python) exist; elsewhere every test skips and
says what is missing. They are the runtime check of the mae_deploy/runners/trt/ package and of ONNX Runtime's
TensorRT provider. See tests/gpu/README.md; what has run where: docs/verification.md.

Tolerances (outputs are LayerNorm-scaled, O(1)):
- fp32 engines: max |diff| <= 2e-3 (TensorRT's TF32 is off in our fp32 engines).
- torch fp32 on CUDA and ORT CUDA: max |diff| <= 1e-2 (torch lets cuDNN run the patch-embedding convolution
  in TF32 by default; ORT's CUDA provider allows TF32 matmuls by default).
- fp16 / bf16: mean-pooled feature cosine >= 0.999 (fp16) / 0.99 (bf16); reconstruction relative error
  <= 0.01 (fp16) / 0.05 (bf16), the export's own fp16 thresholds and a looser one for bf16's 8-bit mantissa.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from mae_deploy.bundle import Bundle

pytestmark = pytest.mark.gpu

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "RESULTS.md"
SECTION = "## GPU throughput (tests/gpu)"


def _pooled_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.mean(1), b.mean(1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_close(runner, inputs, ref, atol: float) -> None:
    latent = runner.encode(inputs["x"], inputs["ids_keep"])
    assert latent.shape == ref["latent"].shape and latent.dtype == np.float32
    assert np.abs(latent - ref["latent"]).max() <= atol
    # Decode the reference latent so encoder and decoder errors are measured separately.
    pred = runner.decode(ref["latent"], inputs["ids_restore"])
    assert np.abs(pred - ref["pred"]).max() <= atol
    feats = runner.encode(inputs["x"], inputs["all"])
    assert np.abs(feats - ref["features"]).max() <= atol


def _check_reduced(runner, inputs, ref, min_cos: float, max_rel: float) -> None:
    latent = runner.encode(inputs["x"], inputs["ids_keep"])
    assert np.isfinite(latent).all()
    assert _pooled_cosine(latent, ref["latent"]) >= min_cos
    assert _pooled_cosine(runner.encode(inputs["x"], inputs["all"]), ref["features"]) >= min_cos
    pred = runner.decode(ref["latent"], inputs["ids_restore"])
    assert _rel_err(pred, ref["pred"]) <= max_rel


# --------------------------------------------------------------------------------------------------
# TensorRT runner
# --------------------------------------------------------------------------------------------------


def _trt_runner(bundle_dir, precision, cache, **kw):
    from mae_deploy.runners.trt import TrtRunner

    return TrtRunner(
        Bundle.load(bundle_dir), device="cuda", precision=precision, cache_dir=cache, max_batch=4, progress=False, **kw
    )


def test_trt_fp32_matches_torch_cpu(tensorrt_ready, gpu_tiny_bundle, tiny_inputs, cpu_reference, trt_cache):
    with _trt_runner(gpu_tiny_bundle, "fp32", trt_cache) as r:
        _check_close(r, tiny_inputs, cpu_reference, atol=2e-3)
        info = r.info.details
        assert info["api_generation"] in (10, 11) and set(info["built"]) == {"encoder", "decoder"}
        assert all(Path(p).is_file() and Path(p).with_suffix(".json").is_file() for p in info["engines"].values())


def test_trt_fp16_close_to_torch_cpu(tensorrt_ready, gpu_tiny_bundle, tiny_inputs, cpu_reference, trt_cache):
    with _trt_runner(gpu_tiny_bundle, "fp16", trt_cache) as r:
        _check_reduced(r, tiny_inputs, cpu_reference, min_cos=0.999, max_rel=0.01)
        expected = "encoder.onnx" if r.generation == 10 else "encoder.fp16.onnx"
        assert r.info.details["graphs"]["encoder"] == expected


def test_trt_engine_cache_is_reused(tensorrt_ready, gpu_tiny_bundle, tiny_inputs, cpu_reference, trt_cache):
    with _trt_runner(gpu_tiny_bundle, "fp32", trt_cache) as first:
        first.load()
    with _trt_runner(gpu_tiny_bundle, "fp32", trt_cache) as again:
        again.load()
        assert again.info.details["built"] == {"encoder": False, "decoder": False}
        assert np.abs(again.encode(tiny_inputs["x"], tiny_inputs["ids_keep"]) - cpu_reference["latent"]).max() <= 2e-3


def test_trt_profile_limits_are_enforced(tensorrt_ready, gpu_tiny_bundle, tiny_inputs, trt_cache):
    from mae_deploy.errors import InputError

    with (
        _trt_runner(gpu_tiny_bundle, "fp32", trt_cache, max_visible="L/4") as r,
        pytest.raises(InputError, match="visible tokens, but this call has 64"),
    ):
        r.encode(tiny_inputs["x"], tiny_inputs["all"])


def test_trt_refuses_threads_and_sets_the_device_per_thread(
    tensorrt_ready, gpu_tiny_bundle, tiny_inputs, cpu_reference, trt_cache
):
    import threading

    from mae_deploy.errors import InputError
    from mae_deploy.runners import create_runner

    with pytest.raises(InputError, match="no CPU thread count"):
        create_runner(gpu_tiny_bundle, "trt", device="cuda", threads=2)
    out = {}
    with _trt_runner(gpu_tiny_bundle, "fp32", trt_cache) as r:  # first call from another thread
        t = threading.Thread(target=lambda: out.update(latent=r.encode(tiny_inputs["x"], tiny_inputs["ids_keep"])))
        t.start()
        t.join()
    assert np.abs(out["latent"] - cpu_reference["latent"]).max() <= 2e-3


# --------------------------------------------------------------------------------------------------
# ONNX Runtime's TensorRT provider
# --------------------------------------------------------------------------------------------------


def test_ort_tensorrt_fp32_chunks_above_its_profile(
    ort_tensorrt, gpu_tiny_bundle, tiny_inputs, cpu_reference, tmp_path
):
    from mae_deploy.runners.ort import OrtRunner

    with OrtRunner(Bundle.load(gpu_tiny_bundle), device="tensorrt", trt_max_batch=4, trt_cache_dir=tmp_path) as r:
        _check_close(r, tiny_inputs, cpu_reference, atol=2e-3)  # batch 5 > max 4: two calls per part
        assert r.info.providers[0] == "TensorrtExecutionProvider"
        cache = Path(r.info.details["tensorrt"]["cache_dir"])
        assert cache.parent == tmp_path and any(cache.iterdir())  # engines in the profile's own folder


def test_ort_tensorrt_fp16_really_runs_fp16(ort_tensorrt, gpu_tiny_bundle, tiny_inputs, cpu_reference, tmp_path):
    """On TensorRT 11 trt_fp16_enable is a no-op: the runner must feed the fp16 graph there."""
    from mae_deploy.runners.ort import OrtRunner

    with OrtRunner(
        Bundle.load(gpu_tiny_bundle), device="tensorrt", precision="fp16", trt_max_batch=4, trt_cache_dir=tmp_path
    ) as r:
        _check_reduced(r, tiny_inputs, cpu_reference, min_cos=0.999, max_rel=0.01)
        latent = r.encode(tiny_inputs["x"], tiny_inputs["ids_keep"])
        assert np.abs(latent - cpu_reference["latent"]).max() > 1e-5  # not silently fp32
        gen = r.info.details["tensorrt"]["generation"]
        if gen == 11:
            assert r.info.details["graphs"]["encoder"] == "encoder.fp16.onnx"


# --------------------------------------------------------------------------------------------------
# ONNX Runtime CUDA provider, torch on CUDA
# --------------------------------------------------------------------------------------------------


def test_ort_cuda_matches_torch_cpu(ort_cuda, gpu_tiny_bundle, tiny_inputs, cpu_reference):
    from mae_deploy.runners.ort import OrtRunner

    with OrtRunner(Bundle.load(gpu_tiny_bundle), device="cuda") as r:
        _check_close(r, tiny_inputs, cpu_reference, atol=1e-2)
        assert r.info.providers[0] == "CUDAExecutionProvider"  # no silent CPU fall-back


def test_torch_cuda_fp32_matches_cpu(cuda_torch, gpu_tiny_bundle, tiny_inputs, cpu_reference):
    from mae_deploy.runners.torch_runner import TorchRunner

    with TorchRunner(Bundle.load(gpu_tiny_bundle), device="cuda", precision="fp32") as r:
        _check_close(r, tiny_inputs, cpu_reference, atol=1e-2)
        assert "gpu" in r.info.details


def test_torch_cuda_bf16_close_to_cpu(cuda_torch, gpu_tiny_bundle, tiny_inputs, cpu_reference):
    from mae_deploy.runners.torch_runner import TorchRunner

    with TorchRunner(Bundle.load(gpu_tiny_bundle), device="cuda", precision="bf16") as r:
        _check_reduced(r, tiny_inputs, cpu_reference, min_cos=0.99, max_rel=0.05)


# --------------------------------------------------------------------------------------------------
# ViT-B/16 throughput -> benchmarks/RESULTS.md
# --------------------------------------------------------------------------------------------------


def _throughput(runner, x: np.ndarray, ids: np.ndarray, warmup: int = 3, iters: int = 10) -> tuple[float, float]:
    """(images/s, median ms per batch) through the runner: numpy in, numpy out, host copies included."""
    for _ in range(warmup):
        runner.encode(x, ids)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = runner.encode(x, ids)  # returns host numpy: the device work has finished
        times.append(time.perf_counter() - t0)
    assert out.shape == (x.shape[0], ids.shape[1] + 1, 768) and np.isfinite(out).all()
    med = statistics.median(times)
    return x.shape[0] / med, med * 1e3


def append_results(rows: list[str], results: Path = RESULTS) -> None:
    """Add table rows at the end of the '## GPU throughput (tests/gpu)' section (created if absent)."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + (
            f"\n\n{SECTION}\n\n"
            "ViT-B/16 MAE encoder (random init), batch 64, all 196 tokens visible; through the Runner interface "
            "(numpy in and out, host<->device copies included), median of 10 calls after 3 warm-up calls. "
            "Written by `pytest tests/gpu -m gpu`; rows are appended per run.\n\n"
            "| date (UTC) | GPU | backend | precision | images/s | ms/batch | versions |\n"
            "|---|---|---|---|---:|---:|---|\n"
        )
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt < 0 else nxt + 1
    section = text[start:end].rstrip("\n") + "\n" + "".join(r + "\n" for r in rows)
    text = text[:start] + section + ("\n" + text[end:] if nxt >= 0 else "")
    from mae_deploy.fileio import atomic_write_text

    atomic_write_text(results, text)


def test_append_results_keeps_other_sections(tmp_path):
    """The RESULTS.md writer (runs everywhere: it needs no GPU)."""
    f = tmp_path / "RESULTS.md"
    f.write_text("# Benchmark results\n\n## CPU\n\n| a |\n|---|\n| 1 |\n")
    append_results(["| r1 |"], f)
    append_results(["| r2 |"], f)
    text = f.read_text()
    assert text.startswith("# Benchmark results\n\n## CPU\n\n| a |\n|---|\n| 1 |\n\n## GPU throughput (tests/gpu)")
    assert text.endswith("| r1 |\n| r2 |\n") and text.count(SECTION) == 1
    f.write_text(text + "\n## Later section\n\nbody\n")
    append_results(["| r3 |"], f)
    text = f.read_text()
    assert "| r2 |\n| r3 |\n\n## Later section\n\nbody\n" in text


@pytest.mark.slow
def test_vit_b_throughput_batch_64(cuda_torch, gpu_name, gpu_vitb_bundle, tmp_path):
    """Record ViT-B/16 images/s at batch 64 for torch (fp32, bf16) and, where installed, trt (fp32, fp16)."""
    from mae_deploy.runners.torch_runner import TorchRunner

    bundle = Bundle.load(gpu_vitb_bundle)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 224, 224)).astype(np.float32)
    ids = np.tile(np.arange(196, dtype=np.int64), (64, 1))
    measured: list[tuple[str, str, float, float, str]] = []
    for precision in ("fp32", "bf16"):
        with TorchRunner(bundle, device="cuda", precision=precision) as r:
            ips, ms = _throughput(r, x, ids)
            measured.append(("torch", precision, ips, ms, f"torch {cuda_torch.__version__}"))
    try:
        from mae_deploy.runners.trt import TrtRunner, import_cudart, import_tensorrt

        trt = import_tensorrt()
        import_cudart()
    except Exception as e:  # TensorRT is optional here: torch rows are still recorded
        trt, why = None, str(e)
    if trt is not None:
        for precision in ("fp32", "fp16"):
            with TrtRunner(
                bundle,
                device="cuda",
                precision=precision,
                max_batch=64,
                opt_batch=64,
                cache_dir=tmp_path / "engines",
                progress=True,
            ) as r:
                ips, ms = _throughput(r, x, ids)
                measured.append(("trt", precision, ips, ms, f"TensorRT {trt.__version__}"))
    else:
        print(f"trt rows not measured: {why}")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    rows = [f"| {date} | {gpu_name} | {b} | {p} | {ips:.0f} | {ms:.1f} | {v} |" for b, p, ips, ms, v in measured]
    append_results(rows)
    for b, p, ips, ms, _ in measured:
        print(f"{b:<6} {p:<5} {ips:8.0f} images/s  {ms:7.1f} ms/batch")
        assert ips > 0 and np.isfinite(ips)
    text = RESULTS.read_text()
    assert all(row in text for row in rows)
