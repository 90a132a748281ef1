"""Batch extraction benchmark (issue #5).

1. Throughput, ViT-B/16 (random init, exported bundle) on CPU: end-to-end images/s of ``extract_features``
   (JPEG decode, resize, inference, shard writing; wall time including start-up, and the steady state
   after it) against the same runner's model-only images/s on already preprocessed batches. Model-only is
   measured before and after the end-to-end runs (the machine is shared) and the better of the two is used,
   so the ratio errs against the pipeline.
2. Memory, tiny model (mae_vit_test): peak RSS of the whole job (main process + decode workers, sampled every
   20 ms) for 1k and 10k images.
3. ``--ray`` (issue #13): the Ray Data engine against the local engine on the same JPEGs and machine, in one
   run: local (default workers), Ray with 1 encoder actor (inference threads = cores, like local) and with 2
   actors (1 thread each), on a local Ray started once by this script (its start-up is not timed). Then the
   peak RSS of the Ray driver process alone (the CLI, joining that Ray) for 1k and 10k small images.

    python benchmarks/bench_extract.py                 # both parts, appends to benchmarks/RESULTS.md
    python benchmarks/bench_extract.py --images 200 --no-append   # a quicker look
    python benchmarks/bench_extract.py --ray --skip-throughput --skip-memory --images 160   # Ray vs local only

Needs the dev extras (torch for the export) and psutil. Runs on a CPU; a busy CPU lowers every number, so the
load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mae_deploy.bench import cpu_model_and_flags  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Batch extraction (issue #5)"


def cpu_model() -> str:
    return cpu_model_and_flags()[0]


def export(name: str, dst: Path) -> Path:
    if (dst / "mae.json").is_file():
        return dst
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    export_bundle(create_model(name).eval(), dst, parts=["encoder"], verify=False, progress=None)
    return dst


def make_jpegs(dst: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """n JPEGs of about ``size`` (w, h), crops of scikit-image photos: what an ImageNet-like folder costs to decode."""
    from PIL import Image
    from skimage import data

    dst.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(getattr(data, k)()).convert("RGB") for k in
              ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = dst / f"{i // 1000:03d}" / f"img{i:06d}.jpg"
        paths.append(str(p))
        if p.exists():
            continue
        p.parent.mkdir(exist_ok=True)
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im.crop((x, y, x + cw, y + ch)).resize(size).save(p, quality=90)
    return paths


def model_only(bundle: Path, batch_size: int, seconds: float, runner_opts: dict) -> float:
    """Images/s of runner.encode on preprocessed batches (all patches visible), after one warm-up batch."""
    from mae_deploy.bundle import Bundle
    from mae_deploy.masking import all_visible
    from mae_deploy.runners import create_runner

    b = Bundle.load(bundle)
    runner = create_runner(b, "ort", "cpu", **runner_opts)
    x = np.random.default_rng(0).standard_normal((batch_size, 3, b.image_size, b.image_size)).astype(np.float32)
    ids, _, _ = all_visible(batch_size, b.num_patches)
    runner.encode(x, ids)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        runner.encode(x, ids)
        n += batch_size
    rate = n / (time.perf_counter() - t0)
    runner.close()
    return rate


def end_to_end(src: Path, bundle: Path, out: Path, **kw) -> dict:
    from mae_deploy.extract import extract_features

    s = extract_features(src, bundle, out, progress=False, **kw)
    t = s.timings
    steady = s.processed / (s.wall_s - t["startup_s"])
    return {"images": s.processed, "wall_s": s.wall_s, "img_s": s.images_per_s, "steady_img_s": steady, **t}


def peak_rss_of_job(cmd: list[str]) -> dict:
    """Run ``cmd``; peak summed RSS of it and its children (sampled), and of the main process alone."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    p = psutil.Process(proc.pid)
    peak_tree = peak_main = 0
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            main = p.memory_info().rss
            kids = sum(c.memory_info().rss for c in p.children(recursive=True))
        except psutil.Error:
            break
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, main + kids)
        time.sleep(0.02)
    err = proc.stderr.read().decode()
    if proc.wait() not in (0, 4):
        raise RuntimeError(f"{cmd} failed:\n{err}")
    return {"peak_tree_mib": peak_tree / 2**20, "peak_main_mib": peak_main / 2**20,
            "wall_s": time.perf_counter() - t0}


