"""The results as people and programs read them: console summary, JSON, CSV and Markdown files.

Output paths are checked for writability before the benchmark runs (``check_outputs``), so a long run's
results are never lost to a path under a file, a read-only directory or /proc. Files are written
atomically through ``mae_deploy.fileio``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from mae_deploy.bench.schema import AGREEMENT_KEYS
from mae_deploy.bench.stats import STATS
from mae_deploy.fileio import atomic_write_text, check_writable

CSV_COLUMNS = (
    "backend",
    "precision",
    "device",
    "part",
    "batch",
    "visible",
    "status",
    "reason",
    "warmup",
    "iterations",
    *(f"{s}_ms" for s in STATS),
    "first_call_ms",
    "throughput_ips",
    *(f"gpu_{s}_ms" for s in ("p50", "mean")),
    "peak_rss_mb",
    "rss_scope",
    "peak_device_mem_mb",
    "build_s",
    "intra_op_threads",
    "inter_op_threads",
    "reference",
    "max_abs_diff",
    "mean_abs_diff",
    "cosine",
    "pooled_cosine",
    "flops",
    "compute_unit",
    "achieved",
    "peak",
    "fraction_of_peak",
    "int8_isa",
)


def check_outputs(**paths: str | os.PathLike | None) -> None:
    """Raise InputError (exit 3) now for any output that could not be written after the run; None skips."""
    for what, path in paths.items():
        if path:
            check_writable(path, what=what)


def write_json(results: dict, path: str | os.PathLike) -> Path:
    return atomic_write_text(path, json.dumps(results, indent=2, allow_nan=True) + "\n")


def csv_rows(results: dict) -> list[dict]:
    """One flat dict per row, keys CSV_COLUMNS."""
    out = []
    for r in results["rows"]:
        lat, gpu, agr, thr = r["latency_ms"] or {}, r["gpu_compute_ms"] or {}, r["agreement"] or {}, r["threads"] or {}
        comp = r.get("compute") or {}
        flat = {k: r.get(k) for k in CSV_COLUMNS if k in r}
        flat.update({f"{s}_ms": lat.get(s) for s in STATS})
        flat.update({f"gpu_{s}_ms": gpu.get(s) for s in ("p50", "mean")})
        flat.update(intra_op_threads=thr.get("intra_op"), inter_op_threads=thr.get("inter_op"))
        flat.update({k: agr.get(k) for k in AGREEMENT_KEYS})
        flat.update(
            {k: comp.get(k) for k in ("flops", "achieved", "peak", "fraction_of_peak")}, compute_unit=comp.get("unit")
        )
        out.append(flat)
    return out


def write_csv(results: dict, path: str | os.PathLike) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for flat in csv_rows(results):
        w.writerow({k: ("" if v is None else v) for k, v in flat.items()})
    return atomic_write_text(path, buf.getvalue())


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}"


def _fmt_sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _rate(x: float | None) -> str:
    """A rate in G/s: three significant digits below 100, whole numbers above."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _pct(comp: dict | None, above: str = " (above peak)") -> str:
    """The share of the peak; a share above 100 % is shown as it is and marked, never clipped."""
    frac = (comp or {}).get("fraction_of_peak")
    return "-" if frac is None else f"{100 * frac:.0f} %" + (above if frac > 1 else "")


def machine_line(results: dict) -> str:
    m = results["machine"]
    gpu = "; ".join(f"{g['name']} (driver {g['driver']})" for g in m.get("gpus") or []) or "no GPU"
    flags = f" [{' '.join(m['cpu_flags'])}]" if m.get("cpu_flags") else ""
    if m.get("int8_isa"):
        flags += f", int8 on {m['int8_isa']}"
    return (
        f"{m['cpu_model']}{flags}, {m.get('cores')} cores / {m.get('threads')} threads "
        f"({m.get('cpus_allowed')} allowed), {gpu}"
    )


def inputs_line(results: dict) -> str:
    """What the pixel values were: seeded noise, or how many images from which source."""
    inputs = results.get("inputs")
    if not inputs or inputs["pixels"] != "images":  # files before schema 4 always fed seeded noise
        return f"seeded standard-normal noise (seed {results['config'].get('seed')})"
    skipped = f", {inputs['skipped']} unreadable passed over" if inputs.get("skipped") else ""
    return (
        f"{inputs['images']} image{'s' if inputs['images'] != 1 else ''} from {inputs['source']}{skipped} "
        "(the bundle's preprocessing; cycled to fill each batch)"
    )


