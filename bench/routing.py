"""The sink set's own cost per commit of 1000 events, with and without routes:
``python bench/routing.py [--runs R] [--commits N]``.

A benchmark, not a test. Sinks are no-op sinks that only read the chunk's JSON (what
every real sink pays), so the figures are the :class:`~collector.sinks.sinkset.SinkSet`'s
fan-out, routing and bookkeeping, not a store's. Scenarios:

* ``plain``: one sink, no routes (the path every pipeline without route rules takes);
* ``plain x2``: two sinks, no routes (one shared encoding);
* ``routed x2``: two sinks, every other event routed to the second only (a sub-batch
  and its own encoding for each sink, positions mapped back).

Run it on the parent commit too (``git stash``; it checks whether ``commit`` takes
``routes``) to compare the no-route path before and after routing existed.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import statistics
import time
from typing import Any

from collector.playback import PlaybackEvent, generate_events
from collector.sinks import JsonlSinkConfig, SinkSet
from collector.sinks.base import EventCodec, Sink


class NullSink(Sink):
    """Reads the chunk's JSON lines, stores nothing."""

    kind = "null"

    async def write(self, batch: Any) -> None:
        batch.ndjson  # noqa: B018 - the encoding every real sink pays


async def _time(ss: Any, events: list[Any], routes: Any, runs: int, commits: int) -> tuple[float, float]:
    res = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(commits):
            await (ss.commit(events, routes) if routes is not None else ss.commit(events))
        res.append((time.perf_counter() - t0) / commits * 1e6)
    return statistics.median(res), min(res)


def _sinkset(n: int, default_second: bool = True) -> Any:
    codec = EventCodec(PlaybackEvent, "id")
    sinks = []
    for i in range(n):
        extra = {} if default_second or i == 0 else {"default": False}  # no such option before routing
        cfg = JsonlSinkConfig(name=f"s{i}", path="/dev/null", **extra)
        sinks.append(NullSink(cfg, name=f"s{i}", codec=codec, worker=0))
    return SinkSet(sinks, None, codec, None, 0)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--commits", type=int, default=300)
    a = ap.parse_args()
    events = generate_events(1000, seed=1)
    routed = "routes" in inspect.signature(_sinkset(1).commit).parameters
    print(f"SinkSet.commit of 1000 events, µs (median, best of {a.runs} runs of {a.commits} commits)"
          f"{'' if routed else ' [before routing]'}")
    for label, ss, routes in (
        ("plain", _sinkset(1), None),
        ("plain x2", _sinkset(2), None),
        *((("routed x2", _sinkset(2, default_second=False),
            [frozenset({"s1"}) if i % 2 else None for i in range(len(events))]),) if routed else ()),
    ):
        med, best = await _time(ss, events, routes, a.runs, a.commits)
        print(f"  {label:10} {med:8.1f} {best:8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
