"""``GET /metrics``, ``/metrics/prometheus``, ``/health``, ``/ready`` and ``/openapi.json``.

::

    GET /metrics ──────────── backend.metrics() ─► JSON (Prometheus text on Accept: text/plain)
    GET /metrics/prometheus ─ backend.stats() + server counters ─► promtext.render
    GET /health, /ready ───── backend.health(), await backend.ready() ─► 200 or 503
    GET /ingress ──────────── backend.ingress() ─► the NATS [source]'s state (404 without one)
    GET /openapi.json ─────── openapi.document(cfg, pipeline.event_type), cached per (pipeline, cfg)
    GET /processor/enrichment ─ backend.enrichment() ─► per-lookup figures and success rates

Engine figures come from the shared-memory stats (no message to any worker), so these
never wait on the engine; only ``/ready`` awaits, for its sink probes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...stats import LOOKUP_LAT_BOUNDS_MS
from ..openapi import document
from ..promtext import render
from ..protocol import HttpServer, Request, Response, error
from ..schemas import EnrichmentStats, json_encoder

if TYPE_CHECKING:
    from ...config import ServerConfig
    from ...pipeline import Pipeline
    from ..backend import Backend

__all__ = ["StatusRoutes"]

class StatusRoutes:
    """The status handlers. ``cfg`` and ``server`` are set by :class:`App`."""

    def __init__(self, backend: Backend, cfg: ServerConfig) -> None:
        self.backend = backend
        self.cfg = cfg
        self.server: HttpServer | None = None  # its counters go into the Prometheus text
        self._openapi: tuple[Pipeline, ServerConfig, bytes] | None = None  # (pipeline, server config, document)

    def get_metrics(self, req: Request) -> Response:
        """JSON unless the client asks for Prometheus text (``Accept: text/plain``/OpenMetrics)."""
        accept = req.headers.get("accept", "")
        if "text/plain" in accept or "openmetrics" in accept:
            return self.get_prometheus(req)
        return Response(200, json_encoder.encode(self.backend.metrics()))

    def get_prometheus(self, req: Request) -> Response:
        """Prometheus text exposition 0.0.4."""
        return Response(200, render(self.backend, self.server).encode(), content_type="text/plain; version=0.0.4; charset=utf-8")

    def get_enrichment(self, req: Request) -> Response:
        """Seed 003's enrichment statistics: per lookup, success rate, counters, breaker, latencies."""
        src = self.backend.enrichment()
        events = sum(s.events for s in src.values())
        failures = sum(s.failures for s in src.values())
        doc = EnrichmentStats(
            events=events,
            failures=failures,
            success_rate=round(1.0 - failures / events, 6) if events else None,
            latency_bounds_ms=[float(b) for b in LOOKUP_LAT_BOUNDS_MS[:-1]],
            sources=src,
        )
        return Response(200, json_encoder.encode(doc))

    def get_health(self, req: Request) -> Response:
        """Liveness: the supervisor answers and its workers are alive with fresh heartbeats."""
        h = self.backend.health()
        return Response(200 if h.status == "ok" else 503, json_encoder.encode(h))

    async def get_ready(self, req: Request) -> Response:
        """Readiness: workers up and every sink reachable."""
        h = await self.backend.ready()
        return Response(200 if h.status == "ready" else 503, json_encoder.encode(h))

    def get_ingress(self, req: Request) -> Response:
        """The NATS JetStream ingress: connected, stream, durable, counters, lag, last error."""
        ing = self.backend.ingress()
        if ing is None:
            return error(404, "no_ingress", "this daemon has no [source] (collector serve --source nats://HOST:PORT)")
        return Response(200, json_encoder.encode(ing))

    def get_openapi(self, req: Request) -> Response:
        """The OpenAPI 3.1 document, generated from the API Structs and the pipeline's event."""
        p = self.backend.pipeline()
        if self._openapi is None or self._openapi[0] is not p or self._openapi[1] is not self.cfg:
            self._openapi = (p, self.cfg, json_encoder.encode(document(self.cfg, p.event_type)))
        return Response(200, self._openapi[2])
