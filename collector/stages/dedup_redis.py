"""``Dedup(store="redis")``: one dedup window shared by every worker and collector.

::

    chunk ─► this worker's window: ids it committed (duplicate, no round trip), ids a chunk
          │  of this worker has in flight (wait for it, as store="memory"), missing keys (pass)
          └► the rest, one round trip: the claim script, per key
                 SET {key} p<token> NX PX pending_ttl GET
               nil   ─► claimed by this chunk: it stores the event
               "d"   ─► stored by another worker or collector: duplicate
               "p…"  ─► pending in another process: polled (one call per round for all
                        the chunk's waiting keys, 5 ms doubling to 100 ms) until "d"
                        (duplicate), gone (claimed here: the other one failed) or ``wait``
                        (kind retry: the client sends it again)
    sinks committed ─► settle(ok), one round trip (the settle script), awaited before the ack:
               stored:           SET {key} d PX <its type's TTL>
               failed, or dead-lettered by a sink:
                                 DEL {key}, only if it still holds p<token>

Key layout: ``{prefix}{value}`` for keys of ``field``, ``{prefix}{type}:{value}`` for
keys of ``key_by_type`` (a str value as it is, anything else as JSON). A chunk's keys
go to one script call, so on Redis Cluster they must share a slot: one server (or a
``{tag}`` in ``prefix``).

Why each step: SET NX makes one claimant per key across processes. The claim is a
*pending* marker, not the stored mark, so an event whose commit fails is not answered
``duplicate`` when it is retried, here or in another collector (ack after commit); its
``pending_ttl`` bounds how long a claim of a process that died blocks the key. The
stored mark is not guarded: the event is stored whatever the key now holds, so
writing "stored" is never wrong. The release is guarded by the claim's token (unique
per chunk claim: the worker's random id and a counter), so a late release never
deletes another claim or a stored mark. A settle that fails (Redis unreachable) is
kept and sent again before the next claim, or on the next tick. Scripts, not a
pipeline of one command per key: with redis-py, building and parsing 500 commands
costs far more than the round trip (``bench/dedup_redis.py`` measures both).

Redis unreachable (``timeout``): the chunk's new ids get ``on_unavailable`` — ``retry``
(not stored, the client retries) or ``pass`` (stored unchecked) — counted as
``unavailable`` and logged (once per 10 s); for a second after a failure Redis is not
tried (a down server costs no connect per chunk).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Collection
from operator import attrgetter
from typing import Any

import msgspec

from ..protocol import ErrorRecord
from .dedup import Claim, CountingDedupWindow, Dedup
from .redis_scripts import ScriptClient

__all__ = ["CLAIM_SCRIPT", "SETTLE_SCRIPT", "RedisDedupWindow"]

log = logging.getLogger("collector.dedup")

# KEYS: the chunk's keys; ARGV: the claim's pending value, its PX. Per key the old value
# (nil: claimed now). One call per chunk: a pipeline of one SET per key costs the client
# several times more CPU than the round trip itself (bench/dedup_redis.py)
CLAIM_SCRIPT = """
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = redis.call('SET', k, ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
end
return out
"""
# KEYS: keys of one claim; ARGV: its pending value, then per key a TTL in ms (marked
# stored, whatever the key holds: the event is stored) or 0 (released, only while the
# key still holds this claim's pending value)
SETTLE_SCRIPT = """
for i, k in ipairs(KEYS) do
  local ms = ARGV[i + 1]
  if ms == '0' then
    if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k) end
  else
    redis.call('SET', k, 'd', 'PX', ms)
  end
