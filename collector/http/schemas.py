"""The API's shapes: the same Structs decode requests, encode responses and generate
``/openapi.json`` (see :mod:`collector.http.openapi`), so the document cannot drift
from the code.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..sources.metrics import SourceMetrics

__all__ = [
    "BatchRequest", "BatchResponse", "ComponentHealth", "DurationBucket", "EnrichmentStats", "ErrorResponse",
    "EventResponse", "Health", "IngressStatus", "ItemResult", "Metrics", "ProcessingDuration", "ProcessorMetrics",
    "ProcessorStatus", "WorkerUtilization", "WorkersHealth", "json_encoder",
]

json_encoder = msgspec.json.Encoder()
"""Encodes every JSON answer: one encoder for the process, not one per module or call."""


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /events/batch``."""

    events: list[msgspec.Raw]


class ItemResult(msgspec.Struct, omit_defaults=True, gc=False):
    """What happened to one event: ``accepted`` (every configured sink stored it),
    ``duplicate`` (its id was already accepted; not stored again), ``invalid``
    (``path`` and ``reason`` say why), ``filtered`` (a filter or rule dropped it on
    purpose; ``reason`` names the rule; do not retry), ``unauthorized`` (the auth stage
    refused its token: ``reason`` says why; not stored), ``deadlettered`` (a sink did not
    store it and the dead-letter sink holds it; ``reason`` names the sink: ``refused
    this event`` when the store refused its data, ``gave up: failed N times`` when the
    sink spent its retries; or an enrichment step's failure policy sent it there:
    ``enrich STEP: refused this event: key K not found in source S`` or ``enrich STEP:
    gave up: source S failed for key K: ...``, ``path`` the key field; ``collector
    replay`` stores it later, and a retry is stored, not answered ``duplicate``) or
    ``failed`` (the engine could not process it; retry)."""

    index: int
    status: str
    id: str | int | None = None
    path: str | None = None
    reason: str | None = None


class EventResponse(msgspec.Struct, omit_defaults=True):
    """Answer to ``POST /events``."""

    status: str
    id: str | int | None = None
    path: str | None = None
    reason: str | None = None


class BatchResponse(msgspec.Struct):
    """Answer to ``POST /events/batch``: counts and one result per item, in order."""

    accepted: int
    duplicates: int
    invalid: int
    failed: int
    results: list[ItemResult]
    deadlettered: int = 0
    filtered: int = 0
    unauthorized: int = 0


class ErrorResponse(msgspec.Struct, omit_defaults=True):
    """Any 4xx/5xx that is not a per-item result: what was wrong and how to fix it."""

    error: str
    detail: str
    path: str | None = None
    retry_after: int | None = None


class IngressStatus(msgspec.Struct):
    """The daemon's ``[source]``: a NATS JetStream durable pull consumer (``GET /ingress``,
    ``ingress`` in ``/metrics`` and ``/ready``). Counts are messages unless the name says
    events; counters sum over the ingresses a daemon ran (reloads restart it), the rest is
    the running one's. ``num_pending`` and ``num_ack_pending`` are JetStream's consumer
    info, read in the background every ``lag_interval`` (1 s), never by a request:
    ``consumer_info_age_s`` says how old they are (null: never read)."""

    stream: str
    durable: str
    subjects: list[str]
    connected: bool  # the connection to NATS is up (false while it reconnects, or once the ingress stopped)
    fetched: int
    events: int  # events handed to the engine
    acked: int
    nakked: int
    redelivered: int
    terminated: int  # poison messages: dead-lettered, then terminated
    deadlettered: int  # events
    fetch_errors: int
    batches_inflight: int
    messages_inflight: int  # fetched by this daemon, not yet acked, nakked or terminated
    num_pending: int  # the consumer's lag: stream messages not yet delivered (to any daemon on the durable)
    num_ack_pending: int  # delivered, not yet acknowledged (every daemon on the durable)
    consumer_info_age_s: float | None = None
    last_error: str | None = None  # the last fetch, connection, nak, term or consumer-info error
    last_error_age_s: float | None = None
    kind: str = "nats"


