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
          ─► pass 4 (:mod:`.policy`), the events of keys not found or failed (no stale
                 value): each step's failure policy keeps them (counted; a log line each
                 with ``log``), dead-letters them (handed to the runner) or holds them
                 (asked again, bounded by ``hold_for``)

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
from operator import attrgetter
from typing import Any

from ..errors import ConfigError
from ..pipeline import Lookup, event_fields, event_type_name
from ..protocol import LookupSummary
from .cache import ERROR, MISS, NOT_FOUND
from .client import bind_method
from .fill import compile_fill
from .lookup import FAILED, LookupRuntime
from .policy import Dead, Gone
from .source_runtime import SourceRuntime

__all__ = ["Enricher", "LookupRuntime", "SourceRuntime", "build_enricher", "compile_fill"]

_MISS = MISS


class Enricher:
    """All lookups of a pipeline inside one worker."""

    def __init__(self, lookups: list[LookupRuntime | SourceRuntime], id_field: str | None = None) -> None:
        self.lookups = lookups
        if id_field:
            for lk in lookups:  # log lines of the failure policies name the event
                lk.policy.event_id = attrgetter(id_field)

    async def enrich(self, events: list[Any], dead: list[Dead] | None = None) -> dict[str, LookupSummary]:
        """Fill every lookup's target field on ``events``; returns per-lookup figures.

        Events a step's failure policy dead-letters are appended to ``dead`` as
        ``(event, stage, path, reason)`` (the runner drops them from the chunk and writes
        them to the dead-letter sink); held events are resolved before this returns.
        """
        summaries: dict[str, LookupSummary] = {}
        if not self.lookups or not events:
            return summaries
        now = time.monotonic()
        pending: list[tuple[Any, LookupSummary, dict[Any, list[Any]], dict[Any, Gone]]] = []
        failing: list[tuple[Any, LookupSummary, dict[Any, Gone]]] = []
        sources: list[tuple[SourceRuntime, LookupSummary]] = []
        for lk in self.lookups:
            summ = LookupSummary(latencies=[])
            summaries[lk.spec.name] = summ
            misses: dict[Any, list[Any]] = {}
            gone: dict[Any, Gone] = {}
            if isinstance(lk, SourceRuntime):
                lk.prepare(lk.clock())
                if lk.collects:
                    nf: dict[Any, list[Any]] = {}
                    err: dict[Any, list[Any]] = {}
                    summ.hits, summ.failures = lk.fill(events, lk.get, _MISS, misses, nf, err)
                    for k, evs in nf.items():
                        gone[k] = Gone(NOT_FOUND, "not found", evs, "")
                    for k, evs in err.items():
                        gone[k] = Gone(ERROR, "failed within error_ttl (cached)", evs, "failures")
                else:  # kept at their defaults, as triage would keep them
                    summ.hits, summ.failures, skipped = lk.fill(events, lk.get, _MISS, misses)
                    summ.kept += skipped + summ.failures
                sources.append((lk, summ))
            else:
                if lk.caching:
                    lk.sweep(now)
                summ.hits = lk.fill(events, lk.cache.values.get, _MISS, misses)
            if misses:
                pending.append((lk, summ, misses, gone))
            failing.append((lk, summ, gone))
        if pending:
            await self._resolve(pending)
        failing = [f for f in failing if f[2]]  # the keys not found or failed, per step
        if failing:
            await self._apply_policies(failing, dead if dead is not None else [])
        for slk, summ in sources:
            slk.report(summ)
        return summaries

    async def _apply_policies(self, failing: list[tuple[Any, LookupSummary, dict[Any, Gone]]], dead: list[Dead]) -> None:
        # keep and dead-letter at once; then every step's holds concurrently (the chunk
        # waits for the longest hold_for, not their sum), skipping events already
        # dead-lettered by another step
        holds: list[tuple[Any, LookupSummary, dict[Any, Gone]]] = []
        for lk, summ, gone in failing:
            held = lk.policy.triage(gone, summ, dead)
            if held:
                holds.append((lk, summ, held))
        if not holds:
            return
        skip = {id(d[0]) for d in dead}
        runs = [lk.policy.hold(lk, held, summ, dead, skip) for lk, summ, held in holds]
        if len(runs) == 1:
            await runs[0]
        else:
            await asyncio.gather(*runs)

    async def _resolve(self, pending: list[tuple[Any, LookupSummary, dict[Any, list[Any]], dict[Any, Gone]]]) -> None:
        # every distinct missing key of every lookup, concurrently: a batch costs one
        # round of the slowest call, not one per event or per lookup
        calls: list[Any] = []
        owners: list[tuple[LookupRuntime, LookupSummary, Any, list[Any], dict[Any, Gone]] | None] = []
        for lk, summ, misses, gone in pending:
            if type(lk) is SourceRuntime:
                calls.append(lk.resolve(misses, summ, gone))
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
                owners.append((lk, summ, k, evs, gone))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for owner, v in zip(owners, results, strict=True):
            if owner is None:  # a source lookup filled its own events
                if isinstance(v, BaseException):
                    raise v
                continue
            lk, summ, k, evs, gone = owner
            if v is FAILED or isinstance(v, BaseException):
                summ.failures += len(evs)
                gone[k] = Gone(ERROR, "every try failed", evs, "failures")
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
    lookups: tuple[Lookup, ...], client: Any, executor: ThreadPoolExecutor, event_type: Any = None,
    id_field: str | None = None,
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
    return Enricher(rts, id_field)
