"""``collector demo clickstream``: seed 002's pack, end to end, for a few seconds, no server needed.

::

    demo ── the built-in auth service (a thread here): tokens for 300 users
      ├─Popen──► collector serve --config clickstream-demo.toml (pack clickstream, role all:
      │            auth via that service, one SQLite table per event type in the data dir)
      ├─► generated sessions: POST /events/batch at --rate events/s, the live line
      ├─► GET /metrics: duplicates and sequence gaps
      ├─► SIGTERM: the daemon drains and exits 0
      └─► rows per table, read from the SQLite file, and a paired page_view
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from collector.commands.demo_parts import drive, get_json, start_daemon, stop_daemon

__all__ = ["run_clickstream"]

DEFAULT_RATE = 5000.0  # events/s; the seed asks for 660


def _config(verify_url: str, key: str) -> str:
    return "\n".join([
        "[pipeline]", 'pack = "clickstream"', "", "[pipeline.options]",
        f"auth_url = {json.dumps(verify_url)}", f"auth_key = {json.dumps(key)}", "",
    ])


def _bodies(batch: int, tokens: dict[str, str]) -> Any:
    """``body(j)``: the next batch of generated session events (ids unique to the run)."""
    from collector.packs.clickstream_gen import SessionStream

    # one stream for every connection: a page view started in one request ends in a
    # later one, as it does when real clients send
    stream = SessionStream(seed=time.time_ns(), tokens=tokens)

    def body(j: int) -> bytes:
        return json.dumps({"events": stream.take(batch)}).encode()

    return body


def _tables(db: Path) -> tuple[dict[str, int], str | None]:
    """Rows per table of the demo's SQLite file, and one paired page_view."""
    con = sqlite3.connect(db)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        counts = {n: con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
        sample = None
        if "page_view" in counts:
            row = con.execute("SELECT event FROM page_view WHERE json_extract(event, '$.data.paired') "
                              "ORDER BY json_extract(event, '$.data.duration_seconds') DESC LIMIT 1").fetchone()
            sample = row[0] if row else None
        return counts, sample
    finally:
        con.close()


def run_clickstream(args: argparse.Namespace) -> int:
    """Start the auth service and the daemon, drive it, show the tables, stop both."""
    import uvloop

    from collector.sources.auth import AuthService

    out = sys.stderr
    rate = DEFAULT_RATE if args.rate is None else args.rate
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="collector-demo-clickstream-")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    svc = AuthService()
    with svc.running():
        tokens = {f"user-{i}": svc.issue(f"user-{i}", ttl=3600)[0] for i in range(300)}
        cfg = data_dir / "clickstream-demo.toml"
        cfg.write_text(_config(svc.verify_url, svc.key))
        serve_args = ["--config", str(cfg)] + (["--workers", str(args.workers)] if args.workers else [])
        started = start_daemon(serve_args, data_dir, data_dir / "daemon.log", out)
        if started is None:
            return 1
        proc, port = started
        try:
            print(f"collector demo: daemon pid {proc.pid} ready on http://127.0.0.1:{port}; generated sessions "
                  f"(30 % anonymous) POST /events/batch at {f'{rate:,.0f}/s' if rate else 'full speed'} "
                  f"for {args.duration:.0f} s; auth service {svc.verify_url}", file=out)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                res = runner.run(drive(port, args, out, _bodies(args.batch, tokens), rate))
                metrics = runner.run(get_json(port, "/metrics"))
        finally:
            code = stop_daemon(proc)
        calls = svc.calls
    lat = res["latency"] or [0.0]
    print(f"\nsent {res['requests']:,} requests: {res['accepted']:,} events accepted "
          f"({res['accepted'] / max(res['wall'], 1e-9):,.0f} events/s), {res['invalid']:,} invalid, "
          f"{res['errors']} non-2xx; request latency p50 {lat[len(lat) // 2] * 1000:.1f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms; the auth service was called {calls:,} times "
          f"for {len(tokens)} users' tokens", file=out)
    integrity = {k: v for k, v in metrics.items() if k in ("duplicates", "gaps", "integrity")}
    if integrity:
        print("data integrity (GET /metrics):", json.dumps(integrity), file=out)
    db = data_dir / "clickstream.db"
    counts, sample = _tables(db) if db.exists() else ({}, None)
    print(f"rows per table in {db}:")
    for name, n in counts.items():
        print(f"  {name:<16} {n:>9,}")
    if sample:
        print(f"a paired page view: {sample}")
    print(f"the daemon stopped with exit code {code}", file=out)
    stored = sum(n for t, n in counts.items() if t != "page_view")
    return 0 if code == 0 and res["accepted"] > 0 and stored == res["accepted"] else 1
