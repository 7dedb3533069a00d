"""Prometheus text exposition (format 0.0.4) of the daemon's statistics.

Engine figures come from the shared-memory stats block (no message to any worker);
HTTP figures from the server's own counters on the supervisor loop; data-integrity
figures (duplicates per type, sequence gaps, ordering) from ``Metrics.integrity``, pairing
counters from ``Metrics.pairs`` and aggregates from ``Backend.aggregate_series()``, all
the workers' last partials merged in the supervisor (``collector.stages.exposition``
states the aggregates' cardinality bound).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..stages.exposition import SKIPPED

if TYPE_CHECKING:
    from ..stages.exposition import AggregateSeries
    from .backend import Backend
    from .protocol import HttpServer
    from .schemas import IngressStatus

__all__ = ["ingress_lines", "render"]


def _label(v: Any) -> str:
    """A label value escaped as the text format requires (event types come from clients)."""
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples: list[tuple[dict[str, Any], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, v in samples:
            lab = ",".join(f'{k}="{_label(x)}"' for k, x in labels.items())
            self.lines.append(f"{name}{{{lab}}} {_num(v)}" if lab else f"{name} {_num(v)}")

    def histogram(self, name: str, help_: str, series: list[tuple[dict[str, Any], list[tuple[float, int]], float]]) -> None:
        """``series``: (labels, [(upper bound seconds, count in that bucket)], sum)."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, buckets, total in series:
            acc = 0
            for le, c in buckets:
                acc += c
                lab = ",".join([*(f'{k}="{_label(x)}"' for k, x in labels.items()), f'le="{_num(le)}"'])
                self.lines.append(f"{name}_bucket{{{lab}}} {acc}")
            lab = ",".join(f'{k}="{_label(x)}"' for k, x in labels.items())
            self.lines.append(f"{name}_sum{{{lab}}} {_num(total)}")
            self.lines.append(f"{name}_count{{{lab}}} {acc}")


# Gaps counters → (metric, type, help); ``gaps`` (still missing) falls when a number arrives late
_SEQUENCE = (
    ("skipped", "collector_sequence_gaps_total", "counter", "Sequence numbers skipped by a session (ever)."),
    ("gaps", "collector_sequence_missing", "gauge", "Sequence numbers skipped and still missing."),
    ("late", "collector_sequence_late_total", "counter", "Missing sequence numbers that arrived later."),
    ("repeated", "collector_sequence_repeated_total", "counter", "Sequence numbers seen again (client-side repeats)."),
    ("untracked", "collector_sequence_untracked_total", "counter",
     "Sequence numbers below a session's tracked range (late or repeated, unknown)."),
)


# Order counters → (metric, type, help), labelled by stage
_ORDERING = (
    ("reordered", "collector_ordering_reordered_total", "counter",
     "Events that arrived after a newer event of their key and were put back in order."),
    ("late", "collector_ordering_late_total", "counter",
     "Events older than the newest one already delivered for their key (stored out of order)."),
    ("untimed", "collector_ordering_untimed_total", "counter", "Events without a usable time (not ordered)."),
    ("released_early", "collector_ordering_released_early_total", "counter",
     "Held events released before their time because the buffer was full (max_held)."),
    ("held", "collector_ordering_held", "gauge", "Events waiting in the reorder buffers now."),
)


def _integrity(o: _Out, figures: dict[str, dict[str, Any]]) -> None:
    """Duplicates per type, sequence counters per stage (and type, with ``by``),
    ordering counters per stage."""
    dups = figures.get("duplicates") or {}
    if dups:
        o.metric("collector_duplicates_total", "counter", "Events dropped as repeated ids, per type (Dedup count_by).",
                 [({"stage": stage, "type": t}, n) for stage, by in dups.items() for t, n in by.items()])
    orders = figures.get("ordering") or {}
    for key, name, kind, help_ in _ORDERING if orders else ():
        o.metric(name, kind, help_, [({"stage": stage}, c[key]) for stage, c in orders.items()])
    seqs = figures.get("sequence") or {}
    if not seqs:
        return
    for key, name, kind, help_ in _SEQUENCE:
        samples: list[tuple[dict[str, Any], float]] = []
        for stage, c in seqs.items():
            by = c.get("by")
            if by is None:
                samples.append(({"stage": stage}, c[key]))
            else:
                samples += [({"stage": stage, "type": t}, row[key]) for t, row in by.items()]
        o.metric(name, kind, help_, samples)
    o.metric("collector_sequence_sessions", "gauge", "Sessions whose sequence numbers are tracked.",
             [({"stage": stage}, c["sessions"]) for stage, c in seqs.items()])
    o.metric("collector_sequence_evicted_sessions_total", "counter", "Sessions forgotten by the max_sessions bound.",
             [({"stage": stage}, c["evicted_sessions"]) for stage, c in seqs.items()])


