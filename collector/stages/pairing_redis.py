"""``Pair(store="redis")``: halves that do not pair within their chunk wait in Redis.

Seed 002's step 4 (pair within the batch, then look for the other half in Redis under
``pv:...``, store the ones without a pair, report what never paired), with every
step an atomic Redis command, so any number of workers and daemons share the store::

    chunk ─► pair within the chunk (memory, as store="memory") ─► paired records
          └► the rest, one pipelined round trip, one script per half (atomic):
               GETDEL {prefix}{other kind}:{key} ── found ─► ZREM its deadline ─► paired record
                                                 └─ none ──► SET {prefix}{kind}:{key} <msgpack> NX EX ttl+grace
                                                             ZADD {prefix}deadlines <deadline> {kind}:{key}
    expire(now), every tick and (at most once a tick) per chunk:
        ZRANGEBYSCORE {prefix}deadlines -inf now LIMIT 0 sweep_limit
        ─► per member, one script: still due? ZREM it, GETDEL its key ─► value: unpaired record

Key layout (``key`` values as a JSON array, ``kind`` is ``start`` or ``end``)::

    {prefix}start:["u1","pv-7"]   msgpack [arrival, event time, [carried values]]
    {prefix}end:["u1","pv-7"]     the same, for an end waiting for its start
    {prefix}deadlines             sorted set: member "start:[...]" / "end:[...]", score = arrival + ttl

Exactly once: a half is taken by exactly one GETDEL, in a pairing or in a sweep, so
across workers, daemons and restarts each start/end pair gives one record and each
unpaired half one unpaired record. ``SET NX``: a second copy of a waiting half is a
duplicate (the first waits on). The replay guard (a key paired within
``replay_ttl``) stays per worker: a half replayed to another worker or after a
restart waits in Redis and ends as an unpaired record. A half's key lives
``redis_grace`` seconds past its deadline, so a store no collector swept for that
long loses its unpaired records (never its paired ones).

Windows: a worker killed after a script took a half and before the chunk's commit
loses that record (the redelivered half waits again, and ends unpaired); a Redis
failure fails the chunk (its events are answered as errors; the client retries).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from ..protocol import ErrorRecord
from .pairing import Pair, PairRuntime, Pending
from .redis_scripts import ScriptClient

__all__ = ["PAIR_SCRIPT", "SWEEP_SCRIPT", "RedisPairRuntime"]

# KEYS: the other half, my half, the deadlines; ARGV: my value, EX seconds, my deadline,
# my member, the other half's member. {1, value}: paired; {0}: stored; {2}: a copy waits
PAIR_SCRIPT = """
local o = redis.call('GETDEL', KEYS[1])
if o then
  redis.call('ZREM', KEYS[3], ARGV[5])
  return {1, o}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
  return {0}
