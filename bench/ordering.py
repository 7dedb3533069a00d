"""Added cost per event of an ``Order`` stage on the in-memory path (a plain script).

    .venv/bin/python bench/ordering.py [--events 200000] [--rounds 5]

Events of 10,000 users with a float ``ts``, in chunks of 2048, through ``Order(by="ts")``
as the worker runs it: the stage call, then the worker's part (the chunk permuted with
its positions; with a buffer: the drain and ``settle_records`` after the commit). Four
cases: no buffer on input already in time order; no buffer on chunks shuffled within
themselves; a buffer (``max_delay`` 5 s of event time) on time-ordered input; a
buffer on input shuffled within 2-second windows (every event waits, released by the
watermark). Reports ns per event: the median of ``--rounds`` runs in CPU time
(``time.process_time``).

A loaded or shared machine inflates every figure alike, so the script also times a
plain Python loop reading one attribute per event (about 10-15 ns on an idle modern
core): the stage's cost divided by it is the figure to compare across machines.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import msgspec

from collector.benchmarks.common import attribute_read_ns
from collector.stages.ordering import Order, OrderRuntime


class Reading(msgspec.Struct):
    id: int
    user_id: str
    ts: float


def events(n: int, shuffle: float, seed: int = 1) -> list[Reading]:
    """``n`` readings 1 ms apart; ``shuffle`` > 0: shuffled within windows that long (s)."""
    rnd = random.Random(seed)
    evs = [Reading(i, f"u{rnd.randrange(10_000)}", i * 0.001) for i in range(n)]
    if shuffle:
        w = int(shuffle / 0.001)
        for i in range(0, n, w):
            part = evs[i:i + w]
            rnd.shuffle(part)
            evs[i:i + w] = part
    return evs


def one_pass(rt: OrderRuntime, chunks: list[list[Any]]) -> int:
    """The chunks through the stage as the worker does; the events that came out."""
    out = 0
    for ch in chunks:
        ch = list(ch)
        dropped = rt(ch)
        perm = rt.take_order()
        if perm is not None:  # the runner's permutation of the events and their positions
            ch = list(map(ch.__getitem__, perm))
            list(map(range(len(perm)).__getitem__, perm))
        if type(dropped) is not list:  # held: the chunk would wait for its events' commit
            dropped.close()
        recs = rt.drain()
        if recs:
            rt.settle_records(recs, True)
            out += len(recs)
        else:
            out += len(ch)
    return out


def case(name: str, spec: Order, evs: list[Reading], rounds: int) -> float:
    chunks = [evs[i:i + 2048] for i in range(0, len(evs), 2048)]
    times = []
    for _ in range(rounds):
        rt = spec.build()
        t0 = time.process_time()
        one_pass(rt, chunks)
        times.append((time.process_time() - t0) / len(evs) * 1e9)
    st = rt.stats()
    print(f"{name:44} {statistics.median(times):6.0f} ns/event (best {min(times):.0f}); "
          f"reordered {st['reordered']}, late {st['late']}, held at the end {st['held']}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    ordered, shuffled = events(a.events, 0), events(a.events, 2.0)
    plain = Order(by="ts", key="user_id")
    buffered = Order(by="ts", key="user_id", max_delay=5.0, max_held=1_000_000)
    chunks = [ordered[i:i + 2048] for i in range(0, len(ordered), 2048)]
    r = attribute_read_ns(chunks, "ts", a.rounds)  # calibration
    print(f"calibration: a Python loop reading one attribute: {r:.1f} ns/event; "
          f"{a.events} events of 10,000 users, chunks of 2048")
    for name, spec, evs in (
        ("no buffer, input in time order", plain, ordered),
        ("no buffer, chunks shuffled within 2 s", plain, shuffled),
        ("buffer max_delay=5 s, input in time order", buffered, ordered),
        ("buffer max_delay=5 s, shuffled within 2 s", buffered, shuffled),
    ):
        ns = case(name, spec, evs, a.rounds)
        print(f"{'':44} = {ns / r:.0f} attribute reads")


if __name__ == "__main__":
    main()
