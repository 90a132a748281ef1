"""Pretraining step on CPU: MAE (encoder on visible patches) vs the mask-token encoder baseline, and fp32
vs bf16 autocast. ViT-B/16, batch 8, 224 px, mask ratio 0.75; one step = forward + backward + AdamW.

    .venv/bin/python benchmarks/bench_pretrain_cpu.py [--iters 5] [--warmup 2] [--no-write]

The three variants are timed interleaved (ours fp32, baseline fp32, ours bf16 in each round) so that a
change in machine load hits all of them alike; the ratios of the medians are reported. FLOPs of one
step are counted with torch.utils.flop_counter (matmuls and attention; the paper's 2.36x is a FLOP
ratio). Results are appended to benchmarks/RESULTS.md under "## Pretraining step (issue #6)".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mae_deploy.bench import machine_info  # noqa: E402
from training.loop import autocast  # noqa: E402
from training.model import create_model  # noqa: E402
from training.optim import make_adamw, param_groups_weight_decay  # noqa: E402
from training.pretrain import MaskTokenMAE  # noqa: E402

HEADING = "## Pretraining step (issue #6)"


def make_step(model: torch.nn.Module, imgs: torch.Tensor, precision: str):
    device = torch.device("cpu")
    opt = make_adamw(param_groups_weight_decay(model, 0.05), 1e-4, device, betas=(0.9, 0.95))  # as pretrain.py

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = model(imgs, mask_ratio=0.75)[0]
        loss.backward()
        opt.step()
        return float(loss)

    return step


def step_flops(model: torch.nn.Module, imgs: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(imgs, mask_ratio=0.75)[0].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()

    torch.manual_seed(0)
    imgs = torch.randn(args.batch, 3, 224, 224)
    ours = create_model("mae_vit_base_patch16", norm_pix_loss=True).train()
    base = MaskTokenMAE(ours.config).train()
    flops = {"ours": step_flops(ours, imgs), "baseline": step_flops(base, imgs)}
    variants = {
        "MAE, fp32": make_step(ours, imgs, "fp32"),
        "mask-token encoder baseline, fp32": make_step(base, imgs, "fp32"),
        "MAE, bf16 autocast": make_step(ours, imgs, "bf16"),
    }
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.iters):
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt)
        print(
            f"round {r + 1}/{args.warmup + args.iters}: "
            + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v),
            flush=True,
        )
    load_after = os.getloadavg()

    med = {k: statistics.median(v) for k, v in times.items()}
    ours_s, base_s, bf16_s = med["MAE, fp32"], med["mask-token encoder baseline, fp32"], med["MAE, bf16 autocast"]
    info = machine_info(["torch"])
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### {when} — {info['cpu_model']}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        f"ViT-B/16 MAE (decoder 512-d x 8), batch {args.batch}, 224 px, mask ratio 0.75, norm-pix loss; "
        "one step = forward + backward + fused AdamW (as training/pretrain.py). "
        f"Median of {args.iters} interleaved rounds after {args.warmup} warm-up rounds. "
        f"Load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        f"({os.cpu_count()} CPUs).",
        "",
        "| variant | median s/step | min s/step | images/s | GFLOP/step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in variants:
        gf = flops["baseline" if "baseline" in name else "ours"] / 1e9
        lines.append(f"| {name} | {med[name]:.2f} | {min(times[name]):.2f} | {args.batch / med[name]:.2f} | {gf:.0f} |")
    lines += [
        "",
        f"- MAE vs mask-token baseline (fp32): **{base_s / ours_s:.2f}x** faster per step "
        f"(target >= 2.2x); counted FLOP ratio {flops['baseline'] / flops['ours']:.2f}x (paper: 2.36x)",
        f"- bf16 autocast vs fp32 (MAE): **{ours_s / bf16_s:.2f}x**",
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        results = ROOT / "benchmarks" / "RESULTS.md"
        old = results.read_text() if results.exists() else "# Benchmark results\n"
        if HEADING not in old:
            old = old.rstrip("\n") + f"\n\n{HEADING}\n\nWritten by benchmarks/bench_pretrain_cpu.py.\n"
        # Insert this run at the end of the section (before the next "## " heading, if any).
        start = old.index(HEADING)
        nxt = old.find("\n## ", start + len(HEADING))
        new = (old.rstrip("\n") + "\n\n" + text) if nxt == -1 else (old[:nxt].rstrip("\n") + "\n\n" + text + old[nxt:])
        tmp = results.with_name(f".{results.name}.tmp")
        tmp.write_text(new.rstrip("\n") + "\n")
        os.replace(tmp, results)
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
