"""A disk cache of exported ONNX graphs, for the test session only.

The dynamo exporter spends ~5 s per graph even on the 32-px test model, and the suite exports the same
models the same way many times (every export test starts from ``create_model("mae_vit_test")`` at seed 0).
:meth:`GraphCache.export_graph` stands in for ``export.bundle_writer.export_graph``: the first call for a key
runs the real exporter and keeps its files; later calls copy them and check them again with the product's
own ``check_graph_file``. The key (:func:`graph_key`) is everything the exported file depends on: the
config, every submodule's class and plain attributes (``global_pool``, ``training``), every tensor of the
state, the part, the file name (external data is named after it), the opset, the external-data flag and
the torch/onnx versions. Example-input *values* are not in it: the exporter traces shapes, and the graph
has no data-dependent branches.

The cache is one folder per run (made by the run's first pytest process, named in ``MAE_TEST_GRAPH_CACHE``,
removed when it ends), shared by its xdist workers and nested pytest runs (an flock per key: one process
exports, the others wait and copy); :func:`build_once` also shares the test bundles of
tests/runtime_fixtures.py. Exports in a subprocess (the CLI tests) are not cached: they run the real exporter
every time. ``MAE_TEST_REAL_EXPORTS=1`` turns the cache off.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

_PLAIN = (bool, int, float, str, tuple, type(None))


def _module_attributes(model) -> list:
    """Every submodule's class and plain public attributes (``global_pool``, ``training``, ...): what shapes the
    forward besides the config and the tensors."""
    return [
        (
            name,
            type(m).__qualname__,
            sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, _PLAIN)),
        )
        for name, m in model.named_modules()
    ]


def graph_key(model, part: str, path: Path, opset: int, external_data: bool | None) -> str:
    import onnx
    import torch

    h = hashlib.sha256()
    h.update(
        json.dumps(
            [
                model.config.to_dict(),
                _module_attributes(model),
                part,
                path.name,
                opset,
                external_data,
                torch.__version__,
                onnx.__version__,
            ],
            sort_keys=True,
            default=str,
        ).encode()
    )
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def build_once(entry: Path, build) -> Path:
    """The folder ``entry``, made by ``build(folder)`` in the first process that asks (an flock per entry: the
    others wait, then find it done). Callers copy out of it: the entry is shared by the whole run."""
    with open(f"{entry}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not entry.is_dir():
            tmp = entry.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            build(tmp)
            os.replace(tmp, entry)
    return entry


class GraphCache:
    """Exported graphs by key under ``root``; :meth:`export_graph` takes the real exporter as first argument."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def export_graph(self, real, model, part: str, path, opset: int, external_data: bool | None = None):
        from export.onnx_export import GraphFile, check_graph_file, external_data_files, op_types

        path = Path(path)
        entry = build_once(
            self.root / graph_key(model, part, path, opset, external_data),
            lambda tmp: real(model, part, tmp / path.name, opset=opset, external_data=external_data),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        for f in entry.iterdir():
            shutil.copyfile(f, path.parent / f.name)
        proto = check_graph_file(path)
        return GraphFile(part, path, external_data_files(path), op_types(proto))
