"""pyproject's lower bounds for the export stack are what `make compat` runs (constraints-compat.txt): a bound
lowered below the tested version, or a compat pin that pyproject excludes, fails here."""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
EXACT_BOUNDS = ("onnx", "onnxscript", "onnx-ir")  # torch's is older: see pyproject.toml's comment


def _compat_pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints-compat.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints-compat.txt pins exact versions: {line}"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _declared() -> dict[str, Requirement]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = [Requirement(r) for deps in extras.values() for r in deps]
    return {canonicalize_name(r.name): r for r in reqs if canonicalize_name(r.name) != "mae-deploy"}


def test_export_stack_lower_bounds_are_the_compat_versions():
    pins, declared = _compat_pins(), _declared()
    for name in EXACT_BOUNDS:
        lower = [Version(s.version) for s in declared[name].specifier if s.operator == ">="]
        assert lower == [pins[name]], f"{name}: pyproject says {declared[name]}, make compat runs {pins[name]}"


def test_every_compat_pin_is_allowed_by_pyproject():
    pins, declared = _compat_pins(), _declared()
    assert set(EXACT_BOUNDS) | {"torch", "torchvision", "onnxruntime"} <= set(pins)
    for name, version in pins.items():
        assert declared[name].specifier.contains(version), f"{name} {version} is outside {declared[name]}"
