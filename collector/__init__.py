"""collector: a high-throughput event collector.

Batches of events are sharded by key over CPU-pinned worker processes, validated,
enriched from slow outside sources, counted in shared memory and delivered to sinks.
See README.md for the embedding API, the daemon and the benchmark harness.
"""

from __future__ import annotations

from .errors import (
    CollectorClosed,
    CollectorError,
    ConfigError,
    InvalidInput,
    MissingDependency,
    Overloaded,
    WorkerBootError,
    WorkerError,
)
from .pipeline import Lookup, Pipeline
from .stats import Stats, WorkerStats
from .version import __version__

__all__ = [
    "BatchStats",
    "Collector",
    "CollectorClosed",
    "CollectorError",
    "ConfigError",
    "ErrorItem",
    "InvalidInput",
    "Lookup",
    "MissingDependency",
    "Operation",
    "OperationResult",
    "Overloaded",
    "Pipeline",
    "Stats",
    "WorkerBootError",
    "WorkerError",
    "WorkerStats",
    "__version__",
]


def __getattr__(name: str) -> object:
    # the engine pulls in multiprocessing and uvloop; plugins that only need the
    # pipeline types (sinks, stages, domain packs) should not pay for that import
    if name in ("Collector", "Operation"):
        from . import engine

        return getattr(engine, name)
    if name in ("OperationResult", "ErrorItem", "BatchStats"):
        from . import results

        return getattr(results, name)
    raise AttributeError(f"module 'collector' has no attribute {name!r}")
