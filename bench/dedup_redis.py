"""Shared dedup: ``Dedup(store="memory")`` against ``store="redis"`` (a plain script).

    .venv/bin/python bench/dedup_redis.py [--redis redis://127.0.0.1:6379/0] [--events 100000] [--rounds 3]

1. The window as the worker drives it (call, then settle as committed), one process,
   chunks of 500 events and of 1 event (the daemon's single-event path):
   ``memory``; ``redis cold`` (every id new: one claim round trip and one settle round
   trip per chunk); ``redis warm`` (every id committed by this window before: answered
   by the local window, no round trip); ``redis elsewhere`` (every id stored by another
   window: one round trip, Redis answers duplicate, nothing to settle); and
   ``redis cold, Lua settle`` (the stored mark guarded by the claim's token in a Lua
   script per key, the alternative to the plain ``SET`` the stage uses).
2. The in-memory path of a real Collector (no sinks, 2 workers, chunks of 2048,
   sharded by id): events/s with dedup in memory, Redis cold (new ids) and Redis warm
   (the same batch again: duplicates the workers' windows answer), and the round trips
   per chunk from the stage's counters.

Figures are events/s, the best of ``--rounds`` runs; Redis on the same machine
(loopback). Keys go under a fresh prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from collector import Collector, Pipeline
from collector.stages import Dedup
from collector.stages.dedup_redis import RedisDedupWindow

RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class BenchEvent(msgspec.Struct):
    id: str
    type: str = "attempt"


class Pipelined(RedisDedupWindow):
    """The variant measured against: a pipeline of one command per key (claim: ``SET NX
    PX GET``; stored: ``SET PX``; release: a one-key script), one round trip each."""

    async def _set_nx(self, rkeys: list[bytes], token: bytes) -> list[Any]:
        if self.backlog:
            await self._apply([])
        pipe = self.scripts.client().pipeline(transaction=False)
        for rk in rkeys:
            pipe.set(rk, token, nx=True, px=self.pending_ms, get=True)
        self.counters["round_trips"] += 1
        return list(await pipe.execute())

    async def _apply(self, ops: list[Any]) -> None:
        ops, self.backlog = self.backlog + ops, []
        pipe = self.scripts.client().pipeline(transaction=False)
        for rk, token, ms in ops:
            if ms:
                pipe.set(rk, b"d", px=ms)
            else:
                pipe.eval(RELEASE, 1, rk, token)
        self.counters["round_trips"] += 1
        await pipe.execute()


async def drive(w: Any, chunks: list[list[BenchEvent]]) -> float:
    """Seconds to run and commit every chunk as the worker does."""
    gc.collect()
    t = time.perf_counter()
    for ch in chunks:
        d = w(ch)
        if type(d) is not list:
            await d
        s = w.settle(ch, True)
        if s is not None:
            await s
    return time.perf_counter() - t


def chunks_of(tag: str, n: int, size: int) -> list[list[BenchEvent]]:
    return [[BenchEvent(f"{tag}-{c}-{i}") for i in range(size)] for c in range(max(1, n // size))]


async def window_case(url: str, prefix: str, n: int, size: int, r: int) -> dict[str, tuple[float, float]]:
    """events/s and round trips per chunk of each window variant."""
    out: dict[str, tuple[float, float]] = {}
    mem = Dedup(ttl=300).build()
    spec = Dedup(ttl=300, store="redis", redis_url=url, prefix=prefix)
    cases: list[tuple[str, Callable[[], Any], str]] = [  # (name, make a window, id tag)
        ("memory", lambda: mem, "m"),
        ("redis cold", spec.build, "c"),
        ("redis cold, pipelined per key", lambda: Pipelined(spec), "p"),
    ]
    for name, make, tag in cases:
        w = make()
        ch = chunks_of(f"{r}{tag}{size}", n, size)
        secs = await drive(w, ch)
        rt = getattr(w, "counters", {}).get("round_trips", 0) / len(ch)
        out[name] = (len(ch) * size / secs, rt)
        if name == "redis cold":  # the same ids again, this window: its local window answers
            before = w.counters["round_trips"]
            secs = await drive(w, ch)
            out["redis warm (local window)"] = (len(ch) * size / secs, (w.counters["round_trips"] - before) / len(ch))
            other: Any = spec.build()  # another worker or collector: Redis answers
            secs = await drive(other, ch)
            out["redis elsewhere (remote dup)"] = (len(ch) * size / secs, other.counters["round_trips"] / len(ch))
            await other.aclose()
        if hasattr(w, "aclose"):
            await w.aclose()
    return out


def collector_case(url: str, prefix: str, n: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Through a Collector's in-memory path: events/s, and round trips per chunk (redis)."""
    out: dict[str, tuple[float, float]] = {}
    for store in ("memory", "redis"):
        st = Dedup(ttl=300, store=store, redis_url=url, prefix=prefix)
        p = Pipeline("bench-dedup", BenchEvent, key="id", stages=(st,))
        with Collector(p, workers=2) as c:
            c.handle([BenchEvent(f"warmup-{i}") for i in range(4096)]).wait(timeout=120)
            for r in range(rounds):
                batch = [BenchEvent(f"{store}-{r}-{i}") for i in range(n)]
                for label, expect_dups in (("cold", 0), ("warm", n)):
                    rt0 = c.aggregate("dedup", counters=True)["round_trips"] if store == "redis" else 0
                    ch0 = c.stats().chunks
                    t = time.perf_counter()
                    res = c.handle(batch).wait(timeout=600)
                    secs = time.perf_counter() - t
                    assert len(res.errors) == expect_dups, (store, label, len(res.errors))
                    key = f"{store} {label}" if store == "redis" else f"memory {label}"
                    rate = n / secs
                    if store == "redis":  # counters are published every snapshot interval
                        time.sleep(1.2)
                        rt = c.aggregate("dedup", counters=True)["round_trips"] - rt0
                        rt_per = rt / max(1, c.stats().chunks - ch0)
                    else:
                        rt_per = 0.0
                    if rate > out.get(key, (0.0, 0.0))[0]:
                        out[key] = (rate, rt_per)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    prefix = f"bench:dedup:{uuid.uuid4().hex[:8]}:"
    try:
        for size, n in ((500, a.events), (1, a.events // 50)):
            best: dict[str, tuple[float, float]] = {}
            for r in range(a.rounds):
                for k, v in asyncio.run(window_case(a.redis, prefix, n, size, r)).items():
                    if v[0] > best.get(k, (0.0, 0.0))[0]:
                        best[k] = v
            print(f"window, chunks of {size}:")
            for k, (eps, rt) in best.items():
                print(f"  {k:30s} {eps:>10,.0f} events/s   {rt:4.2f} round trips/chunk")
        print("Collector in-memory path, 2 workers, chunks of 2048:")
        for k, (eps, rt) in collector_case(a.redis, prefix, a.events, a.rounds).items():
            extra = f"   {rt:4.2f} round trips/chunk" if k.startswith("redis") else ""
            print(f"  {k:30s} {eps:>10,.0f} events/s{extra}")
    finally:
        import redis

        client = redis.Redis.from_url(a.redis)
        keys = list(client.scan_iter(match=prefix + "*", count=10_000))
        for i in range(0, len(keys), 10_000):
            client.delete(*keys[i:i + 10_000])
        client.close()


if __name__ == "__main__":
    main()
