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

No asyncio Task is created per event: a hit costs a dict lookup in a loop specialised
for the pipeline's field names, and only distinct missing keys become calls (a source
lookup makes one task per batched call).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError
from ..pipeline import Lookup
from ..protocol import LookupSummary
from ..retry import Backoff
from .base import Failure, Source
from .cache import ERROR, FAIL, FOUND, MISS, NOT_FOUND, SKIP, LocalCache, SharedCache
from .client import bind_method, is_async
from .guard import CircuitBreaker, Flights

__all__ = ["Enricher", "LookupRuntime", "SourceRuntime", "build_enricher", "compile_fill"]

log = logging.getLogger("collector.sources")

_MISS = MISS
_FAILED = object()
STALE = 3  # a fetch outcome: failed, answered from the stale table
BreakerOpen = ConnectionRefusedError  # what a call refused by an open breaker raises


def compile_fill(key: str, target: str, skip: bool = False, key_fields: tuple[str, ...] = ()) -> Callable[..., Any]:
    """``for e in events: hit → e.<target> = v, miss → misses[k].append(e)``.

    Generated once per lookup (as dataclasses does) because attribute access with
    a constant name is several times cheaper than getattr/setattr on the hot path.
    Field names were checked against the Struct's fields, so they are identifiers.
    With ``skip``, a cached ``SKIP`` (not found) or ``FAIL`` (failed recently) is a hit
    that leaves the field alone, and the function returns ``(hits, failed)``; with
    ``key_fields`` the key is the tuple ``(e.<key>, e.<f>, ...)``. With ``skip``, an event
    whose key field is None is not looked up at all (a deposit has no game, a game_start
    no currency): its field keeps its default and nothing is counted.
    """
    names = (key, *key_fields)
    assert all(n.isidentifier() for n in names) and target.isidentifier()
    kexpr = f"e.{key}" if not key_fields else "(" + ", ".join(f"e.{n}" for n in names) + ")"
    setter = f"            e.{target} = v\n"
    if skip:
        setter = (
            "            if v is SKIP:\n                pass\n"
            "            elif v is FAIL:\n                failed += 1\n"
            f"            else:\n                e.{target} = v\n"
        )
    src = (
        "def fill(events, get, MISS, misses):\n"
        "    hits = failed = 0\n"
        "    for e in events:\n"
        + (f"        if e.{key} is None:\n            continue\n" if skip else "")
        + f"        k = {kexpr}\n"
        "        v = get(k, MISS)\n"
        "        if v is MISS:\n"
        "            m = misses.get(k)\n"
        "            if m is None:\n"
        "                misses[k] = [e]\n"
        "            else:\n"
        "                m.append(e)\n"
        "        else:\n"
        f"{setter}"
        "            hits += 1\n"
        f"    return {'hits, failed' if skip else 'hits'}\n"
    )
    ns: dict[str, Any] = {"SKIP": SKIP, "FAIL": FAIL}
    exec(src, ns)
    fill: Callable[..., Any] = ns["fill"]
    return fill


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
        """Call the client for ``k`` with the retry policy; ``_FAILED`` when it gave up."""
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
        return _FAILED

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

    async def close(self) -> None:
        """Nothing to release: the client belongs to the pipeline."""