def _aggregates(o: _Out, series: list[AggregateSeries]) -> None:
    """Each aggregate's current window (bounded by its max_series) and its counters."""
    if not series:
        return
    values = []
    for a in series:
        lab = {"aggregate": a.name, "fn": a.fn, "window": a.window}
        values += [(lab if k is None else {**lab, "key": k}, v) for k, v in a.values]
    o.metric("collector_aggregate_value", "gauge",
             "An aggregate's value in its current window, per group (key) when grouped.", values)
    o.metric("collector_aggregate_groups", "gauge", "Groups in the aggregate's current window.",
             [({"aggregate": a.name}, a.groups) for a in series])
    o.metric("collector_aggregate_truncated", "gauge",
             "1 when the aggregate has more groups than its max_series: its values are left out.",
             [({"aggregate": a.name}, int(a.truncated)) for a in series])
    starts = [({"aggregate": a.name}, a.window_start) for a in series if a.window_start is not None]
    if starts:
        o.metric("collector_aggregate_window_start_seconds", "gauge",
                 "Start (Unix seconds) of the current tumbling or hopping window.", starts)
    for key, name, help_ in (("events", "events", "Events the aggregate saw."),
                             ("matched", "matched", "Events that met the aggregate's where."),
                             ("evicted_groups", "evicted_groups", "Groups evicted by the max_groups bound.")):
        o.metric(f"collector_aggregate_{name}_total", "counter", help_,
                 [({"aggregate": a.name}, a.counters.get(key, 0)) for a in series])
    o.metric("collector_aggregate_skipped_total", "counter", "Matching events skipped, by reason.",
             [({"aggregate": a.name, "reason": r}, a.counters.get(r, 0)) for a in series for r in SKIPPED])


# Pair counters → (metric, labels beyond the stage, help)
_PAIRS: tuple[tuple[str, str, dict[str, str], str], ...] = (
    ("paired", "collector_pairs_paired_total", {}, "Start/end pairs made."),
    ("expired", "collector_pairs_expired_total", {}, "Starts emitted unpaired after their ttl."),
    ("orphan", "collector_pairs_orphan_ends_total", {}, "Ends reported without a start after their orphan_ttl."),
    ("evicted", "collector_pairs_evicted_total", {}, "Waiting halves emitted unpaired by the max_pending bound."),
    ("duplicate_start", "collector_pairs_duplicates_total", {"half": "start"}, "Second copies of a waiting half."),
    ("duplicate_end", "collector_pairs_duplicates_total", {"half": "end"}, ""),
    ("replayed", "collector_pairs_replayed_total", {}, "Halves of a key paired within replay_ttl (not paired twice)."),
    ("missing_key", "collector_pairs_missing_key_total", {}, "Starts and ends without a usable key."),
    ("emitted", "collector_pairs_emitted_total", {}, "Records handed to the sinks."),
    ("emit_errors", "collector_pairs_emit_errors_total", {}, "Records whose emit conversion raised."),
    ("output_dropped", "collector_pairs_output_dropped_total", {}, "Records dropped by the max_output bound."),
    ("stored", "collector_pairs_stored_total", {}, "Halves left waiting in the shared store."),
)


def _pairs(o: _Out, pairs: dict[str, dict[str, int]]) -> None:
    """Each Pair stage's counters; pending halves when the store counts them (memory)."""
    if not pairs:
        return
    by_name: dict[str, tuple[str, list[tuple[dict[str, Any], float]]]] = {}
    for key, name, extra, help_ in _PAIRS:
        found: list[tuple[dict[str, Any], float]] = [
            ({"stage": stage, **extra}, c[key]) for stage, c in pairs.items() if key in c]
        if found:
            by_name.setdefault(name, (help_, []))[1].extend(found)
    for name, (help_, samples) in by_name.items():
        o.metric(name, "counter", help_, samples)
    pending: list[tuple[dict[str, Any], float]] = [({"stage": stage, "half": half}, c[key]) for stage, c in pairs.items()
               for key, half in (("pending", "start"), ("pending_ends", "end")) if key in c]
    if pending:
        o.metric("collector_pairs_pending", "gauge", "Halves waiting for their other half.", pending)


