"""What an operation reports: rejected inputs, per-batch workload statistics, the result;
and what ``Collector.stats()`` reports (:class:`Stats`).

Workers send a :class:`~collector.protocol.ChunkSummary` with every ack; the
supervisor merges them into a :class:`BatchAccumulator` and freezes it into
:class:`BatchStats` when the operation completes. :class:`Stats` is summed from the
shared-memory slots by ``collector.stats.StatsBlock.read``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .protocol import ChunkSummary

__all__ = ["BatchStats", "ErrorItem", "LookupStats", "OperationResult", "SinkStats", "Stats", "WorkerStats"]


class ErrorItem(msgspec.Struct, frozen=True):
    """One input that was not handled as an event.

    ``index`` is its position in the input batch, ``path`` the field path
    (``$.start_at``, ``$`` for the whole item), ``reason`` what was wrong, ``kind``
    one of ``invalid`` (schema or malformed), ``duplicate`` (dedup stage dropped it),
    ``filtered`` (a filter stage dropped it), ``retry`` (a copy of an id whose original
    was still being stored when the dedup wait ran out: not stored, send it again),
    ``deadlettered`` (a sink did not store it: ``reason`` is ``sink NAME: refused this
    event: ...`` when the store refused its data, ``sink NAME: gave up: failed
    N times; ...`` when the sink spent its retry budget; the dead-letter sink holds
    it and ``collector replay`` stores it later; not remembered by dedup; also an
    event an enrichment step's failure policy dead-lettered: ``reason`` is ``enrich
    STEP: refused this event: key K not found in source S`` or ``enrich STEP: gave up:
    source S failed for key K: WHY``, ``path`` the key field),
    ``error`` (pipeline code raised) or ``lost`` (a chunk that killed its worker on
    every delivery).
    """

    index: int
    path: str
    reason: str
    kind: str = "invalid"


class LookupStats(msgspec.Struct, frozen=True):
    """One enrichment lookup's figures for a batch."""

    calls: int
    cache_hits: int
    coalesced: int
    misses: int
    failures: int
    reported_sum: float
    reported_max: float
    latency_mean: float
    latency_p50: float
    latency_p99: float
    # source lookups (collector.sources); see protocol.LookupSummary
    errors: int = 0
    not_found: int = 0
    stale: int = 0
    breaker_opens: int = 0
    short_circuited: int = 0
    shared_hits: int = 0
    keys_fetched: int = 0
    # failure policies (Lookup.on_failure): events kept at the default, dead-lettered,
    # held, recovered by a hold; per-event log lines over log_rate
    kept: int = 0
    dead_lettered: int = 0
    held: int = 0
    recovered: int = 0
    log_suppressed: int = 0


_SOURCE_COUNTERS = ("errors", "not_found", "stale", "breaker_opens", "short_circuited", "shared_hits", "keys_fetched",
                    "kept", "dead_lettered", "held", "recovered", "log_suppressed")


class BatchStats(msgspec.Struct, frozen=True):
    """Per-batch workload statistics (seed 000): what the batch was and what it cost.

    ``distinct_keys`` counts distinct values of the pipeline's shard key (playback:
    distinct users); ``counts`` maps each ``count_by`` field (device type, region, ...)
    to its value counts; ``lookups`` has one entry per enrichment lookup.
    """

    events: int
    distinct_keys: int
    counts: dict[str, dict[str, int]]
    lookups: dict[str, LookupStats]
    lookup_failures: int
    redelivered_chunks: int

    @property
    def lookup_calls(self) -> dict[str, int]:
        """Calls made per lookup kind."""
        return {k: v.calls for k, v in self.lookups.items()}


def _pct(sorted_xs: list[float], q: float) -> float:
    if not sorted_xs:
        return 0.0
    i = min(len(sorted_xs) - 1, max(0, round(q * (len(sorted_xs) - 1))))
    return sorted_xs[i]


