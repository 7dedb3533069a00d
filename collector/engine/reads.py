"""What a running collector lets you read, without messaging or waiting for any worker.

::

    stats() ─────────── sum of the shared-memory slots (a few microseconds, no lock)
    workers_alive() ─── the pool's view of its slots; heartbeats_fresh(), worker_pids()
    aggregate(name) ─── the workers' last partials merged (engine/materialize.py)
    view(name) ──────── a pipeline view rendered from merged aggregates
    integrity() ─────── duplicates per type, sequence gaps: the integrity stages' aggregates
    pairs() ─────────── each Pair stage's counters; aggregate_series(): for the Prometheus text
    enrichment() ────── per-lookup figures from the same shared-memory slots (sources/metrics.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import stats as S
from ..errors import CollectorClosed
from ..sources.metrics import SourceMetrics, policy_of, read_sources

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from .admission import Admission
    from .materialize import Materialized
    from .pool import WorkerPool

__all__ = ["Reads"]


class Reads:
    """The read side of :class:`~collector.Collector` (a mixin over its parts)."""

    _block: S.StatsBlock | None
    pipeline: Pipeline
    _state: str
    pool: WorkerPool
    admission: Admission
    materialized: Materialized
    heartbeat_timeout: float

    def stats(self) -> S.Stats:
        """Collector statistics from shared memory: no lock, no message, microseconds."""
        if self._block is None:
            raise CollectorClosed("the collector is not running")
        return self._block.read(self.workers_alive())

    def enrichment(self) -> dict[str, SourceMetrics]:
        """Per-lookup enrichment figures (calls, cache and Redis hits, misses, coalesced,
        keys per call, errors by kind, breaker state, stale values, call latencies),
        summed over the workers from shared memory: no lock, no message.

        One entry per lookup of the pipeline (the first ``MAX_LOOKUPS``), by name;
        :class:`~collector.sources.metrics.SourceMetrics` says what each figure counts.
        """
        if self._block is None:
            raise CollectorClosed("the collector is not running")
        lookups = [(lk.name, _kind(lk), policy_of(lk)) for lk in self.pipeline.lookups]
        return read_sources(self._block, lookups)

    def workers_alive(self) -> list[bool]:
        """Whether each worker slot has a live, ready worker."""
        return self.pool.workers_alive()

    def heartbeats_fresh(self, max_age: float | None = None) -> bool:
        """True while every worker is ready and stamped its heartbeat recently."""
        return self.pool.heartbeats_fresh(self.heartbeat_timeout if max_age is None else max_age)

    def worker_pids(self) -> list[int]:
        """The pid of each worker slot (0 while a slot has no process)."""
        return self.pool.worker_pids()

    def aggregate(self, name: str, key: Any = None, **window: Any) -> Any:
        """Plain values of the aggregate stage ``name``, merged over every worker.

        Never waits for a worker: at most one snapshot interval behind
        (``aggregate_staleness``). ``key`` picks one group; ``window`` passes
        ``start``/``end``/``now`` to windowed aggregates.
        """
        return self.materialized.aggregate(name, key, **window)

    def aggregates(self) -> dict[str, Any]:
        """Every aggregate stage's plain values, by name."""
        return self.materialized.aggregates()

    def aggregate_staleness(self, name: str) -> float:
        """Seconds since the oldest worker partial of ``name`` was taken."""
        return self.materialized.partials.staleness(name)

    def integrity(self) -> dict[str, dict[str, Any]]:
        """Data-integrity figures, merged over every worker: ``{"duplicates": {stage:
        {value: count}}, "sequence": {stage: {gaps, skipped, late, repeated, ...}}}``
        for the pipeline's ``Dedup(count_by=...)`` and ``Gaps`` stages (empty: none)."""
        return self.materialized.integrity()

    def pairs(self) -> dict[str, dict[str, int]]:
        """Each ``Pair`` stage's counters merged over every worker: ``{stage: {paired,
        expired, orphan, evicted, duplicate_start, ..., pending, pending_ends}}``
        (``pending*`` only with the memory store; empty: no Pair stage)."""
        return self.materialized.pairs()

    def aggregate_series(self) -> list[Any]:
        """Each aggregate's figures for the Prometheus text (current window, at most
        ``max_series`` groups): ``collector.stages.exposition.AggregateSeries``."""
        return self.materialized.series()

    def view(self, name: str) -> dict[str, Any]:
        """A materialized view of the pipeline (``Pipeline.views``) rendered now."""
        return self.materialized.view(name)

    @property
    def stats_block_name(self) -> str | None:
        """The name of the shared-memory statistics block (None when not running)."""
        return self._block.name if self._block is not None else None

    @property
    def inflight_events(self) -> int:
        """Events accepted and not yet done."""
        return self.admission.inflight

    @property
    def running(self) -> bool:
        """True between start and close, unless a fatal error halted the collector."""
        return self._state == "running"


def _kind(lk: Any) -> str:
    """A lookup's source kind (``client`` for a client-method lookup)."""
    src = lk.source
    if src is None:
        return "client"
    kind = getattr(src, "kind", None)  # a Source instance
    if isinstance(kind, str) and kind:
        return kind
    tag = getattr(getattr(type(src), "__struct_config__", None), "tag", None)  # a source config Struct
    return tag if isinstance(tag, str) else type(src).__name__
