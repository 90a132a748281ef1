"""Latency benchmark (being split into modules; see issue 10)."""

from mae_deploy.bench._old import *  # noqa: F403
from mae_deploy.bench._old import CSV_COLUMNS, SCHEMA_VERSION, _load_average, write_plot  # noqa: F401
