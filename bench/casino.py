"""Events/s through the casino pipeline (seed 001): ``python bench/casino.py [--events N] [--runs R]``.

A benchmark, not a test. An embedded ``Collector`` (2 workers) runs the casino pipeline:
validation, ``amount_eur`` from the built-in rates service (table cached 60 s), ``player``
(the seed rows in memory, or ``--pg``: PostgreSQL, never cached, one query per chunk),
the description, seed 001's six aggregates, and a JSONL sink (``fsync="never"``) in place
of stdout. Start-up and a warm-up run are not timed; each timed run is ``handle()`` to
``wait()`` of N fresh events (every event committed by the sink). The median of R runs
is reported. ``--pg`` migrates the players into a schema of its own and drops it after
(``COLLECTOR_TEST_PG``, default ``postgresql://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid

from collector import Collector
from collector.casino import casino_pipeline, generate_casino
from collector.packs.casino import builtin_rates_url, migrate
from collector.sinks import JsonlSinkConfig

PG = os.environ.get("COLLECTOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def run(players: str, events: int, runs: int, workers: int, dsn: str = "", schema: str = "public") -> list[float]:
    """Events/s of each timed run."""
    with tempfile.TemporaryDirectory() as tmp:
        sink = JsonlSinkConfig(path=f"{tmp}/casino-{{worker}}.jsonl", fsync="never")
        p = casino_pipeline(builtin_rates_url(), players_dsn=dsn, players_schema=schema, sinks=(sink,))
        out = []
        with Collector(p, workers=workers) as c:
            c.handle(generate_casino(2000, seed=1)).wait(timeout=120)  # warm: pools, rates table
            for r in range(runs):
                evs = generate_casino(events, seed=100 + r, start_id=(r + 1) * 10**9)
                t0 = time.perf_counter()
                res = c.handle(evs).wait(timeout=600)
                dt = time.perf_counter() - t0
                assert res.handled_events == events and res.failed_events == 0, res.errors[:3]
                out.append(events / dt)
                print(f"  {players:<10} run {r + 1}: {events / dt:>9,.0f} events/s ({dt:.2f} s)", flush=True)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pg", action="store_true", help="also with the players in PostgreSQL")
    args = ap.parse_args()
    figures = {"memory": run("memory", args.events, args.runs, args.workers)}
    if args.pg:
        schema = "bench_casino_" + uuid.uuid4().hex[:8]
        asyncio.run(migrate(PG, schema))
        try:
            figures["postgresql"] = run("postgresql", args.events, args.runs, args.workers, PG, schema)
        finally:
            asyncio.run(_drop(schema))
    print(f"casino pipeline, {args.workers} workers, {args.events:,} events per run, median of {args.runs}:")
    for name, v in figures.items():
        print(f"  players from {name:<10} {statistics.median(v):>9,.0f} events/s (min {min(v):,.0f}, max {max(v):,.0f})")
    return 0


async def _drop(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG)
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


if __name__ == "__main__":
    raise SystemExit(main())
