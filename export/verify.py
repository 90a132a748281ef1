"""Exported graphs against PyTorch: the parity report that every export stores in mae.json.

The grid is batch in {1, 3} x visible in {1, L/4, L/2, L}: the smallest mask, reconstruction's
quarter, half, and feature extraction's all-visible. The decoder is fed PyTorch's latent, so its report
measures the decoder alone.

Thresholds (what ``passed`` means; also in `mae-deploy export --help`):

- fp32: max |ONNX Runtime - PyTorch| <= 1e-4 for every output element of every case, else
  :class:`VerificationError` (exit 5) and no bundle is written. Typical values are 1e-6 .. 1e-5.
- fp16 encoder: cosine of mean-pooled features (latent tokens 1..K averaged, per sample) >= 0.999.
- int8 encoder: the same cosine >= 0.99 (dynamic quantisation of every MatMul costs ~0.1-1 %).
- fp16 decoder: relative reconstruction error ||pred - pred_ref|| / ||pred_ref|| (per sample) <= 0.01.
- int8 decoder: the same <= 0.1.
A variant beyond its threshold also fails the export: a bundle never ships a variant that was measured bad.
Cosines and errors are against PyTorch fp32, which the fp32 graph matches to 1e-4.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from mae_deploy.errors import VerificationError
from training.model import MaskedAutoencoderViT, VisionTransformer

FP32_MAX_ABS_DIFF = 1e-4
BATCHES = (1, 3)
VARIANT_THRESHOLDS: dict[str, dict[str, dict[str, float]]] = {
    "fp16": {"encoder": {"min_feature_cosine": 0.999}, "decoder": {"max_recon_rel_err": 0.01}},
    "int8": {"encoder": {"min_feature_cosine": 0.99}, "decoder": {"max_recon_rel_err": 0.1}},
}


def visible_grid(num_patches: int) -> list[int]:
    """1, L/4, L/2, L (deduplicated, in order)."""
    L = num_patches
    return sorted({1, max(1, L // 4), max(1, L // 2), L})


@dataclass
class Case:
    """One grid point: inputs and PyTorch's outputs (decoder outputs absent for encoder-only models)."""

    batch: int
    visible: int
    pixel_values: np.ndarray
    ids_keep: np.ndarray
    ids_restore: np.ndarray
    latent: np.ndarray
    pred: np.ndarray | None


