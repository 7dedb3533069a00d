"""Source lookups (``source = ...``): which distinct keys go out, when, and with whom.

::

    misses (key → events) ─► resolve: key in flight already? join its call's future
                                     └► the new keys: submit ─► now, or after ``linger``
                                          with later chunks' keys (flush)
                          ─► launch: one task per group of keys ─► fetch_group: calls of at
                               most ``max_batch`` keys, concurrently, each a
                               SourceFetcher.fetch (cache levels, breaker, retries, stale)
                          ─► the group's future maps key → (outcome, value) ─► fill the events
                                 (failed keys ─► ``gone`` for the step's failure policy)
    refetch (a hold, :mod:`.policy`): the held keys again, past the local cache, same flights

The fetch path itself is :mod:`.fetch`; the client-method path is :mod:`.lookup`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..pipeline import Lookup
from ..protocol import LookupSummary
from .base import Source
from .cache import ERROR, FOUND, NOT_FOUND
from .fetch import STALE, SourceFetcher, error_reason
from .fill import compile_fill
from .guard import Flights
from .policy import Gone, StepPolicy, answers_within

__all__ = ["SourceRuntime"]

log = logging.getLogger("collector.sources")


class SourceRuntime:
    """One source lookup inside one worker: cache levels, flights, batching, guard."""

    def __init__(self, spec: Lookup, source: Source, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.source = source
        self.name = spec.name
        self.clock = clock
        self.fetcher = SourceFetcher(spec, source, clock=clock)
        # the fetcher's cache levels and guard, by their names here too (health, tests)
        self.cache, self.shared, self.breaker = self.fetcher.cache, self.fetcher.shared, self.fetcher.breaker
        self.timeout = self.fetcher.timeout
        self.get: Callable[[Any, Any], Any] = self.cache.values.get if self.cache is not None else {}.get
        cfg = source.config
        self.policy = StepPolicy(spec, f"{cfg.name} ({source.kind})" if getattr(cfg, "name", "") else source.describe())
        # the events of cached not-found and failed keys are grouped per key only when the
        # step's policy acts on them (dead-letter, hold, a log line); to keep them silently
        # they are counted in the fill pass
        self.collects = spec.log or any(a != "keep" for a in self.policy.actions.values())
        self.fill = compile_fill(spec.key, spec.target, skip=True, key_fields=spec.key_fields, collect=self.collects)
        self.flights = Flights()
        self.linger = source.config.resilience.linger
        self.pending: list[Any] = []
        self.pending_fut: asyncio.Future[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.opens_reported = 0

    def prepare(self, now: float) -> None:
        """Expire cache entries before a chunk's fill pass."""
        if self.cache is not None:
            self.cache.sweep(now)

    async def resolve(
        self, misses: dict[Any, list[Any]], summ: LookupSummary, gone: dict[Any, Gone]
    ) -> None:
        """Fill the events of ``misses`` (key → events): join calls under way, start the rest.

        A call's keys share one future whose result maps each key to its outcome, so a
        chunk waits on a few futures, not on one per key. With ``gone`` (a step with a
        failure policy), the keys not found or failed (no stale value) go there.
        """
        waits: list[tuple[Any, list[Any], asyncio.Future[Any] | None]] = []
        new: list[Any] = []
        under_way = self.flights.calls.get
        for k, evs in misses.items():
            summ.misses += len(evs)
            try:
                fut = under_way(k)
            except TypeError:  # an unhashable key cannot be looked up
                summ.failures += len(evs)
                continue
            if fut is not None:
                summ.coalesced += len(evs)
            else:
                new.append(k)
            waits.append((k, evs, fut))
        if not waits:
            return
        mine = self.submit(new) if new else None
        futs = {f for _, _, f in waits if f is not None}
        if mine is not None:
            futs.add(mine)
        # wait, not gather: cancelling this chunk must not cancel calls other chunks share
        await asyncio.wait(futs)
        target = self.spec.target
        failed = (ERROR, None)
        for k, evs, f in waits:
            fut = f if f is not None else mine
            assert fut is not None
            if fut.cancelled() or fut.exception() is not None:
                summ.failures += len(evs)
                gone[k] = Gone(ERROR, "the call was cancelled", evs, "failures")
                continue
            outcome, v = fut.result().get(k, failed)
            if outcome in (FOUND, STALE):
                for e in evs:
                    setattr(e, target, v)
                if outcome == STALE:
                    summ.stale += len(evs)
                    summ.failures += len(evs)
            elif outcome == NOT_FOUND:
                summ.not_found += len(evs)
                gone[k] = Gone(NOT_FOUND, "not found", evs, "not_found")
            else:
                summ.failures += len(evs)
                gone[k] = Gone(ERROR, v if isinstance(v, str) else "no answer", evs, "failures")

    async def refetch(self, keys: list[Any], timeout: float, summ: LookupSummary) -> dict[Any, tuple[int, Any]]:
        """Ask again for ``keys`` (a hold): past the local cache, joining calls under way
        (other chunks' holds of the same key share one call); waits at most ``timeout``.

        key → (outcome, value; the reason for ``ERROR``). The calls' figures reach the
        chunk's summary through :meth:`report`, like every call's.
        """
        futs: dict[Any, asyncio.Future[Any]] = {}
        new: list[Any] = []
        under_way = self.flights.calls.get
        for k in keys:
            f = under_way(k)
            if f is None:
                new.append(k)
            else:
                futs[k] = f
        if new:
            mine = self.submit(new)
            for k in new:
                futs[k] = mine
        return await answers_within(futs, timeout, _answer)

    def submit(self, keys: list[Any]) -> asyncio.Future[Any]:
        """Send ``keys`` out now, or after ``linger`` seconds together with later chunks' keys.

        Returns the future the keys' answers arrive on (registered in the flights table
        before anything awaits, so a chunk right after this one joins it).
        """
        if self.linger <= 0:
            fut = self.flights.lead_many(keys)
            self.launch(keys, fut)
            return fut
        if self.pending_fut is None:
            self.pending_fut = asyncio.get_running_loop().create_future()
        fut = self.pending_fut
        self.flights.join(keys, fut)
        self.pending.extend(keys)
        if len(self.pending) >= self.source.max_batch:
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.linger, self.flush)
        return fut

    def flush(self) -> None:
        """Send what is pending."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        keys, fut = self.pending, self.pending_fut
        self.pending, self.pending_fut = [], None
        if keys and fut is not None:
            self.launch(keys, fut)

    def launch(self, keys: list[Any], fut: asyncio.Future[Any]) -> None:
        """One task per group of keys (never one per event); see :meth:`fetch_group`."""
        t = asyncio.get_running_loop().create_task(self.fetch_group(keys, fut))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def fetch_group(self, keys: list[Any], fut: asyncio.Future[Any]) -> None:
        """Calls of at most ``max_batch`` keys, concurrently; then settle the group's future."""
        out: dict[Any, tuple[int, Any]] = {}
        step = max(1, self.source.max_batch)
        try:
            if len(keys) <= step:
                await self.fetcher.fetch(keys, out)
            else:
                fetch = self.fetcher.fetch
                await asyncio.gather(*(fetch(keys[i : i + step], out) for i in range(0, len(keys), step)))
        finally:
            self.flights.settle_many(keys, fut, out)

    async def health(self) -> dict[str, Any]:
        """The source's own health plus this lookup's breaker and cache state."""
        try:
            h = await asyncio.wait_for(self.source.health(), self.timeout)
        except Exception as e:
            h = {"kind": self.source.kind, "ok": False, "error": error_reason(e)}
        h.update(lookup=self.name, breaker=self.breaker.state, breaker_opens=self.breaker.opens,
                 cached=len(self.cache) if self.cache is not None else 0, in_flight=len(self.flights.calls))
        return h

    def report(self, summ: LookupSummary) -> None:
        """Move the call figures accrued since the last report into ``summ``."""
        acc = self.fetcher.acc
        summ.calls += acc.calls
        summ.errors += acc.errors
        summ.shared_hits += acc.shared_hits
        summ.keys_fetched += acc.keys_fetched
        summ.short_circuited += acc.short_circuited
        summ.latencies.extend(acc.latencies)
        opens = self.breaker.opens
        summ.breaker_opens += opens - self.opens_reported
        self.opens_reported = opens
        self.fetcher.acc = LookupSummary(latencies=[])

    async def close(self) -> None:
        """Cancel pending calls; close the source and the shared cache."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pending_fut is not None:  # keys still lingering: their waiters see a failure
            self.flights.settle_many(self.pending, self.pending_fut, {})
            self.pending, self.pending_fut = [], None
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for closer in (self.source.close, self.shared.close if self.shared is not None else None):
            if closer is not None:
                try:
                    await closer()
                except Exception as e:
                    log.warning("lookup %s: close failed: %s", self.name, error_reason(e))


def _answer(k: Any, f: asyncio.Future[Any]) -> tuple[int, Any]:
    """Key ``k``'s outcome in a batched call's answers, for a hold."""
    if f.cancelled() or f.exception() is not None:
        return (ERROR, "the call was cancelled")
    out: tuple[int, Any] = f.result().get(k, (ERROR, "no answer"))
    return out