end
return {2}
"""
# KEYS: the half, the deadlines; ARGV: its member, now. The value when it was due and
# still there (taken: exactly one sweeper gets it), else false
SWEEP_SCRIPT = """
local s = redis.call('ZSCORE', KEYS[2], ARGV[1])
if s and tonumber(s) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return redis.call('GETDEL', KEYS[1])
end
return false
"""
MAX_SWEEP_ROUNDS = 10  # per expire call; the next tick goes on

_enc = msgspec.msgpack.Encoder()
_half = msgspec.msgpack.Decoder(tuple[float, float | None, list[Any]])
_json = msgspec.json.Encoder()
_key_dec = msgspec.json.Decoder(list[Any])


class RedisPairRuntime(PairRuntime):
    """One worker's view of a Redis-backed pairing (see the module docstring).

    ``__call__`` returns the drops, or a coroutine of them when halves go to Redis (or
    a sweep is due); ``expire(now)`` returns a coroutine. ``aclose()`` closes the
    client. Counters add ``stored`` (halves this worker left waiting in Redis).
    """

    shared_store = True

    def __init__(self, spec: Pair) -> None:
        self.scripts = ScriptClient(spec.redis_url, what=f"pair {spec.name!r} with store='redis'",
                                    timeout=10, connect_timeout=5)
        super().__init__(spec)
        p = spec.prefix
        self.k_start, self.k_end, self.k_deadlines = f"{p}start:", f"{p}end:", f"{p}deadlines"
        self.ex_start = max(1, math.ceil(spec.ttl + spec.redis_grace))
        self.ex_end = max(1, math.ceil(spec.orphan_ttl + spec.redis_grace))

    async def aclose(self) -> None:
        """Close the client (the worker calls this at its drain)."""
        await self.scripts.aclose()

    def __call__(self, events: list[Any]) -> Any:
        """Pair within the chunk; the rest goes to Redis (a coroutine of the drops then)."""
        now = self.clock()
        self._forget_due(now)
        sp = self.spec
        starts: dict[Any, Pending] = {}  # this chunk's unpaired halves
        ends: dict[Any, Pending] = {}
        matches, used = self._scan(events, starts, ends, now, None, None)
        if matches:
            self._matched(matches, now)
        drops = [ErrorRecord(i, "$", f"consumed by {sp.name}", "paired") for i in used]
        sweep = now - self.last_sweep >= sp.tick
        if not starts and not ends and not sweep:
            return drops
        return self._remote(starts, ends, drops, now, sweep)

    def _matched(self, matches: list[tuple[Any, Pending, Pending]], now: float) -> None:
        self._emit(matches)
        paired = [m[0] for m in matches]
        until = now + self.spec.replay_ttl
        self.done.update(dict.fromkeys(paired, until))
        self.order_d.append((until, paired))
        while len(self.done) > self.spec.max_pending and self.order_d:
            self._forget(*self.order_d.popleft())

    def _forget_due(self, now: float) -> None:
        od = self.order_d
        while od and od[0][0] <= now:
            self._forget(*od.popleft())

    async def _remote(
        self, starts: dict[Any, Pending], ends: dict[Any, Pending], drops: list[ErrorRecord], now: float,
        sweep: bool,
    ) -> list[ErrorRecord]:
        if starts or ends:
            await self._resolve(starts, ends, now)
        if sweep:
            await self.sweep(now)
        return drops

    async def _resolve(self, starts: dict[Any, Pending], ends: dict[Any, Pending], now: float) -> None:
        """One round trip: each half takes its other half from Redis, or waits there."""
        sp = self.spec
        calls: list[tuple[list[Any], list[Any]]] = []
        halves: list[tuple[Any, Pending, bool]] = []
        dl = self.k_deadlines
        for table, is_start in ((starts, True), (ends, False)):
            mine_k, other_k = (self.k_start, self.k_end) if is_start else (self.k_end, self.k_start)
            mine_m, other_m = ("start:", "end:") if is_start else ("end:", "start:")
            ttl, ex = (sp.ttl, self.ex_start) if is_start else (sp.orphan_ttl, self.ex_end)
            for key, p in table.items():
                ks = _json.encode(list(key)).decode()
                value = _enc.encode((p[0], p[1], list(p[2])))
                calls.append(([other_k + ks, mine_k + ks, dl], [value, ex, repr(p[0] + ttl), mine_m + ks, other_m + ks]))
                halves.append((key, p, is_start))
        results = await self.scripts.run_many(PAIR_SCRIPT, calls)
        matches: list[tuple[Any, Pending, Pending]] = []
        c = self.counters
        for (key, mine, is_start), res in zip(halves, results, strict=True):
            code = int(res[0])
            if code == 1:
                a, t, cv = _half.decode(res[1])
                other: Pending = (a, t, tuple(cv))
                matches.append((key, mine, other) if is_start else (key, other, mine))
            elif code == 0:
                c["stored"] += 1
            else:
                c["duplicate_start" if is_start else "duplicate_end"] += 1
        if matches:
            self._matched(matches, now)

    def expire(self, now: float) -> Any:
        """Forget old paired keys; a coroutine sweeping the halves due in Redis."""
        self._forget_due(now)
        return self.sweep(now)

    async def sweep(self, now: float) -> None:
        """Take every half whose deadline passed; each taken one becomes an unpaired record."""
        self.last_sweep = now
        r = self.scripts.client()
        sp = self.spec
        dl, limit = self.k_deadlines, sp.sweep_limit
        for _ in range(MAX_SWEEP_ROUNDS):
            members = await r.zrangebyscore(dl, "-inf", repr(now), start=0, num=limit)
            if not members:
                return
            prefix = sp.prefix.encode()
            values = await self.scripts.run_many(SWEEP_SCRIPT, [([prefix + m, dl], [m, repr(now)]) for m in members])
            c = self.counters
            for m, v in zip(members, values, strict=True):
                if v is None:
                    continue  # paired meanwhile, or another sweeper took it
                kind, _, ks = m.decode().partition(":")
                a, t, cv = _half.decode(v)
                start = kind == "start"
                key = tuple(_key_dec.decode(ks))
                c["expired" if start else "orphan"] += 1
                self._unpaired(key, (a, t, tuple(cv)), start, "expired" if start else "orphan_end")
            if len(members) < limit:
                return
