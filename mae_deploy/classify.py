"""Classification: images -> top-k (label, probability) with a bundle's classifier graph, through any runner.

The classifier graph (``classifier.onnx``: ``pixel_values [N,C,H,W] -> logits [N,num_classes]``, every patch
visible) comes from ``export`` of a fine-tuned or linear-probe checkpoint; its class names are in mae.json.
Runners run it with ``runner.classify(pixel_values) -> logits``: ONNX Runtime runs the graph, the torch
backend the reference model (the bundle's ``reference/`` weights).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Protocol, cast

import numpy as np
from PIL import Image

from mae_deploy.bundle import Bundle
from mae_deploy.errors import BundleError, InputError
from mae_deploy.features import _chunks
from mae_deploy.masking import check_pixel_values
from mae_deploy.pipeline import Pipeline
from mae_deploy.preprocess import ImageLike, Preprocessor
from mae_deploy.runners import Runner
from mae_deploy.sources import Source

Prediction = list[tuple[str, float]]  # (label, probability), most probable first


class ClassifyingRunner(Protocol):
    """What a Classifier needs of its runner besides :class:`Runner` (every BaseRunner has it; some refuse)."""

    def classify(self, pixel_values: np.ndarray) -> np.ndarray: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits), returned as float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, C) scores -> (N, k) class indices, highest first; ties broken by the lower index (stable)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _as_list(images: ImageLike | Iterable[ImageLike]) -> Iterable[ImageLike]:
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        return [images] if images.ndim in (2, 3) else images
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return images


class Classifier(Pipeline):
    """Top-k labels for images, uint8 arrays or paths, with the bundle's classifier graph.

    ``runner`` lets pipelines share one; otherwise one is created from ``backend``/``device``/``precision``
    and ``runner_opts`` (as :class:`~mae_deploy.features.FeatureExtractor` does). ``class_names`` replaces the
    bundle's names (one per class). Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        backend: str = "ort",
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 32,
        runner: Runner | None = None,
        preprocessor: Preprocessor | None = None,
        class_names: list[str] | None = None,
        **runner_opts,
    ) -> None:
        self._class_names_given = class_names
        super().__init__(bundle, backend, device, precision, batch_size, runner, preprocessor, runner_opts)

    def _check_bundle(self) -> None:
        graph = self.bundle.classifier_graph("fp32")  # raises, saying how to get one, when there is none
        n = graph.outputs[0].shape[-1] if graph.outputs and graph.outputs[0].shape else None
        given = self._class_names_given
        names = list(given) if given is not None else self.bundle.class_names
        if not names:
            raise BundleError(f"bundle {self.bundle.path} records no class names; pass class_names=[...]")
        if isinstance(n, int) and len(names) != n:
            raise InputError(f"{len(names)} class names given for a classifier with {n} classes")
        self.class_names = [str(c) for c in names]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def logits_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """Already preprocessed float32 (N, C, H, W) -> logits float32 (N, num_classes), one runner call."""
        self._check_open()
        b = self.bundle
        x = check_pixel_values(pixel_values, b.in_chans, b.image_size)
        logits = np.asarray(cast(ClassifyingRunner, self.runner).classify(x), dtype=np.float32)
        if logits.shape != (x.shape[0], self.num_classes):
            raise BundleError(
                f"the classifier returned logits of shape {logits.shape}; expected "
                f"({x.shape[0]}, {self.num_classes}): is the bundle's classifier.onnx damaged?"
            )
        return logits

    def logits(self, images: ImageLike | Iterable[ImageLike]) -> np.ndarray:
        """One image or an iterable of them -> logits float32 (N, num_classes), ``batch_size`` at a time."""
        out = [self.logits_pixels(self.preprocessor(chunk)) for chunk in _chunks(_as_list(images), self.batch_size)]
        if not out:
            raise InputError("no images given")
        return np.concatenate(out)

    def predictions(self, logits: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Logits (N, C) -> per row the ``top_k`` (label, probability) pairs, most probable first."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        probs = softmax(logits)
        idx = top_k_indices(probs, min(int(top_k), self.num_classes))
        return [[(self.class_names[j], float(p[j])) for j in row] for p, row in zip(probs, idx, strict=True)]

    def classify(self, images: ImageLike | Iterable[ImageLike], top_k: int = 5) -> list[Prediction]:
        """Per image, the ``top_k`` most probable (label, probability) pairs (k is capped at num_classes)."""
        return self.predictions(self.logits(images), top_k)

    __call__ = classify


def _as_sources(inputs: Source | Sequence[Source] | Sequence[str | os.PathLike]) -> list[Source]:
    if isinstance(inputs, Source):
        return [inputs]
    items = list(inputs)
    sources = [i for i in items if isinstance(i, Source)]
    if len(sources) == len(items):
        return sources
    if sources:
        raise InputError("give classify_files Sources or image paths, not a mix of both")
    paths = [i for i in items if not isinstance(i, Source)]
    return [Source(spec="paths", kind="list", paths=tuple(os.fspath(p) for p in paths))]


def classify_files(
    classifier: Classifier,
    inputs: Source | Sequence[Source] | Sequence[str | os.PathLike],
    top_k: int = 5,
    decoder: str | None = None,
) -> list[dict]:
    """Per row of ``inputs``, in order: ``{"path", "predictions": [{"label", "probability"}, ...]}``, or
    ``{"path", "error", "reason"}`` for an image that cannot be read (it does not stop the others).

    ``inputs``: Sources (:func:`~mae_deploy.sources.list_source`: folders, shards, Parquet, URLs) or image file
    paths. ``decoder``: ``pil`` or ``torch`` (see :mod:`mae_deploy.input_batches`); default torch when the
    runner is on a GPU, pil on the CPU.
    """
    from mae_deploy.decode_torch import default_decoder
    from mae_deploy.input_batches import InputBatches

    device = classifier.runner.info.device
    decoder = decoder or default_decoder(device)
    records: list[dict] = []
    for src in _as_sources(inputs):
        batches = InputBatches(src, classifier.preprocessor, decoder, device)
        for batch in batches.batches(classifier.batch_size):
            found: dict[int, dict] = {}
            for row, reason, message in batch.failures:
                found[row] = {"path": src.paths[row], "error": message, "reason": reason}
            if batch.pixels is not None:
                preds = classifier.predictions(classifier.logits_pixels(batch.pixels), top_k)
                for row, pred in zip(batch.rows, preds, strict=True):
                    found[row] = {
                        "path": src.paths[row],
                        "predictions": [{"label": lab, "probability": p} for lab, p in pred],
                    }
            records += [found[row] for row in sorted(found)]
    return records


def write_predictions(records: list[dict], out: str | os.PathLike) -> None:
    """``.jsonl`` (one record per line) or ``.csv`` (path, rank, label, probability, error), atomically."""
    import csv
    import io
    import json

    from mae_deploy.fileio import atomic_write_text

    suffix = os.path.splitext(str(out))[1].lower()
    if suffix == ".jsonl":
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return
    if suffix != ".csv":
        raise InputError(f"--out {out}: give a .jsonl or .csv file name")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "rank", "label", "probability", "error"])
    for r in records:
        if "error" in r:
            w.writerow([r["path"], "", "", "", r["error"]])
        for rank, p in enumerate(r.get("predictions", []), start=1):
            w.writerow([r["path"], rank, p["label"], f"{p['probability']:.6g}", ""])
    atomic_write_text(out, buf.getvalue())
