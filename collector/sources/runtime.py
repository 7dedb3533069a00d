"""Enrichment inside a worker: caches, single-flight, batching, retries, breaker.

::

    chunk ─► pass 1 (inline, per event): cache hit → set field │ miss → group by key
          ─► pass 2 (per DISTINCT missing key, all lookups at once):
                 method lookups (LookupRuntime): in flight already? join it : call the
                     client (timeout, retries with full jitter, bounded concurrency;
                     blocking clients on a thread pool)
                 source lookups (SourceRuntime): join calls in flight; the new keys go
                     out as batched get_many calls (shared cache first, breaker, retries)
          ─► pass 3: fill the missed events from the answers (failures keep the default,
                 or get a stale value)

Where each part lives: pass 1 is :func:`~.fill.compile_fill`; the method lookups are
:mod:`.lookup`; the source lookups :mod:`.source_runtime`, whose calls, cache levels,
breaker and stale fallback are :mod:`.fetch`. This module holds the :class:`Enricher`
that runs the passes, and :func:`build_enricher`; it re-exports the runtimes (the
import path of ``collector.enrich``, the tests and the benchmarks).

No asyncio Task is created per event: a hit costs a dict lookup in a loop specialised
for the pipeline's field names, and only distinct missing keys become calls (a source
lookup makes one task per batched call).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError
from ..pipeline import Lookup, event_fields, event_type_name
from ..protocol import LookupSummary
from .cache import MISS
from .client import bind_method
from .fill import compile_fill
from .lookup import FAILED, LookupRuntime
from .source_runtime import SourceRuntime

__all__ = ["Enricher", "LookupRuntime", "SourceRuntime", "build_enricher", "compile_fill"]

_MISS = MISS


class Enricher:
    """All lookups of a pipeline inside one worker."""

    def __init__(self, lookups: list[LookupRuntime | SourceRuntime]) -> None:
        self.lookups = lookups

    async def enrich(self, events: list[Any]) -> dict[str, LookupSummary]:
        """Fill every lookup's target field on ``events``; returns per-lookup figures."""
        summaries: dict[str, LookupSummary] = {}
        if not self.lookups or not events:
            return summaries
        now = time.monotonic()
        pending: list[tuple[Any, LookupSummary, dict[Any, list[Any]]]] = []
        sources: list[tuple[SourceRuntime, LookupSummary]] = []
        for lk in self.lookups:
            summ = LookupSummary(latencies=[])
            summaries[lk.spec.name] = summ
            misses: dict[Any, list[Any]] = {}
            if isinstance(lk, SourceRuntime):
                lk.prepare(lk.clock())
                summ.hits, summ.failures = lk.fill(events, lk.get, _MISS, misses)
                sources.append((lk, summ))
            else:
                if lk.caching:
                    lk.sweep(now)
                summ.hits = lk.fill(events, lk.cache.values.get, _MISS, misses)
            if misses:
                pending.append((lk, summ, misses))
        if pending:
            await self._resolve(pending)
        for slk, summ in sources:
            slk.report(summ)
        return summaries

    async def _resolve(self, pending: list[tuple[Any, LookupSummary, dict[Any, list[Any]]]]) -> None:
        # every distinct missing key of every lookup, concurrently: a batch costs one
        # round of the slowest call, not one per event or per lookup
        calls: list[Any] = []
        owners: list[tuple[LookupRuntime, LookupSummary, Any, list[Any]] | None] = []
        for lk, summ, misses in pending:
            if type(lk) is SourceRuntime:
                calls.append(lk.resolve(misses, summ))
                owners.append(None)
                continue
            for k, evs in misses.items():
                summ.misses += len(evs)
                try:
                    fut = lk.flights.get(k)
                except TypeError:  # an unhashable key cannot be looked up
                    summ.failures += len(evs)
                    continue
                if fut is not None:
                    summ.coalesced += len(evs)
                    calls.append(fut)
                else:
                    calls.append(lk.lead(k, summ))
                owners.append((lk, summ, k, evs))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for owner, v in zip(owners, results, strict=True):
            if owner is None:  # a source lookup filled its own events
                if isinstance(v, BaseException):
                    raise v
                continue
            lk, summ, _k, evs = owner
            if v is FAILED or isinstance(v, BaseException):
                summ.failures += len(evs)
                continue
            target = lk.spec.target
            for e in evs:
                setattr(e, target, v)

    async def health(self) -> list[dict[str, Any]]:
        """One entry per source lookup (see :meth:`SourceRuntime.health`)."""
        return [await lk.health() for lk in self.lookups if isinstance(lk, SourceRuntime)]

    async def close(self) -> None:
        """Close every lookup's source connections."""
        for lk in self.lookups:
            await lk.close()


def build_enricher(
    lookups: tuple[Lookup, ...], client: Any, executor: ThreadPoolExecutor, event_type: Any = None
) -> Enricher:
    """Bind each lookup to its source or its client method; errors name the lookup."""
    from . import build_source

    rts: list[LookupRuntime | SourceRuntime] = []
    fields = set(event_fields(event_type)) if event_type is not None else set()
    for spec in lookups:
        for f in spec.key_fields:
            if fields and f not in fields:
                raise ConfigError(
                    f"lookup {spec.name!r}: key_fields names field {f!r}, which "
                    f"{event_type_name(event_type)} does not have (fields: {sorted(fields)})"
                )
        if spec.source is not None:
            rts.append(SourceRuntime(spec, build_source(spec.source)))
            continue
        if client is None:
            raise ConfigError(f"lookup {spec.name!r} calls method {spec.method!r}, but the pipeline has no client")
        rts.append(LookupRuntime(spec, bind_method(client, spec.method, spec.name), executor))
    return Enricher(rts)
