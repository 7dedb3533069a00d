"""Handing a blocking call to a sink's thread and back: ``python bench/sink_handoff.py``.

The JSONL sink writes on the worker's loop and hands each ``fdatasync`` to its own
thread. This times that hand-off, one call at a time on a uvloop loop (as a worker
under light load does it), two ways in alternating runs:

* ``pool``: ``loop.run_in_executor(ThreadPoolExecutor(1), fn)``, what the sinks used;
* ``sink thread``: ``SinkThread.run(fn)`` (collector/sinks/batching.py), what they use.

``fn`` is a no-op (the bare round trip) or a 100-byte ``os.write`` + ``os.fdatasync``
on a file in ``--dir``. Prints the wall time and the process's CPU time per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvloop

from collector.sinks.batching import SinkThread


async def timed(kind: str, fn: Callable[[], Any], n: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(1)
    thread = SinkThread("bench-sink")
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        if kind == "pool":
            await loop.run_in_executor(pool, fn)
        else:
            await thread.run(fn)
    wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    pool.shutdown()
    thread.shutdown()
    return wall, cpu


async def main(args: argparse.Namespace) -> None:
    fd = os.open(os.path.join(args.dir, "sink-handoff.dat"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def noop() -> None:
        return None

    def sync() -> None:
        os.write(fd, b"x" * 99 + b"\n")
        os.fdatasync(fd)

    try:
        for name, fn, n in (("no-op", noop, args.calls * 10), ("write + fdatasync", sync, args.calls)):
            for rnd in range(args.rounds):
                for kind in ("pool", "sink thread"):
                    wall, cpu = await timed(kind, fn, n)
                    print(f"{name:18} {kind:12} round {rnd + 1}: wall {wall * 1e6:6.1f} µs, CPU {cpu * 1e6:6.1f} µs per call")
    finally:
        os.close(fd)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="fdatasync calls per run (no-ops: 10x)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the synced file goes")
    uvloop.run(main(ap.parse_args()))
