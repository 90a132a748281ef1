"""Batch extraction benchmark (issue #5).

1. Throughput, ViT-B/16 (random init, exported bundle) on CPU: end-to-end images/s of ``extract_features``
   (JPEG decode, resize, inference, shard writing; wall time including start-up, and the steady state
   after it) against the same runner's model-only images/s on already preprocessed batches. Model-only is
   measured before and after the end-to-end runs (the machine is shared) and the better of the two is used,
   so the ratio errs against the pipeline.
2. Memory, tiny model (mae_vit_test): peak RSS of the whole job (main process + decode workers, sampled every
   20 ms) for 1k and 10k images.
3. ``--runner null|ort|torch`` (issue #21): where the pipeline's ceiling is. With the null runner (zeros at
   once, a diagnostic) it measures the decode workers' capacity alone (``decode_capacity_img_s``: the same
   workers decoding with nothing downstream) against the whole pipeline (``pipeline_img_s``), with the time
   per stage, and the parent's own ceiling: pre-decoded images (workers hand over a cached image) into the
   null runner, per transport (shared memory / pipes) and transfer (uint8 / float32), in images per second
   of the parent's CPU time. With a real runner it also measures the encoder's own rate at the same batch and
   precision (``model_only_img_s``). ``--json FILE`` writes these numbers.
4. ``--ray`` (issue #13): the Ray Data engine against the local engine on the same JPEGs and machine, in one
   run: local (default workers), Ray with 1 encoder actor (inference threads = cores, like local) and with 2
   actors (1 thread each), on a local Ray started once by this script (its start-up is not timed). Then the
   peak RSS of the Ray driver process alone (the CLI, joining that Ray) for 1k and 10k small images.

    python benchmarks/bench_extract.py                 # both parts, appends to benchmarks/RESULTS.md
    python benchmarks/bench_extract.py --images 200 --no-append   # a quicker look
    python benchmarks/bench_extract.py --ray --skip-throughput --skip-memory --images 160   # Ray vs local only
    python benchmarks/bench_extract.py --runner null --images 2000 --json pipeline.json     # the pipeline alone
    python benchmarks/bench_extract.py --runner torch --device cuda --precision fp16 --decoder torch \
        --images 8192 --batch-size 128 --workers 15 --json gpu.json                          # on a GPU machine

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
SECTION_PIPELINE = "## Extraction pipeline capacity (issue #21)"


def cpu_model() -> str:
    return cpu_model_and_flags()[0]


def export(name: str, dst: Path, reference_weights: bool = False) -> Path:
    if (dst / "mae.json").is_file():
        return dst
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    export_bundle(
        create_model(name).eval(),
        dst,
        parts=["encoder"],
        verify=False,
        progress=None,
        reference_weights=reference_weights,
    )
    return dst


def make_jpegs(dst: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """n JPEGs of about ``size`` (w, h), crops of scikit-image photos: what an ImageNet-like folder costs to decode."""
    from PIL import Image
    from skimage import data

    dst.mkdir(parents=True, exist_ok=True)
    photos = [
        Image.fromarray(getattr(data, k)()).convert("RGB")
        for k in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    ]
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
    return {"peak_tree_mib": peak_tree / 2**20, "peak_main_mib": peak_main / 2**20, "wall_s": time.perf_counter() - t0}


def small_job_rss(cache: Path, n: int, prefix: str, *extra: str) -> dict:
    """Peak RSS of `mae-deploy extract` over the first ``n`` of 10,000 small JPEGs (mae_vit_test, shards of
    1000); ``extra`` CLI options choose the engine. The bundle and the JPEGs are made once in ``cache``."""
    tiny = export("mae_vit_test", cache / "tiny")
    paths = make_jpegs(cache / "jpeg_small", 10_000, (160, 120), seed=1)
    lst = cache / f"small_{n}.txt"
    lst.write_text("\n".join(paths[:n]) + "\n")
    out = Path(tempfile.mkdtemp(prefix=f"{prefix}{n}-", dir=cache))
    return peak_rss_of_job(
        [
            sys.executable,
            "-m",
            "mae_deploy.cli",
            "extract",
            str(lst),
            "--bundle",
            str(tiny),
            "--out",
            str(out),
            "--no-progress",
            "--shard-size",
            "1000",
            *extra,
        ]
    )


# -- issue #21: the pipeline's own capacity ------------------------------------------------------------------


def _warm(_: int) -> int:
    import mae_deploy.extract.decode  # noqa: F401  (imports paid before the clock starts)

    return os.getpid()


def _decode_chunk(items: list, decoder_args: dict) -> int:
    from mae_deploy.extract.decode import Decoder

    dec = Decoder(**decoder_args)
    shape, dtype = dec.pixel_layout()
    out = np.empty((len(items), *shape), dtype)  # as a worker writing into its slot: no stacking copy
    return len(dec.decode_batch(items, out=out).rows)


def decode_capacity(paths: list[str], decoder_args: dict, workers: int, batch_size: int) -> float:
    """img/s of ``workers`` processes decoding batches with nothing downstream (no transfer, no consumer)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from itertools import repeat

    chunks = [list(enumerate(paths[i : i + batch_size], i)) for i in range(0, len(paths), batch_size)]
    with ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_warm, range(max(1, workers))))
        t0 = time.perf_counter()
        n = sum(ex.map(_decode_chunk, chunks, repeat(decoder_args)))
        return n / (time.perf_counter() - t0)


