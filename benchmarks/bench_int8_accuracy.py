"""Accuracy of the int8 variants on trained weights: dynamic int8 and static Q/DQ int8 against fp32.

    .venv/bin/python benchmarks/bench_int8_accuracy.py --bundle BUNDLE --val IMAGEFOLDER [--json out.json]

BUNDLE is a classifier bundle exported with ``--precision fp32,int8,int8-qdq --calibration TRAIN_DIR``
(the demo's linear probe on digits: scripts/demo.py trains one). Every image of the labelled ImageFolder
VAL goes through the bundle's preprocessing and, per precision, through ONNX Runtime (CPU):

- encoder, all patches visible: cosine of the mean-pooled features against the fp32 graph (min and mean
  over images) — the feature extraction case;
- classifier: top-1 against the labels, and top-1 agreement with the fp32 graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from export.verify import ort_session
from mae_deploy.bundle import Bundle
from mae_deploy.preprocess import Preprocessor

PRECISIONS = ("fp32", "int8", "int8-qdq")


def labelled_images(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for i, c in enumerate(classes):
        for p in sorted((root / c).iterdir()):
            paths.append(p)
            labels.append(i)
    return paths, np.asarray(labels), classes


def run(bundle_dir: Path, val: Path, batch: int = 64) -> dict:
    bundle = Bundle.load(bundle_dir)
    pre = Preprocessor.from_bundle(bundle)
    paths, labels, classes = labelled_images(val)
    if bundle.class_names and bundle.class_names != classes:
        raise SystemExit(f"the bundle's classes {bundle.class_names} differ from {val}'s {classes}")
    x = np.concatenate([pre(paths[i : i + batch]) for i in range(0, len(paths), batch)])
    L = bundle.num_patches
    feats, logits = {}, {}
    for precision in PRECISIONS:
        enc = ort_session(bundle.graph_path("encoder", precision))
        cls = ort_session(bundle.graph_path("classifier", precision))
        f, lg = [], []
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            ids = np.tile(np.arange(L, dtype=np.int64), (len(xb), 1))
            f.append(enc.run(None, {"pixel_values": xb, "ids_keep": ids})[0][:, 1:].mean(axis=1))
            lg.append(cls.run(None, {"pixel_values": xb})[0])
        feats[precision], logits[precision] = np.concatenate(f), np.concatenate(lg)
    ref_f, ref_top = feats["fp32"].astype(np.float64), logits["fp32"].argmax(axis=1)
    rows = []
    for precision in PRECISIONS:
        f = feats[precision].astype(np.float64)
        cos = (f * ref_f).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref_f, axis=1))
        top = logits[precision].argmax(axis=1)
        rows.append(
            {
                "precision": precision,
                "feature_cosine_min": float(cos.min()),
                "feature_cosine_mean": float(cos.mean()),
                "top1": float((top == labels).mean() * 100),
                "top1_agreement_with_fp32": float((top == ref_top).mean() * 100),
            }
        )
    return {"bundle": str(bundle_dir), "val": str(val), "images": len(paths), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run(args.bundle, args.val)
    print(f"{result['images']} images of {args.val}")
    print(f"{'precision':<10} {'feat cos min':>12} {'feat cos mean':>13} {'top-1 %':>8} {'agree w/ fp32 %':>16}")
    for r in result["rows"]:
        print(
            f"{r['precision']:<10} {r['feature_cosine_min']:>12.6f} {r['feature_cosine_mean']:>13.6f} "
            f"{r['top1']:>8.2f} {r['top1_agreement_with_fp32']:>16.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
