"""The fixtures the feature folders share (the runtime tests' bundles) and the run itself (graph cache, file
order). Each feature folder (extract/, serve/, runners/, export/, bench/, training/, gpu/) has its own conftest.py
for what only its tests use; tests reach fixtures by name, never by import. Fixture names say what they give
(``extract_bundle_dir`` is a Path, ``trt_bundle`` a loaded Bundle); helper modules (``runtime_fixtures.py``
here, ``extract_data.py`` in extract/, ``trt_fakes.py`` in runners/ ...) hold the builders and the plain helpers
that test modules import. pytest puts each test file's folder and this one on sys.path (rootdir import mode).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before their first import: a failed assert inside a helper reports its values.
pytest.register_assert_rewrite("graph_cache", "runtime_fixtures")

from graph_cache import GraphCache  # noqa: E402
from runtime_fixtures import cached_bundle, derived_bundle, export_classifier_bundle, export_tiny_bundle  # noqa: E402

from mae_deploy.bundle import Bundle  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Bundles of the runtime tests (once per session, whichever modules use them)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """mae_vit_test (32px, patch 8, L=16, dim 32) with encoder, decoder and reference weights."""
    return cached_bundle(tmp_path_factory, "mae_vit_test", export_tiny_bundle)


@pytest.fixture(scope="module")
def loaded_tiny_bundle(tiny_bundle) -> Bundle:
    """``tiny_bundle`` loaded."""
    return Bundle.load(tiny_bundle)


@pytest.fixture(scope="session")
def norm_pix_bundle(tmp_path_factory, tiny_bundle) -> Path:
    """``tiny_bundle``'s graphs as a norm-pix model's."""
    return cached_bundle(
        tmp_path_factory, "mae_vit_test_normpix", lambda d: derived_bundle(tiny_bundle, d, norm_pix=True)
    )


@pytest.fixture(scope="session")
def encoder_only_bundle(tmp_path_factory, tiny_bundle) -> Path:
    """``tiny_bundle`` without its decoder."""
    return cached_bundle(
        tmp_path_factory, "mae_vit_test_enc", lambda d: derived_bundle(tiny_bundle, d, drop_decoder=True)
    )


@pytest.fixture(scope="session")
def classifier_bundle(tmp_path_factory) -> Path:
    """mae_vit_test classifier, 5 classes named cat/dog/bird/fish/frog, fp32 + int8, reference weights."""
    labels = ["cat", "dog", "bird", "fish", "frog"]
    return cached_bundle(tmp_path_factory, "mae_vit_test_cls", lambda d: export_classifier_bundle(d, labels=labels))


@pytest.fixture(scope="session")
def vit_base_bundle(tmp_path_factory) -> Path:
    """A random-init ViT-B/16 MAE (encoder + decoder) exported once, with reference weights.

    The parity grid is skipped here (verify=False): the tests that use it compare against PyTorch
    themselves, at the batch/visible counts they care about.
    """
    import torch

    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16", norm_pix_loss=True).eval()
    out = tmp_path_factory.mktemp("vitb") / "bundle"
    export_bundle(model, out, verify=False, reference_weights=True, progress=None)
    return out


# ------------------------------------------------------------------------------------------------
# The run: graph cache shared by the processes of one run, longest files first
# ------------------------------------------------------------------------------------------------

_CACHE_ENV = "MAE_TEST_GRAPH_CACHE"
_DURATIONS = Path(__file__).resolve().parent / "durations.json"


def pytest_configure(config) -> None:
    """The first pytest process of a run (not an xdist worker, not a nested pytest) makes the graph cache's
    folder and names it in the environment, which the workers and nested runs inherit."""
    if os.environ.get(_CACHE_ENV) or hasattr(config, "workerinput"):
        return
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="mae-graph-cache-")
    config._mae_graph_cache_owner = True


def pytest_unconfigure(config) -> None:
    if getattr(config, "_mae_graph_cache_owner", False):
        shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def graph_cache():
    """In-process exports reuse graphs already exported this run for the same model and options (see
    tests/graph_cache.py); ``MAE_TEST_REAL_EXPORTS=1`` runs the real exporter for every one."""
    if os.environ.get("MAE_TEST_REAL_EXPORTS") or not os.environ.get(_CACHE_ENV):
        yield None
        return
    from export import bundle_writer

    cache = GraphCache(Path(os.environ[_CACHE_ENV]))
    mp = pytest.MonkeyPatch()
    mp.setattr(bundle_writer, "export_graph", functools.partial(cache.export_graph, bundle_writer.export_graph))
    yield cache
    mp.undo()


def pytest_collection_modifyitems(config, items) -> None:
    """Longest files first. ``-n 2 --dist loadfile`` hands out whole files in this order, and a long file
    picked up last keeps one worker busy while the other has nothing left. The lengths are measured
    (tests/durations.json, rewritten by tests/update_durations.py); a file not listed yet counts as long when it
    has a ``slow`` test, else as short."""
    seconds = json.loads(_DURATIONS.read_text()) if _DURATIONS.exists() else {}
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    root = Path(str(config.rootpath))

    def expected(item) -> float:
        name = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else str(item.path)
        return seconds.get(name, 60.0 if item.path in slow_files else 5.0)

    items.sort(key=lambda item: -expected(item))  # stable: the order within a file stays
