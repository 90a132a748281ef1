"""The benchmark run: every backend x precision x part x batch x visible count, one row each.

How the clock works:

- Every call is timed on the host with ``time.perf_counter_ns`` around ``runner.encode``/``decode``.
  Runners take and return host numpy arrays, so a GPU call has finished (and its output is copied back)
  when the call returns: wall-clock latency therefore includes host-device copies and synchronisation,
  like trtexec's "Latency" (not its "GPU Compute Time").
- For the torch backend on CUDA the rows also carry ``gpu_compute_ms``: the model alone on inputs already
  on the device, timed with CUDA events (like trtexec's "GPU Compute Time"), and the peak device memory
  from ``torch.cuda.max_memory_allocated``. ONNX Runtime and TensorRT allocate device memory outside
  torch's allocator, so their device memory is reported as null with that reason.
- Warm-up calls are excluded (the first one is kept as ``first_call_ms``); the garbage collector is
  paused during the timed loop; thread counts are pinned (ORT intra-op = T, inter-op = 1; torch and
  OpenVINO T).
- Each row's ``compute``: the FLOPs of the call (``flops.part_flops``), the rate reached at the p50
  latency, and its share of the MatMul peak the same backend reaches at that precision in this run
  (``peak.PeakProbes``).

GPU paths: CUDA events, device memory, the torch reference on a GPU host, TensorRT rows (what has run
where: docs/verification.md).
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import time
from dataclasses import asdict

from mae_deploy import __version__
from mae_deploy.bench.build import build_runner, runner_threads
from mae_deploy.bench.config import BenchConfig, visible_counts
from mae_deploy.bench.flops import part_flops
from mae_deploy.bench.machine import (
    CpuShare,
    PeakRss,
    cpu_model_and_flags,
    default_threads,
    int8_isa,
    load_average,
    machine_info,
)
from mae_deploy.bench.peak import PeakProbes, compute, model_shapes
from mae_deploy.bench.schema import ROW_KEYS, RUNNER_KEYS, SCHEMA_VERSION, jsonable
from mae_deploy.bench.stats import agreement, latency_stats, time_calls
from mae_deploy.bench.workloads import Reference, Workloads, compute_reference, load_images

_TIMING = (
    "wall-clock (perf_counter) around the runner call; host arrays in and out, so GPU work is "
    "synchronised by the copy back"
)


def torch_gpu_compute(runner, part: str, pixels, keep, latent, restore, warmup: int, n: int) -> dict:
    """The model alone on device-resident inputs, timed with CUDA events (trtexec's GPU Compute Time).

    Not run here (no GPU). Uses the TorchRunner's ``model``, ``torch`` and ``precision`` attributes.
    """
    torch = runner.torch
    dev = torch.device(runner.device)
    model = runner.model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(runner.precision)
    x = torch.from_numpy(pixels).to(dev)
    k = torch.from_numpy(keep).to(dev)
    r = torch.from_numpy(restore).to(dev)
    lat = torch.from_numpy(latent).to(dev) if latent is not None else None

    def call():
        if part == "encoder":
            return model.forward_encoder(x, k)
        if part == "decoder":
            return model.forward_decoder(lat, r)
        return model.forward_decoder(model.forward_encoder(x, k), r)

    times = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(warmup):
            call()
        torch.cuda.synchronize(dev)
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return latency_stats(times)


def row_isa(precision: str, device: str) -> str | None:
    """The int8 instruction set an int8 row ran on: the CPU's best (``machine.int8_isa``); None for float rows
    and on a GPU. The same int8 graph runs ~2x apart between AVX2 and VNNI, so an int8 row means little without it."""
    if not precision.startswith("int8") or device != "cpu":
        return None
    return _cpu_int8_isa()


@functools.cache
def _cpu_int8_isa() -> str:
    return int8_isa(cpu_model_and_flags()[1])


def empty_row(backend: str, precision: str, device: str, part: str, batch: int, visible: int) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(
        backend=backend,
        precision=precision,
        device=device,
        part=part,
        batch=batch,
        visible=visible,
        int8_isa=row_isa(precision, device),
    )
    return row


def _call_for(runner, part: str, work: Workloads, ref: Reference, b: int, k: int):
    """(the timed call, the reference output it is checked against or None)."""
    pixels = work.pixels(b)
    keep, restore = work.ids(b, k)
    ref_latent = ref.latent.get((b, k))
    if part == "encoder":
        return (lambda: runner.encode(pixels, keep)), ref_latent
    if part == "decoder":
        # Fed the reference latent when there is one, so the decoder's own error is what is measured.
        latent = ref_latent if ref_latent is not None else runner.encode(pixels, keep)
        return (lambda: runner.decode(latent, restore)), ref.pred.get((b, k))
    return (lambda: runner.decode(runner.encode(pixels, keep), restore)), ref.pred.get((b, k))


def bench_row(
    row: dict,
    runner,
    work: Workloads,
    ref: Reference,
    config: BenchConfig,
    rss: PeakRss,
    probe: dict | None,
    arch: dict,
) -> None:
    """Measure one row in place: latency statistics, memory, agreement and compute."""
    b, k, part = row["batch"], row["visible"], row["part"]
    call, expected = _call_for(runner, part, work, ref, b, k)
    torch_cuda = row["backend"] == "torch" and row["device"].startswith("cuda")
    if torch_cuda:
        runner.torch.cuda.reset_peak_memory_stats(runner.device)
    rss.reset()
    # The first call's output is the one checked against the reference. It is always excluded from the
    # statistics (it is the first warm-up call; with --warmup 0 the only excluded one) and kept as first_call_ms.
    t0 = time.perf_counter_ns()
    out = call()
    first = (time.perf_counter_ns() - t0) / 1e6
    samples, _ = time_calls(call, max(config.warmup - 1, 0), config.effective_iters, config.duration)
    stats = latency_stats(samples)
    row.update(
        status="ok",
        warmup=config.warmup,
        iterations=len(samples),
        latency_ms=stats,
        first_call_ms=first,
        throughput_ips=b * 1000.0 / stats["mean"],
        peak_rss_mb=round(rss.peak_mb(), 1),
        rss_scope=rss.scope,
        timing=_TIMING,
        compute=compute(part_flops(arch, part, b, k), stats["p50"], probe, row["precision"]),
    )
    if torch_cuda:
        keep, restore = work.ids(b, k)
        latent = ref.latent.get((b, k))
        row["peak_device_mem_mb"] = runner.torch.cuda.max_memory_allocated(runner.device) / 2**20
        row["device_mem_note"] = "torch.cuda.max_memory_allocated"
        row["gpu_compute_ms"] = torch_gpu_compute(
            runner,
            part,
            work.pixels(b),
            keep,
            latent if latent is not None else runner.encode(work.pixels(b), keep),
            restore,
            config.warmup,
            len(samples),
        )
    elif row["device"] == "cpu":
        row["device_mem_note"] = "cpu run: no device memory"
    else:
        row["device_mem_note"] = (
            f"not measured: {row['backend']} allocates device memory outside torch's "
            "allocator (use nvidia-smi or Nsight for it)"
        )
    if expected is not None:
        row["agreement"] = agreement(out, expected, ref.name, pooled=part == "encoder")


def _runner_rows(
    runner,
    entry: dict,
    config: BenchConfig,
    visibles: list[int],
    work: Workloads,
    ref: Reference,
    rss: PeakRss,
    probe: dict | None,
    arch: dict,
    bar,
) -> list[dict]:
    """The rows of one built runner; a row that raises is "failed" and the others still run."""
    rows = []
    for part in config.parts:
        for b in config.batch_sizes:
            for k in visibles:
                row = empty_row(entry["backend"], entry["precision"], config.device, part, b, k)
                row.update(build_s=entry["build_s"], threads=entry["threads"])
                rows.append(row)
                bar.set_postfix_str(f"{entry['backend']} {entry['precision']} {part} b{b} k{k}")
                if part != "encoder" and not runner.has_decoder:
                    row.update(status="skipped", reason="the bundle has no decoder (encoder-only)")
                else:
                    try:
                        bench_row(row, runner, work, ref, config, rss, probe, arch)
                    except Exception as e:  # one failing row (e.g. out of memory) must not lose the rest
                        row.update(status="failed", reason=f"{type(e).__name__}: {e}")
                bar.update(1)
    return rows


def _own_shapes(bundle, config: BenchConfig, visibles: list[int]) -> list[dict]:
    """The bundle's own MatMul shapes at the run's largest batch and visible count, for the peak probes."""
    from mae_deploy.errors import InputError

    decoder = bundle.has_decoder and any(p != "encoder" for p in config.parts)
    try:
        return model_shapes(bundle.architecture, max(config.batch_sizes), max(visibles), decoder=decoder)
    except InputError:  # an architecture the FLOP count cannot read: the generic shapes alone
        return []


def run_benchmark(bundle, config: BenchConfig, progress: bool = True) -> dict:
    """Run every combination of ``config`` on ``bundle`` (a Bundle or a path); returns the results dict.

    Combinations unavailable here (a missing package or device) or not offered (a precision the backend
    or the bundle lacks, a decoder part on an encoder-only bundle) become rows with status "skipped" and
    the reason; a row whose run raised becomes status "failed" with the error. Bad input (a graph that
    cannot be loaded, unreadable weights) raises InputError before or while building, never a skipped row.
    """
    from tqdm import tqdm

    from mae_deploy.bundle import Bundle

    config.validate()
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    visibles = visible_counts(bundle.num_patches, config.visible, config.mask_ratios)
    threads = config.threads or default_threads()
    load_start = load_average()
    cpu_share = CpuShare()
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Real images are read before anything is timed: an unreadable --images fails here, not after the run.
    images = load_images(bundle, config.images, max(config.batch_sizes)) if config.images is not None else None
    work = Workloads(bundle, config.seed, images)
    ref = compute_reference(bundle, config, work, visibles, threads, progress)
    peaks = PeakProbes(threads, enabled=config.peak, shapes=_own_shapes(bundle, config, visibles))

    rows: list[dict] = []
    runners: list[dict] = []
    rss = PeakRss()
    per_runner = len(config.parts) * len(config.batch_sizes) * len(visibles)
    bar = tqdm(
        total=len(config.backends) * len(config.precisions) * per_runner,
        desc="bench",
        disable=not progress,
        leave=False,
    )
    for backend in config.backends:
        for precision in config.precisions:
            entry = dict.fromkeys(RUNNER_KEYS)
            entry.update(backend=backend, precision=precision, device=config.device)
            runners.append(entry)
            runner, build_s, reason = build_runner(
                bundle,
                backend,
                precision,
                config.device,
                threads,
                config.checkpoint,
                config.parts,
                max(config.batch_sizes),
                compile_model=backend in config.compile,
            )
            if runner is None:
                entry.update(status="skipped", reason=reason)
                for part in config.parts:
                    for b in config.batch_sizes:
                        for k in visibles:
                            rows.append(
                                {
                                    **empty_row(backend, precision, config.device, part, b, k),
                                    "status": "skipped",
                                    "reason": reason,
                                }
                            )
                bar.update(per_runner)
                continue
            try:
                entry.update(
                    status="ok",
                    build_s=build_s,
                    threads=runner_threads(runner.info, backend),
                    providers=list(runner.info.providers),
                    details=jsonable(runner.info.details),
                )
                probe = peaks.get(backend, precision, config.device)
                own = _runner_rows(runner, entry, config, visibles, work, ref, rss, probe, bundle.architecture, bar)
                probe = peaks.confirm(backend, precision, config.device)
                for row in own:
                    if row["status"] == "ok":  # against the better of the two probes
                        row["compute"] = compute(row["compute"]["flops"], row["latency_ms"]["p50"], probe, precision)
                rows += own
                entry["providers"] = list(runner.info.providers)  # sessions created lazily show up now
            finally:
                runner.close()
                gc.collect()
    bar.close()
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "mae-deploy bench",
        "mae_deploy_version": __version__,
        "created": created,
        "bundle": {
            "path": str(bundle.path),
            "name": bundle.name,
            "num_patches": bundle.num_patches,
            "image_size": bundle.image_size,
            "patch_size": bundle.patch_size,
            "embed_dim": bundle.embed_dim,
            "graphs": [{"part": g.part, "precision": g.precision, "file": g.file} for g in bundle.graphs],
        },
        "config": {
            **jsonable(asdict(config)),
            "visible_counts": visibles,
            "threads": threads,
            "iters": config.effective_iters,
        },
        "inputs": work.describe(),
        "machine": machine_info(),
        "reference": ref.describe(),
        "runners": runners,
        "rows": rows,
        "load_average": {"start": load_start, "end": load_average(), "other_cpu_share": cpu_share.others()},
        "peaks": peaks.results(),
    }
