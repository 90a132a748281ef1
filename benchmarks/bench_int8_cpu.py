"""int8 on the CPU (issue #25): the ViT-B/16 bundle with every int8 variant, and OpenVINO's own NNCF beside it.

    .venv/bin/python benchmarks/bench_int8_cpu.py prepare DIR     # checkpoint + photos, then `mae-deploy export`
    .venv/bin/mae-deploy bench DIR/bundle --backends torch,ort,openvino --precisions fp32,bf16,int8 \\
        --batch-sizes 8 --threads 2 --out DIR/bench.json --markdown DIR/bench.md
    .venv/bin/python benchmarks/bench_int8_cpu.py own-nncf DIR [--rounds 8] [--threads 2] [--emulate-isa avx2]
    .venv/bin/python benchmarks/bench_int8_cpu.py digits DIR [--pretrain-epochs 20] [--probe-epochs 10]

``prepare``: the ViT-B/16 MAE encoder at its official initialisation with every LayerNorm weight and bias
perturbed by N(0, 0.1) (seed 0: LayerNorms at exactly 1/0 make activations unrealistically tame for int8),
saved as a native checkpoint; the eight skimage.data photos as JPEG (q95, RGB) for calibration; then
``mae-deploy export --precision fp32,int8,int8-qdq,int8-nncf --reference-weights`` (the CLI, parity grid
included). ``own-nncf``: OpenVINO's own NNCF (``nncf.quantize`` on the ``ov.Model`` read from the fp32
encoder.onnx, transformer preset, the same photos through the bundle's preprocessing) timed interleaved,
round by round, with OpenVINO and ONNX Runtime on the bundle's graphs and PyTorch eager fp32, batch 8, all tokens; best
call per path (a loaded machine's medians measure the other processes), pooled cosine against torch fp32.
``--emulate-isa avx512-bf16|avx512-vnni|avx2`` runs ``own-nncf`` as if the CPU stopped at that instruction set, for a
machine that has more (AMX here): the script runs itself again under ``emulate_isa.py``, whose cpuid mask
every engine sees (oneDNN in OpenVINO and PyTorch, ONNX Runtime's MLAS, MKL), so every row is included but
OpenVINO bf16 where the emulated CPU has no bf16. An emulation: same cores, caches and clocks, other kernels;
the real CPU's numbers are measured on that CPU.
``digits``: the demo's recipe (scripts/demo.py: MAE pretraining of mae_vit_tiny_patch4 on the digits, then
a linear probe), shortened by the epoch options; the classifier exported with every int8 variant, calibrated
on 256 train images, and ``mae-deploy eval`` top-1 per precision on the val split (ONNX Runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina")


def prepare(out: Path) -> None:
    import skimage.data
    import torch
    from PIL import Image

    from training.checkpoints import save_native
    from training.model import create_model

    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for n in PHOTOS:
        Image.fromarray(getattr(skimage.data, n)()).convert("RGB").save(photos / f"{n}.jpg", quality=95)
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    save_native(model, out / "checkpoint", parts=["encoder"], overwrite=True)
    cli = Path(sys.executable).with_name("mae-deploy")
    t0 = time.perf_counter()
    subprocess.run(
        [
            str(cli),
            "export",
            str(out / "checkpoint"),
            "--out",
            str(out / "bundle"),
            "--parts",
            "encoder",
            "--precision",
            "fp32,int8,int8-qdq,int8-nncf",
            "--calibration",
            str(photos),
            "--reference-weights",
            "--overwrite",
        ],
        check=True,
    )
    print(f"exported {out / 'bundle'} in {time.perf_counter() - t0:.0f} s")


def digits(out: Path, pretrain_epochs: int, probe_epochs: int) -> None:
    cli = str(Path(sys.executable).with_name("mae-deploy"))
    data, pre, probe, bundle = out / "digits", out / "pretrain", out / "linprobe", out / "classifier_bundle"
    common = ["--input_size", "32", "--num_workers", "0", "--device", "cpu", "--save_freq", "1000"]

    def run(*args: str) -> None:
        t0 = time.perf_counter()
        subprocess.run([cli, *args], check=True)
        print(f"mae-deploy {args[0]}: {time.perf_counter() - t0:.0f} s", flush=True)

    if not (data / "digits.json").exists():
        run("data", "digits", str(data))
    run(
        "pretrain",
        "--model",
        "mae_vit_tiny_patch4",
        "--in_chans",
        "1",
        "--norm_pix_loss",
        "--mask_ratio",
        "0.75",
        "--batch_size",
        "64",
        "--epochs",
        str(pretrain_epochs),
        "--warmup_epochs",
        "2",
        "--blr",
        "2e-3",
        "--data_path",
        str(data),
        "--output_dir",
        str(pre),
        *common,
    )
    run(
        "linprobe",
        "--finetune",
        str(pre / "model"),
        "--batch_size",
        "128",
        "--epochs",
        str(probe_epochs),
        "--warmup_epochs",
        "2",
        "--blr",
        "20",
        "--data_path",
        str(data),
        "--output_dir",
        str(probe),
        *common,
    )
    run(
        "export",
        str(probe / "model"),
        "--out",
        str(bundle),
        "--precision",
        "fp32,int8,int8-qdq,int8-nncf",
        "--calibration",
        str(data / "train"),
        "--reference-weights",
        "--overwrite",
    )
    # ORT only: the openvino backend runs encoders, not the classifier graph.
    run("eval", str(bundle), str(data / "val"), "--threads", "2", "--no-progress", "--out", str(out / "eval.json"))


def _pooled(latent: np.ndarray) -> np.ndarray:
    return latent[:, 1:].mean(1).astype(np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Lowest per-image cosine of mean-pooled features."""
    a, b = _pooled(a), _pooled(b)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def emulated(isa: str, argv: list[str]) -> int:
    """Run this script with ``argv`` again under ``emulate_isa.py``'s cpuid mask for ``isa``."""
    import emulate_isa

    try:
        emulate_isa.check_machine()
        lib = emulate_isa.build()
    except emulate_isa.EmulationUnavailable as e:
        print(f"--emulate-isa: {e}", file=sys.stderr)
        return 3
    command = [sys.executable, str(Path(__file__).resolve()), *argv]
    return subprocess.run(command, env=emulate_isa.environment(isa, lib)).returncode


