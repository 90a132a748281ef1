"""Checkpoint -> bundle: export, verify, variants, mae.json; written atomically.

Everything is built in a hidden staging directory next to the destination and renamed into place only
after every graph passed verification, so a failed export leaves nothing behind and an existing bundle
is replaced (``overwrite=True``) only by a complete one; export/staging.py locks the destination and
removes what a killed export left.

Memory: the stages run one after another and each frees what it held before the next starts. The
PyTorch model lives only while the fp32 graphs are exported and PyTorch's reference outputs computed;
then it is dropped, and every graph is verified and converted one at a time (one ONNX Runtime session,
one variant in memory). Large graphs keep their weights in a side ``.onnx.data`` file, which is what the
converters and sessions read. benchmarks/bench_export_memory.py measures the peak (ViT-H/14: RESULTS.md).
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import onnx
import torch

from export import staging
from export.calibration import CalibrationSet, load_calibration, part_feeds
from export.labels import resolve_class_names
from export.nncf_int8 import NncfOptions, float_matmuls, pixel_range
from export.onnx_export import DEFAULT_OPSET, check_graph_file, export_graph, external_data_files
from export.precision import VARIANT_PRECISIONS, make_variant, variant_filename
from export.report import ExportReport
from export.verify import classifier_cases, reference_cases, skipped_report, verify_fp32, verify_variant
from export.wrappers import resize_model
from mae_deploy import __version__
from mae_deploy.bundle import DEFAULT_PREPROCESSING, MANIFEST_NAME, Bundle, sha256_file, write_manifest
from mae_deploy.errors import CheckpointError, InputError, MaeDeployError
from mae_deploy.fileio import check_replaceable_dir
from mae_deploy.names import CALIBRATED_PRECISIONS, CLASSIFIER, INT8_NNCF, INT8_QDQ
from training.model import MaskedAutoencoderViT, VisionTransformer

Model = MaskedAutoencoderViT | VisionTransformer
ALL_PRECISIONS = ("fp32", *VARIANT_PRECISIONS)
ALL_PARTS = ("encoder", "decoder", CLASSIFIER)
# How each quantised precision was made (mae.json "quantization"; runners pick int8 graphs by it).
QUANTIZATION = {
    "int8": {
        "method": "dynamic",
        "format": "integer-ops",
        "weights": "int8 symmetric per-channel",
        "activations": "uint8 per-tensor, ranges computed per call",
    },
    INT8_QDQ: {
        "method": "static",
        "format": "qdq",
        "weights": "int8 symmetric per-channel",
        "activations": "int8 symmetric per-tensor, calibrated",
    },
    INT8_NNCF: NncfOptions().describe(),
}

__all__ = ["ExportReport", "export_bundle", "default_preprocessing"]


# Below this much weight data the stages' peaks are small, and a full collection (~0.4 s with torch loaded,
# 13 of them in an export of every precision) would be most of a small model's export time.
RELEASE_MIN_BYTES = 64 * 2**20


# Variants judged on the calibration images when the export has them (noise says little about int8: a
# trained classifier's decisions on noise are near-arbitrary, so 12 noise images flip on rounding alone).
JUDGED_ON_IMAGES = ("int8", *CALIBRATED_PRECISIONS)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next stage's peak does not stack
    on this one's (glibc keeps freed small-block arenas otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


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

    return {
        "mae_deploy": __version__,
        "torch": torch.__version__.split("+")[0],
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
    }


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


def _graph_entry(bundle_dir: Path, part: str, precision: str, parity: dict, calibration: dict | None) -> dict:
    rel = variant_filename(part, precision)
    proto = onnx.load(str(bundle_dir / rel), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    entry = {
        "part": part,
        "precision": precision,
        "file": rel,
        "external_data": external_data_files(bundle_dir / rel),
        "inputs": _tensor_specs(i for i in proto.graph.input if i.name not in inits),
        "outputs": _tensor_specs(proto.graph.output),
        "parity": parity,
    }
    if precision in QUANTIZATION:
        entry["quantization"] = dict(QUANTIZATION[precision])
        if precision in CALIBRATED_PRECISIONS and calibration:
            entry["quantization"]["calibration"] = calibration
        if precision == INT8_NNCF:  # what NNCF left in float, as the graph says (not as we asked)
            entry["quantization"]["float_matmuls"] = float_matmuls(proto)
    return entry


def _check_destination(out: Path, overwrite: bool, source: Path | None) -> None:
    """Fail before the (long) export if the bundle could not be written or would destroy something."""
    check_replaceable_dir(out, overwrite=overwrite, marker=MANIFEST_NAME, what="bundle", protect=source)


def discard_weights(model: torch.nn.Module) -> None:
    """Free the storage of every parameter and buffer of ``model`` (which must not be used afterwards).

    Deleting the model is not enough: the ONNX exporter keeps its initializers as wrappers around the very
    Parameter objects, in objects that outlive the export, so the weights stayed resident (measured: +2.6
    GB through every later stage of a ViT-H export). Emptying the Parameters releases them whoever holds them.
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = torch.empty(0, dtype=t.dtype)


