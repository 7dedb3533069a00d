"""What the HTTP server sees of the daemon: :class:`Views` implements
:class:`collector.http.Backend` over the engine now serving and the ones a reload retired.

::

    routes ─► pipeline(), submit() ──────────────► the serving (Collector, Coalescer)
           ─► metrics() = base (retired engines' last counters)
                        + Σ retiring engines (draining after a reload)
                        + the serving engine + items refused before the engine
             .integrity = the serving engine's integrity() (a reload starts it afresh)
           ─► health() ─► workers alive, heartbeats fresh, not stopping
           ─► ready() ──► health + probe_sinks(): each sink's own probe (at most once a
                          second, from sinks built here, never opened for writing)
                          and what the workers last saw of it (from the stats)
                          + the ingress connected (with a [source])
           ─► ingress() ─► the NATS [source]: its counters (summed over the ingresses a
                          reload restarted), state, lag copy and last error

The daemon swaps engines with :meth:`Views.swap` and :meth:`Views.retire`; the
figures never dip during a reload, and a request reads the engine serving when it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from ..http.schemas import Health, IngressStatus, Metrics, ProcessorMetrics, ProcessorStatus
from ..sinks import build_sinkset, sink_names
from .processor import ProcessorViews

if TYPE_CHECKING:
    from ..engine import Collector
    from ..http import HttpServer
    from ..ingress.coalescer import Coalescer, SliceResult
    from ..ingress.nats import NatsIngress
    from ..pipeline import Pipeline
    from ..sinks.sinkset import SinkSet
    from ..sources.metrics import SourceMetrics
    from ..stats import Stats

__all__ = ["COUNTERS", "INGRESS_FIGURES", "INGRESS_GAUGES", "Views"]

COUNTERS = ("events_received", "events_processed", "events_failed", "duplicates_dropped",
            "deadlettered", "redelivered_chunks", "worker_restarts")
INGRESS_FIGURES = ("fetched", "events", "acked", "nakked", "redelivered", "terminated", "deadlettered", "fetch_errors",
                   "batches_inflight", "messages_inflight", "num_pending", "num_ack_pending")
INGRESS_GAUGES = ("batches_inflight", "messages_inflight", "num_pending", "num_ack_pending")  # the rest: counters


class Views:
    """The daemon's engines as the HTTP routes see them (a :class:`collector.http.Backend`)."""

    collector: Collector  # the engine serving; set by serve() before the server starts
    coalescer: Coalescer

    def __init__(self) -> None:
        self.server: HttpServer | None = None  # its status counts go into /metrics
        self.stopping = False
        self.rejected = 0  # items the server refused before the engine (not JSON objects)
        self.started = time.monotonic()
        self.base = dict.fromkeys(COUNTERS, 0)  # counters of collectors retired by reloads
        self.retiring: list[Collector] = []  # collectors a reload is draining
        self._probes: SinkSet | None = None  # sinks built in the supervisor for /ready's probes
        self._probe_cache: tuple[float, dict[str, bool]] | None = None
        self._sink_prev: dict[str, tuple[int, int]] = {}  # name → (batches, errors) at the last /ready
        self._names: dict[int, str] = {}
        self.consumer: NatsIngress | None = None  # the daemon's [source] ingress running, if any
        self.ingress_base: dict[str, int] = {}  # counters of ingresses stopped by reloads
        self.processor = ProcessorViews(self)  # /processor/status, /metrics/processor
        self._last_ingress: NatsIngress | None = None  # the latest one, running or stopped: its stream, its error

    # ------------------------------------------------------------------ the engine serving
    def serve(self, collector: Collector, coalescer: Coalescer) -> None:
        """Route requests to this engine from now on."""
        self.collector, self.coalescer = collector, coalescer
        self._names = dict(enumerate(sink_names(collector.pipeline)))

    def swap(self, collector: Collector, coalescer: Coalescer) -> tuple[Collector, Coalescer]:
        """Serve ``collector`` from now on; the old pair, whose counters /metrics keeps
        summing until :meth:`retire`."""
        old = self.collector, self.coalescer
        self.retiring.append(old[0])
        self.serve(collector, coalescer)
        return old

    def retire(self, collector: Collector) -> None:
        """A swapped-out engine is drained: keep its last counters, stop reading it."""
        last = self._metrics_of(collector)
        for k in COUNTERS:
            self.base[k] += last[k]
        self.retiring.remove(collector)

    def retire_ingress(self, ing: NatsIngress) -> None:
        """A stopped ingress: keep its counters (not its gauges) for ``/metrics``."""
        for k, v in ing.stats_dict().items():
            if k not in INGRESS_GAUGES:
                self.ingress_base[k] = self.ingress_base.get(k, 0) + v
        self._last_ingress = ing
        if self.consumer is ing:
            self.consumer = None

    def ingress_metrics(self) -> dict[str, int] | None:
        """The ingress counters summed over the ingresses this daemon ran, the running one's gauges."""
        if self.consumer is None and not self.ingress_base:
            return None
        cur = self.consumer.stats_dict() if self.consumer is not None else {}
        out = dict.fromkeys(cur, 0) | self.ingress_base
        for k, v in cur.items():
            out[k] = v if k in INGRESS_GAUGES else out[k] + v
        return out

    def ingress(self) -> IngressStatus | None:
        """The NATS ``[source]``: counters over every ingress this daemon ran, the running one's
        gauges and state (read from memory: the lag is the background watch's copy)."""
        figures = self.ingress_metrics()
        ing = self.consumer or self._last_ingress
        if figures is None or ing is None:
            return None
        now = time.monotonic()
        st = ing.state
        cfg = ing.cfg
        counts = {k: figures.get(k, 0) for k in INGRESS_FIGURES}
        return IngressStatus(
            stream=cfg.stream, durable=cfg.durable, subjects=list(cfg.subjects),
            connected=self.consumer is not None and ing.connected,
            consumer_info_age_s=None if st.info_at is None else round(now - st.info_at, 3),
            last_error=st.last_error,
            last_error_age_s=None if st.last_error_at is None else round(now - st.last_error_at, 3),
            **counts,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ Backend
    def pipeline(self) -> Pipeline:
        """The pipeline of the engine now serving."""
        return self.collector.pipeline

    def submit(
        self, items: list[Any], keys: list[Any], owner: int | list[int] | None = None
    ) -> asyncio.Future[SliceResult]:
        """Events in, through the serving engine's coalescer."""
        return self.coalescer.submit(items, keys, owner)

    def owner(self) -> tuple[int, int]:
        """The worker the next operation's generated ids belong to, and the worker count."""
        return self.coalescer.owner()

    def count_rejected(self) -> None:
        """One item refused before the engine: counted as received and failed."""
        self.rejected += 1

    def aggregates(self) -> dict[str, Any]:
        """Every aggregate of the engine now serving (a reload starts them afresh)."""
        return self.collector.aggregates()

    def aggregate_series(self) -> list[Any]:
        """The aggregates' figures for the Prometheus text (engine now serving)."""
        return self.collector.aggregate_series()

    def aggregate(self, name: str, key: Any = None, **window: Any) -> Any:
        """One aggregate of the engine now serving."""
        return self.collector.aggregate(name, key, **window)

    def view(self, name: str) -> dict[str, Any]:
        """A materialized view of the engine now serving."""
        return self.collector.view(name)

    def stats(self) -> Stats:
        """The serving engine's statistics."""
        return self.collector.stats()

    def enrichment(self) -> dict[str, SourceMetrics]:
        """The serving engine's per-lookup figures (a reload starts them afresh)."""
        return self.collector.enrichment()

    def sink_names(self) -> dict[int, str]:
        """Sink index in the stats → its name."""
        return self._names

    async def processor_status(self) -> ProcessorStatus:
        """``/processor/status``: workers, sinks, sources, Redis."""
        return await self.processor.status()

    def processor_metrics(self) -> ProcessorMetrics:
        """``/metrics/processor``: seed 003's key metrics."""
        return self.processor.metrics()

    # ------------------------------------------------------------------ figures
    def _metrics_of(self, collector: Collector) -> dict[str, Any]:
        st = collector.stats()
        return {
            "events_received": st.received_events,
            "events_processed": st.total_events - st.failed_events,
            "events_failed": st.failed_events,
            "duplicates_dropped": st.duplicates_dropped,
            "deadlettered": st.deadlettered,
            "redelivered_chunks": st.redelivered_chunks,
            "worker_restarts": st.worker_restarts,
            "_stats": st,
        }

    def metrics(self) -> Metrics:
        """The ``/metrics`` JSON, summed over the engines this daemon ran."""
        cur = self._metrics_of(self.collector)
        st = cur.pop("_stats")
        tot = {k: cur[k] + self.base[k] for k in COUNTERS}
        for c in self.retiring:
            old = self._metrics_of(c)
            for k in COUNTERS:
                tot[k] += old[k]
        tot["events_received"] += self.rejected
        tot["events_failed"] += self.rejected
        srv = self.server
        http = {str(k): v for k, v in sorted(srv.by_status.items())} if srv is not None else {}
        return Metrics(
            events_received=tot["events_received"],
            events_processed=tot["events_processed"],
            events_failed=tot["events_failed"],
            average_processing_latency_ms=round(st.avg_latency_ms, 3),
            current_queue_depth=st.inflight_events,
            active_workers=sum(1 for w in st.workers if w.alive),
            events_per_second=round(st.processed_per_sec, 1),
            uptime_seconds=round(time.monotonic() - self.started, 3),
            duplicates_dropped=tot["duplicates_dropped"],
            deadlettered=tot["deadlettered"],
            redelivered_chunks=tot["redelivered_chunks"],
            worker_restarts=tot["worker_restarts"],
            http_requests=http,
            workers=[{"index": w.index, "pid": w.pid, "alive": w.alive, "events": w.events, "failed": w.failed,
                      "events_per_second": round(w.processed_per_sec, 1), "inflight": w.inflight,
                      "heartbeat_age_s": round(w.heartbeat_age, 3), "avg_latency_ms": round(w.avg_latency_ms, 3)}
                     for w in st.workers],
            sinks=[{"name": self._names.get(s.index, str(s.index)), "rows": s.rows, "batches": s.batches,
                    "errors": s.errors, "retries": s.retries, "last_commit_ms": s.last_commit_ms} for s in st.sinks],
            ingress=self.ingress(),
            integrity=self.collector.integrity() or None,
            pairs=self.collector.pairs() or None,
            enrichment=self.collector.enrichment() or None,
        )

    def health(self) -> Health:
        """Liveness: workers alive and heartbeats fresh."""
        c = self.collector
        alive = sum(c.workers_alive())
        fresh = c.heartbeats_fresh()
        ok = c.running and fresh and not self.stopping
        detail = None if ok else ("stopping" if self.stopping else "a worker is down or silent")
        return Health("ok" if ok else "unhealthy", alive, c.nworkers, fresh, None, detail)

    async def ready(self) -> Health:
        """Readiness: healthy, every sink answers its probe, and the ingress (if any) is connected."""
        h = self.health()
        sinks = await self.probe_sinks()
        ing = self.ingress()
        ok = h.status == "ok" and all(sinks.values())
        detail = h.detail or (None if ok else "a sink is unreachable: " + ", ".join(k for k, v in sinks.items() if not v))
        if ing is not None and not ing.connected:
            ok = False
            detail = detail or f"the NATS ingress is not connected ({ing.last_error or 'stopped'})"
        return Health("ready" if ok else "not_ready", h.workers_alive, h.workers, h.heartbeats_fresh, sinks, detail,
                      ing)

    async def probe_sinks(self) -> dict[str, bool]:
        """Each sink's health: its own probe (``SELECT 1`` for SQL sinks, from the
        supervisor, at most once a second) and what the workers last saw.

        The workers' view is read from the stats (no message to workers): a sink whose
        error count grew since its last successful batch is reported down.
        """
        probed = await self._probe()
        st = self.collector.stats()
        prev = self._sink_prev
        out: dict[str, bool] = {}
        cur: dict[str, tuple[int, int]] = {}
        for s in st.sinks:
            name = self._names.get(s.index, str(s.index))
            p = prev.get(name)
            cur[name] = (s.batches, s.errors)
            out[name] = not (p is not None and s.errors > p[1] and s.batches == p[0]) and not (s.errors and not s.batches)
        for name in self._names.values():
            out.setdefault(name, True)
            cur.setdefault(name, (0, 0))
            out[name] = out[name] and probed.get(name, True)
        self._sink_prev = cur
        return out

    async def _probe(self) -> dict[str, bool]:
        now = time.monotonic()
        if self._probe_cache is not None and now - self._probe_cache[0] < 1.0:
            return self._probe_cache[1]
        if self._probes is None:
            p = self.collector.pipeline
            # the same sink configs, never opened for writing: only health() is called
            self._probes = build_sinkset(list(p.sinks), event_type=p.event_type, id_field=p.id_field, worker=-1)
        res: dict[str, bool] = await self._probes.health()
        self._probe_cache = (time.monotonic(), res)
        return res

    async def close_probes(self) -> None:
        """Close the probe sinks (rebuilt at the next /ready, from the engine then serving)."""
        probes, self._probes, self._probe_cache = self._probes, None, None
        await self.processor.close()
        if probes is not None:
            with contextlib.suppress(Exception):
                await probes.close()
