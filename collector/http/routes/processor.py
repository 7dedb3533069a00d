"""``GET /processor/status`` and ``GET /metrics/processor`` (seed 003's processor endpoints).

::

    GET /processor/status ─── await backend.processor_status() ─► 200 (ok, degraded) or 503 (unhealthy)
    GET /metrics/processor ── backend.processor_metrics() ─► 200 (shared-memory stats; no worker is asked)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol import Request, Response
from ..schemas import json_encoder

if TYPE_CHECKING:
    from ..backend import Backend

__all__ = ["ProcessorRoutes"]


class ProcessorRoutes:
    """The processor handlers."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def get_status(self, req: Request) -> Response:
        """Health of workers, sinks, sources and Redis; 503 when unhealthy."""
        s = await self.backend.processor_status()
        return Response(503 if s.status == "unhealthy" else 200, json_encoder.encode(s))

    def get_metrics(self, req: Request) -> Response:
        """Processed, enriched, filtered, deduplicated totals; durations; cache; utilisation."""
        return Response(200, json_encoder.encode(self.backend.processor_metrics()))
