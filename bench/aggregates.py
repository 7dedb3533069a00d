"""Per-event cost of aggregate stages and of pairing, in one process (a plain script).

    .venv/bin/python bench/aggregates.py [--events 1000000] [--pairs 500000] [--rounds 3] [--pair-stores memory,sqlite]

1. The worker's in-memory playback path over chunks of 2048: decode the JSON chunk
   into ``PlaybackEvent`` Structs, fill region and model from a warm dict cache (the
   one-pass loop of the engine ceiling), count by device type and region. Then the
   same with four ``Aggregate`` stages run on each chunk: a global count, a count per
   region, the top 10 users by count and a 60 s moving rate. Reports µs per event of
   both, the aggregates' own cost, and events/s with aggregates as a share of without.
2. With ``--engine``: the same events as NDJSON bytes through a real ``Collector``
   (2 workers, in-memory client, shard by user) with and without the four stages,
   alternating runs: events/s (wall). The engine runs stages before enrichment
   today, so there the per-region count sees the empty region.
3. ``Pair`` over start/end events (half starts, half ends, ends shuffled up to 2048
   positions after their start), chunks of 2048: events per second, for each store of
   ``--pair-stores`` (``memory``; ``sqlite``: in wall time, a fresh state file).

Every figure is the median of ``--rounds`` runs, in CPU time (``time.process_time``):
on a shared machine wall time mostly measures the neighbours.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import msgspec

from collector.playback import PlaybackEvent, generate_events, model_of, region_of
from collector.stages.aggregates import Aggregate
from collector.stages.pairing import Pair
from collector.stages.windows import Sliding

CHUNK = 2048


def aggregates() -> list[Aggregate]:
    """The issue's three aggregates and the moving rate."""
    return [
        Aggregate("events", "count"),
        Aggregate("by_region", "count", by="region"),
        Aggregate("top_users", "top_k", by="user_id", k=10),
        Aggregate("rate_60s", "rate", window=Sliding(60.0, 1.0)),
    ]


def playback_pass(chunks: list[bytes], stages: list[Callable[[list[Any]], Any]]) -> tuple[float, float]:
    """Seconds for the worker's path over ``chunks`` running ``stages``, and inside the stages."""
    dec = msgspec.json.Decoder(list[PlaybackEvent])
    regions: dict[str, str] = {}
    models: dict[str, str] = {}
    for c in chunks:  # warm caches, as a running worker has them
        for e in dec.decode(c):
            regions.setdefault(e.user_id, region_of(e.user_id))
            models.setdefault(e.device_type, model_of(e.device_type))
    dev, reg = attrgetter("device_type"), attrgetter("region")
    gc.collect()
    clock = time.process_time  # CPU time: the machine is shared, wall time is noise
    inside = 0.0
    t0 = clock()
    for c in chunks:
        events = dec.decode(c)
        for e in events:
            e.region = regions[e.user_id]
            e.model = models[e.device_type]
        if stages:
            s0 = clock()
            for stage in stages:
                stage(events)
            inside += clock() - s0
        _ = dict(Counter(map(dev, events))), dict(Counter(map(reg, events)))
    return clock() - t0, inside