class Metrics(msgspec.Struct):
    """``GET /metrics`` as JSON (seed 004's fields, then more)."""

    events_received: int
    events_processed: int
    events_failed: int
    average_processing_latency_ms: float
    current_queue_depth: int
    active_workers: int
    events_per_second: float
    uptime_seconds: float
    duplicates_dropped: int
    deadlettered: int
    redelivered_chunks: int
    worker_restarts: int
    http_requests: dict[str, int]
    workers: list[dict[str, Any]]
    sinks: list[dict[str, Any]]
    ingress: IngressStatus | None = None  # the [source] consumer (fetched, acked, lag, ...); null without one
    # duplicates per type (Dedup count_by) and sequence gaps (Gaps), by stage; null without such stages
    integrity: dict[str, dict[str, Any]] | None = None
    # each Pair stage's counters (paired, expired, orphan, pending, ...); null without one
    pairs: dict[str, dict[str, int]] | None = None
    # per enrichment lookup (collector.sources.metrics.SourceMetrics); null without lookups
    enrichment: dict[str, SourceMetrics] | None = None


class EnrichmentStats(msgspec.Struct):
    """``GET /processor/enrichment`` (seed 003): success rates and statistics per lookup.

    ``events``, ``failures`` and ``success_rate`` are over every lookup; ``sources``
    has one entry per lookup; ``latency_bounds_ms`` are the upper bounds of each
    source's ``latency_buckets`` (the last bucket holds the calls over the last one).
    """

    events: int
    failures: int
    success_rate: float | None
    latency_bounds_ms: list[float]
    sources: dict[str, SourceMetrics]


class Health(msgspec.Struct, omit_defaults=True):
    """``GET /health`` and ``GET /ready``."""

    status: str
    workers_alive: int
    workers: int
    heartbeats_fresh: bool
    sinks: dict[str, bool] | None = None
    detail: str | None = None
    ingress: IngressStatus | None = None  # /ready with a [source]: not ready while it is disconnected


class DurationBucket(msgspec.Struct):
    """Chunks whose processing took at most ``le_ms`` milliseconds (cumulative; null: +Inf)."""

    le_ms: float | None
    count: int


class ProcessingDuration(msgspec.Struct):
    """Chunk processing time, decode to sink commit: a histogram and percentiles estimated
    from it (each the upper bound of the bucket it falls in; null before any chunk)."""

    chunks: int
    mean_ms: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    buckets: list[DurationBucket]


class WorkerUtilization(msgspec.Struct):
    """One worker process: CPU time over wall time since the previous read (first read: since it started)."""

    index: int
    pid: int
    alive: bool
    utilization_percent: float
    events: int
    inflight: int


class ProcessorMetrics(msgspec.Struct):
    """``GET /metrics/processor``: seed 003's key metrics.

    ``events_*_total`` of processed, deduplicated, failed and dead-lettered events are
    those of ``/metrics`` (kept across reloads); filtered, enriched, the durations, the
    cache figures and utilisation are the serving engine's (a reload starts them afresh).
    """

    events_processed_total: int
    events_enriched_total: int
    events_filtered_total: int
    events_deduplicated_total: int
    events_failed_total: int
    events_deadlettered_total: int
    processing_duration: ProcessingDuration
    enrichment_cache_hit_ratio: float | None  # cache hits ÷ (hits + calls made); null before any lookup
    enrichment: dict[str, int]  # lookup_calls, cache_hits, coalesced, lookup_failures
    worker_utilization_percent: float  # mean over the live workers
    workers: list[WorkerUtilization]


class ComponentHealth(msgspec.Struct, omit_defaults=True):
    """One sink, source or Redis server: ``ok`` null when it cannot be probed."""

    ok: bool | None
    kind: str | None = None
    detail: str | None = None


class WorkersHealth(msgspec.Struct):
    """The worker processes."""

    alive: int
    total: int
    heartbeats_fresh: bool
    inflight_events: int


class ProcessorStatus(msgspec.Struct, omit_defaults=True):
    """``GET /processor/status``: ``ok``; ``degraded`` (workers fine, some sink, source or
    Redis server down: 200 still); ``unhealthy`` (a worker down or silent, or stopping: 503)."""

    status: str
    uptime_seconds: float
    workers: WorkersHealth
    sinks: dict[str, ComponentHealth]
    sources: dict[str, ComponentHealth]
    redis: dict[str, ComponentHealth]  # redacted URL → reachability; empty when nothing uses Redis
    detail: str | None = None