def run_job(lst: Path, bundle: Path, cache: Path, **kw) -> dict:
    """One extract_features job; wall and steady img/s, stage times per image (ms).

    Steady: the images after the first batch over the time after it (the workers' start-up, a second or so
    on a busy 2-core machine, is not the pipeline's throughput).
    """
    from mae_deploy.extract import extract_features

    out = Path(tempfile.mkdtemp(prefix="pipe-", dir=cache))
    s = extract_features(lst, bundle, out, progress=False, **kw)
    t = s.timings
    first = min(kw.get("batch_size", 32), s.processed - 1)
    steady = (s.processed - first) / (s.wall_s - t["startup_s"] - t["first_batch_s"])
    per_img = {
        k.removesuffix("_s") + "_ms_per_img": 1e3 * v / max(1, s.processed)
        for k, v in t.items()
        if k.endswith("_s") and k not in ("startup_s", "first_batch_s")
    }
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return {
        "images": s.processed,
        "failed": s.failed,
        "wall_s": s.wall_s,
        "img_s": s.images_per_s,
        "steady_img_s": steady,
        "startup_s": t["startup_s"],
        "first_batch_s": t["first_batch_s"],
        **per_img,
    }


def parent_ceiling(
    lst: Path, bundle: Path, cache: Path, *, workers: int, batch_size: int, transfer: str, shared_memory: bool
) -> dict:
    """Pre-decoded images into the null runner: what the parent alone can take in.

    The workers (forked, so they inherit the patch) hand over one cached model image per row instead of
    decoding; the parent's CPU time (all its threads, not the workers') per image is the number that holds
    whatever the core count: images per parent-CPU-second.
    """
    import functools
    import resource

    import mae_deploy.extract.decode as decode
    import mae_deploy.extract.local as local
    from mae_deploy.bundle import Bundle
    from mae_deploy.extract.workers import DecodeWorkers

    b = Bundle.load(bundle)
    args = {
        "preprocessing": b.preprocessing,
        "in_chans": b.in_chans,
        "min_side": 16,
        "max_pixels": 0,
        "transfer": transfer,
    }
    cached = decode.Decoder(**args)
    shape, dtype = cached.pixel_layout()
    image = np.random.default_rng(0).integers(0, 255, shape).astype(dtype)
    original_decode, original_pool = decode.Decoder.decode_one, local.DecodeWorkers
    decode.Decoder.decode_one = lambda self, row, path: image
    local.DecodeWorkers = functools.partial(DecodeWorkers, shared_memory=shared_memory)
    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        r = run_job(
            lst,
            bundle,
            cache,
            backend="null",
            workers=workers,
            batch_size=batch_size,
            transfer=transfer,
            start_method="fork",
        )
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        decode.Decoder.decode_one, local.DecodeWorkers = original_decode, original_pool
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {
        "transport": "shared_memory" if shared_memory else "pipe",
        "transfer": transfer,
        "parent_cpu_s": cpu,
        "img_per_parent_cpu_s": r["images"] / cpu,
        **r,
    }


