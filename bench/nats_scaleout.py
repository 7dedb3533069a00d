"""Scale-out on one JetStream durable: ``python bench/nats_scaleout.py [--daemons 1,2,3]``.

A benchmark, not a test. For each shape (1 event per message, 100 events per message)
and each daemon count K it publishes N messages to a fresh stream, starts K
``collector serve`` daemons (1 worker each) without a source, then adds the same
``[source]`` (one durable consumer) to every config and sends SIGHUP to all of them at
once, so they start consuming within milliseconds of each other. Timed: from the first
delivery (the consumer's ``num_pending`` drops) to the drain (``num_pending`` and
``num_ack_pending`` both 0: every message acknowledged, i.e. every event committed to
its daemon's JSONL sink). The ledger then counts the stored events (none lost).

The pipeline (``pack = "nats_scaleout:pipeline"``, this module) is the generic one with
its lookup bound by latency, not CPU: the simulated enrichment service answers after
``--latency`` seconds (5 ms), at most ``--concurrency`` calls in flight per worker, no
cache, no dedup; so one daemon's ceiling is about concurrency / latency events/s and K
daemons should reach K times that while the CPU has room. ``--latency 0`` shows the
CPU-bound case, where on a 2-core machine more daemons only share the same cores.
Needs the server at ``COLLECTOR_NATS_URL`` (default ``nats://127.0.0.1:4222``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def pipeline() -> Any:
    """The benchmark's pipeline, built in each daemon from ``$SCALEOUT_LATENCY`` and ``$SCALEOUT_CONCURRENCY``."""
    from collector.generic import generic_pipeline

    p = generic_pipeline(enrich_latency=float(os.environ.get("SCALEOUT_LATENCY", "0.005")), cache_ttl=0, dedup_ttl=0)
    conc = int(os.environ.get("SCALEOUT_CONCURRENCY", "8"))
    return dataclasses.replace(p, lookups=tuple(dataclasses.replace(lk, concurrency=conc, cache=False)
                                                for lk in p.lookups))