def peak_lines(results: dict) -> list[str]:
    """Per backend x precision: the best row's share of this machine's peak, as a sentence."""
    best: dict[tuple[str, str], dict] = {}
    for r in results["rows"]:
        comp = r.get("compute") or {}
        if r["status"] == "ok" and comp.get("fraction_of_peak") is not None:
            key = (r["backend"], r["precision"])
            if key not in best or comp["fraction_of_peak"] > best[key]["compute"]["fraction_of_peak"]:
                best[key] = r
    lines = []
    for (backend, precision), r in best.items():
        c = r["compute"]
        isa = f" on {r['int8_isa']}" if r.get("int8_isa") else ""
        lines.append(
            f"{backend} {precision}{isa}: {_rate(c['achieved'])} {c['unit']} = {100 * c['fraction_of_peak']:.0f} % of "
            f"this machine's {precision} peak ({c['peak_probe']}: {_rate(c['peak'])} {c['unit']}), best at "
            f"{r['part']} batch {r['batch']} visible {r['visible']}"
            + (f"; {c['note']}" if c["fraction_of_peak"] > 1 and c.get("note") else "")
        )
    for p in results.get("peaks") or []:
        if p["status"] != "ok":
            lines.append(f"{p['backend']} {p['precision']}: no peak ({p['reason']})")
    return lines


def probe_lines(results: dict) -> list[str]:
    """Per probe: every GEMM shape's rate, the one that set the peak in bold, skipped shapes with the reason."""
    lines = []
    for p in results.get("peaks") or []:
        if p["status"] != "ok" or not p.get("shapes"):
            continue
        parts = []
        for s in p["shapes"]:
            name = f"{s['m']}x{s['k']}x{s['n']} {s['what']}"
            if s["status"] != "ok":
                parts.append(f"{name} {s['status']}")
            elif [s["m"], s["k"], s["n"]] == p["shape"]:
                parts.append(f"**{name} {_rate(s['rate'])}**")
            else:
                parts.append(f"{name} {_rate(s['rate'])}")
        lines.append(f"{p['backend']} {p['precision']} {p['op']} ({p['unit']}, {p['seconds']} s): " + ", ".join(parts))
    return lines


def markdown_table(results: dict) -> str:
    """A Markdown table of the rows, with a header saying when, where and against what reference."""
    cfg, ref = results["config"], results["reference"]
    libs = ", ".join(f"{k} {v}" for k, v in results["machine"]["libraries"].items())
    lines = [
        f"Measured {results['created']} on {machine_line(results)}; {libs}.",
        f"Threads pinned to {cfg['threads']}; warm-up {cfg['warmup']}; "
        + (f"{cfg['iters']} iterations" if cfg.get("iters") else f"{cfg['duration']} s per row")
        + f"; reference: {ref['name'] or 'none'}"
        + (f" ({ref['note']})" if ref.get("note") else "")
        + f"; inputs: {inputs_line(results)}.",
        "",
        "| backend | precision | int8 ISA | part | batch | visible | p50 ms | p90 ms | p99 ms | mean ms | min ms "
        "| max ms | images/s | GFLOP/s (GOP/s int8) | % of peak | peak RSS MB | build s | max abs diff | cosine "
        "| pooled cosine | status |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results["rows"]:
        lat, agr, comp = r["latency_ms"] or {}, r["agreement"] or {}, r.get("compute") or {}
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r.get('int8_isa') or '-'} | {r['part']} | {r['batch']} | "
            f"{r['visible']} | "
            + " | ".join(_fmt(lat.get(s)) for s in ("p50", "p90", "p99", "mean", "min", "max"))
            + f" | {_fmt(r['throughput_ips'], 1)} | {_rate(comp.get('achieved'))} | {_pct(comp)} | "
            f"{_fmt(r['peak_rss_mb'], 0)} | {_fmt(r['build_s'])} | "
            f"{_fmt_sci(agr.get('max_abs_diff'))} | {_fmt(agr.get('cosine'), 6)} | "
            f"{_fmt(agr.get('pooled_cosine'), 6)} | {status.replace('|', '/')} |"
        )
    peaks = peak_lines(results)
    if peaks:
        lines += [
            "",
            "Distance to the limit (MatMul peak of the same engine and precision, probed in this run; "
            "FLOPs from mae_deploy.bench.flops):",
            "",
        ] + [f"- {p}" for p in peaks]
    probes = probe_lines(results)
    if probes:
        lines += ["", "Peak probes (each GEMM shape M x K x N and its best rate; the peak in bold):", ""] + [
            f"- {p}" for p in probes
        ]
    return "\n".join(lines) + "\n"


def write_markdown(results: dict, path: str | os.PathLike) -> Path:
    return atomic_write_text(path, "# mae-deploy bench\n\n" + markdown_table(results))


