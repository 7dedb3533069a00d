"""The application: the route table, and what is refused before a body is read.

::

    HttpProtocol ── precheck(method, url, headers) ─► 401 token, 413 Content-Length,
                                                      415 Content-Type / Content-Encoding
                 ── route(request) ─► routes.ingest.IngestRoutes  POST /events, /events/batch
                                      routes.status.StatusRoutes  GET /metrics, /metrics/prometheus,
                                                                  /health, /ready, /ingress, /openapi.json
                                      routes.processor.ProcessorRoutes GET /processor/status,
                                                                  /metrics/processor
                                      405 with Allow, or 404
    the routes ─► Backend (backend.py), which the daemon implements

``configure()`` applies the options a reload may change (limits, tokens) to the app,
its routes and the server; requests already running finish under the old ones.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from .backend import Backend
from .bodies import ENCODINGS
from .protocol import Handler, HttpServer, Request, Response, error
from .routes.aggregates import AggregateRoutes
from .routes.ingest import IngestRoutes
from .routes.processor import ProcessorRoutes
from .routes.status import StatusRoutes
from .schemas import ErrorResponse, json_encoder

if TYPE_CHECKING:
    from ..config import DaemonConfig, ServerConfig

__all__ = ["App", "Backend"]

class App:
    """Routes and handlers over a :class:`Backend`: a reload swaps the engine behind
    it, and requests already running finish on the old one."""

    def __init__(self, backend: Backend, config: DaemonConfig) -> None:
        self.backend = backend
        self.server: HttpServer | None = None
        self.tokens: frozenset[bytes] = frozenset()
        self.cfg: ServerConfig = config.server
        self.ingest = IngestRoutes(backend, config.server)
        self.status = StatusRoutes(backend, config.server)
        self.aggregates = AggregateRoutes(backend)
        self.processor = ProcessorRoutes(backend)
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/events"): self.ingest.post_event,
            ("POST", "/events/batch"): self.ingest.post_batch,
            ("GET", "/metrics"): self.status.get_metrics,
            ("GET", "/metrics/prometheus"): self.status.get_prometheus,
            ("GET", "/health"): self.status.get_health,
            ("GET", "/ready"): self.status.get_ready,
            ("GET", "/ingress"): self.status.get_ingress,
            ("GET", "/openapi.json"): self.status.get_openapi,
            ("GET", "/aggregates"): self.aggregates.get_aggregates,
            ("GET", "/processor/aggregation"): self.aggregates.get_aggregation,
            ("GET", "/processor/filters"): self.aggregates.get_filters,
            ("GET", "/processor/enrichment"): self.status.get_enrichment,
            ("GET", "/processor/status"): self.processor.get_status,
            ("GET", "/metrics/processor"): self.processor.get_metrics,
            ("GET", "/materialized"): self.aggregates.get_materialized,
        }
        self._paths = {p for _, p in self.routes}
        self.configure(config)

    def attach(self, server: HttpServer) -> None:
        """The server that serves this app: reloads set its limits, and its counters
        go into the Prometheus text."""
        self.server = server
        self.status.server = server

    def configure(self, config: DaemonConfig) -> None:
        """Apply the server options that can change on reload (limits, tokens)."""
        self.cfg = config.server
        self.ingest.cfg = self.status.cfg = config.server
        self.tokens = frozenset(t.encode() for t in config.tokens())
        if self.server is not None:
            self.server.cfg = config.server


    def route(self, req: Request) -> Handler:
        """The handler for ``req``: its route's, or one that answers 405 (with ``Allow``) or 404."""
        h = self.routes.get((req.method, req.path))
        if h is not None:
            return h
        if req.path in self._paths:
            allow = ", ".join(sorted(m for m, p in self.routes if p == req.path))
            return lambda r: Response(405, json_encoder.encode(ErrorResponse("method_not_allowed", f"{r.method} is not allowed on {r.path}; use {allow}")), headers=[("Allow", allow)])
        return lambda r: error(404, "not_found", f"no route {r.method} {r.path}; see GET /openapi.json")

    def precheck(self, method: str, url: bytes, headers: dict[str, str]) -> Response | None:
        """Refuse before the body is read: size (Content-Length), media type, token."""
        path = url.split(b"?", 1)[0]
        if method != "POST" or path not in (b"/events", b"/events/batch"):
            return None
        if self.tokens:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            ok = False
            if scheme.lower() == "bearer" and token:
                t = token.strip().encode()
                for good in self.tokens:  # compare with every token: timing says nothing
                    ok |= hmac.compare_digest(t, good)
            if not ok:
                r = error(401, "unauthorized", "send `Authorization: Bearer <token>` with a configured token")
                r.headers.append(("WWW-Authenticate", 'Bearer realm="collector"'))
                return r
        cl = headers.get("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                return error(400, "bad_request", f"Content-Length {cl!r} is not a number")
            if n > self.cfg.max_body_bytes:
                return error(413, "body_too_large",
                             f"the body has {n} bytes, more than max_body_bytes={self.cfg.max_body_bytes}; split it")
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return error(415, "unsupported_media_type",
                         f"Content-Type must be application/json (got {ctype or 'none'!r})")
        enc = headers.get("content-encoding", "").strip().lower()
        if enc not in ENCODINGS:
            r = error(415, "unsupported_encoding",
                      f"Content-Encoding {enc!r} is not supported; send gzip, deflate or an uncompressed body")
            r.headers.append(("Accept-Encoding", "gzip, deflate"))  # RFC 9110 15.5.16
            return r
        return None