@dataclass
class _Loaded:
    """The model and what the manifest records about where it came from."""

    model: Model
    source: dict
    parts: list[str]  # available: encoder, decoder, classifier
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point weights holding NaN or inf."""
    return [k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _check_finite(model: Model, where: str) -> None:
    bad = nonfinite_tensors(model)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CheckpointError(
            f"{where} has NaN or inf weights in {len(bad)} tensor(s): {shown}. The checkpoint is broken (a "
            "diverged training run or a damaged file): export an earlier checkpoint"
        )


def _load(model_or_checkpoint_path: Model | str | os.PathLike, hints: dict | None = None) -> _Loaded:
    if isinstance(model_or_checkpoint_path, torch.nn.Module):
        model = model_or_checkpoint_path.eval()
        _check_finite(model, "the model")
        parts = ["encoder", "decoder"] if getattr(model, "has_decoder", False) else ["encoder"]
        if getattr(model, "num_classes", 0) > 0:
            parts.append(CLASSIFIER)
        return _Loaded(model, {"checkpoint": None, "format": "in-memory", "sha256": None}, parts)
    from training.checkpoints import load_model

    path = Path(model_or_checkpoint_path)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    model, ckpt = load_model(path, **(hints or {}))  # hints: --num-heads etc., what weights cannot tell
    _check_finite(model, f"checkpoint {path}")
    notes = list(ckpt.notes)
    if ckpt.is_classifier and ckpt.global_pool:
        notes.append(
            "fine-tuned classifier checkpoint: the encoder graph returns the tokens before fc_norm "
            "(global pool checkpoints have no final norm); classifier.onnx applies pool, fc_norm and head"
        )
    source = {"checkpoint": str(path.resolve()), "format": ckpt.format, "sha256": _source_sha256(path)}
    parts = [CLASSIFIER if p == "head" else p for p in ckpt.parts]
    return _Loaded(
        model,
        source,
        [p for p in ALL_PARTS if p in parts],
        notes,
        list(getattr(ckpt, "class_names", None) or []) or None,
    )


def _wanted_parts(parts: Sequence[str] | str | None, available: list[str]) -> list[str]:
    if parts is None:
        return list(available)
    wanted = _normalise_choice(parts, ALL_PARTS, "part")
    if "encoder" not in wanted:
        raise InputError("a bundle needs the encoder: use --parts encoder (plus decoder or classifier)")
    if "decoder" in wanted and "decoder" not in available:
        raise InputError(
            "this checkpoint has no decoder (encoder-only); export it with --parts encoder, or use a "
            "*_full / mae_visualize_* checkpoint for reconstruction"
        )
    if CLASSIFIER in wanted and CLASSIFIER not in available:
        raise InputError(
            "this checkpoint has no classification head: --parts classifier needs a fine-tuned or "
            "linear-probe checkpoint (mae-deploy finetune / linprobe)"
        )
    return [p for p in ALL_PARTS if p in wanted]  # encoder first


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


@dataclass(frozen=True)
class ExportOptions:
    """Every setting of an export, with its default (see :func:`export_bundle`)."""

    image_size: int | None = None
    opset: int = DEFAULT_OPSET
    precisions: Sequence[str] | str = ("fp32",)
    parts: Sequence[str] | str | None = None
    overwrite: bool = False
    reference_weights: bool = False
    external_data: bool | None = None
    verify: bool = True
    progress: Callable[[str], None] | None = print
    labels: str | os.PathLike | Sequence[str] | None = None
    calibration: str | os.PathLike | None = None
    calibration_count: int = 256
    checkpoint_hints: dict | None = None

    def updated(self, **changes) -> ExportOptions:
        """A copy with ``changes``; an unknown name is an InputError listing the options."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InputError(f"export_bundle has no option {', '.join(unknown)}; it takes: {', '.join(sorted(names))}")
        return replace(self, **changes)


