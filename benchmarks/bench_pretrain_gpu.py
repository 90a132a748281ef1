"""MAE vs the encoder-w/[M] baseline, one pretraining step each, eager and compiled (issue #22).

One step = what training/pretrain.py does per batch: masking noise, autocast forward, norm-pix loss,
backward, fused AdamW. For each model and decoder depth the four variants (MAE / [M] x eager / compiled)
are timed interleaved, ``--rounds`` rounds of ``--steps`` steps each, so a change of clock or load hits
them alike; medians are reported. Per variant: ms/step, images/s, peak memory of the step (above what was
allocated before it; CUDA-graph pools are held between steps and not counted), FLOPs of one step
(torch.utils.flop_counter: matmuls + attention, forward + backward), achieved TFLOP/s and its share of a
dense matmul probed in the same run (bf16 n=8192 on a GPU). The MAE / [M] speed-up is given eager vs
eager and best vs best, beside the paper's Table 2 (wall-clock on TPU-v3, MAE paper, He et al. 2022).

    python benchmarks/bench_pretrain_gpu.py                          # ViT-L, decoder 8 and 1, on cuda
    python benchmarks/bench_pretrain_gpu.py --models base large huge --decoder-depths 8 1
    python benchmarks/bench_pretrain_gpu.py --device cpu --models tiny --modes eager   # smoke run

``--budget-s`` stops starting new configurations once the next one would not fit (those are listed as
skipped); ``--profile DIR`` writes the profiler's kernel table of every variant and a summary by kind of
kernel (matmul, attention, LayerNorm, gather/scatter/sort, optimizer, fused inductor kernels, other),
with kernel launches per step; ``--json`` / ``--markdown`` write the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mae_deploy.bench import machine_info  # noqa: E402
from mae_deploy.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from training.compiled import begin_step, resolve_compile_mode  # noqa: E402
from training.loop import autocast, resolve_precision  # noqa: E402
from training.model import MaskedAutoencoderViT, get_config  # noqa: E402
from training.optim import make_adamw, param_groups_weight_decay  # noqa: E402
from training.pretrain import MaskTokenMAE  # noqa: E402

# key -> (registry name, label, default batch): the issue's batches for L and H, B at twice L's.
MODELS = {
    "tiny": ("mae_vit_test", "tiny (test)", 8),
    "base": ("mae_vit_base_patch16", "ViT-B/16", 256),
    "large": ("mae_vit_large_patch16", "ViT-L/16", 128),
    "huge": ("mae_vit_huge_patch14", "ViT-H/14", 64),
}
# MAE paper, Table 2: wall-clock speed-up of MAE over the encoder w/ [M] (800 epochs, 128 TPU-v3 cores).
PAPER_TABLE2 = {("large", 8): 2.8, ("large", 1): 3.7, ("huge", 8): 3.5, ("huge", 1): 4.1}
KINDS = ("MAE", "[M]")


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Best TFLOP/s of an n x n x n matmul: the dense peak this run's numbers are a share of."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def step_flops(model: MaskedAutoencoderViT, imgs: torch.Tensor, noise: torch.Tensor, precision: str) -> int:
    """FLOPs of one forward + backward (matmuls and attention), counted on the eager model."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, autocast(imgs.device, precision):
        model(imgs, mask_ratio=0.75, noise=noise)[0].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@dataclass
class Variant:
    """One model kind (MAE / [M]) in one mode (eager / compiled) and what was measured of it."""

    kind: str
    mode: str
    step: Callable[[], float]
    flops: int
    times_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    first_step_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.kind} {self.mode}"

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def make_step(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, imgs: torch.Tensor, num_patches: int, precision: str
) -> Callable[[], float]:
    """One training step as training/pretrain.py runs it (noise drawn outside the model)."""
    device = imgs.device

    def step() -> float:
        begin_step(module)
        optimizer.zero_grad(set_to_none=True)
        noise = torch.rand(imgs.shape[0], num_patches, device=device)
        with autocast(device, precision):
            loss = module(imgs, mask_ratio=0.75, noise=noise)[0]
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def timed(variant: Variant, steps: int, device: torch.device) -> None:
    """Run ``steps`` steps; record the mean time per step and the peak memory above the start."""
    before = 0
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        variant.step()
    sync(device)
    variant.times_s.append((time.perf_counter() - t0) / steps)
    if device.type == "cuda":
        variant.peak_bytes.append(torch.cuda.max_memory_allocated(device) - before)


