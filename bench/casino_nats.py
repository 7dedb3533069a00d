"""Seed 001's full path through the daemon: ``python bench/casino_nats.py [--events N] [--per-message K]``.

A benchmark, not a test. It fills a JetStream stream of its own with N generated casino
events (``collector publish casino``, K events per message as NDJSON; subjects by type),
migrates the players into a PostgreSQL schema of its own, then starts ``collector serve``
with the casino pack (rates from the built-in service, players from PostgreSQL, never
cached; the six aggregates; every final event on stdout, sent to a file) consuming the
stream with a durable pull consumer, and times it from the daemon being ready to every
message acknowledged (``GET /ingress``: acked, nothing pending). The stream, the
consumer and the schema are deleted after. Prints events/s and messages/s.

Needs NATS (``COLLECTOR_TEST_NATS``, default ``nats://127.0.0.1:4222``) and PostgreSQL
(``COLLECTOR_TEST_PG``, default ``postgresql://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from collector.commands.demo_parts import get_json, jetstream_stream, start_daemon, stop_daemon
from collector.commands.publish import publish_events
from collector.packs.casino import migrate

NATS = os.environ.get("COLLECTOR_TEST_NATS", "nats://127.0.0.1:4222")
PG = os.environ.get("COLLECTOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")



async def _drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _until_done(port: int, messages: int, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        ing = await get_json(port, "/ingress")
        if (ing.get("acked", 0) >= messages and ing.get("messages_inflight") == 0) or time.monotonic() > deadline:
            return ing
        await asyncio.sleep(0.05)


def main() -> int:
    """Fill the stream, run the daemon on it, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--per-message", type=int, default=100, help="events per NATS message, as NDJSON (100)")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    tag = uuid.uuid4().hex[:8]
    stream, prefix, schema = f"CASINO_BENCH_{tag}", f"casino_bench_{tag}", f"casino_bench_{tag}"
    data = Path(tempfile.mkdtemp(prefix="casino-nats-bench-"))
    asyncio.run(jetstream_stream(NATS, stream, [f"{prefix}.>"]))
    try:
        t0 = time.monotonic()
        pub = argparse.Namespace(pack="casino", file=None, to=NATS, subject=f"{prefix}.{{type}}", rate=0.0,
                                 count=a.events, per_message=a.per_message, id_field="id", stream=stream,
                                 users=1000, quiet=True)
        events, messages, _, _ = asyncio.run(publish_events(pub))
        print(f"published {events:,} events in {messages:,} messages in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        asyncio.run(migrate(PG, schema))
        cfg = data / "casino.toml"
        cfg.write_text('[pipeline]\npack = "casino"\n[pipeline.options]\n'
                       f"players_dsn = {json.dumps(PG)}\nplayers_schema = {json.dumps(schema)}\n"
                       '[[sinks]]\nkind = "stdout"\n')
        args = ["--config", str(cfg), "--workers", str(a.workers), "--source", NATS, "--stream", stream,
                "--subject", f"{prefix}.>", "--durable", f"bench-{tag}"]
        started = start_daemon(args, data, data / "daemon.log", sys.stderr, stdout_path=data / "events.jsonl")
        if started is None:
            return 1
        proc, port = started
        try:
            t0 = time.monotonic()
            ing = asyncio.run(_until_done(port, messages, timeout=600))
            took = time.monotonic() - t0
        finally:
            code = stop_daemon(proc)
        lines = (data / "events.jsonl").read_bytes().count(b"\n")
        print(f"casino daemon, {a.workers} workers, NATS source ({a.per_message} events per message), players from "
              f"PostgreSQL (uncached), stdout: {events:,} events in {took:.2f} s = {events / took:,.0f} events/s, "
              f"{messages / took:,.0f} messages/s; {lines:,} lines on stdout; acked {ing.get('acked')}; exit {code}")
        return 0 if code == 0 and lines == events else 1
    finally:
        asyncio.run(jetstream_stream(NATS, stream, [], delete=True))
        asyncio.run(_drop_schema(schema))


if __name__ == "__main__":
    sys.exit(main())