# SourceMetrics counters → (metric, help); every one labelled by lookup (and source kind)
_SOURCE = (
    ("calls", "collector_source_calls_total", "Calls made to the source (retries included)."),
    ("cache_hits", "collector_source_cache_hits_total", "Events answered by the local cache."),
    ("redis_hits", "collector_source_redis_hits_total", "Keys answered by the shared (Redis) cache."),
    ("misses", "collector_source_misses_total", "Events that needed a fetch."),
    ("coalesced", "collector_source_coalesced_total", "Events that joined a call under way (single-flight)."),
    ("failures", "collector_source_failures_total", "Events whose lookup failed (default or stale value)."),
    ("not_found", "collector_source_not_found_total", "Events whose key the source does not have."),
    ("stale_served", "collector_source_stale_served_total", "Events given a stale value because the source failed."),
    ("keys_fetched", "collector_source_keys_fetched_total", "Keys asked of the source (per call: keys per batched call)."),
    ("short_circuited", "collector_source_short_circuited_total", "Calls refused at once by an open breaker."),
    ("kept", "collector_source_kept_total", "Events whose lookup failed that went on with the field at its default."),
    ("dead_lettered", "collector_source_dead_lettered_total", "Events the failure policy sent to the dead-letter sink."),
    ("held", "collector_source_held_total", "Events held for the source to answer again (failure policy hold)."),
    ("recovered", "collector_source_recovered_total", "Held events the source then answered (enriched after all)."),
    ("log_suppressed", "collector_source_log_suppressed_total", "Per-event failure log lines over the step's log_rate."),
)


def _sources(o: _Out, src: dict[str, Any]) -> None:
    """Per-lookup enrichment figures (collector.sources.metrics)."""
    from ..stats import LOOKUP_LAT_BOUNDS_MS

    if not src:
        return
    lab = {n: {"lookup": n, "kind": s.kind} for n, s in src.items()}
    for field, name, help_ in _SOURCE:
        o.metric(name, "counter", help_, [(lab[n], getattr(s, field)) for n, s in src.items()])
    o.metric("collector_source_errors_total", "counter", "Failed calls (tries) by kind; key: one key failed in a good answer.",
             [({**lab[n], "error": k}, v) for n, s in src.items() for k, v in s.errors.items()])
    withb = {n: s for n, s in src.items() if s.breaker is not None}
    o.metric("collector_source_breaker_workers", "gauge", "Workers whose breaker is in each state (as of their last chunk).",
             [({**lab[n], "state": k}, v) for n, s in withb.items() for k, v in s.breaker_workers.items()])
    o.metric("collector_source_breaker_transitions_total", "counter", "Breaker transitions into each state.",
             [({**lab[n], "to": k}, v) for n, s in withb.items() for k, v in s.breaker_transitions.items()])
    bounds = [b / 1000.0 for b in LOOKUP_LAT_BOUNDS_MS]
    o.histogram("collector_source_call_latency_seconds", "Latency of calls to each source.",
                [(lab[n], list(zip(bounds, s.latency_buckets, strict=True)), s.latency_ms["mean"] / 1000.0 * s.latency_ms["count"])
                 for n, s in src.items()])


_INGRESS_COUNTERS = ("fetched", "events", "acked", "nakked", "redelivered", "terminated", "deadlettered", "fetch_errors")
_INGRESS_GAUGES = ("batches_inflight", "messages_inflight", "num_pending", "num_ack_pending")


def ingress_lines(ing: IngressStatus) -> list[str]:
    """The exposition lines of the NATS [source] alone."""
    o = _Out()
    _ingress(o, ing)
    return o.lines


def _ingress(o: _Out, ing: IngressStatus) -> None:
    """The NATS [source]: messages unless the name says events; labelled by stream and durable."""
    lab = {"stream": ing.stream, "durable": ing.durable}
    o.metric("collector_ingress_connected", "gauge", "NATS ingress: 1 while connected to NATS.",
             [(lab, int(ing.connected))])
    for k in _INGRESS_COUNTERS:
        o.metric(f"collector_ingress_{k}_total", "counter", f"NATS ingress: {k.replace('_', ' ')}.",
                 [(lab, getattr(ing, k))])
    for k in _INGRESS_GAUGES:
        o.metric(f"collector_ingress_{k}", "gauge", f"NATS ingress: {k.replace('_', ' ')}.", [(lab, getattr(ing, k))])
    if ing.consumer_info_age_s is not None:
        o.metric("collector_ingress_consumer_info_age_seconds", "gauge",
                 "NATS ingress: age of num_pending / num_ack_pending (JetStream consumer info).",
                 [(lab, ing.consumer_info_age_s)])


