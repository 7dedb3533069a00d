"""HTTP ingest, metrics and health: an asyncio protocol on httptools, in the supervisor.

::

    socket ─► protocol.HttpProtocol (httptools, C parser)
               │ header deadline, body deadline, keep-alive idle deadline
               │ app.precheck: 413 from Content-Length before the body, 415, 401 before the body
               ▼
              app.App.route(request)
               ├─ POST /events, /events/batch ─► routes.ingest: bodies (inflate, depth check)
               │     ─► envelope: list[Raw] (C) ─► id injected where absent
               │     ─► Backend.submit (the daemon's Coalescer: one operation per loop turn)
               │     ─► Collector (workers validate, dedup, enrich, store) ─► per-item results
               ├─ GET /metrics (JSON, or promtext)  ◄── Backend.metrics/stats: shared-memory stats
               ├─ GET /health, /ready               ◄── Backend.health/ready
               ├─ GET /ingress (the NATS [source])  ◄── Backend.ingress
               └─ GET /openapi.json (openapi: built from the same Structs, schemas.py)

One module per job: ``protocol`` (transport, deadlines, pipelining, drain, counters),
``app`` (route table, precheck), ``bodies`` (Content-Encoding, JSON depth),
``schemas`` (the API's Structs), ``routes/`` (handlers), ``openapi``, ``promtext``.
The package imports nothing of the daemon, the engine or the workers: it calls the
daemon through :class:`Backend`, a Protocol defined here (``backend.py``).
"""

from __future__ import annotations

from .app import App
from .backend import Backend
from .protocol import HttpServer

__all__ = ["App", "Backend", "HttpServer"]
