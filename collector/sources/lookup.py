"""Method lookups: one ``get_*`` method of the pipeline's client, per distinct key.

::

    distinct missing key ─► in flight already? join its future
                         └► lead(k): bounded concurrency ─► call (timeout; blocking
                              clients on the thread pool) ─► retries with jitter
                              ─► cache the value, settle the followers │ FAILED
    refetch (a hold, :mod:`.policy`): the same leads, for the held keys

The source path (``source = ...`` lookups) is :mod:`.source_runtime`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..pipeline import Lookup
from ..protocol import LookupSummary
from ..retry import Backoff
from .cache import ERROR, FOUND, LocalCache
from .client import is_async
from .fill import compile_fill
from .guard import Flights
from .policy import StepPolicy, answers_within

__all__ = ["FAILED", "LookupRuntime"]

FAILED = object()  # what fetch returns when every try failed


class LookupRuntime:
    """One method lookup's cache, in-flight table and call policy inside one worker."""

    def __init__(
        self,
        spec: Lookup,
        fn: Callable[[Any], Any],
        executor: ThreadPoolExecutor,
    ) -> None:
        self.spec = spec
        self.fn = fn
        self.is_async = is_async(fn)
        self.executor = executor
        self.caching = spec.cache and spec.ttl > 0
        self.cache = LocalCache(spec.ttl if self.caching else 0.0, max_entries=spec.max_entries)
        self.flights = Flights()
        self.sem = asyncio.Semaphore(spec.concurrency)
        self.fill = compile_fill(spec.key, spec.target)
        self.backoff = Backoff(spec.backoff, cap=float("inf"), retries=spec.retries)
        self.policy = StepPolicy(spec, f"client method {spec.method}")
        self.holds: set[asyncio.Task[Any]] = set()  # leads a hold started (kept referenced)

    def sweep(self, now: float) -> None:
        """Drop entries older than ttl (a walk from the oldest that stops at a live one)."""
        self.cache.sweep(now)

    def store(self, k: Any, v: Any, now: float) -> None:
        """Cache ``v`` for ``k``; the oldest entry goes when the cache is full."""
        self.cache.put(k, v, FOUND, now)

    async def _call_once(self, k: Any) -> Any:
        if self.is_async:
            return await asyncio.wait_for(self.fn(k), self.spec.timeout)
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(
            loop.run_in_executor(self.executor, self.fn, k), self.spec.timeout
        )

    async def fetch(self, k: Any, summ: LookupSummary) -> Any:
        """Call the client for ``k`` with the retry policy; ``FAILED`` when it gave up."""
        spec = self.spec
        async with self.sem:
            for attempt in range(spec.retries + 1):
                t0 = time.perf_counter()
                summ.calls += 1
                try:
                    r = await self._call_once(k)
                except asyncio.CancelledError:
                    raise
                except Exception:  # any client error is a failed try
                    summ.latencies.append(time.perf_counter() - t0)
                    summ.errors += 1
                    if attempt < spec.retries:
                        await asyncio.sleep(self.backoff.delay(attempt))
                    continue
                summ.latencies.append(time.perf_counter() - t0)
                if spec.returns_duration:
                    try:
                        value, reported = r
                        reported = float(reported)
                    except (TypeError, ValueError):
                        summ.errors += 1
                        continue  # a malformed answer is a failed try too
                    summ.reported_sum += reported
                    if reported > summ.reported_max:
                        summ.reported_max = reported
                else:
                    value = r
                self.store(k, value, time.monotonic())
                return value
        return FAILED

    def lead(self, k: Any, summ: LookupSummary) -> Any:
        """Become the leader of ``k``'s single-flight group; returns the call to await.

        The group is registered before anything awaits, so a chunk processed right
        after this one joins the call instead of starting its own.
        """
        fut = self.flights.lead(k)
        return self._shared_fetch(k, summ, fut)

    async def _shared_fetch(self, k: Any, summ: LookupSummary, fut: asyncio.Future[Any]) -> Any:
        """Fetch ``k`` and hand the answer to every follower."""
        try:
            v = await self.fetch(k, summ)
        except BaseException:
            self.flights.abandon(k)  # followers (gathered with return_exceptions) count a failure
            raise
        self.flights.settle(k, v)
        return v

    async def refetch(self, keys: list[Any], timeout: float, summ: LookupSummary) -> dict[Any, tuple[int, Any]]:
        """Call the client again for ``keys`` (a hold), joining calls under way; wait at
        most ``timeout`` (a call still running goes on and fills the cache)."""
        loop = asyncio.get_running_loop()
        futs: dict[Any, asyncio.Future[Any]] = {}
        for k in keys:
            fut = self.flights.get(k)
            if fut is None:
                t = loop.create_task(self.lead(k, summ))  # one per distinct held key, never per event
                self.holds.add(t)
                t.add_done_callback(self.holds.discard)
                fut = self.flights.get(k)
                assert fut is not None
            futs[k] = fut
        return await answers_within(futs, timeout, _answer)

    async def close(self) -> None:
        """Cancel the calls holds started; the client belongs to the pipeline."""
        for t in list(self.holds):
            t.cancel()
        if self.holds:
            await asyncio.gather(*self.holds, return_exceptions=True)


def _answer(_k: Any, f: asyncio.Future[Any]) -> tuple[int, Any]:
    """A client call's outcome for a hold."""
    if f.cancelled() or f.result() is FAILED:
        return (ERROR, "every try failed")
    return (FOUND, f.result())
