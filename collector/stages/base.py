"""The stage contract: a description in ``Pipeline.stages``, built once per worker.

::

    Stage (frozen description, picklable) ──build()──► runtime in each worker
    runtime(events) ─► drops [ErrorRecord(pos, path, reason, kind)], or a coroutine of them
    runtime.settle(events, ok, failed)  optional: the chunk's fate after the sinks (dedup, gaps; may
                                 return an awaitable, awaited before the ack: a shared store);
                                 ``failed``: the events a sink dead-lettered instead
    runtime.snapshot() -> bytes  optional: partial state the supervisor merges (aggregates, gaps,
                                 dedup with count_by; a description may say `stateful = False`);
                                 the description then has merge(partials) and read(result, key)
    runtime.drain() -> list      optional: an emitter; records it made (Pair), committed to the
                                 sinks with the chunk's events (not positions of the chunk)
    runtime.settle_records(records, ok, dead)  optional, an emitter's: the fate of what its
                                 drain() gave, after their commit (Order acks the chunks then)
    runtime.take_order() -> list optional: the chunk's new order after the call (Order: new
                                 position → old), the worker permutes the events
    drops of kind "held"         off the chunk, no answer of their own: the stage commits them
                                 later through drain() (Order's buffer)
    runtime.flush()              optional, an emitter's: release all it holds (the drain began)
    runtime.redelivered(events)  optional: called instead of runtime(events) for a chunk
                                 delivered again after a worker died (sent alone: Order does
                                 not hold it)
    runtime.bind(pipeline)       optional: called once built (Order reads the pipeline's key)
    runtime.expire(now)          optional: called every tick (no traffic needed; the description's
                                 ``tick`` seconds, else 1 s); may return an awaitable
    runtime.aclose()             optional: awaited at the worker's drain (clients, pools)

Stages run inline on the worker loop, in pipeline order (no Task per event). Keyed state
lives in the worker that owns the key. ``Enrich()`` marks where enrichment runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..protocol import ErrorRecord

__all__ = ["Enrich", "Stage"]


class Stage:
    """Base class: ``build()`` returns the running form, built once in each worker."""

    name = "stage"

    def build(self) -> Callable[[list[Any]], list[ErrorRecord]]:
        """The function the worker calls with each chunk's events."""
        raise NotImplementedError


@dataclass(frozen=True)
class Enrich(Stage):
    """Where the pipeline's lookups run among its stages.

    Without it, enrichment runs after every stage (dedup and filters first, so dropped
    events cost no lookups); put it before stages that read enriched fields (a
    description, an aggregate by region).
    """

    name: str = "enrich"
    is_enrich: bool = True

    def build(self) -> Callable[[list[Any]], list[ErrorRecord]]:
        """Not built: the worker runs its enricher at this position."""
        raise TypeError("Enrich marks a position; the worker runs its lookups there")
