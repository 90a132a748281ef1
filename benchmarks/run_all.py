"""Run every benchmark script in benchmarks/ one after another (`make bench`).

By default each runs with a small workload and writes nothing: a quick check, on this machine, that the
benchmarks still run end to end and what they print. `--full` runs each with its own defaults, which
take minutes to an hour each and append their sections to benchmarks/RESULTS.md (peers.py: README.md
too) where the script does so by default.

Quick workloads (what `make bench` runs):

{table}

A bench_*.py script that is not in this table is listed at the end as not run (add it to SCRIPTS).
Exit status: 0 when every script ran, 4 when some failed (their names are printed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# script -> (quick arguments, full arguments): small enough for a few minutes on 2 cores, yet the same code.
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    "bench_export_cpu.py": (["--rounds", "2", "--warmup", "1", "--no-append"], []),
    "bench_extract.py": (["--images", "32", "--workers", "0,1", "--skip-memory", "--no-append"], []),
    "bench_pretrain_cpu.py": (["--iters", "1", "--warmup", "1", "--no-write"], []),
    "bench_pretrain_gpu.py": (
        ["--device", "cpu", "--models", "tiny", "--modes", "eager", "--rounds", "1", "--steps", "1", "--warmup", "0"],
        ["--device", "cpu", "--models", "tiny", "--rounds", "3"],
    ),  # GPU runs: gpu_check.sh
    "peers.py": (["--batch-sizes", "1", "--iters", "2", "--rounds", "1", "--warmup", "1"], ["--write"]),
    "bench_openvino.py": (["--rounds", "2", "--warmup", "1"], []),
    "bench_decode.py": (["--rounds", "1", "--repeat", "1", "--no-accuracy"], []),
    "bench_sources.py": (["--images", "200", "--rounds", "1"], []),
    "bench_serve.py": (["--images", "8", "--requests", "8", "--precisions", "fp32", "--no-append"], []),
    "bench_export_memory.py": (["--model", "mae_vit_tiny_patch4", "--precision", "fp32,int8"], []),
}
# Scripts that need the user's data: listed, never run by run_all.
NEEDS_INPUTS = {"bench_int8_accuracy.py": "needs --bundle BUNDLE --val IMAGES (a trained model and labelled images)"}


def _table() -> str:
    lines = [f"    {name:<26} {' '.join(quick) or '(its defaults)'}" for name, (quick, _) in SCRIPTS.items()]
    return "\n".join(lines + [f"    {name:<26} not run: {why}" for name, why in NEEDS_INPUTS.items()])


__doc__ = __doc__.format(table=_table())


def plan(full: bool, only: list[str] | None = None) -> tuple[list[list[str]], list[str]]:
    """(commands to run, bench scripts present but not in SCRIPTS) for the scripts that exist here."""
    present = {p.name for p in HERE.glob("*.py") if p.name != Path(__file__).name}
    commands = []
    for name, (quick, full_args) in SCRIPTS.items():
        if name in present and (not only or name in only):
            commands.append([sys.executable, str(HERE / name), *(full_args if full else quick)])
    unknown = sorted(n for n in present if n.startswith("bench_") and n not in SCRIPTS and n not in NEEDS_INPUTS)
    return commands, unknown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="each script's own defaults (long; writes RESULTS.md)")
    ap.add_argument("--only", default=None, help="comma-separated script names to run (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    if only:
        bad = [s for s in only if s not in SCRIPTS]
        if bad:
            ap.error(f"unknown script {', '.join(bad)}; choose from: {', '.join(SCRIPTS)}")
    commands, unknown = plan(args.full, only)
    failed = []
    for cmd in commands:
        name = Path(cmd[1]).name
        print(f"=== {name} {' '.join(cmd[2:])}", flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if unknown:
        print(f"not run (not in run_all.SCRIPTS): {', '.join(unknown)}")
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
