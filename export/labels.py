"""Class names of a classifier bundle: from ``--labels FILE``, else the checkpoint, else ``class_0 ...``.

``finetune`` and ``linprobe`` record the ImageFolder class names in the native checkpoint's config.json
(``head.class_names``); official ``.pth`` files carry none. mae.json stores the names and where they came
from (``class_names_source``: ``labels-file``, ``checkpoint`` or ``generated``), so a consumer that needs
real names (a Triton repository, a served API) can tell generated ones apart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mae_deploy.errors import InputError

LABELS_FILE, CHECKPOINT, GENERATED = "labels-file", "checkpoint", "generated"


def read_labels(path: str | os.PathLike) -> list[str]:
    """One class name per line, in class-index order; trailing blank lines ignored, inner ones refused."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--labels {p} is not a file; give a text file with one class name per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read --labels {p}: {e}") from e
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise InputError(f"--labels {p} is empty; give one class name per line")
    for i, name in enumerate(names):
        if not name:
            raise InputError(f"--labels {p} line {i + 1} is blank: every class index needs a name")
    return names


def _check(names: Sequence[str], num_classes: int, where: str) -> list[str]:
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise InputError(
            f"{where} has {len(names)} class names but the classifier head has {num_classes} classes; "
            "give one name per class, in class-index order"
        )
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise InputError(f"{where} names class {seen[n]} and class {i} both {n!r}; class names must be unique")
        seen[n] = i
    return names


def resolve_class_names(
    num_classes: int, from_checkpoint: Sequence[str] | None, labels: str | os.PathLike | Sequence[str] | None
) -> tuple[list[str], str]:
    """(names, source): ``labels`` (a file or a list) overrides the checkpoint's; neither -> class_0 ..."""
    if labels is not None:
        if isinstance(labels, (str, os.PathLike)):
            return _check(read_labels(labels), num_classes, f"--labels {labels}"), LABELS_FILE
        return _check(labels, num_classes, "the labels given"), LABELS_FILE
    if from_checkpoint:
        return _check(from_checkpoint, num_classes, "the checkpoint's config.json"), CHECKPOINT
    return [f"class_{i}" for i in range(num_classes)], GENERATED
