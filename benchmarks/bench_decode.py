"""Decode + preprocess images/s per core, exact vs fast downscaling (issue #14, item 4).

What is timed: ``Preprocessor(path)`` for every photo of a set, i.e. open, JPEG decode, EXIF orientation,
mode conversion, resize to 256 + centre crop 224 (bicubic), normalisation to float32 — the work a decode
worker of ``mae-deploy extract`` does per image. One process, one thread (Pillow decodes and resizes on one
thread; numpy's element-wise work is single-threaded), pinned to one CPU. Exact (``exact_resize=True``, the
old path) and fast (the default) are interleaved round by round; the median round gives images/s.

The photos: scikit-image's astronaut (512x512), coffee (600x400) and chelsea (451x300), resized with Pillow's
LANCZOS filter to about 0.2 MP and about 12 MP keeping each photo's aspect ratio (e.g. 4243x2828 for 3:2,
3464x3464 for the square one), saved as baseline JPEG, quality 90, 4:2:0. Upscaled photos are smoother than
camera output, so their entropy-coded data is smaller (~1 MB) and cheaper to decode than a real 12 MP photo's;
a second 12 MP set adds Gaussian grain (sigma 4 levels, per pixel, same in all channels) to reach camera-like
file sizes (~2.6 MB). A 12 MP PNG set shows the non-JPEG case (no draft decoding, only reduce-before-resize).

Accuracy: a random-init ViT-B/16 MAE exported to a bundle (``--bundle`` reuses one), encoder with all 196
patches visible (ONNX Runtime, CPU, fp32), fed the exact and the fast preprocessing of each photo: cosine of
the mean-pooled and cls features, the lowest per-token cosine, and the largest absolute difference of the
normalised pixels. For scale, the lowest cosine between the features of two different photos.

    .venv/bin/python benchmarks/bench_decode.py    # prints a Markdown section for benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_decode.py --no-accuracy --rounds 3   # throughput only (no torch export)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mae_deploy.bench.machine import CpuShare, cpu_model_and_flags  # noqa: E402
from mae_deploy.preprocess import Preprocessor  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Decode and preprocess per core (issue #14, item 4)"
PHOTOS = ("astronaut", "coffee", "chelsea")
# name -> (megapixels, grain sigma, file extension)
SETS = {
    "0.2 MP JPEG": (0.2, 0.0, "jpg"),
    "12 MP JPEG": (12.0, 0.0, "jpg"),
    "12 MP JPEG + grain": (12.0, 4.0, "jpg"),
    "12 MP PNG": (12.0, 0.0, "png"),
}


def make_photo(name: str, megapixels: float, grain: float, ext: str, dst: Path) -> Path:
    """One scikit-image photo at about ``megapixels`` (aspect kept), optional grain, JPEG q90 or PNG."""
    import skimage.data
    from PIL import Image

    src = Image.fromarray(getattr(skimage.data, name)())
    k = (megapixels * 1e6 / (src.width * src.height)) ** 0.5
    im = src.resize((round(src.width * k), round(src.height * k)), Image.Resampling.LANCZOS)
    if grain:
        rng = np.random.default_rng(0)
        noise = rng.normal(0.0, grain, (im.height, im.width, 1))
        im = Image.fromarray(np.clip(np.asarray(im) + noise.round(), 0, 255).astype(np.uint8))
    path = dst / f"{name}_{megapixels:g}mp{'_grain' if grain else ''}.{ext}"
    if ext == "jpg":
        im.save(path, quality=90)
    else:
        im.save(path)
    return path


def make_sets(dst: Path) -> dict[str, list[Path]]:
    return {s: [make_photo(n, mp, g, ext, dst) for n in PHOTOS] for s, (mp, g, ext) in SETS.items()}


def pin_one_cpu(cpu: int | None) -> int | None:
    """Run on one CPU (the last allowed one unless told); None where affinity is not supported."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
        chosen = allowed[-1] if cpu is None else cpu
        os.sched_setaffinity(0, {chosen})
        return chosen
    except (AttributeError, OSError):
        return None


def throughput(paths: list[Path], rounds: int, round_s: float) -> dict:
    """Median images/s of exact and fast over interleaved rounds (each: every path, repeated for ~round_s).

    Per CPU-second of this (single-threaded) process, i.e. per core, and per wall-clock second: on a shared
    machine the wall clock also counts the time other processes held the CPU; CPU time does not.
    """
    pres = {"exact": Preprocessor(224, exact_resize=True), "fast": Preprocessor(224, exact_resize=False)}
    for p in pres.values():  # warm-up: imports, first allocations, file cache
        t0 = time.process_time()
        p(paths)
    repeat = max(1, round(round_s / max(time.process_time() - t0, 1e-3)))  # the fast path's pass sets it
    cpu: dict[str, list[float]] = {k: [] for k in pres}
    wall: dict[str, list[float]] = {k: [] for k in pres}
    for _ in range(rounds):
        for k, pre in pres.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(repeat):
                for path in paths:
                    pre(path)
            n = repeat * len(paths)
            cpu[k].append(n / (time.process_time() - c0))
            wall[k].append(n / (time.perf_counter() - t0))
    out = {k: statistics.median(v) for k, v in cpu.items()}
    out.update({f"{k}_wall": statistics.median(v) for k, v in wall.items()})
    out["ratio"] = out["fast"] / out["exact"]
    out["ratio_wall"] = out["fast_wall"] / out["exact_wall"]
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def export_vit_base(dst: Path) -> Path:
    if (dst / "mae.json").is_file():
        return dst
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    export_bundle(create_model("mae_vit_base_patch16").eval(), dst, parts=["encoder"], verify=False, progress=None)
    return dst


