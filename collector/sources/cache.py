"""Per-lookup caches: a local TTL + size-bounded dict, and a shared Redis level.

::

    fill (hot loop) ── values.get(key) ──► hit: set the field    (one dict lookup per event)
                                       └─► miss ─► SharedCache.get_many (Redis MGET, one per batch)
                                                      └─► miss ─► the source

:class:`LocalCache` keeps what the fill loop reads in one plain dict, and the deadlines
in one insertion-ordered dict per outcome (found / not found / error), so each has its
own TTL and expiry is a walk from the oldest entry that stops at the first live one:
no per-event clock read and no heap. When the size bound is reached the entry closest
to its deadline goes. A found value that expires moves to a ``stale`` table for
``stale_ttl`` more seconds, from which a failed fetch is answered (stale-on-error).

:class:`SharedCache` is the second level of a two-level cache (seed 003: 5 min local,
15 min Redis, then the source): one ``MGET`` for a batch of keys, one pipelined write
of the answers, shared by every worker and every daemon that uses the same namespace.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import msgspec

from ..errors import missing

__all__ = ["ERROR", "FAIL", "FOUND", "MISS", "NOT_FOUND", "SKIP", "LocalCache", "SharedCache"]

FOUND, NOT_FOUND, ERROR = 0, 1, 2  # outcomes; each has its own TTL
MISS = object()  # not in the cache
SKIP = object()  # cached "not found": nothing to set
FAIL = object()  # cached failure without a stale value: nothing to set, counted as a failure

log = logging.getLogger("collector.sources")


class LocalCache:
    """One lookup's cache inside one worker (see the module docstring)."""

    def __init__(
        self,
        ttl: float,
        *,
        not_found_ttl: float = 0.0,
        error_ttl: float = 0.0,
        stale_ttl: float = 0.0,
        max_entries: int = 100_000,
    ) -> None:
        self.values: dict[Any, Any] = {}
        self.ttls = (ttl, not_found_ttl, error_ttl)
        self.deadlines: tuple[dict[Any, float], ...] = ({}, {}, {})  # per outcome, oldest first
        self.stale: dict[Any, tuple[Any, float]] = {}  # key → (value, serve-until)
        self.stale_ttl = stale_ttl
        self.max_entries = max_entries

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values)

    def put(self, key: Any, value: Any, outcome: int, now: float, ttl: float | None = None) -> None:
        """Cache ``value`` for ``key`` with the TTL of ``outcome`` (no TTL: not cached).

        ``ttl`` overrides it for this entry (a token's own expiry); such entries may
        outlive an earlier, longer-lived one in the sweep's order, so read them with
        :meth:`live`, which checks the deadline.
        """
        if ttl is None:
            ttl = self.ttls[outcome]
        for d in self.deadlines:
            d.pop(key, None)
        if ttl <= 0:
            self.values.pop(key, None)
            return
        if key not in self.values and len(self.values) >= self.max_entries:
            self._evict()
        self.deadlines[outcome][key] = now + ttl
        self.values[key] = value
        if outcome == FOUND:
            self.stale.pop(key, None)

    def live(self, key: Any, now: float) -> Any:
        """The value of ``key`` if its deadline has not passed, else ``MISS``."""
        v = self.values.get(key, MISS)
        if v is MISS:
            return MISS
        for d in self.deadlines:
            due = d.get(key)
            if due is not None:
                return v if due > now else MISS
        return MISS

    def _evict(self) -> None:
        heads = [(d[next(iter(d))], d) for d in self.deadlines if d]
        if heads:
            _, d = min(heads, key=lambda h: h[0])
            k = next(iter(d))
            del d[k]
            self.values.pop(k, None)

    def sweep(self, now: float) -> None:
        """Drop what expired (found values move to the stale table); cheap when nothing did."""
        values, stale, keep = self.values, self.stale, self.stale_ttl
        for outcome, d in enumerate(self.deadlines):
            while d:
                k = next(iter(d))
                due = d[k]
                if due > now:
                    break
                del d[k]
                v = values.pop(k, MISS)
                if outcome == FOUND and keep > 0 and v is not MISS:
                    stale[k] = (v, due + keep)
                    if len(stale) > self.max_entries:
                        del stale[next(iter(stale))]
        while stale:
            k = next(iter(stale))
            if stale[k][1] > now:
                break
            del stale[k]

    def stale_value(self, key: Any, now: float) -> Any:
        """The last found value of ``key`` if it may still be served stale, else ``MISS``."""
        hit = self.stale.get(key)
        if hit is None or hit[1] <= now:
            return MISS
        return hit[0]


def _redis_asyncio(what: str) -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError:
        raise missing("redis", "redis", what) from None
    return aioredis


class SharedCache:
    """The Redis level of a two-level cache: ``<prefix><namespace>:<key as JSON>`` → msgpack."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        prefix: str = "collector:enrich:",
        ttl: float = 900.0,
        not_found_ttl: float = 60.0,
    ) -> None:
        self.aioredis = _redis_asyncio("the two-level enrichment cache")
        self.url = url
        self.head = f"{prefix}{namespace}:".encode()
        self.ttls = (ttl, not_found_ttl)
        self.redis: Any = None
        self.enc = msgspec.msgpack.Encoder()
        self.dec = msgspec.msgpack.Decoder(tuple[int, Any])
        self.keyenc = msgspec.json.Encoder()

    def key(self, k: Any) -> bytes:
        """The Redis key of lookup key ``k`` (JSON, so 5 and "5" stay apart)."""
        return self.head + self.keyenc.encode(k)

    def _client(self) -> Any:
        if self.redis is None:
            self.redis = self.aioredis.from_url(self.url)
        return self.redis

    async def get_many(self, keys: list[Any]) -> dict[Any, tuple[int, Any]]:
        """``{key: (outcome, value)}`` for the keys Redis has (one ``MGET``)."""
        raw = await self._client().mget([self.key(k) for k in keys])
        out: dict[Any, tuple[int, Any]] = {}
        for k, b in zip(keys, raw, strict=True):
            if b is not None:
                try:
                    out[k] = self.dec.decode(b)
                except msgspec.DecodeError:
                    log.warning("shared cache: undecodable entry for %r ignored", k)
        return out

    async def put_many(self, items: list[tuple[Any, int, Any]], ttls: list[float] | None = None) -> None:
        """Store ``(key, outcome, value)`` answers (found or not found) in one pipeline;
        ``ttls`` gives each item its own TTL instead of its outcome's (a token's expiry)."""
        pipe = self._client().pipeline(transaction=False)
        n = 0
        for i, (k, outcome, v) in enumerate(items):
            if ttls is not None:
                ttl = ttls[i]
            else:
                ttl = self.ttls[outcome] if outcome < len(self.ttls) else 0
            if ttl > 0:
                pipe.set(self.key(k), self.enc.encode((outcome, v)), px=max(1, int(ttl * 1000)))
                n += 1
        if n:
            await pipe.execute()

    async def close(self) -> None:
        """Close the connection pool."""
        if self.redis is not None:
            r, self.redis = self.redis, None
            await r.aclose()
