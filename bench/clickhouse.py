"""Rows/s into ClickHouse through ``Collector.handle``: ``python bench/clickhouse.py [--events N] [--runs R]``.

A benchmark, not a test. Clickstream-like events (``bench/click_events.py``, seven
types, no enrichment) go from 2 workers to the clickhouse sink at
``COLLECTOR_CLICKHOUSE_URL`` (default ``http://127.0.0.1:8123``), into a fresh
database dropped afterwards. Scenarios: ``inmem`` (no sink: the reference), ``fixed``
(one table) and ``per-type`` (``table = "cs_{event}"``: a table per event type, so
every chunk is split in seven). Each run sends fresh ids; timing is
``handle()`` to ``wait()`` (every row acknowledged by ClickHouse). The median of the
runs is printed with the rows counted in ClickHouse afterwards (``uniqExact(id)``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import urllib.request
import uuid

from click_events import click_pipeline, make_clicks

from collector import Collector
from collector.sinks import ClickhouseSinkConfig

URL = os.environ.get("COLLECTOR_CLICKHOUSE_URL", "http://127.0.0.1:8123")


def query(sql: str) -> str:
    req = urllib.request.Request(URL.rstrip("/") + "/", data=sql.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(r.read().decode())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=ClickhouseSinkConfig().connections)
    ap.add_argument("--chunk-size", type=int, default=2048)
    args = ap.parse_args()
    db = f"bench_{uuid.uuid4().hex[:8]}"
    print(f"ClickHouse {query('SELECT version()').strip()} at {URL}; {args.events} events x {args.runs} runs, "
          f"{args.workers} workers, chunk {args.chunk_size}, {args.connections} connections each")
    try:
        for scenario, table in (("inmem", ""), ("fixed", "events"), ("per-type", "cs_{event}")):
            cfg = ClickhouseSinkConfig(url=URL, database=db, table=table or "events", connections=args.connections)
            p = click_pipeline((cfg,) if table else ())
            rates = []
            with Collector(p, workers=args.workers, chunk_size=args.chunk_size) as c:
                c.handle(make_clicks(2000, start=10**9)).wait(timeout=60)  # warm up, create tables
                for r in range(args.runs):
                    events = make_clicks(args.events, start=r * args.events)
                    t0 = time.perf_counter()
                    res = c.handle(events).wait(timeout=600)
                    dt = time.perf_counter() - t0
                    assert res.failed_events == 0, res
                    rates.append(args.events / dt)
            if not table:
                print(f"{scenario:9s} median {statistics.median(rates):>10,.0f} events/s (no sink: the engine's own cost)")
                continue
            names = query(f"SELECT name FROM system.tables WHERE database = '{db}'").split()
            names = [n for n in names if (n == "events") == (scenario == "fixed")]
            stored = sum(int(query(f"SELECT uniqExact(id) FROM {db}.{n}")) for n in names)
            print(f"{scenario:9s} median {statistics.median(rates):>10,.0f} rows/s  "
                  f"(runs: {', '.join(f'{x:,.0f}' for x in rates)}); {len(names)} table(s), {stored} distinct ids stored")
    finally:
        query(f"DROP DATABASE IF EXISTS {db}")


if __name__ == "__main__":
    main()
