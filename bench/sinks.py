"""Events/s into each sink from 2 workers: ``python bench/sinks.py [--events N] [--runs R]``.

A benchmark, not a test. One collector per scenario is started up front (start-up is
not timed), then the scenarios run in turn, R rounds (A B C ... A B C ...), and the
median of each is reported with its ratio to ``inmem`` (the same pipeline with no
sink: the engine's own cost). Each run sends fresh ids, so the idempotent sinks
insert every row rather than skip duplicates. Timing is ``handle()`` to ``wait()``:
every event committed by every worker, acknowledged, and the operation complete.

Scenarios (``--scenarios``, comma-separated):

=============== =================================================================
inmem           no sink
jsonl           one JSON-lines file per worker, ``fsync="batch"``
jsonl-nofsync   one file per worker, ``fsync="never"`` (survives a process crash, not a power loss)
jsonl-shared    one file for both workers (appends under ``flock``)
sqlite          one database per worker (``{worker}`` in the path), WAL, NORMAL
sqlite-shared   one database for both workers (writers take turns on its lock)
postgres        asyncpg binary COPY into staging, ``INSERT ... ON CONFLICT``
mysql           aiomysql multi-row ``INSERT IGNORE`` into seed 004's table
=============== =================================================================

PostgreSQL and MariaDB addresses come from ``COLLECTOR_TEST_PG`` and
``COLLECTOR_TEST_MYSQL`` (the test defaults otherwise); a scenario whose server is
down is skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import msgspec

from collector import Collector
from collector.playback import InMemoryClient, generate_events, playback_pipeline
from collector.sinks import JsonlSinkConfig, MysqlSinkConfig, PostgresSinkConfig, SqliteSinkConfig

PG = os.environ.get("COLLECTOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL = os.environ.get("COLLECTOR_TEST_MYSQL", "mysql://root@127.0.0.1:3306/test")
ALL = ("inmem", "jsonl", "jsonl-nofsync", "jsonl-shared", "sqlite", "sqlite-shared", "postgres", "mysql")


def _up(url: str) -> str | None:
    u = urlsplit(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 0), timeout=1):
            return None
    except OSError as e:
        return str(e)


def sink_for(name: str, tmp: str, table: str) -> tuple[Any, ...]:
    """The sinks of scenario ``name``."""
    if name == "inmem":
        return ()
    if name == "jsonl":
        return (JsonlSinkConfig(path=f"{tmp}/events-{{worker}}.jsonl", max_bytes=0),)
    if name == "jsonl-nofsync":
        return (JsonlSinkConfig(path=f"{tmp}/events-nofsync-{{worker}}.jsonl", max_bytes=0, fsync="never"),)
    if name == "jsonl-shared":
        return (JsonlSinkConfig(path=f"{tmp}/events-shared.jsonl", max_bytes=0),)
    if name == "sqlite":
        return (SqliteSinkConfig(path=f"{tmp}/events-{{worker}}.db", table=table),)
    if name == "sqlite-shared":
        return (SqliteSinkConfig(path=f"{tmp}/events.db", table=table),)
    if name == "postgres":
        return (PostgresSinkConfig(dsn=PG, table=table),)
    if name == "mysql":
        return (MysqlSinkConfig(dsn=MYSQL, table=table, default_type="user_action", default_source="web"),)
    raise SystemExit(f"unknown scenario {name!r} (choose from {', '.join(ALL)})")


def drop_tables(table: str, kinds: set[str]) -> None:
    """Remove the benchmark's tables from the servers."""
    if "postgres" in kinds:
        import asyncpg

        async def pg() -> None:
            conn = await asyncpg.connect(PG)
            try:
                await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
                await conn.execute("DELETE FROM collector_migrations WHERE target = $1", f"public.{table}")
            finally:
                await conn.close()

        with contextlib.suppress(Exception):
            asyncio.run(pg())
    if "mysql" in kinds:
        import pymysql

        u = urlsplit(MYSQL)
        with contextlib.suppress(Exception):
            conn = pymysql.connect(host=u.hostname, port=u.port or 3306, user=u.username or "root",
                                   password=u.password or "", database=u.path.lstrip("/"))
            with conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS `{table}`")
            conn.close()


def main() -> int:
    """Run the scenarios and print the table (and JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000, help="events per run (default 200000)")
    ap.add_argument("--runs", type=int, default=5, help="rounds; the median is reported (default 5)")
    ap.add_argument("--chunk-size", type=int, default=2048, help="events per chunk = per sink batch (default 2048)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scenarios", default=",".join(ALL))
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args()
    names = [s for s in args.scenarios.split(",") if s]
    skipped = {}
    for n, url in (("postgres", PG), ("mysql", MYSQL)):
        if n in names and (why := _up(url)):
            skipped[n] = why
    names = [n for n in names if n not in skipped]
    tmp = tempfile.mkdtemp(prefix="collector-bench-sinks-")
    table = "bench_" + uuid.uuid4().hex[:10]
    times: dict[str, list[float]] = {n: [] for n in names}
    collectors: dict[str, Collector] = {}
    try:
        for n in names:
            p = playback_pipeline(InMemoryClient(), sinks=sink_for(n, tmp, table))
            c = Collector(p, workers=args.workers, chunk_size=args.chunk_size)
            c.start()
            collectors[n] = c
            c.handle(generate_events(2000, start_id=10**12)).wait(timeout=120)  # warm: pools, tables
        print(f"{args.events} events per run, {args.workers} workers, chunk (= sink batch) {args.chunk_size}, "
              f"{args.runs} alternating rounds over {', '.join(names)}", file=sys.stderr)
        next_id = 0
        for r in range(args.runs):
            for n in names:
                events = generate_events(args.events, seed=r, start_id=next_id)
                next_id += args.events
                t0 = time.perf_counter()
                res = collectors[n].handle(events).wait(timeout=600)
                dt = time.perf_counter() - t0
                assert res.handled_events == args.events and res.failed_events == 0, (n, res.failed_events)
                times[n].append(dt)
                print(f"  round {r + 1} {n:14s} {args.events / dt:>12,.0f} events/s", file=sys.stderr)
    finally:
        for c in collectors.values():
            c.close()
        drop_tables(table, set(names))
        shutil.rmtree(tmp, ignore_errors=True)
    rates = {n: args.events / statistics.median(ts) for n, ts in times.items()}
    ref = rates.get("inmem")
    # spread: (max - min) / median of the rates, how noisy the machine was for that row
    spread = {n: (args.events / min(ts) - args.events / max(ts)) / rates[n] for n, ts in times.items()}
    print(f"\n| sink | events/s (median of {args.runs}) | vs inmem | spread |")
    print("|---|---:|---:|---:|")
    for n, v in rates.items():
        ratio = f"{v / ref:.2f}" if ref else ""
        print(f"| {n} | {v:,.0f} | {ratio} | {spread[n]:.0%} |")
    for n, why in skipped.items():
        print(f"| {n} | skipped: {why} | | |")
    if args.json:
        print(msgspec.json.encode({"events": args.events, "chunk_size": args.chunk_size, "workers": args.workers,
                                   "rates": rates, "spread": spread, "skipped": skipped}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
