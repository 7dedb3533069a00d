"""Enrichment inside a worker: per-key caches, single-flight calls, retries, timeouts.

::

    chunk ─► pass 1 (inline, per event): cache hit → set field │ miss → group by key
          ─► pass 2 (per DISTINCT missing key, all lookups at once):
                 in flight already? join it (coalesced) : call client (timeout, retries,
                 backoff + jitter, bounded concurrency; blocking clients on a thread pool)
          ─► pass 3: fill the missed events from the answers (failures keep the default)

No asyncio Task is created per event: a hit costs a dict lookup in a loop specialised
for the pipeline's field names, and only distinct missing keys become calls.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .pipeline import Lookup
from .protocol import LookupSummary

__all__ = ["Enricher", "LookupRuntime"]

_MISS = object()
_FAILED = object()


def _compile_fill(key: str, target: str) -> Callable[..., int]:
    """``for e in events: hit → e.<target> = v, miss → misses[k].append(e)``.

    Generated once per lookup (as dataclasses does) because attribute access with
    a constant name is several times cheaper than getattr/setattr on the hot path.
    Field names were checked against the Struct's fields, so they are identifiers.
    """
    assert key.isidentifier() and target.isidentifier()
    src = (
        "def fill(events, get, MISS, misses):\n"
        "    hits = 0\n"
        "    for e in events:\n"
        f"        k = e.{key}\n"
        "        v = get(k, MISS)\n"
        "        if v is MISS:\n"
        "            m = misses.get(k)\n"
        "            if m is None:\n"
        "                misses[k] = [e]\n"
        "            else:\n"
        "                m.append(e)\n"
        "        else:\n"
        f"            e.{target} = v\n"
        "            hits += 1\n"
        "    return hits\n"
    )
    ns: dict[str, Any] = {}
    exec(src, ns)
    fill: Callable[..., int] = ns["fill"]
    return fill


class LookupRuntime:
    """One lookup's cache, in-flight table and call policy inside one worker."""

    def __init__(
        self,
        spec: Lookup,
        fn: Callable[[Any], Any],
        executor: ThreadPoolExecutor,
    ) -> None:
        self.spec = spec
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            type(fn).__call__
        )
        self.executor = executor
        self.cache: dict[Any, Any] = {}
        self.born: dict[Any, float] = {}  # key → time cached, in insertion order (for TTL)
        self.inflight: dict[Any, asyncio.Future[Any]] = {}
        self.sem = asyncio.Semaphore(spec.concurrency)
        self.fill = _compile_fill(spec.key, spec.target)
        self.caching = spec.cache and spec.ttl > 0
        self.next_sweep = 0.0

    def sweep(self, now: float) -> None:
        """Drop entries older than ttl; at most every ttl/4 seconds, never per event."""
        if now < self.next_sweep:
            return
        ttl = self.spec.ttl
        self.next_sweep = now + max(ttl / 4, 0.05)
        born, cache = self.born, self.cache
        limit = now - ttl
        for k in list(born):  # oldest first
            if born[k] > limit:
                break
            del born[k]
            cache.pop(k, None)

    def store(self, k: Any, v: Any, now: float) -> None:
        """Cache ``v`` for ``k``; the oldest entry goes when the cache is full."""
        if not self.caching:
            return
        if len(self.cache) >= self.spec.max_entries:
            old = next(iter(self.born), None)
            if old is not None:
                del self.born[old]
                self.cache.pop(old, None)
        self.born.pop(k, None)
        self.born[k] = now
        self.cache[k] = v

    async def _call_once(self, k: Any) -> Any:
        if self.is_async:
            return await asyncio.wait_for(self.fn(k), self.spec.timeout)
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(
            loop.run_in_executor(self.executor, self.fn, k), self.spec.timeout
        )

    async def fetch(self, k: Any, summ: LookupSummary) -> Any:
        """Call the client for ``k`` with the retry policy; ``_FAILED`` when it gave up."""
        spec = self.spec
        delay = spec.backoff
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
                    if attempt < spec.retries:
                        # full jitter: spreads retries of many keys after a shared outage
                        await asyncio.sleep(random.uniform(0, delay))
                        delay *= 2
                    continue
                summ.latencies.append(time.perf_counter() - t0)
                if spec.returns_duration:
                    try:
                        value, reported = r
                        reported = float(reported)
                    except (TypeError, ValueError):
                        continue  # a malformed answer is a failed try too
                    summ.reported_sum += reported
                    if reported > summ.reported_max:
                        summ.reported_max = reported
                else:
                    value = r
                self.store(k, value, time.monotonic())
                return value
        return _FAILED

    def lead(self, k: Any, summ: LookupSummary) -> Any:
        """Become the leader of ``k``'s single-flight group; returns the call to await.

        The group is registered before anything awaits, so a chunk processed right
        after this one joins the call instead of starting its own.
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.inflight[k] = fut
        return self._shared_fetch(k, summ, fut)

    async def _shared_fetch(self, k: Any, summ: LookupSummary, fut: asyncio.Future[Any]) -> Any:
        """Fetch ``k`` and hand the answer to every follower."""
        try:
            v = await self.fetch(k, summ)
        except BaseException:
            fut.cancel()  # followers (gathered with return_exceptions) count a failure
            raise
        finally:
            self.inflight.pop(k, None)
        if not fut.done():
            fut.set_result(v)
        return v


class Enricher:
    """All lookups of a pipeline inside one worker."""

    def __init__(self, lookups: list[LookupRuntime]) -> None:
        self.lookups = lookups

    async def enrich(self, events: list[Any]) -> dict[str, LookupSummary]:
        """Fill every lookup's target field on ``events``; returns per-lookup figures."""
        summaries: dict[str, LookupSummary] = {}
        if not self.lookups or not events:
            return summaries
        now = time.monotonic()
        pending: list[tuple[LookupRuntime, LookupSummary, dict[Any, list[Any]]]] = []
        for lk in self.lookups:
            summ = LookupSummary(latencies=[])
            summaries[lk.spec.name] = summ
            if lk.caching:
                lk.sweep(now)
            misses: dict[Any, list[Any]] = {}
            summ.hits = lk.fill(events, lk.cache.get, _MISS, misses)
            if misses:
                pending.append((lk, summ, misses))
        if not pending:
            return summaries
        # every distinct missing key of every lookup, concurrently: a batch costs one
        # round of the slowest call, not one per event or per lookup
        calls: list[Any] = []
        owners: list[tuple[LookupRuntime, LookupSummary, Any, list[Any]]] = []
        for lk, summ, misses in pending:
            for k, evs in misses.items():
                summ.misses += len(evs)
                try:
                    fut = lk.inflight.get(k)
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
        for (lk, summ, _k, evs), v in zip(owners, results, strict=True):
            if v is _FAILED or isinstance(v, BaseException):
                summ.failures += len(evs)
                continue
            target = lk.spec.target
            for e in evs:
                setattr(e, target, v)
        return summaries


def build_enricher(lookups: tuple[Lookup, ...], client: Any, executor: ThreadPoolExecutor) -> Enricher:
    """Bind each lookup to its client method; the error names a missing method."""
    from .errors import ConfigError

    rts = []
    for spec in lookups:
        fn = getattr(client, spec.method, None)
        if fn is None or not callable(fn):
            raise ConfigError(
                f"lookup {spec.name!r}: the client {type(client).__name__} has no method "
                f"{spec.method!r}"
            )
        rts.append(LookupRuntime(spec, fn, executor))
    return Enricher(rts)