class SourceRuntime:
    """One source lookup inside one worker: cache levels, flights, batching, guard."""

    def __init__(self, spec: Lookup, source: Source, *, clock: Callable[[], float] = time.monotonic) -> None:
        cfg = source.config
        cc, rc = cfg.cache, cfg.resilience
        self.spec = spec
        self.source = source
        self.name = spec.name
        self.clock = clock
        self.cache: LocalCache | None = None
        if cc.mode != "none":
            self.cache = LocalCache(
                cc.ttl,
                not_found_ttl=cc.not_found_ttl,
                error_ttl=cc.error_ttl,
                stale_ttl=cc.stale_ttl,
                max_entries=cc.max_entries,
            )
        self.shared: SharedCache | None = None
        if cc.mode == "two-level":
            self.shared = SharedCache(
                cc.redis_url,
                namespace=cc.namespace or cfg.name or spec.name,
                prefix=cc.redis_prefix,
                ttl=cc.redis_ttl,
                not_found_ttl=cc.redis_not_found_ttl,
            )
        self.get: Callable[[Any, Any], Any] = self.cache.values.get if self.cache is not None else {}.get
        self.fill = compile_fill(spec.key, spec.target, skip=True, key_fields=spec.key_fields)
        self.flights = Flights()
        self.sem = asyncio.Semaphore(rc.concurrency)
        self.timeout = rc.timeout
        self.backoff = Backoff(rc.backoff, cap=rc.backoff_cap, retries=rc.retries)
        self.breaker = CircuitBreaker(
            rc.breaker_failures,
            rc.breaker_reset,
            error_rate=rc.breaker_error_rate,
            window=rc.breaker_window,
            clock=clock,
        )
        self.linger = rc.linger
        self.log_not_found = cfg.log_not_found
        self.pending: list[Any] = []
        self.pending_fut: asyncio.Future[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # figures of calls, which may serve several chunks: each chunk's summary takes
        # what accrued since the last one (so the sum over all acks is exact)
        self.acc = LookupSummary(latencies=[])
        self.opens_reported = 0

    def prepare(self, now: float) -> None:
        """Expire cache entries before a chunk's fill pass."""
        if self.cache is not None:
            self.cache.sweep(now)

    async def resolve(self, misses: dict[Any, list[Any]], summ: LookupSummary) -> None:
        """Fill the events of ``misses`` (key → events): join calls under way, start the rest.

        A call's keys share one future whose result maps each key to its outcome, so a
        chunk waits on a few futures, not on one per key.
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
            else:
                summ.failures += len(evs)

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
                await self.fetch(keys, out)
            else:
                await asyncio.gather(*(self.fetch(keys[i : i + step], out) for i in range(0, len(keys), step)))
        finally:
            self.flights.settle_many(keys, fut, out)

    async def fetch(self, keys: list[Any], out: dict[Any, tuple[int, Any]]) -> None:
        """Answer ``keys`` into ``out``: the shared cache, then the source."""
        rest = keys
        if self.shared is not None:
            rest = await self._from_shared(keys, out)
        if rest:
            try:
                got = await self.call(rest)
            except Exception as e:
                self._failed(rest, out, reason=_reason(e))
            else:
                await self._store(rest, got, out)

    async def _from_shared(self, keys: list[Any], out: dict[Any, tuple[int, Any]]) -> list[Any]:
        try:
            got = await asyncio.wait_for(self.shared.get_many(keys), self.timeout)  # type: ignore[union-attr]
        except Exception as e:  # the shared level is an optimisation: go to the source
            log.warning("lookup %s: shared cache unavailable (%s); asking the source", self.name, _reason(e))
            return keys
        now = self.clock()
        for k, (outcome, v) in got.items():
            out[k] = (outcome, v)
            if self.cache is not None:
                self.cache.put(k, v if outcome == FOUND else SKIP, outcome, now)  # Redis holds found / not found
        self.acc.shared_hits += len(got)
        return [k for k in keys if k not in got]

    async def call(self, keys: list[Any]) -> dict[Any, Any]:
        """``source.get_many(keys)`` under the breaker, the concurrency bound, the timeout
        and the retry policy; raises when every try failed or the breaker refused."""
        acc, breaker = self.acc, self.breaker
        attempt = 0
        while True:
            if not breaker.allow():
                acc.short_circuited += 1
                raise BreakerOpen(f"circuit breaker {breaker.state}")
            t0 = time.perf_counter()
            acc.calls += 1
            acc.keys_fetched += len(keys)
            try:
                async with self.sem:
                    async with asyncio.timeout(self.timeout):
                        got = await self.source.get_many(keys)
            except asyncio.CancelledError:
                breaker.failure()
                raise
            except Exception as e:
                acc.latencies.append(time.perf_counter() - t0)
                acc.errors += 1
                breaker.failure()
                log.warning(
                    "lookup %s: %s failed for %d key(s) (first %r), try %d: %s",
                    self.name, self.source.describe(), len(keys), keys[0], attempt + 1, _reason(e),
                )
                if attempt >= self.backoff.retries:
                    raise
                await asyncio.sleep(self.backoff.delay(attempt))
                attempt += 1
                continue
            acc.latencies.append(time.perf_counter() - t0)
            breaker.success()
            return got

    async def _store(self, keys: list[Any], got: dict[Any, Any], out: dict[Any, tuple[int, Any]]) -> None:
        now = self.clock()
        cache = self.cache
        failed: list[Any] = []
        shared: list[tuple[Any, int, Any]] = []
        for k in keys:
            v = got.get(k, MISS)
            if v is MISS:
                if self.log_not_found:
                    log.info("lookup %s: key %r not found in %s", self.name, k, self.source.describe())
                out[k] = (NOT_FOUND, None)
                if cache is not None:
                    cache.put(k, SKIP, NOT_FOUND, now)
                shared.append((k, NOT_FOUND, None))
            elif isinstance(v, Failure):
                self.acc.errors += 1
                log.warning("lookup %s: %s: key %r: %s", self.name, self.source.describe(), k, v.reason)
                failed.append(k)
            else:
                out[k] = (FOUND, v)
                if cache is not None:
                    cache.put(k, v, FOUND, now)
                shared.append((k, FOUND, v))
        if failed:
            self._failed(failed, out, reason=None)
        if self.shared is not None and shared:
            try:
                await asyncio.wait_for(self.shared.put_many(shared), self.timeout)
            except Exception as e:
                log.warning("lookup %s: shared cache write failed: %s", self.name, _reason(e))

    def _failed(self, keys: list[Any], out: dict[Any, tuple[int, Any]], reason: str | None) -> None:
        """Failed keys: a stale value if one may be served, else the default; both cached
        for ``error_ttl`` so a failing source is not asked again per chunk."""
        now = self.clock()
        cache = self.cache
        for k in keys:
            v = cache.stale_value(k, now) if cache is not None else MISS
            if v is MISS:
                out[k] = (ERROR, None)
                if cache is not None:
                    cache.put(k, FAIL, ERROR, now)
            else:
                out[k] = (STALE, v)
                cache.put(k, v, ERROR, now)  # type: ignore[union-attr]
        if reason is not None:
            log.debug("lookup %s: %d key(s) answered without the source: %s", self.name, len(keys), reason)

    async def health(self) -> dict[str, Any]:
        """The source's own health plus this lookup's breaker and cache state."""
        try:
            h = await asyncio.wait_for(self.source.health(), self.timeout)
        except Exception as e:
            h = {"kind": self.source.kind, "ok": False, "error": _reason(e)}
        h.update(lookup=self.name, breaker=self.breaker.state, breaker_opens=self.breaker.opens,
                 cached=len(self.cache) if self.cache is not None else 0, in_flight=len(self.flights.calls))
        return h

    def report(self, summ: LookupSummary) -> None:
        """Move the call figures accrued since the last report into ``summ``."""
        acc = self.acc
        summ.calls += acc.calls
        summ.errors += acc.errors
        summ.shared_hits += acc.shared_hits
        summ.keys_fetched += acc.keys_fetched
        summ.short_circuited += acc.short_circuited
        summ.latencies.extend(acc.latencies)
        opens = self.breaker.opens
        summ.breaker_opens += opens - self.opens_reported
        self.opens_reported = opens
        self.acc = LookupSummary(latencies=[])

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
                    log.warning("lookup %s: close failed: %s", self.name, _reason(e))


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


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
            if v is _FAILED or isinstance(v, BaseException):
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
    fields = set(getattr(event_type, "__struct_fields__", ()))
    for spec in lookups:
        for f in spec.key_fields:
            if fields and f not in fields:
                raise ConfigError(
                    f"lookup {spec.name!r}: key_fields names field {f!r}, which "
                    f"{event_type.__name__} does not have (fields: {sorted(fields)})"
                )
        if spec.source is not None:
            rts.append(SourceRuntime(spec, build_source(spec.source)))
            continue
        if client is None:
            raise ConfigError(f"lookup {spec.name!r} calls method {spec.method!r}, but the pipeline has no client")
        rts.append(LookupRuntime(spec, bind_method(client, spec.method, spec.name), executor))
    return Enricher(rts)
