"""The PNG of a benchmark: p50 latency vs batch size, and encoder latency vs visible tokens (matplotlib)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from mae_deploy.bench.config import PARTS
from mae_deploy.errors import MissingDependency
from mae_deploy.fileio import atomic_write


def write_plot(results: dict, path: str | os.PathLike) -> Path:
    """PNG: latency (p50) vs batch size per backend/precision, and encoder latency vs visible tokens."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependency("matplotlib", "bench --plot", "pip install 'mae-deploy[plot]'") from e
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)

    part = next((p for p in PARTS if any(r["part"] == p for r in ok)), None)
    if part is not None:
        vis = max(r["visible"] for r in ok if r["part"] == part)
        for be, pr in dict.fromkeys((r["backend"], r["precision"]) for r in ok):
            pts = sorted(
                (r["batch"], r["latency_ms"]["p50"])
                for r in ok
                if (r["backend"], r["precision"], r["part"], r["visible"]) == (be, pr, part, vis)
            )
            if pts:
                ax1.plot(*zip(*pts, strict=True), marker="o", label=f"{be} {pr}")
                for xb, yv in pts:  # values on the points: a log axis over less than a decade has few ticks
                    ax1.annotate(f"{yv:.3g}", (xb, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax1.set_title(f"{part} latency vs batch ({vis} visible tokens)")
        ax1.set_xscale("log", base=2)
        ax1.set_yscale("log")  # backends and precisions differ by multiples: ratios read as distances
        batches = sorted({r["batch"] for r in ok})
        ax1.set_xticks(batches, [str(b) for b in batches])
        ax1.minorticks_off()
        ax1.legend()
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("p50 latency (ms)")

    enc = [r for r in ok if r["part"] == "encoder"]
    if enc:
        batch = max(r["batch"] for r in enc)
        for be, pr in dict.fromkeys((r["backend"], r["precision"]) for r in enc):
            pts = sorted(
                (r["visible"], r["latency_ms"]["p50"])
                for r in enc
                if (r["backend"], r["precision"], r["batch"]) == (be, pr, batch)
            )
            if pts:
                ax2.plot(*zip(*pts, strict=True), marker="o", label=f"{be} {pr}")
        ax2.set_title(f"encoder latency vs visible tokens (batch {batch})")
        ax2.legend()
    ax2.set_xlabel("visible tokens")
    ax2.set_ylabel("p50 latency (ms)")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"mae-deploy bench: {results['bundle']['name']}, {results['machine']['cpu_model']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())
