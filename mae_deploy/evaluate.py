"""`mae-deploy eval`: top-1 / top-5 of a bundle's classifier, per precision, on labelled images.

The accuracy guard on real labelled data: every precision's graph (and the PyTorch model, when the bundle
has reference weights) classifies the same preprocessed images, so differences are the graphs' alone.
Images are decoded once per batch and fed to every model in turn; an image that cannot be read is listed
and left out of every model's score.

ImageFolder: ``ROOT/<class name>/**/<image>`` (torchvision's layout; the digits writer's ``val/``). Folder
names are matched to the classifier's class names, so a folder may hold a subset of the classes. Also
WebDataset shards whose samples carry a ``.cls`` member (the class index, WebDataset's convention) and
Parquet files with a label column (class indices, or names as strings): what ``data digits --format``
writes. Images are read and decoded as every command reads them (:mod:`mae_deploy.input_batches`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from mae_deploy.bundle import Bundle
from mae_deploy.classify import Classifier, top_k_indices
from mae_deploy.errors import BundleError, InputError, MissingDependency
from mae_deploy.input_batches import InputBatches
from mae_deploy.names import CLASSIFIER
from mae_deploy.preprocess import Preprocessor
from mae_deploy.sources import Source, list_source

REFERENCE = "torch"  # the label of the PyTorch reference row


@dataclass(frozen=True)
class LabelledImages:
    """Labelled images in a deterministic order, with targets as the classifier's class indices."""

    root: str  # what was given: the ImageFolder, shards or Parquet files
    classes: list[str]  # the classes found (ImageFolder: folder names, sorted)
    paths: list[str]
    targets: list[int]
    source: Source | None = None  # the planned source (None: ``paths`` are image files)

    def images(self) -> Source:
        """The images as a SOURCE (row i is ``paths[i]``), for the readers and decoders every command shares."""
        return self.source or Source(spec=self.root, kind="list", paths=tuple(self.paths))


UNLABELLED = (
    "eval needs each image's class: give an ImageFolder (ROOT/<class name>/<images>, e.g. digits/val), "
    "WebDataset shards with a .cls member per sample, or Parquet files with a label column "
    "(--label-column)"
)


def list_image_folder(root: str | os.PathLike, class_names: list[str]) -> LabelledImages:
    """``root/<class>/...`` -> paths and targets; InputError for a folder naming no known class."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"IMAGEFOLDER {root} is not a directory; expected ROOT/<class name>/<images>")
    index = {name: i for i, name in enumerate(class_names)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{root} has no class folders; expected ROOT/<class name>/<images> (e.g. digits/val)")
    unknown = [f.name for f in folders if f.name not in index]
    if unknown:
        hint = " (this looks like a dataset root: give its val/ folder)" if {"train", "val"} & set(unknown) else ""
        raise InputError(
            f"{root}: folders {unknown[:5]} name no class of the classifier "
            f"(it knows {class_names[:5]}{'...' if len(class_names) > 5 else ''}){hint}"
        )
    paths: list[str] = []
    targets: list[int] = []
    classes: list[str] = []
    for f in folders:
        try:
            found = list_source(f).paths
        except InputError:
            continue  # a class folder without images contributes nothing
        classes.append(f.name)
        paths += found
        targets += [index[f.name]] * len(found)
    if not paths:
        raise InputError(f"{root} holds no images in its class folders")
    return LabelledImages(str(root), classes, paths, targets)


def _class_index(value: object, class_names: list[str], kind: str) -> int | None:
    """A stored label -> class index: an integer (or a .cls text) is the index, a Parquet string the name."""
    if isinstance(value, str) and kind == "webdataset":
        value = int(value) if value.lstrip("-").isdigit() else value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value if 0 <= value < len(class_names) else None
    return class_names.index(value) if value in class_names else None


def list_labelled(
    spec: str | os.PathLike, class_names: list[str], *, label_column: str | None = None, image_column: str | None = None
) -> LabelledImages:
    """Any labelled SOURCE -> paths and targets: an ImageFolder (a local directory with class folders),
    WebDataset shards whose samples carry a ``.cls`` member (the class index), or Parquet files with a label
    column (``label_column``, default ``label``: class indices, or class names as strings)."""
    from mae_deploy.sources.labels import parquet_labels, webdataset_labels

    local = Path(os.fspath(spec)).expanduser()
    if local.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in local.iterdir()):
        if label_column is not None or image_column is not None:
            raise InputError(
                f"{spec} is an ImageFolder: its labels are its folder names; --label-column and "
                "--image-column apply to Parquet"
            )
        return list_image_folder(local, class_names)
    src = list_source(spec, image_column=image_column)
    values: Sequence[object]
    if src.kind == "webdataset":
        if label_column is not None:
            raise InputError(
                f"{spec} is WebDataset shards: labels come from each sample's .cls member; "
                "--label-column applies to Parquet"
            )
        values = webdataset_labels(src)
    elif src.kind == "parquet":
        values = parquet_labels(src, label_column or "label")
    else:
        raise InputError(f"{spec} holds images without labels; {UNLABELLED}")
    targets = [_class_index(v, class_names, src.kind) for v in values]
    bad = [i for i, t in enumerate(targets) if t is None]
    if bad:
        what = "no .cls member" if values[bad[0]] is None else f"the label {values[bad[0]]!r}"
        raise InputError(
            f"{len(bad)} of {len(src)} rows of {spec} have no class of the classifier; the first, "
            f"{src.paths[bad[0]]}, has {what} (the classifier knows {len(class_names)} classes: "
            f"indices 0..{len(class_names) - 1} or the names {class_names[:5]}"
            f"{'...' if len(class_names) > 5 else ''})"
        )
    known = cast("list[int]", targets)  # no None left: checked above
    classes = [class_names[i] for i in sorted(set(known))]
    return LabelledImages(str(spec), classes, list(src.paths), known, src)


@dataclass
class ModelScore:
    """One model's scores on the images every model saw."""

    name: str  # "ort fp32", "ort int8", "torch fp32"
    backend: str
    precision: str
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    agreement: float | None  # percent of images with the same top-1 as the first model
    confusion: list[list[int]]  # [true class][predicted class], over the classifier's classes


