"""One source lookup's fetch path: shared cache, the source under its guard, store, fallback.

::

    keys ─► fetch ─► shared cache (Redis, two-level mode) ─► answered keys cached locally
                 └─► the rest: call = source.get_many under the breaker, the concurrency
                       bound, the timeout and retries with jitter
                          ├─ answered ─► store: FOUND / NOT_FOUND into both cache levels
                          └─ failed or refused ─► failed: a stale value (STALE) if one may
                               be served, else ERROR; cached for error_ttl

:class:`~collector.sources.source_runtime.SourceRuntime` owns one ``SourceFetcher`` and
decides which keys go out and when (flights, linger batching); the fetcher answers
each key into ``out`` as ``(outcome, value)`` and counts calls in ``acc``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..pipeline import Lookup
from ..protocol import LookupSummary
from ..retry import Backoff
from ..sinks.config import redact_urls
from .base import Failure, Source
from .cache import ERROR, FAIL, FOUND, MISS, NOT_FOUND, SKIP, LocalCache, SharedCache
from .guard import CircuitBreaker

__all__ = ["ERROR_KINDS", "STALE", "BreakerOpen", "SourceFetcher", "error_kind", "error_reason"]

log = logging.getLogger("collector.sources")

STALE = 3  # a fetch outcome: failed, answered from the stale table
BreakerOpen = ConnectionRefusedError  # what a call refused by an open breaker raises


# the kinds of failed calls counted per source (collector.sources.metrics), in the order
# of the err_* words of the stats slot; "key": one key failed inside a good answer
ERROR_KINDS = ("timeout", "http_status", "invalid", "connection", "key", "other")
_KIND = {k: i for i, k in enumerate(ERROR_KINDS)}
_CONN = ("ClientConnectionError", "ClientPayloadError")


def error_kind(e: BaseException) -> int:
    """The index in :data:`ERROR_KINDS` of a failed call's exception."""
    if isinstance(e, TimeoutError):
        return 0
    kind = getattr(e, "kind", None)
    if isinstance(kind, str) and kind in _KIND:
        return _KIND[kind]
    # refused and reset connections are OSErrors; aiohttp's, ClientConnectionError (a
    # connection closed before the answer) or ClientPayloadError (closed mid-body)
    if isinstance(e, OSError) or any(c.__name__ in _CONN for c in type(e).__mro__):
        return 3
    return 5


def error_reason(e: BaseException) -> str:
    """A short description of ``e`` for a log line ("timeout" for a timeout), with any
    URL's password redacted: a driver's message may quote its DSN, and this text goes on
    to log lines, failure-policy reasons and dead letters."""
    if isinstance(e, TimeoutError):
        return "timeout"
    return redact_urls(f"{type(e).__name__}: {e}") if str(e) else type(e).__name__


class SourceFetcher:
    """The cache levels, guard and call figures of one source lookup inside one worker."""

    def __init__(self, spec: Lookup, source: Source, *, clock: Callable[[], float] = time.monotonic) -> None:
        cfg = source.config
        cc, rc = cfg.cache, cfg.resilience
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
        self.log_not_found = cfg.log_not_found
        # figures of calls, which may serve several chunks: SourceRuntime.report hands
        # each chunk's summary what accrued since the last one (so the sum over all acks is exact)
        self.acc = LookupSummary(latencies=[])
        self.kinds = [0] * len(ERROR_KINDS)  # failed tries by kind since the last report

    async def fetch(self, keys: list[Any], out: dict[Any, tuple[int, Any]]) -> None:
        """Answer ``keys`` into ``out``: the shared cache, then the source."""
        rest = keys
        if self.shared is not None:
            rest = await self._from_shared(keys, out)
        if rest:
            try:
                got = await self.call(rest)
            except Exception as e:
                self._failed(rest, out, reason=error_reason(e))
            else:
                await self._store(rest, got, out)

    async def _from_shared(self, keys: list[Any], out: dict[Any, tuple[int, Any]]) -> list[Any]:
        try:
            got = await asyncio.wait_for(self.shared.get_many(keys), self.timeout)  # type: ignore[union-attr]
        except Exception as e:  # the shared level is an optimisation: go to the source
            log.warning("lookup %s: shared cache unavailable (%s); asking the source", self.name, error_reason(e))
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
                self.kinds[error_kind(e)] += 1
                breaker.failure()
                log.warning(
                    "lookup %s: %s failed for %d key(s) (first %r), try %d: %s",
                    self.name, self.source.describe(), len(keys), keys[0], attempt + 1, error_reason(e),
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
        failed: dict[Any, str] = {}  # key → why the source could not answer it
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
                self.kinds[4] += 1
                why = failed[k] = redact_urls(v.reason)  # a source's own words (see error_reason)
                log.warning("lookup %s: %s: key %r: %s", self.name, self.source.describe(), k, why)
            else:
                out[k] = (FOUND, v)
                if cache is not None:
                    cache.put(k, v, FOUND, now)
                shared.append((k, FOUND, v))
        if failed:
            self._failed(list(failed), out, reason=failed)
        if self.shared is not None and shared:
            try:
                await asyncio.wait_for(self.shared.put_many(shared), self.timeout)
            except Exception as e:
                log.warning("lookup %s: shared cache write failed: %s", self.name, error_reason(e))

    def _failed(self, keys: list[Any], out: dict[Any, tuple[int, Any]], reason: str | dict[Any, str]) -> None:
        """Failed keys: a stale value if one may be served, else the default; both cached
        for ``error_ttl`` so a failing source is not asked again per chunk. An ``ERROR``
        answer carries the reason (one for the call, or one per key) for the failure
        policy's log line and dead-letter reason."""
        now = self.clock()
        cache = self.cache
        for k in keys:
            v = cache.stale_value(k, now) if cache is not None else MISS
            if v is MISS:
                out[k] = (ERROR, reason if isinstance(reason, str) else reason.get(k, "failed"))
                if cache is not None:
                    cache.put(k, FAIL, ERROR, now)
            else:
                out[k] = (STALE, v)
                cache.put(k, v, ERROR, now)  # type: ignore[union-attr]
        if isinstance(reason, str):
            log.debug("lookup %s: %d key(s) answered without the source: %s", self.name, len(keys), reason)