def render(backend: Backend, server: HttpServer | None) -> str:
    """The exposition text."""
    m = backend.metrics()
    st = backend.stats()
    o = _Out()
    c = "counter"
    o.metric("collector_events_received_total", c, "Events accepted into the engine.", [({}, m.events_received)])
    o.metric("collector_events_processed_total", c, "Events handled and stored (or deduplicated).", [({}, m.events_processed)])
    o.metric("collector_events_failed_total", c, "Events rejected (invalid, lost, pipeline error).", [({}, m.events_failed)])
    o.metric("collector_duplicates_dropped_total", c, "Events dropped as repeated ids.", [({}, m.duplicates_dropped)])
    o.metric("collector_deadlettered_total", c, "Records written to the dead-letter sink.", [({}, m.deadlettered)])
    o.metric("collector_redelivered_chunks_total", c, "Chunks sent again after a worker died.", [({}, m.redelivered_chunks)])
    o.metric("collector_worker_restarts_total", c, "Workers replaced.", [({}, m.worker_restarts)])
    o.metric("collector_lookup_calls_total", c, "Enrichment calls made.", [({}, st.lookup_calls)])
    o.metric("collector_lookup_cache_hits_total", c, "Enrichment cache hits.", [({}, st.cache_hits)])
    o.metric("collector_lookup_failures_total", c, "Enrichment calls that failed after retries.", [({}, st.lookup_failures)])
    o.metric("collector_queue_depth", "gauge", "Events accepted and not yet done.", [({}, m.current_queue_depth)])
    o.metric("collector_active_workers", "gauge", "Live worker processes.", [({}, m.active_workers)])
    o.metric("collector_events_per_second", "gauge", "Events handled per second over the last 5 s.", [({}, m.events_per_second)])
    o.metric("collector_uptime_seconds", "gauge", "Seconds since the daemon started.", [({}, m.uptime_seconds)])
    _integrity(o, m.integrity or {})
    _pairs(o, m.pairs or {})
    _aggregates(o, backend.aggregate_series())
    _sources(o, m.enrichment or {})
    ws = st.workers
    o.metric("collector_worker_events_total", c, "Events handled per worker.", [({"worker": w.index}, w.events) for w in ws])
    o.metric("collector_worker_failed_total", c, "Events rejected per worker.", [({"worker": w.index}, w.failed) for w in ws])
    o.metric("collector_worker_up", "gauge", "1 while the worker is alive.", [({"worker": w.index}, int(w.alive)) for w in ws])
    o.metric("collector_worker_heartbeat_age_seconds", "gauge", "Age of the worker's last heartbeat.",
             [({"worker": w.index}, round(w.heartbeat_age, 4)) for w in ws])
    o.metric("collector_worker_events_per_second", "gauge", "Events per second per worker (last 5 s).",
             [({"worker": w.index}, w.processed_per_sec) for w in ws])
    o.metric("collector_worker_inflight_events", "gauge", "Events inside each worker.", [({"worker": w.index}, w.inflight) for w in ws])
    names = backend.sink_names()
    for field, help_ in (("rows", "Rows committed per sink."), ("batches", "Batches committed per sink."),
                         ("errors", "Failed write attempts per sink."), ("retries", "Retries scheduled per sink.")):
        o.metric(f"collector_sink_{field}_total", c, help_,
                 [({"sink": names.get(s.index, str(s.index))}, getattr(s, field)) for s in st.sinks])
    o.metric("collector_sink_last_commit_seconds", "gauge", "Duration of the latest commit per sink.",
             [({"sink": names.get(s.index, str(s.index))}, s.last_commit_ms / 1000.0) for s in st.sinks])
    chunk_buckets = [(b / 1000.0, n) for b, n in st.latency_buckets_ms]
    chunk_sum = st.avg_latency_ms / 1000.0 * sum(n for _, n in st.latency_buckets_ms)
    series = [({"stage": "worker_chunk"}, chunk_buckets, chunk_sum)]
    if server is not None:
        series.append(({"stage": "http_request"}, list(zip(server.bounds, server.lat_buckets, strict=True)), server.lat_sum))
    o.histogram("collector_stage_latency_seconds",
                "Latency per stage: worker_chunk = decode to sink commit of one chunk; http_request = request to answer.",
                series)
    if m.ingress is not None:
        _ingress(o, m.ingress)
    if server is not None:
        o.metric("collector_http_responses_total", c, "HTTP answers by status code.",
                 [({"code": k}, v) for k, v in sorted(server.by_status.items())])
        o.metric("collector_http_connections", "gauge", "Open HTTP connections.", [({}, len(server.connections))])
        o.metric("collector_http_slow_clients_total", c, "Connections cut for missing a header/body deadline.",
                 [({}, server.slow_clients)])
    return "\n".join(o.lines) + "\n"
