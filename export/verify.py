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
- int8-qdq, int8-nncf: as int8, but on calibration images instead of noise: a statically calibrated graph clips
  activations outside the ranges it was calibrated on, and noise images are far outside what a trained
  model sees (its report says ``"inputs": "calibration images"``). The dynamic int8 variant is judged on
  them too when the export is given ``--calibration``: a trained classifier's top-1 on noise images turns on
  rounding alone (the demo's digits probe: 10 or 11 of 12 noise images, depending on the graph layout).
- classifier (batch 1, 3, 8 = 12 images, every patch visible): fp32 as above on the logits; variants by
  logit cosine (per image, min) >= 0.999 (fp16) / 0.99 (int8, int8-qdq) and top-1 agreement with PyTorch
  = 1.0 (fp16) / >= 0.9 (int8, int8-qdq). An image whose PyTorch logits have a near tie (second best
  within 1 % of the logit range of the best) agrees when the variant picks any of the tied classes: on
  noise images an untrained head is all ties, and a tie is no evidence of a quantisation error.
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
from mae_deploy.names import CLASSIFIER, INT8_NNCF, INT8_QDQ
from training.model import MaskedAutoencoderViT, VisionTransformer

FP32_MAX_ABS_DIFF = 1e-4
BATCHES = (1, 3)
CLASSIFIER_BATCHES = (1, 3, 8)
TIE_FRACTION = 0.01  # of the logit range: top-1 candidates closer than this count as a tie
_INT8_THRESHOLDS = {
    "encoder": {"min_feature_cosine": 0.99},
    "decoder": {"max_recon_rel_err": 0.1},
    CLASSIFIER: {"min_logit_cosine": 0.99, "min_top1_agreement": 0.9},
}
VARIANT_THRESHOLDS: dict[str, dict[str, dict[str, float]]] = {
    "fp16": {
        "encoder": {"min_feature_cosine": 0.999},
        "decoder": {"max_recon_rel_err": 0.01},
        CLASSIFIER: {"min_logit_cosine": 0.999, "min_top1_agreement": 1.0},
    },
    "int8": _INT8_THRESHOLDS,
    INT8_QDQ: _INT8_THRESHOLDS,
    INT8_NNCF: _INT8_THRESHOLDS,
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


@dataclass
class ClassifierCase:
    """A batch of images (every patch visible) and PyTorch's logits."""

    batch: int
    visible: int  # every patch: reports name cases by (batch, visible)
    pixel_values: np.ndarray
    logits: np.ndarray


def reference_cases(
    model: MaskedAutoencoderViT | VisionTransformer,
    with_decoder: bool,
    batches: Iterable[int] = BATCHES,
    visibles: Iterable[int] | None = None,
    seed: int = 0,
    images: np.ndarray | None = None,
) -> list[Case]:
    """Random normalised-scale images (or batches drawn from ``images``) and random masks, with PyTorch
    fp32 outputs (eval, no grad)."""
    cfg = model.config
    L = cfg.num_patches
    rng = np.random.default_rng(seed)
    cases = []
    for b in batches:
        for k in visibles or visible_grid(L):
            x = _inputs(rng, b, cfg, images)
            shuffle = np.stack([rng.permutation(L) for _ in range(b)]).astype(np.int64)
            ids_keep = np.ascontiguousarray(shuffle[:, :k])
            ids_restore = np.argsort(shuffle, axis=1).astype(np.int64)
            with torch.no_grad():
                latent_t = model.forward_encoder(torch.from_numpy(x), torch.from_numpy(ids_keep))
                pred = model.forward_decoder(latent_t, torch.from_numpy(ids_restore)).numpy() if with_decoder else None
            cases.append(Case(b, k, x, ids_keep, ids_restore, latent_t.numpy(), pred))
    return cases


def _inputs(rng: np.random.Generator, batch: int, cfg, images: np.ndarray | None) -> np.ndarray:
    """``batch`` noise images, or ``batch`` of ``images`` picked at random (repeats when there are fewer)."""
    if images is None:
        return rng.standard_normal((batch, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
    return np.ascontiguousarray(images[rng.choice(len(images), size=batch, replace=len(images) < batch)])


def classifier_cases(
    model: VisionTransformer,
    batches: Iterable[int] = CLASSIFIER_BATCHES,
    seed: int = 0,
    images: np.ndarray | None = None,
) -> list[ClassifierCase]:
    """Random normalised-scale images (or ``images``) with PyTorch fp32 logits (eval, no grad)."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    cases = []
    for b in batches:
        x = _inputs(rng, b, cfg, images)
        with torch.no_grad():
            logits = model(torch.from_numpy(x)).numpy()
        cases.append(ClassifierCase(b, cfg.num_patches, x, logits))
    return cases


def ort_session(path: str | os.PathLike, threads: int = 0):
    """A CPU ONNX Runtime session (warnings about fp16 constant folding silenced)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(session, part: str, case: Case | ClassifierCase) -> np.ndarray:
    if part == CLASSIFIER:
        feeds = {"pixel_values": case.pixel_values}
    elif part == "encoder":
        feeds = {"pixel_values": case.pixel_values, "ids_keep": case.ids_keep}
    else:
        feeds = {"latent": case.latent, "ids_restore": case.ids_restore}
    return session.run(None, feeds)[0]


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-30)


def _reference(part: str, case: Case | ClassifierCase) -> np.ndarray:
    if part == CLASSIFIER:
        return case.logits
    out = case.latent if part == "encoder" else case.pred
    if out is None:
        raise ValueError("reference cases were computed without the decoder")
    return out


def _check_shape(out: np.ndarray, ref: np.ndarray, part: str, case: Case | ClassifierCase, name: str) -> None:
    if out.shape != ref.shape:
        raise VerificationError(
            f"{name} returned shape {out.shape} for batch {case.batch}, visible {case.visible}; PyTorch gives "
            f"{ref.shape}: the graph's dims are not symbolic as they should be (a bug in the export)"
        )


def _progress_iter(cases: list, desc: str, show: bool):
    from tqdm import tqdm

    # disable=None: bars only on a terminal, so logs and CI output stay clean.
    return tqdm(cases, desc=desc, unit="case", leave=False, disable=None if show else True)


def verify_fp32(
    path: str | os.PathLike,
    part: str,
    cases: list[Case] | list[ClassifierCase],
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
        rows.append(
            {
                "batch": case.batch,
                "visible": case.visible,
                "max_abs_diff": diff,
                "cosine": float(_rowwise_cosine(out, ref).min()),
            }
        )
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
        if not all(np.isfinite(_reference(part, c)).all() for c in cases):
            raise VerificationError(
                f"PyTorch itself returns NaN or inf for {name} on finite inputs (overflowing weights?); no "
                "bundle was written. Check the checkpoint with `mae-deploy info`"
            )
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


def top1_agreement(out: np.ndarray, ref: np.ndarray, tie_fraction: float = TIE_FRACTION) -> np.ndarray:
    """Per row: does ``out``'s top-1 class agree with ``ref``'s, a near tie in ``ref`` counting as agreed
    when ``out`` picks any of the tied classes (see the module docstring)."""
    ref = ref.astype(np.float64)
    best = ref.max(axis=1, keepdims=True)
    spread = np.maximum(best - ref.min(axis=1, keepdims=True), 1e-30)
    tied = ref >= best - tie_fraction * spread
    return tied[np.arange(len(ref)), out.argmax(axis=1)]


def _variant_row(part: str, case: Case | ClassifierCase, out: np.ndarray, ref: np.ndarray) -> dict:
    row = {
        "batch": case.batch,
        "visible": case.visible,
        "max_abs_diff": float(np.abs(out.astype(np.float64) - ref).max()),
        "cosine": float(_rowwise_cosine(out, ref).min()),
    }
    if part == "encoder":
        row["feature_cosine"] = float(_rowwise_cosine(_pooled(out), _pooled(ref)).min())
    elif part == CLASSIFIER:
        row["logit_cosine"] = row["cosine"]
        row["top1_agree"] = int(top1_agreement(out, ref).sum())
    else:
        num = np.linalg.norm((out.astype(np.float64) - ref).reshape(case.batch, -1), axis=1)
        den = np.maximum(np.linalg.norm(ref.reshape(case.batch, -1).astype(np.float64), axis=1), 1e-30)
        row["recon_rel_err"] = float((num / den).max())
    return row


def _judge(part: str, report: dict, rows: list[dict], thresholds: dict) -> str:
    """Fill the summary metrics and ``passed`` into ``report``; returns what failed, in words."""
    if part == "encoder":
        report["min_feature_cosine"] = min(r["feature_cosine"] for r in rows)
        report["passed"] = bool(report["min_feature_cosine"] >= thresholds["min_feature_cosine"])
        return f"mean-pooled feature cosine {report['min_feature_cosine']:.5f} < {thresholds['min_feature_cosine']}"
    if part == CLASSIFIER:
        report["min_logit_cosine"] = min(r["logit_cosine"] for r in rows)
        report["top1_agreement"] = sum(r["top1_agree"] for r in rows) / sum(r["batch"] for r in rows)
        report["passed"] = bool(
            report["min_logit_cosine"] >= thresholds["min_logit_cosine"]
            and report["top1_agreement"] >= thresholds["min_top1_agreement"]
        )
        return (
            f"logit cosine {report['min_logit_cosine']:.5f} (needs >= {thresholds['min_logit_cosine']}), "
            f"top-1 agreement {report['top1_agreement']:.3f} (needs >= {thresholds['min_top1_agreement']})"
        )
    report["max_recon_rel_err"] = max(r["recon_rel_err"] for r in rows)
    report["passed"] = bool(report["max_recon_rel_err"] <= thresholds["max_recon_rel_err"])
    return f"relative reconstruction error {report['max_recon_rel_err']:.4g} > {thresholds['max_recon_rel_err']}"


def verify_variant(
    path: str | os.PathLike,
    part: str,
    precision: str,
    cases: list[Case] | list[ClassifierCase],
    show_progress: bool = False,
) -> dict:
    """A variant vs PyTorch fp32: feature cosine (encoder), relative reconstruction error (decoder), logit
    cosine and top-1 agreement (classifier). Raises VerificationError beyond the thresholds."""
    name = os.path.basename(path)
    thresholds = VARIANT_THRESHOLDS[precision][part]
    session = ort_session(path)
    rows = []
    for case in _progress_iter(cases, f"verify {name}", show_progress):
        ref = _reference(part, case)
        out = _run(session, part, case)
        _check_shape(out, ref, part, case, name)
        rows.append(_variant_row(part, case, out, ref))
    del session
    report = {
        "reference": "torch-fp32",
        "cases": rows,
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "min_cosine": min(r["cosine"] for r in rows),
        "threshold": dict(thresholds),
    }
    measured = _judge(part, report, rows, thresholds)
    if not report["passed"]:
        raise VerificationError(
            f"{name} ({precision}) is too far from fp32: {measured}; no bundle was written. "
            f"Export without {precision} (--precision fp32,...) or use another precision"
        )
    return report


def skipped_report(reason: str) -> dict:
    return {"reference": "torch-fp32", "skipped": True, "reason": reason, "cases": [], "passed": None}