def accuracy(bundle: Path, sets: dict[str, list[Path]]) -> dict:
    """Per set: feature cosines (mean, cls, lowest per token) and max |pixel difference| exact vs fast."""
    from mae_deploy.bundle import Bundle
    from mae_deploy.features import FeatureExtractor

    b = Bundle.load(bundle)
    exact = Preprocessor.from_bundle(b, exact_resize=True)
    fast = Preprocessor.from_bundle(b, exact_resize=False)
    out = {}
    with FeatureExtractor(b, pool="tokens") as fx:
        for name, paths in sets.items():
            xe, xf = exact(paths), fast(paths)
            te, tf = fx.extract_pixels(xe), fx.extract_pixels(xf)
            mean_e, mean_f = te[:, 1:].mean(1), tf[:, 1:].mean(1)
            others = [float(_cos(mean_e[i], mean_e[j])) for i in range(len(paths)) for j in range(i + 1, len(paths))]
            out[name] = {
                "cos_mean": float(_cos(mean_e, mean_f).min()),
                "cos_cls": float(_cos(te[:, 0], tf[:, 0]).min()),
                "cos_token_min": float(_cos(te[:, 1:], tf[:, 1:]).min()),
                "pixel_max_abs": float(np.abs(xe - xf).max()),
                "pixel_mean_abs": float(np.abs(xe - xf).mean()),
                "cos_mean_other_photos": max(others) if others else None,
            }
    return out


def markdown(r: dict) -> str:
    lines = [
        f"\n### {r['date']} — {r['cpu']}, one thread pinned to CPU {r['pinned_cpu']}, other processes "
        f"{r['others_share']:.0%} of all CPUs\n",
        "Decode + preprocess (`Preprocessor(path)`: open, decode, EXIF, convert, resize 256, crop 224, normalise) "
        "per core: images per CPU-second of the one thread (wall-clock figures, which also count other processes' "
        f"use of the CPU, in brackets); median of {r['rounds']} interleaved rounds. Photos: scikit-image "
        "astronaut/coffee/chelsea resized with LANCZOS (aspect kept) and saved as JPEG q90 (grain: + Gaussian "
        "sigma 4) or PNG; see benchmarks/bench_decode.py. Cosines: random-init ViT-B/16 encoder, all 196 tokens "
        "visible, ORT fp32, fast vs exact inputs, lowest over the 3 photos.\n",
        "| set | file size (avg) | exact img/s per core | fast img/s per core | fast / exact | cos mean-pool "
        "| cos cls | lowest token cos | max abs pixel diff (normalised) | mean abs pixel diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in r["throughput"].items():
        a = r.get("accuracy", {}).get(name)
        acc = (
            (
                f"{a['cos_mean']:.6f} | {a['cos_cls']:.6f} | {a['cos_token_min']:.5f} | {a['pixel_max_abs']:.4f} | "
                f"{a['pixel_mean_abs']:.5f}"
            )
            if a
            else "- | - | - | - | -"
        )
        lines.append(
            f"| {name} | {r['file_mb'][name]:.2f} MB | {t['exact']:.2f} ({t['exact_wall']:.2f}) | "
            f"{t['fast']:.2f} ({t['fast_wall']:.2f}) | **{t['ratio']:.2f}x** ({t['ratio_wall']:.2f}x) "
            f"| {acc} |"
        )
    other = [a["cos_mean_other_photos"] for a in r.get("accuracy", {}).values() if a["cos_mean_other_photos"]]
    if other:
        lines.append(
            f"\nFor scale: the mean-pooled features of two *different* photos have cosine up to "
            f"{max(other):.4f} with this random-init encoder, so 1 - cosine is the figure to compare."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--round-seconds", type=float, default=1.0, help="CPU time of the fast path per round")
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last allowed one)")
    ap.add_argument("--bundle", type=Path, default=None, help="a ViT-B/16 bundle to reuse (default: export one)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the encoder cosines (no torch export)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sets = make_sets(Path(tmp))
        r = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model_and_flags()[0],
            "rounds": args.rounds,
            "throughput": {},
            "file_mb": {s: float(np.mean([p.stat().st_size for p in ps])) / 1e6 for s, ps in sets.items()},
        }
        if not args.no_accuracy:  # before pinning: the export and the encoder may use every CPU
            bundle = args.bundle or export_vit_base(Path(tmp) / "vitb")
            r["accuracy"] = accuracy(bundle, sets)
        r["pinned_cpu"] = pin_one_cpu(args.cpu)
        share = CpuShare()
        for name, paths in sets.items():
            r["throughput"][name] = throughput(paths, args.rounds, args.round_seconds)
            print(name, {k: round(v, 2) for k, v in r["throughput"][name].items()}, flush=True)
        r["others_share"] = share.others() or 0.0
    text = markdown(r)
    print(f"{SECTION} (for {RESULTS.relative_to(ROOT)})\n{text}")


if __name__ == "__main__":
    main()
