"""Read and write bundles: a directory with ONNX graphs and the ``mae.json`` that describes them.

The format is documented in docs/bundle-format.md. This module is its one definition: :class:`Bundle`
reads and checks it (format name and version, every listed file present, sha256 of every file), and
:func:`write_manifest` is what ``export/`` calls to write it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae_deploy.config_check import check_architecture, check_preprocessing
from mae_deploy.errors import BundleError
from mae_deploy.fileio import atomic_write_json

FORMAT_NAME = "mae-deploy-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "mae.json"
PARTS = ("encoder", "decoder", "classifier")

# The official evaluation transform: ImageNet statistics, shorter side to size/0.875, centre crop.
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "resize": "shorter_side_crop",
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights never sit in memory at once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype and shape (ints, or names of symbolic dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(d.get("shape", ())))


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file of the bundle (an encoder or decoder at some precision)."""

    part: str
    precision: str
    file: str
    external_data: tuple[str, ...] = ()
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    parity: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> GraphSpec:
        return cls(
            part=str(d["part"]),
            precision=str(d.get("precision", "fp32")),
            file=str(d["file"]),
            external_data=tuple(d.get("external_data") or ()),
            inputs=tuple(TensorSpec.from_dict(t) for t in d.get("inputs", ())),
            outputs=tuple(TensorSpec.from_dict(t) for t in d.get("outputs", ())),
            parity=dict(d.get("parity") or {}),
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def _safe_relpath(rel: str, what: str) -> str:
    """Reject manifest paths that would leave the bundle directory (a moved bundle must be self-contained)."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise BundleError(f"mae.json lists {what} '{rel}', which is not a path inside the bundle directory")
    return p.as_posix()


def _validate_manifest(m: Any, where: str) -> None:
    """Structural checks shared by reading and writing; messages name the field and what to do."""
    if not isinstance(m, dict):
        raise BundleError(f"{where} does not hold a JSON object")
    if m.get("format") != FORMAT_NAME:
        raise BundleError(
            f"{where} is not a mae-deploy bundle manifest (format is {m.get('format')!r}, expected "
            f"{FORMAT_NAME!r}); export one with `mae-deploy export CHECKPOINT --out DIR`"
        )
    version = m.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{where} has no integer format_version")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{where} has format_version {version}, newer than this mae-deploy reads ({FORMAT_VERSION}); "
            "upgrade mae-deploy"
        )
    if version < 1:
        raise BundleError(f"{where} has format_version {version}, which never existed; re-export the bundle")
    for key in ("architecture", "preprocessing", "graphs"):
        if key not in m:
            raise BundleError(f"{where} lacks '{key}'; re-export the bundle")
    arch = check_architecture(m["architecture"], where, BundleError)
    check_preprocessing(m["preprocessing"], arch["in_chans"], arch["img_size"], where, BundleError)
    if not isinstance(m.get("norm_pix_loss", False), bool):
        raise BundleError(f"{where}: norm_pix_loss must be true or false, got {m['norm_pix_loss']!r}")
    if not isinstance(m["graphs"], list) or not m["graphs"]:
        raise BundleError(f"{where} lists no graphs; re-export the bundle")
    seen: set[tuple[str, str]] = set()
    for i, g in enumerate(m["graphs"]):
        if not isinstance(g, dict):
            raise BundleError(f"{where}: graphs[{i}] must be a JSON object, got {g!r}")
        for key in ("part", "file"):
            if key not in g:
                raise BundleError(f"{where}: graphs[{i}] lacks '{key}'")
        if g["part"] not in PARTS:
            raise BundleError(f"{where}: graphs[{i}] has part {g['part']!r}; expected one of {list(PARTS)}")
        part_precision = (g["part"], g.get("precision", "fp32"))
        if part_precision in seen:
            raise BundleError(f"{where} lists two {part_precision[0]} graphs at precision {part_precision[1]}")
        seen.add(part_precision)
        _safe_relpath(g["file"], "graph file")
        for ext in g.get("external_data") or ():
            _safe_relpath(ext, "external data file")
    if not any(part == "encoder" for part, _ in seen):
        raise BundleError(f"{where} has no encoder graph")


class Bundle:
    """A loaded bundle: the manifest plus its directory. Use :meth:`load`."""

    def __init__(self, path: Path, manifest: dict) -> None:
        _validate_manifest(manifest, str(path / MANIFEST_NAME))
        self.path = path
        self.manifest = manifest
        self.graphs: list[GraphSpec] = [GraphSpec.from_dict(g) for g in manifest["graphs"]]

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        """Read ``path/mae.json`` (``path`` may also be the mae.json itself) and check the bundle.

        With ``verify`` (the default) every file listed in ``files`` is hashed and compared; pass
        ``verify=False`` to skip hashing (files are still checked to exist), e.g. in a hot restart loop.
        """
        p = Path(path)
        if p.name == MANIFEST_NAME and p.is_file():
            p = p.parent
        if not p.exists():
            raise BundleError(f"bundle {p} does not exist; export one with `mae-deploy export CHECKPOINT --out DIR`")
        mpath = p / MANIFEST_NAME
        if not mpath.is_file():
            raise BundleError(f"{p} is not a bundle: it has no {MANIFEST_NAME}")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"cannot read {mpath}: {e}") from e
        bundle = cls(p, manifest)
        bundle.check_files(verify=verify)
        return bundle

    def check_files(self, verify: bool = True) -> None:
        """Every graph file and listed file exists; with ``verify`` each sha256 matches mae.json."""
        files = self.manifest.get("files")
        if not isinstance(files, dict):
            raise BundleError(f"{self.path / MANIFEST_NAME} lacks the 'files' table of sha256 hashes; re-export")
        for g in self.graphs:
            for rel in (g.file, *g.external_data):
                if rel not in files:
                    raise BundleError(f"{self.path}: graph file {rel} is not listed in mae.json 'files'; re-export")
        for rel, expected in files.items():
            f = self.path / _safe_relpath(rel, "file")
            if not f.is_file():
                raise BundleError(f"bundle {self.path} is missing {rel}; copy the whole bundle directory")
            if verify:
                actual = sha256_file(f)
                if actual != expected:
                    raise BundleError(
                        f"bundle file {rel} is corrupt or was modified: sha256 {actual[:16]}... does not match "
                        f"mae.json ({str(expected)[:16]}...); copy it again or re-export the bundle"
                    )

    # -- architecture ---------------------------------------------------------------------------
    @property
    def architecture(self) -> dict:
        return dict(self.manifest["architecture"])

    @property
    def name(self) -> str:
        return str(self.manifest["architecture"].get("name", "custom"))

    @property
    def image_size(self) -> int:
        return int(self.manifest["architecture"]["img_size"])

    @property
    def patch_size(self) -> int:
        return int(self.manifest["architecture"]["patch_size"])

    @property
    def in_chans(self) -> int:
        return int(self.manifest["architecture"]["in_chans"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["architecture"]["embed_dim"])

    @property
    def grid_size(self) -> int:
        return int(self.manifest.get("grid_size") or self.image_size // self.patch_size)

    @property
    def num_patches(self) -> int:
        return int(self.manifest.get("num_patches") or self.grid_size**2)

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    @property
    def norm_pix_loss(self) -> bool:
        """Whether the decoder predicts per-patch normalised pixels (see patches.denormalize_norm_pix)."""
        return bool(self.manifest.get("norm_pix_loss", self.manifest["architecture"].get("norm_pix_loss", False)))

    @property
    def preprocessing(self) -> dict:
        """The preprocessing block with defaults filled in (image_size always present)."""
        pre = {**DEFAULT_PREPROCESSING, **self.manifest["preprocessing"]}
        pre.setdefault("image_size", self.image_size)
        return pre

    @property
    def has_decoder(self) -> bool:
        return any(g.part == "decoder" for g in self.graphs)

    # -- graphs ---------------------------------------------------------------------------------
    def precisions(self, part: str) -> list[str]:
        return [g.precision for g in self.graphs if g.part == part]

    def graph(self, part: str, precision: str = "fp32") -> GraphSpec:
        """The graph for ``part`` at ``precision``; the error lists what the bundle has."""
        for g in self.graphs:
            if g.part == part and g.precision == precision:
                return g
        have = ", ".join(f"{g.part} {g.precision}" for g in self.graphs)
        if part == "decoder" and not self.has_decoder:
            raise BundleError(
                f"bundle {self.path} has no decoder (it was exported from an encoder-only checkpoint); "
                "reconstruction needs one: export a *_full or mae_visualize_* checkpoint"
            )
        raise BundleError(f"bundle {self.path} has no {part} graph at precision {precision}; it has: {have}")

    def graph_path(self, part: str, precision: str = "fp32") -> Path:
        return self.path / self.graph(part, precision).file

    # -- classifier -----------------------------------------------------------------------------
    @property
    def has_classifier(self) -> bool:
        return any(g.part == "classifier" for g in self.graphs)

    @property
    def class_names(self) -> list[str] | None:
        """Class names of the classifier graph, index order (None when the bundle has no classifier)."""
        names = self.manifest.get("class_names")
        return [str(n) for n in names] if self.has_classifier and names else None

    @property
    def class_names_source(self) -> str | None:
        """Where the names came from: "labels-file", "checkpoint" or "generated" (class_0 ...)."""
        return self.manifest.get("class_names_source") if self.has_classifier else None

    def classifier_graph(self, precision: str = "fp32") -> GraphSpec:
        """classifier.onnx (or a variant): pixel_values [batch,C,H,W] -> logits [batch,num_classes]."""
        if not self.has_classifier:
            raise BundleError(
                f"bundle {self.path} has no classifier graph; export a fine-tuned or linear-probe checkpoint "
                "(mae-deploy finetune / linprobe, then mae-deploy export)"
            )
        return self.graph("classifier", precision)

    def int8_graph(self, part: str, qdq: bool = False) -> GraphSpec:
        """The int8 graph of ``part`` a backend should run. ``qdq=True`` (TensorRT, ORT's TensorRT provider,
        OpenVINO: explicit quantisation) needs the static Q/DQ graph "int8-qdq"; ``qdq=False`` (ONNX Runtime
        CPU) prefers the dynamic "int8" graph and falls back to the Q/DQ one."""
        have = self.precisions(part)
        if qdq:
            if "int8-qdq" in have:
                return self.graph(part, "int8-qdq")
            raise BundleError(
                f"bundle {self.path} has no Q/DQ int8 {part} graph, which this backend needs for int8: export with "
                "--precision int8-qdq --calibration DIR"
            )
        return self.graph(part, "int8" if "int8" in have or "int8-qdq" not in have else "int8-qdq")

    # -- reference weights ----------------------------------------------------------------------
    def reference_checkpoint(self) -> Path:
        """Native checkpoint for the torch backend: bundle/reference/, else the export's source checkpoint."""
        ref = self.path / "reference"
        if (ref / "config.json").is_file():
            return ref
        src = (self.manifest.get("source") or {}).get("checkpoint")
        if src and Path(src).exists():
            return Path(src)
        where = f"its source checkpoint {src} no longer exists" if src else "it records no source checkpoint"
        raise BundleError(
            f"bundle {self.path} holds no reference weights (no reference/ directory) and {where}; re-export "
            "with reference weights (`mae-deploy export ... --reference`) or pass the checkpoint explicitly"
        )

    def __repr__(self) -> str:
        graphs = ", ".join(f"{g.part}:{g.precision}" for g in self.graphs)
        return f"Bundle({str(self.path)!r}, {self.name}, L={self.num_patches}, graphs=[{graphs}])"


def _bundle_files(bundle_dir: Path) -> list[str]:
    """Every file under the bundle except mae.json and hidden entries (temporary files, caches)."""
    out = []
    for root, dirs, names in os.walk(bundle_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if n.startswith("."):
                continue
            rel = (Path(root) / n).relative_to(bundle_dir).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return out


def write_manifest(bundle_dir: str | os.PathLike, manifest: dict) -> Path:
    """Fill ``files`` with the sha256 of every file in ``bundle_dir`` and write mae.json atomically.

    ``format`` and ``format_version`` are filled in when absent; ``num_patches`` and ``grid_size`` too.
    The manifest is checked the same way :meth:`Bundle.load` checks it, so a bad one fails at export.
    Hidden files (names starting with '.') are not listed: they are temporary files or caches.
    Returns the path of mae.json.
    """
    d = Path(bundle_dir)
    if not d.is_dir():
        raise BundleError(f"bundle directory {d} does not exist")
    m = json.loads(json.dumps(manifest))  # deep copy, and fails early on values JSON cannot hold
    m.setdefault("format", FORMAT_NAME)
    m.setdefault("format_version", FORMAT_VERSION)
    arch = m.get("architecture") or {}
    if "img_size" in arch and "patch_size" in arch:
        g = arch["img_size"] // arch["patch_size"]
        m.setdefault("grid_size", g)
        m.setdefault("num_patches", g * g)
        if m["num_patches"] != g * g or math.isqrt(m["num_patches"]) != m["grid_size"]:
            raise BundleError(f"num_patches {m['num_patches']} does not match a {g}x{g} grid")
    m["files"] = {rel: sha256_file(d / rel) for rel in _bundle_files(d)}
    bundle = Bundle(d, m)
    bundle.check_files(verify=False)
    atomic_write_json(d / MANIFEST_NAME, m)  # 0644: a bundle is meant to be shared and deployed
    return d / MANIFEST_NAME