def export_bundle(
    model_or_checkpoint_path: Model | str | os.PathLike,
    out_dir: str | os.PathLike,
    options: ExportOptions | None = None,
    **settings,
) -> ExportReport:
    """Export a checkpoint (any format ``training.checkpoints`` reads) or a model to a bundle directory.

    Settings come in ``options`` (an :class:`ExportOptions`, what ``mae-deploy export`` builds) and/or as
    keywords overriding its fields (``export_bundle(model, out, precisions=("fp32", "fp16"), verify=False)``):

    - ``precisions``: fp32 is always written (it is the reference and the default graph); ``fp16``,
      ``int8`` (dynamic), ``int8-qdq`` and ``int8-nncf`` (static Q/DQ, need ``calibration``) add
      ``<part>.<precision>.onnx`` variants.
    - ``parts``: None = every part the checkpoint has (encoder; decoder when present; classifier when
      it has a head).
    - ``labels``: class names of a classifier (a file with one per line, or a list); overrides the names
      the checkpoint records; neither gives ``class_0 ...``.
    - ``calibration``: images (directory, glob or list file) for the calibrated int8; ``calibration_count`` of
      them are used. Every int8 variant, the dynamic one too, is then judged on them instead of noise.
    - ``external_data``: None = weights in a side ``.onnx.data`` file only when above ~1.5 GB (ViT-H);
      True/False forces it.
    - ``verify``: False skips the parity grid (mae.json then records it as skipped); only for quick tests.
    - ``reference_weights``: also copy the (resized) model as a native checkpoint into ``reference/``, for
      the torch backend.
    - ``checkpoint_hints``: ``num_heads``, ``decoder_num_heads``, ``norm_pix_loss`` for a checkpoint whose
      weights cannot tell them (``load_checkpoint``'s hints; ``export --num-heads`` etc.).
    Raises InputError / CheckpointError for bad input and VerificationError (exit 5) when a graph disagrees
    with PyTorch; then nothing is written.
    """
    o = (options or ExportOptions()).updated(**settings)
    t0 = time.perf_counter()
    say = o.progress or (lambda _msg: None)
    out = Path(out_dir)
    requested = set(_normalise_choice(o.precisions, ALL_PRECISIONS, "precision")) | {"fp32"}
    wanted_precisions = [p for p in ALL_PRECISIONS if p in requested]  # fp32 first: variants derive from it
    calibrated = [p for p in CALIBRATED_PRECISIONS if p in requested]
    if calibrated and o.calibration is None:
        raise InputError(
            f"--precision {calibrated[0]} is calibrated on real images: pass --calibration DIR "
            "(a folder, glob or list file of images like those the model will see)"
        )
    source_path = None if isinstance(model_or_checkpoint_path, torch.nn.Module) else Path(model_or_checkpoint_path)
    _check_destination(out, o.overwrite, source_path)

    with staging.ExportLock(out):
        for stale in staging.clean_stale(out):
            say(f"removed {stale.name}, left by an export that was killed")
        return _export_locked(model_or_checkpoint_path, out, replace(o, precisions=tuple(wanted_precisions)), t0)


@dataclass
class _Plan:
    """What one export writes, settled before the staging directory exists."""

    parts: list[str]
    precisions: list[str]
    opset: int
    external_data: bool | None
    verify: bool
    show_progress: bool
    calibration: CalibrationSet | None = None
    external: dict[str, bool] = field(default_factory=dict)  # part -> weights in a side file
    class_names: list[str] | None = None
    pixels: tuple[float, float] | None = None  # the normalised pixel range (int8-nncf's pixel quantiser)
    release_between_stages: bool = True  # big weights: free each stage's memory before the next one

    def release_memory(self) -> None:
        if self.release_between_stages:
            release_memory()


