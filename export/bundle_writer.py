"""Checkpoint -> bundle: export, verify, variants, mae.json; written atomically.

Everything is built in a hidden temporary directory next to the destination and renamed into place only
after every graph passed verification, so a failed export leaves nothing behind and an existing bundle
is replaced (``overwrite=True``) only by a complete one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import onnx
import torch

from export.onnx_export import DEFAULT_OPSET, check_graph_file, export_graph, external_data_files
from export.precision import VARIANT_PRECISIONS, make_variant, variant_filename
from export.verify import reference_cases, skipped_report, verify_fp32, verify_variant
from export.wrappers import resize_model
from mae_deploy import __version__
from mae_deploy.bundle import DEFAULT_PREPROCESSING, MANIFEST_NAME, Bundle, sha256_file, write_manifest
from mae_deploy.errors import InputError, MaeDeployError
from training.model import MaskedAutoencoderViT, VisionTransformer

Model = MaskedAutoencoderViT | VisionTransformer
ALL_PRECISIONS = ("fp32", *VARIANT_PRECISIONS)
ALL_PARTS = ("encoder", "decoder")


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
            elif "min_feature_cosine" in p:
                row.update(metric="feature cosine", value=p["min_feature_cosine"],
                           threshold=f">= {p['threshold']['min_feature_cosine']}")
            elif "max_recon_rel_err" in p:
                row.update(metric="recon rel err", value=p["max_recon_rel_err"],
                           threshold=f"<= {p['threshold']['max_recon_rel_err']}")
            else:
                row.update(metric="max |diff|", value=p.get("max_abs_diff"),
                           threshold=f"<= {p.get('threshold', {}).get('max_abs_diff')}")
            row["max_abs_diff"] = p.get("max_abs_diff")
            row.setdefault("result", "ok" if p.get("passed") else "FAILED")
            rows.append(row)
        return rows

    def format_parity(self) -> str:
        head = f"{'graph':<22} {'prec':<5} {'cases':>5}  {'max |diff|':>10}  {'metric':<15} {'value':>10}  threshold"
        lines = [head, "-" * len(head)]
        for r in self.parity_rows():
            diff = f"{r['max_abs_diff']:.2e}" if r["max_abs_diff"] is not None else "-"
            if r["value"] is None:
                val = "-"
            else:
                val = f"{r['value']:.2e}" if r["metric"] == "max |diff|" else f"{r['value']:.6f}"
            lines.append(f"{r['file']:<22} {r['precision']:<5} {r['cases']:>5}  {diff:>10}  {r['metric']:<15} "
                         f"{val:>10}  {r['threshold']:<10} {r['result']}")
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


def default_preprocessing(image_size: int, in_chans: int) -> dict:
    """The official evaluation transform; ImageNet statistics for RGB, 0.5/0.5 for other channel counts
    (no published statistics exist for those, and 0.5/0.5 maps [0, 1] to [-1, 1])."""
    pre = {"image_size": image_size, **DEFAULT_PREPROCESSING}
    if in_chans != 3:
        pre["mean"], pre["std"] = [0.5] * in_chans, [0.5] * in_chans
    return pre


def _versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    return {"mae_deploy": __version__, "torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__}


def _source_sha256(path: Path) -> str | None:
    """sha256 of the checkpoint file, or of the weights file inside a checkpoint directory."""
    if path.is_file():
        return sha256_file(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return sha256_file(path / name)
    return None


def _tensor_specs(values) -> list[dict]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        specs.append({"name": v.name, "dtype": dtype, "shape": shape})
    return specs


def _graph_entry(bundle_dir: Path, part: str, precision: str, parity: dict) -> dict:
    rel = variant_filename(part, precision)
    proto = onnx.load(str(bundle_dir / rel), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    return {
        "part": part,
        "precision": precision,
        "file": rel,
        "external_data": external_data_files(bundle_dir / rel),
        "inputs": _tensor_specs(i for i in proto.graph.input if i.name not in inits),
        "outputs": _tensor_specs(proto.graph.output),
        "parity": parity,
    }


def _check_destination(out: Path, overwrite: bool, source: Path | None) -> None:
    """Fail before the (long) export if the bundle could not be written or would destroy something."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} exists and is a file; choose a directory path for the bundle")
        if not overwrite:
            raise InputError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise InputError(
                f"{out} is a non-empty directory that is not a bundle (no {MANIFEST_NAME}); refusing to replace "
                "it even with --overwrite: choose another --out"
            )
        if source is not None and (source.resolve() == out.resolve() or out.resolve() in source.resolve().parents):
            raise InputError(f"the checkpoint {source} is inside {out}; --overwrite would delete it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the parent directory of --out {out}: {e.strerror or e}") from e
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"cannot write to {out.parent} (permission denied); choose another --out")


