"""What an export wrote and measured, and how the CLI prints it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExportReport:
    """What :func:`export_bundle` wrote and measured."""

    bundle: Path
    manifest: dict
    files: dict[str, int]  # path relative to the bundle -> bytes (mae.json included)
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    def parity_rows(self) -> list[dict]:
        """One row per graph: file, precision, the measured value against its threshold, pass/fail."""
        rows = []
        for g in self.manifest["graphs"]:
            p = g.get("parity") or {}
            row = {"file": g["file"], "part": g["part"], "precision": g["precision"], "cases": len(p.get("cases", []))}
            if p.get("skipped"):
                row.update(metric="skipped", value=None, threshold="", result="not verified")
            elif "min_logit_cosine" in p:
                t = p["threshold"]
                row.update(
                    metric="logit cosine",
                    value=p["min_logit_cosine"],
                    threshold=f">= {t['min_logit_cosine']}, top-1 {p['top1_agreement']:.0%} "
                    f">= {t['min_top1_agreement']:.0%}",
                )
            elif "min_feature_cosine" in p:
                row.update(
                    metric="feature cosine",
                    value=p["min_feature_cosine"],
                    threshold=f">= {p['threshold']['min_feature_cosine']}",
                )
            elif "max_recon_rel_err" in p:
                row.update(
                    metric="recon rel err",
                    value=p["max_recon_rel_err"],
                    threshold=f"<= {p['threshold']['max_recon_rel_err']}",
                )
            else:
                row.update(
                    metric="max |diff|",
                    value=p.get("max_abs_diff"),
                    threshold=f"<= {p.get('threshold', {}).get('max_abs_diff')}",
                )
            row["max_abs_diff"] = p.get("max_abs_diff")
            row.setdefault("result", "ok" if p.get("passed") else "FAILED")
            rows.append(row)
        return rows

    def format_parity(self) -> str:
        head = f"{'graph':<26} {'prec':<8} {'cases':>5}  {'max |diff|':>10}  {'metric':<15} {'value':>10}  threshold"
        lines = [head, "-" * len(head)]
        for r in self.parity_rows():
            diff = f"{r['max_abs_diff']:.2e}" if r["max_abs_diff"] is not None else "-"
            if r["value"] is None:
                val = "-"
            else:
                val = f"{r['value']:.2e}" if r["metric"] == "max |diff|" else f"{r['value']:.6f}"
            lines.append(
                f"{r['file']:<26} {r['precision']:<8} {r['cases']:>5}  {diff:>10}  {r['metric']:<15} "
                f"{val:>10}  {r['threshold']:<10} {r['result']}"
            )
        return "\n".join(lines)

    def format_cases(self) -> str:
        """max |diff| of every output per (batch, visible) case, one line per graph."""
        lines = []
        for g in self.manifest["graphs"]:
            cases = (g.get("parity") or {}).get("cases") or []
            if cases:
                cells = "  ".join(f"b{c['batch']}/v{c['visible']} {c['max_abs_diff']:.1e}" for c in cases)
                lines.append(f"{g['file']}: {cells}")
        return "\n".join(lines)
