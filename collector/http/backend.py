"""The contract between the HTTP routes and whoever runs the engine.

::

    routes/ingest.py ── pipeline(), submit(items, keys), count_rejected(), stopping ──┐
    routes/status.py ── metrics(), health(), ready(), stats(), sink_names(), ────────┤
                        enrichment() (also GET /processor/enrichment)
                        (metrics().integrity / .pairs: the integrity and Pair stages' figures;
                        aggregate_series(): the aggregates' lines in the Prometheus text)
                    ── ingress(): the NATS [source] (GET /ingress; in /metrics, /ready)┤
    routes/aggregates.py ── aggregates(), aggregate(name, key), view(name) ───────────┤
    routes/processor.py ── processor_status(), processor_metrics() ──────────────────┤
                                                                                      ▼
                                                   Backend (the daemon's: collector.daemon.views)

The HTTP package depends only on this Protocol, never on the daemon or the engine, so
the server can be tested and reused without either; a reload swaps the engine behind
it, and each call reads the one serving at that moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from ..results import ErrorItem
    from ..sources.metrics import SourceMetrics
    from ..stages.exposition import AggregateSeries
    from ..stats import Stats
    from .schemas import Health, IngressStatus, Metrics, ProcessorMetrics, ProcessorStatus

__all__ = ["Backend", "Submitted"]


class Submitted(Protocol):
    """What became of the events of one ``submit()``: one error per event not stored
    (its ``index`` in the submitted list, ``kind``, ``path`` and ``reason``)."""

    @property
    def errors(self) -> Sequence[ErrorItem]:
        """The events that were not stored, in order."""
        ...


class Backend(Protocol):
    """Everything the routes need from the daemon."""

    @property
    def stopping(self) -> bool:
        """True once shutdown has begun: ingest answers 503 from then on."""
        ...

    def pipeline(self) -> Pipeline:
        """The pipeline of the engine now serving (its id field, shard key and event type)."""
        ...

    def submit(
        self, items: list[Any], keys: list[Any], owner: int | list[int] | None = None
    ) -> asyncio.Future[Any]:
        """Hand events (JSON objects as bytes) and their shard keys to the engine: a
        future of the result (a :class:`Submitted`) once they are stored or rejected, or of ``Overloaded`` or
        ``CollectorClosed``. A future, not a coroutine, so that a request needs no task.
        ``owner``: every key's worker (an id generated for that worker of :meth:`owner`),
        or each key's worker by the pipeline's shard function; None: the engine hashes
        the keys."""
        ...

    def owner(self) -> tuple[int, int]:
        """``(worker, workers)``: the worker whose ids the events submitted next should
        get when the server generates them (their id is their shard key), and the worker
        count; ``(0, 1)`` for no preference. See ``Coalescer.owner``."""
        ...

    def count_rejected(self) -> None:
        """Count one item the server refused before the engine (not a JSON object)."""
        ...

    def metrics(self) -> Metrics:
        """The ``/metrics`` figures."""
        ...

    def health(self) -> Health:
        """Liveness: workers alive, heartbeats fresh, not stopping."""
        ...

    async def ready(self) -> Health:
        """Readiness: healthy, every sink answers its probe, and the ingress (if any) is connected."""
        ...

    def ingress(self) -> IngressStatus | None:
        """The NATS JetStream ``[source]``'s state and counters; None when the daemon has none.

        Never waits on NATS: the consumer's lag is a copy read in the background."""
        ...

    async def processor_status(self) -> ProcessorStatus:
        """``/processor/status``: workers, sinks, sources and Redis servers, each probed (bounded)."""
        ...

    def processor_metrics(self) -> ProcessorMetrics:
        """``/metrics/processor``: seed 003's key metrics from the shared-memory statistics."""
        ...

    def stats(self) -> Stats:
        """The engine's shared-memory statistics."""
        ...

    def enrichment(self) -> dict[str, SourceMetrics]:
        """Per-lookup enrichment figures from the shared-memory stats (never waits)."""
        ...

    def sink_names(self) -> dict[int, str]:
        """Sink index in the stats → its name."""
        ...

    def aggregates(self) -> dict[str, Any]:
        """Every aggregate stage's plain values, merged over the workers."""
        ...

    def aggregate_series(self) -> list[AggregateSeries]:
        """Each aggregate's current-window figures for the Prometheus text, bounded
        by its ``max_series`` (merged partials: never waits for a worker)."""
        ...

    def aggregate(self, name: str, key: Any = None, **window: Any) -> Any:
        """One aggregate's plain values (KeyError naming the known ones)."""
        ...

    def view(self, name: str) -> dict[str, Any]:
        """A materialized view of the pipeline rendered now (KeyError when it has none)."""
        ...