def _torch_stage(
    model: Model, tmp: Path, plan: _Plan, reference_weights: bool, source: dict, say: Callable[[str], None]
) -> dict[str, list]:
    """Everything that needs the PyTorch model: the fp32 graphs, PyTorch's reference outputs (part ->
    cases) and the optional reference weights."""
    for part in plan.parts:
        t = time.perf_counter()
        g = export_graph(
            model, part, tmp / variant_filename(part, "fp32"), opset=plan.opset, external_data=plan.external_data
        )
        plan.external[part] = bool(g.external_data)
        say(
            f"  {g.path.name}: exported in {time.perf_counter() - t:.1f}s"
            + (f" (weights in {', '.join(g.external_data)})" if g.external_data else "")
        )
        plan.release_memory()  # the exporter's program holds graph copies until collected
    cases: dict[str, list] = {}
    if plan.verify:
        cases = _reference_outputs(model, plan.parts)
        if plan.calibration is not None:  # int8 is judged on images like those the model will see
            real = _reference_outputs(model, plan.parts, plan.calibration.pixel_values)
            cases.update({f"{part}:{p}": c for part, c in real.items() for p in JUDGED_ON_IMAGES})
        say("  PyTorch reference outputs computed")
    if reference_weights:
        from training.checkpoints import save_native

        save_native(
            model,
            tmp / "reference",
            parts=["head" if p == CLASSIFIER else p for p in plan.parts],
            source={"format": source["format"], "path": source["checkpoint"], "note": "bundle reference"},
            class_names=plan.class_names,
        )
        say("  reference/: native checkpoint for --backend torch")
    return cases


def _reference_outputs(model: Model, parts: list[str], images=None) -> dict[str, list]:
    """part -> PyTorch reference cases (encoder and decoder share theirs)."""
    mae_parts = [p for p in parts if p != CLASSIFIER]
    shared = reference_cases(model, with_decoder="decoder" in mae_parts, images=images)
    cases: dict[str, list] = {p: shared for p in mae_parts}
    if CLASSIFIER in parts:
        cases[CLASSIFIER] = classifier_cases(model, images=images)
    return cases


def _onnx_stage(
    tmp: Path, plan: _Plan, cases: dict[str, list], num_patches: int, say: Callable[[str], None]
) -> dict[tuple[str, str], dict]:
    """Verify the fp32 graphs, then make and verify each variant, one graph in memory at a time."""
    skipped = skipped_report("export ran with verification disabled")
    parity: dict[tuple[str, str], dict] = {}
    for part in plan.parts:
        path = tmp / variant_filename(part, "fp32")
        parity[(part, "fp32")] = (
            verify_fp32(path, part, cases[part], show_progress=plan.show_progress) if plan.verify else skipped
        )
        if plan.verify:
            say(f"  {path.name}: verified")
        plan.release_memory()
    for precision in plan.precisions[1:]:
        for part in plan.parts:
            t = time.perf_counter()
            dst = tmp / variant_filename(part, precision)
            feeds = None
            if precision in CALIBRATED_PRECISIONS and plan.calibration is not None:
                feeds = part_feeds(
                    part,
                    plan.calibration,
                    num_patches,
                    tmp / variant_filename("encoder", "fp32"),
                    masked=precision == INT8_NNCF,
                )
            make_variant(
                tmp / variant_filename(part, "fp32"),
                dst,
                precision,
                external_data=plan.external[part],
                feeds=feeds,
                pixels=plan.pixels,
            )
            del feeds
            plan.release_memory()
            check_graph_file(dst)
            say(f"  {dst.name}: converted in {time.perf_counter() - t:.1f}s")
            parity[(part, precision)] = (
                verify_variant(
                    dst,
                    part,
                    precision,
                    cases.get(f"{part}:{precision}", cases[part]),
                    show_progress=plan.show_progress,
                )
                if plan.verify
                else skipped
            )
            if plan.verify and precision in JUDGED_ON_IMAGES and plan.calibration is not None:
                parity[(part, precision)]["inputs"] = "calibration images"
            if plan.verify:
                say(f"  {dst.name}: verified")
            plan.release_memory()
    return parity


