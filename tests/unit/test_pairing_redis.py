"""``Pair(store="redis")``: the runtime against a real Redis, clocks patched.

Two runtimes stand for two workers (or daemons) sharing the store.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from test_pairing import T0, Clock, ev

from collector.stages.pairing import Pair
from collector.stages.pairing_redis import PAIR_SCRIPT, RedisPairRuntime


def rpair(clock: Clock, url: str, prefix: str, **kw: Any) -> RedisPairRuntime:
    spec = Pair(key=("user_id", "data.page_view_id"), carry=("data.page_type",), clock=clock,
                store="redis", redis_url=url, prefix=prefix, **kw)
    rt = spec.build()
    assert isinstance(rt, RedisPairRuntime)
    return rt


async def call(rt: RedisPairRuntime, events: list[Any]) -> Any:
    res = rt(events)
    return res if isinstance(res, list) else await res


def test_a_chunk_that_pairs_in_itself_needs_no_round_trip(redis_url: str, prefix: str) -> None:
    rt = rpair(Clock(), redis_url, prefix)
    rt.last_sweep = T0  # a sweep is not due
    assert rt([ev("end", "u1", "a", T0 + 3), ev("start", "u1", "a", T0)]) == []
    (rec,) = rt.drain()
    assert rec.paired and rec.duration_seconds == 3.0 and rec.fields == {"data.page_type": "movie"}


def test_halves_pair_across_workers_and_keys_are_cleaned_up(redis_url: str, prefix: str) -> None:
    import redis

    clock = Clock()

    async def go() -> None:
        a, b = rpair(clock, redis_url, prefix), rpair(clock, redis_url, prefix)
        await call(a, [ev("start", "u1", "x", T0, "promotion"), ev("end", "u2", "y", T0 + 6)])
        await call(a, [ev("start", "u1", "x", T0 + 1)])  # a second start: the first waits on
        assert a.drain() == [] and a.stats()["stored"] == 2 and a.stats()["duplicate_start"] == 1
        await call(b, [ev("end", "u1", "x", T0 + 10), ev("start", "u2", "y", T0)])
        got = {r.key: r for r in b.drain()}
        assert got[("u1", "x")].duration_seconds == 10.0 and got[("u1", "x")].fields == {"data.page_type": "promotion"}
        assert got[("u2", "y")].duration_seconds == 6.0 and b.stats()["paired"] == 2
        await a.aclose()
        await b.aclose()

    asyncio.run(go())
    r = redis.Redis.from_url(redis_url)
    try:
        assert list(r.scan_iter(match=prefix + "*")) == []  # halves and deadlines gone
    finally:
        r.close()


def test_expiry_takes_each_half_exactly_once_across_workers(redis_url: str, prefix: str) -> None:
    clock = Clock()
    n = 500

    async def go() -> None:
        rts = [rpair(clock, redis_url, prefix, ttl=60.0, orphan_ttl=30.0, sweep_limit=64) for _ in range(3)]
        await call(rts[0], [ev("start", f"u{i}", "p", T0) for i in range(n)])
        await call(rts[1], [ev("end", "v", "q", T0)])
        clock.t = T0 + 30  # the orphan end is due, the starts not yet
        await asyncio.gather(*(rt.expire(clock.t) for rt in rts))
        assert [r.reason for rt in rts for r in rt.drain()] == ["orphan_end"]
        clock.t = T0 + 60
        await asyncio.gather(*(rt.expire(clock.t) for rt in rts), *(rt.expire(clock.t) for rt in rts))
        recs = [r for rt in rts for r in rt.drain()]
        assert Counter(r.key for r in recs) == Counter({(f"u{i}", "p"): 1 for i in range(n)})
        assert all(r.reason == "expired" and not r.paired and r.start_time == T0 for r in recs)
        assert sum(rt.stats()["expired"] for rt in rts) == n
        await call(rts[2], [ev("end", "u1", "p", T0 + 70)])  # too late: waits as an end now
        assert rts[2].drain() == [] and rts[2].stats()["stored"] == 1
        for rt in rts:
            await rt.aclose()

    asyncio.run(go())


def test_a_script_redis_forgot_is_loaded_again(redis_url: str, prefix: str) -> None:
    async def go() -> None:
        rt = rpair(Clock(), redis_url, prefix)
        await call(rt, [ev("start", "u1", "a", T0)])
        rt.scripts.shas[PAIR_SCRIPT] = "0" * 40  # as after a Redis restart or SCRIPT FLUSH
        await call(rt, [ev("end", "u1", "a", T0 + 1)])
        assert [r.duration_seconds for r in rt.drain()] == [1.0]
        await rt.aclose()

    asyncio.run(go())
