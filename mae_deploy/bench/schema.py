"""The results format (docs/bench-schema.md): its keys, its versions, and the check that a file has them.

Version 2 adds the MatMul peaks (top-level ``peaks``) and each row's ``compute`` (FLOPs, achieved
GFLOP/s, share of the peak). Version 3 adds each row's ``int8_isa`` and, per peak, every GEMM shape probed
(``shapes``), the one that set the peak (``shape``) and the probe's time budget. Version 4 adds the top-level
``inputs`` (seeded noise or ``--images``) and the agreement's ``pooled_cosine``. Files of earlier versions still
load (for ``--compare``): they simply lack those.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mae_deploy.bench.peak import PROBE_KEYS
from mae_deploy.bench.stats import STATS
from mae_deploy.errors import InputError

SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)

# Keys every results file and every row carries (docs/bench-schema.md documents each; tests check both agree).
TOP_KEYS = (
    "schema_version",
    "tool",
    "mae_deploy_version",
    "created",
    "bundle",
    "config",
    "inputs",
    "machine",
    "reference",
    "runners",
    "rows",
    "load_average",
    "peaks",
)
ROW_KEYS = (
    "backend",
    "precision",
    "device",
    "part",
    "batch",
    "visible",
    "status",
    "reason",
    "warmup",
    "iterations",
    "latency_ms",
    "first_call_ms",
    "throughput_ips",
    "timing",
    "gpu_compute_ms",
    "peak_rss_mb",
    "rss_scope",
    "peak_device_mem_mb",
    "device_mem_note",
    "build_s",
    "threads",
    "agreement",
    "compute",
    "int8_isa",
)
RUNNER_KEYS = ("backend", "precision", "device", "status", "reason", "build_s", "providers", "threads", "details")
AGREEMENT_KEYS = ("reference", "max_abs_diff", "mean_abs_diff", "cosine", "pooled_cosine")
INPUT_KEYS = ("pixels", "source", "images", "skipped", "seed")
COMPUTE_KEYS = ("flops", "unit", "achieved", "peak", "fraction_of_peak", "peak_probe", "note")
# The version that added a key: files written before it lack the key and still load.
_ADDED_IN = {
    "peaks": 2,
    "compute": 2,
    "int8_isa": 3,
    "shape": 3,
    "shapes": 3,
    "budget_s": 3,
    "inputs": 4,
    "pooled_cosine": 4,
}


def jsonable(x: Any) -> Any:
    """Tuples to lists, paths to strings, anything else JSON cannot hold to its repr."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, np.generic):
        return x.item()
    return repr(x)


def _lacks(obj: dict, keys: tuple[str, ...], version: int) -> list[str]:
    return [k for k in keys if k not in obj and version >= _ADDED_IN.get(k, 1)]


def validate_results(d: Any, where: str = "results") -> dict:
    """Check the keys of docs/bench-schema.md; InputError names what is missing or wrong."""
    if not isinstance(d, dict):
        raise InputError(f"{where} is not a JSON object")
    version = d.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise InputError(
            f"{where} has schema_version {version!r}; this mae-deploy reads "
            f"{', '.join(map(str, READABLE_VERSIONS))} (is it a `mae-deploy bench --out` file?)"
        )
    missing = _lacks(d, TOP_KEYS, version)
    if missing:
        raise InputError(f"{where} lacks {missing}")
    inputs = d.get("inputs")
    if inputs is not None and (not isinstance(inputs, dict) or _lacks(inputs, INPUT_KEYS, version)):
        raise InputError(f"{where}: inputs lacks some of {list(INPUT_KEYS)}")
    if not isinstance(d["rows"], list):
        raise InputError(f"{where}: 'rows' is not a list")
    for i, row in enumerate(d["rows"]):
        if not isinstance(row, dict):
            raise InputError(f"{where}: rows[{i}] is not an object")
        missing = _lacks(row, ROW_KEYS, version)
        if missing:
            raise InputError(f"{where}: rows[{i}] lacks {missing}")
        if row["status"] not in ("ok", "skipped", "failed"):
            raise InputError(f"{where}: rows[{i}] has status {row['status']!r}")
        if row["status"] == "ok":
            lat = row["latency_ms"]
            if not isinstance(lat, dict) or any(not isinstance(lat.get(s), (int, float)) for s in STATS):
                raise InputError(f"{where}: rows[{i}] latency_ms lacks some of {list(STATS)}")
            comp = row.get("compute")
            if version >= 2 and comp is not None and (not isinstance(comp, dict) or _lacks(comp, COMPUTE_KEYS, 2)):
                raise InputError(f"{where}: rows[{i}] compute lacks some of {list(COMPUTE_KEYS)}")
            agr = row.get("agreement")
            if agr is not None and (not isinstance(agr, dict) or _lacks(agr, AGREEMENT_KEYS, version)):
                raise InputError(f"{where}: rows[{i}] agreement lacks some of {list(AGREEMENT_KEYS)}")
    for i, r in enumerate(d["runners"]):
        missing = _lacks(r, RUNNER_KEYS, version)
        if missing:
            raise InputError(f"{where}: runners[{i}] lacks {missing}")
    for i, p in enumerate(d.get("peaks") or []):
        if not isinstance(p, dict) or _lacks(p, PROBE_KEYS, version):
            raise InputError(f"{where}: peaks[{i}] lacks some of {list(PROBE_KEYS)}")
    return d


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a results JSON written by ``write_json``."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise InputError(f"results file {p} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read results file {p}: {e}") from e
    return validate_results(d, str(p))
