"""The engine against its ceiling, same run: ``python bench/engine_ceiling.py [N]``.

Two comparisons, alternating runs (A B A B ...), medians of 5:

1. a list of ``PlaybackEvent`` Structs through ``Collector.handle()`` (2 workers,
   in-memory client) against two forked processes that each decode half of the
   events from JSON, enrich them from a dict and encode them again, with no IPC;
2. the same events as NDJSON bytes, with ``shard="key"`` and ``shard="chunk"``,
   against two processes that each decode half of the lines, enrich and count.

Peers get their half of the input for free; the collector does all its own splitting.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import Counter

import msgspec

from collector import Collector
from collector.playback import (
    InMemoryClient,
    PlaybackEvent,
    generate_events,
    model_of,
    playback_pipeline,
    region_of,
)


def _enrich(evs: list[PlaybackEvent]) -> None:
    reg: dict[str, str] = {}
    mod: dict[str, str] = {}
    for e in evs:
        r = reg.get(e.user_id)
        if r is None:
            r = reg[e.user_id] = region_of(e.user_id)
        m = mod.get(e.device_type)
        if m is None:
            m = mod[e.device_type] = model_of(e.device_type)
        e.region = r
        e.model = m


def _half_encode(body: bytes, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    evs = msgspec.json.Decoder(list[PlaybackEvent]).decode(body)
    _enrich(evs)
    msgspec.json.Encoder().encode(evs)


def _half_count(body: bytes, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    evs = msgspec.json.Decoder(PlaybackEvent).decode_lines(body)
    _enrich(evs)
    Counter(e.region for e in evs)
    Counter(e.device_type for e in evs)


def _split(target: object, halves: list[bytes]) -> float:
    ctx = mp.get_context("fork")  # the ceiling pays no interpreter start-up
    ps = [ctx.Process(target=target, args=(h, i % len(os.sched_getaffinity(0)))) for i, h in enumerate(halves)]
    t = time.perf_counter()
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    return time.perf_counter() - t


def _row(name: str, xs: list[float], ref: float) -> str:
    m = statistics.median(xs)
    return f"{name:44s} {m:>12,.0f} ev/s  {m / ref:5.2f}x  runs {[round(x / 1e3) for x in xs]}k"


def main(n: int) -> None:
    """Run both comparisons and print the table."""
    evs = generate_events(n)
    enc = msgspec.json.Encoder()
    halves = [enc.encode(evs[: n // 2]), enc.encode(evs[n // 2 :])]
    body = enc.encode_lines(evs).rstrip(b"\n")
    cut = body.find(b"\n", len(body) // 2)
    lines = [body[:cut], body[cut + 1 :]]
    res: dict[str, list[float]] = {k: [] for k in ("structs", "d-encode", "ndjson key", "ndjson chunk", "d-count")}
    cs = {m: Collector(playback_pipeline(InMemoryClient(), shard=m), workers=2) for m in ("key", "chunk")}
    for c in cs.values():
        c.start()
        c.handle(evs[:20_000]).wait()
    try:
        for _ in range(5):
            t = time.perf_counter()
            cs["key"].handle(evs).wait()
            res["structs"].append(n / (time.perf_counter() - t))
            res["d-encode"].append(n / _split(_half_encode, halves))
            for mode in ("key", "chunk"):
                t = time.perf_counter()
                assert cs[mode].handle(body).wait().handled_events == n
                res[f"ndjson {mode}"].append(n / (time.perf_counter() - t))
            res["d-count"].append(n / _split(_half_count, lines))
    finally:
        for c in cs.values():
            c.close()
    e, k = statistics.median(res["d-encode"]), statistics.median(res["d-count"])
    print(f"{n:,} playback events, 2 workers, medians of 5 alternating runs; ratio = row / its ceiling")
    print(_row("collector, list of Structs, shard=key", res["structs"], e))
    print(_row("(d) 2 procs: decode+enrich+encode, no IPC", res["d-encode"], e))
    print(_row("collector, NDJSON bytes, shard=key", res["ndjson key"], k))
    print(_row("collector, NDJSON bytes, shard=chunk", res["ndjson chunk"], k))
    print(_row("(d) 2 procs: decode lines+enrich+count", res["d-count"], k))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