def null_bundle(cache: Path) -> Path:
    """A tiny encoder at 224x224 / patch 16: the null runner needs only the bundle's shapes."""
    dst = cache / "null_224"
    if (dst / "mae.json").is_file():
        return dst
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    export_bundle(
        create_model("mae_vit_test", img_size=224, patch_size=16).eval(),
        dst,
        parts=["encoder"],
        verify=False,
        progress=None,
    )
    return dst


def pipeline_bench(args, cache: Path, size: tuple[int, int]) -> dict:
    """Decode capacity vs the pipeline (per stage), the parent's ceiling, and (real runners) the encoder alone."""
    w, h = size
    paths = make_jpegs(cache / f"jpeg_{w}x{h}", args.images, size)[: args.images]
    lst = cache / f"pipe_{w}x{h}_{args.images}.txt"
    lst.write_text("\n".join(paths) + "\n")
    # reference weights: the torch runner runs them
    bundle = null_bundle(cache) if args.runner == "null" else export(args.model, cache / f"{args.model}_ref", True)
    workers = int(args.workers.split(",")[-1]) if args.workers else None
    from mae_deploy.bundle import Bundle
    from mae_deploy.extract.plan import default_workers

    workers = default_workers() if workers is None else workers
    b = Bundle.load(bundle)
    transfer = args.transfer
    decoder_args = {
        "preprocessing": b.preprocessing,
        "in_chans": b.in_chans,
        "min_side": 16,
        "max_pixels": 89_478_485,
        "transfer": transfer,
    }
    res: dict = {
        "runner": args.runner,
        "device": args.device,
        "precision": args.precision,
        "decoder": args.decoder,
        "model": "null (tiny 224x224 bundle)" if args.runner == "null" else args.model,
        "images": len(paths),
        "size": f"{w}x{h}",
        "batch_size": args.batch_size,
        "workers": workers,
        "transfer": transfer,
    }
    job = {
        "backend": args.runner,
        "device": args.device,
        "precision": args.precision,
        "workers": workers,
        "batch_size": args.batch_size,
        "transfer": transfer,
    }
    if args.decoder != "pil":
        job["decoder"] = args.decoder
    if args.runner != "null":
        res["model_only_img_s"] = model_only_rate(bundle, args)
        print(f"model only: {res['model_only_img_s']:.1f} img/s", flush=True)
    if args.decoder == "pil":
        before = decode_capacity(paths, decoder_args, workers, args.batch_size)
    run_job(lst, bundle, cache, **job)  # warm-up: page cache, lazy imports, kernels
    res["pipeline"] = run_job(lst, bundle, cache, **job)
    res["pipeline_img_s"] = res["pipeline"]["steady_img_s"]
    print(f"pipeline: {json.dumps(_rounded(res['pipeline']))}", flush=True)
    if args.decoder == "pil":
        # Before and after the pipeline (the machine may be shared); the better one, so the ratio errs against
        # the pipeline.
        res["decode_capacity_runs"] = [before, decode_capacity(paths, decoder_args, workers, args.batch_size)]
        res["decode_capacity_img_s"] = max(res["decode_capacity_runs"])
        res["pipeline_vs_decode"] = res["pipeline_img_s"] / res["decode_capacity_img_s"]
        print(
            f"decode capacity ({workers} workers): {res['decode_capacity_img_s']:.1f} img/s; pipeline / decode "
            f"= {res['pipeline_vs_decode']:.3f}",
            flush=True,
        )
    if "model_only_img_s" in res:
        res["pipeline_vs_model"] = res["pipeline_img_s"] / res["model_only_img_s"]
        print(f"pipeline / model only = {res['pipeline_vs_model']:.3f}", flush=True)
    if args.runner == "null" and not args.skip_ceiling:
        nb = null_bundle(cache)
        big = cache / f"pipe_ceiling_{args.ceiling_images}.txt"
        big.write_text("\n".join(paths[i % len(paths)] for i in range(args.ceiling_images)) + "\n")
        res["parent_ceiling"] = []
        for shared_memory in (True, False):
            for tr in ("float32", "uint8"):
                r = parent_ceiling(
                    big,
                    nb,
                    cache,
                    workers=workers,
                    batch_size=args.batch_size,
                    transfer=tr,
                    shared_memory=shared_memory,
                )
                res["parent_ceiling"].append(r)
                print(
                    f"parent ceiling {r['transport']}/{tr}: {r['img_per_parent_cpu_s']:.0f} img per parent CPU-s, "
                    f"{r['steady_img_s']:.0f} img/s wall",
                    flush=True,
                )
    return res


