"""Seed 003's processor endpoints over the daemon's engine: ``/processor/status`` and
``/metrics/processor``.

::

    processor_status() ── health() (workers, heartbeats, stopping)
                       ── probe_sinks() (each sink's probe + what the workers saw)   ─► ProcessorStatus
                       ── each lookup's source health() (built here, never used to read)
                       ── each Redis server the pipeline uses: PING over TCP
    processor_metrics() ── metrics() totals + Stats (shared memory: filtered, enriched,
                           latency buckets, cache) + the workers' CPU time (psutil)  ─► ProcessorMetrics

Probes run at most once a second and each is bounded (2 s); nothing here messages a
worker. The probe objects are dropped by :meth:`ProcessorViews.close` (a reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ..http.schemas import (
    ComponentHealth,
    DurationBucket,
    ProcessingDuration,
    ProcessorMetrics,
    ProcessorStatus,
    WorkersHealth,
    WorkerUtilization,
)
from ..sinks.config import redact_dsn
from ..stats import LATENCY_BOUNDS_MS

if TYPE_CHECKING:
    from ..http.schemas import Health, Metrics
    from ..pipeline import Pipeline
    from ..stats import Stats

__all__ = ["Figures", "ProcessorViews", "duration", "redis_urls"]

PROBE_TIMEOUT = 2.0
PROBE_EVERY = 1.0


def redis_urls(p: Pipeline) -> list[str]:
    """Every Redis server the pipeline uses: stages' ``redis_url`` (auth, pairing with
    ``store = "redis"``), redis sources and two-level source caches."""
    urls: list[str] = []
    for st in p.stages:
        u = getattr(st, "redis_url", "")
        if isinstance(u, str) and u and getattr(st, "store", "redis") == "redis":
            urls.append(u)
    for lk in p.lookups:
        src = lk.source
        if src is None:
            continue
        cfg = getattr(src, "config", src)
        if getattr(type(cfg), "__struct_config__", None) is not None and cfg.__struct_config__.tag == "redis":
            urls.append(cfg.url)
        cache = getattr(cfg, "cache", None)
        if cache is not None and getattr(cache, "mode", "") == "two-level":
            urls.append(cache.redis_url)
    return list(dict.fromkeys(urls))


async def ping_redis(url: str) -> ComponentHealth:
    """``PING`` over a plain TCP connection: reachable when the server answers at all."""
    u = urlsplit(url)
    if u.scheme not in ("redis", ""):
        return ComponentHealth(None, "redis", f"{u.scheme}: not probed")
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 6379)
            try:
                writer.write(b"*1\r\n$4\r\nPING\r\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError) as e:
        return ComponentHealth(False, "redis", f"{type(e).__name__}: {e}")
    if line.startswith(b"+PONG"):
        return ComponentHealth(True, "redis")
    if line.startswith(b"-"):  # NOAUTH and the like: the server is there
        return ComponentHealth(True, "redis", line.decode("utf-8", "replace").strip()[:200])
    return ComponentHealth(False, "redis", f"unexpected answer {line[:50]!r}")


def duration(st: Stats) -> ProcessingDuration:
    """The chunk-latency histogram of ``st`` (cumulative) and percentiles estimated from it."""
    total = sum(c for _, c in st.latency_buckets_ms)
    buckets, run = [], 0
    for bound, c in st.latency_buckets_ms:
        run += c
        buckets.append(DurationBucket(None if bound == float("inf") else bound, run))

    def pct(q: float) -> float | None:
        if not total:
            return None
        need = q * total
        for b in buckets:
            if b.count >= need:
                return b.le_ms if b.le_ms is not None else LATENCY_BOUNDS_MS[-2]
        return None

    return ProcessingDuration(total, round(st.avg_latency_ms, 3), pct(0.5), pct(0.95), pct(0.99), buckets)


class Figures(Protocol):
    """What the endpoints read of :class:`collector.daemon.views.Views`."""

    started: float

    def health(self) -> Health: ...
    async def probe_sinks(self) -> dict[str, bool]: ...
    def stats(self) -> Stats: ...
    def pipeline(self) -> Pipeline: ...
    def metrics(self) -> Metrics: ...


class ProcessorViews:
    """The two endpoints' figures; holds the probe objects and the workers' last CPU times."""

    def __init__(self, views: Figures) -> None:
        self.views = views
        self._cpu: dict[int, tuple[float, float]] = {}  # pid → (cpu seconds, monotonic time) at the last read
        self._sources: dict[str, Any] | None = None  # lookup name → Source (health probes only)
        self._cache: tuple[float, dict[str, ComponentHealth], dict[str, ComponentHealth]] | None = None

    # ------------------------------------------------------------------ /processor/status
    async def status(self) -> ProcessorStatus:
        """Workers, sinks, sources and Redis, probed concurrently."""
        v = self.views
        h = v.health()
        sinks_t = asyncio.ensure_future(v.probe_sinks())
        sources, redis = await self._probe_outside()
        sinks = {n: ComponentHealth(ok) for n, ok in (await sinks_t).items()}
        down = [f"sink {n}" for n, c in sinks.items() if c.ok is False]
        down += [f"source {n}" for n, c in sources.items() if c.ok is False]
        down += [f"redis {n}" for n, c in redis.items() if c.ok is False]
        if h.status != "ok":
            status, detail = "unhealthy", h.detail
        elif down:
            status, detail = "degraded", "down: " + ", ".join(down)
        else:
            status, detail = "ok", None
        st = v.stats()
        return ProcessorStatus(
            status=status,
            uptime_seconds=round(time.monotonic() - v.started, 3),
            workers=WorkersHealth(h.workers_alive, h.workers, h.heartbeats_fresh, st.inflight_events),
            sinks=sinks, sources=sources, redis=redis, detail=detail,
        )

    async def _probe_outside(self) -> tuple[dict[str, ComponentHealth], dict[str, ComponentHealth]]:
        now = time.monotonic()
        if self._cache is not None and now - self._cache[0] < PROBE_EVERY:
            return self._cache[1], self._cache[2]
        p = self.views.pipeline()
        if self._sources is None:
            from ..sources import build_source

            self._sources = {}
            for lk in p.lookups:
                if lk.source is not None:
                    with contextlib.suppress(Exception):
                        self._sources[lk.name] = build_source(lk.source)
        names = [lk.name for lk in p.lookups]
        srcs = self._sources
        urls = redis_urls(p)
        res = await asyncio.gather(
            *(self._source_health(srcs.get(n)) for n in names), *(ping_redis(u) for u in urls)
        )
        sources = dict(zip(names, res[: len(names)], strict=True))
        redis = {redact_dsn(u): r for u, r in zip(urls, res[len(names):], strict=True)}
        self._cache = (time.monotonic(), sources, redis)
        return sources, redis

    @staticmethod
    async def _source_health(src: Any) -> ComponentHealth:
        if src is None:  # a lookup through the pack's client object: nothing to probe
            return ComponentHealth(None, "client", "a client method: not probed")
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                h = await src.health()
        except Exception as e:
            return ComponentHealth(False, getattr(src, "kind", None), f"{type(e).__name__}: {e}"[:300])
        ok = h.get("ok") if isinstance(h, dict) else bool(h)
        detail = None if ok else str(h.get("error") or h.get("detail") or h)[:300] if isinstance(h, dict) else None
        return ComponentHealth(None if ok is None else bool(ok), getattr(src, "kind", None), detail)

    async def close(self) -> None:
        """Close the probe sources (rebuilt at the next call, from the engine then serving)."""
        srcs, self._sources, self._cache = self._sources, None, None
        for s in (srcs or {}).values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.close(), 5)

    # ------------------------------------------------------------------ /metrics/processor
    def metrics(self) -> ProcessorMetrics:
        """Seed 003's key metrics."""
        v = self.views
        m = v.metrics()
        st = v.stats()
        asked = st.cache_hits + st.lookup_calls
        workers = [self._utilization(w.index, w.pid, w.alive, w.events, w.inflight) for w in st.workers]
        pids = {w.pid for w in st.workers}
        for gone in [p for p in self._cpu if p not in pids]:  # replaced workers
            del self._cpu[gone]
        live = [w.utilization_percent for w in workers if w.alive]
        return ProcessorMetrics(
            events_processed_total=m.events_processed,
            events_enriched_total=st.enriched_events,
            events_filtered_total=st.filtered_events,
            events_deduplicated_total=m.duplicates_dropped,
            events_failed_total=m.events_failed,
            events_deadlettered_total=m.deadlettered,
            processing_duration=duration(st),
            enrichment_cache_hit_ratio=round(st.cache_hits / asked, 4) if asked else None,
            enrichment={"lookup_calls": st.lookup_calls, "cache_hits": st.cache_hits,
                        "coalesced": st.coalesced_calls, "lookup_failures": st.lookup_failures},
            worker_utilization_percent=round(sum(live) / len(live), 1) if live else 0.0,
            workers=workers,
        )

    def _utilization(self, index: int, pid: int, alive: bool, events: int, inflight: int) -> WorkerUtilization:
        pct = 0.0
        if alive and pid > 0:
            import psutil

            try:
                proc = psutil.Process(pid)
                t = proc.cpu_times()
                cpu, now = t.user + t.system, time.monotonic()
                prev = self._cpu.get(pid)
                if prev is None:  # first read: since the process started
                    prev = (0.0, now - max(time.time() - proc.create_time(), 1e-3))
                span = now - prev[1]
                pct = 100.0 * (cpu - prev[0]) / span if span > 0 else 0.0
                self._cpu[pid] = (cpu, now)
            except (psutil.Error, OSError):
                pct = 0.0
        return WorkerUtilization(index, pid, alive, round(max(pct, 0.0), 1), events, inflight)
