"""``collector demo casino``: seed 001's pack, end to end, for a few seconds, no server needed.

::

    players: collector migrate --pack casino (created and seeded if missing) in
                PostgreSQL (--pg DSN) or in players.db (SQLite) in the data directory
    [--nats URL] a stream of its own (CASINO_DEMO_<hex>, subjects casino_demo_<hex>.{type})
    demo ──Popen──► collector serve --config casino-demo.toml (pack casino, a stdout sink)
      │              [--source URL --stream ... --durable ...]; its stdout ─► casino-events.jsonl
      ├─► the generator: POST /events/batch (or publish to the stream) at --rate events/s
      │     the live line: events/s, in flight (and the stream's lag)
      ├─► GET /materialized once every event is counted (bounded wait)
      ├─► SIGTERM: the daemon drains and exits 0
      └─► a few lines of its stdout: the final events with their descriptions
    [--nats URL] the stream is deleted

Without ``--pg`` the five seed players are read from SQLite; without ``--nats`` the
events go through HTTP ingest. The rates come from the built-in rates service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from collector.commands.demo_parts import (
    drive,
    get_json,
    jetstream_stream,
    live_line,
    start_daemon,
    stop_daemon,
)

__all__ = ["run_casino"]

DEFAULT_RATE = 5000.0  # events/s; the seed's generator makes about 20


def _config(args: argparse.Namespace, players: str) -> str:
    """The daemon's TOML: the casino pack, its events on stdout only, players from ``players``."""
    lines = ['[pipeline]', 'pack = "casino"', "", "[pipeline.options]"]
    lines += [f"players_dsn = {json.dumps(players)}", f"players_schema = {json.dumps(args.pg_schema)}"]
    lines += ["", "[[sinks]]", 'kind = "stdout"', ""]
    return "\n".join(lines)


def _samples(lines: list[str], n: int = 6) -> list[str]:
    """Up to ``n`` of the final events: one of each type (a won bet too, if any), then the last ones."""
    picked: dict[str, str] = {}
    for ln in reversed(lines):
        try:
            e = json.loads(ln)
        except ValueError:
            continue
        kind = "won bet" if e.get("has_won") else e.get("type", "")
        picked.setdefault(kind, ln)
    out = list(picked.values())
    out += [ln for ln in lines[-n:] if ln not in out]
    return out[:n]



async def _publish(url: str, stream: str, subject: str, rate: float, duration: float, port: int,
                   out: Any) -> int:
    from collector.commands.publish import publish_events

    ns = argparse.Namespace(pack="casino", file=None, to=url, subject=subject, rate=rate,
                            count=max(1, int(rate * duration)), per_message=1, id_field="id", stream=stream,
                            users=1000, quiet=True)
    pub = asyncio.create_task(publish_events(ns))
    await live_line(port, time.monotonic() + duration, out)
    events, _, _, _ = await pub
    return events


async def _until_counted(port: int, total: int, timeout: float) -> dict[str, Any]:
    """``/materialized`` once it counts ``total`` events (or after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        view = await get_json(port, "/materialized")
        if view["events_total"] >= total or time.monotonic() > deadline:
            return view
        await asyncio.sleep(0.2)


def run_casino(args: argparse.Namespace) -> int:
    """Migrate (with --pg), start the daemon, drive it, show the view and sample events, stop it."""
    import uvloop

    out = sys.stderr
    rate = DEFAULT_RATE if args.rate is None else args.rate
    if args.nats and rate <= 0:
        rate = DEFAULT_RATE  # a published run needs a count: rate x duration
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="collector-demo-casino-")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    from collector.packs.casino import migrate

    # players: PostgreSQL with --pg, else a SQLite file in the data directory, both
    # created and seeded as `collector migrate --pack casino` does
    players = args.pg or f"sqlite://{data_dir / 'players.db'}"
    where = f"PostgreSQL, schema {args.pg_schema}" if args.pg else f"SQLite {data_dir / 'players.db'}"
    steps = asyncio.run(migrate(players, args.pg_schema))
    print(f"collector demo: players in {where}: " + ("; ".join(steps) if steps else "up to date"), file=out)
    cfg = data_dir / "casino-demo.toml"
    cfg.write_text(_config(args, players))
    serve_args = ["--config", str(cfg)] + (["--workers", str(args.workers)] if args.workers else [])
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"CASINO_DEMO_{tag}", f"casino_demo_{tag}"
    if args.nats:
        asyncio.run(jetstream_stream(args.nats, stream, [f"{prefix}.>"]))
        serve_args += ["--source", args.nats, "--stream", stream, "--subject", f"{prefix}.>",
                       "--durable", f"casino-demo-{tag}"]
    events_path, log_path = data_dir / "casino-events.jsonl", data_dir / "daemon.log"
    try:
        started = start_daemon(serve_args, data_dir, log_path, out, stdout_path=events_path)
        if started is None:
            return 1
        proc, port = started
        try:
            via = f"published to NATS stream {stream}" if args.nats else "POST /events/batch"
            print(f"collector demo: daemon pid {proc.pid} ready on http://127.0.0.1:{port}; casino events "
                  f"{via} at {f'{rate:,.0f}/s' if rate else 'full speed'} for {args.duration:.0f} s "
                  f"(players: {'PostgreSQL' if args.pg else 'SQLite'})", file=out)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                if args.nats:
                    sent = runner.run(_publish(args.nats, stream, f"{prefix}.{{type}}", rate, args.duration, port, out))
                else:
                    sent = runner.run(drive(port, args, out, _bodies(args.batch), rate))["accepted"]
                view = runner.run(_until_counted(port, sent, timeout=60))
        finally:
            code = stop_daemon(proc)
    finally:
        if args.nats:
            asyncio.run(jetstream_stream(args.nats, stream, [], delete=True))
    lines = [ln for ln in events_path.read_text().splitlines() if ln.strip()]
    missing = sum("not found" in ln for ln in log_path.read_text().splitlines())
    print(f"\nsent {sent:,} events; {len(lines):,} final events on the daemon's stdout ({events_path}); "
          f"{missing:,} lookups of players not in the table logged ({log_path})", file=out)
    print("GET /materialized:")
    print(json.dumps(view, indent=2))
    print("sample events (the daemon's stdout):")
    for ln in _samples(lines):
        print(ln)
    print(f"the daemon stopped with exit code {code}", file=out)
    return 0 if code == 0 and sent > 0 and view["events_total"] == sent == len(lines) else 1


def _bodies(batch: int) -> Any:
    """``body(j)``: request j's batch of generated casino events, ids unique to this run."""
    from collector.packs.casino import generate_casino

    start = time.time_ns() // 1000  # ids of later runs are larger

    def body(j: int) -> bytes:
        return json.dumps({"events": generate_casino(batch, seed=j, start_id=start + j * batch)}).encode()

    return body