def _config(sink: Path, source: dict[str, Any] | None) -> str:
    lines = ["[pipeline]", 'pack = "nats_scaleout:pipeline"', "[[sinks]]", 'kind = "jsonl"',
             f"path = {json.dumps(str(sink))}", 'fsync = "never"', "[log]", 'level = "warning"']
    if source:
        lines.append("[source]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in source.items()]
    return "\n".join(lines) + "\n"


async def _publish(url: str, stream: str, prefix: str, messages: int, per: int) -> float:
    import msgspec
    import nats

    from collector.generic import generate_generic
    from collector.sinks.nats import Publisher, chunk_id

    nc = await nats.connect(url)
    await nc.jetstream().add_stream(name=stream, subjects=[f"{prefix}.>"], duplicate_window=120)
    await nc.close()
    n = messages * per
    evs = generate_generic(n, users=10_000_000, seed=int.from_bytes(os.urandom(3), "big"))
    lines = msgspec.json.Encoder().encode_lines(evs).splitlines()
    ids = [e["id"] for e in evs]
    if per == 1:
        msgs = [(f"{prefix}.e", ln, i) for ln, i in zip(lines, ids, strict=True)]
    else:
        msgs = [(f"{prefix}.e", b"\n".join(lines[lo:lo + per]) + b"\n", chunk_id(ids[lo:lo + per]))
                for lo in range(0, n, per)]
    pub = Publisher(url)
    t0 = time.perf_counter()
    for lo in range(0, len(msgs), 4096):
        await pub.publish(msgs[lo:lo + 4096])
    await pub.close()
    return time.perf_counter() - t0


async def _consumer(url: str, stream: str, durable: str) -> Any:
    import nats

    nc = await nats.connect(url)
    try:
        return await nc.jetstream().consumer_info(stream, durable)
    except Exception:
        return None
    finally:
        await nc.close()


def one(url: str, k: int, per: int, messages: int, latency: float, concurrency: int) -> dict[str, Any]:
    """K daemons drain ``messages`` messages of ``per`` events; the figures."""
    tag = uuid.uuid4().hex[:8]
    stream, prefix, durable = f"SCALE_{tag}", f"scale{tag}", f"scale{tag}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "SCALEOUT_LATENCY": str(latency), "SCALEOUT_CONCURRENCY": str(concurrency)}
    asyncio.run(_publish(url, stream, prefix, messages, per))
    source = {"url": url, "stream": stream, "subjects": [f"{prefix}.>"], "durable": durable,
              "batch": 64 if per == 1 else 8, "max_batches": 4, "fetchers": 2, "lag_interval": 1.0}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(k):
            d = tmp / f"d{i}"
            d.mkdir()
            (d / "collector.toml").write_text(_config(d / "events.jsonl", None))
            cmd = [sys.executable, "-m", "collector", "serve", "--config", str(d / "collector.toml"), "--port", "0",
                   "--port-file", str(d / "port"), "--workers", "1", "--data-dir", str(d)]
            with open(d / "daemon.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=ROOT))
        deadline = time.monotonic() + 90
        while not all((tmp / f"d{i}" / "port").exists() for i in range(k)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"daemons did not start: {[(tmp / f'd{i}' / 'daemon.log').read_text()[-800:] for i in range(k)]}")
            time.sleep(0.05)
        for i in range(k):  # the same [source] for all, then SIGHUP at once
            (tmp / f"d{i}" / "collector.toml").write_text(_config(tmp / f"d{i}" / "events.jsonl", source))
        for p in procs:
            p.send_signal(signal.SIGHUP)
        total = messages
        t0 = t1 = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            info = asyncio.run(_consumer(url, stream, durable))
            now = time.perf_counter()
            if info is not None:
                if t0 is None and (info.num_pending or 0) + (info.delivered.consumer_seq or 0) >= total \
                        and info.delivered.consumer_seq:
                    t0 = now
                if t0 is not None and not info.num_pending and not info.num_ack_pending:
                    t1 = now
                    break
            time.sleep(0.02)
        if t0 is None or t1 is None:
            raise RuntimeError("the consumer did not drain in 900 s")
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
        per_daemon = []
        for i in range(k):
            f = tmp / f"d{i}" / "events.jsonl"
            per_daemon.append(f.read_bytes().count(b"\n") if f.exists() else 0)
        n = messages * per
        stored = sum(per_daemon)
        if stored < n:
            raise RuntimeError(f"only {stored} of {n} events stored")
        secs = t1 - t0
        return {"daemons": k, "per_message": per, "messages": messages, "events": n, "seconds": round(secs, 2),
                "events_per_s": round(n / secs), "messages_per_s": round(messages / secs), "per_daemon": per_daemon,
                "duplicates": stored - n}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        asyncio.run(_delete(url, stream))
        shutil.rmtree(tmp, ignore_errors=True)


async def _delete(url: str, stream: str) -> None:
    import nats

    nc = await nats.connect(url)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream(stream)
    await nc.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("COLLECTOR_NATS_URL", "nats://127.0.0.1:4222"))
    ap.add_argument("--daemons", default="1,2,3", help="daemon counts to run (comma-separated)")
    ap.add_argument("--shapes", default="1,100", help="events per message (comma-separated)")
    ap.add_argument("--messages-1", type=int, default=20_000, help="messages for the 1-event shape")
    ap.add_argument("--messages-100", type=int, default=400, help="messages for the 100-event shape")
    ap.add_argument("--latency", type=float, default=0.005, help="simulated lookup latency, seconds (0: CPU-bound)")
    ap.add_argument("--concurrency", type=int, default=8, help="lookups in flight at once per worker")
    ap.add_argument("--json", action="store_true", help="print one JSON object per run instead of the table")
    a = ap.parse_args()
    logging.getLogger("collector").setLevel(logging.ERROR)  # the publisher's "disconnected" on close
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; lookup latency {a.latency * 1000:g} ms, "
          f"concurrency {a.concurrency} per daemon (1 worker each)", file=sys.stderr)
    rows = []
    for per in (int(x) for x in a.shapes.split(",")):
        base = None
        for k in (int(x) for x in a.daemons.split(",")):
            msgs = a.messages_1 if per == 1 else (a.messages_100 if per == 100 else max(1, a.messages_100 * 100 // per))
            r = one(a.url, k, per, msgs, a.latency, a.concurrency)
            if base is None:
                base = r["events_per_s"] / k
            r["scaling"] = round(r["events_per_s"] / (k * base), 2)  # against k x the first run's per-daemon figure
            r["load"] = round(os.getloadavg()[0], 1)
            rows.append(r)
            if a.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{per:>3} ev/msg  {k} daemon(s): {r['events']:>7,} events in {r['seconds']:>6.2f} s = "
                      f"{r['events_per_s']:>7,} events/s ({r['messages_per_s']:,} msg/s), "
                      f"{r['scaling']:.2f} x N x one; per daemon {r['per_daemon']}, load {r['load']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