# --------------------------------------------------------------------------------------------------
# Where the time goes (--profile)
# --------------------------------------------------------------------------------------------------

# Kind of kernel (or op, on the CPU) by name; the first match wins. Heuristic: names differ per library.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    (
        "matmul",
        (
            "gemm",
            "cutlass",
            "xmma",
            "nvjet",
            "cublas",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::linear",
            "aten::matmul",
            "convolution",
            "conv2d",
        ),
    ),
    ("layernorm", ("layer_norm", "layernorm")),
    ("gather/scatter/sort", ("gather", "scatter", "index", "sort", "cat", "where")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("fused inductor", ("triton_", "cpp_fused", "graph_")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_variant(variant: Variant, steps: int, device: torch.device, out_dir: Path) -> dict:
    """Profile ``steps`` steps: write the kernel table; return device time by kind and launches per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            variant.step()
        sync(device)
    averages = prof.key_averages()
    on_gpu = device.type == "cuda"
    by_kind: dict[str, float] = {}
    launches = 0
    for evt in averages:
        if on_gpu:
            # Kernels only: a host op's "self device time" is the time of the kernels it launched, which
            # are also listed as events of their own.
            if evt.device_type != DeviceType.CUDA:
                continue
            us = evt.self_device_time_total
            launches += evt.count
        else:
            us = evt.self_cpu_time_total
            if not evt.key.startswith("aten::"):
                continue
            launches += evt.count
        by_kind[kernel_kind(evt.key)] = by_kind.get(kernel_kind(evt.key), 0.0) + us
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=40, max_name_column_width=90)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = variant.name.replace("[M]", "mtok").replace(" ", "_")
    atomic_write_text(out_dir / f"{slug}.txt", table + "\n")
    total = sum(by_kind.values()) or 1.0
    return {
        "ms_per_step": total / 1000 / steps,
        "launches_per_step": launches / steps,
        "share": {k: v / total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
    }


# --------------------------------------------------------------------------------------------------
# One configuration: a model and a decoder depth
# --------------------------------------------------------------------------------------------------


def run_config(key: str, decoder_depth: int, args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    name, label, default_batch = MODELS[key]
    batch = args.batch or default_batch
    cfg = get_config(name, decoder_depth=decoder_depth, norm_pix_loss=True)
    torch.manual_seed(0)
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    noise = torch.rand(batch, cfg.num_patches, device=device)
    compile_mode = resolve_compile_mode(args.compile_mode, device, distributed=False, accum_iter=1)
    variants: list[Variant] = []
    for kind in KINDS:
        with torch.device(device):  # initialise on the device: ViT-H's init on the host takes seconds
            model = (MaskedAutoencoderViT(cfg) if kind == "MAE" else MaskTokenMAE(cfg)).train()
        optimizer = make_adamw(param_groups_weight_decay(model, 0.05), 1.5e-4, device, betas=(0.9, 0.95))
        flops = step_flops(model, imgs, noise, precision)
        for mode in args.modes:
            module = torch.compile(model, mode=compile_mode) if mode == "compiled" else model
            variants.append(Variant(kind, mode, make_step(module, optimizer, imgs, cfg.num_patches, precision), flops))
    for v in variants:  # the first step of a compiled variant compiles: timed on its own
        t0 = time.perf_counter()
        v.step()
        sync(device)
        v.first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        for v in variants:
            v.step()
    for r in range(args.rounds):
        for v in variants:
            timed(v, args.steps, device)
        print(
            f"  {label} dec {decoder_depth} round {r + 1}/{args.rounds}: "
            + ", ".join(f"{v.name} {v.times_s[-1] * 1000:.1f} ms" for v in variants),
            flush=True,
        )
    profiles = {}
    if args.profile:
        for v in variants:
            profiles[v.name] = profile_variant(
                v, args.profile_steps, device, Path(args.profile) / f"{key}_dec{decoder_depth}"
            )
    rows = [
        {
            "variant": v.name,
            "kind": v.kind,
            "mode": v.mode,
            "ms_per_step": v.median_s * 1000,
            "min_ms_per_step": min(v.times_s) * 1000,
            "images_per_s": batch / v.median_s,
            "peak_step_gib": max(v.peak_bytes) / 2**30 if v.peak_bytes else None,
            "gflop_per_step": v.flops / 1e9,
            "tflops": v.flops / v.median_s / 1e12,
            "first_step_s": v.first_step_s,
            "profile": profiles.get(v.name),
        }
        for v in variants
    ]
    by = {r["variant"]: r for r in rows}
    best = {k: min((r for r in rows if r["kind"] == k), key=lambda r: r["ms_per_step"]) for k in KINDS}
    ratio_eager = by["[M] eager"]["ms_per_step"] / by["MAE eager"]["ms_per_step"] if "eager" in args.modes else None
    return {
        "model": key,
        "label": label,
        "registry": name,
        "decoder_depth": decoder_depth,
        "batch": batch,
        "img_size": cfg.img_size,
        "compile_mode": compile_mode if "compiled" in args.modes else None,
        "rows": rows,
        "ratio_eager": ratio_eager,
        "ratio_best": best["[M]"]["ms_per_step"] / best["MAE"]["ms_per_step"],
        "best": {k: best[k]["variant"] for k in KINDS},
        "paper_table2": PAPER_TABLE2.get((key, decoder_depth)),
    }


# --------------------------------------------------------------------------------------------------
# Data that keeps up (--loader-images)
# --------------------------------------------------------------------------------------------------


def write_photos(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` ImageNet-like JPEGs (500x375 or 375x500, quality 90, smooth gradients + noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "c0").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = (375, 500) if i % 2 else (500, 375)
        y, x = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 6.3, 3)
        img = np.stack([127 + 100 * np.sin(x / (30 + 20 * k) + y / 50 + phase[k]) for k in range(3)], -1)
        img += rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "c0" / f"{i:05d}.jpg", quality=90)
    return root


def loader_rate(loader, device: torch.device, warmup_batches: int = 2) -> float:
    """Images/s of a loader once its workers run (the first batches start them and are not counted)."""
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    sync(device)
    t0, n = time.perf_counter(), 0
    for imgs, _ in it:
        n += imgs.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def loader_rates(args: argparse.Namespace, device: torch.device, batch: int) -> dict:
    """The official augmentation's images/s: in CPU workers (as today) and decoded on ``device``."""
    import tempfile

    from torch.utils.data import DataLoader, RandomSampler

    from training import data, gpu_data

    workers = args.loader_workers if args.loader_workers is not None else len(os.sched_getaffinity(0))
    total = args.loader_images
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root = write_photos(Path(tmp), min(total, 512))
        size = 224 if device.type == "cuda" else args.loader_size
        cpu_set = data.image_folder(root, data.pretrain_transform(size), 3, log=None)
        pin = device.type == "cuda"

        def sampler(ds):
            return RandomSampler(ds, replacement=True, num_samples=total, generator=torch.Generator().manual_seed(0))

        cpu = DataLoader(
            cpu_set,
            batch_size=batch,
            sampler=sampler(cpu_set),
            num_workers=workers,
            drop_last=True,
            pin_memory=pin,
            persistent_workers=False,
        )
        enc = gpu_data.EncodedImageFolder(root, 3, log=None)
        dev = gpu_data.device_decoded_loader(enc, sampler(enc), batch, workers, pin, size, 3, device)
        rates = {"cpu_workers": loader_rate(cpu, device), "device_decode": loader_rate(dev, device)}
    return {"workers": workers, "images": total, "size": size, "batch": batch, "images_per_s": rates}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str, none: str = "—") -> str:
    return none if x is None else format(x, fmt)


def render_markdown(report: dict) -> str:
    m, peak = report["machine"], report["peak_tflops"]
    lines = [
        f"### {report['when']} — {m['device_name']}, torch {report['torch']}, {report['precision']}",
        "",
        f"One step = noise + autocast forward + norm-pix loss + backward + fused AdamW (training/pretrain.py); "
        f"224 px (tiny: 32), mask ratio 0.75; median of {report['rounds']} interleaved rounds of "
        f"{report['steps']} steps after {report['warmup']} warm-up rounds. Matmul probe in this run: "
        f"**{peak:.1f} TFLOP/s** ({report['peak_probe']}). CPU: {m['cpu_model']}.",
        "",
        "| model, decoder, batch | variant | ms/step | img/s | step peak GiB | GFLOP/step | TFLOP/s | "
        "share of probe | first step s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in report["configs"]:
        head = f"{c['label']}, dec {c['decoder_depth']}, {c['batch']}"
        for r in c["rows"]:
            lines.append(
                f"| {head} | {r['variant']} | {r['ms_per_step']:.1f} | {r['images_per_s']:,.0f} | "
                f"{_f(r['peak_step_gib'], '.1f')} | {r['gflop_per_step']:,.4g} | {r['tflops']:.3g} | "
                f"{r['tflops'] / peak:.0%} | {r['first_step_s']:.1f} |"
            )
            head = ""
    lines += [
        "",
        "| model, decoder, batch | MAE / [M] eager | MAE / [M] best vs best | best sides | paper Table 2 |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for c in report["configs"]:
        lines.append(
            f"| {c['label']}, dec {c['decoder_depth']}, {c['batch']} | {_f(c['ratio_eager'], '.2f')}x | "
            f"{c['ratio_best']:.2f}x | {c['best']['MAE']} vs {c['best']['[M]']} | "
            f"{_f(c['paper_table2'], '.1f')}{'x' if c['paper_table2'] else ''} |"
        )
    for s in report["skipped"]:
        lines.append(f"\nskipped (over --budget-s {report['budget_s']:.0f}): {s}")
    if not report.get("complete", True):
        lines.append(f"\nincomplete: written {report['total_s']:.0f} s into a run that did not finish")
    loader = report.get("loader")
    if loader:
        rates = loader["images_per_s"]
        fastest = max(
            (r["images_per_s"] for c in report["configs"] for r in c["rows"] if r["kind"] == "MAE"), default=None
        )
        need = f"; the fastest MAE step above takes {fastest:,.0f} img/s" if fastest else ""
        lines += [
            "",
            f"Data: RandomResizedCrop(0.2-1) + flip + normalise of 500x375 JPEGs to {loader['size']} px, "
            f"batch {loader['batch']}: {rates['cpu_workers']:,.0f} img/s in {loader['workers']} CPU workers "
            f"(PIL, as today), {rates['device_decode']:,.0f} img/s decoded on the device "
            f"(--gpu_decode, the workers only read files){need}.",
        ]
    profiled = [(c, r) for c in report["configs"] for r in c["rows"] if r["profile"]]
    if profiled:
        lines += [
            "",
            f"Where the step's time goes (profiler, self time by kind of kernel; tables in {report['profile_dir']}):",
            "",
            f"| model, decoder | variant | profiled ms/step | {report['launch_unit']}/step | shares |",
            "| --- | --- | ---: | ---: | --- |",
        ]
        for c, r in profiled:
            p = r["profile"]
            shares = ", ".join(f"{k} {v:.0%}" for k, v in p["share"].items() if v >= 0.01)
            lines.append(
                f"| {c['label']}, {c['decoder_depth']} | {r['variant']} | {p['ms_per_step']:.1f} | "
                f"{p['launches_per_step']:.0f} | {shares} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--models", nargs="+", default=["large"], choices=sorted(MODELS))
    ap.add_argument("--decoder-depths", nargs="+", type=int, default=[8, 1])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--batch", type=int, default=None, help="default per model: B 256, L 128, H 64, tiny 8")
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="auto = bf16 on GPUs that have it (as pretrain's --precision auto), fp32 on CPU",
    )
    ap.add_argument(
        "--compile-mode",
        default="auto",
        help="torch.compile mode of the compiled variants (auto = reduce-overhead on a GPU)",
    )
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds after the first step")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no configuration that would end past this many seconds from the start",
    )
    ap.add_argument("--profile", default=None, metavar="DIR", help="write profiler kernel tables here")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument(
        "--loader-images",
        type=int,
        default=0,
        help="also measure the data path over this many images (0 = no; e.g. 4096)",
    )
    ap.add_argument("--loader-workers", type=int, default=None, help="DataLoader workers (default: all CPUs)")
    ap.add_argument("--loader-size", type=int, default=224, help="crop size off the GPU (on a GPU: 224)")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--markdown", default=None, help="write the Markdown table here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from training.loop import check_device

    check_device(args.device)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    precision = resolve_precision(args.precision, device)
    t_start = time.perf_counter()
    if device.type == "cuda":
        n, dtype = 8192, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        device_name = torch.cuda.get_device_name(device)
    else:
        n, dtype = 1024, torch.bfloat16 if precision == "bf16" else torch.float32
        device_name = f"CPU ({torch.get_num_threads()} threads)"
    peak = matmul_peak_tflops(device, dtype, n)
    print(f"matmul probe {n}^3 {dtype}: {peak:.1f} TFLOP/s on {device_name}", flush=True)
    info = machine_info(["torch", "torchvision"])
    report = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "precision": precision,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": peak,
        "peak_probe": f"{n}^3 {str(dtype).removeprefix('torch.')} matmul",
        "budget_s": args.budget_s,
        "skipped": [],
        "profile_dir": args.profile,
        "launch_unit": "kernel launches" if device.type == "cuda" else "aten ops",
        "machine": {
            "device_name": device_name,
            "cpu_model": info["cpu_model"],
            "threads": info["threads"],
            "gpus": info["gpus"],
            "libraries": info["libraries"],
        },
        "configs": [],
        "loader": None,
        "total_s": 0.0,
    }

    def write(final: bool) -> str:
        """Write what is measured so far: a run cut short by an outer timeout still leaves its results."""
        report["total_s"] = time.perf_counter() - t_start
        report["complete"] = final
        text = render_markdown(report)
        if args.json:
            atomic_write_json(args.json, report)
        if args.markdown:
            atomic_write_text(args.markdown, text)
        return text

    if args.loader_images:  # first: short, and independent of the models
        report["loader"] = loader_rates(args, device, args.batch or MODELS[args.models[0]][2])
        write(final=False)
    last_s = 0.0
    for key in args.models:
        for depth in args.decoder_depths:
            elapsed = time.perf_counter() - t_start
            if args.budget_s is not None and report["configs"] and elapsed + last_s > args.budget_s:
                report["skipped"].append(f"{MODELS[key][1]} decoder {depth} (would end near {elapsed + last_s:.0f} s)")
                continue
            t0 = time.perf_counter()
            report["configs"].append(run_config(key, depth, args, device, precision))
            last_s = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write(final=False)
    print("\n" + write(final=True))
    return report


if __name__ == "__main__":
    from mae_deploy.errors import MaeDeployError

    try:
        main()
    except MaeDeployError as e:  # e.g. --device cuda without a GPU: exit 7 with the reason
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
