"""The worker's full GC collection while the dedup window remembers many ids.

    .venv/bin/python bench/dedup_gc.py [--ids 1000000] [--chunk 1000] [--rounds 5]

A worker of the generic pack remembers up to ``dedup_max`` (1M) event ids. The cyclic
GC walks every container it tracks on a full (generation 2) collection; if the window
kept its ids in tracked containers, each full collection walked all of them, and under
HTTP load those ran every few hundred milliseconds: 20 ms pauses of the whole worker,
which set the daemon's batched p99 (27 ms at p50 6 ms). This fills a window as a worker
does (call, then settle as committed, one chunk at a time), then times ``gc.collect()``
against the same collection with an empty window, in one process. Prints milliseconds,
the median of ``--rounds``.
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


async def fill(window: object, ids: int, chunk: int) -> None:
    for c in range(0, ids, chunk):
        events = [Ev(f"01a2323f-1019-786e-8811-{c + i:012x}") for i in range(chunk)]
        got = window(events)  # type: ignore[operator]
        if type(got) is not list:
            await got
        window.settle(events, True)  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    empty = full_collection_ms(a.rounds)
    window = Dedup(ttl=600, max_entries=a.ids * 2).build()
    asyncio.run(fill(window, a.ids, a.chunk))
    full = full_collection_ms(a.rounds)
    print(f"full gc.collect(): empty window {empty:.2f} ms; {a.ids:,} ids remembered {full:.2f} ms "
          f"(+{full - empty:.2f} ms)")


if __name__ == "__main__":
    main()
