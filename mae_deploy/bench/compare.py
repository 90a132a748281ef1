"""``--compare``: per-row latency and throughput ratios of this run against an earlier results file."""

from __future__ import annotations

from mae_deploy.bench.config import KEY_FIELDS


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY_FIELDS)


def compare_results(new: dict, old: dict) -> dict:
    """Per-row ratios new/old for rows measured ("ok") in both, matched by backend/precision/part/batch/visible.

    ``p50_ratio`` and ``mean_ratio`` below 1 mean the new run is faster; ``throughput_ratio`` above 1 too.
    """

    def measured(results: dict) -> dict[tuple, dict]:
        return {row_key(r): r for r in results["rows"] if r["status"] == "ok"}

    n, o = measured(new), measured(old)
    rows = []
    for key, nr in n.items():
        if key not in o:
            continue
        orow = o[key]
        rows.append(
            {
                **dict(zip(KEY_FIELDS, key, strict=True)),
                "old_p50_ms": orow["latency_ms"]["p50"],
                "new_p50_ms": nr["latency_ms"]["p50"],
                "p50_ratio": nr["latency_ms"]["p50"] / orow["latency_ms"]["p50"],
                "mean_ratio": nr["latency_ms"]["mean"] / orow["latency_ms"]["mean"],
                "throughput_ratio": nr["throughput_ips"] / orow["throughput_ips"],
            }
        )
    notes = []
    om, nm = old["machine"].get("cpu_model"), new["machine"].get("cpu_model")
    if om != nm:
        notes.append(f"the runs are from different CPUs ({om} vs {nm})")
    return {
        "rows": rows,
        "only_new": [dict(zip(KEY_FIELDS, k, strict=True)) for k in n if k not in o],
        "only_old": [dict(zip(KEY_FIELDS, k, strict=True)) for k in o if k not in n],
        "notes": notes,
    }


def format_compare(cmp: dict, old_name: str = "old") -> str:
    head = (
        f"{'backend':<7} {'prec':<5} {'part':<11} {'batch':>5} {'vis':>4} | {'old p50':>9} {'new p50':>9} "
        f"{'p50 new/old':>11} {'mean new/old':>12} {'img/s new/old':>13}"
    )
    lines = [f"=== Compared with {old_name} (ratios below 1 in latency = faster now) ===", head, "-" * len(head)]
    for r in cmp["rows"]:
        lines.append(
            f"{r['backend']:<7} {r['precision']:<5} {r['part']:<11} {r['batch']:>5} {r['visible']:>4} | "
            f"{r['old_p50_ms']:>9.2f} {r['new_p50_ms']:>9.2f} {r['p50_ratio']:>11.3f} {r['mean_ratio']:>12.3f} "
            f"{r['throughput_ratio']:>13.3f}"
        )
    if not cmp["rows"]:
        lines.append("(no measured row matches: compare runs with the same backends/precisions/parts/batches/visible)")
    for what, label in (("only_new", "only in this run"), ("only_old", f"only in {old_name}")):
        if cmp[what]:
            keys = ["/".join(str(v) for v in k.values()) for k in cmp[what]]
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            lines.append(f"{label} ({len(keys)}): {', '.join(keys[:8])}{more}")
    lines += [f"note: {n}" for n in cmp["notes"]]
    return "\n".join(lines)