end
return #KEYS
"""
DONE = b"d"
POLL_FIRST, POLL_MAX = 0.005, 0.1  # seconds between polls of keys pending elsewhere
DOWN_FOR = 1.0  # after a failure, seconds during which Redis is not tried
LOG_EVERY = 10.0
MAX_BACKLOG = 100_000  # settle operations kept while Redis is down (the oldest go first)

_json = msgspec.json.Encoder()
Op = tuple[bytes, bytes, int]  # Redis key, its claim's token, TTL ms (stored) or 0 (release)


def _enc(v: Any) -> bytes:
    return v.encode() if type(v) is str else _json.encode(v)


class RedisDedupWindow(CountingDedupWindow):
    """One worker's view of a Redis-shared dedup window (see the module docstring).

    ``__call__`` returns the drops, or a coroutine of them when keys go to Redis;
    ``settle`` returns a coroutine (the worker awaits it before the ack) when the
    chunk claimed keys in Redis. ``expire`` (every tick) sends settle operations
    kept while Redis was down; ``aclose`` closes the client.
    """

    def __init__(self, spec: Dedup) -> None:
        # no retries inside the client: on_unavailable is the policy, and a down server
        # must cost one timeout, not a backoff series, per chunk
        self.scripts = ScriptClient(spec.redis_url, what=f"dedup {spec.name!r} with store='redis'",
                                    timeout=spec.timeout, retries=False)
        from redis.exceptions import RedisError

        super().__init__(spec)
        self.spec = spec
        self.errors = (RedisError, OSError, asyncio.TimeoutError)
        # the drops are counted once, after Redis answered too (the base would count the local ones)
        self.count_drops = self.on_drops
        self.on_drops = None
        self.prefix = spec.prefix.encode()
        self.pending_ms = max(1, math.ceil(spec.pending_ttl * 1000))
        self.worker_token = os.urandom(8).hex().encode()
        self.seq = 0
        self.backlog: list[Op] = []
        self.down_until = 0.0
        self.last_log = -math.inf
        self.unlogged = 0

    async def aclose(self) -> None:
        """Send what settles are left (briefly), then close the client (at the worker's drain)."""
        if self.scripts.open:
            if self.backlog:
                await self._flush()
            await self.scripts.aclose()

    def rkey(self, k: Any) -> bytes:
        """The Redis key of a window key (``(type, value)`` or a value)."""
        if type(k) is tuple:
            return self.prefix + str(k[0]).encode() + b":" + _enc(k[1])
        return self.prefix + _enc(k)

    def __call__(self, events: list[Any]) -> Any:
        """Drops for ``events``; a coroutine when keys go to Redis or wait for another chunk."""
        local = super().__call__(events)
        claim = self.claims.get(id(events))
        if claim is None or (not claim.keys and type(local) is list):
            if local and self.count_drops is not None:
                self.count_drops(events, local)
            return local
        return self._shared(events, claim, local)

    async def _shared(self, events: list[Any], claim: Claim, local: Any) -> list[ErrorRecord]:
        drops: list[ErrorRecord] = local if type(local) is list else await local
        if claim.keys:
            await self._claim(events, claim, drops)
            drops.sort(key=attrgetter("pos"))
        if drops and self.count_drops is not None:
            self.count_drops(events, drops)
        return drops

    async def _claim(self, events: list[Any], claim: Claim, drops: list[ErrorRecord]) -> None:
        """Claim the chunk's locally new keys in Redis; drops for the ones stored elsewhere."""
        self.seq += 1
        claim.token = b"p" + self.worker_token + b":" + str(self.seq).encode()
        keys = claim.keys
        todo: dict[Any, tuple[int, bytes, int]] = {}  # key → first position, Redis key, TTL ms
        for i, (e, k) in enumerate(zip(events, claim.all, strict=True)):
            if k in keys and k not in todo:
                todo[k] = (i, self.rkey(k), max(1, math.ceil(self.ttl_of(e) * 1000)))
        remote = claim.remote = {k: (rk, ms) for k, (_, rk, ms) in todo.items()}
        c = self.counters
        c["remote_checked"] += len(todo)
        if time.monotonic() < self.down_until:
            self._unavailable(claim, todo, drops, None)
            return
        deadline = time.monotonic() + self.wait
        delay = POLL_FIRST
        polled = False
        while todo:
            try:
                answers = await self._set_nx([rk for _, rk, _ in todo.values()], claim.token)
            except self.errors as e:
                self._unavailable(claim, todo, drops, e)
                return
            waiting: dict[Any, tuple[int, bytes, int]] = {}
            for (k, item), old in zip(todo.items(), answers, strict=True):
                if old is None:
                    continue  # claimed: this chunk stores it
                if old == DONE:
                    drops.append(self._dup(item[0], k))
                    keys.discard(k)
                    del remote[k]
                    c["remote_duplicates"] += 1
                else:
                    waiting[k] = item
            if not waiting:
                return
            if not polled:
                c["remote_waits"] += len(waiting)
                polled = True
            left = deadline - time.monotonic()
            if left <= 0:
                field = self.field
                for k, (i, _, _) in waiting.items():
                    drops.append(ErrorRecord(
                        i, f"$.{field}",
                        f"{field} {k!r} is still being stored by another collector or worker; retry later", "retry"))
                    keys.discard(k)
                    del remote[k]
                return
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, POLL_MAX)
            todo = waiting

    async def _set_nx(self, rkeys: list[bytes], token: bytes) -> list[Any]:
        """One round trip: ``SET NX PX GET`` of every key (the claim script); the old values."""
        if self.backlog:  # settles kept while Redis was down go first (their own round trip)
            await self._apply([])
        self.counters["round_trips"] += 1
        return list(await self.scripts.run(CLAIM_SCRIPT, rkeys, [token, self.pending_ms]))

    def _unavailable(self, claim: Claim, todo: dict[Any, tuple[int, bytes, int]], drops: list[ErrorRecord],
                     e: BaseException | None) -> None:
        """Redis did not answer for ``todo``: apply ``on_unavailable``, count, log."""
        self.counters["unavailable"] += len(todo)
        if e is not None:
            self.down_until = time.monotonic() + DOWN_FOR
        self._log(e, f"{len(todo)} ids passed unchecked" if self.spec.on_unavailable == "pass"
                  else f"{len(todo)} ids answered retry")
        if self.spec.on_unavailable == "pass":
            return  # kept claimed: settle marks them stored (or releases them) once Redis answers
        remote = claim.remote or {}
        if e is not None:  # the SETs may have landed before the failure: released later, if still ours
            self._defer([(rk, claim.token, 0) for _, rk, _ in todo.values()])
        why = f"the shared dedup store is unavailable ({type(e).__name__ if e else 'down'}); retry later"
        for k, (i, _, _) in todo.items():
            drops.append(ErrorRecord(i, f"$.{self.field}", why, "retry"))
            claim.keys.discard(k)
            remote.pop(k, None)

    def _log(self, e: BaseException | None, what: str) -> None:
        now = time.monotonic()
        if now - self.last_log < LOG_EVERY:
            self.unlogged += 1
            return
        more = f" ({self.unlogged} more since the last report)" if self.unlogged else ""
        log.warning("dedup %r: Redis at %s unavailable (%s): %s%s", self.spec.name, self.spec.redis_url,
                    f"{type(e).__name__}: {e}" if e else "not tried for a second after a failure", what, more)
        self.last_log = now
        self.unlogged = 0

    def settle(self, events: list[Any], ok: bool, failed: Collection[Any] = ()) -> Any:
        """Remember or release locally (the base), then in Redis: a coroutine when the
        chunk claimed keys there (marked stored with their TTL, or released)."""
        claim = self.claims.get(id(events))
        super().settle(events, ok, failed)
        if claim is None or not claim.remote:
            return None
        token = claim.token
        if ok:
            gone = set(self.keys_of(list(failed))) if failed else set()
            ops: list[Op] = [(rk, token, 0 if k in gone else ms) for k, (rk, ms) in claim.remote.items()]
        else:
            ops = [(rk, token, 0) for rk, _ in claim.remote.values()]
        return self._settle(ops)

    async def _settle(self, ops: list[Op]) -> None:
        if time.monotonic() < self.down_until:
            self._defer(ops)
            return
        try:
            await self._apply(ops)
        except self.errors as e:
            self.counters["settle_errors"] += 1
            self.down_until = time.monotonic() + DOWN_FOR
            self._log(e, f"{len(ops)} ids kept to mark stored or release later")

    async def _apply(self, ops: list[Op]) -> None:
        """Mark stored / release ``ops`` and the kept ones: one settle script per claim
        token (one call for a chunk; more only when kept ones go along); raises when
        Redis fails, after keeping them all for later."""
        ops, self.backlog = self.backlog + ops, []
        by_token: dict[bytes, tuple[list[bytes], list[int]]] = {}
        for rk, token, ms in ops:
            keys, args = by_token.setdefault(token, ([], []))
            keys.append(rk)
            args.append(ms)
        try:
            for token, (keys, args) in by_token.items():
                self.counters["round_trips"] += 1
                await self.scripts.run(SETTLE_SCRIPT, keys, [token, *args])
        except BaseException:
            self._defer(ops)  # all again: marking stored and releasing twice is harmless
            raise

    def _defer(self, ops: list[Op]) -> None:
        self.backlog += ops
        over = len(self.backlog) - MAX_BACKLOG
        if over > 0:  # bounded: their pending markers expire after pending_ttl instead
            del self.backlog[:over]
            self.counters["settle_errors"] += over

    async def _flush(self) -> None:
        try:
            await self._apply([])
        except Exception:  # at the drain: nothing more to do than what _settle logged
            log.debug("dedup %r: flushing kept settles failed", self.spec.name, exc_info=True)

    def expire(self, now: float) -> Any:
        """Every tick: send the settles kept while Redis was down (a coroutine), else None."""
        if self.backlog and time.monotonic() >= self.down_until:
            return self._flush()
        return None