def small_job_rss(cache: Path, n: int, prefix: str, *extra: str) -> dict:
    """Peak RSS of `mae-deploy extract` over the first ``n`` of 10,000 small JPEGs (mae_vit_test, shards of
    1000); ``extra`` CLI options choose the engine. The bundle and the JPEGs are made once in ``cache``."""
    tiny = export("mae_vit_test", cache / "tiny")
    paths = make_jpegs(cache / "jpeg_small", 10_000, (160, 120), seed=1)
    lst = cache / f"small_{n}.txt"
    lst.write_text("\n".join(paths[:n]) + "\n")
    out = Path(tempfile.mkdtemp(prefix=f"{prefix}{n}-", dir=cache))
    return peak_rss_of_job([sys.executable, "-m", "mae_deploy.cli", "extract", str(lst), "--bundle", str(tiny),
                            "--out", str(out), "--no-progress", "--shard-size", "1000", *extra])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="JPEGs for the ViT-B throughput runs")
    ap.add_argument("--size", default="500x375", help="JPEG size WxH (ImageNet's typical is ~500x375)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2", help="decode worker counts to compare")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mae-deploy-bench-extract")
    ap.add_argument("--no-append", action="store_true", help="print results only")
    ap.add_argument("--ray", action="store_true", help="also compare --engine ray with --engine local")
    ap.add_argument("--ray-model", default="mae_vit_base_patch16", help="model for the Ray comparison")
    args = ap.parse_args()
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    w, h = map(int, args.size.split("x"))
    results: dict = {"date": dt.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
                     "loadavg_before": os.getloadavg()[0]}

    if not args.skip_throughput:
        bundle = export("mae_vit_base_patch16", cache / "vit_b16")
        src = cache / f"jpeg_{w}x{h}"
        make_jpegs(src, args.images, (w, h))
        lst = cache / f"jpeg_{w}x{h}_{args.images}.txt"
        lst.write_text("\n".join(sorted(str(p) for p in src.rglob("*.jpg"))[: args.images]) + "\n")
        before = model_only(bundle, args.batch_size, 20, {})
        print(f"model-only: {before:.2f} img/s", flush=True)
        runs = []
        for workers in map(int, args.workers.split(",")):
            out = Path(tempfile.mkdtemp(prefix="e2e-", dir=cache))
            r = end_to_end(lst, bundle, out, batch_size=args.batch_size, workers=workers)
            r["workers"] = workers
            runs.append(r)
            print(f"end-to-end workers={workers}: {r['img_s']:.2f} img/s (steady {r['steady_img_s']:.2f}), "
                  f"timings {json.dumps({k: round(v, 2) for k, v in r.items() if k.endswith('_s')})}", flush=True)
        after = model_only(bundle, args.batch_size, 20, {})
        print(f"model-only (after): {after:.2f} img/s", flush=True)
        results["throughput"] = {"model_only_img_s": [before, after], "runs": runs, "images": args.images,
                                 "size": args.size, "batch_size": args.batch_size}

    if not args.skip_memory:
        mem = {}
        for n in (1_000, 10_000):
            mem[n] = small_job_rss(cache, n, "rss")
            print(f"RSS {n} images: {json.dumps({k: round(v, 1) for k, v in mem[n].items()})}", flush=True)
        results["memory"] = mem
    if args.ray:
        results["ray"] = ray_vs_local(args, cache, (w, h))
    results["loadavg_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=1, default=float))
    if not args.no_append:
        append_results(results)


def ray_vs_local(args, cache: Path, size: tuple[int, int]) -> dict:
    """img/s of --engine ray (1 and 2 actors) and --engine local on the same JPEGs; Ray driver RSS at 2 sizes."""
    import ray

    bundle = export(args.ray_model, cache / args.ray_model)
    src = cache / f"jpeg_{size[0]}x{size[1]}"
    make_jpegs(src, args.images, size)
    lst = cache / f"ray_{size[0]}x{size[1]}_{args.images}.txt"
    lst.write_text("\n".join(sorted(str(p) for p in src.rglob("*.jpg"))[: args.images]) + "\n")
    cores = os.cpu_count() or 2
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        configs = [("local", {"engine": "local"}),
                   ("ray, 1 actor", {"engine": "ray", "actors": 1, "cpus_per_actor": 1, "threads": cores}),
                   ("ray, 2 actors", {"engine": "ray", "actors": 2, "cpus_per_actor": (cores - 1) / 2,
                                      "threads": max(1, (cores - 1) // 2)})]
        runs = []
        for name, kw in configs:
            out = Path(tempfile.mkdtemp(prefix="ray-", dir=cache))
            r = end_to_end(lst, bundle, out, batch_size=args.batch_size, **kw)
            r["engine"] = name
            runs.append(r)
            print(f"{name}: {r['img_s']:.2f} img/s (steady {r['steady_img_s']:.2f})", flush=True)
        rss = {}
        for n in (1_000, 10_000):
            rss[n] = small_job_rss(cache, n, "rayrss", "--engine", "ray", "--ray-address", address)
            print(f"Ray driver RSS {n} images: {rss[n]['peak_main_mib']:.1f} MiB", flush=True)
    finally:
        ray.shutdown()
    return {"model": args.ray_model, "images": args.images, "size": f"{size[0]}x{size[1]}",
            "batch_size": args.batch_size, "cores": cores, "runs": runs, "driver_rss": rss}


def append_results(r: dict) -> None:
    lines = [f"\n### {r['date']}, {r['cpu']} ({r['cores']} cores), load average {r['loadavg_before']:.2f} before / "
             f"{r['loadavg_after']:.2f} after\n"]
    if "throughput" in r:
        t = r["throughput"]
        best = max(t["model_only_img_s"])
        lines.append(f"ViT-B/16 (random init, ORT CPU fp32, default threads), {t['images']} JPEGs of {t['size']}, "
                     f"batch {t['batch_size']}, cls pooling, float32 shards.\n")
        lines.append(f"Model only (runner.encode on preprocessed batches): {t['model_only_img_s'][0]:.2f} img/s "
                     f"before, {t['model_only_img_s'][1]:.2f} after; ratios use the better, {best:.2f}.\n")
        lines.append("| decode workers | end-to-end img/s (wall incl. start-up) | ratio | steady img/s | ratio "
                     "| start-up s | waiting for decode s | inference s | write s |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for x in t["runs"]:
            lines.append(
                f"| {x['workers']}{' (thread)' if x['workers'] == 0 else ''} | {x['img_s']:.2f} | "
                f"{x['img_s'] / best:.1%} | {x['steady_img_s']:.2f} | {x['steady_img_s'] / best:.1%} | "
                f"{x['startup_s']:.2f} | {x['decode_wait_s']:.2f} | {x['inference_s']:.2f} | {x['write_s']:.2f} |")
    if "memory" in r:
        m = r["memory"]
        a, b = m[1_000], m[10_000]
        lines.append("\nPeak RSS, mae_vit_test, 160x120 JPEGs, default workers, shard size 1000 "
                     "(main process + decode workers, sampled every 20 ms):\n")
        lines.append("| images | peak RSS, whole job (MiB) | peak RSS, main process (MiB) | wall s |")
        lines.append("|---|---|---|---|")
        for n, x in ((1_000, a), (10_000, b)):
            lines.append(f"| {n:,} | {x['peak_tree_mib']:.1f} | {x['peak_main_mib']:.1f} | {x['wall_s']:.1f} |")
        lines.append(f"\n10k / 1k: whole job {b['peak_tree_mib'] / a['peak_tree_mib'] - 1:+.1%}, main process "
                     f"{b['peak_main_mib'] / a['peak_main_mib'] - 1:+.1%}.")
    if "ray" in r:
        lines += ray_lines(r["ray"])
    text = "\n".join(lines) + "\n"
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in existing:
        existing = existing.rstrip("\n") + f"\n\n{SECTION}\n\nWritten by benchmarks/bench_extract.py.\n"
    # Insert at the end of our section (before the next "## " heading), so other sections stay intact.
    start = existing.index(SECTION)
    nxt = existing.find("\n## ", start + len(SECTION))
    end = len(existing) if nxt == -1 else nxt + 1
    RESULTS.write_text(existing[:end].rstrip("\n") + "\n" + text + ("\n" + existing[end:] if nxt != -1 else ""))
    print(f"appended to {RESULTS}")


def ray_lines(x: dict) -> list[str]:
    local = x["runs"][0]
    lines = [f"\nRay Data engine vs local (issue #13): {x['model']} (random init, ORT CPU fp32), {x['images']} JPEGs "
             f"of {x['size']}, batch {x['batch_size']}, cls pooling; local Ray with {x['cores']} CPUs started "
             "before the timed runs. Wall time includes each job's own start-up (Ray: actors loading the model).\n",
             "| engine | img/s (wall) | vs local | steady img/s | vs local | start-up s |", "|---|---|---|---|---|---|"]
    for run in x["runs"]:
        lines.append(f"| {run['engine']} | {run['img_s']:.2f} | {run['img_s'] / local['img_s']:.2f}x | "
                     f"{run['steady_img_s']:.2f} | {run['steady_img_s'] / local['steady_img_s']:.2f}x | "
                     f"{run['startup_s']:.2f} |")
    a, b = x["driver_rss"][1_000], x["driver_rss"][10_000]
    lines.append(f"\nRay driver peak RSS (the CLI process alone, mae_vit_test, 160x120 JPEGs): 1,000 images "
                 f"{a['peak_main_mib']:.1f} MiB, 10,000 images {b['peak_main_mib']:.1f} MiB "
                 f"({b['peak_main_mib'] / a['peak_main_mib'] - 1:+.1%}).")
    return lines


if __name__ == "__main__":
    main()
