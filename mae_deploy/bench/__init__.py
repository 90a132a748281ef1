"""Latency benchmark: backends x precisions x parts x batch sizes x visible-token counts.

For every combination the benchmark reports latency percentiles (p50/p90/p99/mean/min/max), throughput
(images/s), achieved GFLOP/s and its share of the same engine's MatMul peak probed in the same run, the
peak host RSS during the row, peak device memory where it can be measured, the runner's build time, and
the agreement of the outputs with a reference (torch fp32 on CPU; ONNX Runtime fp32 when no reference
weights are around), so a fast but wrong backend cannot look good. The results format is documented in
docs/bench-schema.md.

Modules: ``stats`` (clock, percentiles, agreement), ``machine`` (CPU, GPUs, libraries, load, memory),
``config`` (what to run), ``flops`` (FLOP counts per graph), ``peak`` (MatMul peak probes), ``build``
(runners; unavailable vs bad input), ``workloads`` (inputs and reference), ``run`` (the benchmark),
``schema`` (the results format), ``report`` (console, JSON, CSV, Markdown), ``plot`` (PNG), ``compare``.
"""

from mae_deploy.bench.compare import compare_results, format_compare, row_key
from mae_deploy.bench.config import BACKENDS, KEY_FIELDS, PARTS, PRECISIONS, BenchConfig, visible_counts
from mae_deploy.bench.flops import classifier_flops, decoder_flops, encoder_flops, part_flops
from mae_deploy.bench.machine import (
    CpuShare,
    PeakRss,
    cpu_model_and_flags,
    default_threads,
    library_versions,
    load_average,
    machine_info,
)
from mae_deploy.bench.peak import PeakProbes, probe_peak
from mae_deploy.bench.plot import write_plot
from mae_deploy.bench.report import (
    CSV_COLUMNS,
    check_outputs,
    format_summary,
    markdown_table,
    write_csv,
    write_json,
    write_markdown,
    write_outputs,
)
from mae_deploy.bench.run import run_benchmark
from mae_deploy.bench.schema import (
    AGREEMENT_KEYS,
    COMPUTE_KEYS,
    ROW_KEYS,
    RUNNER_KEYS,
    SCHEMA_VERSION,
    TOP_KEYS,
    load_results,
    validate_results,
)
from mae_deploy.bench.stats import STATS, agreement, latency_stats, percentile, time_calls

__all__ = [
    "AGREEMENT_KEYS",
    "BACKENDS",
    "COMPUTE_KEYS",
    "CSV_COLUMNS",
    "KEY_FIELDS",
    "PARTS",
    "PRECISIONS",
    "ROW_KEYS",
    "RUNNER_KEYS",
    "SCHEMA_VERSION",
    "STATS",
    "TOP_KEYS",
    "BenchConfig",
    "CpuShare",
    "PeakProbes",
    "PeakRss",
    "agreement",
    "check_outputs",
    "classifier_flops",
    "compare_results",
    "cpu_model_and_flags",
    "decoder_flops",
    "default_threads",
    "encoder_flops",
    "format_compare",
    "format_summary",
    "latency_stats",
    "library_versions",
    "load_average",
    "load_results",
    "machine_info",
    "markdown_table",
    "part_flops",
    "percentile",
    "probe_peak",
    "row_key",
    "run_benchmark",
    "time_calls",
    "validate_results",
    "visible_counts",
    "write_csv",
    "write_json",
    "write_markdown",
    "write_outputs",
    "write_plot",
]
