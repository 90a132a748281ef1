"""Batch feature extraction: millions of images -> sharded, memory-mappable features; resumable.

The job (``mae-deploy extract``, :func:`extract_features`) lists a source (:mod:`mae_deploy.sources`),
plans shards of fixed row ranges (:mod:`.plan`), takes the output directory's lock (:mod:`.lock`), finds what
an earlier run committed (:mod:`.commit`, which documents the directory layout and the commit protocol) and
runs an engine that turns batches of paths into features in source order:

- ``local`` (:mod:`.local`): decode worker processes (:mod:`.workers`, decoding in :mod:`.decode`) feeding
  one runner in this process;
- ``ray`` (:mod:`.ray_engine`): Ray Data, CPU decode tasks and an encoder actor pool, on one machine or a
  cluster.

Either way the job (:mod:`.job`) commits the shards through the same writer, so the directory is the same.
:func:`open_features` (:mod:`.reader`) reads it back.

Failure reasons in errors.jsonl (:data:`FAILURE_REASONS`): ``empty`` (zero bytes), ``not_an_image``
(Pillow recognises no format), ``truncated``, ``corrupt`` (any other decoding error), ``too_small`` (shorter
side below ``min_side``), ``decompression_bomb`` (more pixels than ``max_pixels``, default Pillow's
``Image.MAX_IMAGE_PIXELS``), ``unreadable`` (missing file, permissions, a directory, not a regular file such
as a FIFO or a device), ``decoder_crashed`` (decoding it killed the worker process: a crash in a decoder, or
out of memory; see :class:`~.workers.DecodeWorkers`), ``missing_image`` (a WebDataset sample without an image
member, a Parquet row whose image column is null; see :mod:`mae_deploy.sources`).

Exit status (CLI): 0 when every input succeeded; 4 (:class:`~mae_deploy.errors.PartialFailure`) when the
job ran to the end but some inputs failed; 3 (:class:`~mae_deploy.errors.InputError`) for bad options, an
empty source, an unwritable --out, a directory holding another job or locked by a running one, or
``--strict`` stopping at a failure; 6 when ``engine="ray"`` and Ray is not installed; 7 when a Ray address
cannot be reached. The Python API returns an :class:`ExtractSummary` instead of raising for failed inputs
(``summary.raise_for_failures()`` raises PartialFailure).

Worker processes are started with the ``spawn`` method, so a script calling :func:`extract_features` needs
the usual ``if __name__ == "__main__":`` guard.

``--device cuda``, ``--backend trt`` and GPU Ray actors go through the same runner interface as the CPU
path (what has run on which hardware: docs/verification.md).
"""

from __future__ import annotations

from mae_deploy.extract.decode import TRANSFERS, classify_failure
from mae_deploy.extract.job import extract_features
from mae_deploy.extract.layout import (
    DTYPES,
    ERRORS_NAME,
    FAILURE_REASONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_NAME,
    MANIFEST_NAME,
    POOLS,
    index_name,
    shard_name,
)
from mae_deploy.extract.options import ExtractOptions
from mae_deploy.extract.plan import DEFAULT_SHARD_SIZE, ENGINES, ExtractSummary, default_workers
from mae_deploy.extract.reader import Features, open_features

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "DTYPES",
    "ENGINES",
    "ERRORS_NAME",
    "FAILURE_REASONS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "POOLS",
    "TRANSFERS",
    "ExtractSummary",
    "Features",
    "classify_failure",
    "ExtractOptions",
    "default_workers",
    "extract_features",
    "index_name",
    "open_features",
    "shard_name",
]