def own_nncf(out: Path, rounds: int, threads: int, batch: int = 8, emulate: str | None = None) -> dict:
    """The interleaved comparison; ``emulate``: the cpuid mask this process already runs under."""
    import nncf
    import openvino as ov
    import torch

    from mae_deploy.bench.machine import load_average, machine_info
    from mae_deploy.bundle import Bundle
    from mae_deploy.preprocess import Preprocessor
    from mae_deploy.runners import create_runner
    from mae_deploy.runners.openvino import cpu_supports_bf16

    bundle = Bundle.load(out / "bundle")
    pre = Preprocessor.from_bundle(bundle)
    x = pre(sorted((out / "photos").iterdir()))[:batch]
    L = bundle.num_patches
    keep = np.tile(np.arange(L, dtype=np.int64), (len(x), 1))
    calls = {}

    torch.set_num_threads(threads)
    eager = create_runner(bundle, backend="torch", precision="fp32", threads=threads)
    calls["PyTorch eager fp32"] = lambda: eager.encode(x, keep)
    paths = [("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"), ("ort", "int8"), ("ort", "int8-nncf")]
    if not cpu_supports_bf16(ov.Core()):  # an emulated CPU without bf16: OpenVINO would refuse the row
        paths = [p for p in paths if p[1] != "bf16"]
    for backend, precision in paths:
        runner = create_runner(bundle, backend=backend, precision=precision, threads=threads)
        calls[f"{backend} {precision} (bundle)"] = (lambda r: lambda: r.encode(x, keep))(runner)
    # --compile: OpenVINO's int8 compiled for this batch's static shape
    compiled_int8 = create_runner(bundle, backend="openvino", precision="int8", threads=threads, compile=True)
    calls["openvino int8 (bundle, --compile)"] = lambda: compiled_int8.encode(x, keep)

    core = ov.Core()
    t0 = time.perf_counter()
    fp32 = core.read_model(str(bundle.graph_path("encoder", "fp32")))
    feeds = [{"pixel_values": x[i : i + 1], "ids_keep": keep[i : i + 1]} for i in range(len(x))]
    quantized = nncf.quantize(fp32, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
    quantize_s = time.perf_counter() - t0
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(quantized, "CPU", config)
    request = compiled.create_infer_request()
    latent_port = compiled.output("latent")
    calls["OpenVINO int8, OpenVINO's own NNCF"] = lambda: request.infer({"pixel_values": x, "ids_keep": keep})[
        latent_port
    ].copy()

    outputs = {name: call() for name, call in calls.items()}  # first call: warm-up and the checked output
    best = dict.fromkeys(calls, float("inf"))
    load_start = load_average()
    for _ in range(rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            best[name] = min(best[name], (time.perf_counter() - t) * 1000)
    ref = outputs["PyTorch eager fp32"]
    rows = [
        {
            "path": name,
            "best_ms": best[name],
            "vs_torch_eager": best["PyTorch eager fp32"] / best[name],
            "pooled_cosine_min": _cosine(outputs[name], ref),
        }
        for name in calls
    ]
    m = machine_info(libraries=("torch", "openvino", "onnxruntime", "nncf"))
    return {
        "rounds": rounds,
        "threads": threads,
        "batch": len(x),
        "visible": L,
        "quantize_s": quantize_s,
        "cpu": m["cpu_model"],
        "int8_isa": m["int8_isa"] + (" (emulated)" if emulate else ""),
        "emulated_isa": emulate,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": m["cpu_flags"],
        "libraries": m["libraries"],
        "load_average": {"start": load_start, "end": load_average()},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("prepare", "own-nncf", "digits"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--probe-epochs", type=int, default=10)
    ap.add_argument(
        "--emulate-isa", choices=("avx2", "avx512-vnni", "avx512-bf16"), help="own-nncf: hide newer instruction sets"
    )
    args = ap.parse_args(argv)
    if args.stage == "prepare":
        prepare(args.dir)
        return 0
    if args.stage == "digits":
        digits(args.dir, args.pretrain_epochs, args.probe_epochs)
        return 0
    if args.emulate_isa and os.environ.get("CPUID_MASK_ISA") != args.emulate_isa:
        return emulated(args.emulate_isa, sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    result = own_nncf(args.dir, args.rounds, args.threads, emulate=args.emulate_isa)
    name = f"own_nncf.{args.emulate_isa}.json" if args.emulate_isa else "own_nncf.json"
    (args.dir / name).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['cpu']}, int8 on {result['int8_isa']}, {args.threads} threads, batch {result['batch']}, "
        f"{result['rounds']} interleaved rounds, load average {result['load_average']}"
    )
    print("| path | best ms | vs torch eager fp32 | pooled cosine (min) |\n|---|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['path']} | {r['best_ms']:.0f} | {r['vs_torch_eager']:.2f}x | {r['pooled_cosine_min']:.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