@dataclass
class EvalReport:
    bundle: str
    image_folder: str
    class_names: list[str]
    images: int  # images scored
    decoder: str = "pil"  # what decoded the images: pil, or torch on the runner's device
    failed: list[dict] = field(default_factory=list)  # {"path", "reason", "message"}
    scores: list[ModelScore] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def score(self, name: str) -> ModelScore:
        for s in self.scores:
            if s.name == name:
                return s
        raise KeyError(name)

    def as_dict(self) -> dict:
        return {
            "bundle": self.bundle,
            "image_folder": self.image_folder,
            "class_names": self.class_names,
            "images": self.images,
            "decoder": self.decoder,
            "failed": self.failed,
            "notes": self.notes,
            "results": [vars(s) for s in self.scores],
        }

    def table(self) -> str:
        """The scores as a Markdown table (top-1 change and agreement against the first row)."""
        first = self.scores[0] if self.scores else None
        lines = [
            f"{self.images} images, {len(self.class_names)} classes ({self.image_folder})",
            "",
            "| model | top-1 % | top-5 % | top-1 vs first | same top-1 as first |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for s in self.scores:
            delta = "" if s is first or first is None else f"{s.top1 - first.top1:+.2f}"
            agree = "" if s.agreement is None or s is first else f"{s.agreement:.2f} %"
            lines.append(f"| {s.name} | {s.top1:.2f} | {s.top5:.2f} | {delta} | {agree} |")
        if self.failed:
            lines.append(f"\n{len(self.failed)} image(s) could not be read and were left out")
        return "\n".join(lines)


def _score(
    name: str, backend: str, precision: str, logits: np.ndarray, targets: np.ndarray, first_top1: np.ndarray | None
) -> ModelScore:
    c = logits.shape[1]
    top = top_k_indices(logits, min(5, c))
    pred = top[:, 0]
    confusion = np.bincount(targets * c + pred, minlength=c * c).reshape(c, c)
    agreement = None if first_top1 is None else float((pred == first_top1).mean() * 100.0)
    return ModelScore(
        name,
        backend,
        precision,
        top1=float((pred == targets).mean() * 100.0),
        top5=float((top == targets[:, None]).any(axis=1).mean() * 100.0),
        agreement=agreement,
        confusion=confusion.tolist(),
    )


def _models(
    bundle: Bundle,
    precisions: list[str],
    backend: str,
    device: str,
    reference: bool | None,
    batch_size: int,
    notes: list[str],
    runner_opts: dict,
) -> list[tuple[str, str, str, Classifier]]:
    have = bundle.precisions(CLASSIFIER)
    # The torch backend runs the reference weights with autocast: it needs no classifier graph of a precision.
    missing = [p for p in precisions if p not in have] if backend != REFERENCE else []
    if missing:
        raise BundleError(
            f"bundle {bundle.path} has no classifier graph at {', '.join(missing)}; it has "
            f"{', '.join(have)} (export with --precision {','.join(precisions)})"
        )
    models = [
        (f"{backend} {p}", backend, p, Classifier(bundle, backend, device, p, batch_size, **runner_opts))
        for p in precisions
    ]
    if reference is False or backend == REFERENCE:
        return models
    try:
        bundle.reference_checkpoint()
        ref = Classifier(bundle, REFERENCE, "cpu", "fp32", batch_size)
        models.append((f"{REFERENCE} fp32", REFERENCE, "fp32", ref))
    except (BundleError, MissingDependency) as e:
        if reference:
            raise
        notes.append(f"no PyTorch reference row: {e}")
    return models


def evaluate(
    bundle: Bundle | str | os.PathLike,
    image_folder: str | os.PathLike,
    precisions: list[str] | None = None,
    backend: str = "ort",
    device: str = "cpu",
    reference: bool | None = None,
    batch_size: int = 64,
    progress: bool = False,
    runner_opts: dict | None = None,
    decoder: str | None = None,
    label_column: str | None = None,
    image_column: str | None = None,
) -> EvalReport:
    """Score the bundle's classifier at each precision (default: every one it has) on ``image_folder``: an
    ImageFolder, WebDataset shards with ``.cls`` members or Parquet files with a label column
    (:func:`list_labelled`).

    ``reference``: None adds the PyTorch model when the bundle has reference weights and torch is installed;
    True requires it; False leaves it out. ``decoder``: ``pil`` or ``torch`` (on ``device``; see
    :mod:`mae_deploy.input_batches`), default torch on a GPU device, pil on the CPU. Images that cannot be
    read are listed in ``failed`` and left out of every score.
    """
    from mae_deploy.decode_torch import default_decoder

    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    bundle.classifier_graph()  # raises, saying how to get one, when the bundle has no classifier
    names = bundle.class_names or []
    data = list_labelled(image_folder, names, label_column=label_column, image_column=image_column)
    report = EvalReport(str(bundle.path), data.root, names, images=0, decoder=decoder or default_decoder(device))
    precisions = precisions or bundle.precisions(CLASSIFIER)
    models = _models(
        bundle, list(dict.fromkeys(precisions)), backend, device, reference, batch_size, report.notes, runner_opts or {}
    )
    batches = InputBatches(data.images(), Preprocessor.from_bundle(bundle), report.decoder, device)
    logits: dict[str, list[np.ndarray]] = {m[0]: [] for m in models}
    kept: list[int] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(data.paths), unit="img", desc="eval")
    try:
        for batch in batches.batches(batch_size):
            report.failed += [
                {"path": data.paths[i], "reason": why, "message": text} for i, why, text in batch.failures
            ]
            if batch.pixels is not None:
                for name, _, _, clf in models:
                    logits[name].append(clf.logits_pixels(batch.pixels))
                kept += batch.rows
            if bar is not None:
                bar.update(len(batch.rows) + len(batch.failures))
    finally:
        if bar is not None:
            bar.close()
        for *_, clf in models:
            clf.close()
    if not kept:
        raise InputError(f"none of the {len(data.paths)} images in {data.root} could be read")
    targets = np.asarray([data.targets[i] for i in kept], dtype=np.int64)
    report.images = len(kept)
    first = None
    for name, be, prec, _ in models:
        s = _score(name, be, prec, np.concatenate(logits[name]), targets, first)
        if first is None:
            first = top_k_indices(np.concatenate(logits[name]), 1)[:, 0]
        report.scores.append(s)
    return report


def plot_confusion(report: EvalReport, path: str | os.PathLike) -> Path:
    """One confusion-matrix panel per model (rows: true class, columns: predicted), written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependency("matplotlib", "--plot", "pip install 'mae-deploy[plot]'") from e
    from mae_deploy.fileio import atomic_write

    n = len(report.scores)
    c = len(report.class_names)
    side = min(12.0, 2.0 + 0.35 * c)
    fig, axes = plt.subplots(1, n, figsize=(side * n, side), squeeze=False)
    for ax, s in zip(axes[0], report.scores, strict=True):
        m = np.asarray(s.confusion)
        ax.imshow(m, cmap="Blues")
        ax.set_title(f"{s.name}: top-1 {s.top1:.2f} %")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if c <= 30:
            ax.set_xticks(range(c), report.class_names, rotation=90)
            ax.set_yticks(range(c), report.class_names)
            for (i, j), v in np.ndenumerate(m):
                if v:
                    ax.text(
                        j,
                        i,
                        str(v),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if v > m.max() / 2 else "black",
                    )
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    out = atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=100))
    plt.close(fig)
    return out