def pair_events(n: int, seed: int = 0) -> list[list[Any]]:
    """``n`` start/end events in chunks of 2048, each end shortly after its start."""

    class Data(msgspec.Struct):
        page_view_id: str
        page_type: str

    class Click(msgspec.Struct):
        event: str
        user_id: str
        timestamp: float
        data: Data

    rnd = random.Random(seed)
    evs: list[tuple[float, Click]] = []
    t = 1.7e9
    for i in range(n // 2):
        u, pv = f"user-{rnd.randrange(50_000)}", f"pv-{i}"
        d = Data(pv, "movie")
        evs.append((i, Click("page_view_start", u, t + i * 0.01, d)))
        evs.append((i + rnd.uniform(0, CHUNK / 2), Click("page_view_end", u, t + i * 0.01 + 30, d)))
    evs.sort(key=lambda x: x[0])
    flat = [e for _, e in evs]
    return [flat[i : i + CHUNK] for i in range(0, len(flat), CHUNK)]


def pair_pass(chunks: list[list[Any]], store: str = "memory") -> float:
    """Seconds to pair all chunks with a fresh runtime: CPU seconds of this process, or
    wall seconds for ``store="sqlite"`` (its file I/O is part of the cost; a fresh file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        extra = {"store": "sqlite", "state_path": f"{tmp}/pairs.sqlite3"} if store == "sqlite" else {}
        rt = Pair(key=("user_id", "data.page_view_id"), carry=("data.page_type",), **extra).build()
        clock = time.perf_counter if store == "sqlite" else time.process_time
        gc.collect()
        t0 = clock()
        for c in chunks:
            rt(c)
            rt.drain()
        dt = clock() - t0
        assert rt.stats()["paired"] == sum(map(len, chunks)) // 2, rt.stats()
        getattr(rt, "close", lambda: None)()
    return dt


def engine_pass(body: bytes, n: int, with_stages: bool) -> float:
    """Wall seconds of the second ``handle()`` of ``body`` through a fresh 2-worker collector."""
    import dataclasses

    from collector import Collector
    from collector.playback import InMemoryClient, playback_pipeline

    pipe = playback_pipeline(InMemoryClient())
    if with_stages:
        pipe = dataclasses.replace(pipe, stages=tuple(aggregates()))
    with Collector(pipe, workers=2) as c:
        c.handle(body).wait(timeout=600)  # warm the lookup caches: the timed run hits them all
        t0 = time.perf_counter()
        res = c.handle(body).wait(timeout=600)
        dt = time.perf_counter() - t0
    assert res.handled_events == n, res
    return dt


def main() -> None:
    """Run both benchmarks and print their medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--pairs", type=int, default=500_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", action="store_true", help="also run through a real Collector")
    ap.add_argument("--pair-stores", default="memory", help="pairing stores to measure: memory, sqlite (comma-separated)")
    a = ap.parse_args()
    enc = msgspec.json.Encoder()
    evs = generate_events(a.events, users=50_000, device_types=200, seed=1)
    chunks = [enc.encode(evs[i : i + CHUNK]) for i in range(0, len(evs), CHUNK)]
    del evs
    base: list[float] = []
    full: list[float] = []
    own: list[float] = []
    for _ in range(a.rounds):  # alternate, so both see the same machine
        base.append(playback_pass(chunks, [])[0])
        total, inside = playback_pass(chunks, [s.build() for s in aggregates()])
        full.append(total)
        own.append(inside)
    b, f, o = statistics.median(base), statistics.median(full), statistics.median(own)
    n = a.events
    print(f"playback path, {n:,} events, chunks of {CHUNK}, median of {a.rounds}:")
    print(f"  without aggregates    {b / n * 1e6:6.3f} µs/event  {n / b:12,.0f} events/s")
    print(f"  with 3 aggr. + rate   {f / n * 1e6:6.3f} µs/event  {n / f:12,.0f} events/s  (ratio {b / f:.2f})")
    print(f"  inside the 4 stages   {o / n * 1e6:6.3f} µs/event  (ratio from it: {b / (b + o):.2f})")
    if a.engine:
        body = b"\n".join(enc.encode(e) for e in generate_events(n, users=50_000, device_types=200, seed=1))
        plain: list[float] = []
        staged: list[float] = []
        for _ in range(a.rounds):
            plain.append(engine_pass(body, n, False))
            staged.append(engine_pass(body, n, True))
        p, q = statistics.median(plain), statistics.median(staged)
        print(f"engine (2 workers, NDJSON, shard by user), median of {a.rounds}, wall:")
        print(f"  without stages {n / p:12,.0f} events/s")
        print(f"  with the four  {n / q:12,.0f} events/s  (ratio {p / q:.2f})")
    pchunks = pair_events(a.pairs)
    for store in a.pair_stores.split(","):
        pt = statistics.median(pair_pass(pchunks, store) for _ in range(a.rounds))
        print(f"pairing ({store} store), {a.pairs:,} start/end events: {pt / a.pairs * 1e6:.3f} µs/event, "
              f"{a.pairs / pt:,.0f} events/s")


if __name__ == "__main__":
    main()
