"""``collector demo``: the daemon on embedded defaults, driven for a few seconds.

::

    demo ──Popen──► collector serve --port 0 (its own process, workers under it)
      │  GET /ready (bounded wait)
      ├─► N keep-alive connections: POST /events/batch (100 generated events each)
      │     a live line: events/s, request latency, queue, per worker
      ├─► GET /metrics: the final figures; where the events went
      └─► SIGTERM: the daemon drains and exits 0

``collector demo casino`` runs seed 001's pack the same way (collector/commands/demo_casino.py),
``collector demo clickstream`` seed 002's (collector/commands/demo_clickstream.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from collector.commands.demo_parts import HttpClient, drive, get_json, start_daemon, stop_daemon

__all__ = ["HttpClient", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector demo``."""
    p.add_argument("pack", nargs="?", default="generic", choices=("generic", "casino", "clickstream"),
                   help="generic (seed 004, default), casino (seed 001: events and descriptions on stdout) "
                   "or clickstream (seed 002: tokens, page views, a table per event type)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load (default 5)")
    p.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections (default 8)")
    p.add_argument("--batch", type=int, default=100, help="events per POST /events/batch (default 100)")
    p.add_argument("--workers", type=int, default=None, help="daemon workers (default: one per CPU)")
    p.add_argument("--data-dir", default=None,
                   help="where the daemon writes (default ./collector-data; casino, clickstream: a new temporary folder)")
    p.add_argument("--invalid-every", type=int, default=500,
                   help="generic: one event in this many is invalid, to show validation and the dead-letter file (0: none)")
    p.add_argument("--rate", type=float, default=None,
                   help="events per second sent (0: as fast as the daemon answers; default 0, casino and clickstream 5000)")
    p.add_argument("--nats", metavar="URL", help="casino: publish to NATS JetStream and have the daemon consume it")
    p.add_argument("--pg", metavar="DSN", help="casino: players from this PostgreSQL database (migrated first)")
    p.add_argument("--pg-schema", default="public", help="casino: the players' schema with --pg (default public)")


def _bodies(batch: int, invalid_every: int, n: int = 64) -> list[bytes]:
    """Pre-encoded batch bodies (the server generates ids, so none repeat)."""
    from collector.packs.generic import generate_generic

    out = []
    k = 0
    for b in range(n):
        evs = generate_generic(batch, users=5000, seed=b, with_ids=False)
        for e in evs:
            k += 1
            if invalid_every and k % invalid_every == 0:
                e["type"] = "not_a_type"
        out.append(json.dumps({"events": evs}).encode())
    return out


def run(args: argparse.Namespace) -> int:
    """Start the daemon, drive it, print what happened, stop it."""
    import uvloop

    if args.pack == "casino":
        from collector.commands.demo_casino import run_casino

        return run_casino(args)
    if args.pack == "clickstream":
        from collector.commands.demo_clickstream import run_clickstream

        return run_clickstream(args)
    out = sys.stderr
    data_dir = Path(args.data_dir or "collector-data").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "demo-daemon.log"
    started = start_daemon(["--workers", str(args.workers)] if args.workers else [], data_dir, log_path, out)
    if started is None:
        return 1
    proc, port = started
    try:
        print(f"collector demo: daemon pid {proc.pid} ready on http://127.0.0.1:{port}; "
              f"{args.connections} connections x {args.batch}-event batches for {args.duration:.0f} s", file=out)
        bodies = _bodies(args.batch, args.invalid_every)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            res = runner.run(drive(port, args, out, lambda j: bodies[j % len(bodies)], args.rate or 0.0))
            m = runner.run(get_json(port, "/metrics"))
    finally:
        code = stop_daemon(proc)
    lat = res["latency"] or [0.0]
    print(f"\nsent {res['requests']:,} requests in {res['wall']:.1f} s: {res['accepted']:,} events accepted "
          f"({res['accepted'] / res['wall']:,.0f} events/s), {res['invalid']:,} invalid, "
          f"{res['errors']} non-2xx requests; request latency p50 {lat[len(lat) // 2] * 1000:.1f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms", file=out)
    print("final /metrics:", file=out)
    shown = {k: v for k, v in m.items() if k not in ("workers", "sinks") and v is not None}
    if shown.get("enrichment"):  # per lookup, without the latency histogram's buckets
        shown["enrichment"] = {n: {k: v for k, v in s.items() if k != "latency_buckets"}
                               for n, s in shown["enrichment"].items()}
    print(json.dumps(shown, indent=2))
    for s in m.get("sinks", []):
        print(f"  sink {s['name']}: {s['rows']:,} rows in {s['batches']:,} batches, {s['errors']} errors", file=out)
    files = sorted(p for p in data_dir.iterdir() if p.suffix == ".jsonl")
    print(f"output in {data_dir}:", file=out)
    for f in files:
        print(f"  {f.name}: {f.stat().st_size:,} bytes", file=out)
    print(f"  daemon log: {log_path.name}", file=out)
    print(f"the daemon stopped with exit code {code}", file=out)
    return 0 if code == 0 and res["accepted"] > 0 else 1


