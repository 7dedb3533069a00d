"""The in-memory dedup window as a worker drives it: its cost per id and its pauses.

    .venv/bin/python bench/dedup_window.py [--ids 1000000] [--chunk 1000] [--rounds 5] [--store table|dict]

A worker of the generic pack remembers up to ``dedup_max`` (1M) event ids, one chunk at
a time: ``window(events)`` (the check and the claim), then ``settle(events, True)``
once the sinks committed (remember). One process, new ids only (the daemon's case: it
makes them). Prints:

1. **full GC collection** with the window holding ``--ids`` ids, against an empty
   window: the cyclic GC walks every container it tracks, and the window's groups of
   ids are tuples, which it stops tracking (in lists, 1M ids made each collection
   25 ms, several a second under HTTP load: the daemon's p99);
2. **per id**, filling the window to its cap, then at the cap for as many ids again
   (each chunk remembered makes the oldest chunk's ids forgotten), and the chunks'
   p50 / p99 / max: the max is the dict's resize, which a table that keeps deleting
   and inserting cannot avoid.

``--store``: the window's ids in the C table (``idwindow.c``, the default when it is
built) or in the dict it replaced, to compare the two.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time

import msgspec

from collector.stages import Dedup


class Ev(msgspec.Struct, gc=False):
    id: str


def full_collection_ms(rounds: int) -> float:
    gc.collect()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


async def feed(window: object, first: int, ids: int, chunk: int) -> list[float]:
    """Chunks of new ids through the window; each chunk's seconds."""
    took = []
    for c in range(first, first + ids, chunk):
        events = [Ev(f"01a2323f-1019-786e-8811-{c + i:012x}") for i in range(chunk)]
        t = time.perf_counter()
        got = window(events)  # type: ignore[operator]
        if type(got) is not list:
            await got
        window.settle(events, True)  # type: ignore[attr-defined]
        took.append(time.perf_counter() - t)
    return took


def describe(what: str, took: list[float], chunk: int) -> str:
    s = sorted(took)
    return (f"{what}: {sum(took) / (len(took) * chunk) * 1e9:,.0f} ns per id; a chunk of {chunk}: "
            f"p50 {s[len(s) // 2] * 1e3:.2f} ms, p99 {s[int(len(s) * 0.99)] * 1e3:.2f} ms, max {s[-1] * 1e3:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=1_000_000, help="the window's cap (max_entries)")
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5, help="collections timed (median)")
    ap.add_argument("--store", choices=["table", "dict"], default="table",
                    help="the ids in the C table (default) or in a dict")
    a = ap.parse_args()
    empty = full_collection_ms(a.rounds)
    if a.store == "dict":
        from collector.stages import dedup_ids

        dedup_ids.IdWindow = None  # type: ignore[misc,assignment]
    window = Dedup(ttl=600, max_entries=a.ids).build()
    print(f"store: {type(window.ids).__name__}")
    filling = asyncio.run(feed(window, 0, a.ids, a.chunk))
    full = full_collection_ms(a.rounds)
    print(f"full gc.collect(): empty window {empty:.2f} ms; {a.ids:,} ids remembered {full:.2f} ms "
          f"(+{full - empty:.2f} ms)")
    at_cap = asyncio.run(feed(window, a.ids, a.ids, a.chunk))
    print(describe("filling to the cap", filling, a.chunk))
    print(describe("at the cap", at_cap, a.chunk))


if __name__ == "__main__":
    main()