def model_only_rate(bundle: Path, args) -> float:
    """img/s of FeatureExtractor.extract_pixels on one preprocessed batch (host float32), after warm-up."""
    from mae_deploy.features import FeatureExtractor

    with FeatureExtractor(
        bundle, backend=args.runner, device=args.device, precision=args.precision, batch_size=args.batch_size
    ) as fx:
        b = fx.bundle
        x = np.random.default_rng(0).standard_normal((args.batch_size, b.in_chans, b.image_size, b.image_size))
        x = x.astype(np.float32)
        for _ in range(3):
            fx.extract_pixels(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.model_seconds:
            fx.extract_pixels(x)
            n += args.batch_size
        return n / (time.perf_counter() - t0)


def _rounded(d: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def pipeline_lines(r: dict, x: dict) -> list[str]:
    """RESULTS.md lines of one --runner run."""
    lines = [
        f"\nPipeline capacity (issue #21), `--runner {x['runner']}` ({x['model']}), device {x['device']}, "
        f"{x['precision']}, decoder {x['decoder']}, transfer {x['transfer']}: {x['images']} JPEGs of {x['size']}, "
        f"batch {x['batch_size']}, {x['workers']} decode workers.\n"
    ]
    p = x["pipeline"]
    stages = ", ".join(f"{k.removesuffix('_ms_per_img')} {v:.3f}" for k, v in p.items() if k.endswith("_ms_per_img"))
    lines.append(
        f"- pipeline (steady, after start-up): **{x['pipeline_img_s']:.1f} img/s** (wall incl. start-up "
        f"{p['img_s']:.1f}); per image, ms: {stages}"
    )
    if "decode_capacity_img_s" in x:
        lines.append(
            f"- decode capacity (the same {x['workers']} workers decoding, nothing downstream): "
            f"{x['decode_capacity_img_s']:.1f} img/s; **pipeline / decode = {x['pipeline_vs_decode']:.3f}** "
            "(target >= 0.9)"
        )
    if "model_only_img_s" in x:
        lines.append(
            f"- encoder alone (extract_pixels, host float32 batch): {x['model_only_img_s']:.1f} img/s; "
            f"**pipeline / encoder = {x['pipeline_vs_model']:.3f}**"
        )
    if x.get("parent_ceiling"):
        lines += [
            "",
            "Parent ceiling: pre-decoded images (forked workers hand over a cached model image) into the "
            "null runner; the parent's CPU time (all its threads, not the workers') per image:",
            "",
            "| transport | transfer | img per parent CPU-second | wall img/s | parent CPU s | images |",
            "|---|---|---|---|---|---|",
        ]
        for c in x["parent_ceiling"]:
            lines.append(
                f"| {c['transport']} | {c['transfer']} | {c['img_per_parent_cpu_s']:.0f} | "
                f"{c['steady_img_s']:.0f} | {c['parent_cpu_s']:.2f} | {c['images']} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="JPEGs for the ViT-B throughput runs")
    ap.add_argument("--size", default="500x375", help="JPEG size WxH (ImageNet's typical is ~500x375)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--workers",
        default=None,
        help="decode worker counts to compare [0,1,2]; --runner: one count [cores - 1, at most 8]",
    )
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mae-deploy-bench-extract")
    ap.add_argument("--no-append", action="store_true", help="print results only")
    ap.add_argument("--ray", action="store_true", help="also compare --engine ray with --engine local")
    ap.add_argument("--ray-model", default="mae_vit_base_patch16", help="model for the Ray comparison")
    ap.add_argument(
        "--runner",
        choices=["null", "ort", "torch", "trt"],
        default=None,
        help="issue #21: pipeline capacity with this runner (null: a diagnostic returning zeros)",
    )
    ap.add_argument("--model", default="mae_vit_base_patch16", help="--runner other than null: the model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--decoder", default="pil", help="--runner: pil or torch")
    ap.add_argument("--transfer", default="float32", choices=["uint8", "float32"])
    ap.add_argument("--model-seconds", type=float, default=10.0, help="--runner: seconds of encoder-alone timing")
    ap.add_argument("--ceiling-images", type=int, default=20_000, help="--runner null: rows of the parent ceiling")
    ap.add_argument("--skip-ceiling", action="store_true", help="--runner null: skip the parent ceiling")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON to this file")
    args = ap.parse_args()
    if args.runner:  # the issue #5 parts are their own runs
        args.skip_throughput = args.skip_memory = True
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    w, h = map(int, args.size.split("x"))
    results: dict = {
        "date": dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_before": os.getloadavg()[0],
    }

    if not args.skip_throughput:
        bundle = export("mae_vit_base_patch16", cache / "vit_b16")
        src = cache / f"jpeg_{w}x{h}"
        make_jpegs(src, args.images, (w, h))
        lst = cache / f"jpeg_{w}x{h}_{args.images}.txt"
        lst.write_text("\n".join(sorted(str(p) for p in src.rglob("*.jpg"))[: args.images]) + "\n")
        before = model_only(bundle, args.batch_size, 20, {})
        print(f"model-only: {before:.2f} img/s", flush=True)
        runs = []
        for workers in map(int, (args.workers or "0,1,2").split(",")):
            out = Path(tempfile.mkdtemp(prefix="e2e-", dir=cache))
            r = end_to_end(lst, bundle, out, batch_size=args.batch_size, workers=workers)
            r["workers"] = workers
            runs.append(r)
            print(
                f"end-to-end workers={workers}: {r['img_s']:.2f} img/s (steady {r['steady_img_s']:.2f}), "
                f"timings {json.dumps({k: round(v, 2) for k, v in r.items() if k.endswith('_s')})}",
                flush=True,
            )
        after = model_only(bundle, args.batch_size, 20, {})
        print(f"model-only (after): {after:.2f} img/s", flush=True)
        results["throughput"] = {
            "model_only_img_s": [before, after],
            "runs": runs,
            "images": args.images,
            "size": args.size,
            "batch_size": args.batch_size,
        }

    if not args.skip_memory:
        mem = {}
        for n in (1_000, 10_000):
            mem[n] = small_job_rss(cache, n, "rss")
            print(f"RSS {n} images: {json.dumps({k: round(v, 1) for k, v in mem[n].items()})}", flush=True)
        results["memory"] = mem
    if args.ray:
        results["ray"] = ray_vs_local(args, cache, (w, h))
    if args.runner:
        pipe = pipeline_bench(args, cache, (w, h))
        results["pipeline"] = pipe
        for k in ("decode_capacity_img_s", "pipeline_img_s", "model_only_img_s"):
            if k in pipe:
                results[k] = pipe[k]
    results["loadavg_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=1, default=float))
    if args.json:
        from mae_deploy.fileio import atomic_write_json

        atomic_write_json(args.json, results)
        print(f"wrote {args.json}")
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
        configs = [
            ("local", {"engine": "local"}),
            ("ray, 1 actor", {"engine": "ray", "actors": 1, "cpus_per_actor": 1, "threads": cores}),
            (
                "ray, 2 actors",
                {"engine": "ray", "actors": 2, "cpus_per_actor": (cores - 1) / 2, "threads": max(1, (cores - 1) // 2)},
            ),
        ]
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
    return {
        "model": args.ray_model,
        "images": args.images,
        "size": f"{size[0]}x{size[1]}",
        "batch_size": args.batch_size,
        "cores": cores,
        "runs": runs,
        "driver_rss": rss,
    }


def append_results(r: dict) -> None:
    lines = [
        f"\n### {r['date']}, {r['cpu']} ({r['cores']} cores), load average {r['loadavg_before']:.2f} before / "
        f"{r['loadavg_after']:.2f} after\n"
    ]
    if "throughput" in r:
        t = r["throughput"]
        best = max(t["model_only_img_s"])
        lines.append(
            f"ViT-B/16 (random init, ORT CPU fp32, default threads), {t['images']} JPEGs of {t['size']}, "
            f"batch {t['batch_size']}, cls pooling, float32 shards.\n"
        )
        lines.append(
            f"Model only (runner.encode on preprocessed batches): {t['model_only_img_s'][0]:.2f} img/s "
            f"before, {t['model_only_img_s'][1]:.2f} after; ratios use the better, {best:.2f}.\n"
        )
        lines.append(
            "| decode workers | end-to-end img/s (wall incl. start-up) | ratio | steady img/s | ratio "
            "| start-up s | waiting for decode s | inference s | write s |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for x in t["runs"]:
            lines.append(
                f"| {x['workers']}{' (thread)' if x['workers'] == 0 else ''} | {x['img_s']:.2f} | "
                f"{x['img_s'] / best:.1%} | {x['steady_img_s']:.2f} | {x['steady_img_s'] / best:.1%} | "
                f"{x['startup_s']:.2f} | {x['decode_wait_s']:.2f} | {x['inference_s']:.2f} | {x['write_s']:.2f} |"
            )
    if "memory" in r:
        m = r["memory"]
        a, b = m[1_000], m[10_000]
        lines.append(
            "\nPeak RSS, mae_vit_test, 160x120 JPEGs, default workers, shard size 1000 "
            "(main process + decode workers, sampled every 20 ms):\n"
        )
        lines.append("| images | peak RSS, whole job (MiB) | peak RSS, main process (MiB) | wall s |")
        lines.append("|---|---|---|---|")
        for n, x in ((1_000, a), (10_000, b)):
            lines.append(f"| {n:,} | {x['peak_tree_mib']:.1f} | {x['peak_main_mib']:.1f} | {x['wall_s']:.1f} |")
        lines.append(
            f"\n10k / 1k: whole job {b['peak_tree_mib'] / a['peak_tree_mib'] - 1:+.1%}, main process "
            f"{b['peak_main_mib'] / a['peak_main_mib'] - 1:+.1%}."
        )
    if "ray" in r:
        lines += ray_lines(r["ray"])
    if "pipeline" in r:
        lines += pipeline_lines(r, r["pipeline"])
    text = "\n".join(lines) + "\n"
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = SECTION_PIPELINE if "pipeline" in r else SECTION
    if section not in existing:
        existing = existing.rstrip("\n") + f"\n\n{section}\n\nWritten by benchmarks/bench_extract.py.\n"
    # Insert at the end of our section (before the next "## " heading), so other sections stay intact.
    start = existing.index(section)
    nxt = existing.find("\n## ", start + len(section))
    end = len(existing) if nxt == -1 else nxt + 1
    RESULTS.write_text(existing[:end].rstrip("\n") + "\n" + text + ("\n" + existing[end:] if nxt != -1 else ""))
    print(f"appended to {RESULTS}")


def ray_lines(x: dict) -> list[str]:
    local = x["runs"][0]
    lines = [
        f"\nRay Data engine vs local (issue #13): {x['model']} (random init, ORT CPU fp32), {x['images']} JPEGs "
        f"of {x['size']}, batch {x['batch_size']}, cls pooling; local Ray with {x['cores']} CPUs started "
        "before the timed runs. Wall time includes each job's own start-up (Ray: actors loading the model).\n",
        "| engine | img/s (wall) | vs local | steady img/s | vs local | start-up s |",
        "|---|---|---|---|---|---|",
    ]
    for run in x["runs"]:
        lines.append(
            f"| {run['engine']} | {run['img_s']:.2f} | {run['img_s'] / local['img_s']:.2f}x | "
            f"{run['steady_img_s']:.2f} | {run['steady_img_s'] / local['steady_img_s']:.2f}x | "
            f"{run['startup_s']:.2f} |"
        )
    a, b = x["driver_rss"][1_000], x["driver_rss"][10_000]
    lines.append(
        f"\nRay driver peak RSS (the CLI process alone, mae_vit_test, 160x120 JPEGs): 1,000 images "
        f"{a['peak_main_mib']:.1f} MiB, 10,000 images {b['peak_main_mib']:.1f} MiB "
        f"({b['peak_main_mib'] / a['peak_main_mib'] - 1:+.1%})."
    )
    return lines


if __name__ == "__main__":
    main()
