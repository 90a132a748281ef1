"""The seam between an extraction job and its engines: what an engine yields, and the interface it implements.

:mod:`.job` plans, locks, resumes and commits; an engine (:mod:`.local`: decode processes + one runner here;
:mod:`.ray_engine`: Ray Data tasks + an actor pool) turns the job's tasks into ``(task, BatchResult)`` pairs in
task order. Both import this module; neither imports the job, and the job imports an engine only to build it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mae_deploy.extract.workers import Task


@dataclass
class BatchResult:
    """One batch's outcome: features of the good rows (pooled, in the job's dtype) and the failures."""

    rows: list[int]
    features: np.ndarray | None
    failures: list[tuple[int, str, str]]  # (row, reason, message)


class Engine(Protocol):
    """What the job drives: batches in task order, what ran (for the manifest), timings, close."""

    name: str  # "local" | "ray"
    timings: dict[str, float]  # seconds per stage, added to the manifest's timings

    def batches(self) -> Iterator[tuple[Task, BatchResult]]: ...

    def run_info(self) -> dict: ...

    def close(self) -> None: ...


def runner_info(runner) -> dict:
    """A runner's RunnerInfo as JSON-safe data for the manifest (informational: never fails the job)."""
    try:
        info = runner.info
        return {
            "backend": info.backend,
            "device": info.device,
            "precision": info.precision,
            "providers": list(info.providers),
            "details": json.loads(json.dumps(info.details, default=str)),
        }
    except Exception as e:  # informational only
        return {"error": repr(e)}
