"""Encoder latency on CPU: ONNX Runtime fp32 vs OpenVINO fp32 vs OpenVINO bf16 (issue #14 item 1).

ViT-B/16 MAE encoder (random init unless --bundle), batch 8, all 196 tokens visible, 2 threads, the same
encoder.onnx read by both runtimes through mae_deploy's runners (``create_runner``, host copies included).
Backends are interleaved round by round, so a burst of load from another process hits all of them alike;
the ratio to ORT fp32 is measured in the same run. Also the agreement with ORT fp32 on real photos
(skimage.data): max |diff| of the latent and the cosine of mean-pooled features. bf16 is reported as
unavailable (with OpenVINO's reason) on a CPU without bf16 instructions. ``--int8`` adds ORT's dynamic int8
and OpenVINO's int8 on the statically calibrated Q/DQ graph (the export is calibrated on the same photos).

    .venv/bin/python benchmarks/bench_openvino.py [--rounds 10] [--threads 2] [--bundle DIR] [--int8]

Prints a Markdown table; copy it into benchmarks/RESULTS.md with the date and CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina")
CONFIGS = (("ort", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))
INT8_CONFIGS = (("ort", "int8"), ("openvino", "int8"))


def export_vit_b(out: Path, int8: bool) -> Path:
    """A random-init ViT-B/16 MAE encoder exported to a bundle (no parity grid: we compare here)."""
    import skimage.data
    import torch
    from PIL import Image

    from export.bundle_writer import export_bundle
    from training.model import create_model

    calib = None
    if int8:
        calib = out.parent / "calibration"
        calib.mkdir(parents=True, exist_ok=True)
        for n in PHOTOS:
            Image.fromarray(getattr(skimage.data, n)()).convert("RGB").save(calib / f"{n}.png")
    torch.manual_seed(0)
    export_bundle(
        create_model("mae_vit_base_patch16").eval(),
        out,
        parts=("encoder",),
        verify=False,
        progress=None,
        precisions=("fp32", "int8", "int8-qdq") if int8 else ("fp32",),
        calibration=calib,
    )
    return out


def photos(bundle, batch: int) -> np.ndarray:
    """skimage.data photos through the runtime's own preprocessing."""
    import skimage.data

    from mae_deploy.preprocess import Preprocessor

    pre = Preprocessor.from_bundle(bundle)
    return pre([getattr(skimage.data, n)() for n in PHOTOS[:batch]])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a[:, 1:].mean(1), b[:, 1:].mean(1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bundle", type=Path, default=None, help="A ViT-B/16 bundle (default: export one now).")
    ap.add_argument("--int8", action="store_true", help="Also ORT dynamic int8 and OpenVINO Q/DQ int8.")
    args = ap.parse_args()
    configs = CONFIGS + (INT8_CONFIGS if args.int8 else ())

    from mae_deploy.bundle import Bundle
    from mae_deploy.errors import MaeDeployError
    from mae_deploy.runners import create_runner

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Bundle.load(args.bundle or export_vit_b(Path(tmp) / "vitb", args.int8))
        x = photos(bundle, args.batch)
        ids = np.tile(np.arange(bundle.num_patches, dtype=np.int64), (args.batch, 1))
        runners, skipped = {}, {}
        for backend, precision in configs:
            try:
                r = create_runner(bundle, backend, precision=precision, threads=args.threads)
                r.load(("encoder",))
                runners[(backend, precision)] = r
            except MaeDeployError as e:
                skipped[(backend, precision)] = f"{type(e).__name__} (exit {e.exit_code}): {e}"
        times = {k: [] for k in runners}
        outs = {}
        for k, r in runners.items():
            for _ in range(args.warmup):
                outs[k] = r.encode(x, ids)
        for _ in range(args.rounds):
            for k, r in runners.items():
                t0 = time.perf_counter()
                r.encode(x, ids)
                times[k].append((time.perf_counter() - t0) * 1000)
        ref = outs[("ort", "fp32")]
        base = statistics.median(times[("ort", "fp32")])
        try:
            from mae_deploy.bench import cpu_model_and_flags
        except ImportError:  # the bench package split in progress: its machine module has it
            from mae_deploy.bench.machine import cpu_model_and_flags

        model, flags = cpu_model_and_flags()
        wide = [f for f in flags if "avx512" in f or "amx" in f or "bf16" in f]
        print(f"CPU: {model} ({' '.join(wide) or 'no AVX-512'})")
        print(
            f"ViT-B/16 encoder, batch {args.batch}, {bundle.num_patches} visible tokens, {args.threads} threads, "
            f"{args.rounds} interleaved rounds (median)\n"
        )
        print("| backend | precision | median ms | vs ORT fp32 | max abs diff | pooled cosine |")
        print("|---|---|---|---|---|---|")
        for k in configs:
            if k in skipped:
                print(f"| {k[0]} | {k[1]} | unavailable: {skipped[k]} | | | |")
                continue
            med = statistics.median(times[k])
            diff = float(np.abs(outs[k] - ref).max())
            print(f"| {k[0]} | {k[1]} | {med:.0f} | {base / med:.2f}x | {diff:.1e} | {cosine(outs[k], ref):.6f} |")
        for r in runners.values():
            r.close()


if __name__ == "__main__":
    main()