def reference_cases(
    model: MaskedAutoencoderViT | VisionTransformer,
    with_decoder: bool,
    batches: Iterable[int] = BATCHES,
    visibles: Iterable[int] | None = None,
    seed: int = 0,
) -> list[Case]:
    """Random normalised-scale images and random masks, with PyTorch fp32 outputs (eval, no grad)."""
    cfg = model.config
    L = cfg.num_patches
    rng = np.random.default_rng(seed)
    cases = []
    for b in batches:
        for k in visibles or visible_grid(L):
            x = rng.standard_normal((b, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
            shuffle = np.stack([rng.permutation(L) for _ in range(b)]).astype(np.int64)
            ids_keep = np.ascontiguousarray(shuffle[:, :k])
            ids_restore = np.argsort(shuffle, axis=1).astype(np.int64)
            with torch.no_grad():
                latent_t = model.forward_encoder(torch.from_numpy(x), torch.from_numpy(ids_keep))
                pred = model.forward_decoder(latent_t, torch.from_numpy(ids_restore)).numpy() if with_decoder else None
            cases.append(Case(b, k, x, ids_keep, ids_restore, latent_t.numpy(), pred))
    return cases


def ort_session(path: str | os.PathLike, threads: int = 0):
    """A CPU ONNX Runtime session (warnings about fp16 constant folding silenced)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(session, part: str, case: Case) -> np.ndarray:
    if part == "encoder":
        feeds = {"pixel_values": case.pixel_values, "ids_keep": case.ids_keep}
    else:
        feeds = {"latent": case.latent, "ids_restore": case.ids_restore}
    return session.run(None, feeds)[0]


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-30)


def _reference(part: str, case: Case) -> np.ndarray:
    out = case.latent if part == "encoder" else case.pred
    if out is None:
        raise ValueError("reference cases were computed without the decoder")
    return out


def _check_shape(out: np.ndarray, ref: np.ndarray, part: str, case: Case, name: str) -> None:
    if out.shape != ref.shape:
        raise VerificationError(
            f"{name} returned shape {out.shape} for batch {case.batch}, visible {case.visible}; PyTorch gives "
            f"{ref.shape}: the graph's dims are not symbolic as they should be (a bug in the export)"
        )


def _progress_iter(cases: list[Case], desc: str, show: bool):
    from tqdm import tqdm

    # disable=None: bars only on a terminal, so logs and CI output stay clean.
    return tqdm(cases, desc=desc, unit="case", leave=False, disable=None if show else True)


def verify_fp32(
    path: str | os.PathLike,
    part: str,
    cases: list[Case],
    threshold: float = FP32_MAX_ABS_DIFF,
    show_progress: bool = False,
) -> dict:
    """Parity of an fp32 graph against PyTorch; raises VerificationError beyond ``threshold``."""
    name = os.path.basename(path)
    session = ort_session(path)
    rows = []
    for case in _progress_iter(cases, f"verify {name}", show_progress):
        ref = _reference(part, case)
        out = _run(session, part, case)
        _check_shape(out, ref, part, case, name)
        diff = float(np.abs(out.astype(np.float64) - ref).max())
        rows.append({
            "batch": case.batch, "visible": case.visible,
            "max_abs_diff": diff, "cosine": float(_rowwise_cosine(out, ref).min()),
        })
    report = {
        "reference": "torch-fp32",
        "cases": rows,
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "min_cosine": min(r["cosine"] for r in rows),
        "threshold": {"max_abs_diff": threshold},
    }
    # NaN compares false: `not <=` catches it.
    report["passed"] = bool(report["max_abs_diff"] <= threshold)
    if not report["passed"]:
        worst = max(rows, key=lambda r: r["max_abs_diff"])
        raise VerificationError(
            f"{name} disagrees with PyTorch: max |diff| {report['max_abs_diff']:.3g} > {threshold:g} "
            f"(worst at batch {worst['batch']}, visible {worst['visible']}); no bundle was written. "
            "Try another --opset, or report the model and versions"
        )
    return report


def _pooled(latent: np.ndarray) -> np.ndarray:
    """Mean of the patch tokens (cls excluded): the feature the extraction pipeline returns."""
    return latent[:, 1:].mean(axis=1)


def verify_variant(
    path: str | os.PathLike,
    part: str,
    precision: str,
    cases: list[Case],
    show_progress: bool = False,
) -> dict:
    """Feature cosine (encoder) or relative reconstruction error (decoder) of a variant vs PyTorch fp32."""
    name = os.path.basename(path)
    thresholds = VARIANT_THRESHOLDS[precision][part]
    session = ort_session(path)
    rows = []
    for case in _progress_iter(cases, f"verify {name}", show_progress):
        ref = _reference(part, case)
        out = _run(session, part, case)
        _check_shape(out, ref, part, case, name)
        row = {
            "batch": case.batch, "visible": case.visible,
            "max_abs_diff": float(np.abs(out.astype(np.float64) - ref).max()),
            "cosine": float(_rowwise_cosine(out, ref).min()),
        }
        if part == "encoder":
            row["feature_cosine"] = float(_rowwise_cosine(_pooled(out), _pooled(ref)).min())
        else:
            num = np.linalg.norm((out.astype(np.float64) - ref).reshape(case.batch, -1), axis=1)
            den = np.maximum(np.linalg.norm(ref.reshape(case.batch, -1).astype(np.float64), axis=1), 1e-30)
            row["recon_rel_err"] = float((num / den).max())
        rows.append(row)
    report = {
        "reference": "torch-fp32",
        "cases": rows,
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "min_cosine": min(r["cosine"] for r in rows),
        "threshold": dict(thresholds),
    }
    if part == "encoder":
        report["min_feature_cosine"] = min(r["feature_cosine"] for r in rows)
        report["passed"] = bool(report["min_feature_cosine"] >= thresholds["min_feature_cosine"])
        measured = f"mean-pooled feature cosine {report['min_feature_cosine']:.5f} < {thresholds['min_feature_cosine']}"
    else:
        report["max_recon_rel_err"] = max(r["recon_rel_err"] for r in rows)
        report["passed"] = bool(report["max_recon_rel_err"] <= thresholds["max_recon_rel_err"])
        measured = (f"relative reconstruction error {report['max_recon_rel_err']:.4g} > "
                    f"{thresholds['max_recon_rel_err']}")
    if not report["passed"]:
        raise VerificationError(
            f"{name} ({precision}) is too far from fp32: {measured}; no bundle was written. "
            f"Export without {precision} (--precision fp32,...) or use another precision"
        )
    return report


def skipped_report(reason: str) -> dict:
    return {"reference": "torch-fp32", "skipped": True, "reason": reason, "cases": [], "passed": None}