def _publish_permissions(root: Path) -> None:
    """mkdtemp makes 0700 directories; a bundle is meant to be shared, so apply the umask as for any file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(Path(base) / d, 0o777 & ~umask)
        for f in files:
            os.chmod(Path(base) / f, 0o666 & ~umask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir to ``out``; an existing bundle is swapped out, then deleted."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _load(model_or_checkpoint_path: Model | str | os.PathLike) -> tuple[Model, dict, list[str], list[str]]:
    """(model in eval mode, source block of mae.json, parts present, notes)."""
    if isinstance(model_or_checkpoint_path, torch.nn.Module):
        model = model_or_checkpoint_path.eval()
        parts = ["encoder", "decoder"] if getattr(model, "has_decoder", False) else ["encoder"]
        return model, {"checkpoint": None, "format": "in-memory", "sha256": None}, parts, []
    from training.checkpoints import load_model

    path = Path(model_or_checkpoint_path)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    model, ckpt = load_model(path)
    notes = list(ckpt.notes)
    if ckpt.is_classifier:
        notes.append(
            "fine-tuned classifier checkpoint: the encoder graph returns the tokens"
            + (" before fc_norm (global pool checkpoints have no final norm)" if ckpt.global_pool else "")
            + "; the classification head is not exported"
        )
    source = {"checkpoint": str(path.resolve()), "format": ckpt.format, "sha256": _source_sha256(path)}
    parts = [p for p in ckpt.parts if p in ALL_PARTS]
    return model, source, parts, notes


def _normalise_choice(values: Sequence[str] | str, allowed: Sequence[str], what: str) -> list[str]:
    if isinstance(values, str):
        values = [v for v in values.split(",")]
    out = []
    for v in values:
        v = v.strip().lower()
        if v not in allowed:
            raise InputError(f"unknown {what} {v!r}; choose from {', '.join(allowed)}")
        if v not in out:
            out.append(v)
    return out


def export_bundle(
    model_or_checkpoint_path: Model | str | os.PathLike,
    out_dir: str | os.PathLike,
    image_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    precisions: Sequence[str] | str = ("fp32",),
    parts: Sequence[str] | str | None = None,
    overwrite: bool = False,
    reference_weights: bool = False,
    external_data: bool | None = None,
    verify: bool = True,
    progress: Callable[[str], None] | None = print,
) -> ExportReport:
    """Export a checkpoint (any format ``training.checkpoints`` reads) or a model to a bundle directory.

    - ``precisions``: fp32 is always written (it is the reference and the default graph); ``fp16`` and
      ``int8`` add ``<part>.<precision>.onnx`` variants.
    - ``parts``: None = every part the checkpoint has (encoder, and decoder when present).
    - ``external_data``: None = weights in a side ``.onnx.data`` file only when above ~1.5 GB (ViT-H);
      True/False forces it.
    - ``verify``: False skips the parity grid (mae.json then records it as skipped); only for quick tests.
    - ``reference_weights``: also copy the (resized) model as a native checkpoint into ``reference/``, for
      the torch backend.
    Raises InputError / CheckpointError for bad input and VerificationError (exit 5) when a graph disagrees
    with PyTorch; then nothing is written.
    """
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    requested = set(_normalise_choice(precisions, ALL_PRECISIONS, "precision")) | {"fp32"}
    wanted_precisions = [p for p in ALL_PRECISIONS if p in requested]  # fp32 first: variants derive from it
    source_path = None if isinstance(model_or_checkpoint_path, torch.nn.Module) else Path(model_or_checkpoint_path)
    _check_destination(out, overwrite, source_path)

    model, source, available, notes = _load(model_or_checkpoint_path)
    if parts is None:
        wanted_parts = [p for p in ALL_PARTS if p in available]
    else:
        wanted_parts = _normalise_choice(parts, ALL_PARTS, "part")
        if "encoder" not in wanted_parts:
            raise InputError("a bundle needs the encoder: use --parts encoder or --parts encoder,decoder")
        if "decoder" in wanted_parts and "decoder" not in available:
            raise InputError(
                "this checkpoint has no decoder (encoder-only); export it with --parts encoder, or use a "
                "*_full / mae_visualize_* checkpoint for reconstruction"
            )
        wanted_parts = [p for p in ALL_PARTS if p in wanted_parts]  # encoder first

    original_size = model.config.img_size
    if image_size is not None and image_size != original_size:
        model = resize_model(model, image_size)
        notes.append(f"position embeddings interpolated (bicubic) from {original_size}px "
                     f"({original_size // model.config.patch_size}x grid) to {image_size}px "
                     f"({model.config.grid_size}x grid)")
    cfg = model.config
    say(f"exporting {cfg.name} ({cfg.img_size}px, L={cfg.num_patches}, parts: {', '.join(wanted_parts)}, "
        f"precisions: {', '.join(wanted_precisions)}) -> {out}")

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ext: dict[str, bool] = {}
        for part in wanted_parts:
            t = time.perf_counter()
            dst = tmp / variant_filename(part, "fp32")
            g = export_graph(model, part, dst, opset=opset, external_data=external_data)
            ext[part] = bool(g.external_data)
            say(f"  {g.path.name}: exported in {time.perf_counter() - t:.1f}s"
                + (f" (weights in {', '.join(g.external_data)})" if g.external_data else ""))

        parity: dict[tuple[str, str], dict] = {}
        cases = reference_cases(model, with_decoder="decoder" in wanted_parts) if verify else []
        for part in wanted_parts:
            path = tmp / variant_filename(part, "fp32")
            parity[(part, "fp32")] = (verify_fp32(path, part, cases, show_progress=progress is not None)
                                      if verify else skipped_report("export ran with verification disabled"))
        for precision in wanted_precisions[1:]:
            for part in wanted_parts:
                t = time.perf_counter()
                dst = tmp / variant_filename(part, precision)
                make_variant(tmp / variant_filename(part, "fp32"), dst, precision, external_data=ext[part])
                check_graph_file(dst)
                say(f"  {dst.name}: converted in {time.perf_counter() - t:.1f}s")
                parity[(part, precision)] = (
                    verify_variant(dst, part, precision, cases, show_progress=progress is not None)
                    if verify else skipped_report("export ran with verification disabled")
                )

        if reference_weights:
            from training.checkpoints import save_native

            save_native(model, tmp / "reference", parts=wanted_parts,
                        source={"format": source["format"], "path": source["checkpoint"], "note": "bundle reference"})
            say("  reference/: native checkpoint for --backend torch")

        arch = cfg.to_dict()
        arch["num_classes"] = getattr(model, "num_classes", 0)
        arch["global_pool"] = bool(getattr(model, "global_pool", False))
        manifest = {
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "architecture": arch,
            "preprocessing": default_preprocessing(cfg.img_size, cfg.in_chans),
            "norm_pix_loss": cfg.norm_pix_loss,
            "opset": opset,
            "graphs": [
                _graph_entry(tmp, part, precision, parity[(part, precision)])
                for part in wanted_parts for precision in wanted_precisions
            ],
            "exporter": _versions(),
            "source": {**source, "img_size": original_size},
            "notes": notes,
        }
        write_manifest(tmp, manifest)
        Bundle.load(tmp, verify=False)  # the reader accepts what we wrote
        _publish_permissions(tmp)
        _move_into_place(tmp, out)
    except MaeDeployError:
        raise
    except OSError as e:
        raise InputError(f"cannot write the bundle {out}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    manifest = Bundle.load(out, verify=False).manifest
    files = {rel: (out / rel).stat().st_size for rel in manifest["files"]}
    files[MANIFEST_NAME] = (out / MANIFEST_NAME).stat().st_size
    return ExportReport(out, manifest, files, time.perf_counter() - t0, notes)
