"""Peak memory of `mae-deploy export`: RSS of the export process, sampled with psutil, per stage.

    .venv/bin/python benchmarks/bench_export_memory.py --model mae_vit_huge_patch14 \
        --precision fp32,fp16,int8 [--workdir /tmp/bench-export-mem] [--json out.json]

Builds a random-init native checkpoint of ``--model`` (encoder + decoder) in the work directory (kept
for reruns), runs the real CLI in a child process and samples the child's resident set size every
50 ms (its children included: none are expected). Each progress line the export prints starts a stage,
so the table says which step holds the peak. The issue-#10 goal: ViT-H/14 with fp32,fp16,int8 at
<= 8 GB peak (it was 14.7 GB).

``--format official`` writes the checkpoint as an official ``{'model': state_dict}`` .pth instead (issue #24
item 6: every input format within the goal); ``--load-only`` measures just ``load_model`` of it (the
checkpoint loading, where the formats differ) instead of the whole export; ``--delete`` removes the
checkpoint afterwards (a ViT-H one is ~2.5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

GB = 1024**3
ROOT = Path(__file__).resolve().parents[1]


def build_checkpoint(model: str, dst: Path, fmt: str = "native") -> Path:
    """A random-init checkpoint of ``model``, native or official .pth (kept: building ViT-H takes a minute)."""
    if fmt == "official":
        dst = dst.with_suffix(".pth")
    if (dst / "config.json").is_file() or dst.is_file():
        return dst
    save = "save_native(m, sys.argv[2], overwrite=True)" if fmt == "native" else "save_official(m, sys.argv[2])"
    code = (
        "import sys, torch; from training.model import create_model; "
        "from training.checkpoints import save_native, save_official; torch.manual_seed(0); "
        f"m = create_model(sys.argv[1]).eval(); {save}"
    )
    subprocess.run([sys.executable, "-c", code, model, str(dst)], cwd=ROOT, check=True)
    return dst


class RssSampler(threading.Thread):
    """Samples the RSS of a process tree until stopped; keeps the peak per stage."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.stage = "start-up and checkpoint load"
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []
        self.peak = 0
        self._halt = threading.Event()

    def set_stage(self, name: str) -> None:
        self.stage = name

    def rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                r = self.rss()
            except psutil.Error:
                break
            stage = self.stage
            if stage not in self.peaks:
                self.order.append(stage)
            self.peaks[stage] = max(self.peaks.get(stage, 0), r)
            self.peak = max(self.peak, r)
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_export(ckpt: Path, out: Path, precision: str, extra: list[str]) -> dict:
    return run_sampled(
        [
            sys.executable,
            "-m",
            "mae_deploy.cli",
            "export",
            str(ckpt),
            "--out",
            str(out),
            "--overwrite",
            "--precision",
            precision,
            *extra,
        ]
    )


def run_load(ckpt: Path) -> dict:
    """``load_model`` alone in a child process: the loading's peak (the model it returns included)."""
    code = (
        "import sys; from training.checkpoints import load_model; print('PyTorch imported', flush=True); "
        "model, ck = load_model(sys.argv[1]); print('loaded', ck.format, sum(p.numel() for p in "
        "model.parameters()), 'parameters', flush=True)"
    )
    return run_sampled([sys.executable, "-c", code, str(ckpt)])


def run_sampled(cmd: list[str]) -> dict:
    """Run ``cmd``, sampling its RSS; each progress line it prints starts a stage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    sampler = RssSampler(proc.pid)
    sampler.start()
    log = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        log.append(line)
        print(
            f"[{time.perf_counter() - t0:7.1f}s rss {sampler.rss() / GB:5.2f} GB, peak so far "
            f"{sampler.peak / GB:5.2f} GB] {line}",
            flush=True,
        )
        if line.strip().startswith(
            ("exporting", "encoder", "decoder", "classifier", "reference", "calibration", "PyTorch", "loaded")
        ):
            sampler.set_stage(f"after: {line.strip()[:70]}")
    rc = proc.wait()
    sampler.stop()
    return {
        "returncode": rc,
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_gb": round(sampler.peak / GB, 2),
        "stages": [{"stage": s, "peak_rss_gb": round(sampler.peaks[s] / GB, 2)} for s in sampler.order],
        "log_tail": log[-12:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mae_vit_large_patch16")
    ap.add_argument("--precision", default="fp32,fp16,int8")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-export-mem"))
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--skip-verify", action="store_true", help="skip the parity grid (not the benchmark's case)")
    ap.add_argument(
        "--format",
        choices=["native", "official"],
        default="native",
        help="checkpoint written: native directory or official {'model': state_dict} .pth",
    )
    ap.add_argument("--load-only", action="store_true", help="measure load_model of the checkpoint, not the export")
    ap.add_argument("--delete", action="store_true", help="delete the checkpoint afterwards")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(args.model, args.workdir / f"{args.model}-ckpt", args.format)
    extra = ["--skip-verify"] if args.skip_verify else []
    try:
        run = (
            run_load(ckpt)
            if args.load_only
            else run_export(ckpt, args.workdir / f"{args.model}-bundle", args.precision, extra)
        )
    finally:
        if args.delete:
            shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
    what = "load_model" if args.load_only else "export"
    result = {
        "model": args.model,
        "format": args.format,
        "measured": what,
        "precision": args.precision,
        "cpu_count": os.cpu_count(),
        "total_memory_gb": round(psutil.virtual_memory().total / GB, 1),
        **run,
    }
    print(
        f"\n{args.model} ({args.format}) {what}"
        f"{'' if args.load_only else ' --precision ' + args.precision}: peak RSS {result['peak_rss_gb']:.2f} GB "
        f"in {result['seconds']:.0f}s (exit {result['returncode']})"
    )
    for s in result["stages"]:
        print(f"  {s['peak_rss_gb']:6.2f} GB  {s['stage']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return int(result["returncode"] != 0)


if __name__ == "__main__":
    sys.exit(main())