def _export_locked(model_or_checkpoint_path, out: Path, o: ExportOptions, t0: float) -> ExportReport:
    """The export under its lock; ``o.precisions`` are settled (fp32 first)."""
    say = o.progress or (lambda _msg: None)
    image_size, opset, reference_weights, labels = o.image_size, o.opset, o.reference_weights, o.labels
    calibration = o.calibration
    loaded = _load(model_or_checkpoint_path, o.checkpoint_hints)
    model, notes = loaded.model, loaded.notes
    plan = _Plan(
        _wanted_parts(o.parts, loaded.parts),
        list(o.precisions),
        opset,
        o.external_data,
        o.verify,
        o.progress is not None,
        release_between_stages=sum(t.nbytes for t in model.state_dict().values()) >= RELEASE_MIN_BYTES,
    )
    if labels is not None and CLASSIFIER not in plan.parts:
        raise InputError(
            "--labels names the classes of a classifier, but this export has no classifier graph "
            "(the checkpoint has no head)"
        )
    class_names = None
    if CLASSIFIER in plan.parts:
        class_names = resolve_class_names(model.num_classes, loaded.class_names, labels)
        plan.class_names = class_names[0]
    original_size = model.config.img_size
    if image_size is not None and image_size != original_size:
        model = resize_model(model, image_size)
        notes.append(
            f"position embeddings interpolated (bicubic) from {original_size}px "
            f"({original_size // model.config.patch_size}x grid) to {image_size}px "
            f"({model.config.grid_size}x grid)"
        )
    cfg = model.config
    preprocessing = default_preprocessing(cfg.img_size, cfg.in_chans)
    plan.pixels = pixel_range(preprocessing["mean"], preprocessing["std"])
    if calibration is not None and any(p in plan.precisions for p in JUDGED_ON_IMAGES):
        plan.calibration = load_calibration(calibration, preprocessing, cfg.in_chans, o.calibration_count)
        say(
            f"calibration: {len(plan.calibration.pixel_values)} images from {calibration}"
            + (f" ({len(plan.calibration.skipped)} unreadable, skipped)" if plan.calibration.skipped else "")
        )
    say(
        f"exporting {cfg.name} ({cfg.img_size}px, L={cfg.num_patches}, parts: {', '.join(plan.parts)}, "
        f"precisions: {', '.join(plan.precisions)}) -> {out}"
    )
    arch = {
        **cfg.to_dict(),
        "num_classes": getattr(model, "num_classes", 0),
        "global_pool": bool(getattr(model, "global_pool", False)),
    }

    source = {**loaded.source, "img_size": original_size}
    tmp = staging.staging_dir(out)
    try:
        cases = _torch_stage(model, tmp, plan, reference_weights, source, say)
        if model is not model_or_checkpoint_path:  # ours (loaded or resized), not the caller's
            discard_weights(model)
        del model, loaded
        plan.release_memory()  # the PyTorch model is no longer needed: every later stage reads the ONNX files
        parity = _onnx_stage(tmp, plan, cases, cfg.num_patches, say)
        manifest = {
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "architecture": arch,
            "preprocessing": preprocessing,
            "norm_pix_loss": cfg.norm_pix_loss,
            "opset": opset,
            "graphs": [
                _graph_entry(
                    tmp,
                    part,
                    precision,
                    parity[(part, precision)],
                    plan.calibration.describe() if plan.calibration else None,
                )
                for part in plan.parts
                for precision in plan.precisions
            ],
            "exporter": _versions(),
            "source": source,
            "notes": notes,
        }
        if class_names is not None:
            manifest["class_names"], manifest["class_names_source"] = class_names
        write_manifest(tmp, manifest)
        Bundle.load(tmp, verify=False)  # the reader accepts what we wrote
        staging.publish_permissions(tmp)
        staging.move_into_place(tmp, out)
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