def _collapsed_skip(rows: list[dict], i: int) -> tuple[str, int]:
    """A runner that could not be built skips all its rows for one reason: one line; returns (line, next i)."""
    r = rows[i]
    j = i
    while (
        j + 1 < len(rows)
        and rows[j + 1]["status"] == r["status"]
        and rows[j + 1]["reason"] == r["reason"]
        and (rows[j + 1]["backend"], rows[j + 1]["precision"]) == (r["backend"], r["precision"])
    ):
        j += 1
    key = f"{r['backend']:<8} {r['precision']:<5} {r['part']:<11} {r['batch']:>5} {r['visible']:>4} |"
    if j > i:
        key = f"{r['backend']:<8} {r['precision']:<5} {'(' + str(j - i + 1) + ' rows)':<22} |"
    return f"{key} {r['status']}: {r['reason']}", j + 1


def format_summary(results: dict) -> str:
    """Console table in the spirit of trtexec's performance summary."""
    cfg, ref, b = results["config"], results["reference"], results["bundle"]
    iters = f"{cfg['iters']} iterations" if cfg.get("iters") else f"{cfg['duration']} s per row"
    la = results.get("load_average") or {}
    lines = [
        f"=== Performance summary: {b['name']} (L={b['num_patches']}), {results['created']} ===",
        f"machine   {machine_line(results)}",
        f"threads   pinned to {cfg['threads']} (ORT intra-op {cfg['threads']}, inter-op 1; torch, OpenVINO "
        f"{cfg['threads']})",
        f"timing    wall-clock per call, warm-up {cfg['warmup']} excluded, {iters}; latency in ms",
        f"reference {ref['name'] or 'none'}" + (f": {ref['note']}" if ref.get("note") else ""),
        f"inputs    {inputs_line(results)}",
    ]
    if la.get("other_cpu_share") is not None:
        share = la["other_cpu_share"]
        lines.append(
            f"other CPU {100 * share:.0f} % of the machine used by other processes during the run"
            + (" (contended: latencies are pessimistic)" if share > 0.05 else "")
        )
    head = (
        f"{'backend':<8} {'prec':<5} {'part':<11} {'batch':>5} {'vis':>4} | {'p50':>8} {'p90':>8} {'p99':>8} "
        f"{'mean':>8} {'min':>8} {'max':>8} {'cv%':>5} | {'img/s':>8} {'G/s':>7} {'%peak':>6} | "
        f"{'RSS MB':>7} {'build s':>7} | {'max|d|':>7} {'cosine':>8} {'pooled':>8} | int8 ISA"
    )
    lines += [head, "-" * len(head)]
    rows = results["rows"]
    i = 0
    while i < len(rows):
        r = rows[i]
        if r["status"] != "ok":
            line, i = _collapsed_skip(rows, i)
            lines.append(line)
            continue
        lat, agr, comp = r["latency_ms"], r["agreement"] or {}, r.get("compute") or {}
        cv = 100 * lat["std"] / lat["mean"] if lat["mean"] else 0.0
        lines.append(
            f"{r['backend']:<8} {r['precision']:<5} {r['part']:<11} {r['batch']:>5} {r['visible']:>4} | "
            + " ".join(f"{lat[s]:>8.2f}" for s in ("p50", "p90", "p99", "mean", "min", "max"))
            + f" {cv:>5.0f} | {r['throughput_ips']:>8.1f} {_rate(comp.get('achieved')):>7} {_pct(comp, '!'):>6} | "
            f"{r['peak_rss_mb']:>7.0f} {_fmt(r['build_s']):>7} | "
            f"{_fmt_sci(agr.get('max_abs_diff')):>7} {_fmt(agr.get('cosine'), 5):>8} "
            f"{_fmt(agr.get('pooled_cosine'), 5):>8}" + (f" | {r['int8_isa']}" if r.get("int8_isa") else "")
        )
        i += 1
        if r.get("gpu_compute_ms"):
            g = r["gpu_compute_ms"]
            lines.append(
                f"{'':<39}GPU compute (CUDA events): p50 {g['p50']:.3f} mean {g['mean']:.3f} ms; "
                f"peak device memory {_fmt(r['peak_device_mem_mb'], 0)} MB"
            )
    peaks = peak_lines(results)
    if peaks:
        lines.append(
            "G/s: GFLOP/s (GOP/s for int8) at p50; %peak: share of the same engine's MatMul peak (the best "
            "of several GEMM shapes; ! = above it)"
        )
        lines += [f"peak      {p}" for p in peaks]
    return "\n".join(lines)


def write_outputs(
    results: dict,
    json_path: str | None = None,
    csv_path: str | None = None,
    markdown_path: str | None = None,
    plot_path: str | None = None,
) -> list[str]:
    """Write the requested files (None skips one); returns the paths written."""
    from mae_deploy.bench.plot import write_plot

    written = []
    for path, writer in (
        (json_path, write_json),
        (csv_path, write_csv),
        (markdown_path, write_markdown),
        (plot_path, write_plot),
    ):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # check_outputs found it creatable
            written.append(str(writer(results, path)))
    return written