class BatchAccumulator:
    """Merges chunk summaries; lives in the supervisor, one per operation."""

    __slots__ = ("counts", "lookups", "redelivered")

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.lookups: dict[str, list[Any]] = {}
        self.redelivered = 0

    def add(self, s: ChunkSummary) -> None:
        """Fold one chunk's summary in."""
        for field, vc in s.counts.items():
            mine = self.counts.setdefault(field, {})
            for v, n in vc.items():
                mine[v] = mine.get(v, 0) + n
        for name, lk in s.lookups.items():
            acc = self.lookups.get(name)
            if acc is None:
                self.lookups[name] = [lk.calls, lk.hits, lk.coalesced, lk.misses, lk.failures,
                                      lk.reported_sum, lk.reported_max, list(lk.latencies),
                                      {f: getattr(lk, f) for f in _SOURCE_COUNTERS}]
            else:
                more = acc[8]
                for f in _SOURCE_COUNTERS:
                    more[f] += getattr(lk, f)
                acc[0] += lk.calls
                acc[1] += lk.hits
                acc[2] += lk.coalesced
                acc[3] += lk.misses
                acc[4] += lk.failures
                acc[5] += lk.reported_sum
                acc[6] = max(acc[6], lk.reported_max)
                acc[7].extend(lk.latencies)

    def freeze(self, events: int, distinct_keys: int) -> BatchStats:
        """The final :class:`BatchStats`."""
        lookups = {}
        failures = 0
        for name, (calls, hits, coal, misses, fails, rsum, rmax, lat, more) in self.lookups.items():
            lat.sort()
            failures += fails
            lookups[name] = LookupStats(
                calls=calls,
                cache_hits=hits,
                coalesced=coal,
                misses=misses,
                failures=fails,
                reported_sum=rsum,
                reported_max=rmax,
                latency_mean=sum(lat) / len(lat) if lat else 0.0,
                latency_p50=_pct(lat, 0.50),
                latency_p99=_pct(lat, 0.99),
                **more,
            )
        return BatchStats(
            events=events,
            distinct_keys=distinct_keys,
            counts={k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in self.counts.items()},
            lookups=lookups,
            lookup_failures=failures,
            redelivered_chunks=self.redelivered,
        )


class OperationResult(msgspec.Struct, frozen=True):
    """The outcome of one ``handle()`` call.

    ``handled_events + failed_events == len(input)``. ``handled_events`` counts the
    events that went through the pipeline (including those dropped as duplicates or
    filtered, which are listed in ``errors`` with their kind but are not failures, and
    those an auth stage refused, kind ``unauthorized``, and those a sink dead-lettered,
    kind ``deadlettered``: held by the dead-letter sink,
    not by every configured sink, so not stored in the sense of an ``accepted``);
    ``failed_events`` counts the ones not stored (kinds ``invalid``, ``retry``,
    ``error`` and ``lost``).
    ``events`` (when asked for) is aligned with the input: the enriched event at each
    index, ``None`` where the input was rejected or dropped.
    """

    handled_events: int
    failed_events: int
    elapsed: float
    errors: list[ErrorItem]
    batch: BatchStats
    events: list[Any] | None = None


class SinkStats(msgspec.Struct, frozen=True):
    """Per-sink delivery figures, summed over workers.

    ``index`` is the sink's position in ``Pipeline.sinks``; the dead-letter sink comes
    after them, at ``len(Pipeline.sinks)`` (``collector.sinks.sink_names(pipeline)``
    gives the name of each index). ``rows`` and ``batches`` count chunks committed,
    ``errors`` failed write attempts, ``retries`` attempts scheduled again after a
    failure, ``last_commit_ms`` the latest commit's duration (the slowest worker's).
    Only sinks that wrote or failed at least once are listed; a replaced worker's
    figures are kept (in the supervisor's slot).
    """

    index: int
    rows: int
    batches: int
    errors: int
    retries: int
    last_commit_ms: float


class WorkerStats(msgspec.Struct, frozen=True):
    """One worker's figures as read from its slot."""

    index: int
    pid: int
    alive: bool
    heartbeat_age: float
    events: int
    failed: int
    chunks: int
    inflight: int
    processed_per_sec: float
    lookup_calls: int
    cache_hits: int
    coalesced: int
    lookup_failures: int
    avg_latency_ms: float


class Stats(msgspec.Struct, frozen=True):
    """Collector statistics, read from shared memory without waiting for any worker.

    ``total_events`` counts every event handled (valid or rejected) since start;
    ``processed_per_sec`` is the rate over the last ``collector.stats.RATE_WINDOW`` (5)
    whole seconds and ``avg_per_sec`` the average since start.
    """

    total_events: int
    processed_per_sec: float
    avg_per_sec: float
    failed_events: int
    received_events: int
    inflight_events: int
    chunks: int
    redelivered_chunks: int
    worker_restarts: int
    duplicates_dropped: int
    deadlettered: int
    lookup_calls: int
    cache_hits: int
    coalesced_calls: int
    lookup_failures: int
    avg_latency_ms: float
    latency_buckets_ms: list[tuple[float, int]]
    uptime: float
    workers: list[WorkerStats]
    sinks: list[SinkStats]
    filtered_events: int = 0  # dropped on purpose by a filter or a rule
    enriched_events: int = 0  # through enrichment, less the lookups that finally failed
